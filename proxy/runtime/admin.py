"""The admin listener (plain HTTP, off the hot path): /healthz, /readyz, /metrics.

Rules:
- /healthz: 200 while the process serves (liveness; never depends on inputs).
- /readyz: 200 only when the own SVID, every trust bundle and the policy are loaded and fresh, the
  audit sink is healthy and the process is not draining; otherwise 503 with the reasons (stable
  codes such as `svid_expired`, `policy_stale`, `draining`).
- /metrics: Prometheus text exposition (`promtool check metrics` clean).
- GET and HEAD only (405 with `Allow` otherwise), 404 for any other path (a query string is
  ignored); JSON bodies, `Cache-Control: no-store`. Refusals are `ProxyError`s rendered by
  `runtime.responses`, like every error of the sidecar (DESIGN rule 4), without a decision id.
- Bind it to loopback or a pod-internal address: it is unauthenticated by design, like Envoy's.

It is a small asyncio protocol on httptools, like the data plane, not an aiohttp application:
aiohttp costs every worker ~12 MiB of resident memory for three fixed endpoints (issue 3, goal 5;
`bench/bench_memory.py`), and a single-worker sidecar (the usual one) then need not import it at
all. What a minimal server must still get right is here: HTTP/1.1 keep-alive (Prometheus reuses
its connection) and HTTP/1.0 / `Connection: close`; pipelined requests answered in order; a
request head bounded (`MAX_HEAD_BYTES`, 431), a request body refused (400: no endpoint takes
one), a malformed request answered 400, an HTTP/1.1 request without exactly one valid Host
answered 400 (RFC 9112 section 3.2, the same rule as the data plane: `core.paths.check_host`),
each of them closing the connection; idle connections
closed after `IDLE_TIMEOUT_S`, and at most `MAX_CONNECTIONS` at once (more are closed at accept).
A status or exposition function that raises is a 500 (logged), never a dead listener.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections import deque
from typing import Any, Awaitable, Callable

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.core.paths import check_host
from proxy.errors import BadRequest, HeadersTooLarge, InternalError, MethodNotAllowed, NotFound, \
    ProxyError
from proxy.runtime.metrics import Metrics, make_registry
from proxy.runtime.responses import render, render_error

log = logging.getLogger("portcullis.admin")

StatusFn = Callable[[], "dict[str, Any] | Awaitable[dict[str, Any]]"]
ExpositionFn = Callable[[], Awaitable[bytes]]

MAX_HEAD_BYTES = 8192
MAX_PIPELINED = 8
IDLE_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 64
_JSON = "application/json"
_GET_HEAD = (("allow", "GET, HEAD"),)


class _Stop(Exception):
    """Raised from a parser callback to stop reading: after a request that ends the connection
    (`err` None), or to answer `err` (rendered by `runtime.responses`) and close."""

    def __init__(self, err: ProxyError | None = None) -> None:
        super().__init__(err.code if err is not None else "stop")
        self.err = err


class AdminServer:
    """The listening admin socket and its connections; `close()` stops both."""

    def __init__(self, status: StatusFn, exposition: ExpositionFn) -> None:
        self.status = status
        self.exposition = exposition
        self.conns: set[_AdminConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, address: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _AdminConnection(self), address, port,
                                               reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def respond(self, method: str, target: bytes) -> tuple[int, str, bytes] | ProxyError:
        """(status, content type, body) for one request, or the error to answer with."""
        path = target.split(b"?", 1)[0]
        if path not in (b"/healthz", b"/readyz", b"/metrics"):
            return NotFound("not_found")
        if method not in ("GET", "HEAD"):
            return MethodNotAllowed("method_not_allowed", headers=_GET_HEAD)
        try:
            if path == b"/healthz":
                return 200, _JSON, b'{"status": "ok"}'
            if path == b"/readyz":
                st = self.status()
                if inspect.isawaitable(st):
                    st = await st
                return (200 if st.get("ready") else 503), _JSON, json.dumps(st).encode()
            return 200, CONTENT_TYPE_LATEST, await self.exposition()
        except Exception:  # a broken status source must not take the listener down
            log.exception("admin %s failed", path.decode("latin-1"))
            return InternalError("internal_error")


class _AdminConnection(asyncio.Protocol):
    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.head_bytes = 0
        self.hosts = 0  # Host field lines of the request being read, and the last one's value
        self.host = b""
        self.requests: deque[tuple[str, bytes, bool] | ProxyError] = deque()
        self.serving: asyncio.Task | None = None
        self.broken = False  # nothing more is read (closing after the answers owed)
        self.idle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.conns) >= MAX_CONNECTIONS:
            transport.close()
            return
        self.server.conns.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        if self.serving is not None:
            self.serving.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Stop):
                if ctx.err is None:
                    self._kick()
                else:
                    self._refuse(ctx.err)
            else:
                log.error("admin parser callback failed", exc_info=ctx or exc)
                self._refuse(InternalError("internal_error"))
        except httptools.HttpParserUpgrade:
            self._refuse(BadRequest("upgrade_not_supported"))
        except httptools.HttpParserError:
            self._refuse(BadRequest("malformed_request"))

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.head_bytes = 0
        self.hosts = 0
        self.host = b""

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if name.lower() == b"host":
            self.hosts += 1
            self.host = value

    def on_body(self, body: bytes) -> None:
        raise _Stop(BadRequest("body_not_accepted"))

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            raise _Stop(BadRequest("upgrade_not_supported"))
        if len(self.requests) >= MAX_PIPELINED:
            raise _Stop(BadRequest("too_many_pipelined_requests"))
        try:
            check_host(self.parser.get_http_version(), self.hosts, self.host)
        except BadRequest as err:
            raise _Stop(err) from None
        method = self.parser.get_method().decode("ascii", "replace")
        keep = self.parser.should_keep_alive()
        self.requests.append((method, self.url, keep))
        if not keep:
            self.broken = True  # HTTP/1.0 or Connection: close: the last request read
            raise _Stop()  # nothing after it is parsed
        self._kick()

    def _count(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _Stop(HeadersTooLarge("headers_too_large"))

    # -- answers -------------------------------------------------------------------------------
    def _refuse(self, err: ProxyError) -> None:
        """Answer the requests already read, then this refusal, then close."""
        self.broken = True
        self.requests.append(err)
        self._kick()

    def _kick(self) -> None:
        if self.serving is None and self.transport is not None:
            self.serving = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self.requests and self.transport is not None:
                item = self.requests.popleft()
                if isinstance(item, ProxyError):
                    self.transport.write(render_error(item, decision_id=None, close=True))
                    self.close()
                    return
                method, target, keep = item
                answer = await self.server.respond(method, target)
                if self.transport is None:
                    return
                head = method == "HEAD"
                if isinstance(answer, ProxyError):
                    self.transport.write(render_error(answer, decision_id=None, close=not keep,
                                                      head_only=head))
                else:
                    self.transport.write(render(*answer, close=not keep, head_only=head))
                if not keep:
                    self.close()
                    return
            self._arm_idle()
        finally:
            self.serving = None

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None:
            self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_app(status: StatusFn, exposition: ExpositionFn, address: str,
                    port: int) -> tuple[AdminServer, int]:
    """Start an admin listener serving `status` (/readyz) and `exposition` (/metrics)."""
    server = AdminServer(status, exposition)
    return server, await server.start(address, port)


async def start_admin(address: str, port: int, status: StatusFn,
                      metrics: Metrics) -> tuple[AdminServer, int]:
    """Admin listener of a single worker process."""
    registry = make_registry(metrics)

    async def exposition() -> bytes:
        return generate_latest(registry)

    return await start_app(status, exposition, address, port)
