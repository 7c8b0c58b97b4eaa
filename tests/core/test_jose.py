"""JOSE primitives (`proxy.core.jose`): RFC test vectors, the JWK and JWS rules, and a property
test that the parsers and the token verifier only ever fail with their own error types."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core import jose
from proxy.core.jose import (
    JWS,
    b64url_decode,
    b64url_encode,
    check_alg,
    parse_jwk,
    parse_jwks,
    parse_jws,
    thumbprint,
    verify,
)
from proxy.core.tokens import TokenCache, verify_access_token, verify_access_token_cached
from proxy.errors import InvalidValue, TokenError
from tests.tokens_factory import TokenIssuer, b64json, key, sign_jws

# RFC 7638 section 3.1
RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJE"
         "CPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Q"
         "vzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6"
         "WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

# RFC 8037 appendix A.2 (public key), A.3 (thumbprint), A.4 (signature)
RFC8037_JWK = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC8037_JWS = ("eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
               "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg")

# RFC 7515 appendix A.3 (ES256)
RFC7515_A3_JWK = {"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                  "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
RFC7515_A3_JWS = (
    "eyJhbGciOiJFUzI1NiJ9."
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ."
    "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q")


def _manual_jws(compact: str) -> JWS:
    """A JWS whose payload is not JSON (RFC 8037's example signs a plain sentence)."""
    h, p, s = compact.split(".")
    return JWS(json.loads(b64url_decode(h)), {}, f"{h}.{p}".encode(), b64url_decode(s))


# --------------------------------------------------------------------------------------------
# RFC vectors
# --------------------------------------------------------------------------------------------


def test_rfc7638_thumbprint():
    assert thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    assert parse_jwk(RFC7638_JWK).thumbprint == RFC7638_THUMBPRINT
    # optional members do not take part (section 3.2)
    assert thumbprint({**RFC7638_JWK, "use": "sig", "x5t": "abc"}) == RFC7638_THUMBPRINT


@pytest.mark.parametrize("jwk", [{"kty": ["EC"]}, {"kty": "EC", "crv": "P-256", "x": "a"},
                                 {"kty": "EC", "crv": 1, "x": "a", "y": "b"}, {}])
def test_thumbprint_of_an_incomplete_jwk(jwk):
    with pytest.raises(InvalidValue):
        thumbprint(jwk)


def test_rfc8037_ed25519_thumbprint_and_signature():
    jwk = parse_jwk(RFC8037_JWK)
    assert jwk.thumbprint == RFC8037_THUMBPRINT
    jws = _manual_jws(RFC8037_JWS)
    verify(jws, jwk, "EdDSA")
    tampered = JWS(jws.header, {}, jws.signing_input + b"x", jws.signature)
    with pytest.raises(InvalidValue):
        verify(tampered, jwk, "EdDSA")
    # parse_jws only accepts JWTs: the RFC 8037 payload is a sentence, not a JSON object
    with pytest.raises(InvalidValue, match="payload"):
        parse_jws(RFC8037_JWS)


def test_rfc7515_a3_es256_verifies():
    jws = parse_jws(RFC7515_A3_JWS)
    assert jws.header == {"alg": "ES256"}
    assert jws.payload == {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True}
    verify(jws, parse_jwk(RFC7515_A3_JWK), check_alg(jws.alg, frozenset({"ES256"})))
    h, p, s = RFC7515_A3_JWS.split(".")
    forged = b64json({"iss": "joe", "exp": 4102444800, "http://example.com/is_root": True})
    with pytest.raises(InvalidValue):
        verify(parse_jws(f"{h}.{forged}.{s}"), parse_jwk(RFC7515_A3_JWK), "ES256")


# --------------------------------------------------------------------------------------------
# JWKs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_private_members_are_refused(member):
    with pytest.raises(InvalidValue, match="private"):
        parse_jwk({**RFC7515_A3_JWK, member: "AAAA"})
    with pytest.raises(InvalidValue, match="private"):
        parse_jwks({"keys": [{**RFC7515_A3_JWK, member: "AAAA"}]})


def test_symmetric_keys_are_refused():
    with pytest.raises(InvalidValue, match="oct"):
        parse_jwk({"kty": "oct", "kid": "h", "alg": "HS256"})
    with pytest.raises(InvalidValue):
        parse_jwks({"keys": [{"kty": "oct", "kid": "h"}]})  # nothing usable left


def test_short_rsa_keys_are_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    nums = small.public_numbers()
    jwk = {"kty": "RSA", "n": b64url_encode(nums.n.to_bytes(128, "big")), "e": "AQAB"}
    with pytest.raises(InvalidValue, match="2048"):
        parse_jwk(jwk)


@pytest.mark.parametrize("jwk", [
    {**RFC7515_A3_JWK, "crv": "P-192"},
    {**RFC7515_A3_JWK, "crv": "secp256k1"},
    {**RFC7515_A3_JWK, "x": RFC7515_A3_JWK["x"][:-2]},  # wrong coordinate length
    {**RFC7515_A3_JWK, "y": RFC7515_A3_JWK["x"]},  # not on the curve
    {**RFC7515_A3_JWK, "x": 5},
    {"kty": "OKP", "crv": "Ed448", "x": "AAAA"},
    {"kty": "OKP", "crv": "X25519", "x": RFC8037_JWK["x"]},
    {"kty": "RSA", "e": "AQAB"},
    {"kty": "RSA", "n": RFC7638_JWK["n"], "e": ""},
    {"kty": "RSA", "n": RFC7638_JWK["n"], "e": "AQAB", "alg": "HS256"},
    {**RFC7515_A3_JWK, "kid": 1},
    {"kty": "PQC"},
    {"kty": ["EC"]},
    "not an object",
])
def test_unusable_jwks_are_refused(jwk):
    with pytest.raises(InvalidValue):
        parse_jwk(jwk)


def test_jwks_keeps_signature_keys_and_indexes_kids():
    keys = parse_jwks({"keys": [
        {**RFC7515_A3_JWK, "kid": "e1"},
        {**RFC7515_A3_JWK, "kid": "enc", "use": "enc"},  # not a signature key: skipped
        {"kty": "unknown-type", "kid": "u"},  # unknown type: ignored (RFC 7517 section 5)
        {**RFC7638_JWK, "kid": "r1"},
    ]})
    assert {k.kid for k in keys.keys} == {"e1", "r1"}
    assert [k.kid for k in keys.candidates("e1", "ES256")] == ["e1"]
    assert keys.candidates("e1", "ES384") == ()
    assert keys.candidates("enc", "ES256") == ()
    # the JWK's own alg pins the algorithm (RFC7638_JWK says RS256)
    assert keys.candidates("r1", "PS256") == ()
    assert [k.kid for k in keys.candidates(None, "RS256")] == ["r1"]


@pytest.mark.parametrize("doc", [b"[]", b"{}", b'{"keys": {}}', b'{"keys": []}',
                                 b'{"keys": [1, "x"]}', b"not json"])
def test_unusable_jwks_documents(doc):
    with pytest.raises(InvalidValue):
        parse_jwks(doc)


# --------------------------------------------------------------------------------------------
# JWS syntax
# --------------------------------------------------------------------------------------------

H = b64json({"alg": "ES256"})
P = b64json({"sub": "x"})


@pytest.mark.parametrize("part", [
    "eyJhbGciOiJFUzI1NiJ9=",  # padding
    "ab+c", "ab/c",  # the standard alphabet
    "abcde",  # a length no encoding produces (5 mod 4 == 1)
    "ab c", "ab\nc",
    "abcé",
])
def test_bad_base64url(part):
    with pytest.raises(InvalidValue, match="base64url"):
        b64url_decode(part)
    with pytest.raises(InvalidValue):
        parse_jws(f"{part}.{P}.AAAA")


def test_base64url_round_trip():
    for n in range(0, 70):
        data = bytes(range(n))
        assert b64url_decode(b64url_encode(data)) == data


@pytest.mark.parametrize("header, payload", [
    ('{"alg":"ES256","alg":"none"}', '{"sub":"x"}'),
    ('{"alg":"ES256"}', '{"sub":"x","sub":"admin"}'),
    ('{"alg":"ES256"}', '{"a":{"b":1,"b":2}}'),  # at any depth
])
def test_duplicate_members_are_refused(header, payload):
    with pytest.raises(InvalidValue, match="duplicate"):
        parse_jws(f"{b64json(header)}.{b64json(payload)}.AAAA")


@pytest.mark.parametrize("crit", [["exp"], [], ["b64"]])
def test_crit_is_refused(crit):
    with pytest.raises(InvalidValue, match="crit"):
        parse_jws(f"{b64json({'alg': 'ES256', 'crit': crit, 'b64': False})}.{P}.AAAA")


@pytest.mark.parametrize("payload", [
    '{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}',
    '\ufeff{"a":1}',  # a byte order mark
])
def test_non_json_constants_and_bom_are_refused(payload):
    with pytest.raises(InvalidValue):
        parse_jws(f"{H}.{b64json(payload)}.AAAA")


def test_utf16_is_refused():
    with pytest.raises(InvalidValue):
        parse_jws(f"{H}.{b64url_encode(json.dumps({'a': 1}).encode('utf-16'))}.AAAA")


@pytest.mark.parametrize("token", ["", "a", "a.b", "a.b.c.d", f".{P}.AAAA", f"{H}..AAAA",
                                   f"{H}.{P}", "x" * 20000])
def test_not_a_compact_jws(token):
    with pytest.raises(InvalidValue):
        parse_jws(token)


# --------------------------------------------------------------------------------------------
# Algorithms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS256", "HS384", "HS512", "", None, 1,
                                 ["ES256"], "ES256K", "Ed25519", "RSA-OAEP", "dir"])
