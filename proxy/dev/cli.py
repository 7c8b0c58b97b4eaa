"""`portcullis dev ...`: make a throw-away CA, SVIDs and an audit signing key pair, and play a
throw-away authorization server: issuer keys, access tokens, DPoP keys and proofs.

Rules:
- `register(subparsers)` receives the sub-parsers of the `dev` command (`proxy.cli` creates the
  `dev` parser) and adds `ca`, `svid`, `keypair`, `issuer`, `token`, `dpop-key` and `dpop`; each
  sets `func=cmd_x`, `cmd_x(args) -> int`.
- Success prints the written paths on stdout (`name: path` lines) and returns 0; `token`, `dpop`
  and `dpop-key` print exactly one line instead (the token, the proof, the key's RFC 7638
  thumbprint) so that `$(portcullis dev token ...)` is the value itself. Any failure prints ONE
  line, `portcullis dev <command>: error: <reason>`, on stderr and returns 2. Private keys are
  only ever written to files created 0600, never printed.
- Tokens and proofs are minted by `proxy.dev.tokens` (see its docstring for their shape).
- `dev svid` refuses a SPIFFE ID outside the CA's trust domain: a CA of domain A must never vouch
  for an ID in domain B (X509-SVID.md section 5.2), so such an SVID would be useless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from proxy.core.spiffe import parse_spiffe_id, parse_trust_domain
from proxy.dev import tokens as devtokens
from proxy.dev.ca import DevCA, generate_ed25519_keypair, write_file
from proxy.errors import InvalidValue

Handler = Callable[[argparse.Namespace], int]


def _fail(command: str, reason: str) -> int:
    print(f"portcullis dev {command}: error: {reason}", file=sys.stderr)
    return 2


def _guarded(command: str,
             body: Callable[[argparse.Namespace], Mapping[str, object] | str]) -> Handler:
    """A handler running `body`: its result is printed (`name: value` lines for a mapping, the
    string itself otherwise); InvalidValue / OSError / ValueError become one error line, exit 2."""
    def handler(args: argparse.Namespace) -> int:
        try:
            result = body(args)
        except InvalidValue as exc:
            return _fail(command, str(exc))
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            return _fail(command, f"{exc.strerror or exc}{where}")
        except ValueError as exc:
            return _fail(command, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if isinstance(result, str):
            print(result)
        else:
            for name, value in result.items():
                print(f"{name}: {value}")
        return 0

    handler.__name__ = f"cmd_{command.replace('-', '_')}"
    return handler


def _ca(args: argparse.Namespace) -> dict[str, Path]:
    parse_trust_domain(args.trust_domain)
    return DevCA.create(args.trust_domain, ttl_s=args.ttl_s).write(args.out)


def _svid(args: argparse.Namespace) -> dict[str, Path]:
    spiffe_id = parse_spiffe_id(args.spiffe_id)
    if not spiffe_id.path:
        raise InvalidValue("an SVID's SPIFFE ID needs a path (X509-SVID section 3.1)",
                           args.spiffe_id)
    ca = DevCA.load(args.ca)
    if spiffe_id.trust_domain != ca.trust_domain:
        raise InvalidValue(f"SPIFFE ID is not in the CA's trust domain {ca.trust_domain}",
                           args.spiffe_id)
    dns = tuple(args.dns) if args.dns else ("localhost",)
    svid = ca.issue_svid(args.spiffe_id, ttl_s=args.ttl_s, dns_names=dns)
    return svid.write(args.out, ca.bundle_pem())


def _keypair(args: argparse.Namespace) -> dict[str, Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = generate_ed25519_keypair()
    return {"key": write_file(out / "audit.key", private, secret=True),
            "pub": write_file(out / "audit.pub", public)}


def _issuer(args: argparse.Namespace) -> dict[str, object]:
    return devtokens.create_issuer(args.out, alg=args.alg, kid=args.kid)


def _amr(text: str | None) -> list[str]:
    if text is None:
        return []
    items = [a.strip() for a in text.split(",")]
    if not all(items):
        raise InvalidValue("--amr is a comma-separated list of methods, e.g. pwd,otp", text)
    return items


def _extra_claims(args: argparse.Namespace) -> dict[str, object]:
    extra: dict[str, object] = {}
    given = [(c, False) for c in args.claim or ()] + [(c, True) for c in args.claim_json or ()]
    for text, as_json in given:
        name, value = devtokens.parse_claim(text, as_json=as_json)
        if name in extra:
            raise InvalidValue("claim given twice", name)
        extra[name] = value
    return extra


def _token(args: argparse.Namespace) -> str:
    key = devtokens.load_private_key(args.issuer_key)
    jkt = args.dpop_jkt
    if args.dpop_key is not None:
        jkt = devtokens.jwk_thumbprint(devtokens.load_private_key(args.dpop_key))
    x5t = devtokens.cert_thumbprint(args.mtls_cert) if args.mtls_cert is not None else None
    details = (devtokens.parse_authorization_details(args.authorization_details)
               if args.authorization_details is not None else None)
    return devtokens.mint_access_token(
        key, kid=args.kid, alg=args.alg, iss=args.iss, aud=args.aud, sub=args.sub,
        ttl_s=args.ttl_s, jti=args.jti, client_id=args.client_id, scope=args.scope,
        acr=args.acr, amr=_amr(args.amr), auth_time=args.auth_time, actors=args.act or (),
        authorization_details=details, cnf_jkt=jkt, cnf_x5t_s256=x5t,
        extra=_extra_claims(args))


def _dpop_key(args: argparse.Namespace) -> str:
    _path, jkt = devtokens.create_dpop_key(args.out, alg=args.alg)
    return jkt


def _dpop(args: argparse.Namespace) -> str:
    key = devtokens.load_private_key(args.key)
    return devtokens.mint_dpop_proof(key, method=args.method, url=args.url,
                                     access_token=args.token, nonce=args.nonce, alg=args.alg,
                                     now=args.iat)


cmd_ca = _guarded("ca", _ca)
cmd_svid = _guarded("svid", _svid)
cmd_keypair = _guarded("keypair", _keypair)
cmd_issuer = _guarded("issuer", _issuer)
cmd_token = _guarded("token", _token)
cmd_dpop_key = _guarded("dpop-key", _dpop_key)
cmd_dpop = _guarded("dpop", _dpop)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


#: The options registered here whose values are random base64url (a key thumbprint, a server
#: nonce), which begins with "-" once in 64 values: argparse would read `--nonce -x...` as an option
#: with its value missing, so `proxy.cli.main` joins `--opt VALUE` into `--opt=VALUE` first.
DASH_VALUE_OPTIONS = frozenset({"--dpop-jkt", "--nonce"})


def register(subparsers: Any) -> None:
    """Add `ca`, `svid`, `keypair`, `issuer`, `token`, `dpop-key` and `dpop` to the sub-parsers
    of the `dev` command."""
    p = subparsers.add_parser("ca", help="create a self-signed dev CA (ca.pem, ca.key)")
    p.add_argument("--trust-domain", required=True, help="e.g. example.org")
    p.add_argument("--out", required=True, help="directory to write ca.pem and ca.key into")
    p.add_argument("--ttl-s", type=_positive_int, default=30 * 86400,
                   help="validity in seconds (default 30 days)")
    p.set_defaults(func=cmd_ca)

    p = subparsers.add_parser("svid", help="issue an X.509-SVID (spiffe-helper file layout)")
    p.add_argument("--ca", required=True, help="directory holding ca.pem and ca.key")
    p.add_argument("--spiffe-id", required=True, help="e.g. spiffe://example.org/web")
    p.add_argument("--out", required=True,
                   help="directory to write svid.pem, svid_key.pem, svid_bundle.pem into")
    p.add_argument("--ttl-s", type=_positive_int, default=86400,
                   help="validity in seconds (default 1 day)")
    p.add_argument("--dns", action="append", metavar="NAME",
                   help="DNS SAN (repeatable; default localhost)")
    p.set_defaults(func=cmd_svid)

    p = subparsers.add_parser("keypair", help="create an Ed25519 audit signing key pair")
    p.add_argument("--out", required=True, help="directory to write audit.key and audit.pub into")
    p.set_defaults(func=cmd_keypair)

    algs = ", ".join(devtokens.ALGORITHMS)
    p = subparsers.add_parser("issuer", help="create a token issuer key (issuer.key, jwks.json)")
    p.add_argument("--out", required=True, help="directory to write issuer.key and jwks.json into")
    p.add_argument("--alg", default=devtokens.DEFAULT_ALG,
                   help=f"signing algorithm (default ES256; one of {algs})")
    p.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    p.set_defaults(func=cmd_issuer)

    p = subparsers.add_parser("token", help="mint a JWT access token (RFC 9068); prints it")
    p.add_argument("--issuer-key", required=True, metavar="FILE",
                   help="the issuer's private key (issuer.key from `dev issuer`)")
    p.add_argument("--kid", required=True, help="key id, as in the issuer's jwks.json")
    p.add_argument("--alg", help="signing algorithm (default: the key's; PS256 etc. for RSA)")
    p.add_argument("--iss", required=True, help="issuer (the sidecar's tokens.issuers[].issuer)")
    p.add_argument("--aud", required=True, action="append",
                   help="audience (repeatable: several make an array)")
    p.add_argument("--sub", required=True, help="subject, e.g. the user")
    p.add_argument("--act", action="append", metavar="ID",
                   help="actor of the RFC 8693 act chain (repeatable; the CURRENT actor first)")
    p.add_argument("--client-id", help="client_id claim")
    p.add_argument("--scope", help='space-separated scopes, e.g. "orders:read orders:write"')
    p.add_argument("--acr", help="acr claim (authentication context class)")
    p.add_argument("--amr", help="comma-separated authentication methods, e.g. pwd,otp")
    p.add_argument("--auth-time", type=_int, metavar="EPOCH_S",
                   help="auth_time claim (seconds since the epoch)")
    p.add_argument("--ttl-s", type=_positive_int, default=devtokens.DEFAULT_TTL_S,
                   help="lifetime in seconds (default 300)")
    p.add_argument("--jti", help="token id (default: random)")
    bind = p.add_mutually_exclusive_group()
    bind.add_argument("--dpop-key", metavar="FILE",
                      help="bind to this DPoP key (cnf.jkt; the key from `dev dpop-key`)")
    bind.add_argument("--dpop-jkt", metavar="JKT",
                      help="bind to this DPoP key thumbprint (--dpop-jkt JKT or --dpop-jkt=JKT; "
                           "a thumbprint that begins with '-' is taken either way)")
    bind.add_argument("--mtls-cert", metavar="FILE",
                      help="bind to this client certificate (cnf x5t#S256; PEM leaf or DER)")
    p.add_argument("--authorization-details", metavar="JSON",
                   help='RFC 9396 details, e.g. \'[{"type":"payment","max_amount":100}]\'')
    p.add_argument("--claim", action="append", metavar="NAME=VALUE",
                   help="extra string claim (repeatable; applied last, may replace any claim)")
    p.add_argument("--claim-json", action="append", metavar="NAME=JSON",
                   help="extra claim with a JSON value (repeatable; applied last)")
    p.set_defaults(func=cmd_token)

    p = subparsers.add_parser("dpop-key", help="create a DPoP proof key; prints its jkt")
    p.add_argument("--out", required=True, metavar="FILE", help="private key file to write (0600)")
    p.add_argument("--alg", default=devtokens.DEFAULT_ALG,
                   help=f"proof algorithm (default ES256; one of {algs})")
    p.set_defaults(func=cmd_dpop_key)

    p = subparsers.add_parser("dpop", help="mint a DPoP proof (RFC 9449) for one request; prints it")
    p.add_argument("--key", required=True, metavar="FILE", help="the DPoP key (`dev dpop-key`)")
    p.add_argument("--method", required=True, help="HTTP method of the request, e.g. POST")
    p.add_argument("--url", required=True,
                   help="URL of the request (query and fragment are left out of htu)")
    p.add_argument("--token", help="the access token sent with it (adds ath)")
    p.add_argument("--nonce", help="the server nonce (from a DPoP-Nonce response header; one that "
                                   "begins with '-' is taken as well)")
    p.add_argument("--alg", help="proof algorithm (default: the key's; PS256 etc. for RSA)")
    p.add_argument("--iat", type=_int, metavar="EPOCH_S", help="issued-at (default: now)")
    p.set_defaults(func=cmd_dpop)


def build_parser(prog: str = "portcullis dev") -> argparse.ArgumentParser:
    """A stand-alone parser for the `dev` commands (what `proxy.cli` mounts under `dev`)."""
    parser = argparse.ArgumentParser(prog=prog)
    register(parser.add_subparsers(dest="dev_command", required=True))
    return parser
