"""Profile the Portcullis data plane under wrk load with py-spy (sampling, no instrumentation).

    .venv/bin/python bench/pyspy_profile.py [--duration 10] [--top 40] [--dpop] [--native]

Starts the bench upstream and one Portcullis worker (pinned to CPU 0, wrk on CPU 1), drives it
with wrk (64 keep-alive mTLS connections) and samples the worker with `py-spy record --native
--format raw`; prints the functions with the most self time and the most inclusive time, and CPU
microseconds per request read from /proc. Needs `pip install py-spy` (not a project dependency).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--dpop", action="store_true",
                    help="the full pipeline (run.py's portcullis-dpop: a fresh ES256 proof per request)")
    ap.add_argument("--native", action="store_true",
                    help="sample native frames too, every thread, GIL or not (default: Python "
                         "frames of whoever holds the GIL)")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy is required: pip install py-spy", file=sys.stderr)
        return 2
    common.require_tools()
    proxy_cpu, load_cpu, _ = common.cpu_layout()
    with common.Harness(keep=args.keep, prefix="portcullis-profile-") as h:
        shim = common.build_shim(h.dir)
        pki = common.make_pki(h.dir / "pki")
        up = common.start_upstream(h, load_cpu)
        pc = common.start_portcullis(h, pki, up.port, proxy_cpu, name="portcullis-dpop" if args.dpop
                                     else "portcullis", dpop=args.dpop)
        common.run_wrk(h, pc, shim=shim, pki=pki, duration_s=2, connections=args.connections,
                       threads=1, cpus=load_cpu)  # warm-up
        raw = h.dir / "profile.raw"
        mode = ["--native"] if args.native else ["--gil"]
        spy = subprocess.Popen([pyspy, "record", *mode, "--rate", "250", "--format", "raw",
                                "-o", str(raw), "--duration", str(args.duration), "--pid",
                                str(pc.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        before = common.cpu_seconds(pc.proc.pid)
        r = common.run_wrk(h, pc, shim=shim, pki=pki, duration_s=args.duration - 1,
                           connections=args.connections, threads=1, cpus=load_cpu)
        cpu = common.cpu_seconds(pc.proc.pid) - before
        spy.wait(args.duration + 30)
        reqs = r["requests"]
        print(f"requests {reqs}, {reqs / r['duration_s'] if 'duration_s' in r else 0:.0f}/s, "
              f"proxy CPU {cpu:.2f}s = {cpu / max(1, reqs) * 1e6:.1f} us/request (profiler overhead included)")
        self_t: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            n = int(n)
            total += n
            frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")") for f in stack.split(";")]
            self_t[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
        print(f"\n{total} samples; top self time:")
        for f, n in self_t.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {f}")
        print("\ntop inclusive time:")
        for f, n in incl.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