def test_check_alg_refuses_everything_but_asymmetric_signatures(alg):
    with pytest.raises(InvalidValue):
        check_alg(alg, jose.ASYMMETRIC_ALGS | {"HS256", "none"})


def test_check_alg_applies_the_allow_list():
    assert check_alg("ES256", frozenset({"ES256"})) == "ES256"
    with pytest.raises(InvalidValue, match="not allowed"):
        check_alg("RS256", frozenset({"ES256"}))


@pytest.mark.parametrize("signer, key_alg, alg", [
    ("ES256", "ES256", "ES384"),  # curve and hash do not match
    ("ES256", "ES256", "RS256"),  # EC key, RSA algorithm
    ("RS256", "RS256", "ES256"),  # RSA key, EC algorithm
    ("EdDSA", "EdDSA", "ES256"),
    ("ES384", "ES384", "ES512"),
    ("RS256", "RS256", "PS256"),  # the JWK's own alg (RS256) pins the algorithm
])
def test_alg_key_mismatch(signer, key_alg, alg):
    k = key(signer, "m")
    jwk = parse_jwk(k.public_jwk(with_alg=True))
    jws = parse_jws(sign_jws({"alg": alg}, {"sub": "x"}, k))
    with pytest.raises(InvalidValue):
        verify(jws, jwk, alg)


