"""The bundle server: OPA bundle HTTP protocol (ETag, If-None-Match/304, long polling) over mTLS,
and signatures that verify with the control plane's public key."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from proxy.bundles.io import read_targz_bytes
from proxy.core import bundle as cb
from proxy.errors import BundleError
from tests.controlplane.conftest import CpEnv, RunningCP, policy_bytes, source_targz
from tests.factories import DEFAULT_POLICY

DEMO = "/bundles/demo"


def _policy_with(rule_id: str) -> dict:
    return {"version": 1, "rules": [*DEFAULT_POLICY["rules"], {
        "id": rule_id, "effect": "allow",
        "from": {"workloads": ["spiffe://example.org/ns/demo/sa/extra"]},
        "to": [{"methods": ["GET"], "paths": ["/extra"]}]}]}


async def _publish(cp: RunningCP, rule_id: str) -> dict:
    s = cp.session(cp.pki.client("deployer"))
    body = source_targz({"policy.yaml": policy_bytes(_policy_with(rule_id))})
    async with s.post(cp.url("/v1/bundles/demo/publish"), data=body,
                      headers={"Content-Type": "application/gzip"}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def test_get_returns_the_current_revision_as_targz_with_its_digest_as_etag(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/gzip"
        etag = r.headers["ETag"]
        body = await r.read()
    bundle = read_targz_bytes(body)
    assert etag == f'"{cb.digest_of(bundle.manifest_bytes)}"'
    assert bundle.files["policy.yaml"] == policy_bytes()
    assert r.headers["X-Bundle-Revision"] == "1"


async def test_if_none_match_with_the_current_etag_is_304(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        etag = r.headers["ETag"]
    async with s.get(cp.url(DEMO), headers={"If-None-Match": etag}) as r:
        assert r.status == 304
        assert r.headers["ETag"] == etag
        assert await r.read() == b""


async def test_if_none_match_with_an_old_etag_is_200(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        old = r.headers["ETag"]
    await _publish(cp, "second")
    async with s.get(cp.url(DEMO), headers={"If-None-Match": old}) as r:
        assert r.status == 200
        assert r.headers["ETag"] != old
        assert r.headers["X-Bundle-Revision"] == "2"


async def test_long_poll_is_woken_by_a_publish(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        etag = r.headers["ETag"]

    async def poll():
        async with s.get(cp.url(DEMO), headers={"If-None-Match": etag,
                                                "Prefer": "wait=30"}) as r:
            return r.status, r.headers.get("X-Bundle-Revision"), await r.read()

    task = asyncio.create_task(poll())
    await cp.wait_waiting("demo", 1)
    published = await _publish(cp, "woken")
    status, revision, body = await task
    assert status == 200
    assert int(revision) == published["revision"] == 2
    assert b"woken" in read_targz_bytes(body).files["policy.yaml"]


async def test_one_publish_wakes_every_long_poll(cp: RunningCP):
    n = 20
    sessions = [cp.session(cp.pki.client("frontend" if i % 2 else "batch")) for i in range(n)]
    async with sessions[0].get(cp.url(DEMO)) as r:
        etag = r.headers["ETag"]

    async def poll(s):
        async with s.get(cp.url(DEMO), headers={"If-None-Match": etag,
                                                "Prefer": "wait=30"}) as r:
            return r.status, r.headers["ETag"]

    tasks = [asyncio.create_task(poll(s)) for s in sessions]
    await cp.wait_waiting("demo", n)
    await _publish(cp, "everyone")
    results = await asyncio.gather(*tasks)
    assert {st for st, _ in results} == {200}
    assert len({e for _, e in results}) == 1 and results[0][1] != etag
    assert cp.cp.store.slot("demo").waiting == 0


async def test_long_poll_is_woken_by_a_revocation(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        etag = r.headers["ETag"]
    task = asyncio.create_task(s.get(cp.url(DEMO), headers={"If-None-Match": etag,
                                                            "Prefer": "wait=30"}))
    await cp.wait_waiting("demo", 1)
    d = cp.session(cp.pki.client("deployer"))
    revoked = "spiffe://example.org/ns/demo/sa/batch"
    async with d.post(cp.url("/v1/bundles/demo/revocations"),
                      json={"spiffe_ids": [revoked]}) as r:
        assert r.status == 201
    r = await task
    assert r.status == 200
    files = read_targz_bytes(await r.read()).files
    r.release()
    assert cb.parse_revocations(files["data/revocations.json"]).spiffe_ids == {revoked}


async def test_long_poll_that_times_out_is_304_and_the_wait_is_capped(env: CpEnv):
    cp = await env.start(env.write_config(extra={"long_poll": {"max_wait_s": 1}}))
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        etag = r.headers["ETag"]
    async with s.get(cp.url(DEMO), headers={"If-None-Match": etag,
                                            "Prefer": "wait=600"}) as r:
        assert r.status == 304
        assert r.headers["ETag"] == etag
        assert r.headers["Preference-Applied"] == "wait=1"


async def test_long_poll_without_if_none_match_answers_at_once(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO), headers={"Prefer": "wait=30"}) as r:
        assert r.status == 200
        assert "Preference-Applied" not in r.headers


async def test_long_polls_are_answered_at_shutdown(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        etag = r.headers["ETag"]
    task = asyncio.create_task(s.get(cp.url(DEMO), headers={"If-None-Match": etag,
                                                            "Prefer": "wait=30"}))
    await cp.wait_waiting("demo", 1)
    cp.cp.store.close()
    r = await task
    assert r.status == 304
    r.release()


async def test_unpublished_and_unknown_bundles_are_404(cp: RunningCP):
    s = cp.session(cp.pki.client("deployer"))
    async with s.get(cp.url("/bundles/empty")) as r:
        assert r.status == 404
        assert (await r.json())["error"] == "bundle_not_published"
    async with s.get(cp.url("/bundles/nope")) as r:
        assert r.status == 404
        assert (await r.json())["error"] == "bundle_not_found"


async def test_opa_long_polling_content_type_when_advertised(env: CpEnv):
    cp = await env.start(env.write_config(extra={"long_poll": {
        "advertise_opa_long_polling": True}}))
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/vnd.openpolicyagent.bundles"


@pytest.mark.parametrize("key_type", ["ed25519", "ec"])
async def test_signature_verifies_with_the_control_plane_public_key(env: CpEnv, key_type: str):
    env.write_signing_key(key_type=key_type)
    cp = await env.start()
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url("/v1/signing-key")) as r:
        assert r.status == 200
        info = await r.json()
    async with s.get(cp.url(DEMO)) as r:
        body = await r.read()
    public = serialization.load_pem_public_key(info["public_key_pem"].encode())
    assert public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo) == \
        (env.root / "signing.key.pub").read_bytes()
    vb = cb.verify(read_targz_bytes(body), public_keys=[public], require_signature=True,
                   now=env.clock(), active_revision=None)
    assert vb.signed_by == info["kid"] == cb.key_id(public)
    assert info["alg"] == ("EdDSA" if key_type == "ed25519" else "ES256")
    assert vb.revision == 1


async def test_signature_does_not_verify_with_another_key(cp: RunningCP, env: CpEnv):
    s = cp.session(cp.pki.client("frontend"))
    async with s.get(cp.url(DEMO)) as r:
        body = await r.read()
    other = serialization.load_pem_public_key(
        (env.write_signing_key("other.key").parent / "other.key.pub").read_bytes())
    with pytest.raises(BundleError) as exc:
        cb.verify(read_targz_bytes(body), public_keys=[other], require_signature=True,
                  now=env.clock(), active_revision=None)
    assert exc.value.code == "bundle_unknown_key"


async def test_served_bytes_are_stable_across_requests(cp: RunningCP):
    s = cp.session(cp.pki.client("frontend"))
    bodies = []
    for _ in range(2):
        async with s.get(cp.url(DEMO)) as r:
            bodies.append(await r.read())
    assert bodies[0] == bodies[1]
    assert orjson.loads(read_targz_bytes(bodies[0]).manifest_bytes)["revision"] == 1
