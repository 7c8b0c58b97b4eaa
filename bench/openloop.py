"""Open-loop (fixed-rate) HTTP/1.1 load client on uvloop, with optional mTLS.

Usage (normally started by bench/latency.py or bench/run.py, pinned to the load-generator core):
  python bench/openloop.py --port N [--tls --cert C --key K --ca CA] --rate 1000 --duration 5
                           [--warmup 1] [--connections 32] [--path /]
                           [--dpop-token TOKEN --dpop-proofs FILE]
Prints one JSON object on stdout.

With --dpop-token/--dpop-proofs (the full-pipeline target `portcullis-dpop`) every request
carries `Authorization: DPoP <token>` and its own proof from FILE (one per line, minted before the
run by bench/dpop_load.py): the requests are built before the run, so the client's cost per
request stays that of a static request. Running out of proofs is an error (exit 2), never a silent
replay.

Request i is *scheduled* at t0 + i/rate, whatever happened to earlier requests (open loop). It is
sent on an idle keep-alive connection from a fixed pool; when none is idle it waits in a queue.
Latency is measured from the scheduled time to the last byte of the response, so a stall shows up
in every request it delays (no coordinated omission). Also reported: service time (actual send to
last byte) and the client's own dispatch lag (actual send - scheduled; the sender wakes on a
timerfd armed at each scheduled time, so the lag is normally tens of microseconds; it is part of
"latency" for every target alike).
Only requests scheduled after the warm-up are recorded. Clock: time.perf_counter_ns.
"""

from __future__ import annotations

import argparse
import os
import asyncio
import json
import ssl
import sys
import time
from collections import deque

import httptools

NS = 1_000_000_000


class Ticker:
    """Wake the event loop at absolute CLOCK_MONOTONIC times (ns) with a timerfd.

    uvloop's timers have 1 ms resolution; a timerfd armed with TFD_TIMER_ABSTIME (and a 1 ns timer
    slack for this process) wakes epoll within tens of microseconds of the scheduled time, so the
    client's dispatch lag stays far below the latencies it measures. time.perf_counter_ns() reads
    the same clock (CLOCK_MONOTONIC on Linux).
    """

    def __init__(self) -> None:
        import ctypes
        import os

        self._os = os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK = 1 ns
        self._libc = libc
        self.fd = libc.timerfd_create(1, 0o4000 | 0o2000000)  # CLOCK_MONOTONIC, NONBLOCK|CLOEXEC
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        class Itimerspec(ctypes.Structure):
            _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

        self._spec = Itimerspec()
        self._ctypes = ctypes

    def arm(self, at_ns: int) -> None:
        at_ns = max(at_ns, 1)
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(at_ns, NS)
        if self._libc.timerfd_settime(self.fd, 1, self._ctypes.byref(self._spec), None) != 0:
            raise OSError(self._ctypes.get_errno(), "timerfd_settime")  # 1 = TFD_TIMER_ABSTIME

    def clear(self) -> None:
        try:
            self._os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._os.close(self.fd)


