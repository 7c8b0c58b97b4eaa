"""Pooled raw HTTP/1.1 connections to the workload, and the header rewriting both ways.

Rules (RFC 9110 section 7.6.1, RFC 9112 sections 6-7, 9.6):
- Hop-by-hop headers are removed in both directions: Connection, Keep-Alive, Proxy-Connection, TE,
  Trailer, Transfer-Encoding, Upgrade, Proxy-Authenticate, Proxy-Authorization, and every header
  named in a Connection header.
- Requests: client-supplied identity headers (X-Forwarded-Client-Cert and every X-Portcullis-*) and
  the headers the sidecar sets (request id, decision id, obligations) are removed, in any case and
  with `_` read as `-` (frameworks that map both to the same variable, as CGI/WSGI do, must not
  see a forged copy); the sidecar then adds its own. A Connection header can name these, but
  cannot remove what the sidecar adds. Framing is re-derived from what the parser saw (never
  copied): `content-length` for a sized body, `transfer-encoding: chunked` (re-chunked) otherwise.
- Responses: framing is re-derived too. A sized body keeps its `content-length` (whatever the
  upstream's Connection header names); a chunked or close-delimited body goes to an HTTP/1.1
  client re-chunked; HEAD, 1xx, 204 and 304 have no body. A transfer coding other than exactly
  `chunked`, or a 101, is a bad response (502): the sidecar never relays a coding it strips.
- One request at a time per upstream connection (no upstream pipelining). A connection goes back to
  the pool only after a complete response to a completely sent request with keep-alive, and
  reading (it may have been paused for a slow client); one the upstream closes while idle leaves
  the pool at once.
- Connect failure -> `UpstreamError` (502); no response head within `response_timeout_s` after the
  request was sent -> `UpstreamTimeout` (504); a failure after the response head reached the client
  aborts the client connection (the caller's job) instead of writing a half error page.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import httptools

from proxy.errors import ProxyError, UpstreamError, UpstreamTimeout

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig
    from proxy.runtime.deadlines import Sweeper
    from proxy.runtime.metrics import Metrics

INF = float("inf")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
IDENTITY_EXACT = frozenset({b"x-forwarded-client-cert"})
IDENTITY_PREFIX = b"x-portcullis-"
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_NO_BODY_STATUS = frozenset({204, 304})


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Header names listed in Connection header values (RFC 9110 section 7.6.1)."""
    out = set()
    for v in values:
        for tok in v.split(b","):
            tok = tok.strip().lower()
            if tok:
                out.add(tok)
    return frozenset(out)


def forward_filter(headers: list[tuple[bytes, bytes]], lnames: list[bytes], drop: frozenset[bytes],
                   conn_tokens: frozenset[bytes]) -> tuple[list[bytes], bool]:
    """The request header lines to forward, and whether a Host is among them.

    Dropped: hop-by-hop and framing headers, every header named in Connection, identity headers
    (`X-Forwarded-Client-Cert`, any `X-Portcullis-*`, and whatever names the sidecar sets itself:
    `drop`). Names are compared lowercased with `_` read as `-`, because WSGI/CGI servers map both
    to the same variable (`X_Portcullis_Spiffe_Id` would otherwise pass for the real header).
    """
    out = []
    has_host = False
    for (name, value), lname in zip(headers, lnames):
        if b"_" in lname:
            if lname in conn_tokens:
                continue
            lname = lname.replace(b"_", b"-")
        if lname in drop or lname.startswith(IDENTITY_PREFIX) or lname in conn_tokens:
            continue
        if lname == b"host":
            has_host = True
        out.append(name + b": " + value + b"\r\n")
    return out, has_host


def request_head(method: str, target: str, lines: list[bytes], has_host: bool,
                 extra: tuple[tuple[str, str], ...], framing: bytes, host_fallback: bytes) -> bytes:
    """Serialise the request head sent upstream (always HTTP/1.1) from `forward_filter` lines."""
    parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), *lines]
    if not has_host:
        parts.append(b"host: " + host_fallback + b"\r\n")
    parts.append("".join(f"{name}: {value}\r\n" for name, value in extra).encode("latin-1"))
    parts.append(framing)
    parts.append(b"\r\n")
    return b"".join(parts)


