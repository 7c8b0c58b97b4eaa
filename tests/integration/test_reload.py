"""Refreshable inputs: rotation without dropped requests, last good value kept, fail closed when
stale or expired, re-verification of live connections when trust changes."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import aiohttp

from proxy.dev.ca import DevCA
from proxy.dev.volumes import projected_swap
from tests.conftest import RawClient, curl
from tests.factories import FRONTEND_ID, SIDECAR_ID, TD

GET = b"GET /api/x HTTP/1.1\r\nhost: sidecar\r\n\r\n"


def k8s_layout(base: Path, files: dict[str, bytes], version: str) -> None:
    """Write files the way kubelet updates a projected volume (`proxy.dev.volumes`)."""
    projected_swap(base, files, version)


async def admin_get(sc, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.admin_port}{path}") as r:
            return r.status, await r.text()


async def wait_for(pred, timeout=5.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(step)
    return False


async def allow_batch_with_revision_r2(sc, pki) -> None:
    """Rewrite the policy file (revision r2: the batch workload may call anything) and wait
    until the sidecar enforces it."""
    (pki.root / "policy.yaml").write_text(
        "version: 1\nrevision: r2\nrules:\n- id: batch-now\n  effect: allow\n"
        "  from: {workloads: [spiffe://example.org/ns/demo/sa/batch]}\n  to: [{paths: ['/**']}]\n")

    async def allowed():
        return (await curl(sc.url("/api/x"), pki.client("batch"), cacert=pki.bundle)).status == 200
    assert await wait_for(allowed)


async def test_rotation_of_svid_and_ca_during_load_loses_no_request(sidecar_factory, pki, upstream):
    ca1 = pki.ca
    ca2 = DevCA.create(TD, common_name="example.org root 2")
    vol = pki.root / "spiffe"
    first = ca1.issue_svid(SIDECAR_ID)
    k8s_layout(vol, {"svid.pem": first.cert_pem(), "svid_key.pem": first.key_pem(),
                     "bundle.pem": ca1.bundle_pem()}, "v1")
    extra = {"identity": {"svid_file": str(vol / "svid.pem"), "svid_key_file": str(vol / "svid_key.pem"),
                          "trust_domains": [{"name": TD, "bundle_file": str(vol / "bundle.pem")}],
                          "watch_interval_s": 0.05}}
    policy = {"version": 1, "rules": [{"id": "fe", "effect": "allow",
                                       "from": {"workloads": [FRONTEND_ID]}, "to": [{"paths": ["/**"]}]}]}
    sc = await sidecar_factory(extra=extra, policy=policy)
    both = pki.root / "both.pem"
    both.write_bytes(ca1.bundle_pem() + ca2.bundle_pem())
    fe1 = pki.client("frontend")
    fe2 = pki.issue("frontend2", FRONTEND_ID, ca=ca2)

    results: list[int] = []
    stop = asyncio.Event()

    def ctx_for(client):
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.check_hostname = False
        c.load_verify_locations(str(both))
        c.load_cert_chain(client.cert, client.key)
        return c

    async def hammer(client, keepalive: bool):
        ctx = ctx_for(client)
        raw = None
        while not stop.is_set():
            if raw is None:
                r, w = await asyncio.open_connection("127.0.0.1", sc.port, ssl=ctx)
                raw = RawClient(r, w)
            await raw.send(GET)
            status, _, _ = await raw.read_response()
            results.append(status)
            if not keepalive:
                await raw.close()
                raw = None
        if raw is not None:
            await raw.close()

    tasks = [asyncio.create_task(hammer(fe1, True)), asyncio.create_task(hammer(fe1, False))]
    await asyncio.sleep(0.3)
    # 1. trust both CAs; 2. move the sidecar's own SVID to the new CA; 3. new-CA clients join
    second = ca2.issue_svid(SIDECAR_ID)
    k8s_layout(vol, {"svid.pem": first.cert_pem(), "svid_key.pem": first.key_pem(),
                     "bundle.pem": ca1.bundle_pem() + ca2.bundle_pem()}, "v2")
    await asyncio.sleep(0.3)
    k8s_layout(vol, {"svid.pem": second.cert_pem(), "svid_key.pem": second.key_pem(),
                     "bundle.pem": ca1.bundle_pem() + ca2.bundle_pem()}, "v3")
    await asyncio.sleep(0.3)
    tasks.append(asyncio.create_task(hammer(fe2, False)))
    await asyncio.sleep(0.4)
    stop.set()
    await asyncio.gather(*tasks)

    assert len(results) > 50
    assert set(results) == {200}, {s: results.count(s) for s in set(results)}
    # new handshakes present the new SVID
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=ctx_for(fe2))
    peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    from cryptography.hazmat.primitives import serialization
    assert peer == second.cert.public_bytes(serialization.Encoding.DER)
    refreshes = sc.worker.metrics.refreshes.values
    assert refreshes.get(("svid", "changed"), 0) >= 2 and refreshes.get(("trust_bundle", "changed"), 0) >= 2
    assert len(await sc.wait_records(len(results))) == len(results)  # one record per request


async def test_removed_ca_is_refused_even_on_a_live_connection(sidecar, pki, upstream):
    raw = await RawClient.connect(sidecar.port, pki.client("frontend"), pki)
    await raw.send(GET)
    assert (await raw.read_response())[0] == 200
    other = DevCA.create(TD, common_name="replacement root")
    (pki.root / "bundles" / f"{TD}.pem").write_bytes(other.bundle_pem())

    async def refused():
        await raw.send(GET)
        status, _, body = await raw.read_response()
        return status == 403 and b"svid_untrusted" in body
    assert await wait_for(refused)
    await raw.close()


async def test_bad_bundle_file_keeps_last_good_and_is_counted(sidecar, pki, upstream):
    bundle = pki.root / "bundles" / f"{TD}.pem"
    good = bundle.read_bytes()
    bundle.write_bytes(good[: len(good) // 2])  # half written
    await asyncio.sleep(0.4)
    r = await curl(sidecar.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
    assert r.status == 200
    assert sidecar.worker.metrics.refreshes.values.get(("trust_bundle", "failed"), 0) >= 1
    status, text = await admin_get(sidecar, "/readyz")
    assert status == 200  # within max_staleness_s the last good value keeps us ready
    bundle.unlink()  # removed entirely: still the last good value
    await asyncio.sleep(0.3)
    assert (await curl(sidecar.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)).status == 200
    bundle.write_bytes(good)


async def test_half_written_svid_keeps_serving_with_the_old_one(sidecar, pki, upstream):
    new = pki.ca.issue_svid(SIDECAR_ID)
    (pki.sidecar_dir / "svid.pem").write_bytes(new.cert_pem())  # key not yet rotated: mismatch
    await asyncio.sleep(0.4)
    assert sidecar.worker.metrics.refreshes.values.get(("svid", "failed"), 0) >= 1
    assert (await curl(sidecar.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)).status == 200
    (pki.sidecar_dir / "svid_key.pem").write_bytes(new.key_pem())
    assert await wait_for(lambda: _changed(sidecar))


async def _changed(sc) -> bool:
    return sc.worker.metrics.refreshes.values.get(("svid", "changed"), 0) >= 2


async def test_expired_own_svid_fails_closed_and_readyz_goes_red(sidecar_factory, pki, upstream):
    now = time.time()
    short = pki.ca.issue_svid(SIDECAR_ID, now=now, ttl_s=2, not_before=now - 60)
    short.write(pki.sidecar_dir, bundle_pem=pki.ca.bundle_pem())
    sc = await sidecar_factory()
    assert (await admin_get(sc, "/readyz"))[0] == 200
    await asyncio.sleep(max(0.0, short.cert.not_valid_after_utc.timestamp() - time.time()) + 0.5)

    async def red():
        status, text = await admin_get(sc, "/readyz")
        return status == 503 and "svid_expired" in text
    assert await wait_for(red)
    # existing trust still lets the handshake finish (curl -k), but every request is refused
    r = await curl(sc.url("/api/x"), pki.client("frontend"))
    assert r.status == 503 and r.json()["error"] == "svid_expired"
    assert upstream.received == []


async def test_policy_reload_applies_new_revision_and_bad_policy_keeps_old(sidecar, pki, upstream):
    r = await curl(sidecar.url("/api/x"), pki.client("batch"), cacert=pki.bundle)
    assert r.status == 403
    rev1 = (await sidecar.wait_records(1))[-1]["policy_revision"]
    await allow_batch_with_revision_r2(sidecar, pki)

    async def last_is_allow():
        recs = sidecar.records()
        return bool(recs) and recs[-1]["decision"] == "allow"
    assert await wait_for(last_is_allow)
    n = len(sidecar.records())
    assert sidecar.records()[-1]["policy_revision"] == "r2" != rev1
    (pki.root / "policy.yaml").write_text("version: 1\nrules: []\n")  # invalid: empty rules
    await asyncio.sleep(0.4)
    assert sidecar.worker.metrics.refreshes.values.get(("policy", "failed"), 0) >= 1
    r = await curl(sidecar.url("/api/x"), pki.client("batch"), cacert=pki.bundle)
    assert r.status == 200
    assert (await sidecar.wait_records(n + 1))[-1]["policy_revision"] == "r2"


async def test_stale_policy_fails_closed_after_max_staleness(sidecar_factory, pki, upstream):
    sc = await sidecar_factory(extra={"policy": {"file": "policy.yaml", "watch_interval_s": 0.05,
                                                 "max_staleness_s": 0.3}})
    (pki.root / "policy.yaml").write_text("not: [valid")

    async def unavailable():
        r = await curl(sc.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
        return r.status == 503 and r.json()["error"] == "policy_stale"
    assert await wait_for(unavailable)
    status, text = await admin_get(sc, "/readyz")
    assert status == 503 and "policy_stale" in text
    before = len(upstream.received)  # allowed by the last good policy until it went stale
    r = await curl(sc.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
    assert r.status == 503 and len(upstream.received) == before
    assert r.json() == {"error": "policy_stale", "decision_id": r.json()["decision_id"]}
    recs = await sc.wait_records(before + 2)
    assert recs[-1]["decision"] == "error" and recs[-1]["code"] == "policy_stale"


async def test_a_replaced_policy_is_released_off_the_event_loop(sidecar, pki, upstream, monkeypatch):
    """The State a reload replaces (with its policy) goes to gcquiet's release thread, which
    frees a large policy a slice at a time, instead of being freed at once on the loop."""
    from proxy.runtime import server

    handed: list = []
    monkeypatch.setattr(server, "release_in_background", handed.append)
    old = sidecar.worker.state
    await asyncio.sleep(0.3)  # polls that change nothing release nothing
    assert handed == []
    await allow_batch_with_revision_r2(sidecar, pki)
    assert handed == [old] and sidecar.worker.state.policy.revision == "r2"
    assert old.policy.revision != "r2"
