"""The data plane's own Python cost per exchange, without sockets, TLS or other processes.

    .venv/bin/python bench/bench_exchange.py [--exchanges 20000] [--rounds 5]
    .venv/bin/python bench/bench_exchange.py --instructions [--exchanges 2000]   # needs valgrind
    .venv/bin/python bench/bench_exchange.py --dpop     # the full pipeline (run.py's portcullis-dpop)

A real worker (`runtime.server.Worker` with the configuration `run.py` gives Portcullis: the
same PKI layout, 3-rule policy, audit sink writing to /dev/null) runs on uvloop. One client
connection is driven through an in-memory transport carrying the load generator's certificate
chain (so the SVID checks run exactly as over TLS), and its upstream is an in-memory connection
that answers each request with the bench upstream's response (200, 13-byte body) one loop
iteration later. Each exchange: request bytes -> listener -> pipeline -> policy -> forward ->
response -> audit record -> metrics, in the real code.

What this measures is the part no proxy can share with another: the Python work per request.
`run.py` measures the whole (TLS, syscalls, the kernel); this isolates what our code costs, with
less noise, so a change to the hot path can be judged in one run. Prints microseconds per
exchange (median of rounds). `--instructions` re-runs itself under valgrind's callgrind with
instrumentation off, switches it on (callgrind_control) only around the measured exchanges, and
prints instructions per exchange: a count that does not depend on the machine's load, so two
versions of the hot path can be compared exactly (startup, imports and warm-up are not counted).
`--profile N`: cProfile over the exchanges, the top N functions by own time (cProfile adds its
own cost per call, so it ranks functions; it does not time them).
`--dpop`: the configuration of `run.py`'s full-pipeline target (a DPoP-bound access token,
verified once and then cached, and a fresh ES256 proof per request, minted before the run).
A script: no asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from proxy.config import load_config  # noqa: E402
from proxy.dev.transports import PresentedChain  # noqa: E402
from proxy.runtime.server import Worker  # noqa: E402
from proxy.runtime.upstream import UpstreamConnection  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\n"
            b"hello, world\n")


class MemoryTransport(asyncio.Transport):
    """A transport that keeps what is written; `on_write` sees each write."""

    def __init__(self, extra: dict, on_write) -> None:
        super().__init__()
        self._extra = extra
        self.on_write = on_write
        self.closing = False

    def get_extra_info(self, name, default=None):
        return self._extra.get(name, default)

    def write(self, data) -> None:
        self.on_write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Bench:
    def __init__(self, worker: Worker, chain: list[bytes], requests=None) -> None:
        self.requests = requests  # an iterator of request bytes (DPoP: one proof each), or None
        self.worker = worker
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future | None = None
        self.received = 0
        plane = worker.plane
        # the upstream side: one pooled keep-alive connection answering from memory
        self.up = UpstreamConnection(plane.upstream)
        self.up.connection_made(MemoryTransport({}, self._upstream_got))
        plane.upstream.idle.append(self.up)
        # the client side
        self.client = plane.factory()
        self.client.connection_made(MemoryTransport(
            {"ssl_object": PresentedChain(chain), "peername": ("127.0.0.1", 40000)},
            self._client_got))

    def _upstream_got(self, data) -> None:
        if bytes(data).endswith(b"\r\n\r\n"):  # a whole request head (GET, no body)
            self.loop.call_soon(self.up.data_received, RESPONSE)

    def _client_got(self, data) -> None:
        self.received += len(data)
        if bytes(data).endswith(b"hello, world\n") and self.done is not None:
            self.done.set_result(None)

    async def exchanges(self, n: int) -> None:
        loop, client, requests = self.loop, self.client, self.requests
        for _ in range(n):
            self.done = loop.create_future()
            client.data_received(REQUEST if requests is None else next(requests))
            await self.done


async def main_async(args) -> None:
    d = Path(tempfile.mkdtemp(prefix="portcullis-exchange-"))
    pki = common.make_pki(d / "pki")
    port = common.free_port()
    creds = requests = None
    if args.dpop:
        from dpop_load import Credentials
        creds = Credentials(d)
    cfg_path = common.portcullis_config(pki, 1, port, common.free_port(), d / "sidecar.yaml",
                                        dpop_jwks=creds.jwks_path if creds else None)
    if creds is not None:
        total = 200 + (args.exchanges * (1 if args.under_callgrind else args.rounds))
        proofs = creds.proofs(f"https://{common.HOST}:{port}/", total, d / "proofs.txt")
        requests = iter([(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Authorization: DPoP {creds.token}\r\nDPoP: {line.strip()}\r\n\r\n"
                          ).encode() for line in proofs.read_text().splitlines()])
    cfg = load_config(cfg_path, env={})
    worker = Worker(cfg, audit_fd=os.open(os.devnull, os.O_WRONLY))
    worker.load()
    task = asyncio.get_running_loop().create_task(
        worker.run(admin=False, install_signals=False))
    while worker.plane is None:
        await asyncio.sleep(0.01)
    pem = Path(pki.client_cert).read_bytes()
    chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]
    b = Bench(worker, chain, requests)
    await b.exchanges(200)  # warm-up: caches, peer verification memo
    if b.received == 0:
        raise SystemExit("no response came back: the harness is broken")
    if args.under_callgrind:
        ctl = ["callgrind_control", "-i"]
        subprocess.run(ctl + ["on", str(os.getpid())], check=True, capture_output=True)
        await b.exchanges(args.exchanges)
        subprocess.run(ctl + ["off", str(os.getpid())], check=True, capture_output=True)
    elif args.profile:
        prof = cProfile.Profile()
        prof.enable()
        await b.exchanges(args.exchanges)
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(args.profile)
    else:
        per: list[float] = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            await b.exchanges(args.exchanges)
            per.append((time.perf_counter() - t0) / args.exchanges * 1e6)
        print(f"{args.exchanges} exchanges x {args.rounds} rounds: "
              f"{statistics.median(per):.1f} us per exchange (median; rounds: "
              f"{', '.join(f'{x:.1f}' for x in per)})")
    b.client.transport.closing = True
    b.client.connection_lost(None)
    worker.stop()
    await asyncio.wait_for(task, 15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exchanges", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per exchange with callgrind (valgrind)")
    ap.add_argument("--dpop", action="store_true",
                    help="full pipeline: DPoP-bound token + a fresh ES256 proof per request")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="cProfile the exchanges, print the top N functions by own time")
    ap.add_argument("--under-callgrind", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.instructions:
        return count_instructions(args.exchanges, ["--dpop"] if args.dpop else [])
    uvloop.run(main_async(args))
    return 0


def count_instructions(n: int, extra: list[str]) -> int:
    """Run this script under callgrind (instrumentation only around the exchanges) and print
    instructions per exchange."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is required (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={out}", sys.executable, __file__,
                        "--under-callgrind", "--exchanges", str(n), "--rounds", "1", *extra],
                       check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": "0"})  # the same dict layouts each run
        total = 0
        for line in out.read_text().splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                total = int(line.split()[1])
        print(f"{n} exchanges: {total / n:,.0f} instructions per exchange (callgrind Ir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
