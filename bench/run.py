"""Portcullis benchmark: throughput, CPU per request and latency against nginx and HAProxy.

Usage: python bench/run.py [--rounds 5] [--duration 5] [--quick] [--two-workers]
                           [--targets upstream,nginx,haproxy,portcullis] [--no-open-loop] [--keep]

One command, one run: it makes a throw-away PKI, starts the fast upstream (bench/upstream.py),
nginx and HAProxy as mTLS-terminating reverse proxies (configs rendered from bench/*.tmpl) and
Portcullis (`--workers 1`; with --two-workers also 2-worker/2-thread variants of all three), all
with the same certificates and trust, pinned with taskset (proxies on one core, load generator and
upstream on the other). Then, for each round (targets interleaved, order rotated per round):

- closed loop: wrk (LD_PRELOAD mTLS shim, bench/wrk_mtls_shim.c), 64 keep-alive connections, full
  speed for --duration seconds: requests/s, latency p50/p99, CPU seconds per request of the proxy
  process tree (utime+stime delta from /proc/<pid>/stat over the run, / requests), RSS;
- open loop (unless --no-open-loop): bench/openloop.py at --rate req/s: latency p50/p90/p99 from
  the scheduled send time and the latency added over the upstream measured directly.

It prints medians over rounds and same-round ratios against nginx and HAProxy, and writes a JSON
summary to bench/results/<timestamp>.json. It asserts nothing. Everything it starts is stopped at
the end, also on Ctrl-C; it only listens on and connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BASE_TARGETS,
    BENCH,
    TWO_CORE_TARGETS,
    Harness,
    build_shim,
    busiest_processes,
    cpu_delta,
    cpu_seconds,
    latency_layout,
    log,
    machine_cpu,
    make_pki,
    median,
    own_cpu,
    parse_targets,
    require_tools,
    rss_mib,
    run_wrk,
    scrape_metrics,
    start_targets,
    tool_versions,
    tree_cpu,
    undisturbed,
    write_json,
)
from latency import latency_run, print_latency_table, summarize as summarize_latency  # noqa: E402

BASELINES = ("nginx", "haproxy")


def closed_run(h: Harness, t, rnd: int, *, shim, pki, upstream, layout, args) -> dict:
    pids = t.pids()
    up_pid = upstream.proc.pid
    before, up_before = tree_cpu(pids), cpu_seconds(up_pid)
    t.log_lines_and_reset()
    m0, me0 = machine_cpu(), own_cpu()
    w0 = time.monotonic()
    r = run_wrk(h, t, shim=shim, pki=pki, duration_s=args.duration, connections=args.connections,
                threads=args.threads, cpus=layout["load"])
    time.sleep(0.3)  # let async audit/access-log writers catch up before reading CPU and lines
    wall = time.monotonic() - w0
    after, up_after = tree_cpu(t.pids()), cpu_seconds(up_pid)
    m1, me1 = machine_cpu(), own_cpu()
    reqs = r["requests"]
    secs = r["duration_us"] / 1e6
    e = r["errors"]
    proxy = t.kind != "upstream"
    proxy_cpu = cpu_delta(before, after) if proxy else None
    up_cpu = up_after - up_before
    logged = t.log_lines_and_reset()
    ours = (proxy_cpu or 0.0) + up_cpu + r["wrk_cpu_s"] + (me1 - me0)
    foreign = max(0.0, (m1["busy"] - m0["busy"]) - ours) / wall  # CPUs used by others
    steal = (m1["steal"] - m0["steal"]) / wall
    out = {
        "target": t.name, "round": rnd, "requests": reqs, "seconds": secs,
        "rps": reqs / secs if secs else 0.0,
        "latency_us": r["latency_us"],
        "socket_errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
        "errors": e, "non_2xx_3xx": e["status"],
        "proxy_cpu_s": proxy_cpu,
        "proxy_cpu_us_per_req": proxy_cpu / reqs * 1e6 if proxy and reqs else None,
        "proxy_cpu_util": proxy_cpu / wall if proxy else None,
        "upstream_cpu_us_per_req": up_cpu / reqs * 1e6 if reqs else None,
        "wrk_cpu_us_per_req": r["wrk_cpu_s"] / reqs * 1e6 if reqs else None,
        "load_core_busy": (up_cpu + r["wrk_cpu_s"]) / wall,
        "rss_mib": rss_mib(t.pids()),
        "log_lines": logged[0] if logged else None,
        "log_bytes_per_req": logged[1] / reqs if logged and reqs else None,
        "alive": t.is_alive(),
        "wall_s": wall,
        "foreign_cpus": foreign,
        "steal_cpus": steal,
    }
    cpu = f"{out['proxy_cpu_us_per_req']:6.1f} us/req" if proxy and reqs else " " * 13
    log(f"  closed loop round {rnd} {t.name:14s} {out['rps']:9.0f} req/s  p50 "
        f"{r['latency_us']['p50'] / 1000:6.2f} ms  p99 {r['latency_us']['p99'] / 1000:6.2f} ms  {cpu}"
        f"  errors {out['socket_errors']}  non-2xx {out['non_2xx_3xx']}")
    if foreign > 0.1 or steal > 0.1:
        log(f"bench: WARNING: during this run other processes used {foreign:.2f} CPUs and the "
            f"hypervisor stole {steal:.2f} CPUs: this round's numbers are disturbed")
    if not out["alive"]:
        log(f"bench: {t.name} DIED during the closed-loop run (see {t.stderr_file})")
    return out


def summarize_closed(runs: list[dict], names: list[str]) -> dict:
    by = {n: [r for r in runs if r["target"] == n] for n in names}
    rounds = {n: {r["round"]: r for r in rs} for n, rs in by.items()}
    out: dict[str, dict] = {}
    for n, rs in by.items():
        if not rs:
            continue
        s = {
            "rounds": len(rs),
            "rps": median([r["rps"] for r in rs]),
            "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
            "p50_us": median([r["latency_us"]["p50"] for r in rs]),
            "p99_us": median([r["latency_us"]["p99"] for r in rs]),
            "proxy_cpu_us_per_req": median([r["proxy_cpu_us_per_req"] for r in rs
                                            if r["proxy_cpu_us_per_req"] is not None]),
            "proxy_cpu_util": median([r["proxy_cpu_util"] for r in rs
                                      if r["proxy_cpu_util"] is not None]),
            "wrk_cpu_us_per_req": median([r["wrk_cpu_us_per_req"] for r in rs]),
            "upstream_cpu_us_per_req": median([r["upstream_cpu_us_per_req"] for r in rs]),
            "load_core_busy": median([r["load_core_busy"] for r in rs]),
            "rss_mib": max(r["rss_mib"] for r in rs),
            "socket_errors": sum(r["socket_errors"] for r in rs),
            "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "log_lines_per_req": median([r["log_lines"] / r["requests"] for r in rs
                                         if r["log_lines"] is not None and r["requests"]]),
            "died": any(not r["alive"] for r in rs),
            "foreign_cpus_max": max(r["foreign_cpus"] for r in rs),
            "steal_cpus_max": max(r["steal_cpus"] for r in rs),
            "disturbed_rounds": sum(1 for r in rs if r["disturbed"]),
        }
        for b in BASELINES:
            if b == n or b not in rounds:
                continue
            pairs = [(r, rounds[b][r["round"]]) for r in rs if r["round"] in rounds[b]]
            s[f"vs_{b}"] = {
                "rps_ratio": median([r["rps"] / q["rps"] for r, q in pairs if q["rps"]]),
                "cpu_per_req_ratio": median([
                    r["proxy_cpu_us_per_req"] / q["proxy_cpu_us_per_req"] for r, q in pairs
                    if r["proxy_cpu_us_per_req"] and q["proxy_cpu_us_per_req"]]),
                "p99_ratio": median([r["latency_us"]["p99"] / q["latency_us"]["p99"]
                                     for r, q in pairs if q["latency_us"]["p99"]]),
            }
        out[n] = s
    return out


def _n(v, fmt: str, width: int) -> str:
    return f"{v:{width}{fmt}}" if v is not None and v == v else f"{'-':>{width}}"


def print_closed_table(summary: dict, args, layout: dict) -> None:
    print(f"\nClosed loop: wrk, {args.connections} keep-alive connections, {args.threads} thread, "
          f"{args.duration:g} s x {args.rounds} round(s), targets interleaved. Medians over rounds.")
    print(f"Pinning: proxies on cpu {layout['proxy']}, wrk + upstream on cpu {layout['load']}"
          f" (*-w2/-t2 targets: cpus {layout['two_core']}).")
    hdr = (f"{'target':14s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'cpu us/req':>10s} "
           f"{'proxy cpu':>9s} {'RSS MiB':>7s} {'errors':>6s} {'non2xx':>6s} | "
           f"{'vs nginx: rps':>13s} {'cpu/req':>7s} | {'vs haproxy: rps':>15s} {'cpu/req':>7s}")
    print(hdr)
    print("-" * len(hdr))
    for n, s in summary.items():
        vn, vh = s.get("vs_nginx", {}), s.get("vs_haproxy", {})
        print(f"{n:14s} {s['rps']:8.0f} {s['p50_us'] / 1000:7.2f} {s['p99_us'] / 1000:7.2f} "
              f"{_n(s['proxy_cpu_us_per_req'], '.1f', 10)} "
              f"{_n(s['proxy_cpu_util'] * 100 if s['proxy_cpu_util'] == s['proxy_cpu_util'] else None, '.0f', 8)}% "
              f"{s['rss_mib']:7.1f} {s['socket_errors']:6d} {s['non_2xx_3xx']:6d} | "
              f"{_n(vn.get('rps_ratio'), '.2f', 12)}x {_n(vn.get('cpu_per_req_ratio'), '.2f', 6)}x | "
              f"{_n(vh.get('rps_ratio'), '.2f', 14)}x {_n(vh.get('cpu_per_req_ratio'), '.2f', 6)}x"
              + ("  DIED" if s["died"] else ""))
    print("\nLoad generator headroom (same runs): CPU per request of wrk (TLS client via the shim) and"
          " of the upstream; load core busy = (wrk + upstream CPU) / wall time (below 100%: the"
          " load side is not what limits the proxy). Log lines/req: audit or access-log lines per"
          " request.")
    for n, s in summary.items():
        print(f"  {n:14s} wrk {s['wrk_cpu_us_per_req']:5.1f} us/req  upstream "
              f"{s['upstream_cpu_us_per_req']:5.1f} us/req  load core busy "
              f"{s['load_core_busy'] * 100:3.0f}%"
              + (f"  log lines/req {s['log_lines_per_req']:.3f}"
                 if s["log_lines_per_req"] == s["log_lines_per_req"] else "")
              + (f"  DISTURBED in {s['disturbed_rounds']} round(s): others used up to "
                 f"{s['foreign_cpus_max']:.2f} CPUs, steal {s['steal_cpus_max']:.2f}"
                 if s["disturbed_rounds"] else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per closed-loop run (5)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 s runs")
    ap.add_argument("--targets", default=",".join(BASE_TARGETS),
                    help=f"comma list from {','.join(BASE_TARGETS + TWO_CORE_TARGETS)}")
    ap.add_argument("--two-workers", action="store_true",
                    help="add portcullis-w2, nginx-w2, haproxy-t2 (on both cores, sharing them "
                         "with wrk and the upstream)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (1: it has one core)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds per target first")
    ap.add_argument("--no-open-loop", action="store_true", help="skip the fixed-rate latency runs")
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop requests/s (1000)")
    ap.add_argument("--open-duration", type=float, default=None,
                    help="seconds per open-loop run (default: --duration)")
    ap.add_argument("--open-connections", type=int, default=32)
    ap.add_argument("--latency-layout", choices=("shared", "split"), default="shared",
                    help="open loop: shared (proxies moved to the load core) or split")
    ap.add_argument("--no-access-log", action="store_true",
                    help="nginx/haproxy without access log (Portcullis always audits)")
    ap.add_argument("--retries", type=int, default=3,
                    help="repeat a run disturbed by other processes up to N times (3)")
    ap.add_argument("--retry-wait", type=float, default=3.0, help="seconds before a retry (3)")
    ap.add_argument("--no-pin", action="store_true", help="no taskset pinning")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 1.0
        args.retries = min(args.retries, 1)
    if args.duration != int(args.duration) or args.duration < 1 or args.warmup < 1:
        raise SystemExit("bench: --duration and --warmup are whole seconds >= 1 (wrk takes seconds)")
    open_duration = args.open_duration or args.duration
    names = parse_targets(args.targets)
    if args.two_workers:
        names += [n for n in TWO_CORE_TARGETS if n not in names]
    require_tools()
    busy, top = busiest_processes()
    if busy > 0.15:
        log(f"bench: WARNING: the machine is not idle ({busy:.2f} CPUs busy before the benchmark):"
            + "".join(f"\n  {line}" for line in top) + "\n  numbers will be disturbed")
    preflight = {"busy_cpus": busy, "top": top}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    closed: list[dict] = []
    opened: list[dict] = []
    notes: list[str] = []
    metrics_text = ""
    t_start = time.time()
    try:
        with Harness(keep=args.keep) as h:
            shim = build_shim(h.dir)
            pki = make_pki(h.dir / "pki")
            targets, layout = start_targets(h, pki, names, access_log=not args.no_access_log,
                                            pin=not args.no_pin)
            if layout["load"] is not None:
                os.sched_setaffinity(0, {int(layout["load"])})  # the harness stays off the proxy core
            order0 = list(targets)
            log(f"bench: warm-up {args.warmup:g} s per target")
            for n in order0:
                run_wrk(h, targets[n], shim=shim, pki=pki, duration_s=args.warmup,
                        connections=args.connections, threads=args.threads, cpus=layout["load"])
                targets[n].log_lines_and_reset()
            for rnd in range(1, args.rounds + 1):
                k = (rnd - 1) % len(order0)
                order = order0[k:] + order0[:k]
                for n in order:
                    t = targets[n]
                    if not t.is_alive():
                        continue
                    closed.append(undisturbed(args, lambda: closed_run(
                        h, t, rnd, shim=shim, pki=pki, upstream=targets["upstream"],
                        layout=layout, args=args)))
                if not args.no_open_loop:
                    restore = latency_layout(targets, layout, args.latency_layout)
                    try:
                        for n in order:
                            if targets[n].is_alive():
                                opened.append(undisturbed(args, lambda: latency_run(
                                    h, pki, targets[n], rnd, layout, rate=args.rate,
                                    duration_s=open_duration, warmup_s=1.0,
                                    connections=args.open_connections,
                                    upstream=targets["upstream"])))
                    finally:
                        restore()
            for n, t in targets.items():
                if not t.is_alive():
                    tail = t.stderr_file.read_text(errors="replace")[-2000:] if t.stderr_file else ""
                    notes.append(f"{n} died (exit {t.proc.popen.returncode}); stderr tail:\n{tail}")
                if t.kind == "portcullis":
                    metrics_text += scrape_metrics(t)
                if t.stderr_file and t.stderr_file.exists():
                    text = t.stderr_file.read_text(errors="replace")
                    bad = [ln for ln in text.splitlines()
                           if any(w in ln.lower() for w in ("error", "traceback", "exception"))]
                    if bad:
                        notes.append(f"{n} stderr has {len(bad)} error line(s), first: {bad[0][:300]}")
    except KeyboardInterrupt:
        log("bench: interrupted; everything started was stopped")
        return 130
    except RuntimeError as exc:  # a target did not start or a load generator failed
        log(f"bench: FAILED: {exc}")
        log("bench: everything started was stopped")
        return 2
    summary = summarize_closed(closed, names)
    print_closed_table(summary, args, layout)
    lat_summary = summarize_latency(opened, [n for n in names if any(r["target"] == n for r in opened)])
    if opened:
        print_latency_table(lat_summary, rate=args.rate, duration_s=open_duration,
                            rounds=args.rounds, connections=args.open_connections,
                            layout=args.latency_layout)
    for note in notes:
        print(f"\nNOTE: {note}")
    out = BENCH / "results" / f"{stamp}.json"
    write_json(out, {
        "kind": "run", "started": stamp, "elapsed_s": time.time() - t_start,
        "args": vars(args), "cpu_layout": layout, "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": tool_versions(),
        "closed_loop": {"summary": summary, "runs": closed},
        "open_loop": {"rate": args.rate, "layout": args.latency_layout,
                      "summary": lat_summary, "runs": opened},
        "notes": notes, "preflight": preflight,
        "portcullis_metrics": [ln for ln in metrics_text.splitlines()
                               if ln.startswith("portcullis_") and not ln.endswith(" 0.0")],
    })
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
