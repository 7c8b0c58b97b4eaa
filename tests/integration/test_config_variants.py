"""Config variants a user meets: a unix-socket upstream, SPIFFE (JWKS) bundle format for a
federated trust domain, and the example policy served through the sidecar."""

from __future__ import annotations

import json

from aiohttp import web

from proxy.dev.ca import write_spiffe_bundle_json
from tests.conftest import curl
from tests.factories import FRONTEND_ID, PARTNER_ID, PARTNER_TD, TD


async def test_unix_socket_upstream(sidecar_factory, pki, tmp_path):
    sock = tmp_path / "app.sock"

    async def handler(req: web.Request) -> web.Response:
        return web.json_response({"path": req.path_qs,
                                  "caller": req.headers.get("x-portcullis-spiffe-id")})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.UnixSite(runner, str(sock))
    await site.start()
    try:
        sc = await sidecar_factory(upstream_url=f"unix://{sock}")
        r = await curl(sc.url("/api/v1?q=1"), pki.client("frontend"), cacert=pki.bundle)
        assert r.status == 200 and r.json() == {"path": "/api/v1?q=1", "caller": FRONTEND_ID}
        r = await curl(sc.url("/api/v1"), pki.client("frontend"), cacert=pki.bundle)
        assert r.status == 200
        assert sc.worker.metrics.upstream_connects.values[()] == 1  # pooled over the socket
    finally:
        await runner.cleanup()


async def test_federated_domain_with_spiffe_bundle_format(sidecar_factory, pki, upstream):
    path = pki.root / "bundles" / f"{PARTNER_TD}.json"
    path.write_bytes(write_spiffe_bundle_json([pki.partner_ca]))
    assert "keys" in json.loads(path.read_bytes())
    extra = {"identity": {"trust_domains": [
        {"name": TD, "bundle_file": f"bundles/{TD}.pem"},
        {"name": PARTNER_TD, "bundle_file": f"bundles/{PARTNER_TD}.json", "format": "spiffe"},
    ]}}
    sc = await sidecar_factory(extra=extra)
    r = await curl(sc.url("/billing/x"), pki.client("partner"), cacert=pki.bundle)
    assert r.status == 200
    rec = (await sc.wait_records(1))[-1]
    assert rec["workload"]["spiffe_id"] == PARTNER_ID
    # a PEM file declared as "spiffe" does not load: the sidecar refuses to start with it
    from proxy.config import load_config
    from proxy.errors import ConfigError
    from proxy.runtime.server import Worker
    from tests.factories import write_config
    bad = dict(extra)
    bad["identity"] = {"trust_domains": [
        {"name": TD, "bundle_file": f"bundles/{TD}.pem", "format": "spiffe"}]}
    cfg = load_config(write_config(pki, upstream_url=upstream.url, extra=bad, name="bad.yaml"), env={})
    try:
        Worker(cfg).load()
        raise AssertionError("a PEM file read as a SPIFFE bundle must not load")
    except ConfigError as exc:
        assert "trust bundle example.org" in str(exc)
