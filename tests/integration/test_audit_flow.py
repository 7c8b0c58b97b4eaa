"""The audit sink under pressure, as the data plane sees it: a stdout nobody reads either holds
requests back (backpressure) or refuses them (fail_closed); nothing is ever lost."""

from __future__ import annotations

import asyncio
import fcntl
import os

import orjson

from proxy.core.audit import verify_lines
from tests.conftest import RawClient

GET = b"GET /api/x HTTP/1.1\r\nhost: s\r\n\r\n"
F_SETPIPE_SZ = 1031


def small_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # one page: fills after a few records
    return r, w


async def stop_while_reading(sc, fd: int) -> bytes:
    """Stop the sidecar while reading its stdout (the final checkpoint must get through)."""
    out = bytearray()
    stop = asyncio.create_task(sc.stop())
    while not stop.done():
        out += drain(fd)
        await asyncio.sleep(0.01)
    await stop
    return bytes(out) + drain(fd)


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


async def test_backpressure_holds_requests_until_stdout_drains(sidecar_factory, pki, upstream):
    r, w = small_pipe()
    sc = await sidecar_factory(audit_fd=w, extra={"audit": {"queue_max_records": 16,
                                                            "on_full": "backpressure",
                                                            "checkpoint_every_records": 1000}})
    conns = [await RawClient.connect(sc.port, pki.client("frontend"), pki) for _ in range(4)]
    done = 0

    async def client(c: RawClient, n: int):
        nonlocal done
        for _ in range(n):
            await c.send(GET)
            status, _, _ = await c.read_response(timeout=30)
            assert status == 200
            done += 1

    tasks = [asyncio.create_task(client(c, 25)) for c in conns]
    await asyncio.sleep(1.0)
    held = done
    assert held < 100, "with nobody reading stdout, requests must be held back"
    assert sc.worker.sink.saturated and sc.worker.metrics.audit_saturated.fn() >= 1
    data = b""
    while not all(t.done() for t in tasks):  # start reading: everything completes
        data += drain(r)
        await asyncio.sleep(0.02)
    await asyncio.gather(*tasks)
    for c in conns:
        await c.close()
    data += await stop_while_reading(sc, r)
    lines = data.splitlines()
    decisions = [orjson.loads(x) for x in lines if b'"type":"decision"' in x]
    assert len(decisions) == 100 and {d["status"] for d in decisions} == {200}
    assert verify_lines(lines, None).ok
    os.close(r)


async def test_fail_closed_refuses_while_stdout_is_blocked_and_records_every_refusal(
        sidecar_factory, pki, upstream):
    r, w = small_pipe()
    sc = await sidecar_factory(audit_fd=w, extra={"audit": {"queue_max_records": 16,
                                                            "on_full": "fail_closed",
                                                            "checkpoint_every_records": 1000}})
    c = await RawClient.connect(sc.port, pki.client("frontend"), pki)
    statuses: list[int] = []
    bodies: list[bytes] = []

    async def client():
        for _ in range(60):
            await c.send(GET)
            status, headers, body = await c.read_response(timeout=30)
            statuses.append(status)
            bodies.append(body)

    task = asyncio.create_task(client())
    for _ in range(200):  # stdout blocked: first 200s, then 503 audit_backlog, then held back
        await asyncio.sleep(0.02)
        if 503 in statuses and not task.done() and sc.worker.sink.saturated and \
                not sc.worker.sink.can_record_refusal:
            break
    assert statuses[0] == 200 and 503 in statuses
    held_at = len(statuses)
    await asyncio.sleep(0.3)
    assert len(statuses) == held_at, "past the refusal margin, requests are held, not dropped"
    data = b""
    while not task.done():  # stdout drains: everything completes
        data += drain(r)
        await asyncio.sleep(0.02)
    await task
    await c.close()
    refused = statuses.count(503)
    assert all(b"audit_backlog" in b for s, b in zip(statuses, bodies) if s == 503)
    assert len(upstream.received) == statuses.count(200)
    data += await stop_while_reading(sc, r)
    decisions = [orjson.loads(x) for x in data.splitlines() if b'"type":"decision"' in x]
    assert len(decisions) == 60  # every request, refused or not, has its record
    assert sum(1 for d in decisions if d["code"] == "audit_backlog") == refused
    assert sc.worker.sink.dropped == 0
    assert verify_lines(data.splitlines(), None).ok
    os.close(r)
