"""A real, programmable HTTP/1.1 upstream on 127.0.0.1 for the integration tests.

It parses requests with httptools, records exactly what it received (method, target, headers as
sent, body bytes) and answers according to the path:
  /chunked          chunked response body ("hello ", "chunked ", "world")
  /close            close-delimited body (no content-length), then closes
  /slow?ms=N        waits N ms, then the default answer
  /hang             never answers
  /reset-mid        sends the head and half a body, then resets the connection
  /close-reset      a close-delimited body cut by a TCP RST (SO_LINGER 0) instead of a FIN
  /garbage          answers bytes that are not HTTP
  /status/N         status N with a small body (none for 204/304)
  /big?n=N          N bytes of body with content-length
  /keepalive-close  answers with `connection: close` and closes
  anything else     200 JSON echo of what was received (with the body's length and SHA-256)
A request with `Expect: 100-continue` gets `100 Continue` first.

Programmable from a test:
  srv.raw[path] = bytes      write exactly these bytes as the answer (then keep the connection)
  srv.raw_close[path] = bytes  the same, then close the connection
  srv.close_reused = True    a request arriving on a connection that already answered one is
                             dropped: the connection is closed without an answer (a keep-alive
                             connection the upstream gave up on while the sidecar held it idle)
Every request is recorded in `received` (with its connection's `conn_id`) when complete; requests
that were dropped unanswered are counted in `dropped`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httptools


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    conn_id: int = 0

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class UpstreamServer:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    server: asyncio.AbstractServer | None = None
    open_transports: set = field(default_factory=set)
    raw: dict[str, bytes] = field(default_factory=dict)
    raw_close: dict[str, bytes] = field(default_factory=dict)
    close_reused: bool = False
    dropped: int = 0

    async def start(self) -> "UpstreamServer":
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self.open_transports):
                t.abort()
            await asyncio.sleep(0)


class _Conn(asyncio.Protocol):
    def __init__(self, srv: UpstreamServer) -> None:
        self.srv = srv
        srv.connections += 1
        self.conn_id = srv.connections
        self.parser = httptools.HttpRequestParser(self)
        self.cur: Received | None = None
        self.url = b""
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.answered = 0
        self.task = asyncio.get_running_loop().create_task(self._respond_loop())

    def connection_made(self, transport):
        self.transport = transport
        self.srv.open_transports.add(transport)

    def connection_lost(self, exc):
        self.srv.open_transports.discard(self.transport)
        self.task.cancel()

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self):
        self.url = b""
        self.cur = Received("", "", [], b"", self.conn_id)

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        if self.cur is not None and not self.cur.method:
            self.cur.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        self.cur.method = self.parser.get_method().decode()
        self.cur.target = self.url.decode("latin-1")
        if any(n.lower() == "expect" and v.lower() == "100-continue" for n, v in self.cur.headers):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body):
        self.cur.body += body

    def on_message_complete(self):
        if self.srv.close_reused and self.answered:
            self.srv.dropped += 1
            self.transport.close()
            return
        self.answered += 1
        self.srv.received.append(self.cur)
        self.queue.put_nowait(self.cur)

    async def _respond_loop(self):
        while True:
            req = await self.queue.get()
            await self._respond(req)

    async def _respond(self, req: Received) -> None:
        t = self.transport
        u = urlsplit(req.target)
        q = parse_qs(u.query)
        path = u.path
        head_only = req.method == "HEAD"
        if path in self.srv.raw:
            t.write(self.srv.raw[path])
            return
        if path in self.srv.raw_close:
            t.write(self.srv.raw_close[path])
            t.close()
            return
        if path == "/hang":
            await asyncio.sleep(3600)
        if path.startswith("/slow"):
            await asyncio.sleep(int(q.get("ms", ["100"])[0]) / 1000)
        if path == "/garbage":
            t.write(b"this is not http\r\n\r\n")
            t.close()
            return
        if path == "/reset-mid":
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 40)
            await asyncio.sleep(0.05)
            t.abort()
            return
        if path == "/close-reset":
            t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nthe first half")
            await asyncio.sleep(0.05)
            sock = t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.abort()
            return
        if path == "/chunked":
            t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-upstream: chunked\r\n\r\n")
            if not head_only:
                for part in (b"hello ", b"chunked ", b"world"):
                    t.write(b"%x\r\n%b\r\n" % (len(part), part))
                    await asyncio.sleep(0.01)
                t.write(b"0\r\n\r\n")
            return
        if path == "/close":
            t.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nclose-delimited body")
            t.close()
            return
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            if status in (204, 304):
                t.write(b"HTTP/1.1 %d X\r\netag: \"v1\"\r\n\r\n" % status)
            else:
                body = b'{"status": %d}' % status
                t.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
                        + (b"" if head_only else body))
            return
        if path == "/big":
            n = int(q.get("n", ["1000000"])[0])
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % n)
            if not head_only:
                chunk = b"b" * 65536
                sent = 0
                while sent < n:
                    part = chunk[: min(len(chunk), n - sent)]
                    t.write(part)
                    sent += len(part)
                    await asyncio.sleep(0)
            return
        body = json.dumps({"method": req.method, "target": req.target, "headers": req.headers,
                           "body_len": len(req.body),
                           "body_sha256": hashlib.sha256(req.body).hexdigest(),
                           "conn_id": req.conn_id}).encode()
        extra = b""
        if path == "/keepalive-close":
            extra = b"connection: close\r\n"
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"keep-alive: timeout=5\r\nx-hop: secret\r\nconnection: x-hop\r\n%b\r\n"
                % (len(body), extra) + (b"" if head_only else body))
        if path == "/keepalive-close":
            t.close()
