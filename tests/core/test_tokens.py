"""Access tokens (RFC 9068 JWT profile, RFC 7519, RFC 8725), `act` chains (RFC 8693 4.1),
confirmation (RFC 7800 / RFC 9449 6.1 / RFC 8705 3.1), RAR details (RFC 9396 2), and the cache.

Every check of `verify_access_token` has negative cases in `CASES`, named by its stable code.
Tokens are signed by `tests.tokens_factory`, with `cryptography` directly; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from proxy.core import jose
from proxy.core.model import Actor, TokenClaims
from proxy.core.tokens import (
    TOKEN_CODES,
    IssuerPolicy,
    TokenCache,
    verify_access_token,
    verify_access_token_cached,
)
from proxy.errors import InvalidValue, TokenError
from tests.tokens_factory import (
    ALL_ALGS,
    DROP,
    TokenIssuer,
    b64json,
    hmac_jws,
    jwk_set,
    key,
    mint,
    new_key,
    sign_jws,
)

NOW = 1_800_000_000.0
ISS = "https://issuer.example"
AUD = "https://api.example"
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"  # RFC 9449 section 6.1 example
X5T = jose.b64url_encode(hashlib.sha256(b"a client certificate").digest())
# The RFC 8705 section 3.1 example value is not canonical base64url (its last character carries
# non-zero padding bits), so it can never equal a computed thumbprint: refused as malformed.
RFC8705_EXAMPLE_X5T = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer.create(now=NOW, issuer=ISS, audience=AUD)


def _refuse(token: Any, issuers: Any, code: str, now: float = NOW) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify_access_token(token, issuers, now)
    err = info.value
    assert err.code == code, err.detail
    assert err.rfc_error == "invalid_token"
    assert err.status == 401
    assert err.challenge() == 'Bearer error="invalid_token"'
    if isinstance(token, str) and len(token) > 20:
        # the token never reaches an error: neither whole nor any of its parts
        for part in token.split("."):
            if len(part) > 12:
                assert part not in str(err) and part not in err.detail
    return err


# --------------------------------------------------------------------------------------------
# The happy path
# --------------------------------------------------------------------------------------------


def test_a_valid_token_becomes_claims(issuer: TokenIssuer):
    token = issuer.token(
        scope="read write", amr=["pwd", "otp"], acr="urn:mace:incommon:iap:silver",
        auth_time=int(NOW) - 60, act={"sub": "agent-7", "iss": "https://agents.example",
                                      "client_id": "agent-app",
                                      "act": {"sub": "orchestrator"}},
        cnf={"jkt": JKT}, authorization_details=[{"type": "payment", "amount": {"v": "10"}}],
        custom={"nested": [1, {"deep": ["x"]}]})
    claims = verify_access_token(token, issuer.issuers(), NOW)
    assert isinstance(claims, TokenClaims)
    assert claims.issuer == ISS
    assert claims.subject == "user-1"
    assert claims.audience == (AUD,)
    assert claims.expires_at == int(NOW) + 300
    assert claims.issued_at == int(NOW)
    assert claims.client_id == "client-1"
    assert claims.jti == "jti-1"
    assert claims.scopes == frozenset({"read", "write"})
    assert claims.amr == ("pwd", "otp")
    assert claims.acr == "urn:mace:incommon:iap:silver"
    assert claims.auth_time == int(NOW) - 60
    # RFC 8693 4.1: current actor first
    assert claims.actors == (Actor("agent-7", "https://agents.example", "agent-app"),
                             Actor("orchestrator"))
    assert claims.cnf_jkt == JKT and claims.cnf_x5t_s256 is None
    assert claims.authorization_details[0]["type"] == "payment"
    assert claims.fingerprint == hashlib.sha256(token.encode()).hexdigest()
    assert claims.claims["custom"]["nested"][1]["deep"] == ("x",)


def test_claims_are_deeply_frozen(issuer: TokenIssuer):
    token = issuer.token(custom={"list": [1, {"k": "v"}]},
                         authorization_details=[{"type": "t", "locations": ["a"]}])
    claims = verify_access_token(token, issuer.issuers(), NOW)
    assert isinstance(claims.claims, MappingProxyType)
    nested = claims.claims["custom"]
    assert isinstance(nested, MappingProxyType)
    assert isinstance(nested["list"], tuple)
    assert isinstance(nested["list"][1], MappingProxyType)
    with pytest.raises(TypeError):
        nested["list"][1]["k"] = "changed"  # type: ignore[index]
    detail = claims.authorization_details[0]
    assert isinstance(detail, MappingProxyType) and detail["locations"] == ("a",)
    with pytest.raises(TypeError):
        detail["type"] = "other"  # type: ignore[index]


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_asymmetric_algorithm_verifies(alg: str):
    iss = TokenIssuer.create(now=NOW, alg=alg)
    assert verify_access_token(iss.token(), iss.issuers(), NOW).subject == "user-1"


@pytest.mark.parametrize("aud", [AUD, [AUD], ["https://other.example", AUD]])
def test_aud_may_be_a_string_or_an_array(issuer: TokenIssuer, aud):
    claims = verify_access_token(issuer.token(aud=aud), issuer.issuers(), NOW)
    assert AUD in claims.audience


def test_any_configured_audience_is_enough(issuer: TokenIssuer):
    issuers = issuer.issuers(audiences=frozenset({"urn:a", AUD}))
    assert verify_access_token(issuer.token(aud=["urn:b", AUD]), issuers, NOW)


@pytest.mark.parametrize("overrides, scopes", [
    ({"scope": "a b  c"}, {"a", "b", "c"}),
    ({"scope": ""}, set()),
    ({"scope": DROP}, set()),
    ({"scope": DROP, "scp": ["a", "b"]}, {"a", "b"}),
    ({"scope": DROP, "scp": "a b"}, {"a", "b"}),  # Azure AD style
    ({"scope": "a", "scp": ["b"]}, {"a", "b"}),
    ({"scope": "urn:x:read https://api.example/write"}, {"urn:x:read",
                                                         "https://api.example/write"}),
])
def test_scopes(issuer: TokenIssuer, overrides, scopes):
    assert verify_access_token(issuer.token(**overrides), issuer.issuers(), NOW).scopes == scopes


def test_a_token_without_kid_is_tried_against_the_keys_for_its_alg():
    k1, k2 = key("ES256", "k1"), key("ES256", "k2")
    iss = TokenIssuer.create(now=NOW, name="k2", extra_keys=(k1,))
    token = iss.token(header={"kid": DROP})
    assert verify_access_token(token, iss.issuers(), NOW).subject == "user-1"
    assert iss.signer is not k1 and iss.signer.kid == k2.kid


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/At+JWT"])
def test_at_jwt_typ_when_required(issuer: TokenIssuer, typ):
    issuers = issuer.issuers(require_at_jwt_typ=True)
    assert verify_access_token(issuer.token(header={"typ": typ}), issuers, NOW)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/jwt", "JOSE"])
def test_generic_typ_is_accepted_when_not_required(issuer: TokenIssuer, typ):
    assert verify_access_token(issuer.token(header={"typ": typ}), issuer.issuers(), NOW)


@pytest.mark.parametrize("now", [NOW + 300 + 29, NOW - 29])
def test_leeway_covers_small_clock_skew(issuer: TokenIssuer, now):
    token = issuer.token(nbf=int(NOW), iat=int(NOW))
    assert verify_access_token(token, issuer.issuers(), now)


def test_cnf_x5t_and_jkt_together(issuer: TokenIssuer):
    claims = verify_access_token(issuer.token(cnf={"jkt": JKT, "x5t#S256": X5T}),
                                 issuer.issuers(), NOW)
    assert (claims.cnf_jkt, claims.cnf_x5t_s256) == (JKT, X5T)


def test_act_chain_at_the_depth_limit(issuer: TokenIssuer):
    act: dict = {"sub": "a8"}
    for i in range(7, 0, -1):
        act = {"sub": f"a{i}", "act": act}
    claims = verify_access_token(issuer.token(act=act), issuer.issuers(), NOW)
    assert [a.sub for a in claims.actors] == [f"a{i}" for i in range(1, 9)]


def test_optional_claims_when_not_required(issuer: TokenIssuer):
    token = issuer.token(sub=DROP, client_id=DROP, jti=DROP, iat=DROP, scope=DROP)
    claims = verify_access_token(token, issuer.issuers(required_claims=frozenset({"exp"})), NOW)
    assert claims.subject == "" and claims.client_id is None and claims.scopes == frozenset()


# --------------------------------------------------------------------------------------------
# One negative case (at least) per check, by stable code
# --------------------------------------------------------------------------------------------

ATTACKER = new_key("ES256", "k1")  # same kid as the issuer's key, another key pair


@dataclass(frozen=True)
class Case:
    code: str
    name: str
    make: Callable[[TokenIssuer], tuple[Any, Any]]  # -> (token, issuers)


def _tok(**claims) -> Callable[[TokenIssuer], tuple[Any, Any]]:
    return lambda i: (i.token(**claims), i.issuers())


def _hdr(header: dict, **policy) -> Callable[[TokenIssuer], tuple[Any, Any]]:
    return lambda i: (i.token(header=header), i.issuers(**policy))


def _raw(header: Any, payload_fn: Callable[[TokenIssuer], Any], sig: bytes | None = None,
         signer=None) -> Callable[[TokenIssuer], tuple[Any, Any]]:
    def make(i: TokenIssuer):
        return sign_jws(header, payload_fn(i), signer or i.signer, signature=sig), i.issuers()
    return make


def _text(text: str) -> Callable[[TokenIssuer], tuple[Any, Any]]:
    return lambda i: (text, i.issuers())


def _resign(mutate: Callable[[list[str]], list[str]]) -> Callable[[TokenIssuer], tuple[Any, Any]]:
    def make(i: TokenIssuer):
        return ".".join(mutate(i.token().split("."))), i.issuers()
    return make


def _sig_bytes(transform: Callable[[bytes], bytes]) -> Callable[[TokenIssuer], tuple[Any, Any]]:
    def make(i: TokenIssuer):
        h, p, s = i.token().split(".")
        return f"{h}.{p}.{jose.b64url_encode(transform(jose.b64url_decode(s)))}", i.issuers()
    return make


def _hmac_with(secret_of: Callable[[TokenIssuer], bytes], alg: str = "HS256"):
    def make(i: TokenIssuer):
        return hmac_jws({"alg": alg, "kid": i.signer.kid}, i.claims(), secret_of(i)), i.issuers()
    return make


def _policy(**kw) -> Callable[[TokenIssuer], tuple[Any, Any]]:
    return lambda i: (i.token(), i.issuers(**kw))


def _deep_act(depth: int) -> dict:
    act: dict = {"sub": f"a{depth}"}
    for n in range(depth - 1, 0, -1):
        act = {"sub": f"a{n}", "act": act}
    return act


CASES = [
    # 1. size
    Case("token_too_large", "over the default limit", _tok(pad="x" * 9000)),
    Case("token_too_large", "over this issuer's own limit",
         lambda i: (i.token(pad="x" * 1500), {**i.issuers(max_token_bytes=1024),
                                              "https://big.example": (IssuerPolicy(
                                                  "https://big.example", frozenset({AUD}),
                                                  frozenset({"ES256"})), None)})),
    # 2. syntax
    Case("token_malformed", "not text", lambda i: (b"a.b.c", i.issuers())),
    Case("token_malformed", "empty", _text("")),
    Case("token_malformed", "two parts", _resign(lambda p: p[:2])),
    Case("token_malformed", "four parts", _resign(lambda p: p + ["x"])),
    Case("token_malformed", "JWE-like five parts", _resign(lambda p: p + p[:2])),
    Case("token_malformed", "padding", _resign(lambda p: [p[0] + "=", p[1], p[2]])),
    Case("token_malformed", "standard base64 alphabet", _resign(lambda p: [p[0], p[1] + "+/", p[2]])),
    Case("token_malformed", "non-ASCII", _resign(lambda p: [p[0], p[1] + "é", p[2]])),
    Case("token_malformed", "whitespace", _resign(lambda p: [p[0], " " + p[1], p[2]])),
    Case("token_malformed", "header not JSON", _raw("{alg:ES256}", lambda i: i.claims())),
    Case("token_malformed", "header is an array", _raw('["ES256"]', lambda i: i.claims())),
    Case("token_malformed", "no alg", _raw({"kid": "k1"}, lambda i: i.claims())),
    Case("token_malformed", "payload not JSON", _raw({"alg": "ES256", "kid": "k1"},
                                                     lambda i: "hello")),
    Case("token_malformed", "payload is an array", _raw({"alg": "ES256", "kid": "k1"},
                                                        lambda i: [i.claims()])),
    Case("token_malformed", "payload in UTF-16", _raw(
        {"alg": "ES256", "kid": "k1"}, lambda i: json.dumps(i.claims()).encode("utf-16"))),
    Case("token_malformed", "duplicate header member",
         _raw('{"alg":"ES256","kid":"k1","alg":"ES256"}', lambda i: i.claims())),
    Case("token_malformed", "duplicate claim (a second sub)", _raw(
        {"alg": "ES256", "kid": "k1"},
        lambda i: json.dumps(i.claims())[:-1] + ',"sub":"admin"}')),
    Case("token_malformed", "crit", _hdr({"crit": ["exp"], "exp": 1})),
    Case("token_malformed", "kid not a string", _hdr({"kid": 1})),
    Case("token_malformed", "NaN claim", _raw({"alg": "ES256", "kid": "k1"},
                                             lambda i: json.dumps(i.claims())[:-1] + ',"x":NaN}')),
    # 3. algorithm (none and HMAC always, before the issuer is even known)
    Case("token_alg_not_allowed", "none, unsigned", _raw({"alg": "none"}, lambda i: i.claims(),
                                                          sig=b"")),
    Case("token_alg_not_allowed", "None (case variant)", _raw({"alg": "None"},
                                                               lambda i: i.claims(), sig=b"")),
    Case("token_alg_not_allowed", "none with an unknown issuer", _raw(
        {"alg": "none"}, lambda i: i.claims(iss="https://evil.example"), sig=b"")),
    Case("token_alg_not_allowed", "HS256 keyed with the public key PEM",
         _hmac_with(lambda i: i.signer.public_pem())),
    Case("token_alg_not_allowed", "HS256 keyed with the public JWK JSON",
         _hmac_with(lambda i: json.dumps(i.signer.public_jwk()).encode())),
    Case("token_alg_not_allowed", "HS384 keyed with the public key PEM",
         _hmac_with(lambda i: i.signer.public_pem(), "HS384")),
    Case("token_alg_not_allowed", "HS512 keyed with the public key PEM",
         _hmac_with(lambda i: i.signer.public_pem(), "HS512")),
    Case("token_malformed", "alg not a string", _hdr({"alg": ["ES256"]})),
    Case("token_alg_not_allowed", "asymmetric but not allowed for this issuer",
         lambda i: (mint(key("ES384", "k1"), i.claims()), i.issuers())),
    Case("token_alg_not_allowed", "RSA key, RS256 not in the list", lambda i: (
        mint(key("RS256", "r1"), i.claims()),
        {ISS: (i.policy(algorithms=frozenset({"PS256"})), jwk_set(key("RS256", "r1"),
                                                                   with_alg=False))})),
    # 4. issuer
    Case("token_unknown_issuer", "no iss", _tok(iss=DROP)),
    Case("token_unknown_issuer", "another issuer", _tok(iss="https://evil.example")),
    Case("token_unknown_issuer", "trailing slash", _tok(iss=ISS + "/")),
    Case("token_unknown_issuer", "iss not a string", _tok(iss=[ISS])),
    # 5. keys
    Case("token_keys_unavailable", "JWKS not loaded", lambda i: (i.token(), i.issuers(jwks=None))),
    # 6. key selection; keys the token names itself are never used
    Case("token_unknown_kid", "kid not in the JWKS", _hdr({"kid": "rotated"})),
    Case("token_unknown_kid", "kid of a key for another algorithm", lambda i: (
        mint(key("ES384", "k1"), i.claims()), i.issuers(algorithms=frozenset({"ES256", "ES384"})))),
    Case("token_unknown_kid", "no kid and no key for the alg", lambda i: (
        mint(key("ES384", "x"), i.claims(), kid=None),
        i.issuers(algorithms=frozenset({"ES256", "ES384"})))),
    Case("token_unknown_kid", "embedded jwk with its own kid", lambda i: (
        mint(new_key("ES256", "attacker"), i.claims(),
             jwk=new_key("ES256", "attacker").public_jwk()), i.issuers())),
    Case("token_unknown_kid", "jku and x5u naming an attacker's keys", lambda i: (
        mint(new_key("ES256", "attacker"), i.claims(), jku="https://evil.example/jwks",
             x5u="https://evil.example/cert.pem"), i.issuers())),
    # 7. signature
    Case("token_bad_signature", "another key with the issuer's kid",
         lambda i: (mint(ATTACKER, i.claims()), i.issuers())),
    Case("token_bad_signature", "embedded jwk of the signer, issuer's kid", lambda i: (
        mint(ATTACKER, i.claims(), jwk=ATTACKER.public_jwk()), i.issuers())),
    Case("token_bad_signature", "embedded x5c is ignored", lambda i: (
        mint(ATTACKER, i.claims(), x5c=["MIIB"]), i.issuers())),
    Case("token_bad_signature", "payload changed after signing", _resign(
        lambda p: [p[0], b64json({**json.loads(jose.b64url_decode(p[1])), "sub": "admin"}),
                   p[2]])),
    Case("token_bad_signature", "empty signature", _resign(lambda p: [p[0], p[1], ""])),
    Case("token_bad_signature", "truncated signature", _sig_bytes(lambda s: s[:-1])),
    Case("token_bad_signature", "signature with an extra byte", _sig_bytes(lambda s: s + b"\0")),
    Case("token_bad_signature", "one bit flipped", _sig_bytes(lambda s: bytes([s[0] ^ 1]) + s[1:])),
    Case("token_bad_signature", "r = s = 0", _sig_bytes(lambda s: bytes(64))),
    Case("token_bad_signature", "r = 0", _sig_bytes(lambda s: bytes(32) + s[32:])),
    Case("token_bad_signature", "s = 0", _sig_bytes(lambda s: s[:32] + bytes(32))),
    Case("token_bad_signature", "r = n", _sig_bytes(lambda s: P256_N.to_bytes(32, "big") + s[32:])),
    Case("token_bad_signature", "DER-encoded ECDSA signature", _sig_bytes(
        lambda s: encode_dss_signature(int.from_bytes(s[:32], "big"),
                                       int.from_bytes(s[32:], "big")))),
    # 8. typ
    Case("token_wrong_type", "at+jwt required, typ absent", _hdr({}, require_at_jwt_typ=True)),
    Case("token_wrong_type", "at+jwt required, typ JWT", _hdr({"typ": "JWT"},
                                                               require_at_jwt_typ=True)),
    Case("token_wrong_type", "a DPoP proof's typ", _hdr({"typ": "dpop+jwt"})),
    Case("token_wrong_type", "a transaction token's typ", _hdr({"typ": "txn+jwt"})),
    Case("token_wrong_type", "an ID token's typ is not at+jwt", _hdr({"typ": "id_token+jwt"},
                                                                      require_at_jwt_typ=True)),
    Case("token_wrong_type", "typ not a string", _hdr({"typ": 1})),
    # 9-11. time
    Case("token_expired", "exp past the leeway", _tok(exp=int(NOW) - 30)),
    Case("token_expired", "long expired", _tok(exp=1)),
    Case("token_not_yet_valid", "nbf beyond the leeway", _tok(nbf=int(NOW) + 31)),
    Case("token_issued_in_future", "iat beyond the leeway", _tok(iat=int(NOW) + 31)),
    # 12. audience
    Case("token_wrong_audience", "another audience", _tok(aud="https://other.example")),
    Case("token_wrong_audience", "none of ours in the array", _tok(aud=["a", "b"])),
    Case("token_wrong_audience", "empty array", _tok(aud=[])),
    Case("token_wrong_audience", "no aud", _tok(aud=DROP)),
    Case("token_wrong_audience", "prefix of ours", _tok(aud=AUD + "/x")),
    # 13. presence
    Case("token_missing_claim", "no sub", _tok(sub=DROP)),
    Case("token_missing_claim", "no exp", _tok(exp=DROP)),
    Case("token_missing_claim", "a configured claim", lambda i: (
        i.token(jti=DROP), i.issuers(required_claims=frozenset({"exp", "sub", "jti"})))),
    # 14. types
    Case("token_malformed_claim", "sub not a string", _tok(sub=42)),
    Case("token_malformed_claim", "sub null", _tok(sub=None)),
    Case("token_malformed_claim", "client_id not a string", _tok(client_id=["c"])),
    Case("token_malformed_claim", "acr not a string", _tok(acr=2)),
    Case("token_malformed_claim", "jti not a string", _tok(jti=7)),
    Case("token_malformed_claim", "exp a string", _tok(exp=str(int(NOW) + 300))),
    Case("token_malformed_claim", "exp a boolean", _tok(exp=True)),
    Case("token_malformed_claim", "exp a fraction", _tok(exp=NOW + 300.5)),
    Case("token_malformed_claim", "exp null", _tok(exp=None)),
    Case("token_malformed_claim", "nbf a boolean", _tok(nbf=False)),
    Case("token_malformed_claim", "iat a string", _tok(iat="now")),
    Case("token_malformed_claim", "auth_time a string", _tok(auth_time="yesterday")),
    Case("token_malformed_claim", "amr a string", _tok(amr="pwd")),
    Case("token_malformed_claim", "amr with a number", _tok(amr=["pwd", 1])),
    Case("token_malformed_claim", "scope an array", _tok(scope=["read"])),
    Case("token_malformed_claim", "scope with a quote", _tok(scope='read "write"')),
    Case("token_malformed_claim", "scope with a backslash", _tok(scope="a\\b")),
    Case("token_malformed_claim", "scope with a tab", _tok(scope="read\twrite")),
    Case("token_malformed_claim", "scp a number", _tok(scp=1)),
    Case("token_malformed_claim", "scp with a number", _tok(scp=["a", 1])),
    Case("token_malformed_claim", "scp with an empty token", _tok(scp=["a", ""])),
    Case("token_malformed_claim", "scp with a space inside", _tok(scp=["a b"])),
    Case("token_malformed_claim", "aud a number", _tok(aud=1)),
    Case("token_malformed_claim", "aud array with a number", _tok(aud=[AUD, 1])),
    Case("token_malformed_claim", "lone surrogate in a claim", _raw(
        {"alg": "ES256", "kid": "k1"}, lambda i: json.dumps(i.claims())[:-1] + ',"x":"\\ud800"}')),
    Case("token_malformed_claim", "lone surrogate in a claim name", _raw(
        {"alg": "ES256", "kid": "k1"},
        lambda i: json.dumps(i.claims())[:-1] + ',"\\udfff":[{"y":1}]}')),
    # 15. cnf
    Case("token_bad_cnf", "cnf a string", _tok(cnf=JKT)),
    Case("token_bad_cnf", "cnf empty", _tok(cnf={})),
    Case("token_bad_cnf", "jkt too short", _tok(cnf={"jkt": JKT[:-1]})),
    Case("token_bad_cnf", "jkt too long", _tok(cnf={"jkt": JKT + "A"})),
    Case("token_bad_cnf", "jkt with padding", _tok(cnf={"jkt": JKT[:-1] + "="})),
    Case("token_bad_cnf", "jkt in hex", _tok(cnf={"jkt": "ab" * 32})),
    Case("token_bad_cnf", "jkt non-canonical last character", _tok(cnf={"jkt": JKT[:-1] + "J"})),
    Case("token_bad_cnf", "jkt not a string", _tok(cnf={"jkt": 1})),
    Case("token_bad_cnf", "jkt null", _tok(cnf={"jkt": None})),
    Case("token_bad_cnf", "x5t#S256 malformed", _tok(cnf={"x5t#S256": "x"})),
    Case("token_bad_cnf", "x5t#S256 non-canonical (RFC 8705 example)",
         _tok(cnf={"x5t#S256": RFC8705_EXAMPLE_X5T})),
    Case("token_bad_cnf", "SHA-1 x5t is not a binding we enforce", _tok(cnf={"x5t": "abc"})),
    Case("token_bad_cnf", "a jwk we cannot enforce", _tok(cnf={"jwk": {"kty": "EC"}})),
    Case("token_bad_cnf", "jkt plus an unknown method", _tok(cnf={"jkt": JKT, "kid": "x"})),
    # 16. act
    Case("token_bad_act", "act a string", _tok(act="agent")),
    Case("token_bad_act", "act an array", _tok(act=[{"sub": "agent"}])),
    Case("token_bad_act", "act without sub", _tok(act={"client_id": "agent"})),
    Case("token_bad_act", "act sub empty", _tok(act={"sub": ""})),
    Case("token_bad_act", "act sub a number", _tok(act={"sub": 1})),
    Case("token_bad_act", "act iss a number", _tok(act={"sub": "a", "iss": 1})),
    Case("token_bad_act", "act client_id a list", _tok(act={"sub": "a", "client_id": ["c"]})),
    Case("token_bad_act", "nested act not an object", _tok(act={"sub": "a", "act": "b"})),
    Case("token_bad_act", "nested act without sub", _tok(act={"sub": "a", "act": {}})),
    Case("token_bad_act", "nested act null", _tok(act={"sub": "a", "act": None})),
    Case("token_bad_act", "one actor deeper than the limit", _tok(act=_deep_act(9))),
    Case("token_bad_act", "very deep", _tok(act=_deep_act(60))),
    Case("token_bad_act", "delegation not allowed at all",
         lambda i: (i.token(act={"sub": "a"}), i.issuers(max_delegation_depth=0))),
    # 17. RAR
    Case("token_bad_authorization_details", "an object", _tok(authorization_details={"type": "x"})),
    Case("token_bad_authorization_details", "a string", _tok(authorization_details="x")),
    Case("token_bad_authorization_details", "an item not an object",
         _tok(authorization_details=[{"type": "x"}, "y"])),
    Case("token_bad_authorization_details", "an item without type",
         _tok(authorization_details=[{"actions": ["read"]}])),
    Case("token_bad_authorization_details", "type not a string",
         _tok(authorization_details=[{"type": ["x"]}])),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.code}-{c.name}")
def test_refused(issuer: TokenIssuer, case: Case):
    token, issuers = case.make(issuer)
    _refuse(token, issuers, case.code)


def test_every_code_has_a_negative_case():
    assert {c.code for c in CASES} == set(TOKEN_CODES)


def test_the_token_validates_without_the_mutation(issuer: TokenIssuer):
    """The baseline every case mutates is itself valid, so each case fails for its own reason."""
    assert verify_access_token(issuer.token(), issuer.issuers(), NOW).subject == "user-1"


# --------------------------------------------------------------------------------------------
# Order of the checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, code", [
    # the algorithm is judged before the issuer
    (lambda i: (sign_jws({"alg": "HS256"}, i.claims(iss="https://x"), None, signature=b"x"),
                i.issuers()), "token_alg_not_allowed"),
    # the signature before any claim: a forged token learns nothing about claim checks
    (lambda i: (mint(ATTACKER, i.claims(exp=1, aud="x")), i.issuers()), "token_bad_signature"),
    (lambda i: (i.token(header={"kid": "nope"}, exp=1), i.issuers()), "token_unknown_kid"),
    # time before audience, audience before presence, presence before types
    (lambda i: (i.token(exp=1, aud="x"), i.issuers()), "token_expired"),
    (lambda i: (i.token(aud="x", sub=DROP), i.issuers()), "token_wrong_audience"),
    (lambda i: (i.token(sub=DROP, amr="x"), i.issuers()), "token_missing_claim"),
    (lambda i: (i.token(amr="x", cnf={}), i.issuers()), "token_malformed_claim"),
    (lambda i: (i.token(cnf={}, act="x"), i.issuers()), "token_bad_cnf"),
    (lambda i: (i.token(act="x", authorization_details="x"), i.issuers()), "token_bad_act"),
])
def test_checks_run_in_order(issuer: TokenIssuer, make, code):
    token, issuers = make(issuer)
    _refuse(token, issuers, code)


# --------------------------------------------------------------------------------------------
# Issuer configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"issuer": ""},
    {"audiences": frozenset()},
    {"audiences": frozenset({""})},
    {"audiences": "https://api.example"},  # a string is not a set of audiences
    {"algorithms": 5},
    {"algorithms": frozenset()},
    {"algorithms": frozenset({"HS256"})},
    {"algorithms": frozenset({"ES256", "none"})},
    {"required_claims": frozenset({"sub"})},  # a token without exp is never accepted
    {"leeway_s": -1},
    {"leeway_s": True},
    {"max_token_bytes": 0},
    {"max_delegation_depth": -1},
    {"require_at_jwt_typ": "yes"},
])
def test_issuer_policy_refuses_weak_configuration(kw):
    args = {"issuer": ISS, "audiences": frozenset({AUD}), "algorithms": frozenset({"ES256"})}
    with pytest.raises(InvalidValue):
        IssuerPolicy(**{**args, **kw})


def test_issuer_policy_normalises_sets():
    p = IssuerPolicy(ISS, {AUD}, ["ES256"], required_claims=("exp", "sub", "jti"))  # type: ignore
    assert p.audiences == frozenset({AUD}) and isinstance(p.algorithms, frozenset)
    assert p.required_claims == frozenset({"exp", "sub", "jti"})


def test_issuers_are_kept_apart():
    """A token names its issuer; only that issuer's keys verify it."""
    a = TokenIssuer.create(now=NOW, issuer="https://a.example", name="ka")
    b = TokenIssuer.create(now=NOW, issuer="https://b.example", name="kb")
    issuers = {**a.issuers(), **b.issuers()}
    assert verify_access_token(a.token(), issuers, NOW).issuer == "https://a.example"
    # a token claiming issuer b, signed by a's key (with a's kid or b's kid)
    _refuse(a.token(iss="https://b.example"), issuers, "token_unknown_kid")
    _refuse(a.token(iss="https://b.example", header={"kid": "kb"}), issuers,
            "token_bad_signature")


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def test_cache_hit_returns_the_same_claims_without_parsing(issuer, monkeypatch):
    cache, issuers, token = TokenCache(), issuer.issuers(), issuer.token()
    first = verify_access_token_cached(token, issuers, NOW, cache)

    def boom(*a, **k):
        raise AssertionError("a cache hit must not parse the token")
    monkeypatch.setattr(jose, "parse_jws", boom)
    monkeypatch.setattr(jose, "verify", boom)
    assert verify_access_token_cached(token, issuers, NOW + 10, cache) is first
    assert cache.get(token, NOW + 10, issuers) is first