def drop_set(own_headers: tuple[str, ...]) -> frozenset[bytes]:
    """Every request header name the forwarder removes unconditionally (see forward_filter)."""
    return frozenset(HOP_BY_HOP | _FRAMING | IDENTITY_EXACT
                     | {h.lower().encode("latin-1") for h in own_headers})


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                  lnames: list[bytes], conn_values: list[bytes], *, body_mode: str,
                  chunk_to_client: bool, close: bool) -> bytes:
    """Serialise the response head sent to the client (HTTP/1.1). `lnames` are the lowercased
    header names (computed once by the connection), `conn_values` the Connection header values.

    body_mode: "none" (HEAD/1xx/204/304: headers passed as they are, minus hop-by-hop),
    "length" (keep content-length), "chunked" / "close" (re-framed: chunked for HTTP/1.1 clients,
    close-delimited otherwise).
    """
    conn_tokens = connection_tokens(conn_values) if conn_values else _NO_TOKENS
    parts = [b"HTTP/1.1 %d " % status + reason + b"\r\n"]
    # framing is ours: content-length is never removed because Connection named it, and never
    # kept when the body is re-framed
    keep_cl = body_mode == "length" or (body_mode == "none" and status != 204)
    for (name, value), lname in zip(headers, lnames):
        if lname == b"content-length":
            if keep_cl:
                parts.append(name + b": " + value + b"\r\n")
        elif lname not in HOP_BY_HOP and lname not in conn_tokens:
            parts.append(name + b": " + value + b"\r\n")
    if body_mode in ("chunked", "close") and chunk_to_client:
        parts.append(b"transfer-encoding: chunked\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


_NO_TOKENS: frozenset[bytes] = frozenset()


class WriteBatch:
    """Coalesces the writes one incoming read causes into one write per connection.

    While `depth` > 0 (a client or upstream `data_received` is being processed), `write_out`
    appends to the connection's buffer instead of writing; `end()` of the outermost batch writes
    every buffer once. A small response then leaves as one TLS record and one syscall instead of
    two (head, body), and a request head plus a small body as one upstream write. Closing a
    connection flushes its buffer first; aborting drops it.
    """

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list = []

    def begin(self) -> None:
        self.depth += 1

    def end(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.dirty:
            dirty, self.dirty = self.dirty, []
            for w in dirty:
                w.flush_out()


class Exchange(Protocol):
    """What an upstream connection reports to (implemented by the listener's request object)."""

    def upstream_informational(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      lnames: list[bytes], conn_values: list[bytes], body_mode: str) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_done(self) -> None: ...
    def upstream_failed(self, err: ProxyError) -> None: ...
    def upstream_pause(self) -> None: ...
    def upstream_resume(self) -> None: ...


class Upstream:
    """The workload: where to connect, and a LIFO pool of idle keep-alive connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: "UpstreamConfig", metrics: "Metrics",
                 sweeper: "Sweeper") -> None:
        self.loop, self.cfg, self.metrics, self.sweeper = loop, cfg, metrics, sweeper
        self.batch = WriteBatch()  # shared with the listener's client connections
        self.idle: list[UpstreamConnection] = []
        self.closed = False
        if cfg.url.startswith("unix:"):
            self.unix_path: str | None = "/" + cfg.url[5:].lstrip("/")
            self.host, self.port = None, None
            self.authority = b"localhost"
        else:
            u = urlsplit(cfg.url)
            self.unix_path = None
            self.host, self.port = u.hostname, u.port or 80
            self.authority = u.netloc.encode("latin-1")

    def acquire(self) -> "UpstreamConnection | None":
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable():
                conn.deadline = INF
                return conn
            conn.close()
        return None

    async def connect(self) -> "UpstreamConnection":
        factory = lambda: UpstreamConnection(self)  # noqa: E731
        try:
            if self.unix_path is not None:
                coro = self.loop.create_unix_connection(factory, self.unix_path)
            else:
                coro = self.loop.create_connection(factory, self.host, self.port)
            _t, conn = await asyncio.wait_for(coro, self.cfg.connect_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.inc(("upstream_connect_timeout",))
            raise UpstreamError("upstream_connect_timeout", "connect timed out") from None
        except OSError as exc:
            self.metrics.upstream_errors.inc(("upstream_unavailable",))
            raise UpstreamError("upstream_unavailable", f"connect failed: {exc.strerror or exc}") from None
        self.metrics.upstream_connects.inc()
        return conn

    def release(self, conn: "UpstreamConnection") -> None:
        if (self.closed or not conn.reusable() or len(self.idle) >= self.cfg.max_idle_connections):
            conn.close()
            return
        if conn.reading_paused:
            conn.resume_reading()  # paused for a slow client: an idle connection must see EOF
        conn.deadline = self.loop.time() + self.cfg.idle_timeout_s
        self.idle.append(conn)

    def idle_count(self) -> int:
        return len(self.idle)

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()


class UpstreamConnection(asyncio.Protocol):
    """One upstream HTTP/1.1 connection, carrying one exchange at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self._out: list[bytes] | None = None  # writes held while a WriteBatch is open
        self.deadline = INF
        self.lost = False
        self.keep_alive = False
        self.head_request = False
        self.request_complete = False
        self.response_started = False
        self.response_complete = False
        self.bytes_received = 0
        self.used = 0
        self.reading_paused = False
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body_mode = "none"

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.upstream.sweeper.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.upstream.sweeper.discard(self)
        ex = self.exchange
        if ex is None:
            if self in self.upstream.idle:
                self.upstream.idle.remove(self)  # closed by the upstream while pooled
            return
        if (exc is None and self.response_started and self._body_mode == "close"
                and not self.response_complete):
            # close-delimited body: EOF is the end of the message
            self.response_complete = True
            self.exchange = None
            ex.upstream_done()
            return
        self.exchange = None
        code = "upstream_reset" if self.response_started else "upstream_unavailable"
        self.upstream.metrics.upstream_errors.inc((code,))
        ex.upstream_failed(UpstreamError(code, "upstream closed the connection"
                                         + (" mid-response" if self.response_started else "")))

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            # bytes while idle: the upstream is confused; never reuse this connection
            self.close()
            return
        self.bytes_received += len(data)
        if self.deadline != INF:
            self.deadline = self.upstream.loop.time() + self.upstream.cfg.response_timeout_s
        batch = self.upstream.batch
        batch.begin()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("upstream_bad_response", f"unparsable response: {exc}"))
        finally:
            batch.end()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost completes a close-delimited body

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_pause()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_resume()

    # -- used by the listener ------------------------------------------------------------------
    def reusable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def begin(self, exchange: Exchange, head: bytes, *, head_request: bool) -> None:
        self.exchange = exchange
        self.used += 1
        self.head_request = head_request
        self.request_complete = False
        self.response_started = False
        self.response_complete = False
        self.keep_alive = False
        self.bytes_received = 0
        if self.used > 1:
            self.parser = httptools.HttpResponseParser(self)
        self.send(head)

    def send(self, data: bytes) -> None:
        if self.lost:
            return
        batch = self.upstream.batch
        if batch.depth:
            out = self._out
            if out is None:
                self._out = [data]
                batch.dirty.append(self)
            else:
                out.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def flush_out(self) -> None:
        out, self._out = self._out, None
        if out and not self.lost and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def request_sent(self) -> None:
        """The whole request is written: start the response timer."""
        self.request_complete = True
        if not self.response_started:
            self.deadline = self.upstream.loop.time() + self.upstream.cfg.response_timeout_s

    def pause_reading(self) -> None:
        if not self.lost and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if not self.lost and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def close(self) -> None:
        self.exchange = None
        if self._out:
            self.flush_out()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        self._out = None
        if self.transport is not None:
            self.transport.abort()

    def on_deadline(self) -> None:
        if self.exchange is None:
            self.deadline = INF
            self.close()  # idle too long in the pool
            try:
                self.upstream.idle.remove(self)
            except ValueError:
                pass
            return
        if self.response_started:
            self._fail(UpstreamTimeout("upstream_timeout", "upstream stalled mid-response"))
        else:
            self.upstream.metrics.upstream_errors.inc(("upstream_timeout",))
            self._fail(UpstreamTimeout("upstream_timeout", "no response head in time"))

    def _fail(self, err: ProxyError) -> None:
        ex = self.exchange
        self.abort()
        if ex is not None:
            ex.upstream_failed(err)

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        ex = self.exchange
        if ex is None:
            return
        if status < 200:
            if status == 101:
                self._fail(UpstreamError("upstream_bad_response", "unexpected 101 Switching Protocols"))
                return
            ex.upstream_informational(status, self._reason, self._headers)
            return
        self.response_started = True
        self._status = status
        self.deadline = self.upstream.loop.time() + self.upstream.cfg.response_timeout_s
        te = cl = False
        lnames = []
        conn_values = []
        for name, value in self._headers:
            lname = name.lower()
            lnames.append(lname)
            if lname == b"transfer-encoding":
                if te or value.strip().lower() != b"chunked":
                    # llhttp would read such a body to EOF; its coding would reach the client unsaid
                    self._fail(UpstreamError("upstream_bad_response", "transfer coding other than chunked"))
                    return
                te = True
            elif lname == b"content-length":
                cl = True
            elif lname == b"connection":
                conn_values.append(value)
        if self.head_request or status in _NO_BODY_STATUS:
            mode = "none"
        elif te:
            mode = "chunked"
        elif cl:
            mode = "length"
        else:
            mode = "close"
        self._body_mode = mode
        ex.upstream_head(status, self._reason, self._headers, lnames, conn_values, mode)
        if mode == "none" and self.head_request:
            # httptools would wait for a body after a HEAD response with content-length
            self._message_done(keep_alive=self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None and self._status >= 200 and body:
            ex.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._status < 200 or self.exchange is None:
            return  # end of a 1xx interim response (or already done)
        self._message_done(keep_alive=self.parser.should_keep_alive())

    def _message_done(self, *, keep_alive: bool) -> None:
        ex = self.exchange
        if ex is None or self.response_complete:
            return
        self.response_complete = True
        self.keep_alive = keep_alive and self._body_mode != "close"
        self.deadline = INF
        self._status = 0
        self.exchange = None
        if not (self.keep_alive and self.request_complete):
            self.close()
        ex.upstream_done()
