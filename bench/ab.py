"""A/B of the data plane against another commit, in one run: CPU per request under the same load.

    .venv/bin/python bench/ab.py REF [--rounds 12] [--duration 3] [--dpop] [--aa] [--rate R]

REF (a commit, tag or branch) is checked out into a temporary git worktree; its sidecar (A) and
the working tree's (B) run side by side with the same PKI, configuration, policy and upstream,
both pinned to the proxy CPU, and are loaded in turn by wrk (64 keep-alive mTLS connections,
the order alternating each round). Per round: each one's CPU per request (utime + stime of the
process over the run, /proc) and the ratio B/A; at the end the median of the per-round ratios and
their spread. `--rate R`: instead of wrk, the open-loop client at R requests/s (proxies, upstream
and client on one core, as in run.py's latency phase): CPU per request and p50 latency of each
(at a low rate every request is alone in its loop iteration, so per-iteration costs show). `--aa` runs the working tree against itself instead (no REF): the spread of that
ratio is the noise floor of the method on this machine at this moment (it was +-3% in the
median, single rounds 0.8-1.2, on 2026-11-28); a B/A result inside it is no result.

Why: `bench_exchange.py` (in process, no sockets) can mislead. Its harness runs one exchange per
loop iteration, so anything paid per iteration looks per request there: the audit writer
thread woken per batch cost ~40% of an in-process exchange, while the same change measured
here, under wrk, moved CPU per request by a few percent. Judge a hot-path change here (and by
`bench_exchange.py --instructions` for the pure-Python part), not by in-process microseconds.
A script: prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", nargs="?", help="the commit to compare with (A); omit with --aa")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--duration", type=int, default=3, help="seconds of wrk per target per round")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--dpop", action="store_true", help="the full pipeline (fresh ES256 proof per request)")
    ap.add_argument("--aa", action="store_true", help="the working tree against itself (noise floor)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open loop at this many requests/s instead of wrk at full speed")
    args = ap.parse_args()
    if bool(args.ref) == args.aa:
        ap.error("give REF, or --aa")
    common.require_tools()
    proxy_cpu, load_cpu, _ = common.cpu_layout()
    with tempfile.TemporaryDirectory(prefix="portcullis-ab-") as tmp, \
            common.Harness(prefix="portcullis-ab-") as h:
        repo_a = common.REPO
        if args.ref:
            repo_a = Path(tmp) / "a"
            subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", "-q",
                            str(repo_a), args.ref], check=True)
        try:
            pki = common.make_pki(h.dir / "pki")
            shim = common.build_shim(h.dir)
            up = common.start_upstream(h, load_cpu)
            targets = {
                "A": common.start_portcullis(h, pki, up.port, proxy_cpu, name="a", dpop=args.dpop,
                                             repo=repo_a),
                "B": common.start_portcullis(h, pki, up.port, proxy_cpu, name="b", dpop=args.dpop),
            }
            if args.rate:  # everything on one core, as in run.py's latency phase
                for t in targets.values():
                    common.pin_tree(t.pids(), load_cpu)

            def load(t: common.Target, seconds: float) -> tuple[int, float | None]:
                """(requests completed, p50 latency in us or None)"""
                if args.rate:
                    r = common.run_openloop(h, t, pki=pki, rate=args.rate, duration_s=seconds,
                                            warmup_s=0.5, connections=32, cpus=load_cpu)
                    return r["completed"], r["latency_us"]["p50"]
                r = common.run_wrk(h, t, shim=shim, pki=pki, duration_s=seconds,
                                   connections=args.connections, threads=1, cpus=load_cpu)
                return r["requests"], None

            for t in targets.values():  # warm-up, unrecorded
                load(t, 1)
            per: dict[str, list[float]] = {"A": [], "B": []}
            p50: dict[str, list[float]] = {"A": [], "B": []}
            ratios = []
            label = "working tree twice" if args.aa else f"A = {args.ref}, B = working tree"
            print(f"{label}; {args.rounds} rounds x {args.duration} s, CPU us per request")
            for rnd in range(args.rounds):
                for name in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                    t = targets[name]
                    pid = t.pids()[0]
                    before = common.cpu_seconds(pid)
                    done, lat = load(t, args.duration)
                    per[name].append((common.cpu_seconds(pid) - before) * 1e6 / max(1, done))
                    if lat is not None:
                        p50[name].append(lat)
                ratios.append(per["B"][-1] / per["A"][-1])
                lats = (f"  p50 A {p50['A'][-1]:6.0f}  B {p50['B'][-1]:6.0f} us"
                        if args.rate else "")
                print(f"  round {rnd + 1:2}: A {per['A'][-1]:7.1f}  B {per['B'][-1]:7.1f}  "
                      f"B/A {ratios[-1]:.3f}{lats}", flush=True)
            print(f"median A {statistics.median(per['A']):.1f}, B {statistics.median(per['B']):.1f} "
                  f"us/req; B/A median {statistics.median(ratios):.3f} "
                  f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
            if args.rate:
                lr = [b / a for a, b in zip(p50["A"], p50["B"])]
                print(f"p50 latency: median A {statistics.median(p50['A']):.0f}, "
                      f"B {statistics.median(p50['B']):.0f} us; B/A median {statistics.median(lr):.3f}")
        finally:
            if args.ref:
                subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force",
                                str(repo_a)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
