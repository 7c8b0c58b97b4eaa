"""DPoP (RFC 9449): proof checks in the order of RFC 9449 section 4.3, the token binding check
(RFC 9449 section 7, RFC 8705 section 3), the `ath` hash and stateless server nonces.

`verify_dpop_proof` runs the checks below in this order; the first failure is reported, as a
`DPoPError` (401, `WWW-Authenticate: DPoP error="invalid_dpop_proof", algs="..."`) with a stable code:

 1. exactly one `DPoP` header field (`dpop_missing`, `dpop_multiple`; a value containing "," is
    several fields combined, RFC 9110 section 5.3) and at most `max_proof_bytes` (`dpop_too_large`);
 2. the value is one well-formed compact JWS whose header and payload are JSON objects, without
    duplicate members or `crit` (`core.jose.parse_jws`; `dpop_malformed`);
 3. the claims of section 4.2 are present: `jti`, `htm`, `htu`, `iat`, and `ath` when an access
    token is presented (`dpop_missing_claim`). Present = the member exists and is not null; each
    claim's type is checked by the check that uses it (8, 9, 11, 12, 13);
 4. header `typ` is exactly `dpop+jwt` (`dpop_wrong_type`);
 5. header `alg` is an asymmetric JWS algorithm in `DPoPConfig.algorithms`, never `none` or an
    HMAC (`dpop_alg_not_allowed`);
 6. the signature verifies with the key of the `jwk` header: a missing or unusable `jwk` is
    `dpop_bad_jwk`, an `alg` that does not fit the key type/curve (or the JWK's own `alg`) is
    `dpop_alg_key_mismatch`, a signature that does not verify is `dpop_bad_signature`. RSA keys
    must be 2048..4096 bits (a bigger key is only a way to make the sidecar burn CPU);
 7. the `jwk` carries no private member (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, `k`)
    (`dpop_bad_jwk`). To keep the RFC order, check 6 verifies with the public members only and
    check 7 then refuses the key if it had private ones: such a proof is refused either way;
 8. `htm` equals the request method, case-sensitively (RFC 9110 section 9.1) (`dpop_htm_mismatch`);
 9. `htu` equals the request URI ignoring query and fragment (`dpop_htu_mismatch`). The request URI
    is `request_uri(public_origin, canonical_path)`: the configured public origin, never Host,
    X-Forwarded-* or Forwarded. Both sides get RFC 3986 syntax-based normalisation only:
    scheme and host lowercase (6.2.2.1), percent-encoding hex uppercase (6.2.2.1) and unreserved
    characters decoded (6.2.2.2), dot segments removed (6.2.2.3, 5.2.4), the default port dropped
    and an empty path made "/" (6.2.3). Userinfo is refused (RFC 9110 section 4.2.4). The path is
    otherwise compared exactly: no trailing-slash or case folding, and `//` is not merged (the
    canonical path of `core.paths` merges it, so such a request fails closed here);
10. nonce (RFC 9449 sections 8 and 9): when `require_nonce`, or when a `nonce_check` is given and
    the proof carries a `nonce`, the `nonce` must be a string that `nonce_check` accepts, else
    `DPoPNonceRequired(current_nonce())` (401 `error="use_dpop_nonce"` + `DPoP-Nonce` header);
11. `iat` is an integer (not a bool, not a float) within
    [now - iat_window_s, now + iat_future_s] (section 11.1) (`dpop_iat_out_of_window`);
12. with an access token: `ath` == base64url(SHA-256(ASCII(token))) (`dpop_ath_mismatch`), and when
    the caller passes the token's `cnf.jkt` as `expected_jkt`, the proof key's thumbprint must equal
    it (`dpop_key_mismatch`, `error="invalid_token"` as in section 7.1). Passing it means a proof
    that does not belong to the token never reaches the replay store (check 13).
    Without an access token an `ath` claim is ignored: section 4.2 requires `ath` only "when the
    DPoP proof is used in conjunction with the presentation of an access token", section 4.3 item
    12 checks it only in that case, and section 4.2 lets a proof carry other claims;
13. `jti` (a non-empty string, else `dpop_bad_jti`) is single-use (`dpop_replayed`): the digest
    SHA-256(jkt "\\n" request-URI "\\n" jti) is recorded in the `ReplayStore` until
    iat + iat_window_s + iat_future_s, i.e. for as long as check 11 could accept the proof.
    Including the key thumbprint means one client cannot burn another client's jti values; the
    request URI follows section 11.1, which tracks jti values per target URI. A proof that fails any
    earlier check is never recorded. A store that cannot record it fails closed:
    `DPoPReplayStoreFull` (503), never an accepted proof.

`check_binding` then decides how the (already verified) access token is bound to this presenter:
- `cnf.jkt` (RFC 9449 section 6.1): the Authorization scheme must be `DPoP`; a DPoP-bound token
  sent as `Bearer` is refused (`dpop_bound_token_as_bearer`, section 7.2); a verified proof must
  be present (`dpop_missing`) and its key thumbprint must equal `cnf.jkt` (`dpop_key_mismatch`).
- the `DPoP` scheme with a token that has no `cnf.jkt`: `dpop_token_not_bound` (section 7.1).
- `cnf["x5t#S256"]` (RFC 8705 section 3.1): must equal base64url(SHA-256(leaf certificate DER)) of
  THIS TLS connection (`mtls_binding_mismatch`).
- the route's `required` binding: "dpop", "mtls", "any" (either) or "none" (unbound bearer tokens
  too); a token whose binding does not satisfy it is refused (`binding_required`). No token at all
  is `Binding("none")`: whether a token is needed is decided elsewhere.
Binding failures are `TokenError` 401s with `error="invalid_token"` (`dpop_missing`:
`invalid_dpop_proof`); the challenge is `DPoP ..., algs="..."` when the route accepts DPoP
(every `required` but "mtls"), else `Bearer` (RFC 9449 section 7.1, RFC 6750 section 3).

Other rules: sans-IO, time is `now`, secrets are arguments. Proofs and tokens never appear in
an error or a result: only `fingerprint` (hex SHA-256 of the proof) and digests. Error details
quote at most a short, truncated `repr` of a claim value.

Speed (this runs on every request, and every proof is new): each part is decoded and parsed
once, the key and its RFC 7638 thumbprint are computed once (`core.jose.parse_jwk`). A client
signs every proof with the same key, so its base64url header segment (`typ`, `alg`, `jwk`) is the
same string on every proof: the header parse and the key are memoised by that exact string in a
bounded LRU (`HEADER_CACHE_SIZE` entries, a few MB at most). That is a pure function of its input:
a result is identical with or without the cache, failures are never cached, and a flood of
distinct headers only costs the uncached path. What is left per proof is the payload, the
signature verification itself and a few hashes (`bench/bench_dpop.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Literal

from proxy.core.jose import (ASYMMETRIC_ALGS, JWK, JWS, b64url_decode, b64url_encode, check_alg,
                             json_object, parse_jwk, parse_jws)
from proxy.core.jose import verify as jws_verify
from proxy.core.model import Binding, TokenClaims
from proxy.core.replay import ReplayStore
from proxy.errors import (ConfigError, DPoPError, DPoPNonceRequired, DPoPReplayStoreFull,
                          InternalError, InvalidValue, Problem, ReplayStoreFull, TokenError)

# Stable codes (public interface: audit, metrics, response bodies). Never rename, only add.
DPOP_MISSING = "dpop_missing"
DPOP_MULTIPLE = "dpop_multiple"
DPOP_TOO_LARGE = "dpop_too_large"
DPOP_MALFORMED = "dpop_malformed"
DPOP_MISSING_CLAIM = "dpop_missing_claim"
DPOP_WRONG_TYPE = "dpop_wrong_type"
DPOP_ALG_NOT_ALLOWED = "dpop_alg_not_allowed"
DPOP_BAD_JWK = "dpop_bad_jwk"
DPOP_ALG_KEY_MISMATCH = "dpop_alg_key_mismatch"
DPOP_BAD_SIGNATURE = "dpop_bad_signature"
DPOP_HTM_MISMATCH = "dpop_htm_mismatch"
DPOP_HTU_MISMATCH = "dpop_htu_mismatch"
DPOP_IAT_OUT_OF_WINDOW = "dpop_iat_out_of_window"
DPOP_ATH_MISMATCH = "dpop_ath_mismatch"
DPOP_KEY_MISMATCH = "dpop_key_mismatch"
DPOP_BAD_JTI = "dpop_bad_jti"
DPOP_REPLAYED = "dpop_replayed"
DPOP_BOUND_TOKEN_AS_BEARER = "dpop_bound_token_as_bearer"
DPOP_TOKEN_NOT_BOUND = "dpop_token_not_bound"
MTLS_BINDING_MISMATCH = "mtls_binding_mismatch"
BINDING_REQUIRED = "binding_required"

TYP = "dpop+jwt"
MAX_RSA_BITS = 4096
HEADER_CACHE_SIZE = 512
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_BASE_CLAIMS = ("jti", "htm", "htu", "iat")
_TOKEN_CLAIMS = ("jti", "htm", "htu", "iat", "ath")
RequiredBinding = Literal["dpop", "mtls", "any", "none"]
_REQUIRED_BINDINGS = frozenset({"dpop", "mtls", "any", "none"})


@dataclass(frozen=True, slots=True)
class DPoPConfig:
    """DPoP settings of a sidecar (validated once, at load). `algs` is the space-separated sorted
    list advertised in `WWW-Authenticate: DPoP algs="..."` (RFC 9449 section 7.1)."""

    algorithms: frozenset[str]
    iat_window_s: int = 60
    iat_future_s: int = 5
    max_proof_bytes: int = 4096
    require_nonce: bool = False
    algs: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        algorithms = self.algorithms
        if isinstance(algorithms, str) or not all(isinstance(a, str) for a in algorithms):
            problems.append(Problem("dpop.algorithms", "must be a list of algorithm names"))
            algorithms = frozenset()
        else:
            algorithms = frozenset(algorithms)
            if not algorithms:
                problems.append(Problem("dpop.algorithms", "must not be empty"))
            for bad in sorted(algorithms - ASYMMETRIC_ALGS):
                problems.append(Problem("dpop.algorithms",
                                        f"{bad!r} is not an accepted asymmetric JWS algorithm"))
        for name, low in (("iat_window_s", 1), ("iat_future_s", 0), ("max_proof_bytes", 256)):
            v = getattr(self, name)
            if type(v) is not int or v < low:
                problems.append(Problem(f"dpop.{name}", f"must be an integer >= {low}"))
        if type(self.require_nonce) is not bool:
            problems.append(Problem("dpop.require_nonce", "must be a boolean"))
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "algorithms", algorithms)
        object.__setattr__(self, "algs", " ".join(sorted(algorithms)))


@dataclass(frozen=True, slots=True)
class DPoPProof:
    """A verified DPoP proof, reduced to what binding and audit use (never the proof itself)."""

    jkt: str  # RFC 7638 SHA-256 thumbprint of the proof key, base64url
    jti_digest: bytes  # the replay-store key: SHA-256(jkt "\n" request-URI "\n" jti)
    iat: int
    fingerprint: str  # hex SHA-256 of the proof (the header value)


# --------------------------------------------------------------------------------------------
# ath, request URI, htu comparison
# --------------------------------------------------------------------------------------------


def ath(token: str) -> str:
    """RFC 9449 section 4.2: base64url(SHA-256(ASCII(access token))). Non-ASCII -> InvalidValue."""
    if not isinstance(token, str) or not token.isascii():
        raise InvalidValue("an access token is ASCII")
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/]*)(.*)", re.DOTALL)
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::([0-9]*))?")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def _pct(m: re.Match[str]) -> str:
    c = chr(int(m.group(1), 16))
    return c if c in _UNRESERVED else "%" + m.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/" + "/".join(out)
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def _normalize_path(path: str) -> str:
    if not path:
        return "/"  # RFC 3986 6.2.3: an empty path of an http(s) URI is "/"
    if "%" in path:
        path = _PCT.sub(_pct, path)
    if "." in path and any(s in (".", "..") for s in path.split("/")):
        path = _remove_dot_segments(path)
    return path


def _normalize_authority(scheme: str, authority: str) -> str | None:
    m = _AUTHORITY.fullmatch(authority)
    if m is None:
        return None  # userinfo, an empty host, a bad port, characters a host cannot hold
    host = _PCT.sub(lambda p: "%" + p.group(1).upper(), m.group(1).lower())
    port = m.group(2)
    if port:
        n = int(port)
        if n > 65535:
            return None
        if n != _DEFAULT_PORTS[scheme]:
            return f"{host}:{n}"
    return host


def _normalize_uri(uri: str) -> str | None:
    """Syntax- and scheme-based normalisation of an http(s) URI without query and fragment;
    None when it is not one."""
    m = _URI.fullmatch(uri)
    if m is None:
        return None
    scheme = m.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    authority = _normalize_authority(scheme, m.group(2))
    if authority is None:
        return None
    return f"{scheme}://{authority}{_normalize_path(m.group(3))}"


@lru_cache(maxsize=64)
def normalize_origin(public_origin: str) -> str:
    """`scheme://host[:port]`, normalised (see check 9). Raises InvalidValue (call it at load)."""
    m = _URI.fullmatch(public_origin) if isinstance(public_origin, str) else None
    norm = _normalize_uri(f"{m.group(1)}://{m.group(2)}") if m and m.group(3) in ("", "/") else None
    if norm is None:
        raise InvalidValue("a public origin is scheme://host[:port]", str(public_origin))
    return norm[:-1]  # without the "/" path


def request_uri(public_origin: str, path: str) -> str:
    """The `htu` a proof for this request must carry: the configured public origin (never Host /
    X-Forwarded-* / Forwarded) + the canonical path, normalised, without query or fragment."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidValue("a request path starts with '/'", str(path))
    for sep in ("#", "?"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return normalize_origin(public_origin) + _normalize_path(path)


def htu_matches(claim: str, expected: str) -> bool:
    """RFC 9449 section 4.3 item 9: the `htu` claim names `expected` (a `request_uri` result),
    ignoring query and fragment. One string comparison when the client sent the normal form."""
    cut = claim.find("#")
    if cut >= 0:
        claim = claim[:cut]
    cut = claim.find("?")
    if cut >= 0:
        claim = claim[:cut]
    return claim == expected or _normalize_uri(claim) == expected


# --------------------------------------------------------------------------------------------
# The proof
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=HEADER_CACHE_SIZE)
def _header(h64: str) -> dict[str, Any]:
    """The protected header of a compact JWS, under exactly the rules of `core.jose.parse_jws`
    (which it runs, on the header with an empty object as payload). Memoised (module docstring);
    the result is shared and must never be mutated. Failures raise InvalidValue, never cached."""
    return parse_jws(h64 + ".e30.").header  # "e30" is base64url("{}")


