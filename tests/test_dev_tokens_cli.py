"""`portcullis dev issuer|token|dpop-key|dpop`: a throw-away authorization server on the command line.

Every command runs as a user runs it, `python -m proxy dev ...` in a subprocess. What it mints is
checked by the real verifiers of the sidecar (`proxy.core.tokens.verify_access_token`,
`proxy.core.dpop.verify_dpop_proof` and `check_binding`), never by string inspection alone. Bad
input exits 2 with one `portcullis dev <command>: error: ...` line and nothing on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.core.dpop import (DPoPConfig, NonceIssuer, check_binding, request_uri,
                             verify_dpop_proof)
from proxy.core.jose import b64url_decode, b64url_encode, parse_jwks, thumbprint
from proxy.core.replay import MemoryReplayStore
from proxy.core.tokens import IssuerPolicy, verify_access_token
from proxy.dev import tokens as devtokens
from proxy.dev.ca import DevCA, public_jwk
from proxy.errors import DPoPError, TokenError

REPO = Path(__file__).resolve().parents[1]
ISS = "https://idp.example.org"
AUD = "https://orders.example.org"
ORIGIN = "https://orders.example.org:8443"
AGENT = "spiffe://example.org/agents/expense-assistant"


def dev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "dev", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def ok(*args: str) -> str:
    """stdout of a command that must succeed, with nothing on stderr and no key material."""
    r = dev(*args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "PRIVATE" not in r.stdout
    return r.stdout


def one_line(*args: str) -> str:
    out = ok(*args)
    assert out.endswith("\n") and out.count("\n") == 1, out
    return out.strip()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def jws_parts(compact: str) -> tuple[dict, dict]:
    h, p, _ = compact.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p))


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idp")
    ok("issuer", "--out", str(out), "--kid", "idp-1")
    return out


def issuers(directory: Path, alg: str = "ES256", **kw) -> dict:
    jwks = parse_jwks((directory / "jwks.json").read_bytes())
    policy = IssuerPolicy(issuer=ISS, audiences=frozenset({AUD}), algorithms=frozenset({alg}),
                          require_at_jwt_typ=True, **kw)
    return {ISS: (policy, jwks)}


def token_args(idp: Path, *extra: str) -> list[str]:
    return ["token", "--issuer-key", str(idp / "issuer.key"), "--kid", "idp-1", "--iss", ISS,
            "--aud", AUD, "--sub", "alice", *extra]


DPOP = DPoPConfig(algorithms=frozenset({"ES256", "EdDSA", "RS256", "PS256"}))


def verify_proof(proof: str, *, method: str, path: str, token: str | None, **kw):
    return verify_dpop_proof([proof], method=method, htu=request_uri(ORIGIN, path),
                             access_token=token, config=kw.pop("config", DPOP),
                             replay=kw.pop("replay", MemoryReplayStore()),
                             now=kw.pop("now", time.time()), **kw)


# --------------------------------------------------------------------------------------------
# dev issuer
# --------------------------------------------------------------------------------------------


def test_issuer_writes_a_0600_key_and_a_public_jwks_with_kid_alg_use(tmp_path: Path) -> None:
    out = ok("issuer", "--out", str(tmp_path / "idp"), "--kid", "idp-7")
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines == {"key": str(tmp_path / "idp" / "issuer.key"),
                     "jwks": str(tmp_path / "idp" / "jwks.json"), "kid": "idp-7", "alg": "ES256"}
    assert mode(tmp_path / "idp" / "issuer.key") == 0o600
    doc = json.loads((tmp_path / "idp" / "jwks.json").read_text())
    (jwk,) = doc["keys"]
    assert {k: jwk[k] for k in ("kty", "crv", "kid", "alg", "use")} == \
        {"kty": "EC", "crv": "P-256", "kid": "idp-7", "alg": "ES256", "use": "sig"}
    assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & jwk.keys()
    key = serialization.load_pem_private_key((tmp_path / "idp" / "issuer.key").read_bytes(), None)
    assert thumbprint(jwk) == devtokens.jwk_thumbprint(key)  # the JWKS holds THIS key
    assert parse_jwks(doc).by_kid["idp-7"][0].alg == "ES256"


def test_issuer_kid_defaults_to_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    out = ok("issuer", "--out", str(tmp_path))
    kid = dict(line.split(": ", 1) for line in out.splitlines())["kid"]
    (jwk,) = json.loads((tmp_path / "jwks.json").read_text())["keys"]
    assert kid == jwk["kid"] == thumbprint(jwk)


@pytest.mark.parametrize("alg,kty", [("ES256", "EC"), ("EdDSA", "OKP"), ("RS256", "RSA"),
                                     ("ES384", "EC")])
def test_tokens_of_every_issuer_algorithm_verify(tmp_path: Path, alg: str, kty: str) -> None:
    ok("issuer", "--out", str(tmp_path), "--alg", alg, "--kid", "k")
    (jwk,) = json.loads((tmp_path / "jwks.json").read_text())["keys"]
    assert jwk["kty"] == kty and jwk["alg"] == alg
    tok = one_line("token", "--issuer-key", str(tmp_path / "issuer.key"), "--kid", "k",
                   "--iss", ISS, "--aud", AUD, "--sub", "alice")
    assert jws_parts(tok)[0]["alg"] == alg
    claims = verify_access_token(tok, issuers(tmp_path, alg), time.time())
    assert claims.subject == "alice"


def test_an_rsa_issuer_key_can_sign_ps256_when_asked(tmp_path: Path) -> None:
    ok("issuer", "--out", str(tmp_path), "--alg", "PS256", "--kid", "k")
    tok = one_line("token", "--issuer-key", str(tmp_path / "issuer.key"), "--kid", "k",
                   "--alg", "PS256", "--iss", ISS, "--aud", AUD, "--sub", "alice")
    assert verify_access_token(tok, issuers(tmp_path, "PS256"), time.time()).subject == "alice"


# --------------------------------------------------------------------------------------------
# dev token
# --------------------------------------------------------------------------------------------


def test_token_carries_every_claim_and_verifies_as_an_at_jwt(idp: Path) -> None:
    details = [{"type": "invoice_approval", "invoice_id": "INV-1", "max_amount": 5000}]
    before = int(time.time())
    tok = one_line(*token_args(
        idp, "--client-id", "expense-app", "--scope", "invoices:read invoices:approve",
        "--acr", "urn:example:mfa", "--amr", "pwd,otp", "--auth-time", str(before - 60),
        "--act", AGENT, "--act", "spiffe://example.org/gateway", "--ttl-s", "120",
        "--authorization-details", json.dumps(details),
        "--claim", "department=finance", "--claim-json", "level=3"))
    header, payload = jws_parts(tok)
    assert header == {"alg": "ES256", "kid": "idp-1", "typ": "at+jwt"}
    claims = verify_access_token(tok, issuers(idp), time.time())
    assert (claims.issuer, claims.subject, claims.audience) == (ISS, "alice", (AUD,))
    assert claims.client_id == "expense-app"
    assert claims.scopes == {"invoices:read", "invoices:approve"}
    assert claims.acr == "urn:example:mfa" and claims.amr == ("pwd", "otp")
    assert claims.auth_time == before - 60
    # the current actor is the first --act, the outermost act
    assert [a.sub for a in claims.actors] == [AGENT, "spiffe://example.org/gateway"]
    assert payload["act"] == {"sub": AGENT, "act": {"sub": "spiffe://example.org/gateway"}}
    assert [dict(d) for d in claims.authorization_details] == details
    assert claims.claims["department"] == "finance" and claims.claims["level"] == 3
    assert claims.expires_at - claims.issued_at == 120
    assert payload["nbf"] == payload["iat"] and before <= payload["iat"] <= time.time()
    assert claims.cnf_jkt is None and claims.cnf_x5t_s256 is None


def test_token_minimal_has_a_random_jti_and_a_five_minute_lifetime(idp: Path) -> None:
    a, b = (jws_parts(one_line(*token_args(idp)))[1] for _ in range(2))
    assert a["jti"] != b["jti"] and len(a["jti"]) >= 16
    assert a["exp"] - a["iat"] == 300
    assert not {"act", "cnf", "scope", "client_id", "authorization_details"} & a.keys()


def test_several_audiences_make_an_array(idp: Path) -> None:
    tok = one_line(*token_args(idp, "--aud", "https://other.example"))
    assert jws_parts(tok)[1]["aud"] == [AUD, "https://other.example"]
    assert verify_access_token(tok, issuers(idp), time.time()).audience == \
        (AUD, "https://other.example")


def test_claim_options_are_applied_last(idp: Path) -> None:
    tok = one_line(*token_args(idp, "--claim-json", "exp=1"))
    with pytest.raises(TokenError) as err:
        verify_access_token(tok, issuers(idp), time.time())
    assert err.value.code == "token_expired"


def test_token_signed_for_another_kid_is_refused_by_the_verifier(idp: Path) -> None:
    tok = one_line("token", "--issuer-key", str(idp / "issuer.key"), "--kid", "idp-2",
                   "--iss", ISS, "--aud", AUD, "--sub", "alice")
    with pytest.raises(TokenError) as err:
        verify_access_token(tok, issuers(idp), time.time())
    assert err.value.code == "token_unknown_kid"


def test_token_from_another_issuers_key_does_not_verify(idp: Path, tmp_path: Path) -> None:
    ok("issuer", "--out", str(tmp_path), "--kid", "idp-1")  # same kid, another key
    tok = one_line("token", "--issuer-key", str(tmp_path / "issuer.key"), "--kid", "idp-1",
                   "--iss", ISS, "--aud", AUD, "--sub", "alice")
    with pytest.raises(TokenError) as err:
        verify_access_token(tok, issuers(idp), time.time())
    assert err.value.code == "token_bad_signature"


def test_ttl_is_honoured_by_the_verifier(idp: Path) -> None:
    tok = one_line(*token_args(idp, "--ttl-s", "60"))
    now = time.time()
    verify_access_token(tok, issuers(idp, leeway_s=0), now)
    with pytest.raises(TokenError) as err:
        verify_access_token(tok, issuers(idp, leeway_s=0), now + 61)
    assert err.value.code == "token_expired"


# --------------------------------------------------------------------------------------------
# dev dpop-key, dev dpop, and DPoP-bound tokens
# --------------------------------------------------------------------------------------------


def test_dpop_key_is_written_0600_and_only_its_jkt_is_printed(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "client.key"
    jkt = one_line("dpop-key", "--out", str(path))
    assert mode(path) == 0o600
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert jkt == devtokens.jwk_thumbprint(key) and len(jkt) == 43


def test_dpop_key_narrows_an_existing_wider_file_to_0600(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    one_line("dpop-key", "--out", str(path))
    assert mode(path) == 0o600


def test_dpop_bound_token_and_proof_pass_every_check(idp: Path, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    jkt = one_line("dpop-key", "--out", str(key))
    tok = one_line(*token_args(idp, "--dpop-key", str(key)))
    claims = verify_access_token(tok, issuers(idp), time.time())
    assert claims.cnf_jkt == jkt
    url = f"{ORIGIN}/api/invoices/INV-1/approve?amount=10#frag"
    proof = one_line("dpop", "--key", str(key), "--method", "POST", "--url", url,
                     "--token", tok)
    header, payload = jws_parts(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert "d" not in header["jwk"] and thumbprint(header["jwk"]) == jkt
    assert payload["htu"] == f"{ORIGIN}/api/invoices/INV-1/approve"  # no query, no fragment
    verified = verify_proof(proof, method="POST", path="/api/invoices/INV-1/approve", token=tok,
                            expected_jkt=claims.cnf_jkt)
    assert verified.jkt == jkt
    assert check_binding(claims, "DPoP", verified, None, "dpop", DPOP.algs).kind == "dpop"


def test_dpop_jkt_binds_like_the_key_file(idp: Path, tmp_path: Path) -> None:
    jkt = one_line("dpop-key", "--out", str(tmp_path / "client.key"))
    tok = one_line(*token_args(idp, f"--dpop-jkt={jkt}"))
    assert verify_access_token(tok, issuers(idp), time.time()).cnf_jkt == jkt


def test_dpop_jkt_that_starts_with_a_dash_is_taken_in_both_spellings(idp: Path) -> None:
    # A base64url thumbprint begins with '-' once in 64 keys; plain argparse reads
    # `--dpop-jkt -x...` as a missing value (a CI run hit exactly that)
    while not (jkt := thumbprint(public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
               ).startswith("-"):
        pass
    for spelling in ([f"--dpop-jkt={jkt}"], ["--dpop-jkt", jkt]):
        tok = one_line(*token_args(idp, *spelling))
        assert verify_access_token(tok, issuers(idp), time.time()).cnf_jkt == jkt


def test_a_server_nonce_that_starts_with_a_dash_is_taken(tmp_path: Path) -> None:
    # the same for nonces (a CI run hit it: a NonceIssuer nonce is base64url too)
    key = tmp_path / "client.key"
    one_line("dpop-key", "--out", str(key))
    nonce = "-" + "A" * 23
    for spelling in (["--nonce", nonce], [f"--nonce={nonce}"]):
        proof = one_line("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x",
                         *spelling)
        assert jws_parts(proof)[1]["nonce"] == nonce
    # a missing value is still an error
    r = dev("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x", "--nonce")
    assert r.returncode == 2 and "--nonce" in r.stderr


def test_each_proof_has_a_fresh_jti_and_a_replay_is_caught(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    one_line("dpop-key", "--out", str(key))
    args = ("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x")
    first, second = one_line(*args), one_line(*args)
    assert jws_parts(first)[1]["jti"] != jws_parts(second)[1]["jti"]
    replay, now = MemoryReplayStore(), time.time()
    for proof in (first, second):
        verify_proof(proof, method="GET", path="/x", token=None, replay=replay, now=now)
    with pytest.raises(DPoPError) as err:
        verify_proof(first, method="GET", path="/x", token=None, replay=replay, now=now)
    assert err.value.code == "dpop_replayed"


def test_proof_without_token_has_no_ath_and_with_another_token_fails(idp: Path,
                                                                     tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    one_line("dpop-key", "--out", str(key))
    bare = one_line("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x")
    assert "ath" not in jws_parts(bare)[1]
    tok = one_line(*token_args(idp, "--dpop-key", str(key)))
    other = one_line(*token_args(idp, "--dpop-key", str(key)))
    proof = one_line("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x",
                     "--token", tok)
    assert jws_parts(proof)[1]["ath"] == b64url_encode(hashlib.sha256(tok.encode()).digest())
    with pytest.raises(DPoPError) as err:
        verify_proof(proof, method="GET", path="/x", token=other)
    assert err.value.code == "dpop_ath_mismatch"
    with pytest.raises(DPoPError) as err:
        verify_proof(bare, method="GET", path="/x", token=tok)
    assert err.value.code == "dpop_missing_claim"


def test_proof_names_its_method_and_url(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    one_line("dpop-key", "--out", str(key))
    proof = one_line("dpop", "--key", str(key), "--method", "POST", "--url", f"{ORIGIN}/a")
    with pytest.raises(DPoPError) as err:
        verify_proof(proof, method="GET", path="/a", token=None)
    assert err.value.code == "dpop_htm_mismatch"
    with pytest.raises(DPoPError) as err:
        verify_proof(proof, method="POST", path="/b", token=None)
    assert err.value.code == "dpop_htu_mismatch"


def test_proof_carries_the_server_nonce(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    one_line("dpop-key", "--out", str(key))
    nonces, now = NonceIssuer(b"s" * 32), time.time()
    config = DPoPConfig(algorithms=frozenset({"ES256"}), require_nonce=True)
    checks = {"nonce_check": lambda n: nonces.valid(n, now),
              "current_nonce": lambda: nonces.current(now)}
    good = one_line("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x",
                    "--nonce", nonces.current(now))
    verify_proof(good, method="GET", path="/x", token=None, config=config, now=now, **checks)
    stale = one_line("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x",
                     "--nonce", "A" * 24)
    with pytest.raises(DPoPError) as err:
        verify_proof(stale, method="GET", path="/x", token=None, config=config, now=now, **checks)
    assert err.value.code == "dpop_nonce_required"


def test_proof_iat_option_sets_the_time(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    one_line("dpop-key", "--out", str(key))
    old = int(time.time()) - 3600
    proof = one_line("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x",
                     "--iat", str(old))
    with pytest.raises(DPoPError) as err:
        verify_proof(proof, method="GET", path="/x", token=None)
    assert err.value.code == "dpop_iat_out_of_window"


@pytest.mark.parametrize("alg", ["EdDSA", "RS256"])
def test_other_proof_key_algorithms_verify(tmp_path: Path, alg: str) -> None:
    key = tmp_path / "client.key"
    jkt = one_line("dpop-key", "--out", str(key), "--alg", alg)
    proof = one_line("dpop", "--key", str(key), "--method", "GET", "--url", f"{ORIGIN}/x")
    assert jws_parts(proof)[0]["alg"] == alg
    assert verify_proof(proof, method="GET", path="/x", token=None).jkt == jkt


# --------------------------------------------------------------------------------------------
# mTLS-bound tokens (RFC 8705)
# --------------------------------------------------------------------------------------------


def test_mtls_cert_binds_the_token_to_that_certificate(idp: Path, tmp_path: Path) -> None:
    ca = DevCA.create("example.org")
    mine = ca.issue_svid("spiffe://example.org/frontend")
    other = ca.issue_svid("spiffe://example.org/batch")
    mine.write(tmp_path / "frontend")  # svid.pem = leaf + chain, as a client presents it
    tok = one_line(*token_args(idp, "--mtls-cert", str(tmp_path / "frontend" / "svid.pem")))
    claims = verify_access_token(tok, issuers(idp), time.time())
    der = mine.cert.public_bytes(serialization.Encoding.DER)
    assert claims.cnf_x5t_s256 == b64url_encode(hashlib.sha256(der).digest())
    binding = check_binding(claims, "Bearer", None, hashlib.sha256(der).digest(), "mtls", "")
    assert binding.kind == "mtls"
    other_der = other.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(TokenError) as err:
        check_binding(claims, "Bearer", None, hashlib.sha256(other_der).digest(), "mtls", "")
    assert err.value.code == "mtls_binding_mismatch"


def test_mtls_cert_may_be_der(idp: Path, tmp_path: Path) -> None:
    svid = DevCA.create("example.org").issue_svid("spiffe://example.org/frontend")
    der = svid.cert.public_bytes(serialization.Encoding.DER)
    (tmp_path / "leaf.der").write_bytes(der)
    tok = one_line(*token_args(idp, "--mtls-cert", str(tmp_path / "leaf.der")))
    assert verify_access_token(tok, issuers(idp), time.time()).cnf_x5t_s256 == \
        b64url_encode(hashlib.sha256(der).digest())


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, nothing on stdout
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, idp: Path) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.pem").write_text("not a key\n")
    encrypted = devtokens.new_signing_key("ES256").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    (d / "encrypted.pem").write_bytes(encrypted)
    ok("dpop-key", "--out", str(d / "client.key"))
    k1 = ec.generate_private_key(ec.SECP256K1())  # a curve JOSE has no ES algorithm for here
    (d / "secp256k1.pem").write_bytes(devtokens.private_key_pem(k1))
    return {"key": str(idp / "issuer.key"), "jwks": str(idp / "jwks.json"),
            "k1": str(d / "secp256k1.pem"),
            "garbage": str(d / "garbage.pem"), "encrypted": str(d / "encrypted.pem"),
            "client": str(d / "client.key"), "missing": str(d / "missing.pem"), "dir": str(d)}


def fill(argv: list[str], files: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for name, value in files.items():
            a = a.replace("{" + name + "}", value)
        out.append(a)
    return out


BASE = ["--kid", "k", "--iss", ISS, "--aud", AUD, "--sub", "alice"]
BAD_BODY = [  # refused by the command itself: exactly one error line
    ("issuer", ["issuer", "--out", "{dir}/i1", "--alg", "HS256"], "algorithm must be one of"),
    ("issuer", ["issuer", "--out", "{dir}/i2", "--alg", "none"], "algorithm must be one of"),
    ("issuer", ["issuer", "--out", "{dir}/i3", "--kid", ""], "kid must not be empty"),
    ("issuer", ["issuer", "--out", "{garbage}"], "File exists"),
    ("token", ["token", "--issuer-key", "{missing}", *BASE], "No such file"),
    ("token", ["token", "--issuer-key", "{garbage}", *BASE], "not a PEM private key"),
    ("token", ["token", "--issuer-key", "{jwks}", *BASE], "not a PEM private key"),
    ("token", ["token", "--issuer-key", "{encrypted}", *BASE], "encrypted"),
    ("token", ["token", "--issuer-key", "{k1}", *BASE], "unsupported EC curve"),
    ("token", ["token", "--issuer-key", "{key}", "--alg", "EdDSA", *BASE], "does not fit"),
    ("token", ["token", "--issuer-key", "{key}", "--alg", "HS256", *BASE], "must be one of"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--claim", "noequals"], "name=value"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--claim", "=v"], "name=value"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--claim-json", "x={nope"], "not JSON"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--claim", "x=1", "--claim-json", "x=2"],
     "claim given twice"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--authorization-details", "[{"],
     "not JSON"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--authorization-details",
               '[{"max_amount": 5}]'], "string type"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--authorization-details", "[]"],
     "string type"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--scope", 'a "b"'], "scope-token"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--amr", "pwd,,otp"], "--amr"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--dpop-jkt", "short"], "cnf jkt"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--dpop-key", "{garbage}"],
     "not a PEM private key"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--mtls-cert", "{garbage}"],
     "not a PEM or DER certificate"),
    ("token", ["token", "--issuer-key", "{key}", *BASE, "--mtls-cert", "{missing}"],
     "No such file"),
    ("token", ["token", "--issuer-key", "{key}", "--kid", "", "--iss", ISS, "--aud", AUD,
               "--sub", "alice"], "kid must be a non-empty string"),
    ("token", ["token", "--issuer-key", "{key}", "--kid", "k", "--iss", ISS, "--aud", "",
               "--sub", "alice"], "aud must be"),
    ("dpop-key", ["dpop-key", "--out", "{dir}/k.pem", "--alg", "HS256"], "must be one of"),
    ("dpop-key", ["dpop-key", "--out", "{dir}"], "Is a directory"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GET", "--url", "ftp://h/x"], "http"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GET", "--url", "/just/a/path"], "http"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GET", "--url", "https://u:p@h/x"],
     "userinfo"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GET", "--url", "https://h:99999/x"],
     "not a valid URL"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GE T", "--url", "https://h/x"],
     "method"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GET", "--url", "https://h/x",
              "--token", "t\u00e9"], "ASCII"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GET", "--url", "https://h/x",
              "--token", "DPoP abc"], "one non-empty word"),
    ("dpop", ["dpop", "--key", "{client}", "--method", "GET", "--url", "https://h/x",
              "--alg", "EdDSA"], "does not fit"),
    ("dpop", ["dpop", "--key", "{missing}", "--method", "GET", "--url", "https://h/x"],
     "No such file"),
]


@pytest.mark.parametrize("command,argv,reason", BAD_BODY,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(BAD_BODY)])
def test_bad_input_exits_2_with_one_error_line(files: dict[str, str], command: str,
                                               argv: list[str], reason: str) -> None:
    r = dev(*fill(argv, files))
    assert r.returncode == 2
    assert r.stdout == ""
    line = r.stderr.strip()
    assert "\n" not in line, r.stderr
    assert line.startswith(f"portcullis dev {command}: error: "), line
    assert reason in line, line
    assert "PRIVATE" not in r.stderr


BAD_ARGS = [  # refused by the argument parser (usage + error line), also exit 2
    ["token", "--issuer-key", "{key}", *BASE, "--dpop-key", "{client}", "--mtls-cert", "{key}"],
    ["token", "--issuer-key", "{key}", *BASE, "--ttl-s", "0"],
    ["token", "--issuer-key", "{key}", *BASE, "--auth-time", "yesterday"],
    ["token", "--issuer-key", "{key}", "--kid", "k", "--aud", AUD, "--sub", "alice"],
    ["dpop", "--key", "{client}", "--url", "https://h/x"],
    ["dpop", "--key", "{client}", "--method", "GET", "--url", "https://h/x", "--iat", "now"],
    ["dpop-key"],
    ["issuer"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=[str(i) for i in range(len(BAD_ARGS))])
def test_bad_arguments_exit_2(files: dict[str, str], argv: list[str]) -> None:
    r = dev(*fill(argv, files))
    assert r.returncode == 2 and r.stdout == ""
    assert "error:" in r.stderr.splitlines()[-1]


def test_algorithm_list_is_every_asymmetric_jose_algorithm() -> None:
    from proxy.core.jose import ASYMMETRIC_ALGS

    assert frozenset(devtokens.ALGORITHMS) == ASYMMETRIC_ALGS


def test_the_existing_dev_commands_are_still_there(tmp_path: Path) -> None:
    out = ok("ca", "--trust-domain", "example.org", "--out", str(tmp_path / "ca"))
    assert f"cert: {tmp_path / 'ca' / 'ca.pem'}" in out
    ok("svid", "--ca", str(tmp_path / "ca"), "--spiffe-id", "spiffe://example.org/web",
       "--out", str(tmp_path / "web"))
    ok("keypair", "--out", str(tmp_path / "audit"))
    assert mode(tmp_path / "web" / "svid_key.pem") == 0o600
