"""`portcullis dev ...`: make a throw-away CA, SVIDs and an audit signing key pair.

Rules:
- `register(subparsers)` receives the sub-parsers of the `dev` command (`proxy.cli` creates the
  `dev` parser) and adds `ca`, `svid` and `keypair`; each sets `func=cmd_x`, `cmd_x(args) -> int`.
- Success prints the written paths on stdout and returns 0. Any failure prints ONE line,
  `portcullis dev <command>: error: <reason>`, on stderr and returns 2. Key material is never
  printed.
- `dev svid` refuses a SPIFFE ID outside the CA's trust domain: a CA of domain A must never vouch
  for an ID in domain B (X509-SVID.md section 5.2), so such an SVID would be useless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from proxy.core.spiffe import parse_spiffe_id, parse_trust_domain
from proxy.dev.ca import DevCA, generate_ed25519_keypair, write_file
from proxy.errors import InvalidValue

Handler = Callable[[argparse.Namespace], int]


def _fail(command: str, reason: str) -> int:
    print(f"portcullis dev {command}: error: {reason}", file=sys.stderr)
    return 2


def _guarded(command: str, body: Callable[[argparse.Namespace], dict[str, Path]]) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        try:
            written = body(args)
        except InvalidValue as exc:
            return _fail(command, str(exc))
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            return _fail(command, f"{exc.strerror or exc}{where}")
        except ValueError as exc:
            return _fail(command, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        for name, path in written.items():
            print(f"{name}: {path}")
        return 0

    handler.__name__ = f"cmd_{command}"
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


cmd_ca = _guarded("ca", _ca)
cmd_svid = _guarded("svid", _svid)
cmd_keypair = _guarded("keypair", _keypair)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def register(subparsers: Any) -> None:
    """Add `ca`, `svid` and `keypair` to the sub-parsers of the `dev` command."""
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


def build_parser(prog: str = "portcullis dev") -> argparse.ArgumentParser:
    """A stand-alone parser for the `dev` commands (what `proxy.cli` mounts under `dev`)."""
    parser = argparse.ArgumentParser(prog=prog)
    register(parser.add_subparsers(dest="dev_command", required=True))
    return parser
