"""Properties of the sans-IO parsers of untrusted input: SPIFFE IDs, request targets, JWS / JWTs,
DPoP header lists. Each may only refuse with its own error type, never crash, and what it accepts
must mean what the spec says (checked against a small reference or by a round trip)."""

from __future__ import annotations

import re
import time
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.core import jose
from proxy.core.dpop import DPoPConfig, verify_dpop_proof
from proxy.core.paths import _canonicalize_target_slow, canonicalize_path, canonicalize_target
from proxy.core.replay import MemoryReplayStore
from proxy.core.spiffe import parse_spiffe_id, parse_trust_domain
from proxy.core.tokens import IssuerPolicy, verify_access_token
from proxy.errors import BadRequest, DPoPError, InvalidValue, ServiceUnavailable, TokenError
from tests.dpop_factory import ProofKey, make_proof
from tests.fuzz.strategies import JSONISH, SCALARS
from tests.tokens_factory import jwk_set, key, mint

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# SPIFFE IDs: the parser agrees with the grammar of SPIFFE-ID.md section 2
# --------------------------------------------------------------------------------------------

_SPIFFE_REF = re.compile(r"spiffe://[a-z0-9._-]{1,255}(/(?!\.\.?(?:/|$))[A-Za-z0-9._-]+)*")
_ID_PIECES = st.lists(st.sampled_from(["spiffe://", "spiffe:/", "SPIFFE://", "example.org", "a", "Z",
                                       "0", ".", "..", "-", "_", "/", "//", ":", "@", "?", "#", "%",
                                       "%2F", "é", " ", "\x00", "\ud800", "x" * 64]), max_size=12)


@FAST
@given(st.one_of(_ID_PIECES.map("".join), _ID_PIECES.map(lambda p: "spiffe://" + "".join(p)),
                 st.text(max_size=80)))
def test_spiffe_id_parser_agrees_with_the_grammar(value: str) -> None:
    try:
        parsed = parse_spiffe_id(value)
    except InvalidValue:
        assert not (_SPIFFE_REF.fullmatch(value) and len(value.encode("utf-8", "surrogatepass")) <= 2048)
        return
    assert _SPIFFE_REF.fullmatch(value), value
    assert str(parsed) == value and parse_spiffe_id(str(parsed)) == parsed


@FAST
@given(st.one_of(st.text(max_size=40), st.from_regex(r"[a-z0-9._-]{0,300}", fullmatch=True)))
def test_trust_domain_parser_agrees_with_the_grammar(name: str) -> None:
    ok = re.fullmatch(r"[a-z0-9._-]{1,255}", name) is not None
    try:
        assert parse_trust_domain(name) == name and ok
    except InvalidValue:
        assert not ok


@FAST
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=10), st.lists(st.text(max_size=3))))
def test_spiffe_id_parser_refuses_non_text(value) -> None:
    try:
        parse_spiffe_id(value)
    except InvalidValue:
        return
    raise AssertionError(f"accepted {value!r}")


# --------------------------------------------------------------------------------------------
# request targets: BadRequest or a canonical target that means the same and is a fixed point
# --------------------------------------------------------------------------------------------

_TARGET_PIECES = st.lists(st.sampled_from([
    "/", "//", "a", "B", "0", "-", ".", "..", "_", "~", "!", "$", "&", "'", "(", ")", "*", "+", ",",
    "=", ":", "@", ";", "?", "#", "%", "%2", "%2f", "%2F", "%2e", "%2E", "%41", "%7e", "%7E", "%c3%a9",
    "%00", "%1f", "%7f", "%5c", "%3b", "%3B", "%25", "%20", "%zz", " ", "\\", '"', "<", ">", "^", "`",
    "{", "|", "}", "\x00", "\x7f", "é", "\ud800", "admin", "api", "x=1", "&y=2",
]), max_size=14).map("".join)
TARGETS = st.one_of(_TARGET_PIECES, _TARGET_PIECES.map(lambda s: "/" + s), st.text(max_size=40))
_FORBIDDEN_ESCAPES = re.compile(r"%(2F|5C|3B|[01][0-9A-F]|7F)")
_UNRESERVED_ESCAPE = re.compile(r"%(4[1-9A-F]|5[0-9A]|6[1-9A-F]|7[0-9A]|3[0-9]|2D|2E|5F|7E)")


