"""The benchmark's upstream: a tiny uvloop `asyncio.Protocol` HTTP/1.1 server on 127.0.0.1.

Usage: python bench/upstream.py --port N [--body-bytes 13]

Every request gets `200` with a small fixed body (content-length, keep-alive). It is built to be
much cheaper per request than any proxy in front of it, so that it is never the bottleneck:
the request head is found by searching for CRLFCRLF (no full parse), a Content-Length request
body is skipped, pipelined requests are answered in one write. It answers `connection: close`
(and closes) for a request that carries `connection: close` or uses `Transfer-Encoding` (chunked
request bodies are not supported: the benchmark never sends them). It counts requests and prints
the count on SIGTERM/SIGINT to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys

_CL = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\n(?:connection:[ \t]*close|transfer-encoding:)", re.IGNORECASE)

REQUESTS = 0


def make_response(body: bytes, close: bool = False) -> bytes:
    conn = b"close" if close else b"keep-alive"
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: " + conn + b"\r\n\r\n" + body)


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "buf", "skip", "ok", "bye")

    def __init__(self, ok: bytes, bye: bytes) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.skip = 0  # request body bytes still to discard
        self.ok, self.bye = ok, bye

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        global REQUESTS
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
            if not data:
                return
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            head = buf[pos:end + 2]
            pos = end + 4
            REQUESTS += 1
            if _CLOSE.search(head):
                out.append(self.bye)
                self.transport.write(b"".join(out))
                self.transport.close()
                self.buf = b""
                return
            out.append(self.ok)
            m = _CL.search(head)
            if m:
                n = int(m.group(1))
                avail = len(buf) - pos
                if n > avail:
                    self.skip = n - avail
                    pos = len(buf)
                    break
                pos += n
        self.buf = buf[pos:] if pos < len(buf) else b""
        if len(self.buf) > 65536:  # a head that never ends: not our benchmark
            self.transport.close()
            return
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


async def serve(port: int, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    ok, bye = make_response(body), make_response(body, close=True)
    server = await loop.create_server(lambda: Conn(ok, bye), "127.0.0.1", port, backlog=4096,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}",
          file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    print(f"upstream: {REQUESTS} requests", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--body-bytes", type=int, default=13)
    args = ap.parse_args()
    body = (b"hello, world\n" * (args.body_bytes // 13 + 1))[:args.body_bytes]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the venv has it
        asyncio.run(serve(args.port, body))
    else:
        uvloop.run(serve(args.port, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
