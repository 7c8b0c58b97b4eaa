"""Trust bundles (SPIFFE_Trust_Domain_and_Bundle.md sections 3-4, X509-SVID.md section 6) and the
trust store."""

from __future__ import annotations

import base64
import json
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.core.spiffe import (
    TrustBundle,
    TrustStore,
    parse_bundle,
    parse_pem_bundle,
    parse_spiffe_bundle,
    verify_svid_chain,
)
from proxy.dev.ca import DevCA, write_spiffe_bundle_json
from proxy.errors import InvalidValue

NOW = 1_800_000_000.0

# An interop vector: go-spiffe v2/bundle/spiffebundle/testdata/spiffebundle_valid_1.json
# (a P-384 CA for spiffe://local and one P-256 jwt-svid key), as published by that project.
GO_SPIFFE_X5C = (
    "MIIBzDCCAVOgAwIBAgIJAJM4DhRH0vmuMAoGCCqGSM49BAMEMB4xCzAJBgNVBAYTAlVTMQ8wDQYDVQQKDAZTUElGRkUw"
    "HhcNMTgwNTEzMTkzMzQ3WhcNMjMwNTEyMTkzMzQ3WjAeMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGU1BJRkZFMHYwEAYH"
    "KoZIzj0CAQYFK4EEACIDYgAEWjB+nSGSxIYiznb84xu5WGDZj80nL7W1c3zf48Why0ma7Y7mCBKzfQkrgDguI4j0Z+0/"
    "tDH/r8gtOtLLrIpuMwWHoe4vbVBFte1vj6Xt6WeE8lXwcCvLs/mcmvPqVK9jo10wWzAdBgNVHQ4EFgQUh6XzV6LwNazA"
    "+GTEVOdu07o5yOgwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwGQYDVR0RBBIwEIYOc3BpZmZlOi8vbG9j"
    "YWwwCgYIKoZIzj0EAwQDZwAwZAIwE4Me13qMC9i6Fkx0h26y09QZIbuRqA9puLg9AeeAAyo5tBzRl1YL0KNEp02VKSYJ"
    "AjBdeJvqjJ9wW55OGj1JQwDFD7kWeEB6oMlwPbI/5hEY3azJi16I0uN1JSYTSWGSqWc="
)
GO_SPIFFE_X509_KEY = {
    "use": "x509-svid", "kty": "EC", "crv": "P-384",
    "x": "WjB-nSGSxIYiznb84xu5WGDZj80nL7W1c3zf48Why0ma7Y7mCBKzfQkrgDguI4j0",
    "y": "Z-0_tDH_r8gtOtLLrIpuMwWHoe4vbVBFte1vj6Xt6WeE8lXwcCvLs_mcmvPqVK9j",
    "x5c": [GO_SPIFFE_X5C],
}
GO_SPIFFE_JWT_KEY = {
    "use": "jwt-svid", "kty": "EC", "kid": "C6vs25welZOx6WksNYfbMfiw9l96pMnD", "crv": "P-256",
    "x": "ngLYQnlfF6GsojUwqtcEE3WgTNG2RUlsGhK73RNEl5k",
    "y": "tKbiDSUSsQ3F1P7wteeHNXIcU-cx6CgSbroeQrQHTLM",
}


def _doc(*keys: dict, **extra) -> bytes:
    return json.dumps({"keys": list(keys), **extra}).encode()


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create("a.test", now=NOW)


# --------------------------------------------------------------------------------------------
# PEM bundles
# --------------------------------------------------------------------------------------------


def test_pem_bundle(ca: DevCA) -> None:
    bundle = parse_pem_bundle("a.test", ca.bundle_pem())
    assert bundle.trust_domain == "a.test"
    assert bundle.x509_authorities == (ca.cert,)
    assert dict(bundle.jwt_authorities) == {}


def test_pem_bundle_with_two_roots_and_text_around(ca: DevCA) -> None:
    other = DevCA.create("a.test", now=NOW)
    data = b"# rotation\n" + ca.bundle_pem() + b"comment\n" + other.bundle_pem() + ca.bundle_pem()
    bundle = parse_pem_bundle("a.test", data)
    assert bundle.x509_authorities == (ca.cert, other.cert)  # duplicates dropped, order kept


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no parseable certificate"),
        (b"garbage", "no parseable certificate"),
        (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
         "no parseable certificate"),
    ],
    ids=["empty", "garbage", "bad_der"],
)
def test_pem_bundle_refused(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidValue, match=reason):
        parse_pem_bundle("a.test", data)


