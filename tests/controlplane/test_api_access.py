"""Who may call the control plane: mTLS SVIDs per trust domain, the control plane's own policy,
canonical paths, audit lines; and the fleet status reports that identify sidecars by their SVID."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest

from tests.conftest import RawClient
from tests.controlplane.conftest import (DEPLOYER_ID, OTHER_NS_ID, CpEnv, RunningCP,
                                         policy_bytes, source_targz)
from tests.factories import FRONTEND_ID

PUBLISH = "/v1/bundles/demo/publish"


async def _call(cp: RunningCP, client: str | None, method: str, path: str, **kw):
    s = cp.session(cp.pki.client(client) if client else None)
    async with s.request(method, cp.url(path), **kw) as r:
        body = await r.read()
        return r.status, (await r.json() if r.content_type == "application/json" else body)


@pytest.mark.parametrize("method,path", [
    ("POST", PUBLISH),
    ("POST", "/v1/bundles/demo/rollback"),
    ("POST", "/v1/bundles/demo/revocations"),
    ("DELETE", "/v1/bundles/demo/revocations"),
    ("GET", "/v1/fleet"),
])
async def test_management_api_is_denied_to_a_demo_sidecar_by_the_deny_rule(
        cp: RunningCP, method: str, path: str):
    status, body = await _call(cp, "frontend", method, path, json={"jtis": ["x"]})
    assert status == 403
    assert body["error"] == "denied_by_rule"
    assert cp.cp.store.current_revision("demo") == 1


async def test_publish_is_denied_to_a_workload_no_rule_allows(cp: RunningCP):
    status, body = await _call(cp, "other", "POST", PUBLISH,
                               data=source_targz({"policy.yaml": policy_bytes()}))
    assert status == 403 and body["error"] == "no_matching_rule"
    assert set(body) == {"error", "decision_id"}
    assert cp.cp.store.current_revision("demo") == 1


async def test_the_deployer_may_publish(cp: RunningCP):
    status, body = await _call(cp, "deployer", "POST", PUBLISH,
                               data=source_targz({"policy.yaml": policy_bytes()}))
    assert status == 201 and body["revision"] == 2


async def test_a_sidecar_may_fetch_only_the_bundles_the_policy_gives_it(cp: RunningCP):
    assert (await _call(cp, "batch", "GET", "/bundles/demo"))[0] == 200
    status, body = await _call(cp, "other", "GET", "/bundles/demo")
    assert status == 403 and body["error"] == "no_matching_rule"
    status, body = await _call(cp, "frontend", "GET", "/bundles/empty")
    assert status == 403 and body["error"] == "no_matching_rule"


async def test_a_certificate_from_an_untrusted_ca_is_refused_in_the_handshake(cp: RunningCP):
    s = cp.session(cp.pki.client("rogue"))  # right SPIFFE ID, rogue CA
    with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
        async with s.get(cp.url("/bundles/demo")) as r:
            await r.read()
    assert cp.audit == []  # nothing reached the application


async def test_a_client_without_a_certificate_is_refused_in_the_handshake(cp: RunningCP):
    s = cp.session(None)
    with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
        async with s.get(cp.url("/bundles/demo")) as r:
            await r.read()


async def test_an_svid_not_vouched_for_by_its_own_trust_domain_is_403(cp: RunningCP):
    # spiffe://partner.org/... issued by example.org's CA: OpenSSL's coarse gate lets it through,
    # the per-trust-domain check does not, before any policy or handler runs.
    status, body = await _call(cp, "cross", "GET", "/v1/signing-key")
    assert status == 403 and body["error"] == "svid_untrusted"
    (rec,) = cp.audit_records()
    assert rec["decision"] == "deny" and rec["peer"] is None and rec["rule_id"] is None


async def test_a_path_the_router_would_read_differently_is_400(cp: RunningCP):
    client = await RawClient.connect(cp.port, cp.pki.client("deployer"), cp.pki)
    try:
        await client.send(b"GET //v1/fleet HTTP/1.1\r\nHost: cp\r\n\r\n")
        status, _headers, body = await client.read_response()
        assert status == 400 and b'"invalid_path"' in body
        await client.send(b"GET /v1/bundles/../fleet HTTP/1.1\r\nHost: cp\r\n\r\n")
        status, _headers, body = await client.read_response()
        assert status == 400 and b'"invalid_path"' in body
    finally:
        await client.close()


async def test_unknown_routes_are_denied_before_they_are_routed(cp: RunningCP):
    status, body = await _call(cp, "deployer", "GET", "/v1/nothing-here")
    assert status == 403 and body["error"] == "no_matching_rule"


async def test_every_admin_request_writes_one_audit_line_without_key_material(
        cp: RunningCP, env: CpEnv):
    await _call(cp, "deployer", "POST", PUBLISH, data=source_targz({"policy.yaml": policy_bytes()}))
    await _call(cp, "frontend", "POST", PUBLISH, data=b"x")
    await _call(cp, "frontend", "GET", "/bundles/demo")  # allowed sidecar traffic: not audited
    await _call(cp, "frontend", "POST", "/v1/status", json={"bundle": "demo"})
    records = cp.audit_records()
    assert [(r["peer"], r["status"], r["decision"], r["code"]) for r in records] == [
        (DEPLOYER_ID, 201, "allow", "ok"),
        (FRONTEND_ID, 403, "deny", "denied_by_rule"),
    ]
    assert records[0]["bundle"] == "demo" and records[0]["revision"] == 2
    assert records[0]["rule_id"] == "deployer-manages-bundles"
    assert records[1]["rule_id"] == "demo-namespace-never-manages"
    everything = b"".join(cp.audit)
    key = (env.root / "signing.key").read_bytes()
    assert key.splitlines()[1] not in everything and b"PRIVATE KEY" not in everything


async def test_sidecar_requests_are_audited_when_configured(env: CpEnv):
    cp = await env.start(env.write_config(extra={"audit": {"sidecar_requests": True}}))
    await _call(cp, "frontend", "GET", "/bundles/demo")
    await _call(cp, "frontend", "POST", "/v1/status", json={"bundle": "demo"})
    fetch, report = cp.audit_records()
    assert fetch["path"] == "/bundles/demo" and fetch["revision"] == 1 and fetch["status"] == 200
    assert report["path"] == "/v1/status" and report["status"] == 200


async def test_fleet_shows_every_sidecars_last_report_with_its_age(cp: RunningCP, env: CpEnv):
    env.clock.freeze()
    report = {"bundle": "demo", "active_revision": 1, "last_success": env.clock(),
              "last_error": None, "version": "0.1.0"}
    status, body = await _call(cp, "frontend", "POST", "/v1/status", json=report)
    assert status == 200 and body["current_revision"] == 1
    await _call(cp, "batch", "POST", "/v1/status", json={**report, "active_revision": 0,
                                                         "last_error": "bundle_expired"})
    env.clock.offset = 30
    await _call(cp, "frontend", "POST", "/v1/status", json=report)  # reported again
    env.clock.offset = 160  # batch's report is 160 s old, frontend's 130 s (stale_after_s 120)
    status, fleet = await _call(cp, "deployer", "GET", "/v1/fleet")
    assert status == 200
    by_id = {s["spiffe_id"]: s for s in fleet["sidecars"]}
    front = by_id[FRONTEND_ID]
    batch = by_id["spiffe://example.org/ns/demo/sa/batch"]
    assert front["active_revision"] == 1 and front["behind"] is False
    assert front["version"] == "0.1.0" and front["age_s"] == 130
    assert batch["behind"] is True and batch["last_error"] == "bundle_expired"
    assert batch["age_s"] == 160 and batch["stale"] is True and front["stale"] is True
    assert fleet["total"] == 2 and fleet["stale"] == 2 and fleet["behind"] == 1


async def test_a_fresh_report_is_not_stale(cp: RunningCP):
    await _call(cp, "other", "POST", "/v1/status", json={"bundle": "demo", "active_revision": 1})
    _status, fleet = await _call(cp, "deployer", "GET", "/v1/fleet")
    (entry,) = fleet["sidecars"]
    assert entry["spiffe_id"] == OTHER_NS_ID and entry["stale"] is False
    assert entry["behind"] is False and fleet["stale"] == 0


async def test_a_long_error_message_is_cut_not_refused(cp: RunningCP):
    status, _ = await _call(cp, "frontend", "POST", "/v1/status",
                            json={"bundle": "demo", "last_error": "bundle_http_error: " + "x" * 5000})
    assert status == 200
    _status, fleet = await _call(cp, "deployer", "GET", "/v1/fleet")
    assert len(fleet["sidecars"][0]["last_error"]) == 1024


async def test_status_reports_are_validated(cp: RunningCP):
    status, body = await _call(cp, "frontend", "POST", "/v1/status", json={
        "bundle": "demo", "active_revision": "1", "spiffe_id": "spiffe://example.org/forged"})
    assert status == 400 and body["error"] == "invalid_request"
    assert {p["path"] for p in body["problems"]} == {"active_revision", "spiffe_id"}
    status, body = await _call(cp, "frontend", "POST", "/v1/status", data=b"[")
    assert status == 400 and body["error"] == "invalid_json"
    assert len(cp.cp.fleet) == 0


async def test_api_policy_file_changes_are_picked_up(env: CpEnv):
    policy = env.root / "cp-policy.yaml"
    policy.write_text("version: 1\nrules:\n  - id: only-status\n    effect: allow\n"
                      "    from: {workloads: ['spiffe://example.org/ns/*/sa/*']}\n"
                      "    to: [{methods: [POST], paths: [/v1/status]}]\n")
    cp = await env.start(env.write_config(extra={"policy": {"file": str(policy)}}))
    assert (await _call(cp, "frontend", "GET", "/bundles/demo"))[0] == 403
    policy.write_text(policy.read_text().replace("POST], paths: [/v1/status]",
                                                 "GET], paths: [/bundles/demo]"))
    before = cp.cp.policy.revision
    for _ in range(400):
        if cp.cp.policy.revision != before:
            break
        await asyncio.sleep(0.02)
    assert (await _call(cp, "frontend", "GET", "/bundles/demo"))[0] == 200
