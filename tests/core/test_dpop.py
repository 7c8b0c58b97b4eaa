"""proxy.core.dpop: RFC 9449 section 4.3 checks in RFC order, token binding (RFC 9449 section 7,
RFC 8705 section 3), ath, request URI / htu normalisation, server nonces."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.dpop import (DPoPConfig, DPoPProof, NonceIssuer, ath, check_binding, htu_matches,
                             normalize_origin, request_uri, verify_dpop_proof)
from proxy.core.jose import b64url_encode, thumbprint
from proxy.core.model import Binding, TokenClaims
from proxy.core.replay import MemoryReplayStore
from proxy.errors import (ConfigError, DPoPError, DPoPNonceRequired, DPoPReplayStoreFull,
                          InternalError, InvalidValue, ServiceUnavailable, TokenError)
from tests.dpop_factory import DROP, HTU, NOW, ProofKey, make_proof

ORIGIN = "https://api.example.com"
PATH = "/orders/42"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
CFG = DPoPConfig(frozenset({"ES256", "EdDSA", "PS256"}))
ALGS = "ES256 EdDSA PS256"

EC = ProofKey.generate("ES256")
ED = ProofKey.generate("EdDSA")
ES384 = ProofKey.generate("ES384")
OTHER = ProofKey.generate("ES256")
SECRET = b"k" * 32

# RFC 9449 figure 2 (section 4.1) and figure 13 (section 7.1), line folding undone.
RFC_JWK = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
           "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"  # section 6.1
RFC_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # section 7.1
RFC_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
_RFC_HEADER = ("eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgt"
               "MzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VO"
               "SmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19")
RFC_FIGURE_2 = (_RFC_HEADER + ".eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0"
                "dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfr"
                "g8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg")
RFC_FIGURE_13 = (_RFC_HEADER + ".eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaH"
                 "R0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2Mj"
                 "YxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP"
                 "35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA")


class AlwaysSeen:
    def seen(self, key: bytes, expires_at: float, now: float) -> bool:
        return True


def run(headers, *, method="GET", htu=HTU, access_token=TOKEN, config=CFG, replay=None, now=NOW,
        **kw) -> DPoPProof:
    return verify_dpop_proof(headers, method=method, htu=htu, access_token=access_token,
                             config=config, replay=replay if replay is not None else
                             MemoryReplayStore(), now=now, **kw)


def refused(code: str, headers, **kw) -> DPoPError:
    with pytest.raises(DPoPError) as info:
        run(headers, **kw)
    assert info.value.code == code, info.value.detail
    return info.value


# --------------------------------------------------------------------------------------------
# RFC 9449 example values
# --------------------------------------------------------------------------------------------


def test_rfc9449_section_6_1_jkt_of_the_example_key() -> None:
    assert thumbprint(RFC_JWK) == RFC_JKT


def test_rfc9449_section_7_1_ath_of_the_example_token() -> None:
    assert ath(RFC_TOKEN) == RFC_ATH


def test_rfc9449_figure_2_token_request_proof_verifies() -> None:
    proof = run([RFC_FIGURE_2], method="POST", htu=request_uri("https://server.example.com", "/token"),
                access_token=None, now=1562262616)
    assert proof.jkt == RFC_JKT
    assert proof.iat == 1562262616
    assert proof.fingerprint == hashlib.sha256(RFC_FIGURE_2.encode()).hexdigest()


def test_rfc9449_figure_13_resource_proof_verifies_with_its_token() -> None:
    htu = request_uri("https://resource.example.org", "/protectedresource")
    proof = run([RFC_FIGURE_13], htu=htu, access_token=RFC_TOKEN, now=1562262618,
                expected_jkt=RFC_JKT)
    assert proof.jkt == RFC_JKT
    refused("dpop_ath_mismatch", [RFC_FIGURE_13], htu=htu, access_token=TOKEN, now=1562262618)


# --------------------------------------------------------------------------------------------
# One check at a time, in RFC 9449 section 4.3 order; an earlier failure wins
# --------------------------------------------------------------------------------------------

NONCE_PATCH = {"cfg.require_nonce": True, "req.nonce_check": lambda n: False,
               "req.current_nonce": lambda: "fresh-nonce"}

# (id, code, patch). A patch sets make_proof kwargs ("proof.*"), verify kwargs ("req.*"),
# DPoPConfig fields ("cfg.*"), the number of header fields ("n_headers") or post-processing.
CHECKS: list[tuple[str, str, dict]] = [
    ("01-missing", "dpop_missing", {"n_headers": 0}),
    ("01-multiple", "dpop_multiple", {"n_headers": 2}),
    ("01-too-large", "dpop_too_large", {"proof.claims": {"pad": "x" * 5000}}),
    ("02-malformed", "dpop_malformed", {"post.extra_part": True}),
    ("03-missing-claim", "dpop_missing_claim", {"proof.drop": ("jti",)}),
    ("04-wrong-type", "dpop_wrong_type", {"proof.typ": "JWT"}),
    ("05-alg-not-allowed", "dpop_alg_not_allowed", {"proof.key": ES384}),
    ("06-bad-jwk", "dpop_bad_jwk", {"proof.jwk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}}),
    ("06-alg-key-mismatch", "dpop_alg_key_mismatch", {"proof.alg": "EdDSA"}),
    ("06-bad-signature", "dpop_bad_signature", {"proof.flip_signature": True}),
    ("07-private-jwk", "dpop_bad_jwk", {"proof.include_private": True}),
    ("08-htm", "dpop_htm_mismatch", {"req.method": "POST"}),
    ("09-htu", "dpop_htu_mismatch", {"proof.htu": "https://api.example.com/orders/43"}),
    ("10-nonce", "dpop_nonce_required", NONCE_PATCH),
    ("11-iat", "dpop_iat_out_of_window", {"proof.iat": NOW - 61}),
    ("12-ath", "dpop_ath_mismatch", {"proof.claims": {"ath": ath("another-token")}}),
    ("12-key", "dpop_key_mismatch", {"req.expected_jkt": OTHER.jkt}),
    ("13-bad-jti", "dpop_bad_jti", {"proof.claims": {"jti": 7}}),
    ("13-replayed", "dpop_replayed", {"req.replay": AlwaysSeen()}),
]
# Breaking both makes the later one the only failure (ES384 key named "EdDSA" passes check 5).
CONFLICTS = {("05-alg-not-allowed", "06-alg-key-mismatch")}


def compose(*patches: dict) -> dict | None:
    out: dict = {}
    for patch in patches:
        for k, v in patch.items():
            if k in out:
                if not (isinstance(v, dict) and isinstance(out[k], dict)) or out[k].keys() & v.keys():
                    return None
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


def build(patch: dict) -> tuple[list[str], dict, str]:
    """(headers, verify kwargs, the proof) for a valid request with `patch` applied."""
    proof_kw = {k[6:]: v for k, v in patch.items() if k.startswith("proof.")}
    key = proof_kw.pop("key", EC)
    proof = make_proof(key, access_token=TOKEN, **proof_kw)
    if patch.get("post.extra_part"):
        proof += ".AAAA"
    req = {k[4:]: v for k, v in patch.items() if k.startswith("req.")}
    cfg = {k[4:]: v for k, v in patch.items() if k.startswith("cfg.")}
    if cfg:
        req["config"] = DPoPConfig(CFG.algorithms, **cfg)
    return [proof] * patch.get("n_headers", 1), req, proof


def test_the_unbroken_request_verifies() -> None:
    headers, req, proof = build({})
    result = run(headers, **req)
    assert result == DPoPProof(jkt=EC.jkt, jti_digest=result.jti_digest, iat=NOW,
                               fingerprint=hashlib.sha256(proof.encode()).hexdigest())
    assert len(result.jti_digest) == 32


@pytest.mark.parametrize("name,code,patch", CHECKS, ids=[c[0] for c in CHECKS])
def test_each_check(name: str, code: str, patch: dict) -> None:
    headers, req, proof = build(patch)
    err = refused(code, headers, **req)
    assert err.status == 401 and err.challenge_scheme == "DPoP"
    challenge = err.challenge()
    assert f'algs="{ALGS}"' in challenge
    expected_error = {"dpop_nonce_required": "use_dpop_nonce",
                      "dpop_key_mismatch": "invalid_token"}.get(code, "invalid_dpop_proof")
    assert challenge.startswith(f'DPoP error="{expected_error}"')
    # never the raw proof or token: not in the message, the detail or any header
    rendered = " ".join([str(err), err.detail, challenge, repr(err.extra_headers)])
    assert proof not in rendered and TOKEN not in rendered
    assert proof.split(".")[2] not in rendered


PAIRS = [(a, b) for (a, b) in itertools.combinations(CHECKS, 2)
         if (a[0], b[0]) not in CONFLICTS and compose(a[2], b[2]) is not None]


@pytest.mark.parametrize("first,later", PAIRS, ids=[f"{a[0]}+{b[0]}" for a, b in PAIRS])
def test_a_proof_failing_two_checks_reports_the_earlier(first, later) -> None:
    headers, req, _ = build(compose(first[2], later[2]))
    refused(first[1], headers, **req)


def test_the_pair_table_covers_every_check() -> None:
    assert {a[0] for a, _ in PAIRS} | {b[0] for _, b in PAIRS} == {c[0] for c in CHECKS}
    assert len(PAIRS) >= 150


# --------------------------------------------------------------------------------------------
# Details of each check
# --------------------------------------------------------------------------------------------


def test_01_fields_combined_with_a_comma_count_as_several() -> None:
    p = make_proof(EC, access_token=TOKEN)
    refused("dpop_multiple", [f"{p}, {p}"])


def test_01_surrounding_whitespace_is_not_part_of_the_value() -> None:
    run([" " + make_proof(EC, access_token=TOKEN) + "\t"])


def test_01_a_value_that_is_not_text_is_malformed() -> None:
    refused("dpop_malformed", [make_proof(EC, access_token=TOKEN).encode()])


def test_01_size_limit_is_configurable() -> None:
    p = make_proof(EC, access_token=TOKEN, claims={"pad": "x" * 300})
    cfg = DPoPConfig(CFG.algorithms, max_proof_bytes=len(p) - 1)
    refused("dpop_too_large", [p], config=cfg)
    run([p], config=DPoPConfig(CFG.algorithms, max_proof_bytes=len(p)))


def _b64json(obj) -> str:
    return b64url_encode(json.dumps(obj).encode())


GOOD_H = _b64json({"typ": "dpop+jwt", "alg": "ES256", "jwk": EC.public_jwk})
GOOD_P = _b64json({"jti": "j", "htm": "GET", "htu": HTU, "iat": NOW, "ath": ath(TOKEN)})
MALFORMED = {
    "empty": "",
    "two-parts": f"{GOOD_H}.{GOOD_P}",
    "four-parts": f"{GOOD_H}.{GOOD_P}.AA.AA",
    "not-base64url": f"{GOOD_H}.{GOOD_P}+/.AA",
    "padding": f"{GOOD_H}.{GOOD_P}=.AA",
    "non-ascii": f"{GOOD_H}.{GOOD_P}é.AA",
    "header-not-json": f"{b64url_encode(b'{nope')}.{GOOD_P}.AA",
    "payload-array": f"{GOOD_H}.{_b64json([1, 2])}.AA",
    "payload-duplicate-member": GOOD_H + "." + b64url_encode(b'{"jti":"a","jti":"b"}') + ".AA",
    "payload-nan": GOOD_H + "." + b64url_encode(b'{"iat":NaN}') + ".AA",
    "header-without-alg": f"{_b64json({'typ': 'dpop+jwt', 'jwk': EC.public_jwk})}.{GOOD_P}.AA",
    "header-alg-not-a-string": f"{_b64json({'typ': 'dpop+jwt', 'alg': 1})}.{GOOD_P}.AA",
    "header-crit": f"{_b64json({'typ': 'dpop+jwt', 'alg': 'ES256', 'crit': ['x'], 'x': 1})}.{GOOD_P}.AA",
}


@pytest.mark.parametrize("value", MALFORMED.values(), ids=MALFORMED.keys())
def test_02_malformed(value: str) -> None:
    refused("dpop_malformed", [value])


@pytest.mark.parametrize("claim", ["jti", "htm", "htu", "iat", "ath"])
def test_03_each_required_claim(claim: str) -> None:
    refused("dpop_missing_claim", [make_proof(EC, access_token=TOKEN, drop=(claim,))])
    refused("dpop_missing_claim", [make_proof(EC, access_token=TOKEN, claims={claim: None})])


def test_03_ath_is_required_only_with_an_access_token() -> None:
    run([make_proof(EC)], access_token=None)
    refused("dpop_missing_claim", [make_proof(EC)], access_token=TOKEN)


@pytest.mark.parametrize("typ", ["JWT", "DPoP+JWT", "application/dpop+jwt", "dpop+jwt ", DROP, 1],
                         ids=["jwt", "case", "media-type", "space", "absent", "number"])
def test_04_typ_is_exactly_dpop_jwt(typ) -> None:
    refused("dpop_wrong_type", [make_proof(EC, access_token=TOKEN, header={"typ": typ})])


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "RS256", "es256", "ES256K", ""])
def test_05_alg_must_be_asymmetric_and_allowed(alg) -> None:
    refused("dpop_alg_not_allowed", [make_proof(EC, access_token=TOKEN, header={"alg": alg})])


def test_05_alg_none_with_an_empty_signature() -> None:
    p = make_proof(EC, access_token=TOKEN, alg="none").rsplit(".", 1)[0] + "."
    refused("dpop_alg_not_allowed", [p])


def test_05_eddsa_and_ps256_are_accepted_when_allowed() -> None:
    for key in (ED, ProofKey.generate("PS256")):
        assert run([make_proof(key, access_token=TOKEN)]).jkt == key.jkt
    refused("dpop_alg_not_allowed", [make_proof(ED, access_token=TOKEN)],
            config=DPoPConfig(frozenset({"ES256"})))


_big_n = (1 << 4200) | 0xFFFF_FFFF_FFFF_FFFF_FFFF_FFFF_FFFF_FFF1
BAD_JWKS = {
    "absent": DROP,
    "not-an-object": "a-key",
    "oct": {"kty": "oct", "k": "c2VjcmV0"},
    "unknown-kty": {"kty": "XYZ"},
    "short-ec-coordinates": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
    "not-on-curve": {"kty": "EC", "crv": "P-256", "x": b64url_encode(b"\x01" * 32),
                     "y": b64url_encode(b"\x02" * 32)},
    "rsa-too-long": {"kty": "RSA", "n": b64url_encode(_big_n.to_bytes(526, "big")), "e": "AQAB"},
    "rsa-too-short": {"kty": "RSA", "n": b64url_encode(((1 << 1024) - 1).to_bytes(128, "big")),
                      "e": "AQAB"},
    "jwk-alg-not-a-string": {**EC.public_jwk, "alg": ["ES256"]},  # was a TypeError in jose
    "jwk-kid-not-a-string": {**EC.public_jwk, "kid": 1},
    "crv-not-a-string": {**EC.public_jwk, "crv": ["P-256"]},
}


@pytest.mark.parametrize("jwk", BAD_JWKS.values(), ids=BAD_JWKS.keys())
def test_06_jwk_must_be_a_usable_public_key(jwk) -> None:
    refused("dpop_bad_jwk", [make_proof(EC, access_token=TOKEN, header={"jwk": jwk})])


def test_06_alg_must_fit_the_key_type_and_the_jwk_alg() -> None:
    refused("dpop_alg_key_mismatch", [make_proof(ED, access_token=TOKEN, alg="ES256")])
    jwk = {**EC.public_jwk, "alg": "ES384"}
    refused("dpop_alg_key_mismatch", [make_proof(EC, access_token=TOKEN, jwk=jwk)])


SIGNATURES = {
    "flipped-bit": {"flip_signature": True},
    "signed-by-another-key": {"sign_with": OTHER},
}


@pytest.mark.parametrize("kw", SIGNATURES.values(), ids=SIGNATURES.keys())
def test_06_signature_must_verify(kw) -> None:
    refused("dpop_bad_signature", [make_proof(EC, access_token=TOKEN, **kw)])


def test_06_zero_ecdsa_signature_and_swapped_payload() -> None:
    h, p, _ = make_proof(EC, access_token=TOKEN).split(".")
    refused("dpop_bad_signature", [f"{h}.{p}.{b64url_encode(bytes(64))}"])
    _, p2, s2 = make_proof(EC, access_token=TOKEN, method="POST").split(".")
    refused("dpop_bad_signature", [f"{h}.{p}.{s2}"])


@pytest.mark.parametrize("key", [EC, ED, ProofKey.generate("PS256")], ids=["EC", "OKP", "RSA"])
def test_07_private_members_in_jwk_are_refused(key: ProofKey) -> None:
    for member, value in key.private_jwk.items():
        if member in key.public_jwk:
            continue
        jwk = {**key.public_jwk, member: value}
        refused("dpop_bad_jwk", [make_proof(key, access_token=TOKEN, jwk=jwk)])


@pytest.mark.parametrize("htm", ["get", "POST", "GET ", 1, ["GET"]])
def test_08_htm_equals_the_method_case_sensitively(htm) -> None:
    refused("dpop_htm_mismatch", [make_proof(EC, access_token=TOKEN, claims={"htm": htm})])


HTU_SAME = [
    "https://api.example.com/orders/42",
    "https://api.example.com/orders/42?page=2",
    "https://api.example.com/orders/42#top",
    "https://api.example.com/orders/42?a=1#b?c",
    "HTTPS://API.Example.COM/orders/42",
    "https://api.example.com:443/orders/42",
    "https://api.example.com:/orders/42",
    "https://api.example.com/%6Frders/42",
    "https://api.example.com/orders/%34%32",
    "https://api.example.com/orders/x/../42",
    "https://api.example.com/./orders/42",
]
HTU_OTHER = [
    "http://api.example.com/orders/42",
    "https://api.example.com:8443/orders/42",
    "https://evil.example.com/orders/42",
    "https://api.example.com.evil.test/orders/42",
    "https://user@api.example.com/orders/42",
    "https://api.example.com/Orders/42",
    "https://api.example.com/orders/42/",
    "https://api.example.com/orders//42",
    "https://api.example.com/orders%2F42",
    "https://api.example.com/orders/4",
    "https://api.example.com",
    "/orders/42",
    "api.example.com/orders/42",
    "ftp://api.example.com/orders/42",
    "https://api.example.com:99999/orders/42",
    "",
]


@pytest.mark.parametrize("claim", HTU_SAME)
def test_09_htu_matches_after_syntax_based_normalisation(claim: str) -> None:
    assert htu_matches(claim, HTU)
    run([make_proof(EC, access_token=TOKEN, htu=claim)])


@pytest.mark.parametrize("claim", HTU_OTHER)
def test_09_htu_mismatch(claim: str) -> None:
    assert not htu_matches(claim, HTU)
    refused("dpop_htu_mismatch", [make_proof(EC, access_token=TOKEN, htu=claim)])


DOT_SEGMENTS = [  # RFC 3986 section 5.2.4 on the htu path
    ("https://h.test/a/b/..", "https://h.test/a/"),
    ("https://h.test/a/.", "https://h.test/a/"),
    ("https://h.test/..", "https://h.test/"),
    ("https://h.test/a//../b", "https://h.test/a/b"),
    ("https://h.test/%2E%2E/a", "https://h.test/a"),
    ("https://h.test", "https://h.test/"),
]


@pytest.mark.parametrize("claim,expected", DOT_SEGMENTS)
def test_09_dot_segments_and_empty_path(claim: str, expected: str) -> None:
    assert htu_matches(claim, expected)


def test_09_htu_must_be_a_string() -> None:
    refused("dpop_htu_mismatch", [make_proof(EC, access_token=TOKEN, htu=["https://x/"])])


REQUEST_URIS = [
    ("https://api.example.com", "/orders/42", "https://api.example.com/orders/42"),
    ("HTTPS://API.Example.com:443/", "/a", "https://api.example.com/a"),
    ("http://h.test:80", "/a?q=1", "http://h.test/a"),
    ("https://h.test:8443", "/%7euser/%2f", "https://h.test:8443/~user/%2F"),
    ("https://[::1]:9443", "/", "https://[::1]:9443/"),
]


@pytest.mark.parametrize("origin,path,uri", REQUEST_URIS)
def test_request_uri_is_origin_plus_normalised_path(origin: str, path: str, uri: str) -> None:
    assert request_uri(origin, path) == uri


@pytest.mark.parametrize("origin", ["api.example.com", "https://u@h.test", "https://h.test/base",
                                    "ftp://h.test", "https://", "https://h.test?x", "https://h.test#f",
                                    "https://h.test:70000"])
def test_public_origin_is_scheme_host_port_only(origin: str) -> None:
    with pytest.raises(InvalidValue):
        normalize_origin(origin)


def test_request_uri_path_must_be_absolute() -> None:
    with pytest.raises(InvalidValue):
        request_uri(ORIGIN, "orders/42")


class Nonces:
    def __init__(self, now: float = NOW) -> None:
        self.issuer = NonceIssuer(SECRET, rotate_s=300)
        self.now = now

    def kw(self) -> dict:
        return {"nonce_check": lambda n: self.issuer.valid(n, self.now),
                "current_nonce": lambda: self.issuer.current(self.now), "now": self.now}


NONCE_REQUIRED = DPoPConfig(CFG.algorithms, require_nonce=True)


def test_10_nonce_required_and_missing() -> None:
    n = Nonces()
    with pytest.raises(DPoPNonceRequired) as info:
        run([make_proof(EC, access_token=TOKEN)], config=NONCE_REQUIRED, **n.kw())
    err = info.value
    assert err.code == "dpop_nonce_required" and err.status == 401
    assert err.challenge() == f'DPoP error="use_dpop_nonce", algs="{ALGS}"'
    assert ("DPoP-Nonce", n.issuer.current(NOW)) in err.extra_headers


def test_10_nonce_required_and_valid() -> None:
    n = Nonces()
    run([make_proof(EC, access_token=TOKEN, nonce=n.issuer.current(NOW))], config=NONCE_REQUIRED,
        **n.kw())


def test_10_nonce_rotated_previous_window_is_still_valid() -> None:
    issued = NonceIssuer(SECRET).current(NOW)
    later = Nonces(NOW + 300)
    assert later.issuer.current(later.now) != issued
    run([make_proof(EC, access_token=TOKEN, nonce=issued, iat=NOW + 300)], config=NONCE_REQUIRED,
        **later.kw())


def test_10_nonce_expired_after_two_windows_gets_a_fresh_one() -> None:
    issued = NonceIssuer(SECRET).current(NOW)
    later = Nonces(NOW + 600)
    with pytest.raises(DPoPNonceRequired) as info:
        run([make_proof(EC, access_token=TOKEN, nonce=issued, iat=NOW + 600)],
            config=NONCE_REQUIRED, **later.kw())
    fresh = dict(info.value.extra_headers)["DPoP-Nonce"]
    assert fresh != issued and later.issuer.valid(fresh, later.now)


def test_10_nonce_checked_when_offered_even_if_not_required() -> None:
    n = Nonces()
    with pytest.raises(DPoPNonceRequired):
        run([make_proof(EC, access_token=TOKEN, nonce="forged")], **n.kw())
    run([make_proof(EC, access_token=TOKEN)], **n.kw())  # not required, none carried
    run([make_proof(EC, access_token=TOKEN, nonce="ignored")])  # no nonces issued here


def test_10_nonce_required_without_an_issuer_is_a_bug_not_an_accept() -> None:
    with pytest.raises(InternalError):
        run([make_proof(EC, access_token=TOKEN, nonce="x")], config=NONCE_REQUIRED)


def test_nonce_issuer_rules() -> None:
    issuer = NonceIssuer(SECRET, rotate_s=60)
    nonce = issuer.current(1000.0)
    assert len(nonce) == 24 and set(nonce) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert issuer.current(1019.0) == nonce  # same window, same nonce (stateless)
    assert NonceIssuer(SECRET, rotate_s=60).current(1000.0) == nonce  # replicas agree
    assert issuer.valid(nonce, 1000.0) and issuer.valid(nonce, 1079.0)
    assert not issuer.valid(nonce, 1140.0)  # two windows later
    assert not issuer.valid(nonce, 900.0)  # not before it was issued
    assert not NonceIssuer(b"z" * 32, rotate_s=60).valid(nonce, 1000.0)
    for junk in ("", "garbage", "é" * 24, nonce[:-1] + "A" if nonce[-1] != "A" else nonce[:-1] + "B"):
        assert not issuer.valid(junk, 1000.0)
    with pytest.raises(ValueError):
        NonceIssuer(b"short")
    with pytest.raises(ValueError):
        NonceIssuer(SECRET, rotate_s=0)


IATS = {
    "oldest-accepted": (NOW - 60, True), "too-old": (NOW - 61, False),
    "future-skew": (NOW + 5, True), "too-far-future": (NOW + 6, False),
    "bool": (True, False), "float": (float(NOW), False), "string": (str(NOW), False),
    "huge": (10 ** 30, False),
}


@pytest.mark.parametrize("iat,ok", IATS.values(), ids=IATS.keys())
def test_11_iat_window_and_type(iat, ok: bool) -> None:
    p = make_proof(EC, access_token=TOKEN, iat=iat)
    if ok:
        assert run([p]).iat == iat
    else:
        refused("dpop_iat_out_of_window", [p])


def test_12_ath_must_hash_the_presented_token() -> None:
    p = make_proof(EC, access_token=TOKEN)
    refused("dpop_ath_mismatch", [p], access_token=TOKEN + "x")
    refused("dpop_ath_mismatch", [p], access_token="tökén")
    refused("dpop_ath_mismatch", [make_proof(EC, access_token=TOKEN, claims={"ath": 1})])


def test_12_ath_from_the_callers_token_digest() -> None:
    """The pipeline passes the verified token's SHA-256 (its fingerprint) instead of having the
    token hashed again: the same ath, and a digest of another token is refused."""
    import hashlib

    p = make_proof(EC, access_token=TOKEN)
    run([p], access_token=TOKEN, token_sha256=hashlib.sha256(TOKEN.encode()).digest())
    refused("dpop_ath_mismatch", [make_proof(EC, access_token=TOKEN)], access_token=TOKEN,
            token_sha256=hashlib.sha256((TOKEN + "x").encode()).digest())


def test_12_ath_without_a_token_is_ignored() -> None:
    """RFC 9449 4.2 requires ath only with an access token; 4.3 item 12 checks it only then."""
    run([make_proof(EC, access_token="some-other-token")], access_token=None)


def test_12_expected_jkt_checks_the_token_key_before_replay() -> None:
    store = MemoryReplayStore()
    p = make_proof(EC, access_token=TOKEN)
    refused("dpop_key_mismatch", [p], replay=store, expected_jkt=OTHER.jkt)
    assert len(store) == 0  # a proof that does not belong to the token is never recorded
    assert run([p], replay=store, expected_jkt=EC.jkt).jkt == EC.jkt


@pytest.mark.parametrize("jti", ["", 7, ["a"], {"a": 1}], ids=["empty", "int", "list", "object"])
def test_13_jti_must_be_a_non_empty_string(jti) -> None:
    refused("dpop_bad_jti", [make_proof(EC, access_token=TOKEN, claims={"jti": jti})])


def test_13_replay_within_the_window() -> None:
    store = MemoryReplayStore()
    p = make_proof(EC, access_token=TOKEN)
    first = run([p], replay=store)
    refused("dpop_replayed", [p], replay=store, now=NOW + 10)
    # recorded until iat + window + skew: exactly as long as check 11 could accept it
    assert store.seen(first.jti_digest, 0, now=NOW + 64.9) is True
    assert store.seen(first.jti_digest, 0, now=NOW + 65) is False


def test_13_after_the_window_the_iat_check_refuses_it() -> None:
    store = MemoryReplayStore()
    p = make_proof(EC, access_token=TOKEN)
    run([p], replay=store)
    refused("dpop_iat_out_of_window", [p], replay=store, now=NOW + 61)


def test_13_the_replay_key_is_per_key_and_per_uri() -> None:
    store = MemoryReplayStore()
    run([make_proof(EC, access_token=TOKEN, jti="same")], replay=store)
    run([make_proof(OTHER, access_token=TOKEN, jti="same")], replay=store)  # another client
    other_htu = request_uri(ORIGIN, "/orders/43")
    run([make_proof(EC, access_token=TOKEN, jti="same", htu=other_htu)], replay=store, htu=other_htu)
    refused("dpop_replayed", [make_proof(EC, access_token=TOKEN, jti="same")], replay=store)


def test_13_a_refused_proof_does_not_spend_its_jti() -> None:
    store = MemoryReplayStore()
    refused("dpop_htm_mismatch", [make_proof(EC, access_token=TOKEN, jti="j1")], replay=store,
            method="POST")
    run([make_proof(EC, access_token=TOKEN, jti="j1")], replay=store)


def test_13_full_replay_store_fails_closed_with_503() -> None:
    store = MemoryReplayStore(max_entries=1)
    run([make_proof(EC, access_token=TOKEN)], replay=store)
    with pytest.raises(DPoPReplayStoreFull) as info:
        run([make_proof(EC, access_token=TOKEN)], replay=store)
    err = info.value
    assert isinstance(err, ServiceUnavailable) and err.status == 503
    assert err.code == "dpop_replay_store_full"


def test_13_jti_with_a_lone_surrogate_is_hashed_not_crashed() -> None:
    run([make_proof(EC, access_token=TOKEN, jti="\ud800")])


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"algorithms": frozenset()}, {"algorithms": frozenset({"HS256"})},
                                {"algorithms": frozenset({"none"})}, {"algorithms": "ES256"},
                                {"iat_window_s": 0}, {"iat_future_s": -1}, {"max_proof_bytes": 10},
                                {"require_nonce": "yes"}])
def test_config_is_validated_at_load(kw: dict) -> None:
    with pytest.raises(ConfigError):
        DPoPConfig(**{"algorithms": frozenset({"ES256"}), **kw})


def test_config_advertises_sorted_algs() -> None:
    assert DPoPConfig(frozenset({"PS256", "EdDSA", "ES256"})).algs == "ES256 EdDSA PS256"


# --------------------------------------------------------------------------------------------
# Binding (RFC 9449 section 7, RFC 8705 section 3)
# --------------------------------------------------------------------------------------------

CERT = hashlib.sha256(b"leaf certificate DER").digest()
OTHER_CERT = hashlib.sha256(b"another certificate").digest()


def claims(jkt: str | None = None, x5t: str | None = None) -> TokenClaims:
    return TokenClaims(issuer="https://as.example.com", subject="alice", audience=("api",),
                       expires_at=NOW + 300, fingerprint="00" * 32, cnf_jkt=jkt, cnf_x5t_s256=x5t)


def proof_for(key: ProofKey) -> DPoPProof:
    return DPoPProof(jkt=key.jkt, jti_digest=b"\x00" * 32, iat=NOW, fingerprint="ab" * 32)


def bind(c, scheme, proof=None, cert=CERT, required="any") -> Binding:
    return check_binding(c, scheme, proof, cert, required, ALGS)


def refused_binding(code: str, *args, **kw) -> TokenError:
    with pytest.raises(TokenError) as info:
        bind(*args, **kw)
    assert info.value.code == code, info.value.detail
    assert info.value.status == 401
    return info.value


def test_no_token_is_binding_none() -> None:
    assert bind(None, None, required="dpop") == Binding("none")


def test_dpop_bound_token_with_its_proof() -> None:
    proof = proof_for(EC)
    b = bind(claims(jkt=EC.jkt), "DPoP", proof)
    assert b == Binding("dpop", jkt=EC.jkt, proof_fingerprint=proof.fingerprint)
    assert bind(claims(jkt=EC.jkt), "dpop", proof).kind == "dpop"  # auth-scheme has no case


def test_dpop_bound_token_presented_as_bearer() -> None:
    err = refused_binding("dpop_bound_token_as_bearer", claims(jkt=EC.jkt), "Bearer", proof_for(EC))
    assert err.challenge() == f'DPoP error="invalid_token", algs="{ALGS}"'


def test_dpop_bound_token_without_a_proof() -> None:
    refused_binding("dpop_missing", claims(jkt=EC.jkt), "DPoP", None)


def test_dpop_bound_token_with_another_key() -> None:
    refused_binding("dpop_key_mismatch", claims(jkt=EC.jkt), "DPoP", proof_for(OTHER))


def test_malformed_cnf_is_the_token_layers_job_and_here_never_matches() -> None:
    """`tokens` refuses a malformed `cnf`; should one reach this point it fails closed."""
    refused_binding("dpop_key_mismatch", claims(jkt="not-a-thumbprint"), "DPoP", proof_for(EC))


def test_dpop_scheme_with_an_unbound_token() -> None:
    refused_binding("dpop_token_not_bound", claims(), "DPoP", proof_for(EC))
    refused_binding("dpop_token_not_bound", claims(x5t=b64url_encode(CERT)), "DPoP", proof_for(EC))


def test_mtls_bound_token_on_its_connection() -> None:
    assert bind(claims(x5t=b64url_encode(CERT)), "Bearer") == Binding("mtls")


@pytest.mark.parametrize("cert", [OTHER_CERT, None], ids=["other-cert", "no-cert"])
def test_mtls_bound_token_on_another_connection(cert) -> None:
    refused_binding("mtls_binding_mismatch", claims(x5t=b64url_encode(CERT)), "Bearer", cert=cert)


def test_token_bound_both_ways_must_satisfy_both() -> None:
    c = claims(jkt=EC.jkt, x5t=b64url_encode(CERT))
    assert bind(c, "DPoP", proof_for(EC), required="mtls").kind == "dpop"
    refused_binding("mtls_binding_mismatch", c, "DPoP", proof_for(EC), cert=OTHER_CERT)


REQUIRED = [  # token kind, route requirement, accepted
    ("dpop", "dpop", True), ("dpop", "mtls", False), ("dpop", "any", True), ("dpop", "none", True),
    ("mtls", "dpop", False), ("mtls", "mtls", True), ("mtls", "any", True), ("mtls", "none", True),
    ("bearer", "dpop", False), ("bearer", "mtls", False), ("bearer", "any", False),
    ("bearer", "none", True),
]


@pytest.mark.parametrize("kind,required,ok", REQUIRED, ids=[f"{k}-on-{r}" for k, r, _ in REQUIRED])
def test_route_binding_requirement(kind: str, required: str, ok: bool) -> None:
    c, scheme, proof = {"dpop": (claims(jkt=EC.jkt), "DPoP", proof_for(EC)),
                        "mtls": (claims(x5t=b64url_encode(CERT)), "Bearer", None),
                        "bearer": (claims(), "Bearer", None)}[kind]
    if ok:
        assert bind(c, scheme, proof, required=required).kind == kind
    else:
        err = refused_binding("binding_required", c, scheme, proof, required=required)
        if required == "mtls":
            assert err.challenge() == 'Bearer error="invalid_token"'
        else:
            assert err.challenge() == f'DPoP error="invalid_token", algs="{ALGS}"'


def test_unknown_route_requirement_is_a_bug() -> None:
    with pytest.raises(InternalError):
        bind(claims(), "Bearer", required="sometimes")


# --------------------------------------------------------------------------------------------
# Property: nothing but DPoPError / ServiceUnavailable, whatever the header text
# --------------------------------------------------------------------------------------------

ALLOWED = (DPoPError, ServiceUnavailable)
b64ish = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=40)
jws_like = st.builds(lambda a, b, c: f"{a}.{b}.{c}", b64ish, b64ish, b64ish)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=200), jws_like,
                          st.sampled_from(list(MALFORMED.values()))), max_size=3),
       st.one_of(st.none(), st.text(max_size=20)), st.booleans())
def test_arbitrary_header_text_only_raises_dpop_errors(headers, token, with_nonces) -> None:
    kw = Nonces().kw() if with_nonces else {}
    try:
        run(headers, access_token=token, **kw)
    except ALLOWED:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6)
header_members = st.dictionaries(
    st.sampled_from(["typ", "alg", "jwk", "crit", "kid", "x5c"]),
    json_values | st.sampled_from(["dpop+jwt", "ES256", "EdDSA", "none", "HS256"])
    | st.just(EC.private_jwk) | st.just({**ED.public_jwk, "d": "AA"}), max_size=3)
claim_members = st.dictionaries(
    st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce"]),
    json_values | st.sampled_from([NOW, NOW - 100, "GET", HTU, HTU.upper(), ath(TOKEN), "\ud800"]),
    max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_members, claim_members, st.booleans(), st.booleans(), st.integers(1, 2))
def test_signed_proofs_with_arbitrary_members_only_raise_dpop_errors(
        header, claim_overrides, with_token, with_nonces, store_size) -> None:
    p = make_proof(EC, access_token=TOKEN, header=header, claims=claim_overrides)
    kw = Nonces().kw() if with_nonces else {}
    store = MemoryReplayStore(max_entries=store_size)
    try:
        for _ in range(2):
            run([p], access_token=TOKEN if with_token else None, replay=store, **kw)
    except ALLOWED:
        pass
