"""The data plane: one uvloop `asyncio.Protocol` per mTLS client connection.

Rules:
- Bytes in, `RequestFacts` out, `core.pipeline.authorize` decides, the decision's canonical target
  is what goes upstream. No policy logic here; errors are rendered only by `runtime.responses`.
- HTTP/1.1 framing is parsed by httptools (llhttp, strict): conflicting Content-Length and
  Transfer-Encoding, duplicate Content-Length, bare LF, obs-fold, invalid chunk sizes are 400s.
  On top of it: only HTTP/1.0 and HTTP/1.1; Transfer-Encoding must be exactly `chunked` (HTTP/1.1
  only, RFC 9112 6.1); an HTTP/1.1 request needs exactly one Host (RFC 9112 3.2); CONNECT is
  refused (405); `Upgrade` is never honoured (it is hop-by-hop and stripped; the connection closes
  after that exchange). Head size and header count are limited (431), the request line (414,
  `max_request_line_bytes`), the body (413, `max_body_bytes`: a declared Content-Length before
  anything is forwarded, a chunked body as it streams); Host must be host[:port] (400). Bytes
  that are not body are bounded too: a header line that never ends (httptools buffers it) and
  chunk extensions out of proportion to the body are cut (`_check_framing`).
- Nothing is parsed after a request that ends the connection (HTTP/1.0, `Connection: close`,
  Upgrade, a malformed request) or once the connection is marked to close: a smuggled or
  pipelined request after it is never forwarded and gets no audit record.
- Pipelined requests are answered strictly in order: one exchange is active per connection, later
  ones wait (their bodies buffered, bounded; reading pauses past the bound or past
  `_MAX_QUEUED` waiting requests).
- Exactly one audit record per exchange that got a request head, whatever happens (allow, deny,
  error, client gone, upstream reset); `Exchange.finish` is the only writer and runs once.
- A failure after the response head was sent aborts the client connection with a TCP RST
  (RFC 9112 9.6 leaves no other honest signal; a clean TLS close, or even a bare FIN, makes a
  close-delimited body look complete to curl); before that, the error is rendered as a response.
- A pooled upstream connection that fails before any response byte is retried once on a fresh
  connection, only for a bodyless request with an idempotent method (RFC 9110 9.2.2).
- Timeouts (one sweeper, no per-request timers): `header_timeout_s` for a request head (408),
  `idle_timeout_s` between requests and between body bytes of a streaming request (408).
- Flow control both ways: a full upstream socket pauses client reading and vice versa.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import struct
import time
import weakref
from typing import TYPE_CHECKING, Callable

import httptools

from proxy.core.pipeline import RequestFacts, State, authorize, body_limit, deny_error
from proxy.core.audit import params_digest
from proxy.core.paths import check_host
from proxy.core.spiffe import PeerCertificates
from proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    MethodNotAllowed,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    URITooLong,
)
from proxy.runtime.responses import render_error
from proxy.runtime.tls import peer_chain_der
from proxy.runtime.upstream import (
    INF,
    Upstream,
    UpstreamConnection,
    connection_tokens,
    drop_set,
    forward_filter,
    request_head,
    response_head,
)

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.core.model import Decision
    from proxy.runtime.audit_sink import AuditSink
    from proxy.runtime.deadlines import Sweeper
    from proxy.runtime.metrics import Metrics

log = logging.getLogger("portcullis.listener")

_REQUEST_ID_RE = re.compile(rb"[\x21-\x7e]{1,200}")
_FRAMING_PER_BODY_BYTE = 8  # chunk-size lines and extensions allowed per body byte (beyond a base)
_PENDING_BODY_LIMIT = 1 << 20  # bytes buffered for a request that waits its turn
_LINGER_BYTES = 1 << 20  # body bytes read and discarded after an early final response
_LINGER_S = 2.0
_RST_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP RST
_MAX_QUEUED = 32  # pipelined requests waiting their turn before reading pauses
_NO_TOKENS: frozenset[bytes] = frozenset()
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


class _DecisionIds:
    """Decision ids: 12 bytes of the OS CSPRNG as 24 hex digits, unique and unguessable. The bytes
    are read 4 KiB at a time (one getrandom(2) per ~340 requests instead of one per request); a
    forked child drops the parent's buffer, so two workers never hand out the same bytes."""

    __slots__ = ("buf", "pos")
    SIZE = 12
    CHUNK = 12 * 341

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def reset(self) -> None:
        self.buf = b""
        self.pos = 0

    def next(self) -> str:
        pos, end = self.pos, self.pos + self.SIZE
        if end > len(self.buf):
            self.buf = os.urandom(self.CHUNK)
            pos, end = 0, self.SIZE
        self.pos = end
        return self.buf[pos:end].hex()


