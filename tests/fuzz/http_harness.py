"""Raw HTTP into the real data plane, shared by the hypothesis property (`test_raw_http.py`) and
the atheris harness (`fuzz/fuzz_http.py`): request streams are fed to a real `ClientConnection`
(real httptools parser, real listener, real pipeline and policy, real forwarding to a recording
upstream, the real audit sink) through an in-memory transport standing in for the TLS one.

`check_stream` asserts, for every stream:
- the client gets a sequence of well-formed HTTP/1.1 responses (interim 1xx allowed), nothing else,
  possibly followed by a close;
- no response the sidecar makes up itself is a 5xx other than 502/503/504;
- exactly one audit record per request head: one per response (same order, same status, the same
  decision id in error bodies), plus one per head that was still unanswered when the client left;
- the upstream receives nothing the sidecar did not allow: each request it got has an allow record
  with the same method and canonical path;
- nothing is logged as an internal error and the connection is gone from the plane afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.config import load_config
from proxy.dev.transports import PresentedChain
from proxy.runtime.server import Worker
from tests.factories import FRONTEND_ID, make_pki, write_config
from tests.upstreams import UpstreamServer

# -- the in-memory transport --------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, chain: list[bytes]) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = None
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self.paused = False
        self.lost = False
        self._extra = {"ssl_object": PresentedChain(chain), "peername": ("127.0.0.1", 40000),
                       "socket": None}

    def get_extra_info(self, name, default=None):
        return self._extra.get(name, default)

    def write(self, data) -> None:
        assert not self.lost, "write after connection_lost"
        if not self.closing:
            self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


# -- one running sidecar (worker, upstream, audit sink), shared by every stream -----------------


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    worker: Worker
    upstream: UpstreamServer
    chain: list[bytes]
    task: asyncio.Task
    records: list[dict] = field(default_factory=list)
    errors: list[logging.LogRecord] = field(default_factory=list)
    handler: logging.Handler | None = None


class _Errors(logging.Handler):
    def __init__(self, sink: list) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


POLICY = {"version": 1, "rules": [
    {"id": "frontend", "effect": "allow", "from": {"workloads": [FRONTEND_ID]}, "to": [{"paths": ["/**"]}]},
    {"id": "no-a", "effect": "deny", "from": {"workloads": [FRONTEND_ID]},
     "to": [{"paths": ["/f/a", "/f/a/**"]}, {"methods": ["DELETE"], "paths": ["/**"]}]},
]}


def start_env(root: Path) -> Env:
    """A worker (real listener, pipeline, policy, audit sink) and a recording upstream on its own
    uvloop loop; the loop runs only inside `check_stream` / `stop_env`."""
    loop = uvloop.new_event_loop()
    pki = make_pki(root / "pki")
    upstream = loop.run_until_complete(UpstreamServer().start())
    cfg_path = write_config(pki, upstream_url=upstream.url, policy=POLICY,
                            extra={"admin": {"enabled": False}})
    worker = Worker(load_config(cfg_path, env={}), audit_fd=os.open(os.devnull, os.O_WRONLY))
    worker.load()
    task = loop.create_task(worker.run(install_signals=False))
    while worker.plane is None:
        loop.run_until_complete(asyncio.sleep(0.01))
    pem = open(pki.client("frontend").cert, "rb").read()
    chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]
    e = Env(loop, worker, upstream, chain, task)
    sink, emit = worker.sink, worker.sink.emit

    def capture(record: dict, *, owned: bool = False) -> None:
        if record.get("type") == "decision":
            e.records.append(dict(record))
        emit(record, owned=owned)

    sink.emit = capture
    e.handler = _Errors(e.errors)
    logging.getLogger("portcullis").addHandler(e.handler)
    return e


def stop_env(e: Env) -> None:
    logging.getLogger("portcullis").removeHandler(e.handler)
    e.worker.stop()
    e.loop.run_until_complete(asyncio.wait_for(e.task, 15))
    e.loop.run_until_complete(e.upstream.close())
    e.loop.close()


async def _drive(env: Env, chunks: list[bytes]) -> FakeTransport:
    loop = env.loop
    t = FakeTransport(loop, env.chain)
    conn = env.worker.plane.factory()
    t.protocol = conn
    conn.connection_made(t)

    async def settle(max_s: float) -> None:
        """Until nothing more can happen without more input (or the connection is gone)."""
        end = loop.time() + max_s
        last, still = None, 0
        while loop.time() < end and not t.lost:
            await asyncio.sleep(0.002)
            ex = conn.active
            if ex is None and not conn.queue and not t.paused:
                return
            state = (len(t.out), id(ex), len(conn.queue), t.paused)
            still = still + 1 if state == last else 0
            last = state
            waiting_for_client = ex is not None and not ex.body_done
            if still >= 10 and (waiting_for_client or t.paused):
                return

    for chunk in chunks:
        if t.closing:
            break
        if t.paused:
            await settle(3.0)
            if t.paused or t.closing:
                break
        conn.data_received(chunk)
        await asyncio.sleep(0)
    await settle(3.0)
    t.close()  # the client leaves
    while not t.lost:
        await asyncio.sleep(0)
    await asyncio.sleep(0.001)  # the upstream side of an aborted exchange settles too
    assert conn not in env.worker.plane.conns
    return t


# -- reading what the client got ----------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*\r\n")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): ?([\x20-\x7e\x80-\xff\t]*)\r\n")


class Truncated(Exception):
    pass


def _responses(out: bytes, methods: list[str]) -> list[tuple[int, dict, bytes]]:
    """Split `out` into final responses (1xx skipped), one per entry of `methods` at most; raise
    AssertionError for anything malformed, Truncated if the bytes end inside a response."""
    pos, got = 0, []

    def line(rx):
        nonlocal pos
        end = out.find(b"\r\n", pos)
        if end < 0:
            raise Truncated
        m = rx.fullmatch(out, pos, end + 2)
        assert m is not None, f"malformed line {out[pos:end + 2]!r}"
        pos = end + 2
        return m

    while pos < len(out):
        status = int(line(_STATUS_LINE).group(1))
        headers: dict[bytes, list[bytes]] = {}
        while True:
            if out[pos:pos + 2] == b"\r\n":
                pos += 2
                break
            m = line(_HEADER_LINE)
            headers.setdefault(m.group(1).lower(), []).append(m.group(2))
        if status < 200:
            assert not headers.get(b"content-length") and not headers.get(b"transfer-encoding")
            continue
        assert len(got) < len(methods), f"a response to no request: {out[pos - 80:pos]!r}"
        method = methods[len(got)]
        te, cl = headers.get(b"transfer-encoding"), headers.get(b"content-length")
        assert not (te and cl), "both framings in one response"
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif te:
            assert te == [b"chunked"]
            body = b""
            while True:
                size_line = line(re.compile(rb"([0-9a-f]+)\r\n"))
                size = int(size_line.group(1), 16)
                if size == 0:
                    if out[pos:pos + 2] != b"\r\n":
                        raise Truncated
                    pos += 2
                    break
                if len(out) < pos + size + 2:
                    raise Truncated
                assert out[pos + size:pos + size + 2] == b"\r\n"
                body += out[pos:pos + size]
                pos += size + 2
        else:
            assert cl is not None and len(cl) == 1 and cl[0].isdigit(), f"unframed response {headers}"
            n = int(cl[0])
            if len(out) < pos + n:
                raise Truncated
            body = bytes(out[pos:pos + n])
            pos += n
        got.append((status, headers, body))
    return got


def check_stream(env: Env, chunks: list[bytes]) -> list[dict]:
    """Feed one client connection `chunks` (one read each), let it settle, leave; then check
    everything the module docstring promises. Returns the audit records of this connection."""
    n_rec, n_up, n_err = len(env.records), len(env.upstream.received), len(env.errors)
    t = env.loop.run_until_complete(_drive(env, chunks))
    recs = env.records[n_rec:]
    out = bytes(t.out)
    answered = [r for r in recs if r["status"]]
    # well-formed responses, one per answered head, in order
    try:
        responses = _responses(out, [r["method"] for r in answered])
        truncated = False
    except Truncated:
        # only the last response may be cut, and only when the sidecar says it was cut
        assert answered and answered[-1]["outcome"] != "complete", out[-200:]
        responses, truncated = None, True
    if not truncated:
        assert [s for s, _, _ in responses] == [r["status"] for r in answered], (out[:300], recs)
        for (status, headers, body), rec in zip(responses, answered):
            if rec["upstream_status"] is None:  # the sidecar's own answer
                assert status < 500 or status in (502, 503, 504), rec
                if body:
                    err = orjson.loads(body)
                    assert (err["error"], err["decision_id"]) == (rec["code"], rec["decision_id"])
    # heads never answered: only because the client left first
    for r in recs:
        if not r["status"]:
            assert r["outcome"] in ("client_aborted", "not_served"), r
        assert r["code"] != "internal_error" and r["decision"] != "error" or r["status"] in (502, 503, 504)
    # the upstream got nothing the sidecar did not allow
    allowed = [(r["method"], r["path"]) for r in recs if r["decision"] == "allow"]
    for got in env.upstream.received[n_up:]:
        assert (got.method, got.target.split("?", 1)[0]) in allowed, (got, recs)
    assert len(env.upstream.received) - n_up <= len(allowed)
    assert env.errors[n_err:] == []
    return recs
