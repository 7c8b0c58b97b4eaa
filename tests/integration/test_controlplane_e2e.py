"""A real sidecar following a real control plane over mTLS: long-poll revocation end to end, the
control plane down during operation and at start (last good bundle from disk), and the control
plane's identity checked by the sidecar."""

from __future__ import annotations

import asyncio
import time

from proxy.config import BundleConfig
from proxy.runtime.bundle_source import BundleSource
from tests.conftest import client_ssl, curl
from tests.controlplane.conftest import CP_ID, cp, env  # noqa: F401  (fixtures)
from tests.factories import FRONTEND_ID, PARTNER_TD, TD


async def until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


def bundle_extra(cp, env, **over) -> dict:
    cfg = {"url": cp.url("/bundles/demo"), "public_keys": [str(env.root / "signing.key.pub")],
           "server_id": CP_ID, "cache_dir": str(env.root / "sidecar-cache"), "long_poll_s": 30,
           "min_delay_s": 0.05, "max_delay_s": 0.2, "timeout_s": 2}
    cfg.update(over)
    return {"policy": {"file": None, "bundle": cfg}}


async def test_revocation_reaches_a_long_polling_sidecar(sidecar_factory, pki, cp, env, upstream):
    sc = await sidecar_factory(extra=bundle_extra(cp, env))
    fe = pki.client("frontend")
    r = await curl(sc.url("/api/x"), fe, cacert=pki.bundle)
    assert r.status == 200
    assert sc.worker.state.policy.revision == "demo@1"
    await cp.wait_waiting("demo", 1)  # the sidecar is parked on a long poll
    s = cp.session(pki.client("deployer"))
    t0 = time.monotonic()
    async with s.post(cp.url("/v1/bundles/demo/revocations"), json={"spiffe_ids": [FRONTEND_ID]}) as r:
        assert r.status == 201

    async def refused():
        r = await curl(sc.url("/api/x"), fe, cacert=pki.bundle)
        return r.status == 403 and r.json()["error"] == "revoked_workload"
    assert await until(refused)
    latency = time.monotonic() - t0
    assert sc.worker.state.policy.revision == "demo@2"
    # the fleet view shows this sidecar on the new revision
    fleet = cp.cp.fleet.view(env.clock(), cp.cp.store.current_revision)["sidecars"]
    assert any(e["active_revision"] == 2 for e in fleet)
    print(f"revocation visible after {latency * 1000:.0f} ms (informational)")


async def test_control_plane_down_during_operation_keeps_the_active_bundle(sidecar_factory, pki, cp,
                                                                            env, upstream):
    sc = await sidecar_factory(extra=bundle_extra(cp, env, long_poll_s=0))
    fe = pki.client("frontend")
    assert (await curl(sc.url("/api/x"), fe, cacert=pki.bundle)).status == 200
    await cp.stop()
    env.running.remove(cp)

    async def failing():
        return sc.worker.inputs.bundle.failures > 0
    assert await until(failing)
    r = await curl(sc.url("/api/x"), fe, cacert=pki.bundle)
    assert r.status == 200 and sc.worker.state.policy.revision == "demo@1"
    assert sc.worker.metrics.refreshes.values.get(("policy", "failed"), 0) >= 1


async def test_control_plane_down_at_start_uses_the_persisted_bundle(sidecar_factory, pki, cp, env,
                                                                      upstream):
    extra = bundle_extra(cp, env, long_poll_s=0)
    sc = await sidecar_factory(extra=extra)
    assert (await curl(sc.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)).status == 200
    await sc.stop()
    await cp.stop()
    env.running.remove(cp)
    assert (env.root / "sidecar-cache" / "last-good.tar.gz").exists()
    sc2 = await sidecar_factory(extra=extra, name="sidecar2.yaml")
    r = await curl(sc2.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
    assert r.status == 200 and sc2.worker.state.policy.revision == "demo@1"


async def test_the_control_plane_identity_is_checked(cp, env, pki):
    def source(server_id):
        return BundleSource(BundleConfig(
            url=cp.url("/bundles/demo"), public_keys=(str(env.root / "signing.key.pub"),),
            server_id=server_id, long_poll_s=0, min_delay_s=0.05, max_delay_s=0.1, timeout_s=2),
            trust_domains=frozenset({TD, PARTNER_TD}))
    good = source(CP_ID)
    await good.start_remote(client_ssl(pki.client("frontend"), pki))
    try:
        assert good.active is not None and good.active.revision == 1
    finally:
        await good.close()
    impostor = source(f"spiffe://{TD}/ns/platform/sa/someone-else")
    await impostor.start_remote(client_ssl(pki.client("frontend"), pki))
    try:
        assert impostor.value is None and "expected" in impostor.last_error
    finally:
        await impostor.close()