def test_hmac_with_the_public_key_never_verifies():
    """Algorithm confusion: HS256 keyed with the public key bytes, against that key's JWK."""
    k = key("RS256", "conf")
    jwk = parse_jwk(k.public_jwk(with_alg=False))
    si = f"{b64json({'alg': 'HS256'})}.{P}"
    mac = hmac.new(k.public_pem(), si.encode(), hashlib.sha256).digest()
    jws = parse_jws(f"{si}.{b64url_encode(mac)}")
    with pytest.raises(InvalidValue):
        check_alg(jws.alg, jose.ASYMMETRIC_ALGS)
    with pytest.raises(InvalidValue):
        verify(jws, jwk, "HS256")


def test_ecdsa_signature_values_out_of_range():
    k = key("ES256", "r")
    jwk = parse_jwk(k.public_jwk())
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # order of P-256
    good = parse_jws(sign_jws({"alg": "ES256"}, {"sub": "x"}, k))
    verify(good, jwk, "ES256")
    for sig in (bytes(64), bytes(32) + good.signature[32:], good.signature[:32] + bytes(32),
                n.to_bytes(32, "big") + good.signature[32:], good.signature[:32] + b"\xff" * 32,
                good.signature[:-1], good.signature + b"\0"):
        with pytest.raises(InvalidValue):
            verify(JWS(good.header, good.payload, good.signing_input, sig), jwk, "ES256")


