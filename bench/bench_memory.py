"""Memory with many open client connections (issue 3, goal 5: at most 80 MB RSS per worker with
1,000 open client connections), with nginx and HAProxy measured in the same run as baselines.

    .venv/bin/python bench/bench_memory.py [--connections 1000]
                                           [--targets portcullis,pyfloor,pyfloor-checks,nginx,haproxy]

For each target (one worker / one thread, the same PKI, upstream and configs as `run.py`): RSS of
the proxy's process tree after a warm-up request (idle), then after `--connections` mTLS
keep-alive connections are each opened, have sent one request and read its response, and are
held open (open), and again after every connection sent a second request (reused). Prints MiB,
KiB per connection and the ratios to the baselines. A script, no asserts: the goal line says
whether 80 MB per worker held in this run.

The floors, measured in the same run: `pyfloor` (bench/pyfloor.py: the bare uvloop + httptools
mTLS forwarder, no checks, imports nothing of Portcullis) is what any Python data plane on this
stack holds before doing any check; `pyfloor-checks` is the same forwarder with Portcullis's
per-request work loaded (its modules, the configuration, policy, audit chain and metrics). If a
floor is over the goal, no data plane built on that stack can meet it. The clients run in this process (uvloop, 1,000 TLS
handshakes take a few seconds); nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL_MIB = 80 * 1000 * 1000 / (1 << 20)  # "80 MB": decimal megabytes, ~76.3 MiB
REQUEST = b"GET /mem HTTP/1.1\r\nHost: bench\r\n\r\n"


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {head[:40]!r}")


async def hold(t: common.Target, pki: common.Pki, n: int) -> dict:
    tls = common.client_ssl_context(pki)
    pids = t.pids()
    warm = await asyncio.open_connection(common.HOST, t.port, ssl=tls)
    await request(*warm)
    warm[1].close()
    await asyncio.sleep(0.5)
    idle = common.rss_mib(pids)
    sem = asyncio.Semaphore(64)  # handshakes in flight at once
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        async with sem:
            r, w = await asyncio.open_connection(common.HOST, t.port, ssl=tls)
            await request(r, w)
            conns.append((r, w))

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    opened_s = time.monotonic() - t0
    await asyncio.sleep(0.5)
    open_rss = common.rss_mib(pids)
    await asyncio.gather(*(request(r, w) for r, w in conns))
    await asyncio.sleep(0.5)
    reused = common.rss_mib(pids)
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.2)
    return {"idle_mib": idle, "open_mib": open_rss, "reused_mib": reused, "open_s": opened_s,
            "kib_per_conn": (max(open_rss, reused) - idle) * 1024 / n, "processes": len(pids)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--targets", default="portcullis,pyfloor,pyfloor-checks,nginx,haproxy")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    common.require_tools()
    proxy_cpu, load_cpu, _ = common.cpu_layout()
    names = [x for x in args.targets.split(",") if x]
    results: dict[str, dict] = {}
    with common.Harness(prefix="portcullis-mem-") as h:
        pki = common.make_pki(h.dir / "pki")
        up = common.start_upstream(h, load_cpu)
        for name in names:
            if name == "portcullis":
                t = common.start_portcullis(h, pki, up.port, proxy_cpu)
            elif name in ("pyfloor", "pyfloor-checks"):
                t = common.start_pyfloor(h, pki, up.port, proxy_cpu, checks=name == "pyfloor-checks")
            elif name == "nginx":
                t = common.start_nginx(h, pki, up.port, proxy_cpu)
            elif name == "haproxy":
                t = common.start_haproxy(h, pki, up.port, proxy_cpu)
            else:
                ap.error(f"unknown target {name}")
            common.log(f"{name}: opening {args.connections} connections")
            results[name] = uvloop.run(hold(t, pki, args.connections))
            if t.proc is not None:
                h.stop(t.proc)
    print(f"\nRSS of each proxy's process tree (one worker / thread), {args.connections} open mTLS "
          f"keep-alive connections, each having made one request (open) and a second (reused):")
    print(f"{'target':15} {'idle MiB':>9} {'open MiB':>9} {'reused MiB':>11} {'KiB/conn':>9} "
          f"{'vs nginx':>9} {'vs haproxy':>11}")
    for name, r in results.items():
        peak = max(r["open_mib"], r["reused_mib"])

        def ratio(base: str) -> str:
            b = results.get(base)
            return f"{peak / max(b['open_mib'], b['reused_mib']):.2f}x" if b and base != name else "-"
        print(f"{name:15} {r['idle_mib']:9.1f} {r['open_mib']:9.1f} {r['reused_mib']:11.1f} "
              f"{r['kib_per_conn']:9.1f} {ratio('nginx'):>9} {ratio('haproxy'):>11}")
    if "portcullis" in results:
        peak = max(results["portcullis"]["open_mib"], results["portcullis"]["reused_mib"])
        verdict = "met" if peak <= GOAL_MIB else "NOT met"
        print(f"\ngoal 5 (<= 80 MB = {GOAL_MIB:.1f} MiB per worker with {args.connections} "
              f"connections): {verdict} ({peak:.1f} MiB)")
    for floor in ("pyfloor", "pyfloor-checks"):
        if floor in results:
            r = results[floor]
            fpeak = max(r["open_mib"], r["reused_mib"])
            print(f"  floor {floor}: {fpeak:.1f} MiB ({'under' if fpeak <= GOAL_MIB else 'over'} "
                  f"the goal before any Portcullis data-plane code)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
