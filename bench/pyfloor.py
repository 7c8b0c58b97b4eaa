"""The Python floor: the cheapest honest uvloop + httptools mTLS forwarder, with NO checks.

Usage: python bench/pyfloor.py --port N --upstream-port M --cert C --key K --ca BUNDLE
                               [--checks SIDECAR_CONFIG]

It terminates mTLS (client certificate required, verified by OpenSSL against BUNDLE), parses each
request with httptools, forwards it over a pooled keep-alive upstream connection and relays the
response (content-length bodies only; head and body in one write). No SVID rules, no policy, no
audit, no metrics, no header rewriting: it measures what the runtime itself costs, so the bench can
show how much of Portcullis's CPU per request is the checks and how much is Python + TLS.
Never used in production; the benchmark's upstream answers small content-length bodies only.

`--checks SIDECAR_CONFIG` (the `pyfloor-checks` target): the same framing, plus Portcullis's own
per-request work, called exactly as the sidecar calls it: the peer chain of each connection
verified once (`runtime.listener.PeerChains`), `core.pipeline.authorize` on every request (SVID
rules, path canonicalisation, policy, obligations; the State of a real `Worker` loaded from the
sidecar's configuration), the canonical target and identity headers forwarded, an audit record of
the same fields sealed into the hash chain (`AuditChain.seal_owned`) and written in batches, and
the three per-request metrics. What it still leaves out is the HTTP hygiene and structure of the
real data plane (framing checks, header filtering, pipelining, flow control, timeouts, retries,
error paths). So in one run: Portcullis minus pyfloor-checks is what that hygiene and structure
cost, and pyfloor-checks is the floor for any Python data plane doing these checks (issue 3).
With a configuration that has token issuers (the `pyfloor-dpop` target, run.py's full-pipeline
configuration), the `Authorization` and `DPoP` headers go to `authorize` too (and are not
forwarded, as in Portcullis): the access token from the cache, the DPoP proof verified with its
signature and recorded in the replay store, the binding checked; the record gets the token fields
Portcullis's record has. That is the floor for goal 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import time

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

    def connection_lost(self, exc):
        # closed by the upstream while pooled (e.g. after a `Connection: close` request): never
        # hand it out again
        if self in self.pool:
            self.pool.remove(self)

    def data_received(self, d):
        self.buf.append(d)
        self.p.feed_data(d)

    def on_message_complete(self):
        c, self.client = self.client, None
        out, self.buf = b"".join(self.buf), []
        self.pool.append(self)
        c.t.write(out)
        if c.checks is not None:
            c.checks.done(c, self.p.get_status_code())


class Client(asyncio.Protocol):
    def __init__(self, srv) -> None:
        self.srv = srv
        self.checks = srv.checks
        self.t = None
        self.p = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.peer = None
        self.ex = None
        self.auth: tuple[str, ...] = ()
        self.dpop: tuple[str, ...] = ()

    def connection_made(self, t):
        self.t = t
        if self.checks is not None:
            self.checks.connected(self, t)

    def data_received(self, d):
        self.p.feed_data(d)

    def on_url(self, u):
        self.url = u

    def on_header(self, n, v):
        if self.checks is not None and self.checks.credentials:
            ln = n.lower()
            if ln == b"authorization":
                self.auth += (v.decode("latin-1"),)
                return
            if ln == b"dpop":
                self.dpop += (v.decode("latin-1"),)
                return
        self.headers.append(n + b": " + v + b"\r\n")

    def on_message_complete(self):
        if self.checks is not None:
            head = self.checks.decide(self)
            self.headers = []
            self.auth = self.dpop = ()
            if head is None:
                return  # refused and answered
        else:
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


class Checks:
    """Portcullis's per-request work on pyfloor's framing (module docstring, `--checks`)."""

    def __init__(self, config: str) -> None:
        from proxy.config import load_config
        from proxy.core.audit import AuditChain
        from proxy.core.pipeline import RequestFacts, authorize, deny_error
        from proxy.errors import ProxyError
        from proxy.runtime.listener import PeerChains, _next_decision_id, _Wall, token_fields
        from proxy.runtime.metrics import Metrics
        from proxy.runtime.responses import render_error
        from proxy.runtime.server import Worker
        from proxy.runtime.tls import peer_chain_der

        worker = Worker(load_config(config, env={}))
        worker.load()
        self.state = worker.state
        self.credentials = bool(self.state.tokens.issuers)  # the full pipeline (pyfloor-dpop)
        self.proxy_error, self.token_fields = ProxyError, token_fields
        self.peers = PeerChains()
        self.chain = AuditChain("pyfloor-checks")
        self.metrics = Metrics()
        self.wall = _Wall()
        self.lines: list[bytes] = []
        self.fd = 1
        self.flush_armed = False
        self.facts, self.authorize, self.new_id = RequestFacts, authorize, _next_decision_id
        self.render_error, self.deny_error, self.chain_der = render_error, deny_error, peer_chain_der

    def connected(self, c, t) -> None:
        c.peer = self.peers.get(self.chain_der(t))
        name = t.get_extra_info("peername")
        c.addr = f"{name[0]}:{name[1]}"

    def decide(self, c) -> bytes | None:
        t0 = time.perf_counter()
        method = c.p.get_method().decode("ascii")
        try:
            d = self.authorize(self.facts(method, c.url.decode("latin-1"), c.peer, c.auth, c.dpop),
                               self.state, time.time())
        except self.proxy_error as err:  # a refused token or proof: answered, not forwarded
            self.metrics.decision_duration.observe(time.perf_counter() - t0)
            c.ex = None
            c.t.write(self.render_error(err, decision_id=self.new_id(), close=False))
            return None
        c.ex = (t0, self.new_id(), method, d)
        self.metrics.decision_duration.observe(time.perf_counter() - t0)
        if not d.allowed:
            err = self.deny_error(d)
            c.t.write(self.render_error(err, decision_id=c.ex[1], close=False))
            self.done(c, err.status)
            return None
        extra = "".join(f"{k}: {v}\r\n" for k, v in d.obligations.headers).encode("latin-1")
        return (c.p.get_method() + b" " + d.target.request_target.encode("latin-1")
                + b" HTTP/1.1\r\n" + b"".join(c.headers) + extra + b"\r\n")

    def done(self, c, status: int) -> None:
        t0, did, method, d = c.ex
        c.ex = None
        duration = time.perf_counter() - t0
        m = self.metrics
        m.requests.inc((d.effect, d.code))
        m.request_duration.observe(duration, (d.effect,))
        peer = d.peer
        rec = {
            "type": "decision", "time": self.wall.format(time.time()), "decision_id": did,
            "request_id": did, "client_addr": c.addr,
            "workload": {"spiffe_id": peer.uri, "cert_sha256": peer.cert_sha256_hex},
            "method": method, "path": d.target.path, "decision": d.effect, "code": d.code,
            "rule_id": d.rule_id, "policy_revision": d.revision, "mode": d.mode,
            "would_be": None, "status": status, "upstream_status": status,
            "upstream_duration_us": int(duration * 1e6), "duration_us": int(duration * 1e6),
            "outcome": "complete",
        }
        if d.token is not None:  # the token fields of Portcullis's record, built by its code
            self.token_fields(rec, d, (), ())
            m.token_results.inc(("ok",))
        self.lines.append(self.chain.seal_owned(rec))
        if not self.flush_armed:
            self.flush_armed = True
            asyncio.get_running_loop().call_later(0.002, self.flush)

    def flush(self) -> None:
        self.flush_armed = False
        data, self.lines = b"".join(self.lines), []
        while data:
            data = data[os.write(self.fd, data):]


class Server:
    def __init__(self, port: int, checks: Checks | None = None) -> None:
        self.pool: list[Up] = []
        self.port = port
        self.checks = checks

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
    srv = Server(args.upstream_port, Checks(args.checks) if args.checks else None)
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
    ap.add_argument("--checks", help="a Portcullis sidecar config: add its per-request checks")
    uvloop.run(main(ap.parse_args()))
