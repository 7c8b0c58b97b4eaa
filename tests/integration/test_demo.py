"""`make demo` runs `portcullis demo`: it must work on a fresh checkout and show every case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end():
    r = subprocess.run([sys.executable, "-m", "proxy", "demo"], capture_output=True, text=True,
                       cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "UNEXPECTED" not in out and "Demo complete." in out
    for marker in ("-> HTTP 200", "-> HTTP 403", "-> HTTP 000", "-> HTTP 400",
                   '"error":"denied_by_rule"', "audit verify: OK", "signatures checked",
                   "exited with status 0"):
        assert marker in out, marker
