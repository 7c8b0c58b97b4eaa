#!/usr/bin/env python3
"""Run the atheris harnesses one after another, each for a bounded time.

    python fuzz/run.py --seconds 60            # make fuzz
    python fuzz/run.py --seconds 10            # make fuzz-short
    python fuzz/run.py --seconds 300 http      # one harness, longer

Each harness `fuzz_<name>.py` runs as its own process with libFuzzer options: the corpus grows in
fuzz/corpus/<name>/ (seeded from fuzz/seeds/<name>/, which is never written), a crashing input is
written to fuzz/artifacts/<name>/ and makes the run fail. Loopback only; nothing is fetched.
Replay one crash with:  PYTHONPATH=. python fuzz/fuzz_<name>.py fuzz/artifacts/<name>/crash-...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("spiffe", "paths", "jose", "dpop", "config", "policy", "bundle", "http")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="time per harness")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("targets", nargs="*", help=f"harnesses to run (default: all of {', '.join(TARGETS)})")
    args = ap.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown harness {', '.join(sorted(unknown))}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    results: dict[str, str] = {}
    for name in args.targets or TARGETS:
        corpus = HERE / "corpus" / name
        artifacts = HERE / "artifacts" / name
        corpus.mkdir(parents=True, exist_ok=True)
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE / f"fuzz_{name}.py"), f"-max_total_time={args.seconds}",
               "-timeout=20", f"-rss_limit_mb={args.rss_limit_mb}", "-print_final_stats=1",
               f"-artifact_prefix={artifacts}/", str(corpus), str(HERE / "seeds" / name)]
        print(f"== fuzz {name}: {args.seconds} s", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.seconds + 120).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        results[name] = "ok" if rc == 0 else f"FAILED (exit {rc}, see {artifacts})"
        print(f"== fuzz {name}: {results[name]} after {time.monotonic() - t0:.0f} s", flush=True)
    print("\n".join(f"{name:8} {r}" for name, r in results.items()))
    return 0 if all(r == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
