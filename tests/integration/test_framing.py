"""HTTP/1.1 framing through the sidecar (RFC 9112): bodies both ways, HEAD/204/304, 100-continue,
HTTP/1.0, keep-alive and pipelining; parser-level rejections; slow and idle clients.

Real mTLS on 127.0.0.1 and a real upstream. Audit records are counted after the sidecar stopped
(the sink is flushed then): exactly one per request, whatever happened to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import orjson
import pytest

from tests.conftest import RawClient, curl
from tests.factories import DEFAULT_POLICY, FRONTEND_ID


def get(path: str, *extra: bytes, version: bytes = b"1.1") -> bytes:
    return b"GET " + path.encode() + b" HTTP/" + version + b"\r\nHost: svc\r\n" + b"".join(extra) + b"\r\n"


async def raw(sidecar, pki) -> RawClient:
    return await RawClient.connect(sidecar.port, pki.client("frontend"), pki)


async def audit_after_stop(sidecar) -> list[dict]:
    await sidecar.stop()  # drains and flushes the audit sink: every record is on disk
    return sidecar.records()


def echoed(body: bytes) -> dict:
    return orjson.loads(body)


# --------------------------------------------------------------------------------------------
# request bodies
# --------------------------------------------------------------------------------------------


async def test_small_content_length_body_with_curl(sidecar, pki, upstream):
    r = await curl(sidecar.url("/form"), pki.client("frontend"), "--data-binary", "a=1&b=2",
                   cacert=pki.bundle)
    assert r.status == 200 and r.json()["body_len"] == 7
    assert upstream.received[0].body == b"a=1&b=2"
    assert upstream.received[0].header("content-length") == ["7"]
    assert len(await audit_after_stop(sidecar)) == 1


async def test_multi_megabyte_content_length_body_is_streamed_intact(sidecar, pki, upstream):
    body = os.urandom(6 * 1024 * 1024 + 7)
    c = await raw(sidecar, pki)
    c.writer.write(b"PUT /blob HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 256 * 1024):
        await c.send(body[i:i + 256 * 1024])
    status, _, resp = await c.read_response(timeout=20)
    assert status == 200
    e = echoed(resp)
    assert e["body_len"] == len(body) and e["body_sha256"] == hashlib.sha256(body).hexdigest()
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_chunked_request_body_is_rechunked_upstream(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(b"POST /chunks HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n")
    status, _, body = await c.read_response()
    assert status == 200
    got = upstream.received[0]
    assert got.body == b"hello world!"
    assert got.header("transfer-encoding") == ["chunked"] and got.header("content-length") == []
    # the connection is still in sync: a second request on it
    await c.send(get("/second"))
    status, _, body = await c.read_response()
    assert status == 200 and echoed(body)["target"] == "/second"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


async def test_chunked_upload_with_curl(sidecar, pki, upstream, tmp_path):
    f = tmp_path / "up.bin"
    data = os.urandom(300_000)
    f.write_bytes(data)
    r = await curl(sidecar.url("/up"), pki.client("frontend"), "-H", "Transfer-Encoding: chunked",
                   "--data-binary", f"@{f}", cacert=pki.bundle)
    assert r.status == 200 and r.json()["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_expect_100_continue_is_relayed(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(b"POST /expect HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    status, _, _ = await c.read_response()  # the body is not sent before 100 Continue
    assert status == 100
    await c.send(b"data")
    status, _, body = await c.read_response()
    assert status == 200 and echoed(body)["body_len"] == 4
    assert upstream.received[0].body == b"data"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_expect_100_continue_with_curl(sidecar, pki, upstream):
    r = await curl(sidecar.url("/expect"), pki.client("frontend"), "-H", "Expect: 100-continue",
                   "--expect100-timeout", "4", "--data-binary", "x" * 2000, cacert=pki.bundle)
    assert r.status == 200 and r.json()["body_len"] == 2000
    assert len(await audit_after_stop(sidecar)) == 1


# --------------------------------------------------------------------------------------------
# response bodies
# --------------------------------------------------------------------------------------------


async def test_big_response_with_curl(sidecar, pki, upstream):
    r = await curl(sidecar.url("/big?n=5000000"), pki.client("frontend"), cacert=pki.bundle)
    assert r.status == 200 and len(r.body) == 5_000_000 and set(r.body) == {ord("b")}
    assert len(await audit_after_stop(sidecar)) == 1


@pytest.mark.parametrize("path,body", [("/chunked", b"hello chunked world"),
                                       ("/close", b"close-delimited body")])
async def test_chunked_and_close_delimited_responses_are_rechunked(sidecar, pki, upstream, path, body):
    c = await raw(sidecar, pki)
    for _ in range(2):  # and the client connection stays usable
        await c.send(get(path))
        status, headers, got = await c.read_response()
        assert status == 200 and got == body
        assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
        assert "connection" not in headers
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["status"], r["outcome"]) for r in recs] == [(200, "complete")] * 2


@pytest.mark.parametrize("path,body", [("/chunked", b"hello chunked world"),
                                       ("/close", b"close-delimited body"),
                                       ("/status/200", b'{"status": 200}')])
async def test_http10_client_gets_plain_body_then_close(sidecar, pki, upstream, path, body):
    c = await raw(sidecar, pki)
    await c.send(get(path, version=b"1.0") + get("/never"))
    status, headers, got = await c.read_response()
    assert status == 200 and got == body
    assert "transfer-encoding" not in headers
    assert await c.closed()
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1
    assert [r.target for r in upstream.received] == [path]


async def test_head_has_no_body_even_with_content_length(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(b"HEAD /big?n=1000 HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = await c.read_response(head=True)
    assert status == 200 and headers["content-length"] == "1000"
    await c.send(b"HEAD /chunked HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = await c.read_response(head=True)
    assert status == 200 and "content-length" not in headers and "transfer-encoding" not in headers
    # no body byte leaked: the next response on the connection starts right here
    await c.send(get("/after"))
    status, _, body = await c.read_response()
    assert status == 200 and echoed(body)["target"] == "/after"
    conn_ids = {r.conn_id for r in upstream.received}
    assert len(conn_ids) == 1  # the upstream connection was reused after the HEAD responses too
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 3


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body(sidecar, pki, upstream, status):
    c = await raw(sidecar, pki)
    await c.send(get(f"/status/{status}"))
    got, headers, _ = await c.read_response()
    assert got == status and "transfer-encoding" not in headers
    assert headers["etag"] == '"v1"'
    await c.send(get("/after"))
    got, _, body = await c.read_response()
    assert got == 200 and echoed(body)["target"] == "/after"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


# --------------------------------------------------------------------------------------------
# keep-alive and pipelining
# --------------------------------------------------------------------------------------------


async def test_keep_alive_reuses_client_and_upstream_connections(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    for i in range(4):
        await c.send(get(f"/ka/{i}"))
        status, _, body = await c.read_response()
        assert status == 200
    assert len(sidecar.worker.plane.conns) == 1
    assert {r.conn_id for r in upstream.received} == {1} and upstream.connections == 1
    assert len(sidecar.worker.plane.upstream.idle) == 1
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 4


async def test_keep_alive_with_curl_reuses_connections(sidecar, pki, upstream):
    # one curl run, three URLs: curl reuses its connection, the sidecar reuses its upstream one
    r = await curl(sidecar.url("/c"), pki.client("frontend"), sidecar.url("/a"), sidecar.url("/b"),
                   cacert=pki.bundle)
    assert r.rc == 0 and r.status == 200
    assert [x.target for x in upstream.received] == ["/a", "/b", "/c"]
    assert len({x.conn_id for x in upstream.received}) == 1
    recs = await audit_after_stop(sidecar)
    assert len(recs) == 3 and len({rec["client_addr"] for rec in recs}) == 1


async def test_pipelined_requests_answered_in_order_with_a_denial_in_the_middle(sidecar_factory, pki, upstream):
    policy = {"version": 1, "rules": DEFAULT_POLICY["rules"] + [
        {"id": "no-secrets", "effect": "deny", "from": {"workloads": [FRONTEND_ID]},
         "to": [{"paths": ["/secret/**"]}]}]}
    sidecar = await sidecar_factory(policy=policy)
    c = await raw(sidecar, pki)
    await c.send(get("/slow?ms=150") + get("/secret/1")
                 + b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc"
                 + get("/chunked") + get("/secret/2") + get("/last"))
    results = [await c.read_response() for _ in range(6)]
    assert [s for s, _, _ in results] == [200, 403, 200, 200, 403, 200]
    assert echoed(results[0][2])["target"] == "/slow?ms=150"
    assert echoed(results[2][2])["body_len"] == 3
    assert results[3][2] == b"hello chunked world"
    assert echoed(results[5][2])["target"] == "/last"
    assert [r.target for r in upstream.received] == ["/slow?ms=150", "/p", "/chunked", "/last"]
    assert not await c.closed(timeout=0.05)
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["decision"], r["status"]) for r in recs] == [
        ("allow", 200), ("deny", 403), ("allow", 200), ("allow", 200), ("deny", 403), ("allow", 200)]


async def test_denied_request_with_a_body_is_answered_then_the_connection_closes(sidecar, pki, upstream):
    # denied while its body is still arriving: the body is read and dropped, then close
    c = await RawClient.connect(sidecar.port, pki.client("batch"), pki)
    await c.send(b"POST /reports/1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n01234")
    status, headers, _ = await c.read_response()
    assert status == 403 and headers["connection"] == "close"
    await c.send(b"56789" + get("/reports/2"))
    assert await c.closed()
    await c.close()
    (rec,) = await audit_after_stop(sidecar)
    assert rec["decision"] == "deny" and rec["status"] == 403
    assert upstream.received == []


async def test_denied_expect_100_continue_gets_no_continue(sidecar, pki, upstream):
    c = await RawClient.connect(sidecar.port, pki.client("batch"), pki)
    await c.send(b"POST /reports/1 HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 10\r\n\r\n")
    status, headers, _ = await c.read_response()
    assert status == 403 and headers["connection"] == "close"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_request_after_connection_close_is_not_processed(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/one", b"Connection: close\r\n") + get("/two"))
    status, headers, _ = await c.read_response()
    assert status == 200 and headers["connection"] == "close"
    assert await c.closed()
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1
    assert [r.target for r in upstream.received] == ["/one"]


async def test_many_pipelined_requests(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    n = 200
    await c.send(b"".join(get(f"/p/{i}") for i in range(n)))
    for i in range(n):
        status, _, body = await c.read_response()
        assert status == 200 and echoed(body)["target"] == f"/p/{i}"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == n


async def test_pipelined_requests_behind_a_slow_one_are_bounded(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    n = 3000
    await c.send(get("/slow?ms=300") + b"".join(get(f"/q/{i}") for i in range(n)))
    await asyncio.sleep(0.1)
    (conn,) = sidecar.worker.plane.conns
    assert len(conn.queue) < n // 2  # reading paused: the requests wait in the socket, not in memory
    status, _, _ = await c.read_response()
    assert status == 200
    for i in range(n):
        status, _, body = await c.read_response()
        assert status == 200 and echoed(body)["target"] == f"/q/{i}"
    await c.close()
    assert len(await audit_after_stop(sidecar)) == n + 1


async def test_requests_wait_for_a_saturated_audit_sink_without_stalling_the_loop(sidecar_factory, pki,
                                                                                   upstream):
    # the audit fd is a pipe nobody reads at first: the writer blocks, the queue saturates and
    # the sidecar holds requests back (backpressure) until the reader, started by this test
    # coroutine, drains it; a busy loop in the sidecar would keep this coroutine from running
    r, w = os.pipe()
    lines: list[bytes] = []
    go = threading.Event()
    woken: list[bool] = []

    def reader() -> None:
        woken.append(go.wait(10))
        with os.fdopen(r, "rb") as f:
            lines.extend(f)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sidecar = await sidecar_factory(extra={"audit": {"queue_max_records": 16}}, audit_fd=w)
    c = await raw(sidecar, pki)
    n = 300  # records of ~600 bytes: far more than a 64 KiB pipe and 16 queued lines
    await c.send(b"".join(get(f"/a/{i}") for i in range(n)))
    sink = sidecar.worker.sink
    for _ in range(500):
        if sink.saturated:
            break
        await asyncio.sleep(0.01)
    assert sink.saturated
    await asyncio.sleep(0.05)  # requests are held back, the event loop keeps running
    go.set()
    for i in range(n):
        status, _, body = await c.read_response(timeout=15)
        assert status == 200 and echoed(body)["target"] == f"/a/{i}"
    await c.close()
    await sidecar.stop()
    os.close(w)
    thread.join(10)
    assert woken == [True]
    recs = [orjson.loads(x) for x in lines]
    assert len([x for x in recs if x.get("type") == "decision"]) == n


# --------------------------------------------------------------------------------------------
# parser-level rejections: 400/405/431, an audit record, nothing forwarded, nothing after it
# --------------------------------------------------------------------------------------------

BAD = {
    "cl_and_te": (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n", 400),
    "duplicate_cl_same": (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
                          400),
    "duplicate_cl_differ": (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                            400),
    "cl_list": (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    "cl_sign": (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: +3\r\n\r\nabc", 400),
    "te_chunked_identity": (b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                            b"0\r\n\r\n", 400),
    "te_xchunked": (b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    "te_gzip_chunked": (b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    "te_twice": (b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n", 400),
    "te_http10": (b"POST / HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "no_host": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "two_hosts": (b"GET / HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n", 400),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: svc\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    "space_before_colon": (b"GET / HTTP/1.1\r\nHost: svc\r\nX-Portcullis-Spiffe-Id : x\r\n\r\n", 400),
    "bare_lf": (b"GET / HTTP/1.1\r\nHost: svc\nX-A: 1\r\n\r\n", 400),
    "bare_lf_end": (b"GET / HTTP/1.1\nHost: svc\n\n", 400),
    "nul_in_value": (b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: a\x00b\r\n\r\n", 400),
    "bad_chunk_size": (b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
                       400),
    "chunk_size_overflow": (b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n", 400),
    "bad_method_token": (b"G(T / HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    "bad_version": (b"GET / HTTP/2.0\r\nHost: svc\r\n\r\n", 400),
    "connect": (b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n", 405),
    "huge_head": (b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
    "huge_target": (b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: svc\r\n\r\n", 431),
    "too_many_headers": (b"GET / HTTP/1.1\r\nHost: svc\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
                         + b"\r\n", 431),
}


# the stable code each gets (llhttp's own refusals are all `malformed_request`)
CODES = {
    "bad_chunk_size": "malformed_request",
    "bad_method_token": "malformed_request",
    "bad_version": "unsupported_http_version",
    "bare_lf": "malformed_request",
    "bare_lf_end": "malformed_request",
    "chunk_size_overflow": "malformed_request",
    "cl_and_te": "malformed_request",
    "cl_list": "malformed_request",
    "cl_sign": "malformed_request",
    "connect": "connect_not_supported",
    "duplicate_cl_differ": "malformed_request",
    "duplicate_cl_same": "malformed_request",
    "huge_head": "headers_too_large",
    "huge_target": "request_line_too_large",
    "no_host": "invalid_host",
    "nul_in_value": "malformed_request",
    "obs_fold": "malformed_request",
    "space_before_colon": "malformed_request",
    "te_chunked_identity": "malformed_request",
    "te_gzip_chunked": "invalid_transfer_encoding",
    "te_http10": "invalid_transfer_encoding",
    "te_twice": "malformed_request",
    "too_many_headers": "too_many_headers",
    "te_xchunked": "invalid_transfer_encoding",
    "two_hosts": "invalid_host",
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_malformed_request_is_rejected_and_nothing_after_it_is_forwarded(sidecar, pki, upstream, case):
    (data, want), code = BAD[case], CODES[case]
    c = await raw(sidecar, pki)
    await c.send(data + get("/smuggled"))
    status, headers, body = await c.read_response()
    assert status == want, body
    assert headers["connection"] == "close" and echoed(body)["error"] == code
    assert await c.closed()
    await c.close()
    assert upstream.received == []
    (rec,) = await audit_after_stop(sidecar)
    assert (rec["status"], rec["code"], rec["decision"]) == (want, code, "deny")
    assert rec["decision_id"] == echoed(body)["decision_id"]
    assert upstream.received == []


async def test_malformed_request_after_a_good_one_on_the_same_connection(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/good") + b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: a\x00b\r\n\r\n" + get("/smuggled"))
    status, _, _ = await c.read_response()
    assert status == 200
    status, headers, _ = await c.read_response()
    assert status == 400 and headers["connection"] == "close"
    assert await c.closed()
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [r["status"] for r in recs] == [200, 400]
    assert [r.target for r in upstream.received] == ["/good"]


async def test_invalid_chunk_in_a_streaming_body_never_completes_upstream(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/warm"))  # an idle pooled upstream connection exists: forwarding starts at once
    assert (await c.read_response())[0] == 200
    await c.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await asyncio.sleep(0.05)
    await c.send(b"zz\r\n" + get("/smuggled"))
    status, headers, _ = await c.read_response()
    assert status == 400 and headers["connection"] == "close"
    assert await c.closed()
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [r["status"] for r in recs] == [200, 400]
    assert [r.target for r in upstream.received] == ["/warm"]


async def test_upgrade_h2c_is_not_honoured(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(b"GET /up HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                 b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                 + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    status, headers, body = await c.read_response()
    assert status == 200 and headers["connection"] == "close"
    got = {n.lower() for n, _ in echoed(body)["headers"]}
    assert not got & {"upgrade", "connection", "http2-settings"}
    assert await c.closed()
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1
    assert len(upstream.received) == 1


# --------------------------------------------------------------------------------------------
# slow and idle clients
# --------------------------------------------------------------------------------------------


async def test_request_head_that_never_completes_gets_408(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"header_timeout_s": 0.3}})
    c = await raw(sidecar, pki)
    await c.send(b"GET /slow HTTP/1.1\r\nHost: svc\r\n")
    status, headers, body = await c.read_response()
    assert status == 408 and headers["connection"] == "close"
    assert await c.closed()
    await c.close()
    (rec,) = await audit_after_stop(sidecar)
    assert rec["status"] == 408 and rec["code"] == "request_timeout"
    assert upstream.received == []


async def test_trickled_head_after_a_served_request_gets_408(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"header_timeout_s": 0.3, "idle_timeout_s": 30}})
    c = await raw(sidecar, pki)
    await c.send(get("/slow?ms=100") + b"GET /next HTTP/1.1\r\n")
    assert (await c.read_response())[0] == 200
    for _ in range(6):  # a byte now and then does not extend the head's deadline
        try:
            await c.send(b"X")
        except ConnectionError:
            break
        await asyncio.sleep(0.1)
    status, _, _ = await c.read_response()
    assert status == 408
    assert await c.closed()
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [r["status"] for r in recs] == [200, 408]


async def test_stalled_request_body_times_out(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"idle_timeout_s": 0.3}})
    c = await raw(sidecar, pki)
    await c.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\n0123456789")
    status, headers, _ = await c.read_response()
    assert status == 408 and headers["connection"] == "close"
    assert await c.closed()
    await c.close()
    (rec,) = await audit_after_stop(sidecar)
    assert rec["status"] == 408 and rec["code"] == "body_timeout"
    assert upstream.received == []
    assert not upstream.open_transports  # the half-sent upstream request was aborted


async def test_idle_keep_alive_connection_is_closed(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"idle_timeout_s": 0.3}})
    c = await raw(sidecar, pki)
    await c.send(get("/once"))
    assert (await c.read_response())[0] == 200
    assert await c.closed(timeout=3)
    await c.close()
    for _ in range(100):  # the server side finishes its TLS shutdown
        if not sidecar.worker.plane.conns:
            break
        await asyncio.sleep(0.01)
    assert sidecar.worker.plane.conns == set()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_connection_that_sends_nothing_is_closed_without_a_record(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"idle_timeout_s": 0.3}})
    c = await raw(sidecar, pki)
    assert await c.closed(timeout=3)
    await c.close()
    assert await audit_after_stop(sidecar) == []
