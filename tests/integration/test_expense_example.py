"""The example the product must carry, end to end through a real sidecar with curl and the shipped
`config/policy.example.yaml`: an expense assistant agent acting for Alice may approve invoice
INV-8831 for $4,800 in her department; it may not approve someone else's invoice or $999,999; above
$5,000 it must step up to MFA. (Above $10,000 two approvals will be needed: until approvals exist
the policy denies it outright.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import curl
from tests.dpop_factory import ProofKey, make_proof
from tests.factories import free_port
from tests.tokens_factory import jwks_doc, key, mint

ROOT = Path(__file__).resolve().parents[2]
ISS = "https://idp.example.org"
AUD = "https://orders.example.org"
AGENT = "spiffe://example.org/agents/expense-assistant"


@pytest.fixture
async def world(sidecar_factory, pki, upstream):
    signer = key("ES256", "idp-expense")
    (pki.root / "idp-jwks.json").write_text(json.dumps(jwks_doc(signer)))
    shutil.copy(ROOT / "config" / "policy.example.yaml", pki.root / "example-policy.yaml")
    agent = pki.issue("agent", AGENT)
    port = free_port()
    extra = {
        "listener": {"address": "127.0.0.1", "port": port},
        "policy": {"file": "example-policy.yaml"},
        "tokens": {"issuers": [{"issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
                                "jwks_file": str(pki.root / "idp-jwks.json")}],
                   "dpop": {"public_origin": f"https://127.0.0.1:{port}"}},
    }
    sc = await sidecar_factory(policy=yaml.safe_load((ROOT / "config" / "policy.example.yaml").read_text()),
                               extra=extra)
    return sc, signer, agent


def alice_token(signer, pk: ProofKey, *, max_amount=5000, invoice="INV-8831", acr="urn:example:pwd",
                department="finance", actor=AGENT) -> str:
    now = int(time.time())
    return mint(signer, {
        "iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 300, "iat": now, "jti": f"j{now}{pk.jkt[:6]}",
        "client_id": "expense-app", "acr": acr, "department": department,
        "act": {"sub": actor}, "cnf": {"jkt": pk.jkt},
        "authorization_details": [{"type": "invoice_approval", "invoice_id": invoice,
                                   "max_amount": max_amount}],
    }, typ="at+jwt")


async def approve(sc, client, tok, pk, invoice="INV-8831", amount=4800, department="finance",
                  body=None):
    path = f"/api/invoices/{invoice}/approve"
    url = sc.url(f"{path}?department={department}")
    proof = make_proof(pk, method="POST", htu=f"https://127.0.0.1:{sc.port}{path}",
                       iat=int(time.time()), access_token=tok)
    head = sc.pki.root / f"h{time.monotonic_ns()}"
    data = body if body is not None else json.dumps({"amount": amount})
    r = await curl(url, client, "-X", "POST", "-H", "Content-Type: application/json",
                   "-H", f"Authorization: DPoP {tok}", "-H", f"DPoP: {proof}", "--data-binary", data,
                   "-D", str(head), cacert=sc.pki.bundle)
    r.stderr = head.read_text() if head.exists() else ""
    return r


async def test_agent_approves_alices_invoice_of_4800(world, upstream):
    sc, signer, agent = world
    pk = ProofKey.generate("ES256")
    r = await approve(sc, agent, alice_token(signer, pk), pk)
    assert r.status == 200, r.body
    got = upstream.received[-1]
    assert got.body == b'{"amount": 4800}'  # forwarded exactly as inspected
    headers = {n.lower(): v for n, v in got.headers}
    assert headers["x-portcullis-subject"] == "alice" and headers["x-portcullis-actor-chain"] == AGENT
    rec = (await sc.wait_records(1))[-1]
    assert rec["action"] == "invoice.approve" and rec["rule_id"] == "expense-agent-approves-invoice"
    assert rec["subject"] == {"iss": ISS, "sub": "alice"} and rec["binding"] == "dpop"
    assert len(rec["params_digest"]) == 64 and "4800" not in json.dumps(rec)


@pytest.mark.parametrize("case,status,code", [
    ("someone_elses_invoice", 403, "no_matching_rule"),
    ("999999", 403, "denied_by_rule"),
    ("other_department", 403, "no_matching_rule"),
    ("another_agent", 403, "no_matching_rule"),
    ("above_consent", 403, "no_matching_rule"),
])
async def test_what_the_agent_may_not_do(world, pki, upstream, case, status, code):
    sc, signer, agent = world
    pk = ProofKey.generate("ES256")
    kw, tok_kw, client = {}, {}, agent
    if case == "someone_elses_invoice":
        kw["invoice"] = "INV-9999"
    elif case == "999999":
        kw["amount"], tok_kw["max_amount"] = 999999, 1000000
    elif case == "other_department":
        kw["department"] = "marketing"
    elif case == "another_agent":
        client = pki.client("frontend")  # a different workload replaying the agent's token
    elif case == "above_consent":
        kw["amount"] = 4999.5 + 100  # above the max_amount Alice consented to (5000)
    r = await approve(sc, client, alice_token(signer, pk, **tok_kw), pk, **kw)
    assert (r.status, r.json()["error"]) == (status, code), r.body
    assert upstream.received == []
    if case == "999999":
        rec = (await sc.wait_records(1))[-1]
        assert rec["rule_id"] == "invoice-over-10000-needs-two-approvals"


async def test_above_5000_needs_a_step_up_to_mfa(world, upstream):
    sc, signer, agent = world
    pk = ProofKey.generate("ES256")
    r = await approve(sc, agent, alice_token(signer, pk, max_amount=10000), pk, amount=7000)
    assert r.status == 401 and r.json()["error"] == "step_up_required"
    assert 'acr_values="urn:example:mfa"' in r.stderr and "insufficient_user_authentication" in r.stderr
    mfa = alice_token(signer, pk, max_amount=10000, acr="urn:example:mfa")
    r = await approve(sc, agent, mfa, pk, amount=7000)
    assert r.status == 200, r.body
    assert len(upstream.received) == 1


async def test_body_inspection_is_bounded_and_strict(world, upstream):
    sc, signer, agent = world
    pk = ProofKey.generate("ES256")
    tok = alice_token(signer, pk)
    r = await approve(sc, agent, tok, pk, body='{"amount": 4800, "amount": 1}')
    assert r.status == 400 and r.json()["error"] == "invalid_json_body"  # duplicate member
    r = await approve(sc, agent, tok, pk, body=json.dumps({"amount": 1, "pad": "x" * 5000}))
    assert r.status == 413 and r.json()["error"] == "body_too_large"
    assert upstream.received == []
    digest = hashlib.sha256(tok.encode()).hexdigest()
    assert all(rec.get("token_fingerprint") == digest for rec in await sc.wait_records(2))