class PeerChains:
    """The parsed, verified peer chains of the live connections, shared by connections that
    presented byte-identical chains (a client pool of one workload opens many connections with
    one SVID): the chain is parsed and verified once instead of once per connection, and held
    once in memory. Weak values: an entry lives exactly as long as a connection uses it, so the
    map is bounded by the open connections. Safe because `PeerCertificates` memoises a pure
    function of the chain bytes and the trust store version (`core.spiffe.verify_peer`)."""

    __slots__ = ("_live",)

    def __init__(self) -> None:
        self._live: weakref.WeakValueDictionary[tuple[bytes, ...], PeerCertificates] = \
            weakref.WeakValueDictionary()

    def get(self, chain: tuple[bytes, ...]) -> PeerCertificates:
        if not chain:
            return PeerCertificates(())
        peer = self._live.get(chain)
        if peer is None:
            peer = self._live[chain] = PeerCertificates(chain)
        return peer

    def __len__(self) -> int:
        return len(self._live)


_decision_ids = _DecisionIds()
os.register_at_fork(after_in_child=_decision_ids.reset)
_next_decision_id = _decision_ids.next

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class _Stop(Exception):
    """Raised inside parser callbacks to stop parsing with a prepared ProxyError (None: stop
    silently, the connection is closing)."""

    def __init__(self, err: ProxyError | None) -> None:
        self.err = err


class _Wall:
    """RFC 3339 UTC timestamps with milliseconds; the date part is formatted once per second."""

    __slots__ = ("_sec", "_prefix")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def format(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((t - sec) * 1000):03d}Z"


class DataPlane:
    """Everything the connections of one worker share."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, cfg: "Config", metrics: "Metrics",
                 sink: "AuditSink", upstream: Upstream, sweeper: "Sweeper",
                 get_state: Callable[[], State], worker: str) -> None:
        self.loop, self.cfg, self.metrics, self.sink = loop, cfg, metrics, sink
        self.upstream, self.sweeper, self.get_state, self.worker = upstream, sweeper, get_state, worker
        self.conns: set[ClientConnection] = set()
        self.peers = PeerChains()
        self.draining = False
        self.wall = _Wall()
        self.request_id_header = cfg.headers.request_id.encode()
        self.decision_id_header = cfg.headers.decision_id
        h = cfg.headers
        own = (h.spiffe_id, h.decision_id, h.request_id, h.subject, h.issuer, h.actor_chain,
               h.client_id, "x-forwarded-client-cert")
        if cfg.tokens.issuers and not cfg.tokens.forward_token:
            own += ("authorization", "dpop")
        self.jwt_svid_header = cfg.tokens.jwt_svid.header.encode() \
            if cfg.tokens.jwt_svid.enabled else None
        if self.jwt_svid_header is not None:
            own += (cfg.tokens.jwt_svid.header,)
        self.drop_headers = drop_set(own)
        self._waiting_for_sink: list[ClientConnection] = []
        #: issuer -> future of a key refresh, or None (set by the worker; see Worker.refresh_issuer_keys)
        self.refresh_issuer_keys: Callable[[str | None], "asyncio.Future | None"] = lambda _i: None

    def factory(self) -> "ClientConnection":
        return ClientConnection(self)

    def in_flight(self) -> int:
        return sum(1 for c in self.conns if c.active is not None or c.queue)

    def drain(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their current response."""
        self.draining = True
        for c in list(self.conns):
            c.drain()

    def abort_all(self) -> None:
        for c in list(self.conns):
            c.abort("drain_timeout")

    # -- audit backpressure ----------------------------------------------------------------------
    def wait_for_sink(self, conn: "ClientConnection") -> None:
        if not self._waiting_for_sink:
            self.sink.add_drain_waiter(self._sink_drained)
        self._waiting_for_sink.append(conn)

    def _sink_drained(self) -> None:
        waiting, self._waiting_for_sink = self._waiting_for_sink, []
        for c in waiting:
            c.resume_after_sink()


