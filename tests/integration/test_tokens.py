"""Tokens end to end: a real sidecar on 127.0.0.1, curl sending `Authorization` and `DPoP` headers as a
client would, a JWKS file and a real HTTPS JWKS server. Who is the human, who is the agent, and is
the token really theirs (RFC 9068, RFC 8693, RFC 9449, RFC 8705, RFC 9470, JWT-SVID)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time

import pytest
from aiohttp import web

from tests.conftest import curl
from tests.dpop_factory import ProofKey, make_proof
from tests.factories import FRONTEND_ID, PARTNER_ID, TD, free_port
from tests.tokens_factory import jwks_doc, key, mint, mint_jwt_svid

ISS = "https://idp.example.org"
AUD = "https://orders.example.org"
AGENT = FRONTEND_ID  # the frontend workload acts as the agent in these tests


def policy_doc() -> dict:
    return {
        "version": 1,
        "authentication": [
            {"paths": ["/public/**"], "token": "forbidden"},
            {"paths": ["/api/invoices/**"], "token": "required", "binding": "dpop"},
            {"paths": ["/api/mtls/**"], "token": "required", "binding": "mtls"},
            {"paths": ["/api/bearer/**"], "token": "required", "binding": "none"},
            {"paths": ["/api/stepup/**"], "token": "required", "binding": "none"},
        ],
        "rules": [
            {"id": "public", "effect": "allow", "from": {"workloads": [f"spiffe://{TD}/**"]},
             "to": [{"paths": ["/public/**"]}]},
            {"id": "alice-via-agent", "effect": "allow",
             "from": {"subjects": [{"issuer": ISS, "sub": "alice"}], "actors": [AGENT]},
             "require": {"peer_is": "actor", "max_delegation_depth": 2},
             "to": [{"paths": ["/api/invoices/**", "/api/mtls/**", "/api/bearer/**"]}]},
            {"id": "stepup", "effect": "allow",
             "from": {"subjects": [{"issuer": ISS, "sub": "*"}]},
             "require": {"acr_values": ["urn:example:mfa"]},
             "to": [{"paths": ["/api/stepup/**"]}]},
            {"id": "workload-only", "effect": "allow", "from": {"workloads": [FRONTEND_ID]},
             "to": [{"paths": ["/api/plain/**"]}]},
        ],
    }


@pytest.fixture
def idp(pki):
    signer = key("ES256", "idp-1")
    path = pki.root / "idp-jwks.json"
    path.write_text(json.dumps(jwks_doc(signer)))
    return signer, path


@pytest.fixture
async def sc(sidecar_factory, pki, idp):
    port = free_port()
    extra = {
        "listener": {"address": "127.0.0.1", "port": port},
        "tokens": {"issuers": [{"issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
                                "jwks_file": str(idp[1])}],
                   "dpop": {"public_origin": f"https://127.0.0.1:{port}"}},
    }
    return await sidecar_factory(policy=policy_doc(), extra=extra)


def cert_thumbprint(client) -> str:
    from cryptography.hazmat.primitives import serialization
    der = client.svid.cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def token(signer, **claims) -> str:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 300, "iat": now,
            "client_id": "expense-app", "scope": "invoices:approve",
            "act": {"sub": AGENT}, "jti": f"t-{time.monotonic_ns()}"}
    for k, v in claims.items():
        if v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return mint(signer, base, typ="at+jwt")


async def call(sc, client, path, *, method="GET", auth=None, dpop=None, headers=()):
    head_file = sc.pki.root / f"head-{time.monotonic_ns()}.txt"
    args = ["-X", method, "-D", str(head_file)]
    if auth:
        args += ["-H", f"Authorization: {auth}"]
    if dpop:
        args += ["-H", f"DPoP: {dpop}"]
    for h in headers:
        args += ["-H", h]
    r = await curl(sc.url(path), client, *args, cacert=sc.pki.bundle)
    r.stderr = head_file.read_text() if head_file.exists() else ""  # the response head
    return r


def challenge(r) -> str:
    for line in r.stderr.splitlines():
        if line.lower().startswith("www-authenticate:"):
            return line.split(":", 1)[1].strip()
    return ""


def htu(sc, path):
    return f"https://127.0.0.1:{sc.port}{path.split('?')[0]}"


async def test_dpop_bound_token_with_fresh_proof_gets_through_with_identity(sc, pki, idp, upstream):
    pk = ProofKey.generate("ES256")
    tok = token(idp[0], cnf={"jkt": pk.jkt})
    path = "/api/invoices/INV-8831/approve"
    proof = make_proof(pk, method="POST", htu=htu(sc, path), iat=int(time.time()), access_token=tok)
    r = await call(sc, pki.client("frontend"), path, method="POST", auth=f"DPoP {tok}", dpop=proof)
    assert r.status == 200, (r.body, r.stderr)
    got = {n.lower(): v for n, v in r.json()["headers"]}
    assert got["x-portcullis-subject"] == "alice" and got["x-portcullis-issuer"] == ISS
    assert got["x-portcullis-actor-chain"] == AGENT
    assert got["x-portcullis-client-id"] == "expense-app"
    assert "authorization" not in got and "dpop" not in got  # credentials stay at the sidecar
    rec = (await sc.wait_records(1))[-1]
    assert rec["subject"] == {"iss": ISS, "sub": "alice"} and rec["actors"] == [AGENT]
    assert rec["binding"] == "dpop" and rec["rule_id"] == "alice-via-agent"
    assert rec["token_fingerprint"] == hashlib.sha256(tok.encode()).hexdigest()
    assert rec["proof_fingerprint"] == hashlib.sha256(proof.encode()).hexdigest()
    raw = sc.audit_path.read_text()
    assert tok not in raw and proof not in raw and tok.split(".")[1] not in raw
    assert sc.worker.metrics.token_results.values[("ok",)] == 1


async def test_replayed_proof_is_refused_with_a_dpop_challenge(sc, pki, idp, upstream):
    pk = ProofKey.generate("ES256")
    tok = token(idp[0], cnf={"jkt": pk.jkt})
    path = "/api/invoices/INV-1/approve"
    proof = make_proof(pk, method="POST", htu=htu(sc, path), iat=int(time.time()), access_token=tok)
    first = await call(sc, pki.client("frontend"), path, method="POST", auth=f"DPoP {tok}", dpop=proof)
    again = await call(sc, pki.client("frontend"), path, method="POST", auth=f"DPoP {tok}", dpop=proof)
    assert first.status == 200 and again.status == 401
    assert again.json()["error"] == "dpop_replayed"
    ch = challenge(again)
    assert ch.startswith("DPoP ") and 'error="invalid_dpop_proof"' in ch and 'algs="' in ch
    assert len(upstream.received) == 1
    assert sc.worker.metrics.dpop_replays.values[()] == 1


async def test_missing_token_on_a_required_route_gets_a_bare_challenge(sc, pki):
    r = await call(sc, pki.client("frontend"), "/api/invoices/x")
    assert r.status == 401 and r.json()["error"] == "token_missing"
    ch = challenge(r)
    assert ch.startswith("DPoP") and "error=" not in ch and 'algs="' in ch  # RFC 6750 3.1


@pytest.mark.parametrize("case,expect", [
    ("bound_as_bearer", "dpop_bound_token_as_bearer"),
    ("unbound_with_dpop_scheme", "dpop_token_not_bound"),
    ("proof_for_other_url", "dpop_htu_mismatch"),
    ("proof_for_other_method", "dpop_htm_mismatch"),
    ("proof_of_other_key", "dpop_key_mismatch"),
    ("no_proof", "dpop_missing"),
    ("expired_token", "token_expired"),
    ("wrong_audience", "token_wrong_audience"),
    ("unknown_issuer", "token_unknown_issuer"),
    ("plain_bearer_on_dpop_route", "binding_required"),
])
async def test_token_and_proof_rejections(sc, pki, idp, case, expect, upstream):
    pk, other = ProofKey.generate("ES256"), ProofKey.generate("ES256")
    path = "/api/invoices/INV-2/approve"
    now = int(time.time())
    tok = token(idp[0], cnf={"jkt": pk.jkt})
    scheme, proof = "DPoP", None
    if case == "bound_as_bearer":
        scheme = "Bearer"
    elif case == "unbound_with_dpop_scheme":
        tok = token(idp[0])
    elif case == "expired_token":
        tok = token(idp[0], cnf={"jkt": pk.jkt}, exp=now - 600, iat=now - 900)
    elif case == "wrong_audience":
        tok = token(idp[0], cnf={"jkt": pk.jkt}, aud="https://elsewhere")
    elif case == "unknown_issuer":
        tok = token(idp[0], cnf={"jkt": pk.jkt}, iss="https://evil.example")
    elif case == "plain_bearer_on_dpop_route":
        tok, scheme = token(idp[0]), "Bearer"
    if case != "no_proof":
        proof = make_proof(other if case == "proof_of_other_key" else pk,
                           method="GET" if case == "proof_for_other_method" else "POST",
                           htu=htu(sc, "/api/other" if case == "proof_for_other_url" else path),
                           iat=now, access_token=tok)
    r = await call(sc, pki.client("frontend"), path, method="POST", auth=f"{scheme} {tok}", dpop=proof)
    assert r.status == 401, r.body
    assert r.json()["error"] == expect
    assert challenge(r).startswith("DPoP ")
    assert upstream.received == []
    rec = (await sc.wait_records(1))[-1]
    assert rec["code"] == expect and rec["decision"] == "deny"
    assert rec["token_fingerprint"] == hashlib.sha256(tok.encode()).hexdigest()
    assert sc.worker.metrics.token_results.values[(expect,)] == 1


async def test_mtls_bound_token_must_match_this_connections_certificate(sc, pki, idp, upstream):
    fe = pki.client("frontend")
    good = token(idp[0], cnf={"x5t#S256": cert_thumbprint(fe)})
    r = await call(sc, fe, "/api/mtls/x", auth=f"Bearer {good}")
    assert r.status == 200 and (await sc.wait_records(1))[-1]["binding"] == "mtls"
    stolen = token(idp[0], cnf={"x5t#S256": cert_thumbprint(pki.client("batch"))})
    r = await call(sc, fe, "/api/mtls/x", auth=f"Bearer {stolen}")
    assert r.status == 401 and r.json()["error"] == "mtls_binding_mismatch"
    assert challenge(r).startswith("Bearer ")  # an mTLS-only route challenges with Bearer


async def test_agent_cannot_use_a_token_minted_for_another_agent(sc, pki, idp, upstream):
    tok = token(idp[0])  # act.sub = frontend, presented by the batch workload
    r = await call(sc, pki.client("batch"), "/api/bearer/x", auth=f"Bearer {tok}")
    assert r.status == 403 and r.json()["error"] == "no_matching_rule"
    ok = await call(sc, pki.client("frontend"), "/api/bearer/x", auth=f"Bearer {tok}")
    assert ok.status == 200


async def test_delegation_depth_is_bounded_by_the_rule(sc, pki, idp, upstream):
    deep = token(idp[0], act={"sub": AGENT, "act": {"sub": "agent-b", "act": {"sub": "agent-c"}}})
    r = await call(sc, pki.client("frontend"), "/api/bearer/x", auth=f"Bearer {deep}")
    assert r.status == 403
    ok = token(idp[0], act={"sub": AGENT, "act": {"sub": "agent-b"}})
    r = await call(sc, pki.client("frontend"), "/api/bearer/x", auth=f"Bearer {ok}")
    assert r.status == 200
    rec = (await sc.wait_records(2))[-1]
    assert rec["actors"] == [AGENT, "agent-b"]


async def test_step_up_challenge_names_the_acr_values(sc, pki, idp, upstream):
    weak = token(idp[0], acr="urn:example:pwd")
    r = await call(sc, pki.client("frontend"), "/api/stepup/pay", auth=f"Bearer {weak}")
    assert r.status == 401 and r.json()["error"] == "step_up_required"
    ch = challenge(r)
    assert 'error="insufficient_user_authentication"' in ch and 'acr_values="urn:example:mfa"' in ch
    strong = token(idp[0], acr="urn:example:mfa")
    r = await call(sc, pki.client("frontend"), "/api/stepup/pay", auth=f"Bearer {strong}")
    assert r.status == 200


async def test_token_on_a_forbidden_route_and_none_on_a_workload_route(sc, pki, idp, upstream):
    tok = token(idp[0])
    r = await call(sc, pki.client("frontend"), "/public/x", auth=f"Bearer {tok}")
    assert r.status == 400 and r.json()["error"] == "token_forbidden"
    r = await call(sc, pki.client("frontend"), "/public/x")
    assert r.status == 200
    r = await call(sc, pki.client("frontend"), "/api/plain/x")  # no token, workload rule
    assert r.status == 200


async def test_two_authorization_headers_and_garbage_schemes_are_refused(sc, pki, idp):
    tok = token(idp[0])
    r = await call(sc, pki.client("frontend"), "/api/bearer/x", auth=f"Bearer {tok}",
                   headers=[f"Authorization: Bearer {tok}"])
    assert r.status == 401 and r.json()["error"] == "token_multiple"
    r = await call(sc, pki.client("frontend"), "/api/bearer/x", auth="Basic dXNlcjpwdw==")
    assert r.status == 401 and r.json()["error"] == "token_malformed"


async def test_claim_values_cannot_inject_headers(sc, pki, idp, upstream):
    tok = token(idp[0], sub="alice", client_id="evil\r\nx-portcullis-spiffe-id: spiffe://x/y")
    r = await call(sc, pki.client("frontend"), "/api/bearer/x", auth=f"Bearer {tok}")
    assert r.status == 200
    got = r.json()["headers"]
    assert [v for n, v in got if n.lower() == "x-portcullis-spiffe-id"] == [FRONTEND_ID]
    (cid,) = [v for n, v in got if n.lower() == "x-portcullis-client-id"]
    assert cid == "evil%0D%0Ax-portcullis-spiffe-id:%20spiffe://x/y"


# ----------------------------------------------------------------------------------------------
# JWKS over HTTPS: ETag, rotation via unknown kid (single flight, rate limited)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
async def jwks_server(pki):
    state = {"doc": None, "hits": 0, "etag": "v1", "not_modified": 0}

    async def handler(req: web.Request) -> web.Response:
        state["hits"] += 1
        if req.headers.get("If-None-Match") == state["etag"]:
            state["not_modified"] += 1
            return web.Response(status=304)
        return web.json_response(state["doc"], headers={"ETag": state["etag"]})
    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    srv_svid = pki.ca.issue_svid(f"spiffe://{TD}/idp")
    srv_svid.write(pki.root / "idp-tls", bundle_pem=pki.ca.bundle_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.root / "idp-tls" / "svid.pem", pki.root / "idp-tls" / "svid_key.pem")
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx)
    await site.start()
    state["url"] = f"https://localhost:{port}/jwks.json"
    yield state
    await runner.cleanup()


async def test_remote_jwks_rotation_refreshes_once_for_unknown_kids(sidecar_factory, pki, jwks_server,
                                                                    upstream):
    old, new = key("ES256", "rot-1"), key("ES256", "rot-2")
    jwks_server["doc"] = jwks_doc(old)
    extra = {"tokens": {"issuers": [{"issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
                                     "jwks_url": jwks_server["url"],
                                     "jwks_ca_file": str(pki.root / "client-ca.pem")}],
                        "jwks_min_refresh_interval_s": 30, "jwks_refresh_interval_s": 300}}
    sc = await sidecar_factory(policy=policy_doc(), extra=extra)
    assert jwks_server["hits"] == 1
    fe = pki.client("frontend")
    assert (await call(sc, fe, "/api/bearer/x", auth=f"Bearer {token(old)}")).status == 200
    # the issuer rotates: the first token with the new kid triggers one refresh and succeeds
    jwks_server["doc"], jwks_server["etag"] = jwks_doc(old, new), "v2"
    r = await call(sc, fe, "/api/bearer/x", auth=f"Bearer {token(new)}")
    assert r.status == 200, r.body
    assert jwks_server["hits"] == 2
    # a flood of unknown kids within the rate limit costs no further fetch
    bogus = [token(key("ES256", f"bogus-{i}")) for i in range(5)]
    results = await asyncio.gather(*(call(sc, fe, "/api/bearer/x", auth=f"Bearer {t}") for t in bogus))
    assert {r.status for r in results} == {401}
    assert {r.json()["error"] for r in results} == {"token_unknown_kid"}
    assert jwks_server["hits"] == 2
    assert sc.worker.metrics.refreshes.values[("jwks", "changed")] == 2


async def test_remote_jwks_unreachable_keeps_serving_workload_requests(sidecar_factory, pki, upstream):
    extra = {"tokens": {"issuers": [{"issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
                                     "jwks_url": f"https://127.0.0.1:{free_port()}/jwks.json"}],
                        "jwks_timeout_s": 0.5}}
    sc = await sidecar_factory(policy=policy_doc(), extra=extra)
    fe = pki.client("frontend")
    assert (await call(sc, fe, "/api/plain/x")).status == 200  # no token: unaffected
    r = await call(sc, fe, "/api/bearer/x", auth=f"Bearer {token(key('ES256', 'x'))}")
    assert r.status == 503 and r.json()["error"] == "jwks_unavailable"
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.admin_port}/readyz") as resp:
            assert resp.status == 503 and "jwks_not_loaded" in (await resp.json())["reasons"]


# ----------------------------------------------------------------------------------------------
# JWT-SVIDs behind a trusted L7 hop
# ----------------------------------------------------------------------------------------------


async def test_jwt_svid_names_the_workload_only_behind_a_trusted_hop(sidecar_factory, pki, upstream):
    signer = key("ES256", "jwt-authority")
    # partner.org's SPIFFE bundle (JWKS) with its X.509 and JWT authorities
    from proxy.dev.ca import write_spiffe_bundle_json
    path = pki.root / "bundles" / "partner.org.json"
    path.write_bytes(write_spiffe_bundle_json([pki.partner_ca], jwt_keys={signer.kid: signer.public}))
    extra = {
        "identity": {"trust_domains": [{"name": TD, "bundle_file": f"bundles/{TD}.pem"},
                                       {"name": "partner.org", "bundle_file": str(path),
                                        "format": "spiffe"}]},
        "tokens": {"jwt_svid": {"enabled": True, "audiences": ["spiffe://example.org/ns/demo/sa/sidecar"],
                                "trusted_proxies": [FRONTEND_ID]}},
    }
    policy = {"version": 1, "rules": [
        {"id": "billing-behind-gateway", "effect": "allow", "from": {"workloads": [PARTNER_ID]},
         "to": [{"paths": ["/billing/**"]}]}]}
    sc = await sidecar_factory(policy=policy, extra=extra)
    svid = mint_jwt_svid(signer, PARTNER_ID, ["spiffe://example.org/ns/demo/sa/sidecar"],
                         now=time.time())
    # the frontend is the trusted gateway; it forwards a call made by the partner workload
    r = await call(sc, pki.client("frontend"), "/billing/x", headers=[f"x-jwt-svid: {svid}"])
    assert r.status == 200, r.body
    got = {n.lower(): v for n, v in r.json()["headers"]}
    assert got["x-portcullis-spiffe-id"] == PARTNER_ID and "x-jwt-svid" not in got
    rec = (await sc.wait_records(1))[-1]
    assert rec["workload"]["spiffe_id"] == PARTNER_ID and rec["via"] == FRONTEND_ID
    # any other peer presenting a JWT-SVID is refused
    r = await call(sc, pki.client("batch"), "/billing/x", headers=[f"x-jwt-svid: {svid}"])
    assert r.status == 403 and r.json()["error"] == "jwt_svid_untrusted_hop"
    # a JWT-SVID for partner.org signed with a key from another trust domain is refused
    rogue = key("ES256", "jwt-authority-rogue")
    forged = mint_jwt_svid(rogue, PARTNER_ID, ["spiffe://example.org/ns/demo/sa/sidecar"],
                           now=time.time(), kid=signer.kid)
    r = await call(sc, pki.client("frontend"), "/billing/x", headers=[f"x-jwt-svid: {forged}"])
    assert r.status == 403 and r.json()["error"] == "jwt_svid_bad_signature"
    # a JWT-SVID for the wrong audience is refused
    bad = mint_jwt_svid(signer, PARTNER_ID, ["spiffe://example.org/other"], now=time.time())
    r = await call(sc, pki.client("frontend"), "/billing/x", headers=[f"x-jwt-svid: {bad}"])
    assert r.status == 403 and r.json()["error"] == "jwt_svid_wrong_audience"