def test_cache_keys_are_digests_never_tokens(issuer):
    cache, issuers, token = TokenCache(), issuer.issuers(), issuer.token()
    verify_access_token_cached(token, issuers, NOW, cache)
    (digest, entry), = cache._entries.items()
    assert digest == hashlib.sha256(token.encode()).digest()
    assert token not in repr(entry)


def test_cache_never_serves_an_expired_token(issuer):
    cache, issuers = TokenCache(), issuer.issuers()
    token = issuer.token()
    claims = verify_access_token_cached(token, issuers, NOW, cache)
    assert cache.get(token, claims.expires_at - 1, issuers) is claims
    assert cache.get(token, claims.expires_at, issuers) is None  # exp itself: no leeway here
    assert len(cache) == 0
    # past the leeway, full verification refuses it
    _cached_refuse(token, issuers, claims.expires_at + 30, cache, "token_expired")


def _cached_refuse(token, issuers, now, cache, code):
    with pytest.raises(TokenError) as info:
        verify_access_token_cached(token, issuers, now, cache)
    assert info.value.code == code


def test_cache_entry_dies_with_its_issuer(issuer):
    cache, issuers, token = TokenCache(), issuer.issuers(), issuer.token()
    verify_access_token_cached(token, issuers, NOW, cache)
    other = TokenIssuer.create(now=NOW, issuer="https://other.example", name="ko")
    assert cache.get(token, NOW, other.issuers()) is None
    _cached_refuse(token, other.issuers(), NOW, cache, "token_unknown_issuer")