def _segments(path: str) -> list[bytes]:
    return [s for s in unquote_to_bytes(path).split(b"/") if s]


@FAST
@given(TARGETS)
def test_target_canonicalisation_is_a_fixed_point_that_means_the_same(raw: str) -> None:
    try:
        t = canonicalize_target(raw)
    except BadRequest as err:
        assert err.code in ("invalid_target", "invalid_path")
        return
    # a fixed point: canonicalising what is forwarded changes nothing
    assert canonicalize_target(t.request_target) == t
    assert canonicalize_path(t.path) == t.path
    path = t.path
    assert path.startswith("/") and "//" not in path and "#" not in path and ";" not in path
    assert not any(s in (".", "..") for s in path.split("/"))
    assert _FORBIDDEN_ESCAPES.search(path) is None and _UNRESERVED_ESCAPE.search(path) is None
    assert re.fullmatch(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*(%[0-9A-F]{2}[A-Za-z0-9\-._~!$&'()*+,=:@/]*)*",
                        path), path
    # it means the same thing: the same decoded segments (no %2F was decoded into a separator)
    raw_path = raw.split("?", 1)[0]
    assert _segments(path) == _segments(raw_path)
    assert path.endswith("/") == (raw_path.endswith("/") and path != "/") or path == "/"


@FAST
@given(TARGETS)
def test_fast_and_slow_paths_of_the_canonicaliser_agree(raw: str) -> None:
    def run(f):
        try:
            return f(raw)
        except BadRequest as err:
            return err.code
    assert run(canonicalize_target) == run(_canonicalize_target_slow)


# --------------------------------------------------------------------------------------------
# JWS / JWT parsing
# --------------------------------------------------------------------------------------------

_B64ISH = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/. é",
                  max_size=60)


@FAST
@given(st.one_of(_B64ISH, st.binary(max_size=40)))
def test_b64url_decode_is_strict_and_canonical(value) -> None:
    try:
        out = jose.b64url_decode(value)
    except InvalidValue:
        return
    text = value if isinstance(value, str) else value.decode("ascii")
    assert jose.b64url_encode(out) == text  # one spelling per byte string


@FAST
@given(st.one_of(st.text(max_size=120), st.lists(_B64ISH, min_size=1, max_size=4).map(".".join)))
def test_parse_jws_raises_only_invalid_value(token: str) -> None:
    try:
        jws = jose.parse_jws(token)
    except InvalidValue:
        return
    assert isinstance(jws.header, dict) and isinstance(jws.payload, dict)
    assert isinstance(jws.alg, str) and "crit" not in jws.header


_JSON_OBJ = st.dictionaries(st.text(max_size=8), JSONISH, max_size=5)


@FAST
@given(_JSON_OBJ, _JSON_OBJ, st.binary(max_size=80))
def test_parse_jws_round_trips_what_it_accepts(header: dict, payload: dict, sig: bytes) -> None:
    import json

    try:
        h = jose.b64url_encode(json.dumps(header, allow_nan=False).encode())
        p = jose.b64url_encode(json.dumps(payload, allow_nan=False).encode())
    except (ValueError, UnicodeEncodeError):
        assume(False)
    token = f"{h}.{p}.{jose.b64url_encode(sig)}"
    try:
        jws = jose.parse_jws(token)
    except InvalidValue:
        assert not isinstance(header.get("alg"), str) or "crit" in header or not header or not payload \
            or not h or not p
        return
    assert jws.header == header and jws.payload == payload and jws.signature == sig


_ISSUER = "https://idp.example.org"
_SIGNER = key("ES256", "fuzz")
_ISSUERS = {_ISSUER: (IssuerPolicy(_ISSUER, frozenset({"aud"}), frozenset({"ES256"})),
                      jwk_set(_SIGNER))}
_CLAIM_NAMES = st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "scp",
                                "client_id", "act", "cnf", "acr", "auth_time", "azp",
                                "authorization_details", "may_act", "x"])


