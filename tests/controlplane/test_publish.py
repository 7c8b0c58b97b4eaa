"""Publishing: validation (400 with every problem), monotonic revisions, rollback as a new higher
revision, revocations, retention, durability across restarts, expiry re-signing."""

from __future__ import annotations

import asyncio
import os
import tarfile

import pytest

from proxy.bundles.io import read_targz_bytes
from proxy.core import bundle as cb
from proxy.errors import ConfigError
from tests.controlplane.conftest import CpEnv, RunningCP, policy_bytes, source_targz
from tests.factories import DEFAULT_POLICY

PUBLISH = "/v1/bundles/demo/publish"


def _policy(rule_id: str) -> dict:
    return {"version": 1, "rules": [*DEFAULT_POLICY["rules"], {
        "id": rule_id, "effect": "allow",
        "from": {"workloads": ["spiffe://example.org/ns/demo/sa/extra"]},
        "to": [{"methods": ["GET"], "paths": ["/extra"]}]}]}


async def _post(cp: RunningCP, path: str, *, data=None, json=None, method: str = "POST"):
    s = cp.session(cp.pki.client("deployer"))
    async with s.request(method, cp.url(path), data=data, json=json) as r:
        return r.status, await r.json()


async def _publish(cp: RunningCP, rule_id: str) -> dict:
    status, body = await _post(cp, PUBLISH, data=source_targz(
        {"policy.yaml": policy_bytes(_policy(rule_id))}))
    assert status == 201, body
    return body


async def _served(cp: RunningCP, bundle: str = "demo") -> cb.Bundle:
    s = cp.session(cp.pki.client("deployer"))
    async with s.get(cp.url(f"/bundles/{bundle}")) as r:
        assert r.status == 200
        return read_targz_bytes(await r.read())


async def test_publish_assigns_the_next_revision_and_serves_it(cp: RunningCP):
    body = await _publish(cp, "second")
    assert body["revision"] == 2 and body["origin"] == "publish"
    assert body["by"] == "spiffe://example.org/ns/platform/sa/deployer"
    served = await _served(cp)
    assert b"second" in served.files["policy.yaml"]
    assert body["etag"] == f'"{cb.digest_of(served.manifest_bytes)}"'


async def test_publish_rejects_a_policy_that_does_not_compile_listing_every_problem(cp: RunningCP):
    bad = {"version": 1, "colour": "red", "rules": [
        {"id": "a", "effect": "permit", "from": {"workloads": ["spiffe://example.org/x"]},
         "to": [{"paths": ["/a"]}]},
        {"id": "b", "effect": "allow", "from": {"workloads": ["not-a-spiffe-id"]},
         "to": [{"paths": ["/b"]}]}]}
    status, body = await _post(cp, PUBLISH, data=source_targz({"policy.yaml": policy_bytes(bad)}))
    assert status == 400
    assert body["error"] == "bundle_invalid"
    paths = {(p["file"], p["path"]) for p in body["problems"]}
    assert ("policy.yaml", "colour") in paths
    assert ("policy.yaml", "rules[0].effect") in paths
    assert any(f == "policy.yaml" and p.startswith("rules[1].from.workloads") for f, p in paths)
    assert cp.cp.store.current_revision("demo") == 1


async def test_publish_rejects_bad_revocations_and_a_missing_policy(cp: RunningCP):
    status, body = await _post(cp, PUBLISH, data=source_targz({
        "data/revocations.json": b'{"spiffe_ids": ["https://nope"], "colour": []}'}))
    assert status == 400 and body["error"] == "bundle_invalid"
    got = {(p["file"], p["path"]) for p in body["problems"]}
    assert ("policy.yaml", "") in got
    assert ("data/revocations.json", "spiffe_ids[0]") in got
    assert ("data/revocations.json", "colour") in got


async def test_publish_rejects_a_policy_naming_a_trust_domain_the_bundle_does_not_allow(
        env: CpEnv):
    env.write_source(policy={"version": 1, "rules": [
        r for r in DEFAULT_POLICY["rules"] if "partner" not in r["id"]]})
    cp = await env.start(env.write_config(bundles=[
        {"name": "demo", "source_dir": str(env.source_dir), "trust_domains": ["example.org"]}]))
    status, body = await _post(cp, PUBLISH, data=source_targz({"policy.yaml": policy_bytes()}))
    assert status == 400  # DEFAULT_POLICY names partner.org
    assert any("partner.org" in p["message"] for p in body["problems"])


async def test_publish_rejects_an_archive_with_a_symlink(cp: RunningCP):
    link = tarfile.TarInfo("./data/evil")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    status, body = await _post(cp, PUBLISH, data=source_targz(
        {"policy.yaml": policy_bytes()}, extra=[link]))
    assert status == 400 and body["error"] == "upload_invalid"
    assert "symbolic link" in body["problems"][0]["message"]


