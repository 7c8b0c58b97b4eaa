"""A sidecar deciding from a signed policy bundle on disk: activation, refusals (unsigned, tampered,
rolled back), revocations, expiry and the last-good cache — over real mTLS with curl."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import time

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.bundles.io import to_targz, write_targz
from proxy.core.bundle import build
from tests.conftest import curl
from tests.factories import BATCH_ID, DEFAULT_POLICY, FRONTEND_ID


def policy_with(*rules) -> bytes:
    doc = dict(DEFAULT_POLICY)
    doc["rules"] = list(DEFAULT_POLICY["rules"]) + list(rules)
    return yaml.safe_dump(doc, sort_keys=False).encode()


BATCH_API = {"id": "batch-api", "effect": "allow", "from": {"workloads": [BATCH_ID]},
             "to": [{"paths": ["/api/**"]}]}


class Publisher:
    def __init__(self, root, key: Ed25519PrivateKey | None):
        self.root, self.key = root, key
        self.path = root / "bundle.tar.gz"

    def publish(self, revision: int, policy: bytes, *, revocations: dict | None = None,
                expires_in_s: float | None = None, signed: bool = True):
        files = {"policy.yaml": policy}
        if revocations is not None:
            files["data/revocations.json"] = json.dumps(revocations).encode()
        now = time.time()
        b = build(files, revision=revision, now=now,
                  expires_at=None if expires_in_s is None else now + expires_in_s,
                  signer=self.key if signed else None)
        write_targz(b, self.path)
        return b


@pytest.fixture
def keys(pki):
    key = Ed25519PrivateKey.generate()
    pub = pki.root / "bundle-signer.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


async def start(sidecar_factory, pki, keys, pub_path=None, **bundle_extra):
    cfg = {"path": str(pki.root / "bundle.tar.gz"), "public_keys": [str(keys[1])],
           "cache_dir": str(pki.root / "cache"), **bundle_extra}
    return await sidecar_factory(extra={"policy": {"file": None, "bundle": cfg,
                                                   "watch_interval_s": 0.05}})


async def until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def get(sc, who, path="/api/x"):
    return await curl(sc.url(path), sc.pki.client(who), cacert=sc.pki.bundle)


async def test_bundle_revisions_activate_and_bad_bundles_keep_the_active_one(sidecar_factory, pki,
                                                                            keys, upstream):
    pub = Publisher(pki.root, keys[0])
    pub.publish(1, policy_with())
    sc = await start(sidecar_factory, pki, keys)
    assert (await get(sc, "batch")).status == 403
    assert (await sc.wait_records(1))[-1]["policy_revision"] == "bundle@1"

    pub.publish(2, policy_with(BATCH_API))

    async def batch_allowed():
        return (await get(sc, "batch")).status == 200
    assert await until(batch_allowed)
    recs = await sc.wait_records(3)
    assert recs[-1]["policy_revision"] == "bundle@2"

    failed = sc.worker.metrics.refreshes.values.get

    def fails():
        return failed(("policy", "failed"), 0)

    def refused_with(code):
        # the specific refusal, and counted: a failing source is retried, so the count alone can
        # grow from a retry of the previous bad bundle before the new file is read
        async def refused() -> bool:
            return fails() > before and code in (sc.worker.inputs.bundle.last_error or "")
        return refused

    # rolled back: revision 1 again (validly signed) is refused
    before = fails()
    pub.publish(1, policy_with())
    assert await until(refused_with("bundle_rollback"))
    assert (await get(sc, "batch")).status == 200

    # unsigned while keys are configured
    before = fails()
    pub.publish(3, policy_with(), signed=False)
    assert await until(refused_with("bundle_unsigned"))
    assert (await get(sc, "batch")).status == 200

    # tampered: a policy byte changed after signing
    before = fails()
    good = build({"policy.yaml": policy_with()}, revision=4, now=time.time(), expires_at=None,
                 signer=keys[0])
    raw = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(to_targz(good)), mode="r:gz") as src, \
            tarfile.open(fileobj=raw, mode="w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name.endswith("policy.yaml"):
                data = data.replace(b"batch-admin-deny", b"batch-admin-DENY")
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    # replaced atomically, as a publisher does (the poller must not read a half-written file)
    tmp = pki.root / "bundle.tar.gz.tmp"
    tmp.write_bytes(raw.getvalue())
    os.replace(tmp, pki.root / "bundle.tar.gz")
    assert await until(refused_with("bundle_hash_mismatch"))
    assert sc.worker.state.policy.revision == "bundle@2"
    # and the last good bundle was persisted
    assert (pki.root / "cache" / "last-good.tar.gz").exists()


async def test_revocations_in_the_bundle_refuse_a_workload(sidecar_factory, pki, keys, upstream):
    pub = Publisher(pki.root, keys[0])
    pub.publish(1, policy_with())
    sc = await start(sidecar_factory, pki, keys)
    assert (await get(sc, "frontend")).status == 200
    pub.publish(2, policy_with(), revocations={"spiffe_ids": [FRONTEND_ID]})

    async def revoked():
        r = await get(sc, "frontend")
        return r.status == 403 and r.json()["error"] == "revoked_workload"
    assert await until(revoked)

    async def recorded():
        return any(r["code"] == "revoked_workload" for r in sc.records())
    assert await until(recorded)
    rec = next(r for r in sc.records() if r["code"] == "revoked_workload")
    assert rec["policy_revision"] == "bundle@2" and rec["decision"] == "deny"


async def test_expired_bundle_fails_closed_after_its_grace(sidecar_factory, pki, keys, upstream):
    pub = Publisher(pki.root, keys[0])
    pub.publish(1, policy_with(), expires_in_s=1.5)
    sc = await start(sidecar_factory, pki, keys, expiry_grace_s=0.5)
    assert (await get(sc, "frontend")).status == 200

    async def closed():
        r = await get(sc, "frontend")
        return r.status == 503 and r.json()["error"] == "bundle_expired"
    assert await until(closed, timeout=8)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.admin_port}/readyz") as r:
            assert r.status == 503 and "bundle_expired" in (await r.json())["reasons"]
    pub.publish(2, policy_with())  # a fresh bundle brings it back

    async def back():
        return (await get(sc, "frontend")).status == 200
    assert await until(back)


async def test_unsigned_bundle_refused_at_start(sidecar_factory, pki, keys):
    Publisher(pki.root, None).publish(1, policy_with(), signed=False)
    from proxy.errors import ConfigError
    with pytest.raises(ConfigError, match="bundle_unsigned"):
        await start(sidecar_factory, pki, keys)


async def test_cached_bundle_is_used_when_the_source_is_unusable_at_start(sidecar_factory, pki,
                                                                          keys, upstream):
    pub = Publisher(pki.root, keys[0])
    pub.publish(5, policy_with(BATCH_API))
    sc = await start(sidecar_factory, pki, keys)
    assert (await get(sc, "batch")).status == 200
    await sc.stop()
    (pki.root / "bundle.tar.gz").write_bytes(b"garbage")  # the source is broken now
    sc2 = await start(sidecar_factory, pki, keys)
    assert (await get(sc2, "batch")).status == 200
    assert sc2.worker.state.policy.revision == "bundle@5"