def test_cache_entry_dies_with_a_replaced_issuer_policy(issuer, monkeypatch):
    cache, token = TokenCache(), issuer.token()
    policy, jwks = issuer.issuers()[ISS]
    verify_access_token_cached(token, {ISS: (policy, jwks)}, NOW, cache)
    # same JWKS, a new policy object that no longer accepts this audience
    narrowed = {ISS: (issuer.policy(audiences=frozenset({"urn:other"})), jwks)}
    assert cache.get(token, NOW, narrowed) is None
    _cached_refuse(token, narrowed, NOW, cache, "token_wrong_audience")
    # an equal but new policy object is also a miss: identity, not equality, is recorded
    verify_access_token_cached(token, {ISS: (policy, jwks)}, NOW, cache)
    calls = []
    real = jose.parse_jws
    monkeypatch.setattr(jose, "parse_jws", lambda *a, **k: calls.append(1) or real(*a, **k))
    verify_access_token_cached(token, {ISS: (issuer.policy(), jwks)}, NOW, cache)
    assert calls == [1]


def test_cache_entry_dies_with_a_refreshed_jwks(issuer):
    cache, token = TokenCache(), issuer.token()
    policy, jwks = issuer.issuers()[ISS]
    verify_access_token_cached(token, {ISS: (policy, jwks)}, NOW, cache)
    rotated = {ISS: (policy, jwk_set(key("ES256", "k-new")))}  # the old key was withdrawn
    _cached_refuse(token, rotated, NOW, cache, "token_unknown_kid")
    assert verify_access_token_cached(token, {ISS: (policy, jwks)}, NOW, cache)
    assert cache.get(token, NOW, {ISS: (policy, None)}) is None