async def test_publish_rejects_a_body_that_is_not_gzip(cp: RunningCP):
    status, body = await _post(cp, PUBLISH, data=b"policy.yaml")
    assert status == 400 and body["error"] == "upload_invalid"


async def test_publish_too_large_is_413(env: CpEnv):
    cp = await env.start(env.write_config(extra={"listener": {"max_upload_bytes": 2048}}))
    status, body = await _post(cp, PUBLISH, data=os.urandom(4096))
    assert status == 413 and body["error"] == "payload_too_large"


async def test_publish_skips_hidden_files_of_the_source(cp: RunningCP):
    status, body = await _post(cp, PUBLISH, data=source_targz({
        "policy.yaml": policy_bytes(), ".manifest.json": b"{}", "data/._x": b"mac"}))
    assert status == 201
    assert sorted(body["skipped"]) == [".manifest.json", "data/._x"]
    assert set((await _served(cp)).files) == {"policy.yaml"}


async def test_revisions_are_monotonic_even_for_concurrent_publishes(cp: RunningCP):
    results = await asyncio.gather(*(_publish(cp, f"r{i}") for i in range(5)))
    assert sorted(r["revision"] for r in results) == [2, 3, 4, 5, 6]
    status, listing = await _post(cp, "/v1/bundles/demo", method="GET")
    assert status == 200
    assert [r["revision"] for r in listing["revisions"]] == [6, 5, 4, 3, 2, 1]
    assert listing["current"]["revision"] == 6


async def test_rollback_republishes_old_content_under_a_new_higher_revision(cp: RunningCP):
    first = await _served(cp)
    await _publish(cp, "bad-change")
    status, body = await _post(cp, "/v1/bundles/demo/rollback", json={"to_revision": 1})
    assert status == 201
    assert body["revision"] == 3 and body["origin"] == "rollback" and body["from_revision"] == 1
    served = await _served(cp)
    assert dict(served.files) == dict(first.files)
    vb = cb.verify(served, public_keys=[cp.cp.store.public_key], require_signature=True,
                   now=cp.cp.clock(), active_revision=2)  # a sidecar at 2 accepts it
    assert vb.revision == 3


async def test_rollback_to_a_revision_not_retained_is_404(env: CpEnv):
    cp = await env.start(env.write_config(extra={"state": {"keep_revisions": 2}}))
    for i in range(3):
        await _publish(cp, f"k{i}")
    status, body = await _post(cp, "/v1/bundles/demo/rollback", json={"to_revision": 1})
    assert status == 404 and body["error"] == "revision_not_found"
    assert sorted(os.listdir(env.state_dir / "bundles" / "demo")) == [
        "latest.json", "r000000000003.json", "r000000000003.tar.gz",
        "r000000000004.json", "r000000000004.tar.gz"]


async def test_rollback_body_is_validated(cp: RunningCP):
    status, body = await _post(cp, "/v1/bundles/demo/rollback", json={"to_revision": "1",
                                                                     "why": "x"})
    assert status == 400 and body["error"] == "invalid_request"
    assert {p["path"] for p in body["problems"]} == {"to_revision", "why"}
    status, body = await _post(cp, "/v1/bundles/demo/rollback", data=b"{not json")
    assert status == 400 and body["error"] == "invalid_json"


async def test_revocations_are_added_and_removed_as_new_revisions(cp: RunningCP):
    change = {"spiffe_ids": ["spiffe://example.org/ns/demo/sa/batch"],
              "subjects": [{"iss": "https://idp.example.org", "sub": "mallory"}],
              "clients": ["leaky-client"], "jtis": ["jti-1"]}
    status, body = await _post(cp, "/v1/bundles/demo/revocations", json=change)
    assert status == 201 and body["changed"] and body["revision"] == 2
    revs = cb.parse_revocations((await _served(cp)).files["data/revocations.json"])
    assert revs.subjects == {("https://idp.example.org", "mallory")}
    assert revs.clients == {"leaky-client"} and revs.jtis == {"jti-1"}

    status, body = await _post(cp, "/v1/bundles/demo/revocations", method="DELETE",
                               json={"jtis": ["jti-1"], "clients": ["leaky-client"]})
    assert status == 201 and body["revision"] == 3
    revs = cb.parse_revocations((await _served(cp)).files["data/revocations.json"])
    assert revs.jtis == frozenset() and revs.spiffe_ids == {"spiffe://example.org/ns/demo/sa/batch"}
    assert (await _served(cp)).files["policy.yaml"] == policy_bytes()  # policy untouched


async def test_a_revocation_change_that_changes_nothing_makes_no_revision(cp: RunningCP):
    status, body = await _post(cp, "/v1/bundles/demo/revocations", method="DELETE",
                               json={"jtis": ["never-revoked"]})
    assert status == 200 and body["changed"] is False and body["revision"] == 1


