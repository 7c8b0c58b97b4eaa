"""`portcullis dev ca|svid|keypair` and the dev CA they drive.

The handlers are tested in-process through `proxy.dev.cli.build_parser()` (the same `register`
that `proxy.cli` mounts under `dev`), and end to end through `python -m proxy dev ...`.
Certificates are checked by the real verifier and by a real OpenSSL handshake (memory BIOs).
"""

from __future__ import annotations

import argparse
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.core.spiffe import (
    TrustStore,
    load_own_svid,
    parse_pem_bundle,
    parse_spiffe_bundle,
    verify_svid_chain,
)
from proxy.dev.ca import DevCA, generate_ed25519_keypair, write_spiffe_bundle_json
from proxy.dev.cli import build_parser, register

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


# --------------------------------------------------------------------------------------------
# In-process handlers
# --------------------------------------------------------------------------------------------


def test_register_adds_the_three_commands() -> None:
    parser = argparse.ArgumentParser(prog="portcullis")
    dev = parser.add_subparsers(dest="command").add_parser("dev")
    register(dev.add_subparsers(dest="dev_command", required=True))
    args = parser.parse_args(["dev", "keypair", "--out", "x"])
    assert args.func.__name__ == "cmd_keypair"


def test_ca_svid_keypair_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["ca", "--trust-domain", "example.org", "--out", str(tmp_path / "ca")]) == 0
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    assert run(["svid", "--ca", str(tmp_path / "ca"), "--spiffe-id",
                "spiffe://example.org/web", "--out", str(tmp_path / "web"),
                "--ttl-s", "600"]) == 0
    assert run(["keypair", "--out", str(tmp_path / "audit")]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert "PRIVATE" not in out.out  # paths only, never key material

    web = tmp_path / "web"
    assert mode(web / "svid_key.pem") == 0o600
    now = time.time()
    own = load_own_svid((web / "svid.pem").read_bytes(), (web / "svid_key.pem").read_bytes(), now)
    assert str(own.spiffe_id) == "spiffe://example.org/web"
    assert own.not_after <= now + 600
    store = TrustStore.of([parse_pem_bundle("example.org", (web / "svid_bundle.pem").read_bytes())])
    der = x509.load_pem_x509_certificate((web / "svid.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert verify_svid_chain((der,), store, now).uri == "spiffe://example.org/web"
    assert _dns_names(x509.load_pem_x509_certificate((web / "svid.pem").read_bytes())) == \
        ["localhost"]

    audit = tmp_path / "audit"
    assert mode(audit / "audit.key") == 0o600
    private = serialization.load_pem_private_key((audit / "audit.key").read_bytes(), None)
    public = serialization.load_pem_public_key((audit / "audit.pub").read_bytes())
    public.verify(private.sign(b"checkpoint"), b"checkpoint")  # type: ignore[union-attr]


def test_svid_dns_names(tmp_path: Path) -> None:
    assert run(["ca", "--trust-domain", "example.org", "--out", str(tmp_path / "ca")]) == 0
    assert run(["svid", "--ca", str(tmp_path / "ca"), "--spiffe-id", "spiffe://example.org/api",
                "--out", str(tmp_path / "api"), "--dns", "api.local", "--dns", "api"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "api" / "svid.pem").read_bytes())
    assert _dns_names(cert) == ["api.local", "api"]


@pytest.fixture()
def ca_dir(tmp_path: Path) -> Path:
    assert run(["ca", "--trust-domain", "example.org", "--out", str(tmp_path / "ca")]) == 0
    return tmp_path / "ca"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ca", "--trust-domain", "Example.org", "--out", "{tmp}/x"], "trust domain"),
        (["ca", "--trust-domain", "example.org", "--out", "{tmp}/file"], "{tmp}/file"),
        (["svid", "--ca", "{tmp}/missing", "--spiffe-id", "spiffe://example.org/w",
          "--out", "{tmp}/w"], "No such file"),
        (["svid", "--ca", "{ca}", "--spiffe-id", "spiffe://other.org/w", "--out", "{tmp}/w"],
         "not in the CA's trust domain example.org"),
        (["svid", "--ca", "{ca}", "--spiffe-id", "spiffe://example.org/", "--out", "{tmp}/w"],
         "trailing slash"),
        (["svid", "--ca", "{ca}", "--spiffe-id", "spiffe://example.org", "--out", "{tmp}/w"],
         "needs a path"),
        (["svid", "--ca", "{tmp}/badca", "--spiffe-id", "spiffe://example.org/w",
          "--out", "{tmp}/w"], "does not match"),
        (["keypair", "--out", "{tmp}/file"], "{tmp}/file"),
    ],
    ids=["bad_trust_domain", "out_is_a_file", "missing_ca", "foreign_id", "bad_id",
         "id_without_path", "ca_key_mismatch", "keypair_out_is_a_file"],
)
def test_errors_are_one_line_and_exit_2(tmp_path: Path, ca_dir: Path, argv: list[str],
                                        message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "badca"
    bad.mkdir()
    (bad / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())
    (bad / "ca.key").write_bytes(DevCA.create("example.org").write(tmp_path / "other")["key"]
                                 .read_bytes())
    capsys.readouterr()
    argv = [a.format(tmp=tmp_path, ca=ca_dir) for a in argv]
    assert run(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"portcullis dev {argv[0]}: error: ")
    assert message.format(tmp=tmp_path) in lines[0]
    assert "PRIVATE" not in out.err


@pytest.mark.parametrize("ttl", ["0", "-5", "soon"])
def test_ttl_must_be_a_positive_integer(ttl: str) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["ca", "--trust-domain", "a.test", "--out", "x", "--ttl-s", ttl])
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------
# Through `python -m proxy dev ...` (needs proxy/cli.py to mount `dev`)
# --------------------------------------------------------------------------------------------


def portcullis(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "proxy", "dev", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_subprocess_flow(tmp_path: Path) -> None:
    done = portcullis("ca", "--trust-domain", "demo.test", "--out", str(tmp_path / "ca"))
    assert done.returncode == 0, done.stderr
    done = portcullis("svid", "--ca", str(tmp_path / "ca"), "--spiffe-id",
                      "spiffe://demo.test/client", "--out", str(tmp_path / "client"))
    assert done.returncode == 0, done.stderr
    done = portcullis("keypair", "--out", str(tmp_path / "audit"))
    assert done.returncode == 0, done.stderr
    for name in ("ca/ca.pem", "ca/ca.key", "client/svid.pem", "client/svid_key.pem",
                 "client/svid_bundle.pem", "audit/audit.key", "audit/audit.pub"):
        assert (tmp_path / name).is_file(), name
    assert mode(tmp_path / "ca" / "ca.key") == 0o600


def test_subprocess_error_exits_2(tmp_path: Path) -> None:
    done = portcullis("svid", "--ca", str(tmp_path / "nothing"), "--spiffe-id",
                      "spiffe://demo.test/x", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "portcullis dev svid: error:" in done.stderr


# --------------------------------------------------------------------------------------------
# The dev CA itself
# --------------------------------------------------------------------------------------------


def test_intermediate_ca_write_and_load_round_trip(tmp_path: Path) -> None:
    root = DevCA.create("a.test")
    inter = root.intermediate()
    inter.write(tmp_path)
    loaded = DevCA.load(tmp_path)
    assert loaded.trust_domain == "a.test"
    assert loaded.cert == inter.cert and loaded.root.cert == root.cert
    assert loaded.root.key is None  # only the written key is known
    svid = loaded.issue_svid("spiffe://a.test/w")
    store = TrustStore.of([parse_pem_bundle("a.test", loaded.bundle_pem())])
    assert verify_svid_chain(svid.chain_der(), store, time.time()).uri == "spiffe://a.test/w"
    with pytest.raises(ValueError, match="without its private key"):
        loaded.root.issue_svid("spiffe://a.test/x")


def test_svid_write_uses_spiffe_helper_layout(tmp_path: Path) -> None:
    root = DevCA.create("a.test")
    svid = root.intermediate().issue_svid("spiffe://a.test/w")
    paths = svid.write(tmp_path)
    assert {p.name for p in paths.values()} == {"svid.pem", "svid_key.pem", "svid_bundle.pem"}
    assert len(x509.load_pem_x509_certificates(paths["cert"].read_bytes())) == 2
    assert paths["bundle"].read_bytes() == root.bundle_pem()
    assert mode(paths["key"]) == 0o600


def test_issue_svid_checks_the_spiffe_id() -> None:
    with pytest.raises(ValueError):
        DevCA.create("a.test").issue_svid("spiffe://a.test/bad/")


def test_spiffe_bundle_json_is_one_trust_domain() -> None:
    a, b = DevCA.create("a.test"), DevCA.create("b.test")
    with pytest.raises(ValueError, match="one trust domain"):
        write_spiffe_bundle_json([a, b])
    rotated = DevCA.create("a.test")
    bundle = parse_spiffe_bundle("a.test", write_spiffe_bundle_json([a, a.intermediate(), rotated]))
    assert bundle.x509_authorities == (a.cert, rotated.cert)


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_spiffe_bundle_json_key_types(key_type: str) -> None:
    ca = DevCA.create("a.test", key_type=key_type)
    jwt = DevCA.create("a.test", key_type=key_type).key.public_key()
    bundle = parse_spiffe_bundle("a.test", write_spiffe_bundle_json([ca], jwt_keys={"k": jwt}))
    assert bundle.x509_authorities == (ca.cert,)
    assert bundle.jwt_authorities["k"]["kty"] == {"ec": "EC", "rsa": "RSA", "ed25519": "OKP"}[
        key_type]


def test_ed25519_keypair_is_pem() -> None:
    private_pem, public_pem = generate_ed25519_keypair()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_openssl_accepts_dev_svids_for_mutual_tls(tmp_path: Path) -> None:
    """A real TLS 1.3 handshake (memory BIOs, no sockets) with certificates from the dev CA:
    the server SVID passes hostname checks for localhost, the client SVID passes client auth, and
    the client chain OpenSSL saw verifies as a SPIFFE identity."""
    root = DevCA.create("mesh.test")
    inter = root.intermediate()
    server = inter.issue_svid("spiffe://mesh.test/server").write(tmp_path / "server")
    client = inter.issue_svid("spiffe://mesh.test/client").write(tmp_path / "client")

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server["cert"], server["key"])
    server_ctx.load_verify_locations(server["bundle"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(client["cert"], client["key"])
    client_ctx.load_verify_locations(client["bundle"])

    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    c = client_ctx.wrap_bio(bios[2], bios[3], server_hostname="localhost")
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, conn, out_bio, peer_in in (("c", c, bios[3], bios[0]),
                                             ("s", s, bios[1], bios[2])):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out_bio.read())
        if all(done.values()):
            break
    c.write(b"x")  # TLS 1.3: the server sees the client certificate once it reads
    bios[0].write(bios[3].read())
    assert s.read(1) == b"x"
    assert all(done.values())
    leaf_der = s.getpeercert(binary_form=True)
    store = TrustStore.of([parse_pem_bundle("mesh.test", root.bundle_pem())])
    chain = (leaf_der, inter.cert.public_bytes(serialization.Encoding.DER))
    assert verify_svid_chain(chain, store, time.time()).uri == "spiffe://mesh.test/client"
