"""Tokens end to end with the dev authorization server on the command line: a real sidecar on
127.0.0.1, `portcullis dev issuer|token|dpop-key|dpop` run as subprocesses, and curl sending what
they print. What a user types (see `config/sidecar.example.yaml` for every `tokens:` key):

    # a CA, the sidecar's SVID and a client SVID
    portcullis dev ca --trust-domain example.org --out pki/ca
    portcullis dev svid --ca pki/ca --spiffe-id spiffe://example.org/ns/demo/sa/sidecar --out pki/sidecar
    portcullis dev svid --ca pki/ca --spiffe-id spiffe://example.org/ns/demo/sa/frontend --out pki/frontend

    # the token issuer: idp/issuer.key (0600) and idp/jwks.json
    portcullis dev issuer --out idp --kid idp-1

    # sidecar.yaml
    #   tokens:
    #     issuers:
    #       - issuer: https://idp.example.org
    #         audiences: [https://orders.example.org]
    #         algorithms: [ES256]
    #         jwks_file: idp/jwks.json
    #     dpop:
    #       public_origin: https://127.0.0.1:8443    # the origin clients put in htu
    #       require_nonce: false                     # true: 401 use_dpop_nonce + DPoP-Nonce first

    # a DPoP-bound token (cnf.jkt) for alice, with the frontend as the acting agent
    portcullis dev dpop-key --out agent.key          # prints the key's jkt
    TOKEN=$(portcullis dev token --issuer-key idp/issuer.key --kid idp-1 \\
              --iss https://idp.example.org --aud https://orders.example.org --sub alice \\
              --act spiffe://example.org/ns/demo/sa/frontend --dpop-key agent.key)

    # one fresh proof per request (the sidecar refuses a proof it has seen: dpop_replayed)
    URL=https://127.0.0.1:8443/api/invoices/INV-1
    PROOF=$(portcullis dev dpop --key agent.key --method GET --url "$URL" --token "$TOKEN")
    curl --cacert pki/ca/ca.pem --cert pki/frontend/svid.pem --key pki/frontend/svid_key.pem \\
         -H "Authorization: DPoP $TOKEN" -H "DPoP: $PROOF" "$URL"

    # with require_nonce: true, the first answer is 401 with a DPoP-Nonce header; sign it in:
    PROOF=$(portcullis dev dpop --key agent.key --method GET --url "$URL" --token "$TOKEN" \\
              --nonce "$NONCE_FROM_THE_DPOP_NONCE_HEADER")

    # an mTLS-bound token (cnf x5t#S256), good only over a connection with that certificate
    TOKEN=$(portcullis dev token ... --mtls-cert pki/frontend/svid.pem)
    curl ... --cert pki/frontend/svid.pem --key pki/frontend/svid_key.pem \\
         -H "Authorization: Bearer $TOKEN" https://127.0.0.1:8443/api/mtls/x

    # RFC 9396 details the policy compares with the request (`require.authorization_details`)
    TOKEN=$(portcullis dev token ... --dpop-key agent.key \\
              --authorization-details '[{"type":"payment","payment_id":"p-1","max_amount":100}]')
    URL="https://127.0.0.1:8443/api/payments/p-1?amount=50"      # htu leaves the query out
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import curl
from tests.factories import FRONTEND_ID, free_port

REPO = Path(__file__).resolve().parents[2]
ISS = "https://idp.example.org"
AUD = "https://orders.example.org"

POLICY = {
    "version": 1,
    "authentication": [
        {"paths": ["/api/invoices/**"], "token": "required", "binding": "dpop"},
        {"paths": ["/api/mtls/**"], "token": "required", "binding": "mtls"},
        {"paths": ["/api/payments/**"], "token": "required", "binding": "dpop"},
    ],
    "rules": [
        {"id": "alice-via-frontend", "effect": "allow",
         "from": {"subjects": [{"issuer": ISS, "sub": "alice"}], "actors": [FRONTEND_ID]},
         "require": {"peer_is": "actor"},
         "to": [{"paths": ["/api/invoices/**", "/api/mtls/**"]}]},
        {"id": "payment-within-consent", "effect": "allow",
         "from": {"subjects": [{"issuer": ISS, "sub": "*"}]},
         "require": {"authorization_details": {
             "type": "payment", "match": {"payment_id": "payment_id"},
             "bounds": {"amount": {"gt": 0, "le": "max_amount"}}}},
         "to": [{"methods": ["POST"], "paths": ["/api/payments/{payment_id}"]}]},
    ],
}


async def portcullis_dev(*args: str) -> str:
    """`python -m proxy dev ...` as a subprocess (the sidecar shares this event loop, so never
    block it); its single stdout line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "dev", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