def test_cache_does_not_remember_failures(issuer):
    cache, issuers = TokenCache(), issuer.issuers()
    token = issuer.token(aud="https://other.example")
    for _ in range(2):
        _cached_refuse(token, issuers, NOW, cache, "token_wrong_audience")
    assert len(cache) == 0


def test_cache_is_bounded_lru(issuer):
    cache, issuers = TokenCache(max_entries=2), issuer.issuers()
    t1, t2, t3 = (issuer.token(jti=f"j{n}") for n in range(3))
    for t in (t1, t2):
        verify_access_token_cached(t, issuers, NOW, cache)
    assert cache.get(t1, NOW, issuers) is not None  # t1 is now the most recent
    verify_access_token_cached(t3, issuers, NOW, cache)
    assert len(cache) == 2
    assert cache.get(t2, NOW, issuers) is None
    assert cache.get(t1, NOW, issuers) is not None and cache.get(t3, NOW, issuers) is not None


def test_cache_put_and_get_directly(issuer):
    cache, issuers, token = TokenCache(), issuer.issuers(), issuer.token()
    claims = verify_access_token(token, issuers, NOW)
    assert cache.get(token, NOW, issuers) is None
    cache.put(token, claims, issuers)
    assert cache.get(token, NOW, issuers) is claims
    cache.clear()
    assert cache.get(token, NOW, issuers) is None


@pytest.mark.parametrize("n", [0, -1, True, "10"])
def test_cache_size_must_be_positive(n):
    with pytest.raises(InvalidValue):
        TokenCache(max_entries=n)


@pytest.mark.parametrize("token", [b"x.y.z", "x" * 70000, "é.a.b"])
def test_cached_verification_refuses_what_verification_refuses(issuer, token):
    with pytest.raises(TokenError):
        verify_access_token_cached(token, issuer.issuers(), NOW, TokenCache())
