"""Properties of the bundle readers and `verify` (proxy.core.bundle, proxy.bundles.io): any bytes
give a value or a BundleError, never another exception; a validly signed bundle with any single
change (a byte of a file, of the manifest or of the signature; a file added or removed) is never
accepted. Inputs: arbitrary bytes, arbitrary JSON-shaped values, mutations of a real bundle."""

from __future__ import annotations

import io
import json
import tarfile

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.bundles.io import read_targz_bytes, to_targz
from proxy.core import bundle as B
from proxy.core.audit import canonical
from proxy.errors import BundleError
from tests.fuzz.strategies import JSONISH, mutated

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
POLICY = b"version: 1\nrules: [{id: r, effect: allow, from: {workloads: ['spiffe://example.org/a']}}]\n"
REVOKED = json.dumps({"spiffe_ids": ["spiffe://example.org/x"], "jtis": ["j1"]}).encode()
GOOD = B.build({"policy.yaml": POLICY, "data/revocations.json": REVOKED}, revision=7, now=NOW,
               expires_at=NOW + 3600, signer=KEY)
GOOD_TGZ = to_targz(GOOD)


def _verify(bundle: B.Bundle) -> B.VerifiedBundle:
    return B.verify(bundle, public_keys=[KEY.public_key()], require_signature=True, now=NOW + 1,
                    active_revision=None)


def test_the_unmodified_bundle_verifies():
    """The baseline the mutation properties below depend on."""
    vb = _verify(read_targz_bytes(GOOD_TGZ))
    assert (vb.revision, vb.signed_by) == (7, B.key_id(KEY.public_key()))


def _canonical_or_raw(doc) -> bytes:
    """RFC 8785 bytes when the value has a canonical form (string keys, finite numbers), so the
    manifest parser gets past its canonical-form check and reaches the deeper rules."""
    try:
        return canonical(doc)
    except (TypeError, ValueError):
        return json.dumps(doc).encode()


def _value_or_bundle_error(fn, data):
    try:
        return fn(data)
    except BundleError as err:
        assert err.code and isinstance(err.code, str)
        return None


@SETTINGS
@given(st.one_of(st.binary(max_size=300), JSONISH.map(lambda v: json.dumps(v).encode()),
                 mutated(json.loads(GOOD.manifest_bytes)).map(lambda d: json.dumps(d).encode()),
                 mutated(json.loads(GOOD.manifest_bytes)).map(_canonical_or_raw)))
def test_any_manifest_bytes_give_a_manifest_or_a_bundle_error(data: bytes):
    _value_or_bundle_error(B.parse_manifest, data)


@SETTINGS
@given(st.one_of(st.binary(max_size=200), JSONISH.map(lambda v: json.dumps(v).encode()),
                 mutated(json.loads(GOOD.signature_bytes)).map(lambda d: json.dumps(d).encode())))
def test_any_signature_bytes_give_a_signature_or_a_bundle_error(data: bytes):
    _value_or_bundle_error(B.parse_signature, data)


@SETTINGS
@given(st.one_of(st.binary(max_size=200), JSONISH.map(lambda v: json.dumps(v).encode()),
                 mutated(json.loads(REVOKED)).map(lambda d: json.dumps(d).encode())))
def test_any_revocations_give_revocations_or_a_bundle_error(data: bytes):
    _value_or_bundle_error(B.parse_revocations, data)


@SETTINGS
@given(st.one_of(st.binary(max_size=400),
                 st.tuples(st.integers(0, len(GOOD_TGZ) - 1), st.integers(1, 255)).map(
                     lambda t: GOOD_TGZ[:t[0]] + bytes([GOOD_TGZ[t[0]] ^ t[1]]) + GOOD_TGZ[t[0] + 1:]),
                 st.integers(0, len(GOOD_TGZ)).map(lambda n: GOOD_TGZ[:n])))
def test_any_targz_bytes_give_a_bundle_or_a_bundle_error(data: bytes):
    got = _value_or_bundle_error(read_targz_bytes, data)
    if got is not None:  # whatever was read must still pass verify to be used
        _value_or_bundle_error(_verify, got)


def _flip(data: bytes, at: int, mask: int) -> bytes:
    at %= len(data)
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1:]


@SETTINGS
@given(st.sampled_from(["policy.yaml", "data/revocations.json", ".manifest.json", ".signature.json",
                        "add", "remove"]),
       st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=255))
def test_a_signed_bundle_with_any_single_change_is_never_accepted(where, at, mask):
    files = dict(GOOD.files)
    manifest, signature = GOOD.manifest_bytes, GOOD.signature_bytes
    if where == ".manifest.json":
        manifest = _flip(manifest, at, mask)
    elif where == ".signature.json":
        signature = _flip(signature, at, mask)
    elif where == "add":
        files[f"extra{at}.yaml"] = b"x"
    elif where == "remove":
        del files["data/revocations.json"]
    else:
        files[where] = _flip(files[where], at, mask)
    try:
        _verify(B.Bundle(manifest, signature, files))
    except BundleError:
        return
    raise AssertionError(f"a bundle changed in {where} was accepted")


def test_a_tar_member_escaping_the_root_is_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("../policy.yaml", POLICY), (".manifest.json", GOOD.manifest_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    try:
        read_targz_bytes(buf.getvalue())
    except BundleError as err:
        assert err.code
    else:
        raise AssertionError("a member named ../policy.yaml was read")