class Idp:
    """The dev authorization server: `dev issuer` output plus the commands that use it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def jwks(self) -> Path:
        return self.dir / "jwks.json"

    async def token(self, *extra: str, sub: str = "alice") -> str:
        return await portcullis_dev("token", "--issuer-key", str(self.dir / "issuer.key"),
                                    "--kid", "idp-1", "--iss", ISS, "--aud", AUD, "--sub", sub,
                                    *extra)

    async def dpop_key(self, name: str = "agent.key") -> Path:
        path = self.dir / name
        await portcullis_dev("dpop-key", "--out", str(path))
        return path

    @staticmethod
    async def proof(key: Path, method: str, url: str, token: str, *extra: str) -> str:
        return await portcullis_dev("dpop", "--key", str(key), "--method", method, "--url", url,
                                    "--token", token, *extra)


@pytest.fixture
async def idp(pki) -> Idp:
    out = pki.root / "idp"
    await portcullis_dev("issuer", "--out", str(out), "--kid", "idp-1")
    return Idp(out)


async def start(sidecar_factory, idp: Idp, *, require_nonce: bool = False):
    port = free_port()  # known before start, so public_origin matches the URL curl uses
    extra = {
        "listener": {"address": "127.0.0.1", "port": port},
        "tokens": {"issuers": [{"issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
                                "jwks_file": str(idp.jwks)}],
                   "dpop": {"public_origin": f"https://127.0.0.1:{port}",
                            "require_nonce": require_nonce}},
    }
    return await sidecar_factory(policy=POLICY, extra=extra)


@pytest.fixture
async def sc(sidecar_factory, idp, upstream):
    return await start(sidecar_factory, idp)


class Reply:
    def __init__(self, status: int, body: bytes, head: str) -> None:
        self.status, self.body = status, body
        self.headers: dict[str, str] = {}
        for line in head.splitlines()[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()

    def error(self) -> str:
        return json.loads(self.body)["error"]


async def call(sc, client, path: str, *, method: str = "GET", auth: str | None = None,
               dpop: str | None = None) -> Reply:
    head = sc.pki.root / f"head-{time.monotonic_ns()}.txt"
    args = ["-X", method, "-D", str(head)]
    if auth is not None:
        args += ["-H", f"Authorization: {auth}"]
    if dpop is not None:
        args += ["-H", f"DPoP: {dpop}"]
    r = await curl(sc.url(path), client, *args, cacert=sc.pki.bundle)
    assert r.rc == 0, r.stderr
    return Reply(r.status, r.body, head.read_text() if head.exists() else "")


async def test_dpop_bound_token_from_the_cli_gets_through(sc, pki, idp, upstream):
    key = await idp.dpop_key()
    token = await idp.token("--act", FRONTEND_ID, "--dpop-key", str(key))
    path = "/api/invoices/INV-1"
    proof = await idp.proof(key, "GET", sc.url(path), token)
    r = await call(sc, pki.client("frontend"), path, auth=f"DPoP {token}", dpop=proof)
    assert r.status == 200, r.body
    got = {n.lower(): v for n, v in json.loads(r.body)["headers"]}
    assert got["x-portcullis-subject"] == "alice"
    assert got["x-portcullis-actor-chain"] == FRONTEND_ID
    assert len(upstream.received) == 1


async def test_the_same_cli_proof_twice_is_a_replay(sc, pki, idp, upstream):
    key = await idp.dpop_key()
    token = await idp.token("--act", FRONTEND_ID, "--dpop-key", str(key))
    path = "/api/invoices/INV-2"
    proof = await idp.proof(key, "GET", sc.url(path), token)
    first = await call(sc, pki.client("frontend"), path, auth=f"DPoP {token}", dpop=proof)
    again = await call(sc, pki.client("frontend"), path, auth=f"DPoP {token}", dpop=proof)
    assert first.status == 200, first.body
    assert again.status == 401 and again.error() == "dpop_replayed"
    assert again.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    fresh = await idp.proof(key, "GET", sc.url(path), token)  # a new proof is fine again
    assert (await call(sc, pki.client("frontend"), path, auth=f"DPoP {token}",
                       dpop=fresh)).status == 200
    assert len(upstream.received) == 2


async def test_mtls_bound_token_only_works_over_its_own_certificate(sc, pki, idp, upstream):
    frontend = pki.client("frontend")
    token = await idp.token("--act", FRONTEND_ID, "--mtls-cert", frontend.cert)
    r = await call(sc, frontend, "/api/mtls/x", auth=f"Bearer {token}")
    assert r.status == 200, r.body
    r = await call(sc, pki.client("batch"), "/api/mtls/x", auth=f"Bearer {token}")
    assert r.status == 401 and r.error() == "mtls_binding_mismatch"
    assert len(upstream.received) == 1


async def test_server_nonce_flow_with_dev_dpop_nonce(sidecar_factory, pki, idp, upstream):
    sc = await start(sidecar_factory, idp, require_nonce=True)
    key = await idp.dpop_key()
    token = await idp.token("--act", FRONTEND_ID, "--dpop-key", str(key))
    path = "/api/invoices/INV-3"
    r = await call(sc, pki.client("frontend"), path, auth=f"DPoP {token}",
                   dpop=await idp.proof(key, "GET", sc.url(path), token))
    assert r.status == 401 and r.error() == "dpop_nonce_required"
    assert r.headers["www-authenticate"].startswith('DPoP error="use_dpop_nonce"')
    nonce = r.headers["dpop-nonce"]
    assert nonce and upstream.received == []
    proof = await idp.proof(key, "GET", sc.url(path), token, "--nonce", nonce)
    r = await call(sc, pki.client("frontend"), path, auth=f"DPoP {token}", dpop=proof)
    assert r.status == 200, r.body
    assert len(upstream.received) == 1


async def test_authorization_details_bound_the_amount(sc, pki, idp, upstream):
    key = await idp.dpop_key()
    details = [{"type": "payment", "payment_id": "p-1", "max_amount": 100}]
    token = await idp.token("--dpop-key", str(key), "--authorization-details",
                            json.dumps(details), sub="bob")

    async def pay(path: str) -> Reply:
        proof = await idp.proof(key, "POST", sc.url(path), token)  # htu without the query
        return await call(sc, pki.client("frontend"), path, method="POST",
                          auth=f"DPoP {token}", dpop=proof)

    within = await pay("/api/payments/p-1?amount=50")
    assert within.status == 200, within.body
    assert (await pay("/api/payments/p-1?amount=100")).status == 200  # le: the bound itself
    above = await pay("/api/payments/p-1?amount=150")
    assert above.status == 403 and above.error() == "no_matching_rule"
    other = await pay("/api/payments/p-2?amount=50")  # an entry for another payment
    assert other.status == 403
    assert [r.target for r in upstream.received] == ["/api/payments/p-1?amount=50",
                                                     "/api/payments/p-1?amount=100"]
