"""The sidecar over real TLS on 127.0.0.1, driven with curl as a user would."""

from __future__ import annotations

import pytest

from tests.conftest import curl
from tests.factories import BATCH_ID, FRONTEND_ID, PARTNER_ID


async def test_allowed_caller_reaches_upstream_with_identity_headers(sidecar, pki, upstream):
    r = await curl(sidecar.url("/api/items?x=1"), pki.client("frontend"), cacert=pki.bundle)
    assert r.status == 200, r
    echoed = r.json()
    assert echoed["target"] == "/api/items?x=1"
    headers = {n.lower(): v for n, v in echoed["headers"]}
    assert headers["x-portcullis-spiffe-id"] == FRONTEND_ID
    xfcc = headers["x-forwarded-client-cert"]
    by, hash_, uri = xfcc.split(";")
    assert by == "By=spiffe://example.org/ns/demo/sa/sidecar"
    assert uri == f"URI={FRONTEND_ID}"
    svid = pki.client("frontend").svid
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: F401
    import hashlib
    assert hash_ == "Hash=" + hashlib.sha256(
        svid.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    rec = (await sidecar.wait_records(1))[-1]
    assert rec["decision"] == "allow" and rec["code"] == "allowed"
    assert rec["rule_id"] == "frontend-api"
    assert rec["workload"]["spiffe_id"] == FRONTEND_ID
    assert rec["path"] == "/api/items" and "x=1" not in str(rec)  # never the query
    assert rec["status"] == 200 and rec["upstream_status"] == 200


async def test_caller_with_other_spiffe_id_is_denied(sidecar, pki, upstream):
    r = await curl(sidecar.url("/api/items"), pki.client("batch"), cacert=pki.bundle)
    assert r.status == 403
    body = r.json()
    assert body["error"] == "no_matching_rule" and len(body["decision_id"]) == 24
    assert upstream.received == []
    rec = (await sidecar.wait_records(1))[-1]
    assert rec["decision"] == "deny" and rec["workload"]["spiffe_id"] == BATCH_ID
    assert rec["decision_id"] == body["decision_id"]


async def test_deny_rule_overrides_and_is_named(sidecar, pki, upstream):
    r = await curl(sidecar.url("/admin/users"), pki.client("batch"), cacert=pki.bundle)
    assert r.status == 403 and r.json()["error"] == "denied_by_rule"
    rec = (await sidecar.wait_records(1))[-1]
    assert rec["rule_id"] == "batch-admin-deny"


async def test_caller_without_certificate_is_refused(sidecar, pki, upstream):
    r = await curl(sidecar.url("/api/items"), None, cacert=pki.bundle)
    assert r.status == 0 and r.rc != 0  # the TLS handshake fails: no HTTP exchange at all
    assert upstream.received == []


async def test_caller_from_untrusted_ca_is_refused(sidecar, pki, upstream):
    r = await curl(sidecar.url("/api/items"), pki.client("rogue"), cacert=pki.bundle)
    assert r.status == 0 and r.rc != 0
    assert upstream.received == []


async def test_federated_trust_domain_is_accepted_through_its_own_bundle(sidecar, pki, upstream):
    r = await curl(sidecar.url("/billing/invoices"), pki.client("partner"), cacert=pki.bundle)
    assert r.status == 200
    rec = (await sidecar.wait_records(1))[-1]
    assert rec["workload"]["spiffe_id"] == PARTNER_ID and rec["rule_id"] == "partner-billing"


async def test_ca_of_one_domain_cannot_vouch_for_another(sidecar, pki, upstream):
    # signed by example.org's CA (so OpenSSL's union check passes) but names partner.org
    r = await curl(sidecar.url("/billing/invoices"), pki.client("cross"), cacert=pki.bundle)
    assert r.status == 403 and r.json()["error"] == "svid_untrusted"
    assert upstream.received == []


@pytest.mark.parametrize("path,code", [
    ("/public/../private", "invalid_path"),
    ("/api/%2e%2e/admin", "invalid_path"),
    ("/api%2Fadmin", "invalid_path"),
    ("/api;jsessionid=1", "invalid_path"),
])
async def test_ambiguous_paths_are_rejected_before_policy(sidecar, pki, upstream, path, code):
    r = await curl(sidecar.url(path), pki.client("frontend"), "--path-as-is", cacert=pki.bundle)
    assert r.status == 400 and r.json()["error"] == code
    assert upstream.received == []


async def test_repeated_slashes_are_forwarded_merged(sidecar, pki, upstream):
    r = await curl(sidecar.url("//api//items"), pki.client("frontend"), "--path-as-is",
                   cacert=pki.bundle)
    assert r.status == 200
    assert upstream.received[-1].target == "/api/items"
