"""runtime.admin: the protocol-level admin listener on a real socket (curl and raw HTTP/1.1)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest

from proxy.runtime import admin
from proxy.runtime.responses import reason_phrase
from tests.conftest import curl



class Status:
    def __init__(self) -> None:
        self.ready = True
        self.calls = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def status(self) -> dict:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("status source broke")
        return {"ready": self.ready, "reasons": [] if self.ready else ["policy_stale"]}

    async def exposition(self) -> bytes:
        return b"# TYPE x counter\nx_total 1.0\n"


@pytest.fixture
async def server():
    st = Status()
    srv, port = await admin.start_app(st.status, st.exposition, "127.0.0.1", 0)
    srv.st = st  # type: ignore[attr-defined]
    yield srv
    await srv.close()


async def raw(port: int, data: bytes, *, read_until_close: bool = True,
              timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(), timeout)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


def heads(data: bytes) -> list[bytes]:
    """The status lines of the answers in `data` (one body runs straight into the next head)."""
    return re.findall(rb"HTTP/1\.1 [0-9]{3} [A-Za-z ]+(?=\r\n)", data)


async def test_the_three_endpoints_with_curl(server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    r = await curl(base + "/healthz", None)
    assert r.status == 200 and r.json() == {"status": "ok"}
    r = await curl(base + "/readyz", None)
    assert r.status == 200 and r.json() == {"ready": True, "reasons": []}
    server.st.ready = False
    r = await curl(base + "/readyz", None)
    assert r.status == 503 and r.json() == {"ready": False, "reasons": ["policy_stale"]}
    r = await curl(base + "/metrics?name[]=x", None)
    assert r.status == 200 and r.body == b"# TYPE x counter\nx_total 1.0\n"


async def test_headers_of_an_answer(server) -> None:
    out = await raw(server.port, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    hdrs = dict(line.split(b": ", 1) for line in lines[1:])
    assert hdrs[b"content-type"].decode() == admin.CONTENT_TYPE_LATEST  # Prometheus text format
    assert hdrs[b"content-type"].startswith(b"text/plain; version=")
    assert int(hdrs[b"content-length"]) == len(body) and hdrs[b"cache-control"] == b"no-store"
    assert hdrs[b"connection"] == b"close"


async def test_unknown_paths_and_methods(server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    r = await curl(base + "/", None)
    assert r.status == 404 and r.json() == {"error": "not_found"}
    r = await curl(base + "/readyz/x", None)
    assert r.status == 404
    out = await raw(server.port, b"DELETE /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nallow: GET, HEAD\r\n" in out
    assert out.endswith(b'{"error":"method_not_allowed"}')  # rendered by runtime.responses
    assert server.st.calls == 0  # refused before any status was computed


async def test_head_answers_headers_only(server) -> None:
    out = await raw(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 16" in head and body == b""


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(server) -> None:
    out = await raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                                 b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
                                 b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                                 b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert heads(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"]
    assert out.endswith(b'{"ready": true, "reasons": []}')  # nothing after Connection: close
    # one connection, several requests (curl reuses it for URLs given together)
    r = await asyncio.create_subprocess_exec(
        "curl", "-s", "-w", "%{num_connects} ",
        "-o", "/dev/null", f"http://127.0.0.1:{server.port}/healthz",
        "-o", "/dev/null", f"http://127.0.0.1:{server.port}/metrics",
        stdout=subprocess.PIPE)
    out2, _ = await r.communicate()
    assert out2.split() == [b"1", b"0"]  # the second transfer made no new connection


async def test_http_1_0_closes_after_one_answer(server) -> None:
    out = await raw(server.port, b"GET /healthz HTTP/1.0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n")
    assert heads(out) == [b"HTTP/1.1 200 OK"]


async def test_a_slow_status_does_not_block_other_connections(server) -> None:
    server.st.gate = asyncio.Event()
    slow = asyncio.create_task(raw(server.port, b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    await asyncio.sleep(0.1)
    r = await curl(f"http://127.0.0.1:{server.port}/healthz", None)
    assert r.status == 200 and not slow.done()
    server.st.gate.set()
    assert heads(await slow) == [b"HTTP/1.1 200 OK"]


async def test_a_failing_status_source_is_a_500_and_the_listener_lives_on(server, caplog) -> None:
    server.st.fail = True
    r = await curl(f"http://127.0.0.1:{server.port}/readyz", None)
    assert r.status == 500 and r.json() == {"error": "internal_error"}
    assert "status source broke" in caplog.text
    server.st.fail = False
    assert (await curl(f"http://127.0.0.1:{server.port}/readyz", None)).status == 200


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", 400, "body_not_accepted"),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400,
     "body_not_accepted"),
    (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431, "headers_too_large"),
    (b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n", 400, "malformed_request"),
    # RFC 9112 6.1: Content-Length with Transfer-Encoding: refused, and the connection MUST close
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", 400, "malformed_request"),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400,
     "malformed_request"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, "malformed_request"),  # TLS to plain HTTP
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400,
     "upgrade_not_supported"),
])
async def test_bad_requests_are_answered_and_the_connection_closed(server, request_bytes, status,
                                                                  code) -> None:
    out = await raw(server.port, request_bytes + b"GET /healthz HTTP/1.1\r\n\r\n")
    assert heads(out) == [f"HTTP/1.1 {status} {reason_phrase(status)}".encode()]
    assert out.endswith(json.dumps({"error": code}, separators=(",", ":")).encode())
    assert b"\r\nconnection: close\r\n" in out


@pytest.mark.parametrize("request_bytes, answered", [
    (b"GET /healthz HTTP/1.1\r\n\r\n", False),  # HTTP/1.1 without Host
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", False),
    (b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n", False),
    (b"GET /healthz HTTP/1.1\r\nHost: user@a\r\n\r\n", False),
    (b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", False),
    (b"GET /healthz HTTP/1.0\r\n\r\n", True),  # HTTP/1.0 may omit it
    (b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1:9901 \r\n\r\n", True),
    (b"GET /healthz HTTP/1.1\r\nHost: [::1]:9901\r\n\r\n", True),
])
async def test_host_rules_of_rfc9112_section_3_2(server, request_bytes, answered) -> None:
    """A server MUST answer 400 to an HTTP/1.1 request without a Host, to any request with more
    than one, and to one with an invalid Host (the data plane's rule, `core.paths.check_host`)."""
    out = await raw(server.port, request_bytes
                    + b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    if answered:
        assert heads(out)[0] == b"HTTP/1.1 200 OK"
    else:
        assert heads(out) == [b"HTTP/1.1 400 Bad Request"] and out.endswith(b'{"error":"invalid_host"}')


async def test_an_answer_owed_before_a_bad_request_still_comes_first(server) -> None:
    out = await raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nBad\r\n\r\n")
    assert heads(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]


async def test_too_many_pipelined_requests_are_refused(server) -> None:
    server.st.gate = asyncio.Event()  # the first answer waits: the rest pile up
    burst = b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n" * (admin.MAX_PIPELINED + 2)
    task = asyncio.create_task(raw(server.port, burst))
    await asyncio.sleep(0.1)
    server.st.gate.set()
    out = await task
    codes = heads(out)
    assert codes[-1] == b"HTTP/1.1 400 Bad Request" and out.endswith(b'"too_many_pipelined_requests"}')
    assert codes[:-1] == [b"HTTP/1.1 200 OK"] * admin.MAX_PIPELINED  # the rest never answered


async def test_idle_connections_are_closed(server, monkeypatch) -> None:
    monkeypatch.setattr(admin, "IDLE_TIMEOUT_S", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, nothing sent
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", server.port)
        writer2.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /hea")  # then stalls mid-request
        out = await asyncio.wait_for(reader2.read(), 3)
        assert heads(out) == [b"HTTP/1.1 200 OK"]
        writer2.close()
    finally:
        writer.close()


async def test_connections_beyond_the_limit_are_closed_at_once(server, monkeypatch) -> None:
    monkeypatch.setattr(admin, "MAX_CONNECTIONS", 2)
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    for _r, w in held:
        w.close()
    await asyncio.sleep(0.05)
    assert (await curl(f"http://127.0.0.1:{server.port}/healthz", None)).status == 200


async def test_close_stops_listening_and_ends_open_connections() -> None:
    st = Status()
    srv, port = await admin.start_app(st.status, st.exposition, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    await srv.close()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


def test_a_single_worker_sidecar_does_not_import_aiohttp() -> None:
    """The admin listener costs no aiohttp (~12 MiB resident per worker, bench_memory.py): only
    a remote JWKS or a control plane bundle source imports it."""
    code = ("import sys, proxy.runtime.server, proxy.runtime.admin, proxy.runtime.supervisor; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'yarl', 'multidict')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