class Exchange:
    """One request and its response; reports to the audit log exactly once."""

    __slots__ = (
        "conn", "method", "url", "version", "headers", "head_bytes", "keep_alive", "body_mode",
        "body", "body_len", "body_done", "upstream", "decision", "error", "status",
        "upstream_status", "resp_mode", "chunk_out", "t0", "t_sent", "up_us", "request_id",
        "decision_id", "discard", "finished", "started", "headers_done", "upgrade", "expect",
        "conn_tokens", "outcome", "retried", "head_request", "content_length",
        "authorization", "dpop", "lnames", "retried_kid", "jwt_svid", "body_in", "framing",
        "await_limit", "content_type", "continued",
    )

    def __init__(self, conn: "ClientConnection") -> None:
        self.conn = conn
        self.method = ""
        self.url = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.keep_alive = True
        self.body_mode = "none"
        self.body: list[bytes] = []
        self.body_len = 0
        self.body_done = False
        self.upstream: UpstreamConnection | None = None
        self.decision: Decision | None = None
        self.error: ProxyError | None = None
        self.status = 0
        self.upstream_status: int | None = None
        self.resp_mode = "none"
        self.chunk_out = False
        self.t0 = time.perf_counter()
        self.t_sent = 0.0
        self.up_us: int | None = None
        self.request_id = ""
        self.decision_id = _next_decision_id()
        self.discard = False
        self.finished = False
        self.started = False
        self.headers_done = False
        self.upgrade = False
        self.expect = False
        self.conn_tokens: frozenset[bytes] = _NO_TOKENS
        self.content_length = 0
        self.authorization: tuple[str, ...] = ()
        self.dpop: tuple[str, ...] = ()
        self.lnames: list[bytes] = []
        self.retried_kid = False
        self.jwt_svid: tuple[str, ...] = ()
        self.await_limit = 0  # > 0 while the decision waits for a body of at most this size
        self.content_type: str | None = None
        self.continued = False
        self.body_in = 0  # body bytes the parser delivered (decoded)
        self.framing = 0  # other bytes of this request counted in data_received (see there)
        self.outcome = "complete"
        self.retried = False
        self.head_request = False

    # -- request body from the client ------------------------------------------------------------
    def feed_body(self, data: bytes) -> None:
        if self.discard:
            self.body_len += len(data)
            if self.body_len > _LINGER_BYTES:
                self.conn.close()
            return
        up = self.upstream
        if up is not None:
            up.send(b"%x\r\n%b\r\n" % (len(data), data) if self.body_mode == "chunked" else data)
        else:
            self.body.append(data)
            self.body_len += len(data)
            if self.await_limit and self.body_len > self.await_limit:
                self.conn.respond_error(self, PayloadTooLarge(
                    "body_too_large", f"body larger than the action's {self.await_limit} bytes"))
            elif self.body_len > _PENDING_BODY_LIMIT and not self.await_limit:
                self.conn.pause("pending_body")

    def end_body(self) -> None:
        if self.body_done:
            return  # bodyless: done since the head
        self.body_done = True
        if self.await_limit and not self.finished and self.upstream is None:
            self.conn._start(self)  # the body the decision waited for is complete
            return
        up = self.upstream
        if up is not None:
            if self.body_mode == "chunked":
                up.send(b"0\r\n\r\n")
            up.request_sent()
            self.t_sent = time.perf_counter()

    # -- upstream events (proxy.runtime.upstream.Exchange) ---------------------------------------
    def upstream_informational(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if self.version == "1.1" and status == 100 and self.expect:
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      lnames: list[bytes], conn_values: list[bytes], body_mode: str) -> None:
        conn = self.conn
        if self.t_sent:
            self.up_us = int((time.perf_counter() - self.t_sent) * 1e6)
            conn.plane.metrics.upstream_duration.observe(self.up_us / 1e6)
        self.status = self.upstream_status = status
        close = conn.must_close(self)
        if body_mode == "close" and self.version != "1.1":
            close = True
        if close:
            conn.close_after = True
        self.resp_mode = body_mode
        self.chunk_out = body_mode in ("chunked", "close") and self.version == "1.1"
        conn.write(response_head(status, reason, headers, lnames, conn_values, body_mode=body_mode,
                                 chunk_to_client=self.chunk_out, close=close))

    def upstream_body(self, data: bytes) -> None:
        if self.chunk_out:
            self.conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.conn.write(data)

    def upstream_done(self) -> None:
        up, self.upstream = self.upstream, None
        if self.chunk_out:
            self.conn.write(b"0\r\n\r\n")
        self.conn.resume("upstream_full")
        if up is not None:
            if self.body_done:
                self.conn.plane.upstream.release(up)
            else:
                up.close()  # answered before the request body ended: the rest is discarded
                self.discard = True
                self.conn.close_after = True
        self.finish()

    def upstream_failed(self, err: ProxyError) -> None:
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        self.conn.resume("upstream_full")
        if self.status:  # the response head is out: abort, never a half-written error page
            self.error = err
            self.outcome = err.code  # upstream_reset / upstream_timeout / upstream_bad_response
            self.conn.abort(err.code)
            self.finish()
            return
        if (not self.retried and up is not None and up.used > 1 and up.bytes_received == 0
                and self.body_mode == "none" and err.code == "upstream_unavailable"
                and self.method in _IDEMPOTENT):
            # a pooled keep-alive connection the upstream had already closed: retry once, fresh
            self.retried = True
            self.conn.connect_upstream(self)
            return
        self.conn.respond_error(self, err)

    def upstream_pause(self) -> None:
        self.conn.pause("upstream_full")

    def upstream_resume(self) -> None:
        self.conn.resume("upstream_full")

    # -- the end -------------------------------------------------------------------------------
    def finish(self) -> None:
        """Metrics and the audit record for this exchange; runs exactly once, never raises."""
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if conn._out is not None:
            # the response leaves before its record is built: the audit and metrics work is
            # not on the client's latency path (and the record's duration includes the send)
            conn.flush_out()
        plane = conn.plane
        try:
            rec = self._record(plane)
        except Exception as exc:  # a bug here must not cost the audit record
            log.exception("building the audit record failed")
            rec = {"type": "decision", "time": plane.wall.format(time.time()),
                   "decision_id": self.decision_id, "request_id": self.request_id,
                   "method": self.method, "decision": "error", "code": "audit_record_error",
                   "status": self.status, "detail": repr(exc)[:200]}
        plane.sink.emit(rec, owned=True)
        conn.exchange_finished(self)

    def _record(self, plane: DataPlane) -> dict:
        d = self.decision
        err = self.error
        if err is not None:
            decision, code, rule_id = err.decision, err.code, err.rule_id
        elif d is not None:
            decision, code, rule_id = d.effect, d.code, d.rule_id
        else:
            decision, code, rule_id = "error", "internal_error", None
        duration = time.perf_counter() - self.t0
        m = plane.metrics
        m.requests.inc((decision, code))
        m.request_duration.observe(duration, (decision,))
        peer = d.peer if d is not None else self.conn.peer.identity
        wb = d.would_be if d is not None else None
        if wb is not None:
            m.shadow.inc((wb.effect, wb.code))
        target = d.target if d is not None else None
        rec = {
            "type": "decision",
            "time": plane.wall.format(time.time()),
            "decision_id": self.decision_id,
            "request_id": self.request_id,
            "client_addr": self.conn.client_addr,
            "workload": None if peer is None else self.conn.workload_record(peer),
            "method": self.method,
            "path": target.path if target is not None else _raw_path(self.url),
            "decision": decision,
            "code": code,
            "rule_id": rule_id,
            "policy_revision": d.revision if d is not None else plane.get_state().policy.revision,
            "mode": d.mode if d is not None else "enforce",
            "would_be": None if wb is None else {"decision": wb.effect, "code": wb.code,
                                                 "rule_id": wb.rule_id},
            "status": self.status,
            "upstream_status": self.upstream_status,
            "upstream_duration_us": self.up_us,
            "duration_us": int(duration * 1e6),
            "outcome": self.outcome,
        }
        if d is not None and peer is not None:
            hop = self.conn.peer.identity
            if hop is not None and hop is not peer and hop.uri != peer.uri:
                rec["via"] = hop.uri  # a JWT-SVID named the workload; this L7 hop carried it
        if d is not None and d.action is not None:
            rec["action"] = d.action
            rec["params_digest"] = params_digest(d.params or {})
        if self.authorization or self.dpop:
            token_fields(rec, d, self.authorization, self.dpop)
            if d is not None and d.token is not None:
                m.token_results.inc(("ok",))
            elif err is not None and err.status == 401 or code.startswith(("token_", "dpop_")):
                m.token_results.inc((code,))
                if code == "dpop_replayed":
                    m.dpop_replays.inc()
        if err is not None and err.detail:
            rec["detail"] = err.detail
        return rec


