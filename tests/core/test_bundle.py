"""proxy.core.bundle: the bundle format, signatures and the verify rules (one test per rule, with
the cases that must be refused)."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.core import bundle as cb
from proxy.core.audit import canonical
from proxy.core.audit import key_id as audit_key_id
from proxy.core.jose import b64url_decode, b64url_encode
from proxy.errors import BundleError, InvalidValue, PortcullisError

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
ED = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ED_NEW = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
P256 = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
P256_OTHER = ec.derive_private_key(0xFEDCBA0987654321, ec.SECP256R1())
POLICY = b"version: 1\nrules: []\n"
REVOCATIONS = json.dumps({"spiffe_ids": ["spiffe://example.org/ns/bad"],
                          "subjects": [{"iss": "https://idp.example", "sub": "mallory"}],
                          "clients": ["evil-client"], "jtis": ["j1", "j2"]}).encode()
FILES = {"policy.yaml": POLICY, "data/revocations.json": REVOCATIONS}
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "bundles"


def make(files=None, *, revision=5, now=NOW, expires_at=NOW + 3600, signer=ED) -> cb.Bundle:
    return cb.build(FILES if files is None else files, revision=revision, now=now,
                    expires_at=expires_at, signer=signer)


def check(bundle, *, keys=(ED,), require=False, now=NOW, active=None, active_digest=None,
          grace_s=0.0):
    return cb.verify(bundle, public_keys=[k.public_key() for k in keys], require_signature=require,
                     now=now, active_revision=active, active_digest=active_digest, grace_s=grace_s)


def refused(code: str, bundle, **kw) -> BundleError:
    with pytest.raises(BundleError) as exc:
        check(bundle, **kw)
    assert exc.value.code == code, str(exc.value)
    return exc.value


def with_manifest(b: cb.Bundle, obj: dict | bytes, signer=ED) -> cb.Bundle:
    """The bundle with another manifest, re-signed (as a key holder could)."""
    if isinstance(obj, bytes):
        m = obj
    else:
        try:
            m = canonical(obj)
        except ValueError:  # outside the canonical domain (a float, a huge integer)
            m = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return cb.Bundle(m, None if signer is None else cb.sign(m, signer), b.files)


def manifest_of(b: cb.Bundle) -> dict:
    return json.loads(b.manifest_bytes)


# ------------------------------------------------------------------------------------------------
# The format
# ------------------------------------------------------------------------------------------------


def test_error_is_part_of_the_one_tree():
    err = BundleError("bundle_expired", "x")
    assert isinstance(err, PortcullisError) and err.code == "bundle_expired" and err.detail == "x"


def test_manifest_is_canonical_json_of_the_documented_shape():
    b = make()
    m = manifest_of(b)
    assert b.manifest_bytes == canonical(m)
    assert m == {"revision": 5, "created_at": "2027-01-15T08:00:00Z",
                 "expires_at": "2027-01-15T09:00:00Z",
                 "files": {"data/revocations.json": sha256(REVOCATIONS).hexdigest(),
                           "policy.yaml": sha256(POLICY).hexdigest()}}
    assert list(m["files"]) == sorted(m["files"])
    assert make(expires_at=None, now=NOW + 0.9).manifest_bytes.count(b'"expires_at":null') == 1
    assert manifest_of(make(now=NOW + 0.9))["created_at"] == "2027-01-15T08:00:00Z"  # floor


@pytest.mark.parametrize("signer", [ED, P256], ids=["EdDSA", "ES256"])
def test_signature_is_detached_over_the_exact_manifest_bytes(signer):
    b = make(signer=signer)
    sig = json.loads(b.signature_bytes)
    assert set(sig) == {"alg", "kid", "sig"}
    assert sig["alg"] == ("EdDSA" if signer is ED else "ES256")
    assert sig["kid"] == cb.key_id(signer.public_key())
    assert len(b64url_decode(sig["sig"])) == 64 and "=" not in sig["sig"]


def test_key_id_of_an_ed25519_key_is_the_audit_key_id():
    assert cb.key_id(ED.public_key()) == audit_key_id(ED.public_key())
    assert len(cb.key_id(P256.public_key())) == 16
    assert cb.key_id(P256.public_key()) != cb.key_id(P256_OTHER.public_key())


def test_known_answer_vector():
    """A fixed key and input give exactly these bytes (a control plane in another language can
    check itself against this file)."""
    v = json.loads((VECTORS / "ed25519_v1.json").read_text())
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["private_key_seed_hex"]))
    files = {p: c.encode() for p, c in v["files"].items()}
    b = cb.build(files, revision=v["revision"], now=v["now"], expires_at=v["expires_at"],
                 signer=key)
    assert b.manifest_bytes.decode() == v["manifest"]
    assert b.signature_bytes.decode() == v["signature"]
    vb = cb.verify(b, public_keys=[key.public_key()], require_signature=True, now=v["now"],
                   active_revision=None)
    assert vb.digest == v["digest"] == sha256(b.manifest_bytes).hexdigest()


# ------------------------------------------------------------------------------------------------
# Accepted bundles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signer", [ED, P256], ids=["EdDSA", "ES256"])
def test_a_signed_bundle_verifies(signer):
    b = make(signer=signer)
    vb = check(b, keys=(signer,), require=True)
    assert vb.revision == 5 and vb.created_at == NOW and vb.expires_at == NOW + 3600
    assert dict(vb.files) == FILES
    assert vb.digest == sha256(b.manifest_bytes).hexdigest()
    assert vb.signed_by == cb.key_id(signer.public_key())
    assert not vb.in_grace and not vb.unchanged
    assert vb.bundle() == b


def test_dev_mode_accepts_an_unsigned_bundle():
    vb = check(make(signer=None), keys=(), require=False)
    assert vb.signed_by is None and vb.revision == 5


def test_dev_mode_checks_the_shape_of_a_signature_it_cannot_verify():
    b = make()
    vb = check(b, keys=(), require=False)
    assert vb.signed_by is None  # nothing verified it: never claimed as signed
    broken = cb.Bundle(b.manifest_bytes, b'{"alg":"none"}', b.files)
    refused("bundle_bad_signature", broken, keys=(), require=False)


# ------------------------------------------------------------------------------------------------
# Rule 1: signatures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys,require", [((ED,), False), ((ED,), True), ((), True)],
                         ids=["keys", "keys+required", "required-no-keys"])
def test_an_unsigned_bundle_is_refused_when_keys_or_the_requirement_are_set(keys, require):
    refused("bundle_unsigned", make(signer=None), keys=keys, require=require)


def test_unsigned_is_checked_before_anything_else():
    garbage = cb.Bundle(b"not json", None, {"x": b""})
    refused("bundle_unsigned", garbage)


def test_required_signature_without_keys_can_never_pass():
    refused("bundle_unknown_key", make(), keys=(), require=True)


@pytest.mark.parametrize("signer", [ED, P256], ids=["EdDSA", "ES256"])
def test_a_signature_by_an_untrusted_key_is_refused(signer):
    other = ED_NEW if signer is ED else P256_OTHER
    err = refused("bundle_unknown_key", make(signer=other), keys=(signer,))
    assert cb.key_id(other.public_key()) in err.detail


def test_rotation_several_trusted_keys_the_kid_selects_one():
    old, new = make(signer=ED), make(signer=ED_NEW, revision=6)
    during = (ED, ED_NEW, P256)
    assert check(old, keys=during).signed_by == cb.key_id(ED.public_key())
    assert check(new, keys=during).signed_by == cb.key_id(ED_NEW.public_key())
    assert check(make(signer=P256), keys=during).signed_by == cb.key_id(P256.public_key())
    refused("bundle_unknown_key", old, keys=(ED_NEW,))  # after the old key is retired


@pytest.mark.parametrize("signer", [ED, P256], ids=["EdDSA", "ES256"])
def test_a_changed_manifest_breaks_the_signature(signer):
    b = make(signer=signer)
    m = manifest_of(b)
    m["revision"] = 6
    tampered = cb.Bundle(canonical(m), b.signature_bytes, b.files)
    refused("bundle_bad_signature", tampered, keys=(signer,))


@pytest.mark.parametrize("signer", [ED, P256], ids=["EdDSA", "ES256"])
def test_a_changed_signature_is_refused(signer):
    b = make(signer=signer)
    sig = json.loads(b.signature_bytes)
    raw = bytearray(b64url_decode(sig["sig"]))
    raw[10] ^= 1
    sig["sig"] = b64url_encode(bytes(raw))
    refused("bundle_bad_signature", cb.Bundle(b.manifest_bytes, canonical(sig), b.files),
            keys=(signer,))


def test_the_alg_must_match_the_key_type():
    b = make(signer=ED)
    sig = json.loads(b.signature_bytes)
    sig["alg"] = "ES256"
    refused("bundle_bad_signature", cb.Bundle(b.manifest_bytes, canonical(sig), b.files))


@pytest.mark.parametrize("rs", ["r0", "s0", "s_n"])
def test_es256_values_out_of_range_are_refused(rs):
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    b = make(signer=P256)
    sig = json.loads(b.signature_bytes)
    raw = b64url_decode(sig["sig"])
    r, s = raw[:32], raw[32:]
    if rs == "r0":
        r = bytes(32)
    elif rs == "s0":
        s = bytes(32)
    else:
        s = n.to_bytes(32, "big")
    sig["sig"] = b64url_encode(r + s)
    refused("bundle_bad_signature", cb.Bundle(b.manifest_bytes, canonical(sig), b.files),
            keys=(P256,))


def _sig(**over) -> bytes:
    base = json.loads(make().signature_bytes)
    base.update(over)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[]", b'{"alg":"EdDSA","alg":"EdDSA"}',
    _sig(alg="none"), _sig(alg="HS256"), _sig(alg="RS256"), _sig(alg=None),
    _sig(kid="ABCDEF0123456789"), _sig(kid="abc"), _sig(kid=7),
    _sig(sig=None), _sig(sig=5), _sig(sig="AAAA="), _sig(sig="AA$A"), _sig(sig="AAAA"),
    _sig(extra="x"),
], ids=lambda r: r[:40].decode(errors="replace"))
def test_malformed_signatures_are_refused(raw):
    b = make()
    refused("bundle_bad_signature", cb.Bundle(b.manifest_bytes, raw, b.files))
    refused("bundle_bad_signature", cb.Bundle(b.manifest_bytes, raw, b.files), keys=())


def test_only_ed25519_and_p256_keys_can_be_trusted():
    with pytest.raises(InvalidValue):
        check(make(), keys=(ec.generate_private_key(ec.SECP384R1()),))
    with pytest.raises(InvalidValue):
        make(signer=rsa.generate_private_key(public_exponent=65537, key_size=2048))


# ------------------------------------------------------------------------------------------------
# Rule 2: the manifest
# ------------------------------------------------------------------------------------------------


def _m(**over) -> dict:
    m = manifest_of(make())
    for k, v in over.items():
        if v is _DROP:
            m.pop(k)
        else:
            m[k] = v
    return m


_DROP = object()
_H = sha256(POLICY).hexdigest()


@pytest.mark.parametrize("manifest", [
    b"not json", b"[1]", b'{"revision":5,"revision":5}',
    _m(extra=1), _m(revision=_DROP), _m(created_at=_DROP), _m(expires_at=_DROP),
    _m(files=_DROP),
    _m(revision=0), _m(revision=-1), _m(revision=True), _m(revision=1.5), _m(revision="5"),
    _m(revision=2**53),
    _m(created_at="2027-01-15T08:00:00"), _m(created_at="2027-01-15T08:00:00+00:00"),
    _m(created_at="2027-01-15t08:00:00z"), _m(created_at="2027-02-30T08:00:00Z"),
    _m(created_at=1800000000), _m(expires_at="tomorrow"),
    _m(expires_at="2027-01-15T08:00:00Z"), _m(expires_at="2027-01-15T07:00:00Z"),
    _m(files=[]), _m(files={}), _m(files={"policy.yaml": _H.upper()}),
    _m(files={"policy.yaml": _H[:-1]}), _m(files={"policy.yaml": 1}),
], ids=lambda m: (m[:30].decode() if isinstance(m, bytes) else
                  json.dumps({k: v for k, v in m.items() if k != "files"} | {"f": m["files"]}
                             if "files" in m else m)[:90]))
def test_malformed_manifests_are_refused(manifest):
    refused("bundle_bad_manifest", with_manifest(make(), manifest))


@pytest.mark.parametrize("path", ["../policy.yaml", "/etc/passwd", "a\\b", "a//b", "a/", "./a",
                                  "a/./b", "a/../b", ".hidden", "data/.x", ".manifest.json",
                                  ".signature.json", "", "a b", "caf\u00e9", "x" * 513])
def test_unsafe_or_unportable_paths_are_refused_in_the_manifest(path):
    m = _m(files={"policy.yaml": _H, path: _H})
    files = {"policy.yaml": POLICY, path: POLICY}
    refused("bundle_bad_manifest", cb.Bundle(canonical(m), cb.sign(canonical(m), ED), files))


@pytest.mark.parametrize("paths", [("a.yaml", "A.yaml"), ("data", "data/x.json")])
def test_paths_that_cannot_coexist_on_a_file_system_are_refused(paths):
    m = _m(files={"policy.yaml": _H, **{p: _H for p in paths}})
    files = {"policy.yaml": POLICY, **{p: POLICY for p in paths}}
    refused("bundle_bad_manifest", cb.Bundle(canonical(m), cb.sign(canonical(m), ED), files))


def test_the_manifest_must_list_the_policy():
    m = _m(files={"other.yaml": _H})
    refused("bundle_bad_manifest", with_manifest(cb.Bundle(b"", None, {"other.yaml": POLICY}), m))


def test_a_manifest_not_in_canonical_form_is_refused():
    b = make()
    pretty = json.dumps(manifest_of(b), indent=1).encode()
    refused("bundle_bad_manifest", with_manifest(b, pretty))
    reordered = json.dumps(dict(reversed(manifest_of(b).items())),
                           separators=(",", ":")).encode()
    refused("bundle_bad_manifest", with_manifest(b, reordered))


def test_every_manifest_problem_is_named():
    err = refused("bundle_bad_manifest", with_manifest(make(), _m(revision=0, extra=1,
                                                                  created_at="x")))
    assert "revision" in err.detail and "extra" in err.detail and "created_at" in err.detail


# ------------------------------------------------------------------------------------------------
# Rule 3: the files
# ------------------------------------------------------------------------------------------------


def test_a_changed_policy_byte_is_a_hash_mismatch():
    b = make()
    changed = dict(b.files)
    changed["policy.yaml"] = POLICY.replace(b"1", b"2")
    err = refused("bundle_hash_mismatch", cb.Bundle(b.manifest_bytes, b.signature_bytes, changed))
    assert err.detail == "policy.yaml"


def test_a_listed_file_that_is_missing_is_refused():
    b = make()
    files = {"policy.yaml": POLICY}
    err = refused("bundle_missing_file", cb.Bundle(b.manifest_bytes, b.signature_bytes, files))
    assert err.detail == "data/revocations.json"


@pytest.mark.parametrize("extra", ["notes.txt", ".DS_Store", "../x"])
def test_an_unlisted_file_is_refused(extra):
    b = make()
    files = {**b.files, extra: b"x"}
    err = refused("bundle_extra_file", cb.Bundle(b.manifest_bytes, b.signature_bytes, files))
    assert err.detail == extra


# ------------------------------------------------------------------------------------------------
# Rule 4: data/revocations.json
# ------------------------------------------------------------------------------------------------


def test_revocations_are_parsed_into_frozen_sets():
    rev = cb.revocations(check(make()))
    assert rev == cb.Revocations(spiffe_ids=frozenset({"spiffe://example.org/ns/bad"}),
                                 subjects=frozenset({("https://idp.example", "mallory")}),
                                 clients=frozenset({"evil-client"}), jtis=frozenset({"j1", "j2"}))
    assert rev and isinstance(rev.jtis, frozenset)
    assert cb.revocations(check(make({"policy.yaml": POLICY}))) == cb.EMPTY_REVOCATIONS
    assert not cb.EMPTY_REVOCATIONS
    assert cb.parse_revocations(b"{}") == cb.EMPTY_REVOCATIONS  # every key optional


@pytest.mark.parametrize("doc", [
    b"[]", b"nope", {"spiffe_ids": "spiffe://example.org/a"}, {"spiffe_ids": ["not-an-id"]},
    {"spiffe_ids": ["spiffe://Example.org/a"]}, {"spiffe_ids": [""]}, {"clients": [1]},
    {"jtis": [None]}, {"subjects": ["mallory"]}, {"subjects": [{"iss": "i"}]},
    {"subjects": [{"iss": "i", "sub": "s", "aud": "a"}]}, {"subjects": [{"iss": "", "sub": "s"}]},
    {"unknown": []},
], ids=lambda d: d.decode() if isinstance(d, bytes) else json.dumps(d))
def test_malformed_revocations_are_refused(doc):
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(BundleError) as exc:
        make({"policy.yaml": POLICY, "data/revocations.json": data})
    assert exc.value.code == "bundle_bad_data"
    # and a bundle built by someone else with such a file fails verification
    files = {"policy.yaml": POLICY, "data/revocations.json": data}
    m = _m(files={p: sha256(c).hexdigest() for p, c in files.items()})
    refused("bundle_bad_data", cb.Bundle(canonical(m), cb.sign(canonical(m), ED), files))


# ------------------------------------------------------------------------------------------------
# Rule 5: time
# ------------------------------------------------------------------------------------------------


def test_an_expired_bundle_is_refused():
    b = make(expires_at=NOW + 100)
    refused("bundle_expired", b, now=NOW + 100)  # not valid at its expiry instant
    refused("bundle_expired", b, now=NOW + 5000)
    assert check(b, now=NOW + 99).expires_at == NOW + 100


def test_an_expired_bundle_within_grace_is_returned_marked():
    b = make(expires_at=NOW + 100)
    vb = check(b, now=NOW + 150, grace_s=60)
    assert vb.in_grace
    refused("bundle_expired", b, now=NOW + 160, grace_s=60)
    assert not check(b, now=NOW + 50, grace_s=60).in_grace


def test_a_bundle_without_expiry_never_expires():
    vb = check(make(expires_at=None), now=NOW + 10 * 365 * 86400)
    assert vb.expires_at is None and not vb.in_grace


def test_a_bundle_created_in_the_future_is_refused_beyond_the_skew():
    b = make(now=NOW + 3600, expires_at=None)
    refused("bundle_not_yet_valid", b, now=NOW)
    assert check(b, now=NOW + 3600 - cb.DEFAULT_MAX_SKEW_S).revision == 5


# ------------------------------------------------------------------------------------------------
# Rule 6: revision
# ------------------------------------------------------------------------------------------------


def test_a_lower_revision_is_a_rollback():
    err = refused("bundle_rollback", make(revision=4), active=5)
    assert "4" in err.detail and "5" in err.detail


def test_a_higher_revision_is_accepted():
    assert check(make(revision=6), active=5).revision == 6
    assert check(make(revision=1), active=None).revision == 1


def test_the_same_revision_with_the_same_digest_is_unchanged():
    b = make()
    vb = check(b, active=5, active_digest=sha256(b.manifest_bytes).hexdigest())
    assert vb.unchanged and vb.revision == 5


def test_the_same_revision_with_other_content_is_refused():
    active = make()
    other = make({"policy.yaml": POLICY + b"# changed\n"})
    refused("bundle_same_revision_different_content", other, active=5,
            active_digest=sha256(active.manifest_bytes).hexdigest())
    refused("bundle_same_revision_different_content", active, active=5, active_digest=None)


# ------------------------------------------------------------------------------------------------
# build() input checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("files,code", [
    ({"policy.yaml": POLICY, "../x": b""}, "bundle_unsafe_path"),
    ({"policy.yaml": POLICY, "/abs": b""}, "bundle_unsafe_path"),
    ({"policy.yaml": POLICY, ".manifest.json": b""}, "bundle_unsafe_path"),
    ({"policy.yaml": POLICY, "A": b"", "a": b""}, "bundle_unsafe_path"),
    ({"other.yaml": POLICY}, "bundle_missing_file"),
])
def test_build_refuses_unusable_files(files, code):
    with pytest.raises(BundleError) as exc:
        make(files)
    assert exc.value.code == code


@pytest.mark.parametrize("kw", [{"revision": 0}, {"revision": True}, {"revision": 2**53},
                                {"expires_at": NOW}, {"expires_at": NOW - 1}])
def test_build_refuses_a_bad_revision_or_expiry(kw):
    with pytest.raises(BundleError) as exc:
        make(**kw)
    assert exc.value.code == "bundle_bad_manifest"


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------


def test_inspect_reports_every_problem_without_raising():
    b = make(expires_at=NOW + 10)
    files = {"policy.yaml": POLICY + b"!", "extra.txt": b"x"}
    ins = cb.inspect(cb.Bundle(b.manifest_bytes, b.signature_bytes, files), now=NOW + 20)
    codes = [c for c, _ in ins.problems]
    assert codes == ["bundle_missing_file", "bundle_extra_file", "bundle_hash_mismatch",
                     "bundle_expired"]
    assert {f.path: f.status for f in ins.files} == {
        "data/revocations.json": "missing", "extra.txt": "extra", "policy.yaml": "mismatch"}
    assert ins.signature is not None and ins.signature.kid == cb.key_id(ED.public_key())
    assert ins.manifest["revision"] == 5 and not ins.ok


def test_inspect_of_a_good_bundle_and_of_garbage():
    assert cb.inspect(make(), now=NOW, public_keys=[ED.public_key()]).ok
    unsigned = cb.inspect(make(signer=None), now=NOW, public_keys=[ED.public_key()])
    assert [c for c, _ in unsigned.problems] == ["bundle_unsigned"]
    garbage = cb.inspect(cb.Bundle(b"\xff", b"{", {"policy.yaml": b""}), now=NOW)
    assert [c for c, _ in garbage.problems] == ["bundle_bad_signature", "bundle_bad_manifest"]
    assert garbage.manifest is None and garbage.files[0].status == "extra"