@lru_cache(maxsize=HEADER_CACHE_SIZE)
def _header_key(h64: str) -> tuple[JWK, bool]:
    """The public key of the `jwk` header (`core.jose.parse_jwk` on its public members, so that
    check 6 can run before check 7) and whether it had private members. Memoised like `_header`."""
    jwk = _header(h64).get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidValue("no jwk header object")
    has_private = not _PRIVATE_MEMBERS.isdisjoint(jwk)
    key = parse_jwk({k: v for k, v in jwk.items() if k not in _PRIVATE_MEMBERS}
                    if has_private else jwk)
    if key.kty == "RSA" and key.key.key_size > MAX_RSA_BITS:
        raise InvalidValue(f"RSA key longer than {MAX_RSA_BITS} bits")
    return key, has_private


def _show(value: Any) -> str:
    """A short, bounded rendering of an untrusted claim value for an error detail."""
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def verify_dpop_proof(headers: list[str], *, method: str, htu: str, access_token: str | None,
                      config: DPoPConfig, replay: ReplayStore, now: float,
                      nonce_check: Callable[[str], bool] | None = None,
                      current_nonce: Callable[[], str] | None = None,
                      expected_jkt: str | None = None,
                      token_sha256: bytes | None = None) -> DPoPProof:
    """Run the RFC 9449 section 4.3 checks (module docstring) on the values of every `DPoP` header
    field of one request. `htu` is `request_uri(...)`; `access_token` is the presented token, if
    any; `expected_jkt` optionally the token's `cnf.jkt`; `token_sha256` the SHA-256 of the
    ASCII `access_token` when the caller already computed it (a verified token's fingerprint), so
    that `ath` is not hashed a second time. Returns the verified proof or raises
    `DPoPError` / `DPoPNonceRequired` (401), `DPoPReplayStoreFull` (503)."""
    algs = config.algs

    # 1. exactly one DPoP header field, bounded
    if len(headers) != 1:
        if not headers:
            raise DPoPError(DPOP_MISSING, "no DPoP header", algs=algs)
        raise DPoPError(DPOP_MULTIPLE, f"{len(headers)} DPoP header fields", algs=algs)
    value = headers[0]
    if not isinstance(value, str):
        raise DPoPError(DPOP_MALFORMED, "DPoP header value is not text", algs=algs)
    value = value.strip(" \t")
    if "," in value:
        raise DPoPError(DPOP_MULTIPLE, "DPoP header fields combined with ','", algs=algs)
    if len(value) > config.max_proof_bytes:
        raise DPoPError(DPOP_TOO_LARGE, f"{len(value)} > {config.max_proof_bytes} bytes", algs=algs)

    # 2. one well-formed JWT (compact JWS, JSON header and payload)
    parts = value.split(".")
    if len(parts) != 3:
        raise DPoPError(DPOP_MALFORMED, "not a compact JWS (three parts)", algs=algs)
    h64, p64, s64 = parts
    try:
        header = _header(h64)
        if not p64:
            raise InvalidValue("JWS has an empty part")
        claims = json_object(b64url_decode(p64), "JWS payload")
        signature = b64url_decode(s64) if s64 else b""
    except InvalidValue as exc:
        raise DPoPError(DPOP_MALFORMED, exc.reason, algs=algs) from None

    # 3. required claims (RFC 9449 section 4.2)
    for name in (_BASE_CLAIMS if access_token is None else _TOKEN_CLAIMS):
        if claims.get(name) is None:
            raise DPoPError(DPOP_MISSING_CLAIM, f"no {name} claim", algs=algs)

    # 4. typ
    typ = header.get("typ")
    if typ != TYP:
        raise DPoPError(DPOP_WRONG_TYPE, f"typ {_show(typ)}", algs=algs)

    # 5. alg: asymmetric, allowed here
    try:
        alg = check_alg(header.get("alg"), config.algorithms)
    except InvalidValue as exc:
        raise DPoPError(DPOP_ALG_NOT_ALLOWED, f"{exc.reason}: {_show(header.get('alg'))}",
                        algs=algs) from None

    # 6. the signature verifies with the jwk header (its public members)
    try:
        key, has_private = _header_key(h64)
    except InvalidValue as exc:
        raise DPoPError(DPOP_BAD_JWK, exc.reason, algs=algs) from None
    if alg not in key.algorithms() or (key.alg is not None and key.alg != alg):
        raise DPoPError(DPOP_ALG_KEY_MISMATCH, f"alg {alg} with a {key.kty} {key.crv or ''} key",
                        algs=algs)
    try:
        jws_verify(JWS(header, claims, value[:len(h64) + 1 + len(p64)].encode("ascii"), signature),
                   key, alg)
    except InvalidValue as exc:
        raise DPoPError(DPOP_BAD_SIGNATURE, exc.reason, algs=algs) from None

    # 7. no private key material in the jwk header
    if has_private:
        raise DPoPError(DPOP_BAD_JWK, "jwk header has private members", algs=algs)

    # 8. htm
    htm = claims["htm"]
    if htm != method:
        raise DPoPError(DPOP_HTM_MISMATCH, f"htm {_show(htm)} for a {method} request", algs=algs)

    # 9. htu
    claim_htu = claims["htu"]
    if not isinstance(claim_htu, str) or not htu_matches(claim_htu, htu):
        raise DPoPError(DPOP_HTU_MISMATCH, f"htu {_show(claim_htu)}", algs=algs)

    # 10. nonce (sections 8 and 9)
    nonce = claims.get("nonce")
    if config.require_nonce or (nonce_check is not None and nonce is not None):
        if nonce_check is None or current_nonce is None:
            raise InternalError("dpop_nonce_unconfigured",
                                "DPoP nonces need both nonce_check and current_nonce")
        if not isinstance(nonce, str) or not nonce_check(nonce):
            raise DPoPNonceRequired(current_nonce(), "no nonce" if nonce is None
                                    else "nonce invalid or expired", algs=algs)

    # 11. iat within the window (section 11.1)
    iat = claims["iat"]
    if type(iat) is not int or not now - config.iat_window_s <= iat <= now + config.iat_future_s:
        raise DPoPError(DPOP_IAT_OUT_OF_WINDOW, f"iat {_show(iat)} at {int(now)}", algs=algs)

    # 12. ath, and the token's key when the caller knows it
    jkt = key.thumbprint
    if access_token is not None:
        try:
            expected_ath = ath(access_token) if token_sha256 is None \
                else b64url_encode(token_sha256)
        except InvalidValue:
            expected_ath = None
        if claims["ath"] != expected_ath:
            raise DPoPError(DPOP_ATH_MISMATCH, "ath is not the hash of the access token",
                            algs=algs)
    if expected_jkt is not None and jkt != expected_jkt:
        raise DPoPError(DPOP_KEY_MISMATCH, "proof key is not the key the token is bound to",
                        algs=algs, rfc_error="invalid_token")

    # 13. jti: single use within the window
    jti = claims["jti"]
    if not isinstance(jti, str) or not jti:
        raise DPoPError(DPOP_BAD_JTI, f"jti {_show(jti)}", algs=algs)
    digest = hashlib.sha256("\n".join((jkt, htu, jti)).encode("utf-8", "surrogatepass")).digest()
    try:
        replayed = replay.seen(digest, iat + config.iat_window_s + config.iat_future_s, now)
    except ReplayStoreFull as exc:
        raise DPoPReplayStoreFull(detail=exc.detail) from None
    if replayed:
        raise DPoPError(DPOP_REPLAYED, "jti already used with this key and URI", algs=algs)
    return DPoPProof(jkt=jkt, jti_digest=digest, iat=iat,
                     fingerprint=hashlib.sha256(value.encode("ascii")).hexdigest())