def test_pem_bundle_with_a_leaf_is_refused(ca: DevCA) -> None:
    leaf = ca.issue_svid("spiffe://a.test/web", now=NOW).cert.public_bytes(
        serialization.Encoding.PEM)
    with pytest.raises(InvalidValue, match=r"certificate \[1\]: not a CA"):
        parse_pem_bundle("a.test", ca.bundle_pem() + leaf)


def test_pem_bundle_with_a_ca_lacking_key_cert_sign_is_refused(ca: DevCA) -> None:
    inter = ca.intermediate(now=NOW, key_cert_sign=False)
    with pytest.raises(InvalidValue, match="without keyCertSign"):
        parse_pem_bundle("a.test", inter.cert.public_bytes(serialization.Encoding.PEM))


def test_bundle_for_an_invalid_trust_domain_is_refused(ca: DevCA) -> None:
    with pytest.raises(InvalidValue, match="trust domain"):
        parse_pem_bundle("A.test", ca.bundle_pem())


# --------------------------------------------------------------------------------------------
# SPIFFE bundles (JWK Sets)
# --------------------------------------------------------------------------------------------


def test_spiffe_bundle_from_go_spiffe() -> None:
    bundle = parse_spiffe_bundle("local", _doc(GO_SPIFFE_X509_KEY, GO_SPIFFE_JWT_KEY))
    assert len(bundle.x509_authorities) == 1
    assert bundle.x509_authorities[0].public_bytes(serialization.Encoding.DER) == \
        base64.b64decode(GO_SPIFFE_X5C)
    assert set(bundle.jwt_authorities) == {"C6vs25welZOx6WksNYfbMfiw9l96pMnD"}
    assert bundle.jwt_authorities["C6vs25welZOx6WksNYfbMfiw9l96pMnD"]["crv"] == "P-256"
    assert bundle.sequence is None and bundle.refresh_hint_s is None


def test_spiffe_bundle_written_by_dev_ca_verifies_svids(ca: DevCA) -> None:
    jwt_key = DevCA.create("a.test", now=NOW).key.public_key()
    data = write_spiffe_bundle_json([ca], sequence=7, refresh_hint_s=300,
                                    jwt_keys={"k1": jwt_key})
    bundle = parse_bundle("a.test", data, "spiffe")
    assert bundle.x509_authorities == (ca.cert,)
    assert bundle.sequence == 7 and bundle.refresh_hint_s == 300
    assert bundle.jwt_authorities["k1"]["kty"] == "EC"
    svid = ca.intermediate(now=NOW).issue_svid("spiffe://a.test/web", now=NOW)
    identity = verify_svid_chain(svid.chain_der(), TrustStore.of([bundle]), NOW)
    assert identity.uri == "spiffe://a.test/web"


@pytest.mark.parametrize(
    "ignored",
    [
        {"use": "x509-svid-v2", "kty": "EC", "x5c": ["AAAA"]},  # unknown use (section 4.2.2)
        {"kty": "EC", "kid": "no-use"},  # missing use: not an SVID type we know
        {"use": "x509-svid", "kty": "PQC", "x5c": ["AAAA"]},  # unknown key type (4.2.1)
        {"use": "jwt-svid", "kty": "future", "kid": "k"},
    ],
    ids=["unknown_use", "missing_use", "unknown_kty_x509", "unknown_kty_jwt"],
)
def test_spiffe_bundle_ignores_entries_it_does_not_know(ignored: dict) -> None:
    bundle = parse_spiffe_bundle("local", _doc(ignored, GO_SPIFFE_X509_KEY))
    assert len(bundle.x509_authorities) == 1
    assert dict(bundle.jwt_authorities) == {}


