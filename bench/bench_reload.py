"""Latency while a sidecar activates a large policy: what a reload costs live traffic.

    .venv/bin/python bench/bench_reload.py [--rules 10000] [--rate 500] [--rounds 2] [--yaml]

A real sidecar (one worker, the `run.py` PKI and upstream) holds a policy of `--rules` rules
(`bench_policy.generate_policy`, plus one rule allowing the load generator) written as JSON
(`--yaml`: as YAML). The open-loop client (`openloop.py`) sends `--rate` req/s for 8 s, twice per
round: once with nothing happening (steady) and once while the policy file is rewritten with a
new revision 2 s into the run (reload: the sidecar notices it within its 2 s poll, parses and
compiles it in a worker thread and swaps it in). Sidecar, upstream and client share one core
(see README: "Why the open loop puts the proxy on the load core"). Prints p50/p99/max latency
of each run and the reload/steady ratios measured in the same round. A script: no asserts.

Parsing and compiling run off the event loop but share the GIL with it; what makes a reload
visible is anything that holds the GIL for long: PyYAML on a multi-megabyte document (seconds),
one C call decoding the whole JSON document, cyclic-GC passes over the ~480,000 tracked objects a
10,000-rule policy allocates, and dropping the old policy at once (each handled, see
`runtime.gcquiet` and bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_policy  # noqa: E402
import common  # noqa: E402


def big_policy(n_rules: int, revision: str) -> dict:
    doc = bench_policy.generate_policy(n_rules, random.Random(7))
    doc["revision"] = revision
    doc["rules"].insert(0, {"id": "loadgen-reads", "effect": "allow",
                            "from": {"workloads": [common.CLIENT_ID]},
                            "to": [{"methods": ["GET", "HEAD"], "paths": ["/**"]}]})
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--yaml", action="store_true", help="write the policy as YAML, not JSON")
    args = ap.parse_args()

    def render(revision: str) -> str:
        doc = big_policy(args.rules, revision)
        return yaml.safe_dump(doc, sort_keys=False) if args.yaml else json.dumps(doc)

    texts = [render(f"big-{k}") for k in range(args.rounds + 1)]
    rows: list[tuple[str, dict]] = []
    with common.Harness() as h:
        pki = common.make_pki(h.dir / "pki")
        up = common.start_upstream(h, "0")
        t = common.start_portcullis(h, pki, up.port, "0")
        policy_file = h.dir / "portcullis" / "policy.yaml"
        policy_file.write_text(texts[0])
        common.log(f"bench_reload: {args.rules} rules, {len(texts[0]) / 1e6:.1f} MB of "
                   f"{'YAML' if args.yaml else 'JSON'}; waiting for the first activation")
        deadline = time.time() + 300
        while "big-0" not in common.scrape_metrics(t) and time.time() < deadline:
            time.sleep(1)
        for rnd in range(1, args.rounds + 1):
            for label in ("steady", "reload"):
                if label == "reload":
                    text = texts[rnd]
                    timer = threading.Timer(2.0, policy_file.write_text, (text,))
                    timer.start()
                r = common.run_openloop(h, t, pki=pki, rate=args.rate, duration_s=8, warmup_s=1,
                                        connections=16, cpus="0")
                lat = r["latency_us"]
                common.log(f"  round {rnd} {label:6s} p50 {lat['p50']:9.0f} us  p99 "
                           f"{lat['p99']:9.0f} us  max {lat['max']:9.0f} us  non-200 "
                           f"{r['non_200']}  errors {r['errors']}")
                rows.append((label, r))
                time.sleep(8)  # the reload finishes (compile + swap) before the next run
        active = [ln for ln in common.scrape_metrics(t).splitlines()
                  if ln.startswith("portcullis_policy_info")]
    print(f"\n{args.rules} rules as {'YAML' if args.yaml else 'JSON'}, {args.rate:g} req/s open "
          f"loop, sidecar + upstream + client on one core; medians over {args.rounds} round(s):")
    print(f"{'run':8s} {'p50 us':>9s} {'p99 us':>9s} {'max us':>10s}")
    med = {}
    for label in ("steady", "reload"):
        runs = [r["latency_us"] for lab, r in rows if lab == label]
        med[label] = {q: statistics.median(x[q] for x in runs) for q in ("p50", "p99", "max")}
        m = med[label]
        print(f"{label:8s} {m['p50']:9.0f} {m['p99']:9.0f} {m['max']:10.0f}")
    print(f"reload / steady: p50 {med['reload']['p50'] / med['steady']['p50']:.1f}x, "
          f"p99 {med['reload']['p99'] / med['steady']['p99']:.1f}x, "
          f"max {med['reload']['max'] / med['steady']['max']:.1f}x")
    print(f"active at the end: {active[0] if active else '(none)'}  (expected big-{args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