@SLOW
@given(st.dictionaries(_CLAIM_NAMES, st.one_of(JSONISH, st.dictionaries(_CLAIM_NAMES, JSONISH, max_size=3)),
                       max_size=8),
       st.dictionaries(st.sampled_from(["typ", "kid", "crit", "cty", "x5c", "jku", "b64"]), SCALARS,
                       max_size=3))
def test_signed_tokens_with_any_claims_give_claims_or_token_error(claims: dict, header: dict) -> None:
    now = time.time()
    base = {"iss": _ISSUER, "aud": "aud", "sub": "alice", "exp": int(now) + 60}
    token = mint(_SIGNER, {**base, **claims}, **header)
    try:
        got = verify_access_token(token, _ISSUERS, now)
    except TokenError:
        return
    assert got.issuer == _ISSUER and isinstance(got.subject, (str, type(None)))


@FAST
@given(st.one_of(st.text(max_size=200), st.lists(_B64ISH, min_size=3, max_size=3).map(".".join)))
def test_any_token_string_gives_claims_or_token_error(token: str) -> None:
    try:
        verify_access_token(token, _ISSUERS, time.time())
    except TokenError:
        return
    raise AssertionError("an unsigned string verified")


# --------------------------------------------------------------------------------------------
# DPoP header lists
# --------------------------------------------------------------------------------------------

_DPOP_CFG = DPoPConfig(frozenset({"ES256", "EdDSA"}))
_HTU = "https://api.example.com/orders/1"
_PROOF_KEY = ProofKey.generate("ES256")
_DPOP_ERRORS = (DPoPError, ServiceUnavailable)  # 401s, and the 503 of a full replay store


def _verify(values: list, *, token: str | None = "tok", nonce: bool = False):
    return verify_dpop_proof(values, method="GET", htu=_HTU, access_token=token, config=_DPOP_CFG,
                             replay=MemoryReplayStore(1000), now=time.time(),
                             nonce_check=(lambda n: n == "good") if nonce else None,
                             current_nonce=(lambda: "good") if nonce else None)


@FAST
@given(st.lists(st.one_of(st.text(max_size=60), st.lists(_B64ISH, min_size=1, max_size=4).map(".".join),
                          st.integers(), st.none(), st.binary(max_size=8)), max_size=3))
def test_any_dpop_header_list_gives_a_dpop_error(values: list) -> None:
    try:
        _verify(values)
    except _DPOP_ERRORS:
        return
    raise AssertionError("an unsigned proof verified")


_PROOF_CLAIMS = st.dictionaries(st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce", "exp"]),
                                JSONISH, max_size=4)
_PROOF_HEADER = st.dictionaries(st.sampled_from(["typ", "alg", "kid", "crit", "jwk"]),
                                st.one_of(JSONISH, st.dictionaries(
                                    st.sampled_from(["kty", "crv", "x", "y", "n", "e", "d", "alg",
                                                     "use", "key_ops"]), SCALARS, max_size=5)),
                                max_size=3)


@SLOW
@given(_PROOF_CLAIMS, _PROOF_HEADER, st.booleans(), st.booleans())
def test_signed_proofs_with_any_members_verify_or_give_a_dpop_error(claims, header, with_token, nonce):
    token = "tok" if with_token else None
    proof = make_proof(_PROOF_KEY, method="GET", htu=_HTU, iat=int(time.time()), access_token=token,
                       claims=claims, header=header)
    try:
        got = _verify([proof], token=token, nonce=nonce)
    except _DPOP_ERRORS:
        return
    assert got.jkt == _PROOF_KEY.jkt
