"""proxy.bundles: reading and writing bundles safely (proxy.bundles.io) and `portcullis bundle
build | verify | inspect` (proxy.bundles.cli)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.bundles import io as bio
from proxy.bundles.cli import main
from proxy.core import bundle as cb
from proxy.errors import BundleError

ROOT = Path(__file__).resolve().parents[1]
POLICY = (ROOT / "config" / "policy.example.yaml").read_bytes()
REVOCATIONS = b'{"spiffe_ids": ["spiffe://example.org/ns/x"], "jtis": ["j1"]}'
ED = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
P256 = ec.derive_private_key(0xC0FFEE, ec.SECP256R1())


def make(revision=5, *, files=None, signer=ED, now=None) -> cb.Bundle:
    return cb.build(files or {"policy.yaml": POLICY, "data/revocations.json": REVOCATIONS},
                    revision=revision, now=time.time() if now is None else now,
                    expires_at=None, signer=signer)


def verify(b: cb.Bundle, **kw) -> cb.VerifiedBundle:
    return cb.verify(b, public_keys=[ED.public_key()], require_signature=True, now=time.time(),
                     active_revision=None, **kw)


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(BundleError) as exc:
        fn(*args, **kw)
    return exc.value.code


def targz(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def good_members(b: cb.Bundle, prefix: str = "") -> list[tuple[tarfile.TarInfo, bytes]]:
    out = [(member(prefix + cb.MANIFEST_NAME), b.manifest_bytes),
           (member(prefix + cb.SIGNATURE_NAME), b.signature_bytes)]
    return out + [(member(prefix + p), c) for p, c in b.files.items()]


def write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def write_pub(path: Path, key) -> Path:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


# ================================================================================================
# io: tar.gz
# ================================================================================================


def test_targz_round_trip_is_deterministic():
    b = make()
    data = bio.to_targz(b)
    assert data == bio.to_targz(b)
    back = bio.read_targz_bytes(data)
    assert back == b and verify(back).revision == 5
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos] == [".manifest.json", ".signature.json",
                                       "data/revocations.json", "policy.yaml"]
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" and i.mode == 0o644
               and i.isreg() for i in infos)
    assert data[4:8] == b"\0\0\0\0"  # gzip header mtime


def test_a_tar_made_with_dot_slash_names_is_read():
    """`tar czf b.tar.gz -C dir .` writes `./` and `./policy.yaml`."""
    b = make()
    data = targz([(member("./", tarfile.DIRTYPE), b""), (member("./data", tarfile.DIRTYPE), b"")]
                 + good_members(b, "./"))
    assert verify(bio.read_targz_bytes(data)).files == b.files


@pytest.mark.parametrize("name", ["../evil", "data/../../evil", "/etc/cron.d/x", "a\\..\\b",
                                  "data//x", "./../x", "a/./b", "x\x00y/../../z", "x\ny",
                                  "caf\udce9"])
def test_path_traversal_in_a_tar_is_refused(name):
    if "\x00" not in name:  # a NUL ends a name in a ustar header: only PAX can carry one
        data = targz(good_members(make()) + [(member(name), b"owned")])
        assert code_of(bio.read_targz_bytes, data) == "bundle_unsafe_path"
    # the same name carried in a PAX header (how long or odd names travel)
    info = member("innocent")
    info.pax_headers = {"path": name}
    data = targz(good_members(make()) + [(info, b"owned")])
    assert code_of(bio.read_targz_bytes, data) == "bundle_unsafe_path"


@pytest.mark.parametrize("kind,link", [(tarfile.SYMTYPE, "/etc/passwd"),
                                       (tarfile.SYMTYPE, "policy.yaml"),
                                       (tarfile.LNKTYPE, "policy.yaml"),
                                       (tarfile.CHRTYPE, ""), (tarfile.BLKTYPE, ""),
                                       (tarfile.FIFOTYPE, ""), (tarfile.CONTTYPE, "")],
                         ids=["symlink-abs", "symlink-rel", "hardlink", "chr", "blk", "fifo",
                              "cont"])
def test_links_and_special_files_in_a_tar_are_refused(kind, link):
    data = targz(good_members(make()) + [(member("data/x.json", kind, link), b"")])
    assert code_of(bio.read_targz_bytes, data) == "bundle_unsafe_path"


def test_a_symlink_in_place_of_the_policy_is_refused():
    b = make()
    members = [m for m in good_members(b) if m[0].name != "policy.yaml"]
    data = targz(members + [(member("policy.yaml", tarfile.SYMTYPE, "/etc/passwd"), b"")])
    assert code_of(bio.read_targz_bytes, data) == "bundle_unsafe_path"


def test_a_duplicate_tar_member_is_refused():
    b = make()
    data = targz(good_members(b) + [(member("policy.yaml"), b"rules: []")])
    assert code_of(bio.read_targz_bytes, data) == "bundle_unsafe_path"


@pytest.mark.parametrize("limits,files", [
    (bio.Limits(max_file_bytes=100), {"policy.yaml": b"x" * 101}),
    (bio.Limits(max_total_bytes=3000), {"policy.yaml": b"x" * 900, "a": b"x" * 900,
                                        "b": b"x" * 900}),
    (bio.Limits(max_files=3), {"policy.yaml": b"x", "a": b"x", "b": b"x"}),
], ids=["one-file", "total", "count"])
def test_oversize_tar_is_refused(limits, files):
    b = make(files=files)
    assert code_of(bio.read_targz_bytes, bio.to_targz(b), limits) == "bundle_too_large"
    assert bio.read_targz_bytes(bio.to_targz(b)) == b  # fine within the default limits


def test_a_decompression_bomb_stops_at_the_cap():
    bomb = gzip.compress(b"\0" * (20 * 1024 * 1024))
    assert len(bomb) < 100_000
    assert code_of(bio.read_targz_bytes, bomb, bio.Limits(max_total_bytes=1024 * 1024,
                                                          max_files=10)) == "bundle_too_large"


@pytest.mark.parametrize("mangle", [
    lambda d: b"not gzip at all", lambda d: d[: len(d) // 2], lambda d: d + b"trailing",
    lambda d: gzip.compress(b"not a tar archive" * 100),
    lambda d: d + gzip.compress(b"second member"),
], ids=["not-gzip", "truncated", "trailing", "not-tar", "two-members"])
def test_corrupt_archives_are_unreadable(mangle):
    assert code_of(bio.read_targz_bytes, mangle(bio.to_targz(make()))) == "bundle_unreadable"


def test_an_archive_without_a_manifest_is_refused():
    data = targz([(member("policy.yaml"), POLICY)])
    assert code_of(bio.read_targz_bytes, data) == "bundle_bad_manifest"


def test_an_unlisted_hidden_file_reaches_verify_as_an_extra_file():
    data = targz(good_members(make()) + [(member(".DS_Store"), b"x")])
    assert code_of(verify, bio.read_targz_bytes(data)) == "bundle_extra_file"


# ================================================================================================
# io: directories
# ================================================================================================


def test_directory_round_trip(tmp_path):
    b = make()
    out = bio.write_dir(b, tmp_path / "b")
    assert bio.read_bundle(out) == b
    assert sorted(p.name for p in out.iterdir()) == [".manifest.json", ".signature.json",
                                                     "data", "policy.yaml"]
    # replacing an existing bundle directory leaves no temp or old directory behind
    b2 = make(6)
    bio.write_dir(b2, out)
    assert bio.read_bundle(out) == b2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_write_dir_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path):
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        bio.write_dir(make(), victim)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_symlink_inside_a_bundle_directory_is_refused(tmp_path):
    out = bio.write_dir(make(), tmp_path / "b")
    (out / "data" / "revocations.json").unlink()
    (out / "data" / "revocations.json").symlink_to("/etc/hostname")
    assert code_of(bio.read_bundle, out) == "bundle_unsafe_path"
    (out / "data" / "revocations.json").unlink()
    (out / "data" / "revocations.json").write_bytes(REVOCATIONS)
    (out / "linked").symlink_to(out / "data", target_is_directory=True)
    assert code_of(bio.read_bundle, out) == "bundle_unsafe_path"


def test_a_fifo_inside_a_bundle_directory_is_refused(tmp_path):
    out = bio.write_dir(make(), tmp_path / "b")
    os.mkfifo(out / "data" / "pipe")
    assert code_of(bio.read_bundle, out) == "bundle_unsafe_path"


def test_an_oversize_directory_is_refused(tmp_path):
    out = bio.write_dir(make(files={"policy.yaml": b"x" * 200}), tmp_path / "b")
    assert code_of(bio.read_bundle, out, bio.Limits(max_file_bytes=100)) == "bundle_too_large"


def test_a_tampered_directory_fails_verification(tmp_path):
    out = bio.write_dir(make(), tmp_path / "b")
    (out / "policy.yaml").write_bytes(POLICY.replace(b"allow", b"alow", 1))
    assert code_of(verify, bio.read_bundle(out)) == "bundle_hash_mismatch"
    (out / "policy.yaml").write_bytes(POLICY)
    (out / "more.yaml").write_bytes(b"x")
    assert code_of(verify, bio.read_bundle(out)) == "bundle_extra_file"


# ================================================================================================
# io: the last-good cache
# ================================================================================================


def test_persist_and_load_round_trip(tmp_path):
    assert bio.load_persisted(tmp_path / "cache") is None
    vb = verify(make())
    assert bio.persist(vb, tmp_path / "cache")
    loaded = bio.load_persisted(tmp_path / "cache")
    again = verify(loaded)
    assert again.digest == vb.digest and again.files == vb.files and again.signed_by


def test_persist_never_rolls_the_cache_back(tmp_path):
    assert bio.persist(verify(make(7)), tmp_path)
    assert not bio.persist(verify(make(6)), tmp_path)
    assert not bio.persist(verify(make(7, files={"policy.yaml": POLICY + b"#"})), tmp_path)
    assert cb.parse_manifest(bio.load_persisted(tmp_path).manifest_bytes).revision == 7
    assert bio.persist(verify(make(8)), tmp_path)
    assert cb.parse_manifest(bio.load_persisted(tmp_path).manifest_bytes).revision == 8


def test_a_crash_mid_write_keeps_the_previous_bundle(tmp_path, monkeypatch):
    bio.persist(verify(make(1)), tmp_path)

    def crash(src, dst):
        raise OSError(5, "simulated crash before the rename")

    monkeypatch.setattr(bio.os, "replace", crash)
    with pytest.raises(OSError):
        bio.persist(verify(make(2)), tmp_path)
    monkeypatch.undo()
    assert cb.parse_manifest(bio.load_persisted(tmp_path).manifest_bytes).revision == 1
    # a partial temp file left by a real crash is ignored by load and does not block persist
    (tmp_path / f".{bio.PERSIST_NAME}.tmp-crashed").write_bytes(b"\x1f\x8b partial")
    assert cb.parse_manifest(bio.load_persisted(tmp_path).manifest_bytes).revision == 1
    assert bio.persist(verify(make(2)), tmp_path)
    assert cb.parse_manifest(bio.load_persisted(tmp_path).manifest_bytes).revision == 2


def test_a_corrupt_cache_is_reported_and_then_replaced(tmp_path):
    (tmp_path / bio.PERSIST_NAME).write_bytes(b"garbage")
    assert code_of(bio.load_persisted, tmp_path) == "bundle_unreadable"
    assert bio.persist(verify(make(3)), tmp_path)
    assert verify(bio.load_persisted(tmp_path)).revision == 3


def test_a_tampered_cache_fails_verification(tmp_path):
    bio.persist(verify(make(3)), tmp_path)
    b = bio.load_persisted(tmp_path)
    evil = cb.Bundle(b.manifest_bytes, b.signature_bytes, {**b.files, "policy.yaml": b"x"})
    (tmp_path / bio.PERSIST_NAME).write_bytes(bio.to_targz(evil))
    assert code_of(verify, bio.load_persisted(tmp_path)) == "bundle_hash_mismatch"


# ================================================================================================
# CLI
# ================================================================================================


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    (d / "data").mkdir(parents=True)
    (d / "policy.yaml").write_bytes(POLICY)
    (d / "data" / "revocations.json").write_bytes(REVOCATIONS)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: x")
    return d


@pytest.mark.parametrize("key", [ED, P256], ids=["EdDSA", "ES256"])
@pytest.mark.parametrize("out_name", ["b.tar.gz", "bdir"])
def test_cli_build_verify_inspect_round_trip(tmp_path, src, capsys, key, out_name):
    sk, pk = write_key(tmp_path / "k.pem", key), write_pub(tmp_path / "k.pub", key)
    out = tmp_path / out_name
    assert main(["build", str(src), "-o", str(out), "--revision", "9", "--expires-in-s", "3600",
                 "--signing-key", str(sk)]) == 0
    o = capsys.readouterr()
    kid = cb.key_id(key.public_key())
    assert f"by kid {kid}" in o.out and "skipped hidden entry .git/" in o.err

    assert main(["verify", str(out), "--public-key", str(pk)]) == 0
    o = capsys.readouterr().out
    assert "revision: 9" in o and f"by kid {kid} (verified)" in o and "policy.yaml" in o
    assert "data/revocations.json" in o and ".git" not in o

    assert main(["inspect", str(out)]) == 0
    o = capsys.readouterr().out
    assert "revision: 9" in o and "problems: none" in o and "expires_at: 20" in o
    assert f"{len(POLICY)} bytes" in o


def test_cli_verify_refusals_exit_1(tmp_path, src, capsys):
    sk = write_key(tmp_path / "k.pem", ED)
    other = write_pub(tmp_path / "other.pub", P256)
    good = write_pub(tmp_path / "k.pub", ED)
    signed, unsigned = tmp_path / "s.tar.gz", tmp_path / "u.tar.gz"
    assert main(["build", str(src), "-o", str(signed), "--revision", "4",
                 "--signing-key", str(sk)]) == 0
    assert main(["build", str(src), "-o", str(unsigned), "--revision", "4"]) == 0
    capsys.readouterr()
    cases = [([str(signed), "--public-key", str(other)], "bundle_unknown_key"),
             ([str(unsigned), "--public-key", str(good)], "bundle_unsigned"),
             ([str(signed), "--public-key", str(good), "--min-revision", "5"], "bundle_rollback")]
    for argv, code in cases:
        assert main(["verify", *argv]) == 1
        assert code in capsys.readouterr().err
    # rotation: both keys trusted
    assert main(["verify", str(signed), "--public-key", str(other), "--public-key",
                 str(good), "--min-revision", "4"]) == 0
    # without keys: dev mode, and the output says the signature was not checked
    assert main(["verify", str(signed)]) == 0
    assert "NOT checked" in capsys.readouterr().out


def test_cli_build_refuses_a_policy_that_does_not_compile(tmp_path, src, capsys):
    (src / "policy.yaml").write_text(
        "version: 1\nrules:\n  - id: a\n    effect: maybe\n    from: {workloads: [x]}\n"
        "    to: [{paths: [/a]}]\n")
    out = tmp_path / "b.tar.gz"
    assert main(["build", str(src), "-o", str(out), "--revision", "1"]) == 2
    err = capsys.readouterr().err
    assert "rules[0].effect" in err and "rules[0].from.workloads[0]" in err
    assert not out.exists()


@pytest.mark.parametrize("setup,needle", [
    (lambda s: (s / "data" / "revocations.json").write_text('{"jtis": "j1"}'), "bundle_bad_data"),
    (lambda s: (s / "evil").symlink_to("/etc/passwd"), "symbolic link"),
    (lambda s: (s / "policy.yaml").unlink(), "no policy.yaml"),
    (lambda s: (s / "policy.yaml").write_text("version: [1"), "not valid YAML"),
    (lambda s: (s / "Policy.yaml").write_text("x"), "differ only in case"),
], ids=["revocations", "symlink", "no-policy", "yaml", "case"])
def test_cli_build_refuses_bad_sources(tmp_path, src, capsys, setup, needle):
    setup(src)
    assert main(["build", str(src), "-o", str(tmp_path / "o.tgz"), "--revision", "1"]) == 2
    assert needle in capsys.readouterr().err


def test_cli_build_refuses_bad_arguments(tmp_path, src, capsys):
    rsa_pem = tmp_path / "rsa.pem"
    from cryptography.hazmat.primitives.asymmetric import rsa

    write_key(rsa_pem, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    out = str(tmp_path / "o.tgz")
    assert main(["build", str(src), "-o", out, "--revision", "1", "--signing-key",
                 str(rsa_pem)]) == 2
    assert "Ed25519 or ECDSA P-256" in capsys.readouterr().err
    assert main(["build", str(src), "-o", out, "--revision", "0"]) == 2
    assert main(["build", str(src), "-o", out, "--revision", "1", "--expires-in-s", "0"]) == 2
    assert main(["build", str(tmp_path / "nope"), "-o", out, "--revision", "1"]) == 2
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    assert main(["build", str(src), "-o", str(victim), "--revision", "1"]) == 2
    assert (victim / "keep").exists()


def test_cli_inspect_says_what_is_wrong(tmp_path, src, capsys):
    out = tmp_path / "b"
    assert main(["build", str(src), "-o", str(out), "--revision", "2"]) == 0
    (out / "policy.yaml").write_bytes(POLICY + b"#")
    (out / "data" / "revocations.json").unlink()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    o = capsys.readouterr().out
    assert "[MISMATCH]" in o and "[MISSING]" in o and "bundle_hash_mismatch: policy.yaml" in o
    assert "signature: unsigned" in o
    pk = write_pub(tmp_path / "k.pub", ED)
    assert main(["inspect", str(out), "--public-key", str(pk)]) == 1
    assert "bundle_unsigned" in capsys.readouterr().out


def test_cli_inspect_of_an_unsafe_archive(tmp_path, capsys):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(targz(good_members(make()) + [(member("../../x"), b"x")]))
    assert main(["inspect", str(bad)]) == 1
    assert "bundle_unsafe_path" in capsys.readouterr().out
    assert main(["verify", str(bad)]) == 1


def test_cli_unreadable_inputs_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing.tar.gz")]) == 2
    assert main(["inspect", str(tmp_path / "missing.tar.gz")]) == 2
    (tmp_path / "k.pub").write_text("not a key")
    bio.write_targz(make(), tmp_path / "b.tar.gz")
    assert main(["verify", str(tmp_path / "b.tar.gz"), "--public-key",
                 str(tmp_path / "k.pub")]) == 2
    assert "not a PEM public key" in capsys.readouterr().err
