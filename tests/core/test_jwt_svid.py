"""JWT-SVIDs (SPIFFE JWT-SVID.md sections 2-4, bundle spec section 4): every rule has a negative
case in `CASES`, named by its stable `jwt_svid_*` code. The keys of a trust domain's bundle never
vouch for a SPIFFE ID of another domain."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from proxy.core import jose
from proxy.core.model import SpiffeId
from proxy.core.spiffe import TrustStore
from proxy.core.tokens import JWT_SVID_CODES, verify_jwt_svid
from proxy.errors import TokenError
from tests.tokens_factory import (
    DROP,
    TestKey,
    hmac_jws,
    jwt_svid_bundle,
    key,
    mint,
    mint_jwt_svid,
    new_key,
    sign_jws,
)

NOW = 1_800_000_000.0
AUD = "spiffe://a.org/ns/api/sa/server"
AUDS = frozenset({AUD, "api"})
A_ID = "spiffe://a.org/ns/web/sa/frontend"
B_ID = "spiffe://b.org/billing"

KA = key("ES256", "a1")
KA_RSA = key("RS256", "a-rsa")
KB = key("ES256", "b1")
ROGUE_B1 = new_key("ES256", "b1")  # an a.org-controlled key wearing b.org's kid


@pytest.fixture(scope="module")
def store() -> TrustStore:
    a = jwt_svid_bundle("a.org", KA, KA_RSA, key("ES384", "a384"), key("ES512", "a512"),
                        ("a-oct", {"kty": "oct", "k": "c2VjcmV0"}),
                        ("a-ed", key("EdDSA", "a-ed").public_jwk(with_alg=False)),
                        now=NOW)
    b = jwt_svid_bundle("b.org", KB, now=NOW)
    c = jwt_svid_bundle("c.org", now=NOW)  # a federated domain with no JWT authorities
    return TrustStore.of([a, b, c], version=1)


def _svid(signer: TestKey = KA, spiffe_id: str = A_ID, aud: Any = AUD, **kw) -> str:
    return mint_jwt_svid(signer, spiffe_id, aud, now=NOW, **kw)


def _verify(token, store, now=NOW, audiences=AUDS):
    return verify_jwt_svid(token, store, audiences, now)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signer, alg", [
    (KA, "ES256"), (key("ES384", "a384"), "ES384"), (key("ES512", "a512"), "ES512"),
    (KA_RSA, "RS256"), (KA_RSA, "RS384"), (KA_RSA, "RS512"),
    (KA_RSA, "PS256"), (KA_RSA, "PS384"), (KA_RSA, "PS512"),
])
def test_every_jwt_svid_algorithm_verifies(store, signer, alg):
    token = _svid(signer.with_alg(alg))
    assert _verify(token, store) == SpiffeId("a.org", "/ns/web/sa/frontend")


@pytest.mark.parametrize("kw", [{"typ": "JWT"}, {"typ": "JOSE"}, {"typ": None},
                                {"aud": [AUD]}, {"aud": ["other", "api"]}])
def test_header_and_audience_variants(store, kw):
    assert _verify(_svid(**kw), store).trust_domain == "a.org"


def test_a_b_org_svid_verifies_with_b_org_keys(store):
    assert str(_verify(_svid(KB, B_ID), store)) == B_ID


def test_leeway(store):
    token = _svid(ttl_s=10)
    assert _verify(token, store, now=NOW + 10 + 29)
    with pytest.raises(TokenError):
        _verify(token, store, now=NOW + 10 + 30)


def test_custom_leeway(store):
    token = _svid(ttl_s=10)
    with pytest.raises(TokenError) as info:
        verify_jwt_svid(token, store, AUDS, NOW + 11, leeway_s=0)
    assert info.value.code == "jwt_svid_expired"


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    code: str
    name: str
    make: Callable[[], Any]


def _body(**over) -> dict:
    base = {"sub": A_ID, "aud": AUD, "exp": int(NOW) + 300}
    for k, v in over.items():
        if v is DROP:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def _sig(transform: Callable[[bytes], bytes]) -> Callable[[], str]:
    def make():
        h, p, s = _svid().split(".")
        return f"{h}.{p}.{jose.b64url_encode(transform(jose.b64url_decode(s)))}"
    return make


CASES = [
    Case("jwt_svid_too_large", "over 8 KiB", lambda: _svid(pad="x" * 9000)),
    Case("jwt_svid_malformed", "not text", lambda: b"a.b.c"),
    Case("jwt_svid_malformed", "two parts", lambda: ".".join(_svid().split(".")[:2])),
    Case("jwt_svid_malformed", "JSON serialization", lambda: json.dumps({"payload": "x"})),
    Case("jwt_svid_malformed", "payload not an object",
         lambda: sign_jws({"alg": "ES256", "kid": "a1"}, [A_ID], KA)),
    Case("jwt_svid_malformed", "duplicate sub",
         lambda: sign_jws({"alg": "ES256", "kid": "a1"},
                          json.dumps(_body())[:-1] + f',"sub":"{B_ID}"}}', KA)),
    Case("jwt_svid_malformed", "jku header member", lambda: _svid(header={"jku": "https://evil/jwks"})),
    Case("jwt_svid_malformed", "jwk header member",
         lambda: mint(ROGUE_B1, _body(sub=B_ID), typ="JWT", jwk=ROGUE_B1.public_jwk())),
    Case("jwt_svid_malformed", "x5c header member", lambda: _svid(header={"x5c": ["MIIB"]})),
    Case("jwt_svid_malformed", "cty header member", lambda: _svid(header={"cty": "JWT"})),
    Case("jwt_svid_malformed", "crit header member", lambda: _svid(header={"crit": ["exp"]})),
    Case("jwt_svid_alg_not_allowed", "EdDSA is not a JWT-SVID algorithm",
         lambda: _svid(key("EdDSA", "a-ed"))),
    Case("jwt_svid_alg_not_allowed", "none",
         lambda: sign_jws({"alg": "none", "kid": "a1"}, _body(), None)),
    Case("jwt_svid_alg_not_allowed", "HS256 keyed with the bundle's public key",
         lambda: hmac_jws({"alg": "HS256", "kid": "a1"}, _body(), KA.public_pem())),
    Case("jwt_svid_wrong_type", "typ at+jwt", lambda: _svid(typ="at+jwt")),
    Case("jwt_svid_wrong_type", "typ lower-case jwt", lambda: _svid(typ="jwt")),
    Case("jwt_svid_wrong_type", "typ not a string", lambda: _svid(typ=1)),
    Case("jwt_svid_missing_kid", "no kid", lambda: _svid(kid=None)),
    Case("jwt_svid_missing_kid", "kid a number", lambda: _svid(kid=7)),
    Case("jwt_svid_missing_kid", "kid empty", lambda: _svid(kid="")),
    Case("jwt_svid_invalid_spiffe_id", "no sub", lambda: _svid(sub=DROP)),
    Case("jwt_svid_invalid_spiffe_id", "sub not a string", lambda: _svid(sub=[A_ID])),
    Case("jwt_svid_invalid_spiffe_id", "sub an https URL",
         lambda: _svid(spiffe_id="https://a.org/ns/web")),
    Case("jwt_svid_invalid_spiffe_id", "sub with a percent-encoding",
         lambda: _svid(spiffe_id="spiffe://a.org/ns%2Fweb")),
    Case("jwt_svid_invalid_spiffe_id", "sub with upper-case trust domain",
         lambda: _svid(spiffe_id="spiffe://A.org/web")),
    Case("jwt_svid_invalid_spiffe_id", "sub a trust domain ID",
         lambda: _svid(spiffe_id="spiffe://a.org")),
    Case("jwt_svid_untrusted", "unknown trust domain",
         lambda: _svid(spiffe_id="spiffe://z.org/web")),
    Case("jwt_svid_untrusted", "b.org SVID signed by a.org's key, a.org's kid",
         lambda: _svid(KA, B_ID)),
    Case("jwt_svid_untrusted", "a domain without JWT authorities",
         lambda: _svid(spiffe_id="spiffe://c.org/web")),
    Case("jwt_svid_untrusted", "kid unknown in the domain", lambda: _svid(new_key("ES256", "a9"))),
    Case("jwt_svid_untrusted", "authority is a symmetric key",
         lambda: _svid(kid="a-oct")),
    Case("jwt_svid_untrusted", "EC authority, RSA algorithm",
         lambda: _svid(KA_RSA.with_kid("a1"))),
    Case("jwt_svid_untrusted", "P-256 authority, ES384",
         lambda: _svid(key("ES384", "x").with_kid("a1"))),
    Case("jwt_svid_bad_signature", "b.org SVID signed by a rogue key wearing b.org's kid",
         lambda: _svid(ROGUE_B1, B_ID)),
    Case("jwt_svid_bad_signature", "sub swapped after signing", lambda: ".".join([
        _svid().split(".")[0], jose.b64url_encode(json.dumps(_body(sub=A_ID + "x")).encode()),
        _svid().split(".")[2]])),
    Case("jwt_svid_bad_signature", "truncated", _sig(lambda s: s[:-2])),
    Case("jwt_svid_bad_signature", "zero r and s", _sig(lambda s: bytes(64))),
    Case("jwt_svid_bad_signature", "empty", _sig(lambda s: b"")),
    Case("jwt_svid_missing_claim", "no exp", lambda: _svid(exp=DROP)),
    Case("jwt_svid_missing_claim", "no aud", lambda: _svid(aud=DROP)),
    Case("jwt_svid_malformed_claim", "exp a string", lambda: _svid(exp="soon")),
    Case("jwt_svid_malformed_claim", "exp a boolean", lambda: _svid(exp=True)),
    Case("jwt_svid_malformed_claim", "exp a fraction", lambda: _svid(exp=NOW + 0.5)),
    Case("jwt_svid_malformed_claim", "nbf a string", lambda: _svid(nbf="now")),
    Case("jwt_svid_malformed_claim", "aud a number", lambda: _svid(aud=5)),
    Case("jwt_svid_malformed_claim", "aud an empty array", lambda: _svid(aud=[])),
    Case("jwt_svid_malformed_claim", "aud with a number", lambda: _svid(aud=[AUD, 5])),
    Case("jwt_svid_expired", "expired beyond the leeway", lambda: _svid(exp=int(NOW) - 30)),
    Case("jwt_svid_not_yet_valid", "nbf beyond the leeway", lambda: _svid(nbf=int(NOW) + 31)),
    Case("jwt_svid_wrong_audience", "another audience", lambda: _svid(aud="spiffe://a.org/x")),
    Case("jwt_svid_wrong_audience", "none of ours", lambda: _svid(aud=["x", "y"])),
    Case("jwt_svid_wrong_audience", "case differs", lambda: _svid(aud="API")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.code}-{c.name}")
def test_refused(store, case: Case):
    token = case.make()
    with pytest.raises(TokenError) as info:
        _verify(token, store)
    err = info.value
    assert err.code == case.code, err.detail
    assert err.rfc_error == "invalid_token" and err.status == 401
    if isinstance(token, str):
        for part in token.split("."):
            if len(part) > 12:
                assert part not in err.detail


def test_every_code_has_a_negative_case():
    assert {c.code for c in CASES} == set(JWT_SVID_CODES)


def test_no_audience_configured_accepts_nothing(store):
    with pytest.raises(TokenError) as info:
        _verify(_svid(), store, audiences=frozenset())
    assert info.value.code == "jwt_svid_wrong_audience"


def test_a_refreshed_bundle_is_used(store):
    """Authorities are memoised per bundle object: a new bundle with a rotated key takes effect."""
    token = _svid()
    assert _verify(token, store)
    rotated = TrustStore.of([jwt_svid_bundle("a.org", new_key("ES256", "a1"), now=NOW)], 2)
    with pytest.raises(TokenError) as info:
        _verify(token, rotated)
    assert info.value.code == "jwt_svid_bad_signature"
    assert _verify(token, store)