def token_fields(rec: dict, d: "Decision | None", authorization: tuple[str, ...],
                 dpop: tuple[str, ...]) -> None:
    """Add to an audit record who the token says is acting, and fingerprints (never the token or
    the proof): from the verified token and binding when there are, else fingerprints of the
    presented `Authorization` / `DPoP` values. (bench/pyfloor.py builds the same record.)"""
    tok = d.token if d is not None else None
    binding = d.binding if d is not None else None
    if tok is not None:
        rec["subject"] = {"iss": tok.issuer, "sub": tok.subject}
        rec["actors"] = [a.sub for a in tok.actors]
        rec["client_id"] = tok.client_id
        rec["scopes"] = sorted(tok.scopes)
        rec["acr"] = tok.acr
        rec["token_fingerprint"] = tok.fingerprint
    elif authorization:
        raw = authorization[0].partition(" ")[2].strip(" ")
        rec["token_fingerprint"] = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()
    rec["binding"] = binding.kind if binding is not None else None
    if binding is not None and binding.proof_fingerprint:
        rec["proof_fingerprint"] = binding.proof_fingerprint
    elif dpop:
        rec["proof_fingerprint"] = hashlib.sha256(dpop[0].encode("utf-8", "surrogateescape")).hexdigest()


def _raw_path(url: bytes) -> str:
    """The path of a target that failed canonicalisation, for the audit record: never the query
    (it may carry credentials), bounded, undecodable bytes escaped."""
    path = url.split(b"?", 1)[0][:256]
    return path.decode("ascii", "backslashreplace")


