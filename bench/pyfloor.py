"""The Python floor: the cheapest honest uvloop + httptools mTLS forwarder, with NO checks.

Usage: python bench/pyfloor.py --port N --upstream-port M --cert C --key K --ca BUNDLE

It terminates mTLS (client certificate required, verified by OpenSSL against BUNDLE), parses each
request with httptools, forwards it over a pooled keep-alive upstream connection and relays the
response (content-length bodies only; head and body in one write). No SVID rules, no policy, no
audit, no metrics, no header rewriting: it measures what the runtime itself costs, so the bench can
show how much of Portcullis's CPU per request is the checks and how much is Python + TLS.
Never used in production; the benchmark's upstream answers small content-length bodies only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl

import httptools
import uvloop


class Up(asyncio.Protocol):
    def __init__(self, pool: list) -> None:
        self.pool = pool
        self.t = None
        self.client = None
        self.p = httptools.HttpResponseParser(self)
        self.buf: list[bytes] = []

    def connection_made(self, t):
        self.t = t

    def data_received(self, d):
        self.buf.append(d)
        self.p.feed_data(d)

    def on_message_complete(self):
        c, self.client = self.client, None
        out, self.buf = b"".join(self.buf), []
        self.pool.append(self)
        c.t.write(out)


class Client(asyncio.Protocol):
    def __init__(self, srv) -> None:
        self.srv = srv
        self.t = None
        self.p = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []

    def connection_made(self, t):
        self.t = t

    def data_received(self, d):
        self.p.feed_data(d)

    def on_url(self, u):
        self.url = u

    def on_header(self, n, v):
        self.headers.append(n + b": " + v + b"\r\n")

    def on_message_complete(self):
        head = (self.p.get_method() + b" " + self.url + b" HTTP/1.1\r\n"
                + b"".join(self.headers) + b"\r\n")
        self.headers = []
        pool = self.srv.pool
        if pool:
            up = pool.pop()
            up.client = self
            up.t.write(head)
        else:
            asyncio.get_running_loop().create_task(self.srv.connect(self, head))


class Server:
    def __init__(self, port: int) -> None:
        self.pool: list[Up] = []
        self.port = port

    async def connect(self, client, head):
        loop = asyncio.get_running_loop()
        _t, up = await loop.create_connection(lambda: Up(self.pool), "127.0.0.1", self.port)
        up.client = client
        up.t.write(head)


async def main(args) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    srv = Server(args.upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(srv), "127.0.0.1", args.port, ssl=ctx)
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    for a in ("--port", "--upstream-port"):
        ap.add_argument(a, type=int, required=True)
    for a in ("--cert", "--key", "--ca"):
        ap.add_argument(a, required=True)
    uvloop.run(main(ap.parse_args()))