# --------------------------------------------------------------------------------------------
# Binding of the access token to the presenter
# --------------------------------------------------------------------------------------------

_NO_TOKEN = Binding("none")


def check_binding(claims: TokenClaims | None, scheme: str | None, proof: DPoPProof | None,
                  peer_cert_sha256: bytes | None, required: RequiredBinding,
                  algs: str) -> Binding:
    """How the verified token is bound to this presenter (module docstring); raises TokenError."""
    if required not in _REQUIRED_BINDINGS:
        raise InternalError("binding_config_invalid", f"required binding {required!r}")
    if claims is None:
        return _NO_TOKEN
    dpop_challenge = required != "mtls"

    def refuse(code: str, detail: str, rfc_error: str = "invalid_token") -> TokenError:
        if dpop_challenge:
            return TokenError(code, detail, rfc_error=rfc_error, scheme="DPoP", algs=algs)
        return TokenError(code, detail)

    dpop_scheme = scheme is not None and scheme.lower() == "dpop"  # RFC 9110 11.1: no case
    dpop_bound = mtls_bound = False
    if claims.cnf_jkt is not None:
        if not dpop_scheme:
            raise refuse(DPOP_BOUND_TOKEN_AS_BEARER, f"DPoP-bound token with scheme {_show(scheme)}")
        if proof is None:
            raise refuse(DPOP_MISSING, "DPoP-bound token without a DPoP proof",
                         "invalid_dpop_proof")
        if proof.jkt != claims.cnf_jkt:
            raise refuse(DPOP_KEY_MISMATCH, "proof key is not the key the token is bound to")
        dpop_bound = True
    elif dpop_scheme:
        raise refuse(DPOP_TOKEN_NOT_BOUND, "DPoP scheme with a token that has no cnf.jkt")
    if claims.cnf_x5t_s256 is not None:
        if peer_cert_sha256 is None or b64url_encode(peer_cert_sha256) != claims.cnf_x5t_s256:
            raise refuse(MTLS_BINDING_MISMATCH, "cnf x5t#S256 is not this connection's certificate")
        mtls_bound = True
    if (required == "dpop" and not dpop_bound) or (required == "mtls" and not mtls_bound) or \
            (required == "any" and not (dpop_bound or mtls_bound)):
        have = "dpop" if dpop_bound else "mtls" if mtls_bound else "bearer"
        raise refuse(BINDING_REQUIRED, f"route requires {required} binding, token is {have}")
    if dpop_bound:
        assert proof is not None
        return Binding("dpop", jkt=proof.jkt, proof_fingerprint=proof.fingerprint)
    return Binding("mtls" if mtls_bound else "bearer")


