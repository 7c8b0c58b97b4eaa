"""The workload misbehaves: refused, silent, reset mid-response, garbage, stale pooled connections.

After every failure the sidecar serves the next request, leaks no connection or file descriptor,
and has written exactly one audit record per request (counted after the sidecar stopped, when the
sink is flushed).
"""

from __future__ import annotations

import asyncio
import os
import ssl

import orjson
import pytest

from tests.conftest import RawClient, curl
from tests.factories import free_port


def get(path: str, *extra: bytes, method: bytes = b"GET") -> bytes:
    return method + b" " + path.encode() + b" HTTP/1.1\r\nHost: svc\r\n" + b"".join(extra) + b"\r\n"


async def raw(sidecar, pki) -> RawClient:
    return await RawClient.connect(sidecar.port, pki.client("frontend"), pki)


async def audit_after_stop(sidecar) -> list[dict]:
    await sidecar.stop()  # drains and flushes the audit sink: every record is on disk
    return sidecar.records()


async def eventually(cond, timeout: float = 5.0) -> bool:
    """Poll `cond` until true (for the other side of a socket to notice a close)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def assert_ok(c: RawClient, path: str = "/ok") -> dict:
    await c.send(get(path))
    status, _, body = await c.read_response()
    assert status == 200, body
    return orjson.loads(body)


# --------------------------------------------------------------------------------------------


async def test_connection_refused_is_502_and_the_connection_keeps_serving(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(upstream_url=f"http://127.0.0.1:{free_port()}")
    c = await raw(sidecar, pki)
    for _ in range(2):
        await c.send(get("/x"))
        status, headers, body = await c.read_response()
        assert status == 502 and orjson.loads(body)["error"] == "upstream_unavailable"
        assert "connection" not in headers
    await c.close()
    r = await curl(sidecar.url("/y"), pki.client("frontend"), cacert=pki.bundle)
    assert r.status == 502 and r.json()["error"] == "upstream_unavailable"
    recs = await audit_after_stop(sidecar)
    assert [(r["decision"], r["code"], r["status"]) for r in recs] == [
        ("error", "upstream_unavailable", 502)] * 3


async def test_no_response_head_in_time_is_504(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"upstream": {"response_timeout_s": 0.5}})
    c = await raw(sidecar, pki)
    await c.send(get("/hang"))
    status, _, body = await c.read_response()
    assert status == 504 and orjson.loads(body)["error"] == "upstream_timeout"
    e = await assert_ok(c)  # the same client connection, a fresh upstream connection
    assert e["conn_id"] == 2
    # the hung upstream connection was aborted, not pooled
    assert await eventually(lambda: len(upstream.open_transports) == 1)
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["code"], r["status"]) for r in recs] == [("upstream_timeout", 504), ("allowed", 200)]


async def test_upstream_stalling_mid_body_aborts_the_client(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"upstream": {"response_timeout_s": 0.5}})
    upstream.raw["/stall"] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly a part"
    c = await raw(sidecar, pki)
    await c.send(get("/stall"))
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
        await c.read_response()
    await c.close()
    (rec,) = await audit_after_stop(sidecar)
    assert rec["outcome"] == "upstream_timeout" and rec["status"] == 200


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_reset_mid_response_aborts_the_client_connection(sidecar, pki, upstream, version):
    c = await raw(sidecar, pki)
    await c.send(b"GET /reset-mid HTTP/" + version + b"\r\nHost: svc\r\n\r\n")
    status_line = await c.reader.readuntil(b"\r\n")
    assert b" 200 " in status_line
    # the head and part of the body arrive, then the connection is cut: never a complete-looking
    # response and never an error page after it (a clean TLS close would make a close-delimited
    # HTTP/1.0 body look complete, so the connection must be aborted)
    got = b""
    try:
        while chunk := await asyncio.wait_for(c.reader.read(65536), 5):
            got += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    assert b"error" not in got and len(got.split(b"\r\n\r\n", 1)[1]) < 100
    await c.close()
    c = await raw(sidecar, pki)
    await assert_ok(c)
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert len(recs) == 2
    assert recs[0]["outcome"] == "upstream_reset" and recs[0]["code"] == "upstream_reset"
    assert recs[0]["decision"] == "error" and recs[0]["upstream_status"] == 200
    assert recs[1]["outcome"] == "complete"


@pytest.mark.parametrize("http", ["--http1.0", "--http1.1"])
async def test_cut_close_delimited_body_is_an_error_for_curl(sidecar, pki, upstream, http):
    # HTTP/1.0: the body is close-delimited to the client too, so only the missing TLS
    # close_notify (an abort, not a clean close) tells curl that it is truncated;
    # HTTP/1.1: the re-chunked body lacks its last chunk
    r = await curl(sidecar.url("/close-reset"), pki.client("frontend"), http, cacert=pki.bundle)
    assert r.rc != 0 and r.body.startswith(b"the first half"), r
    assert b"error" not in r.body
    (rec,) = await audit_after_stop(sidecar)
    assert rec["outcome"] == "upstream_reset" and rec["status"] == 200


async def test_request_pipelined_after_a_reset_is_not_forwarded(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/reset-mid") + get("/after", method=b"DELETE"))
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
        await c.read_response()
        await c.read_response()
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["outcome"], r["code"]) for r in recs] == [("upstream_reset", "upstream_reset"),
                                                        ("not_served", "not_served")]
    assert [r.target for r in upstream.received] == ["/reset-mid"]


async def test_reset_mid_chunked_response(sidecar, pki, upstream):
    upstream.raw_close["/chunk-cut"] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
    c = await raw(sidecar, pki)
    await c.send(get("/chunk-cut"))
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
        await c.read_response()
    await c.close()
    (rec,) = await audit_after_stop(sidecar)
    assert rec["outcome"] == "upstream_reset"


async def test_garbage_is_502(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/garbage"))
    status, _, body = await c.read_response()
    assert status == 502 and orjson.loads(body)["error"] == "upstream_bad_response"
    await assert_ok(c)
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["code"], r["status"]) for r in recs] == [("upstream_bad_response", 502), ("allowed", 200)]


@pytest.mark.parametrize("resp", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nnot really gzip",
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
])
async def test_ambiguous_upstream_framing_is_502(sidecar, pki, upstream, resp):
    upstream.raw_close["/bad"] = resp
    c = await raw(sidecar, pki)
    await c.send(get("/bad"))
    status, _, body = await c.read_response()
    assert status == 502 and orjson.loads(body)["error"] == "upstream_bad_response"
    await assert_ok(c)
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [r["status"] for r in recs] == [502, 200]


async def test_upstream_closing_keep_alive_after_response_is_not_an_error(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    a = await assert_ok(c, "/keepalive-close")
    b = await assert_ok(c, "/after")
    assert a["conn_id"] != b["conn_id"]
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [r["status"] for r in recs] == [200, 200]


async def test_stale_pooled_connection_is_retried_for_a_bodyless_request(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    first = await assert_ok(c, "/one")
    upstream.close_reused = True  # the upstream gives up on the idle connection the sidecar holds
    second = await assert_ok(c, "/two")
    assert upstream.dropped == 1 and second["conn_id"] != first["conn_id"]
    await c.send(get("/three", method=b"HEAD"))
    status, _, _ = await c.read_response(head=True)
    assert status == 200 and upstream.dropped == 2
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["decision"], r["status"]) for r in recs] == [("allow", 200)] * 3


async def test_stale_pooled_connection_is_not_retried_for_a_non_idempotent_request(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await assert_ok(c, "/one")
    upstream.close_reused = True
    await c.send(get("/order", method=b"POST"))
    status, _, body = await c.read_response()
    # RFC 9110 9.2.2: a proxy must not retry a non-idempotent request on its own
    assert status == 502 and orjson.loads(body)["error"] == "upstream_unavailable"
    assert upstream.dropped == 1
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [r["status"] for r in recs] == [200, 502]


async def test_pooled_connection_closed_by_the_upstream_while_idle(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await assert_ok(c)
    pool = sidecar.worker.plane.upstream
    assert len(pool.idle) == 1
    for t in list(upstream.open_transports):
        t.close()
    assert await eventually(lambda: not pool.idle)  # noticed and dropped from the pool
    await assert_ok(c)
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


async def test_slow_client_backpressures_the_upstream(sidecar, pki, upstream):
    size = 40_000_000
    upstream.raw["/bigraw"] = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"r" * size
    c = await raw(sidecar, pki)
    await c.send(get("/bigraw"))
    await asyncio.sleep(0.3)  # the client does not read
    (up_transport,) = upstream.open_transports
    # the sidecar stopped reading the upstream instead of buffering the response in memory
    # (kernel socket buffers on both sides hold a few MB at most)
    assert up_transport.get_write_buffer_size() > size // 2
    status, _, body = await c.read_response(timeout=30)
    assert status == 200 and len(body) == size
    e = await assert_ok(c)
    assert e["conn_id"] == 1  # the same pooled upstream connection, still in sync
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


async def test_connection_paused_for_a_slow_client_goes_back_to_the_pool_reading(sidecar, pki, upstream):
    # Deterministic form of a race: the read that completes a response can also overfill the
    # client's transport, which pauses reading the upstream just before the release. A pooled
    # connection that does not read never notices the upstream closing it.
    c = await raw(sidecar, pki)
    await assert_ok(c)
    pool = sidecar.worker.plane.upstream
    conn = pool.acquire()
    conn.pause_reading()
    pool.release(conn)
    for t in list(upstream.open_transports):
        t.close()
    assert await eventually(lambda: not pool.idle)
    e = await assert_ok(c)
    assert e["conn_id"] == 2
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 2


async def test_client_gone_mid_response_aborts_upstream_and_records_once(sidecar_factory, pki, upstream):
    # the upstream timeout is far away: only the client leaving can end the upstream connection
    sidecar = await sidecar_factory(extra={"upstream": {"response_timeout_s": 60}})
    c = await raw(sidecar, pki)
    await c.send(get("/hang"))
    await asyncio.sleep(0.1)
    await c.close()
    assert await eventually(lambda: not sidecar.worker.plane.conns)
    assert await eventually(lambda: not upstream.open_transports)
    (rec,) = await audit_after_stop(sidecar)
    assert rec["outcome"] == "client_aborted"


async def test_no_leaks_after_a_batch_of_failures(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"upstream": {"response_timeout_s": 0.5}})
    plane = sidecar.worker.plane
    upstream.raw_close["/bad"] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"

    def empty_pool() -> None:
        while plane.upstream.idle:
            plane.upstream.idle.pop().close()

    async def settle() -> int:
        empty_pool()
        assert await eventually(lambda: not plane.conns and not upstream.open_transports)
        return open_fds()

    async def batch() -> int:
        n = 0
        c = await raw(sidecar, pki)
        for path in ("/garbage", "/hang", "/bad", "/status/204", "/chunked", "/close", "/ok"):
            await c.send(get(path))
            await c.read_response()
            n += 1
        await c.send(get("/reset-mid"))
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
            await c.read_response()
        n += 1
        await c.close()
        c = await raw(sidecar, pki)
        await c.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(0.05)
        await c.close()  # gone mid-body
        n += 1
        return n

    n = await batch()  # the first round also creates what the loop makes lazily (not a leak)
    before = await settle()
    for _ in range(2):
        n += await batch()
    assert await settle() == before
    assert plane.upstream.idle == []
    recs = await audit_after_stop(sidecar)
    assert len(recs) == n
    assert sum(r["outcome"] == "upstream_reset" for r in recs) == 3
    assert sum(r["outcome"] == "client_aborted" for r in recs) == 3