async def test_revocation_requests_are_validated(cp: RunningCP):
    status, body = await _post(cp, "/v1/bundles/demo/revocations", json={
        "spiffe_ids": ["spiffe://Example.org/x"], "subjects": [{"iss": "i"}], "users": []})
    assert status == 400 and body["error"] == "invalid_request"
    assert {p["path"] for p in body["problems"]} == {"spiffe_ids[0]", "subjects[0].sub", "users"}
    status, body = await _post(cp, "/v1/bundles/demo/revocations", json={})
    assert status == 400 and body["error"] == "invalid_request"
    assert cp.cp.store.current_revision("demo") == 1


async def test_revocations_on_an_unpublished_bundle_are_404(cp: RunningCP):
    status, body = await _post(cp, "/v1/bundles/empty/revocations", json={"jtis": ["x"]})
    assert status == 404 and body["error"] == "bundle_not_published"


async def test_restart_reloads_every_bundle_at_its_latest_revision(env: CpEnv):
    cp = await env.start()
    await _publish(cp, "before-restart")
    before = await _served(cp)
    await cp.stop()
    env.running.remove(cp)
    (env.source_dir / "policy.yaml").write_bytes(b"not: [a policy")  # not read again
    cp2 = await env.start()
    after = await _served(cp2)
    assert after.manifest_bytes == before.manifest_bytes
    assert cp2.cp.store.current_revision("demo") == 2
    assert (await _publish(cp2, "after-restart"))["revision"] == 3


async def test_a_second_control_plane_cannot_serve_the_same_state_directory(env: CpEnv):
    await env.start()
    rc = env.make()
    rc.cp.load()
    with pytest.raises(ConfigError) as exc:
        await rc.cp.start()
    assert "in use by another control plane process" in str(exc.value)
    await rc.cp.stop()


async def test_a_state_directory_that_lost_its_newest_revision_is_refused(env: CpEnv):
    cp = await env.start()
    await _publish(cp, "newest")
    await cp.stop()
    env.running.remove(cp)
    d = env.state_dir / "bundles" / "demo"
    (d / "r000000000002.tar.gz").unlink()
    rc = env.make()
    with pytest.raises(ConfigError) as exc:
        rc.cp.load()
    assert "rolled back" in str(exc.value)


async def test_a_stored_revision_that_does_not_verify_is_refused(env: CpEnv):
    cp = await env.start()
    await cp.stop()
    env.running.remove(cp)
    env.write_signing_key()  # a new key, the old one not listed as previous
    rc = env.make()
    with pytest.raises(ConfigError) as exc:
        rc.cp.load()
    assert "bundle_unknown_key" in str(exc.value)


async def test_a_revision_signed_by_a_previous_key_is_resigned_under_a_new_revision(env: CpEnv):
    cp = await env.start()
    await cp.stop()
    env.running.remove(cp)
    (env.root / "old.pub").write_bytes((env.root / "signing.key.pub").read_bytes())
    env.write_signing_key()
    cp2 = await env.start(env.write_config(signing={
        "key_file": str(env.root / "signing.key"),
        "previous_public_key_files": [str(env.root / "old.pub")]}))
    assert cp2.cp.store.current_revision("demo") == 2
    vb = cb.verify(await _served(cp2), public_keys=[cp2.cp.store.public_key],
                   require_signature=True, now=env.clock(), active_revision=1)
    assert vb.signed_by == cp2.cp.store.kid
    assert cp2.cp.store.listing("demo")["current"]["origin"] == "resign"


async def test_an_invalid_initial_source_fails_the_start(env: CpEnv):
    (env.source_dir / "policy.yaml").write_bytes(b"version: 2\nrules: []\n")
    rc = env.make()
    rc.cp.load()
    with pytest.raises(ConfigError) as exc:
        await rc.cp.start()
    assert "bundles[demo].source_dir" in str(exc.value)
    await rc.cp.stop()


async def test_expiring_bundles_are_resigned_at_half_life(env: CpEnv):
    cp = await env.start(env.write_config(bundles=[
        {"name": "demo", "source_dir": str(env.source_dir), "expires_after_s": 600}]))
    first = cb.verify(await _served(cp), public_keys=[cp.cp.store.public_key],
                      require_signature=True, now=env.clock(), active_revision=None)
    assert first.expires_at is not None and first.expires_at - first.created_at == 600
    assert await cp.cp.store.refresh_expiring(env.clock()) == []
    env.clock.offset = 301
    refreshed = await cp.cp.store.refresh_expiring(env.clock())
    assert [r.revision for r in refreshed] == [2]
    assert refreshed[0].files == first.files and refreshed[0].origin == "refresh"
