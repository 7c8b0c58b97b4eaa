"""TLS details (resumption, versions), shadow mode, the admin listener and its exposition."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess

import aiohttp
import pytest
import uvloop

from tests.conftest import RawClient, client_ssl, curl
from tests.factories import BATCH_ID, FRONTEND_ID

GET = b"GET /api/x HTTP/1.1\r\nhost: s\r\n\r\n"


def test_tests_run_on_uvloop():
    async def probe():
        return isinstance(asyncio.get_running_loop(), uvloop.Loop)
    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(probe())
    finally:
        loop.close()


async def test_async_tests_run_on_uvloop():
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_session_resumption_is_disabled_and_identity_still_verified(sidecar, pki, version):
    ctx = client_ssl(pki.client("frontend"), pki, max_version=version)

    def exchange(session=None):
        with socket.create_connection(("127.0.0.1", sidecar.port)) as raw:
            with ctx.wrap_socket(raw, session=session) as s:
                s.sendall(GET)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(4096)
                return s.session, s.session_reused, data
    loop = asyncio.get_running_loop()
    session, reused, data = await loop.run_in_executor(None, exchange)
    assert data.startswith(b"HTTP/1.1 200") and not reused
    _, reused2, data2 = await loop.run_in_executor(None, exchange, session)
    assert reused2 is False, "the sidecar must not resume sessions (a resumed session has no chain)"
    assert data2.startswith(b"HTTP/1.1 200")
    recs = await sidecar.wait_records(2)
    assert all(r["workload"]["spiffe_id"] == FRONTEND_ID for r in recs)


async def test_tls_below_1_2_is_refused(sidecar, pki):
    ctx = client_ssl(pki.client("frontend"), pki)
    with pytest.warns(DeprecationWarning):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", sidecar.port, ssl=ctx)


async def test_tls_1_3_is_preferred(sidecar, pki):
    r, w = await asyncio.open_connection("127.0.0.1", sidecar.port,
                                         ssl=client_ssl(pki.client("frontend"), pki))
    assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
    w.close()


async def test_failed_handshakes_are_counted(sidecar, pki):
    for client in (None, pki.client("rogue")):
        r = await curl(sidecar.url("/api/x"), client, cacert=pki.bundle)
        assert r.status == 0
    await asyncio.sleep(0.1)
    assert sidecar.worker.metrics.tls_failures.values[()] >= 2


async def test_global_shadow_mode_lets_denials_through_and_records_them(sidecar_factory, pki, upstream):
    sc = await sidecar_factory(extra={"policy": {"file": "policy.yaml", "mode": "shadow",
                                                 "watch_interval_s": 0.1}})
    r = await curl(sc.url("/admin/users"), pki.client("batch"), cacert=pki.bundle)
    assert r.status == 200 and len(upstream.received) == 1
    rec = (await sc.wait_records(1))[-1]
    assert rec["decision"] == "allow" and rec["mode"] == "shadow" and rec["code"] == "shadow_allowed"
    assert rec["would_be"] == {"decision": "deny", "code": "denied_by_rule",
                               "rule_id": "batch-admin-deny"}
    assert sc.worker.metrics.shadow.values[("deny", "denied_by_rule")] == 1


async def test_shadow_rule_records_would_be_but_is_not_enforced(sidecar_factory, pki, upstream):
    policy = {"version": 1, "rules": [
        {"id": "fe", "effect": "allow", "from": {"workloads": [FRONTEND_ID]}, "to": [{"paths": ["/**"]}]},
        {"id": "trial-deny", "effect": "deny", "shadow": True,
         "from": {"workloads": [FRONTEND_ID]}, "to": [{"paths": ["/api/secret/**"]}]},
    ]}
    sc = await sidecar_factory(policy=policy)
    r = await curl(sc.url("/api/secret/x"), pki.client("frontend"), cacert=pki.bundle)
    assert r.status == 200
    r2 = await curl(sc.url("/api/public"), pki.client("frontend"), cacert=pki.bundle)
    assert r2.status == 200
    recs = await sc.wait_records(2)
    assert recs[0]["decision"] == "allow" and recs[0]["mode"] == "enforce"
    assert recs[0]["would_be"] == {"decision": "deny", "code": "denied_by_rule", "rule_id": "trial-deny"}
    assert recs[1]["would_be"] is None


async def test_unavailable_answers_carry_retry_after(sidecar_factory, pki):
    sc = await sidecar_factory(extra={"policy": {"file": "policy.yaml", "max_staleness_s": 0.1,
                                                 "watch_interval_s": 0.05}})
    (pki.root / "policy.yaml").write_text("rules: [")
    for _ in range(100):
        raw = await RawClient.connect(sc.port, pki.client("frontend"), pki)
        await raw.send(GET)
        status, headers, body = await raw.read_response()
        await raw.close()
        if status == 503:
            break
        await asyncio.sleep(0.05)
    assert status == 503 and headers["retry-after"].isdigit()
    assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"


async def test_admin_endpoints(sidecar, pki):
    async with aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{sidecar.admin_port}"
        async with s.get(base + "/healthz") as r:
            assert r.status == 200
        async with s.get(base + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["ready"] is True and body["reasons"] == []
        async with s.get(base + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")


def test_readyz_is_red_until_the_data_listener_is_bound(pki, upstream):
    """Every input loaded, nothing listening yet (the admin listener starts first): an
    orchestrator must not route traffic here. `test_admin_endpoints` shows green once bound."""
    from proxy.config import load_config
    from proxy.runtime.server import Worker
    from tests.factories import write_config

    worker = Worker(load_config(write_config(pki, upstream_url=upstream.url), env={}))
    worker.load()
    status = worker.admin_status()
    assert status["ready"] is False and status["reasons"] == ["not_listening"]


async def test_promtool_accepts_a_real_scrape(sidecar, pki):
    assert shutil.which("promtool"), "promtool is required (make test installs Debian's prometheus)"
    await curl(sidecar.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
    await curl(sidecar.url("/admin/x"), pki.client("batch"), cacert=pki.bundle)
    await curl(sidecar.url("/api/x"), None, cacert=pki.bundle)
    await sidecar.wait_records(2)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as r:
            text = await r.read()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    body = text.decode()
    for name in ("portcullis_requests_total", "portcullis_request_duration_seconds_bucket",
                 "portcullis_audit_records_total", "portcullis_ready 1.0",
                 "portcullis_tls_handshake_failures_total", "portcullis_refresh_total",
                 'portcullis_requests_total{code="denied_by_rule",decision="deny"} 1.0'):
        assert name in body, name
    # bounded labels only: no SPIFFE IDs, paths or subjects in the exposition
    assert "spiffe://" not in body and "/api/x" not in body and BATCH_ID not in body


async def test_connections_with_the_same_chain_share_one_verified_peer(sidecar, pki):
    """A workload's client pool opens many connections with one SVID: its chain is parsed and
    verified once, held once, and let go with the last connection (runtime.listener.PeerChains).
    Another SVID gets its own entry, and each connection is still authorised as itself."""
    conns = [await RawClient.connect(sidecar.port, pki.client("frontend"), pki) for _ in range(3)]
    other = await RawClient.connect(sidecar.port, pki.client("batch"), pki)
    for c in conns + [other]:
        await c.send(GET)
    statuses = [(await c.read_response())[0] for c in conns + [other]]
    assert statuses == [200, 200, 200, 403]  # batch is denied by the default policy
    plane = sidecar.worker.plane
    peers = {id(c.peer) for c in plane.conns}
    assert len(plane.conns) == 4 and len(peers) == 2 and len(plane.peers) == 2
    for c in conns + [other]:
        await c.close()
    for _ in range(200):
        if not plane.conns:
            break
        await asyncio.sleep(0.01)
    import gc
    gc.collect()
    assert len(plane.peers) == 0


def test_peer_chains_share_by_exact_bytes_and_hold_weakly():
    from proxy.runtime.listener import PeerChains
    chains = PeerChains()
    a1, a2 = chains.get((b"leaf-a", b"ca")), chains.get((b"leaf-a", b"ca"))
    b = chains.get((b"leaf-b", b"ca"))
    assert a1 is a2 and b is not a1 and len(chains) == 2
    assert chains.get(()) is not chains.get(())  # no chain: nothing to share
    del a1, a2, b
    import gc
    gc.collect()
    assert len(chains) == 0
