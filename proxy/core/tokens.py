"""OAuth access tokens (JWT, RFC 9068), their delegation chains and details, and JWT-SVIDs.

Pure: no I/O, time is the `now` argument. JOSE work (JWS parsing, algorithm allow-lists, keys,
signatures) is `proxy.core.jose`; this module applies the token profiles on top of it.

Access tokens, `verify_access_token` — the checks run in this order, and each failure raises
`TokenError(code, detail, rfc_error="invalid_token")` (RFC 6750 section 3.1) with a stable code:

 1. size: longer than the largest `max_token_bytes` of any issuer (before parsing), or than the
    issuer's own limit (once `iss` is known)                                     `token_too_large`
 2. JWS compact parse (RFC 7515 7.1; strict base64url, JSON objects, no duplicate members, no
    `crit`, a string `kid` when present)                                        `token_malformed`
 3. `alg` is an asymmetric algorithm of `jose.ASYMMETRIC_ALGS` — `none` and HMAC are refused
    before anything else is looked at (RFC 8725 3.1, 3.2; RFC 9068 section 4) and, once the issuer
    is known, in that issuer's allow-list                                 `token_alg_not_allowed`
 4. `iss` names a configured issuer (RFC 9068 section 4; exact string match) `token_unknown_issuer`
 5. the issuer's JWKS is loaded                                          `token_keys_unavailable`
 6. a key of THAT JWKS matches `kid` and `alg` (all keys for the alg when there is no `kid`).
    Keys named by the token itself (`jku`, `x5u`, `jwk`, `x5c`) are never used (RFC 8725 3.10).
    The runtime uses this code to trigger one rate-limited JWKS refresh.        `token_unknown_kid`
 7. the signature verifies (RFC 7515 section 5.2)                           `token_bad_signature`
 8. `typ`: with `require_at_jwt_typ`, "at+jwt" or "application/at+jwt" (RFC 9068 section 2.1,
    compared case-insensitively as a media type, RFC 7515 4.1.9); otherwise a `typ`, when present,
    must not say the JWT is of another kind (RFC 8725 3.11: one of JWT, JOSE, at+jwt)
                                                                               `token_wrong_type`
 9. `exp` (RFC 7519 4.1.4): now < exp + leeway                                    `token_expired`
10. `nbf` (RFC 7519 4.1.5): now >= nbf - leeway                             `token_not_yet_valid`
11. `iat` (RFC 7519 4.1.6) not after now + leeway                        `token_issued_in_future`
12. `aud` (RFC 7519 4.1.3; string or array) holds one of the issuer's audiences
                                                                           `token_wrong_audience`
13. every claim of `required_claims` is present (`exp` always is)           `token_missing_claim`
14. claim types: `sub`, `client_id`, `acr`, `jti` strings; `exp`, `iat`, `nbf`, `auth_time`
    integers (not booleans, not fractions); `amr` an array of strings; `scope` a space-delimited
    string of RFC 6749 3.3 scope-tokens (RFC 8693 4.2, RFC 9068 2.2.3); `scp` an array of
    scope-tokens (or a space-delimited string, as some issuers send it); no string holds a lone
    UTF-16 surrogate (it could not be written to the audit log)            `token_malformed_claim`
    A time or audience claim of the wrong type fails with this code at its own step (9-12).
15. `cnf` (RFC 7800 3.1), when present: an object holding `jkt` (RFC 9449 6.1) and/or `x5t#S256`
    (RFC 8705 3.1), each the base64url SHA-256 of 43 characters, and nothing else — a confirmation
    method we cannot enforce must not turn a bound token into a bearer token         `token_bad_cnf`
16. `act` (RFC 8693 4.1): an object with a non-empty string `sub`, optional string `iss` and
    `client_id`, and possibly a nested `act`; at most `max_delegation_depth` actors. `actors` lists
    the CURRENT actor first. Only the current actor is for access control; the prior ones are
    informational (RFC 8693 4.1)                                                    `token_bad_act`
17. `authorization_details` (RFC 9396 section 2): an array of objects, each with a string `type`
                                                                `token_bad_authorization_details`

The result carries every claim deeply frozen (`claims`), and `fingerprint`, the hex SHA-256 of the
token: the only form in which a token may reach a log. Error details never contain the token.

Cache (`TokenCache`, `verify_access_token_cached`): verified claims by SHA-256 digest of the token
(never the token), LRU-bounded. An entry is served only while `now < exp` (no leeway) and only
while the issuers mapping still holds, for the token's issuer, the very same `IssuerPolicy` AND the
very same `JWKSet` objects the token was verified with (identity, not equality). A reload that
removes or changes the issuer, or a JWKS refresh that publishes a new key set (a key withdrawn
after a compromise), therefore re-verifies the token instead of serving the old result. The runtime
must build a new `IssuerPolicy` / `JWKSet` object whenever their content changes (they are frozen,
so it cannot do otherwise) and should keep the objects when nothing changed.

JWT-SVIDs, `verify_jwt_svid` (SPIFFE JWT-SVID.md): compact JWS (5.1) with only the header members
`alg`, `kid`, `typ` (section 2); `alg` one of RS/ES/PS 256/384/512 (2.1); `typ`, when present,
"JWT" or "JOSE" (2.3); `kid` required (section 2.2 makes it optional, but the SPIFFE bundle format
names every JWT authority by its kid, bundle spec 4.2.2, so a kid-less token cannot be matched to
one authority); `sub` the SPIFFE ID of a workload (3.1; parsed by `spiffe.parse_spiffe_id`, and
with a path, as for X.509-SVIDs) whose trust domain's bundle alone supplies the key (a key of
domain A never vouches for an ID of domain B); `nbf`, when present, is honoured (RFC 7519 4.1.5); `exp` required (3.3), `aud` required and holding
one of ours (3.2). Codes are `jwt_svid_*` (`JWT_SVID_CODES`).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, NoReturn

from proxy.core import jose
from proxy.core.jose import JWK, JWKSet
from proxy.core.model import Actor, SpiffeId, TokenClaims
from proxy.core.spiffe import TrustStore, parse_spiffe_id
from proxy.errors import InvalidValue, TokenError

#: Every stable code `verify_access_token` may raise, in check order.
TOKEN_CODES = (
    "token_too_large",
    "token_malformed",
    "token_alg_not_allowed",
    "token_unknown_issuer",
    "token_keys_unavailable",
    "token_unknown_kid",
    "token_bad_signature",
    "token_wrong_type",
    "token_expired",
    "token_not_yet_valid",
    "token_issued_in_future",
    "token_wrong_audience",
    "token_missing_claim",
    "token_malformed_claim",
    "token_bad_cnf",
    "token_bad_act",
    "token_bad_authorization_details",
)

#: Every stable code `verify_jwt_svid` may raise.
JWT_SVID_CODES = (
    "jwt_svid_too_large",
    "jwt_svid_malformed",
    "jwt_svid_alg_not_allowed",
    "jwt_svid_wrong_type",
    "jwt_svid_missing_kid",
    "jwt_svid_invalid_spiffe_id",
    "jwt_svid_untrusted",
    "jwt_svid_bad_signature",
    "jwt_svid_missing_claim",
    "jwt_svid_malformed_claim",
    "jwt_svid_expired",
    "jwt_svid_not_yet_valid",
    "jwt_svid_wrong_audience",
)

DEFAULT_MAX_TOKEN_BYTES = 8192
MAX_JWT_SVID_BYTES = 8192
#: JWT-SVID.md section 2.1.
JWT_SVID_ALGS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                           "PS256", "PS384", "PS512"})
_JWT_SVID_HEADER = frozenset({"alg", "kid", "typ"})
_JWT_SVID_TYPES = frozenset({"JWT", "JOSE"})

_AT_JWT_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_GENERIC_TYPES = frozenset({"jwt", "application/jwt", "jose", "application/jose"}) | _AT_JWT_TYPES
_CNF_MEMBERS = frozenset({"jkt", "x5t#S256"})
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), separated by spaces.
_SCOPE_STRING = re.compile(r"[\x20\x21\x23-\x5B\x5D-\x7E]*")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")
_MISSING: Any = object()
#: Longest token the cache will hash before handing it to full verification (which refuses it).
_CACHE_HASH_CEILING = 1 << 16


def _fail(code: str, detail: str, issuer: str | None = None) -> NoReturn:
    err = TokenError(code, detail, rfc_error="invalid_token")
    err.issuer = issuer  # lets the runtime refresh that issuer's keys (unknown kid)
    raise err


# --------------------------------------------------------------------------------------------
# Issuer configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuerPolicy:
    """The validated configuration of one token issuer. Construction refuses anything that could
    weaken a check (empty allow-lists, symmetric algorithms, tokens without `exp`)."""

    issuer: str  # exact `iss` match
    audiences: frozenset[str]  # token `aud` must contain at least one
    algorithms: frozenset[str]  # subset of jose.ASYMMETRIC_ALGS
    leeway_s: int = 30  # clock skew for exp / nbf / iat
    required_claims: frozenset[str] = frozenset({"exp", "sub"})
    require_at_jwt_typ: bool = False  # RFC 9068 section 2.1
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    max_delegation_depth: int = 8  # most actors in a nested `act` chain

    def __post_init__(self) -> None:
        for name in ("audiences", "algorithms", "required_claims"):
            value = getattr(self, name)
            if not isinstance(value, (set, frozenset, list, tuple)) \
                    or not all(isinstance(v, str) for v in value):
                raise InvalidValue(f"issuer {name} must be a set of strings")
            object.__setattr__(self, name, frozenset(value))
        if not isinstance(self.issuer, str) or not self.issuer:
            raise InvalidValue("issuer must be a non-empty string")
        if not self.audiences or "" in self.audiences:
            raise InvalidValue("issuer audiences must be a non-empty set of non-empty strings")
        if not self.algorithms:
            raise InvalidValue("issuer algorithms must not be empty")
        refused = self.algorithms - jose.ASYMMETRIC_ALGS
        if refused:
            raise InvalidValue("issuer algorithms must be asymmetric JWS algorithms",
                               ", ".join(sorted(refused)))
        if "exp" not in self.required_claims:
            raise InvalidValue("issuer required_claims must include exp")
        for name, low in (("leeway_s", 0), ("max_token_bytes", 1), ("max_delegation_depth", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidValue(f"issuer {name} must be an integer >= {low}")
        if not isinstance(self.require_at_jwt_typ, bool):
            raise InvalidValue("issuer require_at_jwt_typ must be a boolean")


Issuers = Mapping[str, "tuple[IssuerPolicy, JWKSet | None]"]


def _size_limit(issuers: Issuers) -> int:
    return max((entry[0].max_token_bytes for entry in issuers.values()),
               default=DEFAULT_MAX_TOKEN_BYTES)


# --------------------------------------------------------------------------------------------
# Claim helpers
# --------------------------------------------------------------------------------------------


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\uD8xx escape
        return False
    return True


def _freeze(value: Any) -> Any:
    """Dicts (as `json` builds them) become read-only mappings and lists tuples, all the way down;
    raise InvalidValue on a name or string that cannot be encoded as UTF-8."""
    if type(value) is dict:
        out = {}
        for k, v in value.items():
            if not k.isascii() and not _utf8_ok(k):
                raise InvalidValue("claim name is not valid Unicode")
            t = type(v)
            if t is dict or t is list:
                v = _freeze(v)
            elif t is str and not v.isascii() and not _utf8_ok(v):
                raise InvalidValue("claim value is not valid Unicode")
            out[k] = v
        return MappingProxyType(out)
    items = []
    for v in value:
        t = type(v)
        if t is dict or t is list:
            v = _freeze(v)
        elif t is str and not v.isascii() and not _utf8_ok(v):
            raise InvalidValue("claim value is not valid Unicode")
        items.append(v)
    return tuple(items)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _sha256_b64(value: Any) -> bool:
    """A base64url (no padding) SHA-256 value in its one canonical 43-character spelling."""
    if not isinstance(value, str) or len(value) != 43:
        return False
    try:
        raw = jose.b64url_decode(value)
    except InvalidValue:
        return False
    return len(raw) == 32 and jose.b64url_encode(raw) == value


def _time_claim(payload: Mapping[str, Any], name: str) -> int | None:
    value = payload.get(name, _MISSING)
    if value is _MISSING:
        return None
    if type(value) is not int:  # JSON gives int or bool; bool is refused, so are fractions
        _fail("token_malformed_claim", f"{name} is not an integer NumericDate")
    return value


def _audiences(aud: Any) -> tuple[str, ...] | None:
    """The `aud` values, or None when the claim has the wrong type."""
    if isinstance(aud, str):
        return (aud,)
    if _is_str_list(aud):
        return tuple(aud)
    return None


def _scopes(payload: Mapping[str, Any]) -> frozenset[str]:
    scopes: set[str] = set()
    scope = payload.get("scope", _MISSING)
    if scope is not _MISSING:
        if not isinstance(scope, str) or not _SCOPE_STRING.fullmatch(scope):
            _fail("token_malformed_claim", "scope is not a space-delimited string of scope-tokens")
        scopes.update(scope.split())
    scp = payload.get("scp", _MISSING)
    if scp is not _MISSING:
        if isinstance(scp, str) and _SCOPE_STRING.fullmatch(scp):
            scopes.update(scp.split())
        elif isinstance(scp, list) and all(isinstance(s, str) and _SCOPE_TOKEN.fullmatch(s)
                                           for s in scp):
            scopes.update(scp)
        else:
            _fail("token_malformed_claim", "scp is not an array of scope-tokens")
    return frozenset(scopes)


def _optional_str(payload: Mapping[str, Any], name: str, code: str = "token_malformed_claim"
                  ) -> str | None:
    value = payload.get(name, _MISSING)
    if value is _MISSING:
        return None
    if not isinstance(value, str):
        _fail(code, f"{name} is not a string")
    return value


def _actors(act: Any, max_depth: int) -> tuple[Actor, ...]:
    """RFC 8693 4.1 `act` chain, current actor first; iterative, bounded by `max_depth`."""
    actors: list[Actor] = []
    node = act
    while node is not _MISSING:
        if len(actors) >= max_depth:
            _fail("token_bad_act", f"delegation chain deeper than {max_depth}")
        if not isinstance(node, dict):
            _fail("token_bad_act", f"act at depth {len(actors) + 1} is not an object")
        sub = node.get("sub")
        if not isinstance(sub, str) or not sub:
            _fail("token_bad_act", f"act at depth {len(actors) + 1} has no string sub")
        iss = _optional_str(node, "iss", "token_bad_act")
        client_id = _optional_str(node, "client_id", "token_bad_act")
        actors.append(Actor(sub, iss, client_id))
        node = node.get("act", _MISSING)
    return tuple(actors)


def _check_authorization_details(details: Any) -> None:
    if not isinstance(details, list):
        _fail("token_bad_authorization_details", "authorization_details is not an array")
    for i, d in enumerate(details):
        if not isinstance(d, dict) or not isinstance(d.get("type"), str):
            _fail("token_bad_authorization_details",
                  f"authorization_details[{i}] is not an object with a string type")


# --------------------------------------------------------------------------------------------
# Access tokens
# --------------------------------------------------------------------------------------------


def verify_access_token(token: str, issuers: Issuers, now: float) -> TokenClaims:
    """Verify a JWT access token against the configured issuers (see the module docstring for
    the checks, their order and their codes). `issuers` maps `iss` to (policy, JWKS or None when
    the keys are not loaded). Raises `TokenError`; never returns a partially checked token."""
    return _verify(token, issuers, now, None)


def _verify(token: str, issuers: Issuers, now: float, digest: bytes | None) -> TokenClaims:
    # 1-2. size and JWS syntax
    if not isinstance(token, str):
        _fail("token_malformed", "token is not text")
    limit = _size_limit(issuers)
    if len(token) > limit:
        _fail("token_too_large", f"token is {len(token)} characters, the limit is {limit}")
    try:
        jws = jose.parse_jws(token, max_bytes=limit)
    except InvalidValue as exc:
        _fail("token_malformed", exc.reason)
    header, payload = jws.header, jws.payload
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        _fail("token_malformed", "JWS header kid is not a string")

    # 3. the algorithm, before any key or issuer is consulted
    alg = jws.alg
    if alg not in jose.ASYMMETRIC_ALGS:
        _fail("token_alg_not_allowed", f"algorithm {alg!r:.40} is never accepted")

    # 4-5. the issuer and its keys
    iss = payload.get("iss")
    entry = issuers.get(iss) if isinstance(iss, str) else None
    if entry is None:
        _fail("token_unknown_issuer", f"issuer {iss!r:.120} is not configured")
    policy, jwks = entry
    if len(token) > policy.max_token_bytes:
        _fail("token_too_large", f"token is {len(token)} characters, the issuer's limit is "
                                 f"{policy.max_token_bytes}")
    if alg not in policy.algorithms:
        _fail("token_alg_not_allowed", f"algorithm {alg} is not allowed for this issuer")
    if jwks is None:
        _fail("token_keys_unavailable", "the issuer's JWKS is not loaded", iss)

    # 6-7. key selection (the issuer's JWKS only) and signature
    candidates = jwks.candidates(kid, alg)
    if not candidates:
        _fail("token_unknown_kid", f"no {alg} key with kid {kid!r:.80} in the issuer's JWKS", iss)
    for key in candidates:
        try:
            jose.verify(jws, key, alg)
            break
        except InvalidValue:
            continue
    else:
        _fail("token_bad_signature", "signature does not verify")

    # 8. explicit typing
    typ = header.get("typ", _MISSING)
    if typ is _MISSING:
        if policy.require_at_jwt_typ:
            _fail("token_wrong_type", "typ at+jwt is required")
    else:
        t = typ.lower() if isinstance(typ, str) else None
        if t not in (_AT_JWT_TYPES if policy.require_at_jwt_typ else _GENERIC_TYPES):
            _fail("token_wrong_type", f"typ {typ!r:.40} is not accepted")

    # 9-11. time
    leeway = policy.leeway_s
    exp = _time_claim(payload, "exp")
    if exp is not None and now >= exp + leeway:
        _fail("token_expired", f"expired at {exp}")
    nbf = _time_claim(payload, "nbf")
    if nbf is not None and now < nbf - leeway:
        _fail("token_not_yet_valid", f"not valid before {nbf}")
    iat = _time_claim(payload, "iat")
    if iat is not None and iat > now + leeway:
        _fail("token_issued_in_future", f"issued at {iat}, in the future")

    # 12. audience
    aud = payload.get("aud", _MISSING)
    if aud is _MISSING:
        _fail("token_wrong_audience", "token has no aud")
    audience = _audiences(aud)
    if audience is None:
        _fail("token_malformed_claim", "aud is not a string or an array of strings")
    if policy.audiences.isdisjoint(audience):
        _fail("token_wrong_audience", "aud names none of this sidecar's audiences")

    # 13. presence
    if not payload.keys() >= policy.required_claims:
        missing = ", ".join(sorted(policy.required_claims - payload.keys()))
        _fail("token_missing_claim", f"missing required claims: {missing}")

    # 14. types
    sub = _optional_str(payload, "sub")
    client_id = _optional_str(payload, "client_id")
    acr = _optional_str(payload, "acr")
    jti = _optional_str(payload, "jti")
    auth_time = _time_claim(payload, "auth_time")
    amr = payload.get("amr", _MISSING)
    if amr is _MISSING:
        amr = ()
    elif not _is_str_list(amr):
        _fail("token_malformed_claim", "amr is not an array of strings")
    scopes = _scopes(payload)

    # 15. confirmation (token binding)
    cnf_jkt = cnf_x5t = None
    cnf = payload.get("cnf", _MISSING)
    if cnf is not _MISSING:
        if not isinstance(cnf, dict) or not cnf:
            _fail("token_bad_cnf", "cnf is not a non-empty object")
        if not cnf.keys() <= _CNF_MEMBERS:
            _fail("token_bad_cnf", "cnf holds a confirmation method that cannot be enforced")
        cnf_jkt = cnf.get("jkt")
        cnf_x5t = cnf.get("x5t#S256")
        for name, value in (("jkt", cnf_jkt), ("x5t#S256", cnf_x5t)):
            if value is not None and not _sha256_b64(value):
                _fail("token_bad_cnf", f"cnf {name} is not a base64url SHA-256")
        if "jkt" in cnf and cnf_jkt is None or "x5t#S256" in cnf and cnf_x5t is None:
            _fail("token_bad_cnf", "cnf member is null")

    # 16. delegation
    act = payload.get("act", _MISSING)
    actors = _actors(act, policy.max_delegation_depth) if act is not _MISSING else ()

    # 17. rich authorization requests
    details = payload.get("authorization_details", _MISSING)
    if details is not _MISSING:
        _check_authorization_details(details)

    try:
        claims = _freeze(payload)
    except InvalidValue as exc:
        _fail("token_malformed_claim", exc.reason)
    if digest is None:
        digest = hashlib.sha256(token.encode("ascii")).digest()
    return TokenClaims(
        issuer=iss,
        subject=sub if sub is not None else "",
        audience=audience,
        expires_at=exp,  # type: ignore[arg-type]  # required by every IssuerPolicy
        fingerprint=digest.hex(),
        client_id=client_id,
        scopes=scopes,
        actors=actors,
        acr=acr,
        amr=tuple(amr),
        auth_time=auth_time,
        issued_at=iat,
        jti=jti,
        cnf_jkt=cnf_jkt,
        cnf_x5t_s256=cnf_x5t,
        authorization_details=claims["authorization_details"] if details is not _MISSING else (),
        claims=claims,
    )


# --------------------------------------------------------------------------------------------
# Cache of verified tokens
# --------------------------------------------------------------------------------------------


class TokenCache:
    """Verified tokens by SHA-256 digest (never the token), LRU-bounded. An entry records the
    `IssuerPolicy` and `JWKSet` objects it was verified with and is served only while both are
    still the ones `issuers` holds for its issuer, and only while `now < exp`."""

    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int = 10000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidValue("token cache max_entries must be a positive integer")
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[TokenClaims, IssuerPolicy, JWKSet]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, token: str, now: float, issuers: Issuers) -> TokenClaims | None:
        """The cached claims, or None when absent, expired, or verified under an issuer policy or
        key set that `issuers` no longer holds."""
        return self._get(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), now,
                         issuers)

    def put(self, token: str, claims: TokenClaims, issuers: Issuers) -> None:
        """Remember claims just verified by `verify_access_token(token, issuers, ...)`."""
        self._put(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), claims,
                  issuers)

    def _get(self, digest: bytes, now: float, issuers: Issuers) -> TokenClaims | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        claims, policy, jwks = entry
        current = issuers.get(claims.issuer)
        if now >= claims.expires_at or current is None or current[0] is not policy \
                or current[1] is not jwks:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return claims

    def _put(self, digest: bytes, claims: TokenClaims, issuers: Issuers) -> None:
        current = issuers.get(claims.issuer)
        if current is None or current[1] is None:
            return
        entries = self._entries
        entries[digest] = (claims, current[0], current[1])
        entries.move_to_end(digest)
        while len(entries) > self._max:
            entries.popitem(last=False)


def verify_access_token_cached(token: str, issuers: Issuers, now: float,
                               cache: TokenCache) -> TokenClaims:
    """`verify_access_token` with a cache in front: a hit costs one SHA-256 and a dict lookup,
    and never re-parses the token. Failures are never cached."""
    if not isinstance(token, str) or len(token) > _CACHE_HASH_CEILING or not token.isascii():
        return _verify(token, issuers, now, None)  # refused there, with the right code
    digest = hashlib.sha256(token.encode("ascii")).digest()
    claims = cache._get(digest, now, issuers)
    if claims is not None:
        return claims
    claims = _verify(token, issuers, now, digest)
    cache._put(digest, claims, issuers)
    return claims


# --------------------------------------------------------------------------------------------
# JWT-SVIDs
# --------------------------------------------------------------------------------------------

#: Parsed JWT authorities, memoised by the identity of the bundle's (frozen) JWK mapping. The
#: entry holds the mapping itself, so its id cannot be reused while the entry lives.
_AUTHORITY_KEYS: dict[int, tuple[Mapping[str, Any], JWK]] = {}
_AUTHORITY_KEYS_MAX = 1024


def _authority_key(raw: Mapping[str, Any]) -> JWK:
    hit = _AUTHORITY_KEYS.get(id(raw))
    if hit is not None and hit[0] is raw:
        return hit[1]
    key = jose.parse_jwk(raw)
    if len(_AUTHORITY_KEYS) >= _AUTHORITY_KEYS_MAX:
        _AUTHORITY_KEYS.clear()
    _AUTHORITY_KEYS[id(raw)] = (raw, key)
    return key


def _svid_fail(code: str, detail: str) -> NoReturn:
    raise TokenError(code, detail, rfc_error="invalid_token")


def verify_jwt_svid(token: str, store: TrustStore, audiences: frozenset[str], now: float,
                    *, leeway_s: int = 30) -> SpiffeId:
    """Verify a JWT-SVID (SPIFFE JWT-SVID.md) and return the SPIFFE ID it proves. The key comes
    from the `jwt_authorities` of the bundle of the subject's own trust domain, and nowhere else.
    Raises `TokenError` with a `jwt_svid_*` code."""
    if not isinstance(token, str):
        _svid_fail("jwt_svid_malformed", "token is not text")
    if len(token) > MAX_JWT_SVID_BYTES:
        _svid_fail("jwt_svid_too_large", f"token is {len(token)} characters")
    try:
        jws = jose.parse_jws(token, max_bytes=MAX_JWT_SVID_BYTES)
    except InvalidValue as exc:
        _svid_fail("jwt_svid_malformed", exc.reason)
    header, payload = jws.header, jws.payload
    if not header.keys() <= _JWT_SVID_HEADER:
        extra = ", ".join(sorted(header.keys() - _JWT_SVID_HEADER))[:80]
        _svid_fail("jwt_svid_malformed", f"header members not allowed in a JWT-SVID: {extra}")
    alg = jws.alg
    if alg not in JWT_SVID_ALGS:
        _svid_fail("jwt_svid_alg_not_allowed", f"algorithm {alg!r:.40} is not a JWT-SVID algorithm")
    if "typ" in header and header["typ"] not in _JWT_SVID_TYPES:
        _svid_fail("jwt_svid_wrong_type", "typ must be JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        _svid_fail("jwt_svid_missing_kid", "JWT-SVID has no kid")

    try:
        spiffe_id = parse_spiffe_id(payload.get("sub"))  # type: ignore[arg-type]
    except InvalidValue as exc:
        _svid_fail("jwt_svid_invalid_spiffe_id", f"sub is not a SPIFFE ID ({exc.reason})")
    if not spiffe_id.path:
        _svid_fail("jwt_svid_invalid_spiffe_id", "sub is a trust domain ID, not a workload ID")
    bundle = store.bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        _svid_fail("jwt_svid_untrusted", f"no bundle for trust domain {spiffe_id.trust_domain}")
    raw = bundle.jwt_authorities.get(kid)
    if raw is None:
        _svid_fail("jwt_svid_untrusted",
                   f"kid {kid!r:.80} is not a JWT authority of {spiffe_id.trust_domain}")
    try:
        key = _authority_key(raw)
    except InvalidValue as exc:
        _svid_fail("jwt_svid_untrusted", f"JWT authority {kid!r:.80} is unusable ({exc.reason})")
    if alg not in key.algorithms() or (key.alg is not None and key.alg != alg):
        _svid_fail("jwt_svid_untrusted", f"JWT authority {kid!r:.80} cannot verify {alg}")
    try:
        jose.verify(jws, key, alg)
    except InvalidValue:
        _svid_fail("jwt_svid_bad_signature", "signature does not verify")

    exp = payload.get("exp", _MISSING)
    if exp is _MISSING:
        _svid_fail("jwt_svid_missing_claim", "JWT-SVID has no exp")
    if type(exp) is not int:
        _svid_fail("jwt_svid_malformed_claim", "exp is not an integer NumericDate")
    if now >= exp + leeway_s:
        _svid_fail("jwt_svid_expired", f"expired at {exp}")
    nbf = payload.get("nbf", _MISSING)
    if nbf is not _MISSING:
        if type(nbf) is not int:
            _svid_fail("jwt_svid_malformed_claim", "nbf is not an integer NumericDate")
        if now < nbf - leeway_s:
            _svid_fail("jwt_svid_not_yet_valid", f"not valid before {nbf}")
    aud = payload.get("aud", _MISSING)
    if aud is _MISSING:
        _svid_fail("jwt_svid_missing_claim", "JWT-SVID has no aud")
    values = _audiences(aud)
    if not values:
        _svid_fail("jwt_svid_malformed_claim", "aud is not a string or a non-empty string array")
    if audiences.isdisjoint(values):
        _svid_fail("jwt_svid_wrong_audience", "aud names none of this sidecar's audiences")
    return spiffe_id
