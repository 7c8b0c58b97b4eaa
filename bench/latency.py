"""Open-loop latency: a fixed request rate against the upstream directly and through the proxies.

Usage: python bench/latency.py [--rate 1000] [--duration 10] [--rounds 3] [--connections 32]
                               [--targets upstream,portcullis,nginx,haproxy] [--keep]

At `--rate` requests/s (open loop, bench/openloop.py, pinned to the load-generator core) each
target is measured for `--duration` seconds per round, targets interleaved, rounds rotated. It
prints, per target, p50/p90/p99 latency measured from each request's *scheduled* send time (no
coordinated omission), the latency *added* over the upstream measured directly in the same
round (difference of the percentiles, median over rounds), the service time (actual send to last
byte) and the client's own dispatch lag. Also the proxy's CPU per request at this rate.
A script: no asserts, it reports. Writes bench/results/latency-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH,
    Harness,
    cpu_seconds,
    log,
    machine_cpu,
    make_pki,
    median,
    own_cpu,
    undisturbed,
    parse_targets,
    rss_mib,
    run_openloop,
    latency_layout,
    start_targets,
    tool_versions,
    tree_cpu,
    cpu_delta,
    write_json,
)

PCTS = ("p50", "p90", "p99")


def latency_run(h: Harness, pki, t, rnd: int, layout: dict, *, rate: float, duration_s: float,
                warmup_s: float, connections: int, upstream=None) -> dict:
    """One open-loop measurement of one target."""
    up_pid = upstream.proc.pid if upstream is not None and upstream is not t else None
    up0 = cpu_seconds(up_pid) if up_pid else 0.0
    before = tree_cpu(t.pids())
    m0, me0, w0 = machine_cpu(), own_cpu(), time.monotonic()
    r = run_openloop(h, t, pki=pki, rate=rate, duration_s=duration_s, warmup_s=warmup_s,
                     connections=connections, cpus=layout["load"])
    time.sleep(0.2)
    after = tree_cpu(t.pids())
    m1, me1, wall = machine_cpu(), own_cpu(), time.monotonic() - w0
    up_cpu = cpu_seconds(up_pid) - up0 if up_pid else 0.0
    proxy = t.kind != "upstream"
    if not proxy:
        up_cpu = cpu_delta(before, after)
    r.update(target=t.name, round=rnd, alive=t.is_alive(),
             proxy_cpu_s=cpu_delta(before, after) if proxy else None, rss_mib=rss_mib(t.pids()))
    # CPU per request over the whole run, warm-up included (it sent requests too)
    sent = rate * (duration_s + warmup_s)
    r["proxy_cpu_us_per_req"] = r["proxy_cpu_s"] / sent * 1e6 if proxy else None
    ours = (r["proxy_cpu_s"] or 0.0) + r["client_cpu_s"] + up_cpu + (me1 - me0)
    r["foreign_cpus"] = max(0.0, m1["busy"] - m0["busy"] - ours) / wall
    r["steal_cpus"] = (m1["steal"] - m0["steal"]) / wall
    t.log_lines_and_reset()
    lat = r["latency_us"]
    log(f"  open loop   round {rnd} {t.name:14s} p50 {lat['p50']:7.0f} us  p99 {lat['p99']:7.0f} us"
        f"  non-200 {r['non_200']}  errors {r['errors']}  unfinished {r['unfinished']}")
    if r["foreign_cpus"] > 0.1 or r["steal_cpus"] > 0.1:
        log(f"bench: WARNING: other processes used {r['foreign_cpus']:.2f} CPUs, steal "
            f"{r['steal_cpus']:.2f} CPUs during this run: disturbed")
    if not t.is_alive():
        log(f"bench: {t.name} DIED during the open-loop run (see {t.stderr_file})")
    return r


def latency_phase(h: Harness, pki, targets: dict, layout: dict, *, rate: float, duration_s: float,
                  warmup_s: float, rounds: int, connections: int, retry) -> dict:
    """Run the open-loop measurements; returns {"runs": [...], "summary": {...}}.
    `retry` has .retries and .retry_wait (see common.undisturbed)."""
    names = list(targets)
    runs = []
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            if not targets[name].is_alive():
                continue
            runs.append(undisturbed(retry, lambda: latency_run(
                h, pki, targets[name], rnd + 1, layout, rate=rate, duration_s=duration_s,
                warmup_s=warmup_s, connections=connections, upstream=targets.get("upstream"))))
    return {"runs": runs, "summary": summarize(runs, names)}


def summarize(runs: list[dict], names: list[str]) -> dict:
    by = {n: [r for r in runs if r["target"] == n] for n in names}
    base = {r["round"]: r for r in by.get("upstream", [])}
    out = {}
    for n, rs in by.items():
        if not rs:
            continue
        s = {
            "rounds": len(rs),
            "latency_us": {p: median([r["latency_us"][p] for r in rs]) for p in PCTS},
            "service_us": {p: median([r["service_us"][p] for r in rs]) for p in PCTS},
            "client_lag_us": {p: median([r["client_lag_us"][p] for r in rs]) for p in PCTS},
            "non_200": sum(r["non_200"] for r in rs),
            "errors": sum(r["errors"] + r["unfinished"] for r in rs),
            "completed": sum(r["completed"] for r in rs),
            "scheduled": sum(r["scheduled"] for r in rs),
            "proxy_cpu_us_per_req": median([r["proxy_cpu_us_per_req"] for r in rs
                                            if r["proxy_cpu_us_per_req"] is not None]),
            "rss_mib": max(r["rss_mib"] for r in rs),
            "died": any(not r["alive"] for r in rs),
            "foreign_cpus_max": max(r["foreign_cpus"] for r in rs),
            "steal_cpus_max": max(r["steal_cpus"] for r in rs),
            "disturbed_rounds": sum(1 for r in rs if r.get("disturbed")),
        }
        if n != "upstream" and base:
            s["added_latency_us"] = {p: median([r["latency_us"][p] - base[r["round"]]["latency_us"][p]
                                                for r in rs if r["round"] in base]) for p in PCTS}
            s["added_service_us"] = {p: median([r["service_us"][p] - base[r["round"]]["service_us"][p]
                                                for r in rs if r["round"] in base]) for p in PCTS}
        out[n] = s
    return out


def _f(v, width: int = 7) -> str:
    return f"{v:{width}.0f}" if v is not None and v == v else f"{'-':>{width}}"


def print_latency_table(summary: dict, *, rate: float, duration_s: float, rounds: int,
                        connections: int, layout: str) -> None:
    where = ("proxy, upstream and client share one core" if layout == "shared"
             else "proxy on its own core")
    print(f"\nOpen loop: {rate:g} req/s, {duration_s:g} s x {rounds} round(s), {connections} "
          f"keep-alive connections, {where}. Microseconds, medians over rounds.")
    print("latency = scheduled send -> last response byte (includes the client's dispatch lag);"
          " added = minus the upstream measured directly in the same round;"
          " service = actual send -> last byte.")
    hdr = (f"{'target':14s} {'p50':>7s} {'p90':>7s} {'p99':>7s} | {'+p50':>7s} {'+p90':>7s} "
           f"{'+p99':>7s} | {'svc p50':>7s} {'svc p99':>7s} {'+svc50':>7s} {'+svc99':>7s} | "
           f"{'lag p99':>7s} {'cpu/req':>7s} {'non200':>6s} {'errors':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for n, s in summary.items():
        lat, svc = s["latency_us"], s["service_us"]
        add = s.get("added_latency_us", {})
        adds = s.get("added_service_us", {})
        print(f"{n:14s} {_f(lat['p50'])} {_f(lat['p90'])} {_f(lat['p99'])} | "
              f"{_f(add.get('p50'))} {_f(add.get('p90'))} {_f(add.get('p99'))} | "
              f"{_f(svc['p50'])} {_f(svc['p99'])} {_f(adds.get('p50'))} {_f(adds.get('p99'))} | "
              f"{_f(s['client_lag_us']['p99'])} {_f(s['proxy_cpu_us_per_req'])} "
              f"{s['non_200']:6d} {s['errors']:6d}" + ("  DIED" if s["died"] else "")
              + (f"  DISTURBED x{s['disturbed_rounds']}" if s["disturbed_rounds"] else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per target per round")
    ap.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds before each run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32, help="keep-alive connection pool")
    ap.add_argument("--targets", default="upstream,portcullis,nginx,haproxy",
                    help="comma list (the upstream is always included)")
    ap.add_argument("--no-access-log", action="store_true", help="nginx/haproxy without access log")
    ap.add_argument("--layout", choices=("shared", "split"), default="shared",
                    help="shared (default): proxies on the load-generator core for this test; "
                         "split: proxies on their own core (cross-core wake-ups add ms at the tail "
                         "on this VM)")
    ap.add_argument("--retries", type=int, default=3,
                    help="repeat a run disturbed by other processes up to N times (3)")
    ap.add_argument("--retry-wait", type=float, default=3.0, help="seconds before a retry (3)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    names = parse_targets(args.targets)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    try:
        with Harness(keep=args.keep) as h:
            pki = make_pki(h.dir / "pki")
            targets, layout = start_targets(h, pki, names, access_log=not args.no_access_log,
                                            pin=not args.no_pin)
            latency_layout(targets, layout, args.layout)
            res = latency_phase(h, pki, targets, layout, rate=args.rate, duration_s=args.duration,
                                warmup_s=args.warmup, rounds=args.rounds,
                                connections=args.connections, retry=args)
    except KeyboardInterrupt:
        log("bench: interrupted; everything started was stopped")
        return 130
    except RuntimeError as exc:  # a target did not start or a load generator failed
        log(f"bench: FAILED: {exc}")
        log("bench: everything started was stopped")
        return 2
    print_latency_table(res["summary"], rate=args.rate, duration_s=args.duration,
                        rounds=args.rounds, connections=args.connections, layout=args.layout)
    out = BENCH / "results" / f"latency-{stamp}.json"
    write_json(out, {"kind": "latency", "started": stamp, "args": vars(args), "cpu_layout": layout,
                     "versions": tool_versions(), **res})
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