# --------------------------------------------------------------------------------------------
# Property tests: only our own error types, whatever the input
# --------------------------------------------------------------------------------------------

NOW = 1_800_000_000.0
ISSUER = TokenIssuer.create(now=NOW)
ISSUERS = ISSUER.issuers()

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
_b64_part = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                    max_size=60)
_claim_names = st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "scope", "scp", "amr",
                                "acr", "auth_time", "client_id", "jti", "cnf", "act",
                                "authorization_details", "x"])
_header_names = st.sampled_from(["alg", "kid", "typ", "crit", "jwk", "jku", "x"])


@st.composite
def _jwt_like(draw) -> str:
    """Three parts where each is arbitrary text, base64url junk, or base64url JSON."""
    def part(names):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            return draw(st.text(max_size=40))
        if choice == 1:
            return draw(_b64_part)
        if choice == 2:
            return b64json(json.dumps(draw(_json)))
        return b64json(json.dumps(draw(st.dictionaries(names, _json, max_size=6))))
    return f"{part(_header_names)}.{part(_claim_names)}.{part(_claim_names)}"


@st.composite
def _signed_with_random_claims(draw) -> str:
    """Genuinely signed tokens with arbitrary values for every claim the verifier reads."""
    claims = ISSUER.claims(**draw(st.dictionaries(_claim_names, _json, max_size=5)))
    header = {"alg": "ES256", "kid": "k1", **draw(st.dictionaries(
        st.sampled_from(["typ", "jku", "x5u", "cty"]), _json, max_size=2))}
    return sign_jws(header, claims, ISSUER.signer)


_inputs = st.text(max_size=200) | _jwt_like()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_inputs)
def test_parse_jws_only_raises_invalid_value(text):
    try:
        parse_jws(text)
    except InvalidValue:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_inputs | _signed_with_random_claims())
def test_verify_access_token_only_raises_token_error(text):
    for verify_fn in (lambda: verify_access_token(text, ISSUERS, NOW),
                      lambda: verify_access_token_cached(text, ISSUERS, NOW, TokenCache())):
        try:
            claims = verify_fn()
        except TokenError as err:
            assert err.code and err.rfc_error == "invalid_token"
        else:
            assert claims.expires_at > NOW - 30 and claims.issuer == ISSUER.issuer


@pytest.mark.parametrize("prefix", ["", "AAAA", "eyJh"])
@pytest.mark.parametrize("rem", [2, 3])
def test_every_last_character_is_accepted_exactly_when_canonical(prefix, rem):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    accepted = []
    for last in alphabet:
        text = prefix + "Q" * (rem - 1) + last
        try:
            out = b64url_decode(text)
        except InvalidValue as exc:
            assert "canonical" in exc.reason
            continue
        assert b64url_encode(out) == text
        accepted.append(last)
    assert len(accepted) == (4 if rem == 2 else 16)  # 4 resp. 2 unused low bits must be zero


@given(st.binary(max_size=300))
def test_every_canonical_encoding_decodes(data):
    text = b64url_encode(data)
    assert b64url_decode(text) == data == b64url_decode(text.encode("ascii"))


def test_non_canonical_base64url_is_refused():
    """RFC 4648 section 3.5: a last character with unused bits set is another spelling of the same
    bytes; accepting it would give one token two fingerprints."""
    from proxy.core.jose import b64url_decode
    from proxy.errors import InvalidValue
    assert b64url_decode("QQ") == b"A"
    with pytest.raises(InvalidValue):
        b64url_decode("QR")  # same byte, low bits set