# --------------------------------------------------------------------------------------------
# Server nonces (RFC 9449 section 9)
# --------------------------------------------------------------------------------------------

_NONCE_LABEL = b"portcullis dpop nonce v1\x00"
_NONCE_BYTES = 18  # 144 bits of HMAC-SHA256 -> 24 base64url characters


class NonceIssuer:
    """Stateless rotating server nonces: base64url(HMAC-SHA256(secret, label || window)[:18]) with
    window = floor(now / rotate_s). A nonce is valid in its window and the next one, so it lives
    between rotate_s and 2 * rotate_s; every replica sharing the secret accepts it. Nonces are
    opaque to clients and use only base64url characters (section 8.1 `NQCHAR`)."""

    __slots__ = ("_secret", "rotate_s")

    def __init__(self, secret: bytes, rotate_s: int = 300) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 32:
            raise ValueError("a nonce secret is at least 32 bytes")
        if type(rotate_s) is not int or rotate_s < 1:
            raise ValueError("rotate_s must be a positive integer")
        self._secret = bytes(secret)
        self.rotate_s = rotate_s

    def _nonce(self, window: int) -> bytes:
        mac = hmac.new(self._secret, _NONCE_LABEL + window.to_bytes(8, "big", signed=True),
                       hashlib.sha256).digest()
        return b64url_encode(mac[:_NONCE_BYTES]).encode("ascii")

    def current(self, now: float) -> str:
        return self._nonce(int(now // self.rotate_s)).decode("ascii")

    def valid(self, nonce: str, now: float) -> bool:
        if not isinstance(nonce, str) or len(nonce) != 24 or not nonce.isascii():
            return False
        given = nonce.encode("ascii")
        window = int(now // self.rotate_s)
        ok_now = hmac.compare_digest(given, self._nonce(window))
        ok_prev = hmac.compare_digest(given, self._nonce(window - 1))
        return ok_now or ok_prev