class Conn(asyncio.Protocol):
    def __init__(self, client: "Client") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sched = 0
        self.sent = 0
        self.busy = False
        self.dead = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.client.errors += 1
            self.transport.abort()

    def on_message_complete(self) -> None:
        now = time.perf_counter_ns()
        self.busy = False
        self.client.complete(self, now, self.parser.get_status_code(), self.parser.should_keep_alive())

    def connection_lost(self, exc) -> None:
        self.dead = True
        if self.busy:
            self.busy = False
            self.client.errors += 1
            self.client.outstanding -= 1
        self.client.lost(self)

    def send(self, sched: int) -> None:
        self.busy = True
        self.sched = sched
        self.sent = time.perf_counter_ns()
        self.transport.write(self.client.next_request())


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.request = (f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
                        f"User-Agent: portcullis-bench-openloop\r\n\r\n").encode()
        self.requests: list[bytes] | None = None
        self.next_index = 0
        if args.dpop_proofs:
            with open(args.dpop_proofs) as f:
                self.requests = [
                    (f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
                     f"User-Agent: portcullis-bench-openloop\r\n"
                     f"Authorization: DPoP {args.dpop_token}\r\nDPoP: {line.strip()}\r\n\r\n").encode()
                    for line in f if line.strip()]
        self.idle: deque[Conn] = deque()
        self.queue: deque[int] = deque()
        self.record_from = 0
        self.latency: list[int] = []
        self.service: list[int] = []
        self.lag: list[int] = []
        self.status: dict[int, int] = {}
        self.errors = 0
        self.outstanding = 0
        self.conns_lost = 0
        self.max_queue = 0

    def next_request(self) -> bytes:
        if self.requests is None:
            return self.request
        i = self.next_index
        if i >= len(self.requests):
            print("openloop: out of DPoP proofs (each proof may be used once)", file=sys.stderr,
                  flush=True)
            os._exit(2)  # from inside a protocol callback: the loop would only log an exception
        self.next_index = i + 1
        return self.requests[i]

    def dispatch(self, sched: int) -> None:
        self.outstanding += 1
        while self.idle:
            c = self.idle.popleft()
            if not c.dead:
                c.send(sched)
                return
        self.queue.append(sched)
        self.max_queue = max(self.max_queue, len(self.queue))

    def complete(self, c: Conn, now: int, status: int, keep_alive: bool) -> None:
        self.outstanding -= 1
        if c.sched >= self.record_from:
            self.latency.append(now - c.sched)
            self.service.append(now - c.sent)
            self.lag.append(c.sent - c.sched)
            self.status[status] = self.status.get(status, 0) + 1
        if not keep_alive:
            c.transport.close()
            return
        if self.queue:
            c.send(self.queue.popleft())
        else:
            self.idle.append(c)

    def lost(self, c: Conn) -> None:
        self.conns_lost += 1

    async def connect(self, loop, ctx) -> Conn:
        _, proto = await loop.create_connection(lambda: Conn(self), "127.0.0.1", self.args.port,
                                                ssl=ctx, server_hostname="" if ctx else None)
        return proto

    async def run(self) -> dict:
        a = self.args
        loop = asyncio.get_running_loop()
        ctx = None
        if a.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(a.ca)
            ctx.load_cert_chain(a.cert, a.key)
        conns = await asyncio.gather(*(self.connect(loop, ctx) for _ in range(a.connections)))
        self.idle.extend(conns)
        period = NS / a.rate
        t0 = time.perf_counter_ns() + 20_000_000
        self.record_from = t0 + int(a.warmup * NS)
        end = self.record_from + int(a.duration * NS)
        i = 0
        try:
            ticker: Ticker | None = Ticker()
        except (OSError, AttributeError):
            ticker = None  # no timerfd: fall back to uvloop's 1 ms timers (more dispatch lag)
        tick = asyncio.Event()
        if ticker is not None:
            loop.add_reader(ticker.fd, tick.set)
        while True:
            now = time.perf_counter_ns()
            nxt = t0 + int(i * period)
            while nxt <= now and nxt < end:
                self.dispatch(nxt)
                i += 1
                nxt = t0 + int(i * period)
            if nxt >= end:
                break
            if ticker is not None:
                ticker.arm(nxt)
                await tick.wait()
                tick.clear()
                ticker.clear()
            else:  # uvloop rounds timers to whole milliseconds: ask for >= 1 ms (no spin)
                await asyncio.sleep(max((nxt - time.perf_counter_ns()) / NS, 0.0006))
        if ticker is not None:
            loop.remove_reader(ticker.fd)
            ticker.close()
        scheduled = sum(1 for k in range(i) if t0 + int(k * period) >= self.record_from)
        deadline = time.perf_counter_ns() + 5 * NS
        while (self.outstanding > 0) and time.perf_counter_ns() < deadline:
            await asyncio.sleep(0.005)
        for c in conns:
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0.05)
        return self.report(scheduled)

    def report(self, scheduled: int) -> dict:
        def pct(vals: list[int]) -> dict:
            vals = sorted(vals)
            out = {}
            for q in (50, 90, 99, 99.9):
                if vals:
                    k = max(0, min(len(vals) - 1, int(-(-q * len(vals) // 100)) - 1))
                    out[f"p{q:g}"] = vals[k] / 1000
                else:
                    out[f"p{q:g}"] = None
            out["max"] = vals[-1] / 1000 if vals else None
            out["mean"] = sum(vals) / len(vals) / 1000 if vals else None
            return out

        ok = self.status.get(200, 0)
        return {
            "rate": self.args.rate, "duration_s": self.args.duration,
            "connections": self.args.connections, "scheduled": scheduled,
            "completed": len(self.latency), "status": {str(k): v for k, v in self.status.items()},
            "non_200": len(self.latency) - ok, "errors": self.errors,
            "unfinished": self.outstanding, "connections_lost": self.conns_lost,
            "max_queue": self.max_queue,
            "latency_us": pct(self.latency), "service_us": pct(self.service),
            "client_lag_us": pct(self.lag),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--ca")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--dpop-token", help="access token sent with the DPoP scheme")
    ap.add_argument("--dpop-proofs", help="file of DPoP proofs, one per request")
    args = ap.parse_args()
    import uvloop

    result = uvloop.run(Client(args).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