def _leaf_x5c(ca: DevCA) -> str:
    der = ca.issue_svid("spiffe://a.test/w", now=NOW).cert.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ca: b"", "not JSON"),
        (lambda ca: b"\xff\xfe garbage", "not JSON"),
        (lambda ca: b"[]", "JSON object"),
        (lambda ca: b"{}", "keys array"),
        (lambda ca: b'{"keys": {}}', "keys array"),
        (lambda ca: _doc(), "no x509-svid authorities"),
        (lambda ca: _doc(GO_SPIFFE_JWT_KEY), "no x509-svid authorities"),
        (lambda ca: _doc("not an object"), r"keys\[0\] must be a JSON object"),
        (lambda ca: _doc({**GO_SPIFFE_X509_KEY, "x5c": []}), "exactly one x5c"),
        (lambda ca: _doc({**GO_SPIFFE_X509_KEY, "x5c": [GO_SPIFFE_X5C] * 2}), "exactly one x5c"),
        (lambda ca: _doc({k: v for k, v in GO_SPIFFE_X509_KEY.items() if k != "x5c"}),
         "exactly one x5c"),
        (lambda ca: _doc({**GO_SPIFFE_X509_KEY, "x5c": ["%%%"]}), "does not parse"),
        (lambda ca: _doc({**GO_SPIFFE_X509_KEY, "x5c": ["AAAA"]}), "does not parse"),
        (lambda ca: _doc({**GO_SPIFFE_X509_KEY, "x5c": [_leaf_x5c(ca)]}), "not a CA"),
        (lambda ca: _doc({k: v for k, v in GO_SPIFFE_X509_KEY.items() if k != "kty"}),
         "kty must be set"),
        (lambda ca: _doc(GO_SPIFFE_X509_KEY, {**GO_SPIFFE_JWT_KEY, "kid": ""}), "must have a kid"),
        (lambda ca: _doc(GO_SPIFFE_X509_KEY, {k: v for k, v in GO_SPIFFE_JWT_KEY.items()
                                              if k != "kid"}), "must have a kid"),
        (lambda ca: _doc(GO_SPIFFE_X509_KEY, GO_SPIFFE_JWT_KEY, GO_SPIFFE_JWT_KEY),
         "duplicate jwt-svid kid"),
        (lambda ca: _doc(GO_SPIFFE_X509_KEY, spiffe_sequence=-1), "spiffe_sequence"),
        (lambda ca: _doc(GO_SPIFFE_X509_KEY, spiffe_sequence="1"), "spiffe_sequence"),
        (lambda ca: _doc(GO_SPIFFE_X509_KEY, spiffe_refresh_hint=True), "spiffe_refresh_hint"),
        (lambda ca: _doc(GO_SPIFFE_X509_KEY, spiffe_refresh_hint=1.5), "spiffe_refresh_hint"),
    ],
    ids=["empty", "garbage", "array", "no_keys", "keys_not_array", "no_entries", "jwt_only",
         "entry_not_object", "x5c_empty", "x5c_two", "x5c_missing", "x5c_not_base64",
         "x5c_not_der", "x5c_leaf", "kty_missing", "kid_empty", "kid_missing", "kid_duplicate",
         "sequence_negative", "sequence_string", "refresh_hint_bool", "refresh_hint_float"],
)
def test_spiffe_bundle_refused(ca: DevCA, make, reason: str) -> None:
    with pytest.raises(InvalidValue, match=reason):
        parse_spiffe_bundle("local", make(ca))


def test_parse_bundle_refuses_an_unknown_format(ca: DevCA) -> None:
    with pytest.raises(InvalidValue, match="pem or spiffe"):
        parse_bundle("a.test", ca.bundle_pem(), "der")  # type: ignore[arg-type]


def test_bundle_values_are_frozen() -> None:
    bundle = parse_spiffe_bundle("local", _doc(GO_SPIFFE_X509_KEY, GO_SPIFFE_JWT_KEY))
    with pytest.raises(TypeError):
        bundle.jwt_authorities["x"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        bundle.jwt_authorities["C6vs25welZOx6WksNYfbMfiw9l96pMnD"]["kty"] = "RSA"  # type: ignore


def test_trust_bundle_needs_an_x509_authority() -> None:
    with pytest.raises(InvalidValue, match="no X.509 authorities"):
        TrustBundle("a.test", ())


# --------------------------------------------------------------------------------------------
# The trust store
# --------------------------------------------------------------------------------------------


def test_roots_pem_is_the_union_and_loads_into_openssl(ca: DevCA) -> None:
    other = DevCA.create("b.test", now=NOW)
    store = TrustStore.of([parse_pem_bundle("a.test", ca.bundle_pem()),
                           parse_pem_bundle("b.test", other.bundle_pem() + ca.bundle_pem())])
    pem = store.roots_pem()
    assert [c.subject for c in x509.load_pem_x509_certificates(pem.encode())] == \
        [ca.cert.subject, other.cert.subject]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_verify_locations(cadata=pem)
    assert context.cert_store_stats()["x509_ca"] == 2


def test_store_key_must_name_the_bundle_domain(ca: DevCA) -> None:
    with pytest.raises(InvalidValue, match="holds the bundle of"):
        TrustStore({"b.test": parse_pem_bundle("a.test", ca.bundle_pem())}, version=1)


def test_store_refuses_two_bundles_for_one_domain(ca: DevCA) -> None:
    bundle = parse_pem_bundle("a.test", ca.bundle_pem())
    with pytest.raises(InvalidValue, match="two bundles"):
        TrustStore.of([bundle, bundle])


def test_store_is_frozen(ca: DevCA) -> None:
    store = TrustStore.of([parse_pem_bundle("a.test", ca.bundle_pem())], version=3)
    assert store.version == 3
    with pytest.raises(TypeError):
        store.bundles["b.test"] = store.bundles["a.test"]  # type: ignore[index]
