"""X.509-SVID verification (X509-SVID.md sections 2-5, bundle spec section 3) and the own SVID.

Every rule `verify_svid_chain` enforces has one negative case in `CASES`, named by its stable code.
Certificates are real, minted by `proxy.dev.ca` at a fixed `NOW`; nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.core.spiffe import (
    CODES,
    MAX_PRESENTED_CERTS,
    PeerCertificates,
    TrustBundle,
    TrustStore,
    load_own_svid,
    parse_pem_bundle,
    verify_peer,
    verify_svid_chain,
)
from proxy.dev.ca import DevCA, DevSvid
from proxy.errors import InvalidValue, PeerIdentityError

NOW = 1_800_000_000.0
DAY = 86400


@dataclass
class World:
    a: DevCA  # root of a.test
    b: DevCA  # root of b.test (federated)
    store: TrustStore


@pytest.fixture(scope="module")
def world() -> World:
    a = DevCA.create("a.test", now=NOW)
    b = DevCA.create("b.test", now=NOW)
    store = TrustStore.of([parse_pem_bundle("a.test", a.bundle_pem()),
                           parse_pem_bundle("b.test", b.bundle_pem())], version=1)
    return World(a, b, store)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _t(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def _raw_cert(subject: str, issuer: str | x509.Name, public_key, signing_key, *, ca: bool,
              uri: str | None = None,
              extra: x509.ExtensionType | None = None) -> x509.Certificate:
    """A certificate built by hand, for shapes `DevCA` deliberately cannot make."""
    ku = x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)
    if isinstance(issuer, str):
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(_t(NOW - 60)).not_valid_after(_t(NOW + 3600))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
               .add_extension(ku, True))
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    if extra is not None:
        builder = builder.add_extension(extra, True)
    return builder.sign(signing_key, hashes.SHA256())


def _critical_extension_leaf(w: World) -> tuple[bytes, ...]:
    key = ec.generate_private_key(ec.SECP256R1())
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    leaf = _raw_cert("leaf", w.a.cert.subject, key.public_key(), w.a.key, ca=False,
                     uri="spiffe://a.test/web", extra=unknown)
    return (_der(leaf),)


def _self_signed_leaf() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return _raw_cert("me", "me", key.public_key(), key, ca=False, uri="spiffe://a.test/web")


def _loop_chain(w: World) -> tuple[bytes, ...]:
    """X issued by Y and Y issued by X: a path search must not go round forever."""
    kx, ky = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    x = _raw_cert("X", "Y", kx.public_key(), ky, ca=True)
    y = _raw_cert("Y", "X", ky.public_key(), kx, ca=True)
    leaf = DevCA("a.test", kx, x).issue_svid("spiffe://a.test/web", now=NOW)
    return (_der(leaf.cert), _der(x), _der(y), _der(x), _der(y))


def _deep(w: World, levels: int) -> DevSvid:
    ca = w.a
    for _ in range(levels):
        ca = ca.intermediate(now=NOW)
    return ca.issue_svid("spiffe://a.test/deep", now=NOW)


Case = Callable[[World], tuple[bytes, ...]]


def chain(make: Callable[[World], DevSvid]) -> Case:
    return lambda w: make(w).chain_der()


# (id, chain builder, expected code or None for accepted)
CASES: list[tuple[str, Case, str | None]] = [
    ("valid", chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW)), None),
    ("valid_client_eku_only",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, eku=("client",))), None),
    ("valid_no_eku", chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, eku=None)),
     None),
    ("valid_any_eku", chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW,
                                                     eku=("2.5.29.37.0",))), None),
    ("federated_domain_accepted", chain(lambda w: w.b.issue_svid("spiffe://b.test/api", now=NOW)),
     None),
    ("intermediate_chain_accepted",
     chain(lambda w: w.a.intermediate(now=NOW).intermediate(now=NOW)
           .issue_svid("spiffe://a.test/web", now=NOW)), None),
    ("path_len_zero_above_leaf_accepted",
     chain(lambda w: w.a.intermediate(now=NOW, path_length=0)
           .issue_svid("spiffe://a.test/web", now=NOW)), None),
    ("name_constraint_permits_domain",
     chain(lambda w: w.a.intermediate(now=NOW, permitted_uri_domains=["a.test"])
           .issue_svid("spiffe://a.test/web", now=NOW)), None),
    ("root_presented_by_peer_accepted",
     lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW).chain_der() + (_der(w.a.cert),),
     None),
    # --- transport / parsing
    ("peer_certificate_missing", lambda w: (), "peer_certificate_missing"),
    ("svid_malformed", lambda w: (b"\x30\x03\x02\x01\x01",), "svid_malformed"),
    ("svid_malformed_in_chain",
     lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW).chain_der() + (b"junk",),
     "svid_malformed"),
    ("svid_chain_too_long",
     lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW).chain_der()
     + (_der(w.a.cert),) * MAX_PRESENTED_CERTS, "svid_chain_too_long"),
    # --- leaf rules (X509-SVID sections 2, 3.1, 4.1, 4.3, 4.4, 5.2)
    ("svid_no_uri_san", chain(lambda w: w.a.issue_svid(None, now=NOW)), "svid_no_uri_san"),
    ("svid_multiple_uri_sans",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW,
                                    extra_uris=("spiffe://a.test/other",))),
     "svid_multiple_uri_sans"),
    ("svid_multiple_uri_sans_mixed",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW,
                                    extra_uris=("https://a.test/web",))),
     "svid_multiple_uri_sans"),
    ("svid_invalid_spiffe_id_non_spiffe_uri",
     chain(lambda w: w.a.issue_svid(None, now=NOW, extra_uris=("https://a.test/web",))),
     "svid_invalid_spiffe_id"),
    ("svid_invalid_spiffe_id_bad_syntax",
     chain(lambda w: w.a.issue_svid(None, now=NOW, extra_uris=("spiffe://A.test/web",))),
     "svid_invalid_spiffe_id"),
    ("svid_invalid_spiffe_id_root_path",
     chain(lambda w: w.a.issue_svid(None, now=NOW, extra_uris=("spiffe://a.test",))),
     "svid_invalid_spiffe_id"),
    ("svid_leaf_is_ca", chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW,
                                                       is_ca=True)), "svid_leaf_is_ca"),
    ("svid_missing_digital_signature",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, digital_signature=False)),
     "svid_missing_digital_signature"),
    ("svid_missing_key_usage",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, key_usage=False)),
     "svid_missing_digital_signature"),
    ("svid_leaf_key_cert_sign",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, key_cert_sign=True)),
     "svid_leaf_cert_sign"),
    ("svid_leaf_crl_sign",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, crl_sign=True)),
     "svid_leaf_cert_sign"),
    ("svid_eku_no_client_auth",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, eku=("server",))),
     "svid_eku_no_client_auth"),
    ("svid_unhandled_critical_extension", _critical_extension_leaf,
     "svid_unhandled_critical_extension"),
    # --- validity at the injected now
    ("svid_expired", chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW - 7200,
                                                    ttl_s=3600)), "svid_expired"),
    ("svid_not_yet_valid",
     chain(lambda w: w.a.issue_svid("spiffe://a.test/web", now=NOW, not_before=NOW + 600)),
     "svid_not_yet_valid"),
    ("svid_expired_intermediate",
     chain(lambda w: w.a.intermediate(now=NOW - 10 * DAY, ttl_s=DAY)
           .issue_svid("spiffe://a.test/web", now=NOW)), "svid_expired"),
    # --- trust domain selection (section 5.2, bundle spec section 3)
    ("svid_unknown_trust_domain",
     chain(lambda w: w.a.issue_svid(None, now=NOW, extra_uris=("spiffe://c.test/web",))),
     "svid_unknown_trust_domain"),
    ("ca_of_a_vouching_for_b",
     chain(lambda w: w.a.issue_svid(None, now=NOW, extra_uris=("spiffe://b.test/web",))),
     "svid_untrusted"),
    ("ca_of_b_vouching_for_a_with_its_root_presented",
     lambda w: w.b.issue_svid(None, now=NOW, extra_uris=("spiffe://a.test/web",)).chain_der()
     + (_der(w.b.cert),), "svid_untrusted"),
    # --- path building
    ("missing_intermediate",
     lambda w: w.a.intermediate(now=NOW).issue_svid("spiffe://a.test/web", now=NOW)
     .chain_der()[:1], "svid_untrusted"),
    ("svid_intermediate_not_ca",
     chain(lambda w: w.a.intermediate(now=NOW, is_ca=False)
           .issue_svid("spiffe://a.test/web", now=NOW)), "svid_intermediate_not_ca"),
    ("intermediate_without_key_cert_sign",
     chain(lambda w: w.a.intermediate(now=NOW, key_cert_sign=False)
           .issue_svid("spiffe://a.test/web", now=NOW)), "svid_intermediate_not_ca"),
    ("svid_path_length_exceeded",
     chain(lambda w: w.a.intermediate(now=NOW, path_length=0).intermediate(now=NOW)
           .issue_svid("spiffe://a.test/web", now=NOW)), "svid_path_length_exceeded"),
    ("svid_name_constraint_violation",
     chain(lambda w: w.a.intermediate(now=NOW, permitted_uri_domains=[".a.test"])
           .issue_svid("spiffe://a.test/web", now=NOW)), "svid_name_constraint_violation"),
    ("deepest_path_accepted", chain(lambda w: _deep(w, 6)), None),
    ("svid_path_too_long", chain(lambda w: _deep(w, 7)), "svid_path_too_long"),
    ("bad_signature_same_issuer_name",
     chain(lambda w: DevCA.create("a.test", now=NOW, common_name="a.test root")
           .issue_svid("spiffe://a.test/web", now=NOW)), "svid_untrusted"),
    ("self_signed_leaf", lambda w: (_der(_self_signed_leaf()),), "svid_untrusted"),
    ("issuer_loop", _loop_chain, "svid_untrusted"),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verify_svid_chain(world: World, make: Case, expected: str | None) -> None:
    chain_der = make(world)
    if expected is None:
        identity = verify_svid_chain(chain_der, world.store, NOW)
        assert identity.uri == str(identity.spiffe_id)
        assert identity.cert_sha256 == hashlib.sha256(chain_der[0]).digest()
    else:
        assert expected in CODES
        with pytest.raises(PeerIdentityError) as info:
            verify_svid_chain(chain_der, world.store, NOW)
        assert info.value.code == expected
        assert info.value.status == 403


def test_every_code_has_a_negative_case() -> None:
    covered = {c[2] for c in CASES}
    assert set(CODES) <= covered


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_key_types(key_type: str) -> None:
    ca = DevCA.create("k.test", now=NOW, key_type=key_type)
    store = TrustStore.of([parse_pem_bundle("k.test", ca.bundle_pem())])
    svid = ca.intermediate(now=NOW, key_type=key_type).issue_svid(
        "spiffe://k.test/w", now=NOW, key_type=key_type)
    assert verify_svid_chain(svid.chain_der(), store, NOW).uri == "spiffe://k.test/w"


def test_identity_window_is_the_intersection_of_the_path(world: World) -> None:
    inter = world.a.intermediate(now=NOW, ttl_s=1800)
    svid = inter.issue_svid("spiffe://a.test/web", now=NOW, ttl_s=3600, not_before=NOW - 10)
    identity = verify_svid_chain(svid.chain_der(), world.store, NOW)
    assert identity.not_after == inter.cert.not_valid_after_utc.timestamp() == NOW + 1800
    assert identity.not_before == NOW - 10  # the leaf starts last
    assert identity.spiffe_id.trust_domain == "a.test" and identity.spiffe_id.path == "/web"


def test_validity_bounds_are_inclusive(world: World) -> None:
    svid = world.a.issue_svid("spiffe://a.test/web", now=NOW, ttl_s=3600, not_before=NOW)
    verify_svid_chain(svid.chain_der(), world.store, NOW)
    verify_svid_chain(svid.chain_der(), world.store, NOW + 3600)
    with pytest.raises(PeerIdentityError, match="svid_expired"):
        verify_svid_chain(svid.chain_der(), world.store, NOW + 3601)
    with pytest.raises(PeerIdentityError, match="svid_not_yet_valid"):
        verify_svid_chain(svid.chain_der(), world.store, NOW - 1)


def test_expired_root_fails_the_path() -> None:
    root = DevCA.create("old.test", now=NOW - 40 * DAY, ttl_s=30 * DAY)
    store = TrustStore.of([parse_pem_bundle("old.test", root.bundle_pem())])
    svid = root.issue_svid("spiffe://old.test/w", now=NOW)
    with pytest.raises(PeerIdentityError) as info:
        verify_svid_chain(svid.chain_der(), store, NOW)
    assert info.value.code == "svid_expired"


def test_a_leaf_in_the_bundle_is_not_trusted_by_itself(world: World) -> None:
    svid = world.a.issue_svid("spiffe://a.test/web", now=NOW)
    store = TrustStore.of([TrustBundle("a.test", (svid.cert,))])
    with pytest.raises(PeerIdentityError) as info:
        verify_svid_chain(svid.chain_der(), store, NOW)
    assert info.value.code == "svid_untrusted"


def test_a_self_signed_leaf_in_the_bundle_is_not_trusted_by_itself() -> None:
    leaf = _self_signed_leaf()
    store = TrustStore.of([TrustBundle("a.test", (leaf,))])
    with pytest.raises(PeerIdentityError) as info:
        verify_svid_chain((_der(leaf),), store, NOW)
    assert info.value.code == "svid_untrusted"


def test_each_domain_only_through_its_own_bundle(world: World) -> None:
    """Both roots are trusted, but each only for its own trust domain."""
    ok_a = world.a.issue_svid("spiffe://a.test/x", now=NOW)
    ok_b = world.b.issue_svid("spiffe://b.test/x", now=NOW)
    assert verify_svid_chain(ok_a.chain_der(), world.store, NOW).uri == "spiffe://a.test/x"
    assert verify_svid_chain(ok_b.chain_der(), world.store, NOW).uri == "spiffe://b.test/x"
    only_a = TrustStore.of([world.store.bundles["a.test"]], version=2)
    with pytest.raises(PeerIdentityError) as info:
        verify_svid_chain(ok_b.chain_der(), only_a, NOW)
    assert info.value.code == "svid_unknown_trust_domain"


def test_rotated_root_with_same_name_is_found(world: World) -> None:
    """Two authorities with one subject name (root rotation): the one that signed is used."""
    old = DevCA.create("r.test", now=NOW, common_name="r.test root")
    new = DevCA.create("r.test", now=NOW, common_name="r.test root")
    bundle = TrustBundle("r.test", (old.cert, new.cert))
    store = TrustStore.of([bundle])
    for ca in (old, new):
        svid = ca.issue_svid("spiffe://r.test/w", now=NOW)
        assert verify_svid_chain(svid.chain_der(), store, NOW).uri == "spiffe://r.test/w"


# --------------------------------------------------------------------------------------------
# verify_peer: the per-connection memo
# --------------------------------------------------------------------------------------------


def test_memo_returns_the_same_identity_without_reverifying(world: World) -> None:
    peer = PeerCertificates(world.a.issue_svid("spiffe://a.test/web", now=NOW).chain_der())
    first = verify_peer(peer, world.store, NOW)
    assert verify_peer(peer, world.store, NOW + 1) is first


def test_memo_rechecks_expiry_with_a_later_now(world: World) -> None:
    peer = PeerCertificates(world.a.issue_svid("spiffe://a.test/web", now=NOW,
                                               ttl_s=3600).chain_der())
    verify_peer(peer, world.store, NOW)
    with pytest.raises(PeerIdentityError) as info:
        verify_peer(peer, world.store, NOW + 3601)
    assert info.value.code == "svid_expired"


def test_memo_is_invalidated_by_a_new_store_version(world: World) -> None:
    peer = PeerCertificates(world.b.issue_svid("spiffe://b.test/api", now=NOW).chain_der())
    assert verify_peer(peer, world.store, NOW).uri == "spiffe://b.test/api"
    without_b = TrustStore.of([world.store.bundles["a.test"]], version=world.store.version + 1)
    with pytest.raises(PeerIdentityError) as info:
        verify_peer(peer, without_b, NOW)
    assert info.value.code == "svid_unknown_trust_domain"
    # ... and a failure memo is dropped when the store changes again
    again = TrustStore(dict(world.store.bundles), version=world.store.version + 2)
    assert verify_peer(peer, again, NOW).uri == "spiffe://b.test/api"


def test_memoised_failure_is_raised_again_for_the_same_version(world: World) -> None:
    peer = PeerCertificates(world.a.issue_svid(None, now=NOW).chain_der())
    for _ in range(2):
        with pytest.raises(PeerIdentityError) as info:
            verify_peer(peer, world.store, NOW)
        assert info.value.code == "svid_no_uri_san"


def test_time_dependent_failure_is_not_memoised(world: World) -> None:
    peer = PeerCertificates(world.a.issue_svid("spiffe://a.test/web", now=NOW,
                                               not_before=NOW + 600).chain_der())
    with pytest.raises(PeerIdentityError) as info:
        verify_peer(peer, world.store, NOW)
    assert info.value.code == "svid_not_yet_valid"
    assert verify_peer(peer, world.store, NOW + 601).uri == "spiffe://a.test/web"


def test_memo_rebuilds_the_path_when_the_memoised_one_expires(world: World) -> None:
    """The issuing key has two certificates (short and long lived) and the peer sends both:
    when the memoised path runs out, verification finds the other one."""
    inter = world.a.intermediate(now=NOW, ttl_s=600)
    longer = (x509.CertificateBuilder().subject_name(inter.cert.subject)
              .issuer_name(world.a.cert.subject).public_key(inter.key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(_t(NOW - 60)).not_valid_after(_t(NOW + 7200)))
    for ext in inter.cert.extensions:
        longer = longer.add_extension(ext.value, ext.critical)
    longer = longer.sign(world.a.key, hashes.SHA256())
    svid = inter.issue_svid("spiffe://a.test/web", now=NOW, ttl_s=3600)
    peer = PeerCertificates(svid.chain_der() + (_der(longer),))
    assert verify_peer(peer, world.store, NOW).not_after == NOW + 600
    assert verify_peer(peer, world.store, NOW + 601).not_after == NOW + 3600


def test_memo_expiry_without_another_path(world: World) -> None:
    inter = world.a.intermediate(now=NOW, ttl_s=600)
    peer = PeerCertificates(inter.issue_svid("spiffe://a.test/web", now=NOW).chain_der())
    assert verify_peer(peer, world.store, NOW).not_after == NOW + 600
    with pytest.raises(PeerIdentityError) as info:
        verify_peer(peer, world.store, NOW + 601)
    assert info.value.code == "svid_expired"


# --------------------------------------------------------------------------------------------
# The sidecar's own SVID
# --------------------------------------------------------------------------------------------


def test_own_svid_loads(world: World) -> None:
    inter = world.a.intermediate(now=NOW)
    svid = inter.issue_svid("spiffe://a.test/sidecar", now=NOW, key_type="rsa")
    own = load_own_svid(svid.cert_pem(), svid.key_pem(), NOW)
    assert str(own.spiffe_id) == "spiffe://a.test/sidecar"
    assert own.leaf_sha256 == hashlib.sha256(_der(svid.cert)).digest()
    assert own.not_after == svid.cert.not_valid_after_utc.timestamp()
    assert len(x509.load_pem_x509_certificates(own.cert_chain_pem)) == 2
    assert own.key_pem == svid.key_pem()
    assert "PRIVATE" not in repr(own)


def _pair(svid: DevSvid) -> tuple[bytes, bytes]:
    return svid.cert_pem(), svid.key_pem()


def _mismatched(w: World) -> tuple[bytes, bytes]:
    return (w.a.issue_svid("spiffe://a.test/s", now=NOW).cert_pem(),
            w.a.issue_svid("spiffe://a.test/s", now=NOW).key_pem())


def _out_of_order(w: World) -> tuple[bytes, bytes]:
    svid = w.a.intermediate(now=NOW).issue_svid("spiffe://a.test/s", now=NOW)
    leaf_pem = svid.cert.public_bytes(serialization.Encoding.PEM)
    return leaf_pem + w.b.bundle_pem(), svid.key_pem()  # b's root did not issue the leaf


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_mismatched, "does not match"),
        (lambda w: _pair(w.a.issue_svid("spiffe://a.test/s", now=NOW - 7200, ttl_s=3600)),
         "expired"),
        (lambda w: _pair(w.a.issue_svid(None, now=NOW, extra_uris=("https://x.test/",))),
         "not a valid X.509-SVID"),
        (lambda w: _pair(w.a.issue_svid("spiffe://a.test/s", now=NOW, is_ca=True)),
         "not a valid X.509-SVID"),
        (lambda w: _pair(w.a.issue_svid("spiffe://a.test/s", now=NOW, eku=("client",))),
         "serverAuth"),
        (lambda w: (b"no certificate here", w.a.issue_svid("spiffe://a.test/s").key_pem()),
         "no parseable certificate"),
        (lambda w: (w.a.issue_svid("spiffe://a.test/s", now=NOW).cert_pem(), b"not a key"),
         "private key"),
        (_out_of_order, "out of order"),
    ],
    ids=["mismatched_key", "expired", "not_an_svid", "ca_leaf", "no_server_auth", "no_cert",
         "bad_key", "chain_out_of_order"],
)
def test_own_svid_refused(world: World, make, reason: str) -> None:
    cert_pem, key_pem = make(world)
    with pytest.raises(InvalidValue) as info:
        load_own_svid(cert_pem, key_pem, NOW)
    assert reason in str(info.value)


def test_own_svid_not_yet_valid_still_loads(world: World) -> None:
    """Only expiry is fatal at load: a fresh SVID may start a little after a skewed clock."""
    svid = world.a.issue_svid("spiffe://a.test/s", now=NOW, not_before=NOW + 5)
    assert load_own_svid(svid.cert_pem(), svid.key_pem(), NOW).not_after == NOW + 3600
