"""What the sidecar forwards: hop-by-hop headers stripped both ways (RFC 9110 7.6.1), client-supplied
identity headers replaced by the sidecar's own, request and decision ids.

Real mTLS on 127.0.0.1, a real upstream (tests/upstreams.py); `RawClient` where exact bytes matter,
curl where a user would use curl. Every test also counts audit records after the sidecar stopped
(the sink is flushed then): exactly one per request.
"""

from __future__ import annotations

import orjson

from tests.conftest import RawClient, curl
from tests.factories import FRONTEND_ID, SIDECAR_ID

HOP_REQUEST = (
    b"GET /hop HTTP/1.1\r\nHost: svc\r\n"
    b"Connection: keep-alive, X-Named-Hop, x-other-hop, x_under_hop\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"TE: trailers\r\n"
    b"Trailer: x-checksum\r\n"
    b"Upgrade: websocket\r\n"
    b"Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n"
    b"X-Named-Hop: 1\r\n"
    b"x-other-hop: 2\r\n"
    b"x_under_hop: 3\r\n"
    b"X-End-To-End: kept\r\n"
    b"Authorization: Bearer kept\r\n"
    b"\r\n"
)


def names(echoed: dict) -> list[str]:
    return [n.lower() for n, _ in echoed["headers"]]


def values(echoed: dict, name: str) -> list[str]:
    return [v for n, v in echoed["headers"] if n.lower() == name]


async def raw(sidecar, pki) -> RawClient:
    return await RawClient.connect(sidecar.port, pki.client("frontend"), pki)


async def audit_after_stop(sidecar) -> list[dict]:
    await sidecar.stop()  # drains and flushes the audit sink: every record is on disk
    return sidecar.records()


# --------------------------------------------------------------------------------------------
# hop-by-hop, both directions
# --------------------------------------------------------------------------------------------


