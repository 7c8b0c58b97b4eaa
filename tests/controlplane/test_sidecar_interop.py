"""The sidecar's own bundle client (`proxy.runtime.bundle_source`) against the real control plane:
first fetch, a revocation arriving by long poll, and its status report in the fleet view."""

from __future__ import annotations

import asyncio
import threading

from proxy.config import BundleConfig
from proxy.runtime.bundle_source import BundleSource
from tests.conftest import client_ssl
from tests.controlplane.conftest import CP_ID, CpEnv, RunningCP
from tests.factories import FRONTEND_ID, PARTNER_TD, TD


async def _until(pred, what: str) -> None:
    for _ in range(1500):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached: {what}")


async def test_a_sidecar_bundle_client_follows_the_control_plane(cp: RunningCP, env: CpEnv,
                                                                 monkeypatch):
    # the server's SPIFFE ID is checked inside the TLS handshake (bundle_source.expect_server_id)
    from proxy.bundles import io as bundle_io

    unpacked_on: list[bool] = []  # per fetched archive: was it unpacked on the event loop thread?
    real_read = bundle_io.read_targz_bytes

    def spy(data, *args, **kwargs):
        unpacked_on.append(threading.current_thread() is threading.main_thread())
        return real_read(data, *args, **kwargs)

    monkeypatch.setattr(bundle_io, "read_targz_bytes", spy)
    source = BundleSource(BundleConfig(
        url=cp.url("/bundles/demo"), public_keys=(str(env.root / "signing.key.pub"),),
        server_id=CP_ID, long_poll_s=30, min_delay_s=0.05, max_delay_s=0.1),
        trust_domains=frozenset({TD, PARTNER_TD}))
    assert threading.current_thread() is threading.main_thread()  # the loop runs here
    await source.start_remote(client_ssl(cp.pki.client("frontend"), cp.pki))
    try:
        assert source.active is not None and source.active.revision == 1
        await cp.wait_waiting("demo", 1)
        s = cp.session(cp.pki.client("deployer"))
        revoked = "spiffe://example.org/ns/demo/sa/batch"
        async with s.post(cp.url("/v1/bundles/demo/revocations"),
                          json={"spiffe_ids": [revoked]}) as r:
            assert r.status == 201
        await _until(lambda: source.active.revision == 2, "revision 2 active in the sidecar")
        assert source.revocations.spiffe_ids == {revoked}
        assert unpacked_on == [False, False]  # both archives unpacked beside the loop, not on it
        await _until(lambda: any(
            e["active_revision"] == 2 for e in cp.cp.fleet.view(env.clock(), lambda _n: 2)[
                "sidecars"]), "the sidecar's report of revision 2")
        (entry,) = cp.cp.fleet.view(env.clock(), cp.cp.store.current_revision)["sidecars"]
        assert entry["spiffe_id"] == FRONTEND_ID and entry["behind"] is False
        assert entry["last_error"] is None
    finally:
        await source.close()