class ClientConnection(asyncio.Protocol):
    """One mTLS client connection: parse, decide, forward, answer in order."""

    # no per-connection __dict__: an idle keep-alive connection is mostly this object
    __slots__ = ("plane", "batch", "_out", "_wrec", "_wrec_peer", "handshake_done", "transport",
                 "parser", "peer", "client_addr", "parsing", "active", "queue", "close_after",
                 "closed", "broken", "deadline", "paused", "write_paused")

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.batch = plane.upstream.batch
        self._out: list[bytes] | None = None  # writes held while a WriteBatch is open
        self._wrec: dict | None = None
        self._wrec_peer = None
        self.handshake_done = False
        self.transport: asyncio.Transport | None = None
        # created once the TLS handshake is done: until then nothing refers back to this
        # protocol, so a failed handshake frees it at once (and __del__ counts the failure)
        self.parser: httptools.HttpRequestParser | None = None
        self.peer = PeerCertificates(())
        self.client_addr = ""
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: list[Exchange] = []
        self.close_after = False
        self.closed = False
        self.broken = False  # no more requests are parsed on this connection
        self.deadline = INF
        self.paused: set[str] = set()
        self.write_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def __del__(self) -> None:
        # uvloop creates the protocol at accept time and calls connection_made only after the TLS
        # handshake succeeded; a protocol that never got it saw a failed handshake (no or an
        # untrusted client certificate, wrong version, timeout). Counted here, once.
        if not self.handshake_done:
            self.plane.metrics.tls_failures.inc()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handshake_done = True
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        plane = self.plane
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # TLS 1.3 without session tickets: the server sends nothing after the handshake,
                # so a client with Nagle on would wait ~40 ms for our delayed ACK before sending
                # its request. Acknowledge at once (Linux only; the kernel resets it on its own).
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except (OSError, AttributeError):
                pass
        self.peer = plane.peers.get(peer_chain_der(transport))
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.client_addr = f"{peername[0]}:{peername[1]}"
        plane.conns.add(self)
        plane.sweeper.add(self)
        plane.metrics.connections.inc()
        plane.metrics.connections_active.inc(n=1)
        if plane.draining or len(plane.conns) > plane.cfg.listener.max_connections:
            self.close()
            return
        self.deadline = plane.loop.time() + plane.cfg.listener.idle_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self.transport is None:
            return
        ours = self.closed or self.close_after  # the sidecar ended the connection (close/abort)
        self.closed = True
        plane = self.plane
        plane.conns.discard(self)
        plane.sweeper.discard(self)
        plane.metrics.connections_active.inc(n=-1)
        for ex in ([self.active] if self.active else []) + self.queue:
            if not ex.finished:
                if ex.upstream is not None:
                    ex.upstream.abort()
                    ex.upstream = None
                if not ex.started and ours:
                    # pipelined behind an exchange after which the sidecar closed the connection
                    ex.outcome = "not_served"
                    ex.error = BadRequest("not_served", "the connection closed before its turn")
                elif ex.outcome == "complete":
                    ex.outcome = "client_aborted"
                if ex.decision is None and ex.error is None:
                    ex.error = BadRequest("client_aborted", "client closed before the request was decided")
                ex.finish()
        self.active = None
        self.queue = []
        if self.parsing is not None and not self.parsing.finished and self.parsing.headers_done:
            self.parsing.outcome = "client_aborted"
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        ex = self.active
        if ex is not None and not ex.body_done:
            # a request body is streaming: it must keep moving (slow-body limit)
            self.deadline = self.plane.loop.time() + self.plane.cfg.listener.idle_timeout_s
        # Bytes that are not body (the head, chunk-size lines and extensions, trailers) are counted
        # too, when a whole read belongs to one request: httptools buffers a header line until it
        # ends, so a line that never ends must be cut by its size, not only by header_timeout_s.
        px = self.parsing
        if px is not None:
            hd0, b0 = px.headers_done, px.body_in
        batch = self.batch
        batch.begin()
        try:
            self.parser.feed_data(data)
            if px is not None and self.parsing is px and px.headers_done is hd0:
                px.framing += len(data) - (px.body_in - b0)
                self._check_framing(px)
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Stop):
                if ctx.err is not None:
                    self._parse_failed(ctx.err)
            else:
                log.error("parser callback failed", exc_info=ctx or exc)
                self._parse_failed(InternalError("internal_error", f"parser callback: {ctx!r}"))
        except httptools.HttpParserUpgrade:
            # an Upgrade request was parsed completely (on_message_complete ended reading)
            self.broken = True
        except httptools.HttpParserError as exc:
            self._parse_failed(BadRequest("malformed_request", f"HTTP/1.1 parse error: {exc}"))
        finally:
            batch.end()

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.close_after:
            # the connection closes after the current exchange: nothing more is read
            self.broken = True
            raise _Stop(None)
        ex = Exchange(self)
        self.parsing = ex
        if self.active is None and not self.queue:
            self.deadline = self.plane.loop.time() + self.plane.cfg.listener.header_timeout_s

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        ex.url = ex.url + url if ex.url else url
        ex.head_bytes += len(url)
        if ex.head_bytes > self.plane.cfg.listener.max_header_bytes:
            raise _Stop(HeadersTooLarge("request_line_too_large", "request line exceeds max_header_bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        lim = self.plane.cfg.listener
        ex.head_bytes += len(name) + len(value) + 4
        if ex.head_bytes > lim.max_header_bytes:
            raise _Stop(HeadersTooLarge("headers_too_large", "request head exceeds max_header_bytes"))
        if ex.headers_done:
            return  # chunked trailers: read and dropped (never forwarded)
        if len(ex.headers) >= lim.max_headers:
            raise _Stop(HeadersTooLarge("too_many_headers", "header count exceeds max_headers"))
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        p = self.parser
        ex.headers_done = True
        ex.framing = 0
        ex.method = p.get_method().decode("ascii")
        ex.version = v = p.get_http_version()
        ex.upgrade = p.should_upgrade()
        ex.keep_alive = v == "1.1" and p.should_keep_alive() and not ex.upgrade
        ex.head_request = ex.method == "HEAD"
        try:
            if v != "1.1" and v != "1.0":
                raise BadRequest("unsupported_http_version", f"HTTP/{v} is not HTTP/1.x")
            limit = self.plane.cfg.listener.max_request_line_bytes
            if len(ex.method) + len(ex.url) + 10 > limit:  # METHOD SP target SP HTTP/1.1
                raise URITooLong("uri_too_long", f"request line exceeds max_request_line_bytes ({limit})")
            self._read_framing(ex)
        except ProxyError as err:
            ex.keep_alive = False
            raise _Stop(err) from None
        if ex.body_mode == "none":
            ex.body_done = True
        queue = self.queue
        queue.append(ex)
        if self.active is None:
            self._start_next()
        elif len(queue) > _MAX_QUEUED:
            self.pause("pipeline")

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.body_in += len(body)
            if ex.discard:
                ex.feed_body(body)
            elif not ex.finished:
                limit = self.plane.cfg.listener.max_body_bytes
                if limit and ex.body_in > limit:
                    # a chunked body past the limit: its end (and these bytes) never go upstream
                    raise _Stop(PayloadTooLarge("payload_too_large",
                                                f"request body exceeds max_body_bytes ({limit})"))
                ex.feed_body(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        if not ex.keep_alive:
            # HTTP/1.0, Connection: close, Upgrade: the last request on this connection
            self.broken = True
        if ex.finished:
            ex.body_done = True
            if self.close_after and self.active is None and not self.queue:
                self.close()
            return
        ex.end_body()

    # -- framing ---------------------------------------------------------------------------------
    def _read_framing(self, ex: Exchange) -> None:
        """One pass over the request headers: framing, Host, request id, credentials, and the
        lowercased names the forwarder filters on (`ex.headers` becomes (name, value, lname))."""
        hosts = 0
        host = b""
        te: list[bytes] = []
        conn_values: list[bytes] = []
        has_cl = False
        rid_header = self.plane.request_id_header
        jwt_header = self.plane.jwt_svid_header
        lnames = []
        for name, value in ex.headers:
            n = name.lower()
            lnames.append(n)
            if n == b"host":
                hosts += 1
                host = value
            elif n == b"transfer-encoding":
                te.append(value)
            elif n == b"content-length":
                has_cl = True
                ex.content_length = int(value)  # httptools validated it (digits only, no dupes)
            elif n == b"connection":
                conn_values.append(value)
            elif n == b"expect":
                ex.expect = value.strip().lower() == b"100-continue"
            elif n == b"authorization":
                ex.authorization += (value.decode("latin-1"),)
            elif n == b"dpop":
                ex.dpop += (value.decode("latin-1"),)
            elif n == b"content-type":
                ex.content_type = value.decode("latin-1")
            elif n == jwt_header:
                ex.jwt_svid += (value.decode("latin-1"),)
            elif n == rid_header and not ex.request_id and _REQUEST_ID_RE.fullmatch(value):
                ex.request_id = value.decode("ascii")
        ex.lnames = lnames
        if not ex.request_id:
            ex.request_id = ex.decision_id
        if conn_values:
            ex.conn_tokens = connection_tokens(conn_values)
        if ex.method == "CONNECT":
            raise MethodNotAllowed("connect_not_supported", "CONNECT is not proxied")
        if te:
            if ex.version != "1.1":
                raise BadRequest("invalid_transfer_encoding", "Transfer-Encoding in an HTTP/1.0 request")
            if len(te) != 1 or te[0].strip().lower() != b"chunked":
                raise BadRequest("invalid_transfer_encoding", "Transfer-Encoding must be exactly chunked")
            ex.body_mode = "chunked"
        elif has_cl:
            ex.body_mode = "length"  # httptools validated the value and rejected duplicates
            limit = self.plane.cfg.listener.max_body_bytes
            if limit and ex.content_length > limit:
                raise PayloadTooLarge("payload_too_large",
                                      f"Content-Length {ex.content_length} exceeds max_body_bytes ({limit})")
        check_host(ex.version, hosts, host)

    def _check_framing(self, ex: Exchange) -> None:
        """Bound the bytes of a request that are not body (counted by data_received): a head that
        does not end, or chunk framing (size lines, extensions, trailers) out of proportion to
        the body. The exact head limits are checked per line (on_url, on_header)."""
        base = 2 * self.plane.cfg.listener.max_header_bytes
        if not ex.headers_done:
            if ex.framing > base:
                self._parse_failed(HeadersTooLarge("headers_too_large",
                                                   "request head exceeds max_header_bytes"))
        elif ex.framing > base + _FRAMING_PER_BODY_BYTE * ex.body_in:
            self._parse_failed(BadRequest("chunk_framing_too_large",
                                          "chunk extensions or trailers out of proportion to the body"))

    # -- exchanges ---------------------------------------------------------------------------------
    def _start_next(self) -> None:
        queue = self.queue
        # an exchange held back by audit backpressure waits for resume_after_sink()
        while self.active is None and queue and not self.closed and "audit" not in self.paused:
            ex = queue.pop(0)
            self.active = ex
            # a streaming request body must keep moving; otherwise the upstream timer rules
            if ex.body_done:
                self.deadline = INF
            else:
                self.deadline = self.plane.loop.time() + self.plane.cfg.listener.idle_timeout_s
            if len(queue) <= _MAX_QUEUED:
                self.resume("pipeline")
            self._start(ex)

    def _start(self, ex: Exchange) -> None:
        plane = self.plane
        ex.started = True
        if ex.error is not None:
            self.respond_error(ex, ex.error)
            return
        sink = plane.sink
        if not sink.healthy:
            self.respond_error(ex, ServiceUnavailable("audit_unavailable", "audit sink failed"))
            return
        if sink.saturated:
            if plane.cfg.audit.on_full == "fail_closed" and sink.can_record_refusal:
                self.respond_error(ex, ServiceUnavailable("audit_backlog", "audit queue is full"))
                return
            # backpressure (or a refusal that could not even be recorded): wait, not reading,
            # until the audit writer has caught up
            self.active = None
            self.queue.insert(0, ex)
            self.pause("audit")
            plane.wait_for_sink(self)
            return
        state = plane.get_state()
        facts = RequestFacts(ex.method, ex.url.decode("latin-1"), self.peer, ex.authorization,
                             ex.dpop, ex.jwt_svid)
        if state.policy.has_actions:
            # a policy action whose parameters come from the JSON body: the decision waits for the
            # (bounded) body, which is then forwarded exactly as it was inspected
            limit = body_limit(facts, state)
            if limit is not None:
                if ex.body_mode == "length" and ex.content_length > limit:
                    self.respond_error(ex, PayloadTooLarge(
                        "body_too_large", f"body of {ex.content_length} bytes, limit {limit}"))
                    return
                if not ex.body_done:
                    ex.await_limit = limit
                    if ex.expect and ex.version == "1.1" and not ex.continued:
                        ex.continued = True
                        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    return  # Exchange.end_body starts it again with the whole body
                facts = facts._replace(body=b"".join(ex.body), content_type=ex.content_type)
        t = time.perf_counter()
        try:
            decision = authorize(facts, state, time.time())
        except ProxyError as err:
            plane.metrics.decision_duration.observe(time.perf_counter() - t)
            if err.code == "token_unknown_kid" and not ex.retried_kid:
                # the issuer may have rotated its keys: one shared, rate-limited refresh, then
                # decide again; the event loop keeps serving meanwhile
                fut = plane.refresh_issuer_keys(getattr(err, "issuer", None))
                if fut is not None:
                    ex.retried_kid = True
                    fut.add_done_callback(lambda _f, ex=ex: self._retry(ex))
                    return
            self.respond_error(ex, err)
            return
        except Exception as exc:  # a bug must fail closed, never let the request through
            log.exception("authorize raised %r", exc)
            self.respond_error(ex, InternalError("internal_error", f"authorize raised {exc!r}"))
            return
        plane.metrics.decision_duration.observe(time.perf_counter() - t)
        ex.decision = decision
        if not decision.allowed:
            self.respond_error(ex, deny_error(decision))
            return
        up = plane.upstream.acquire()
        if up is None:
            self.connect_upstream(ex)
        else:
            self._forward(ex, up)

    def _retry(self, ex: Exchange) -> None:
        if not ex.finished and not self.closed and self.active is ex:
            self._start(ex)

    def resume_after_sink(self) -> None:
        self.resume("audit")
        if not self.closed:
            self._start_next()

    def connect_upstream(self, ex: Exchange) -> None:
        task = self.plane.loop.create_task(self._connect(ex))
        task.add_done_callback(_log_task_error)

    async def _connect(self, ex: Exchange) -> None:
        try:
            up = await self.plane.upstream.connect()
        except ProxyError as err:
            if not ex.finished:
                self.respond_error(ex, err)
            return
        if ex.finished or self.closed:
            self.plane.upstream.release(up)
            return
        self._forward(ex, up)

    def _forward(self, ex: Exchange, up: UpstreamConnection) -> None:
        d = ex.decision
        extra = d.obligations.headers + (
            (self.plane.cfg.headers.request_id, ex.request_id),
            (self.plane.decision_id_header, ex.decision_id),
        )
        if ex.body_mode == "chunked":
            framing = b"transfer-encoding: chunked\r\n"
        elif ex.body_mode == "length":
            framing = b"content-length: %d\r\n" % ex.content_length
        else:
            framing = b""
        lines, has_host = forward_filter(ex.headers, ex.lnames, self.plane.drop_headers,
                                         ex.conn_tokens)
        head = request_head(ex.method, d.target.request_target, lines, has_host, extra,
                            framing, self.plane.upstream.authority)
        ex.upstream = up
        up.begin(ex, head, head_request=ex.head_request)
        if self.write_paused:
            up.pause_reading()  # the client is not reading: do not read its response either
        if ex.body:
            chunks, ex.body = ex.body, []
            for c in chunks:
                up.send(b"%x\r\n%b\r\n" % (len(c), c) if ex.body_mode == "chunked" else c)
            self.resume("pending_body")
        if ex.body_done:
            if ex.body_mode == "chunked":
                up.send(b"0\r\n\r\n")
            up.request_sent()
            ex.t_sent = time.perf_counter()

    def respond_error(self, ex: Exchange, err: ProxyError) -> None:
        if ex.finished:
            return
        if ex.upstream is not None:
            ex.upstream.abort()
            ex.upstream = None
        ex.error = err
        if not ex.body_done:
            # the rest of the request body is read and dropped (bounded), then the connection closes
            ex.discard = True
            self.close_after = True
            self.resume("pending_body")
        close = self.must_close(ex)
        if close:
            self.close_after = True
        ex.status = err.status
        self.write(render_error(err, decision_id=ex.decision_id, close=close,
                                head_only=ex.head_request))
        ex.finish()

    def must_close(self, ex: Exchange) -> bool:
        # ex.keep_alive is False for HTTP/1.0, `Connection: close`, Upgrade and malformed requests
        return self.close_after or not ex.keep_alive or self.plane.draining

    def exchange_finished(self, ex: Exchange) -> None:
        if self.active is ex:
            self.active = None
        if self.closed:
            return
        if self.close_after:
            if ex.discard and not ex.body_done and not self.broken:
                # lingering close: keep reading (and dropping) the body a little while (when the
                # parser no longer runs, the TLS shutdown drops what still arrives)
                self.deadline = self.plane.loop.time() + _LINGER_S
                self.queue.clear()
                return
            self.close()
            return
        if self.queue:
            self._start_next()
        elif self.parsing is None:
            self.deadline = self.plane.loop.time() + self.plane.cfg.listener.idle_timeout_s
        else:  # the next request head is partly here: it has header_timeout_s from now
            self.deadline = self.plane.loop.time() + self.plane.cfg.listener.header_timeout_s

    def _parse_failed(self, err: ProxyError) -> None:
        """Malformed input: answered in its turn (earlier pipelined requests first), then close."""
        if self.broken:
            return  # bytes after the last request (llhttp refuses them): never a request
        self.broken = True  # from here on, data_received reads and drops (lingering close)
        ex = self.parsing
        self.parsing = None
        if ex is None:
            ex = Exchange(self)
        ex.keep_alive = False
        if ex.finished:
            # the body of a request answered early turned out malformed: stop lingering
            self.close_after = True
            if self.active is None:
                self.close()
            return
        if ex is self.active:
            # the body of the active exchange was malformed: the upstream never gets the rest
            if ex.status:
                ex.error = err
                ex.outcome = "client_malformed"
                self.abort("client_malformed")
                ex.finish()
            else:
                self.respond_error(ex, err)
            return
        ex.error = err
        ex.body_done = True
        if ex not in self.queue:
            self.queue.append(ex)
        if self.active is None:
            self._start_next()
        else:
            self.pause("broken")  # answered in its turn; until then, stop reading

    # -- transport helpers -----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        batch = self.batch
        if batch.depth:  # inside a data_received: one write per connection at the end
            out = self._out
            if out is None:
                self._out = [data]
                batch.dirty.append(self)
            else:
                out.append(data)
            return
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def workload_record(self, peer) -> dict:
        """The audit record's `workload` member, built once per verified peer identity."""
        rec = self._wrec
        if rec is None or self._wrec_peer is not peer:
            rec = self._wrec = {"spiffe_id": peer.uri, "cert_sha256": peer.cert_sha256_hex}
            self._wrec_peer = peer
        return rec

    def flush_out(self) -> None:
        out, self._out = self._out, None
        t = self.transport
        if out and t is not None and not t.is_closing():
            t.write(out[0] if len(out) == 1 else b"".join(out))

    def pause(self, reason: str) -> None:
        if not self.paused:
            t = self.transport
            if t is not None and not t.is_closing():
                t.pause_reading()
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused:
                t = self.transport
                if t is not None and not t.is_closing():
                    t.resume_reading()

    def drain(self) -> None:
        self.close_after = True
        if self.active is None and not self.queue and self.parsing is None:
            self.close()

    def close(self) -> None:
        if self._out:
            self.flush_out()
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def abort(self, why: str) -> None:
        """Reset the connection: a TCP RST, no TLS close_notify (clients such as curl take a bare
        FIN after a close-delimited body for its end); nothing more is started on it."""
        self.closed = True
        self._out = None
        t = self.transport
        if t is not None:
            sock = t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
                except OSError:
                    pass
            t.abort()

    def on_deadline(self) -> None:
        self.deadline = INF
        act = self.active
        if act is not None:
            if not act.body_done and not act.finished:
                err = RequestTimeout("body_timeout", "request body stalled")
                if act.status:
                    act.error = err
                    act.outcome = "client_timeout"
                    self.abort("body_timeout")
                    act.finish()
                else:
                    self.broken = True  # the client stalled: no lingering for the rest
                    self.respond_error(act, err)
            return
        ex = self.parsing
        if self.active is None and not self.queue and ex is not None and not ex.headers_done:
            # slow request head: answer 408 and close
            self.parsing = None
            self.broken = True
            self.close_after = True
            err = RequestTimeout("request_timeout", "request head not received in time")
            ex.error = err
            ex.status = err.status
            ex.body_done = True
            ex.started = True
            self.active = ex
            self.write(render_error(err, decision_id=ex.decision_id, close=True))
            ex.finish()
            return
        self.close()


def _log_task_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("upstream task failed", exc_info=task.exception())
