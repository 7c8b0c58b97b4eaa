"""A short `make soak` inside `make test`: the real sidecar and control plane as subprocesses, mTLS
load while certificates rotate, policy revisions and a revocation arrive; the harness's own verdict
(exit 0 = every check of soak/README.md held) is the assertion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_a_short_soak_passes_every_check():
    r = subprocess.run([sys.executable, str(ROOT / "soak" / "run.py"), "--duration", "30",
                        "--rate", "60"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "PASS: every check held" in r.stdout + r.stderr