async def test_request_hop_by_hop_headers_are_not_forwarded(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(HOP_REQUEST)
    status, headers, body = await c.read_response()
    assert status == 200
    got = names(orjson.loads(body))
    for h in ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
              "proxy-authorization", "x-named-hop", "x-other-hop", "x_under_hop"):
        assert h not in got, h
    assert "x-end-to-end" in got and "authorization" in got
    assert not await c.closed(timeout=0.05)  # an ignored Upgrade (no Connection: upgrade) keeps alive
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_response_hop_by_hop_headers_are_not_returned(sidecar, pki, upstream):
    upstream.raw["/resp-hop"] = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
        b"Connection: keep-alive, X-A, x-b\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\nTrailer: x-sum\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\n"
        b"X-A: 1\r\nx-b: 2\r\nX-End: kept\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok")
    c = await raw(sidecar, pki)
    await c.send(b"GET /resp-hop HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, body = await c.read_response()
    assert status == 200 and body == b"ok"
    got = [n for n, _ in headers["__raw__"]]
    for h in ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
              "proxy-authenticate", "x-a", "x-b"):
        assert h not in got, h
    assert headers["x-end"] == "kept"
    assert [v for n, v in headers["__raw__"] if n == "set-cookie"] == ["a=1", "b=2"]
    # the echo answer too: keep-alive and the header its Connection names (x-hop)
    await c.send(b"GET /echo HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = await c.read_response()
    assert status == 200 and "x-hop" not in headers and "keep-alive" not in headers
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


async def test_upstream_connection_naming_content_length_cannot_break_framing(sidecar, pki, upstream):
    upstream.raw["/cl-hop"] = (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: content-length\r\n"
                               b"\r\nhello")
    c = await raw(sidecar, pki)
    await c.send(b"GET /cl-hop HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, body = await c.read_response(timeout=2)
    assert status == 200 and body == b"hello"
    assert headers["content-length"] == "5"
    await c.send(b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")  # the same connection still works
    status, _, body = await c.read_response(timeout=2)
    assert status == 200 and orjson.loads(body)["target"] == "/next"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


# --------------------------------------------------------------------------------------------
# identity headers
# --------------------------------------------------------------------------------------------


async def test_client_identity_headers_are_replaced_by_the_sidecars(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(
        b"GET /id HTTP/1.1\r\nHost: svc\r\n"
        b"X-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://example.org/ns/demo/sa/admin\r\n"
        b"x-forwarded-client-cert: URI=spiffe://a, URI=spiffe://b\r\n"
        b"X-Portcullis-Spiffe-Id: spiffe://example.org/ns/demo/sa/admin\r\n"
        b"x-portcullis-spiffe-id: spiffe://example.org/ns/demo/sa/admin, " + FRONTEND_ID.encode() + b"\r\n"
        b"X-PORTCULLIS-DECISION-ID: forged\r\n"
        b"X-Portcullis-Anything: forged\r\n"
        b"x_portcullis_spiffe_id: spiffe://example.org/ns/demo/sa/admin\r\n"
        b"X_Forwarded_Client_Cert: URI=spiffe://evil\r\n"
        b"\r\n")
    status, _, body = await c.read_response()
    assert status == 200
    echoed = orjson.loads(body)
    portcullis = sorted(n for n in names(echoed) if n.replace("_", "-").startswith("x-portcullis-"))
    assert portcullis == ["x-portcullis-decision-id", "x-portcullis-spiffe-id"]
    assert values(echoed, "x-portcullis-spiffe-id") == [FRONTEND_ID]
    assert [n for n in names(echoed) if n.replace("_", "-") == "x-forwarded-client-cert"] == [
        "x-forwarded-client-cert"]
    (xfcc,) = values(echoed, "x-forwarded-client-cert")
    assert xfcc.startswith(f"By={SIDECAR_ID};Hash=") and xfcc.endswith(f";URI={FRONTEND_ID}")
    await c.close()
    (rec,) = await audit_after_stop(sidecar)
    assert values(echoed, "x-portcullis-decision-id") == [rec["decision_id"]]


async def test_connection_header_cannot_remove_the_sidecars_headers(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(b"GET /id HTTP/1.1\r\nHost: svc\r\n"
                 b"Connection: x-portcullis-spiffe-id, X-Forwarded-Client-Cert\r\n"
                 b"Connection: x-portcullis-decision-id, x-request-id\r\n\r\n")
    status, _, body = await c.read_response()
    assert status == 200
    echoed = orjson.loads(body)
    assert values(echoed, "x-portcullis-spiffe-id") == [FRONTEND_ID]
    assert len(values(echoed, "x-forwarded-client-cert")) == 1
    assert len(values(echoed, "x-portcullis-decision-id")) == 1
    assert len(values(echoed, "x-request-id")) == 1
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_connection_content_length_from_client_cannot_break_request_framing(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(b"POST /upload HTTP/1.1\r\nHost: svc\r\nConnection: content-length, transfer-encoding\r\n"
                 b"Content-Length: 11\r\n\r\nhello world"
                 b"GET /after HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, _, body = await c.read_response()
    assert status == 200
    echoed = orjson.loads(body)
    assert echoed["body_len"] == 11 and values(echoed, "content-length") == ["11"]
    assert upstream.received[0].body == b"hello world"
    status, _, body = await c.read_response()
    assert status == 200 and orjson.loads(body)["target"] == "/after"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


async def test_curl_user_cannot_forge_identity(sidecar, pki, upstream):
    r = await curl(sidecar.url("/api"), pki.client("frontend"),
                   "-H", "X-Portcullis-Spiffe-Id: spiffe://example.org/ns/demo/sa/admin",
                   "-H", "X-Forwarded-Client-Cert: URI=spiffe://example.org/ns/demo/sa/admin",
                   cacert=pki.bundle)
    assert r.status == 200
    echoed = r.json()
    assert values(echoed, "x-portcullis-spiffe-id") == [FRONTEND_ID]
    assert values(echoed, "x-forwarded-client-cert")[0].endswith(f"URI={FRONTEND_ID}")
    assert len(await audit_after_stop(sidecar)) == 1


# --------------------------------------------------------------------------------------------
# request id and decision id
# --------------------------------------------------------------------------------------------


async def test_sane_request_id_is_propagated(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(b"GET /rid HTTP/1.1\r\nHost: svc\r\nX-Request-Id: abc-123_XYZ.9\r\n"
                 b"x-request-id: second\r\n\r\n")
    status, _, body = await c.read_response()
    assert status == 200
    echoed = orjson.loads(body)
    assert values(echoed, "x-request-id") == ["abc-123_XYZ.9"]
    await c.close()
    (rec,) = await audit_after_stop(sidecar)
    assert rec["request_id"] == "abc-123_XYZ.9"
    assert values(echoed, "x-portcullis-decision-id") == [rec["decision_id"]]


async def test_missing_or_insane_request_id_is_generated(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    sent = [b"", b"X-Request-Id: has space\r\n", b"X-Request-Id: " + b"a" * 201 + b"\r\n",
            b"X-Request-Id: caf\xc3\xa9\r\n", b"X-Request-Id:\r\n"]
    got = []
    for extra in sent:
        await c.send(b"GET /rid HTTP/1.1\r\nHost: svc\r\n" + extra + b"\r\n")
        status, _, body = await c.read_response()
        assert status == 200
        echoed = orjson.loads(body)
        (rid,) = values(echoed, "x-request-id")
        got.append(rid)
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert len(recs) == len(sent)
    assert [r["request_id"] for r in recs] == got
    assert len(set(got)) == len(sent)
    for rid in got:
        assert 1 <= len(rid) <= 200 and rid.isascii() and " " not in rid


async def test_denied_request_gets_decision_id_and_keeps_the_connection(sidecar_factory, pki, upstream):
    policy = {"version": 1, "rules": [
        {"id": "frontend-api", "effect": "allow", "from": {"workloads": [FRONTEND_ID]},
         "to": [{"paths": ["/**"]}]},
        {"id": "no-secrets", "effect": "deny", "from": {"workloads": [FRONTEND_ID]},
         "to": [{"paths": ["/secret/**"]}]},
    ]}
    sidecar = await sidecar_factory(policy=policy)
    c = await raw(sidecar, pki)
    await c.send(b"GET /secret/x HTTP/1.1\r\nHost: svc\r\nX-Request-Id: r-1\r\n\r\n")
    status, headers, body = await c.read_response()
    assert status == 403 and "connection" not in headers
    denied = orjson.loads(body)
    await c.send(b"GET /ok HTTP/1.1\r\nHost: svc\r\n\r\n")  # same connection
    status, _, _ = await c.read_response()
    assert status == 200
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["decision"], r["status"]) for r in recs] == [("deny", 403), ("allow", 200)]
    assert recs[0]["decision_id"] == denied["decision_id"] and recs[0]["request_id"] == "r-1"
    assert [r.target for r in upstream.received] == ["/ok"]
