"""The `portcullis` process as an operator runs it: signals, drain, workers, audit verification."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import curl
from tests.factories import free_port, write_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Proc:
    def __init__(self, cfg: Path, *args: str) -> None:
        self.dir = cfg.parent
        self.audit = self.dir / f"stdout-{time.monotonic_ns()}.jsonl"
        self.err = self.dir / f"stderr-{time.monotonic_ns()}.log"
        self.p = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(cfg), *args],
            stdout=open(self.audit, "wb"), stderr=open(self.err, "wb"), cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stderr(self) -> str:
        return self.err.read_text()

    def lines(self) -> list[dict]:
        return [json.loads(x) for x in self.audit.read_bytes().splitlines()]

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


async def ready(admin_port: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                    if r.status == 200:
                        return await r.json()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("sidecar did not become ready")


@pytest.fixture
def ports():
    return free_port(), free_port()


async def test_sigterm_drains_in_flight_requests_and_seals_the_audit_log(pki, upstream, ports):
    port, admin = ports
    cfg = write_config(pki, upstream_url=upstream.url, port=port, admin_port=admin,
                       extra={"server": {"drain_delay_s": 0.5, "drain_timeout_s": 10}})
    proc = Proc(cfg)
    try:
        await ready(admin)
        url = f"https://127.0.0.1:{port}"
        slow = [asyncio.create_task(curl(url + "/slow?ms=1500", pki.client("frontend"),
                                         cacert=pki.bundle)) for _ in range(3)]
        await asyncio.sleep(0.4)
        proc.p.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.15)
        async with aiohttp.ClientSession() as s:  # during drain_delay: red, but still serving
            async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                assert r.status == 503 and "draining" in (await r.json())["reasons"]
        late = await curl(url + "/api/during-drain-delay", pki.client("frontend"), cacert=pki.bundle)
        assert late.status == 200
        results = await asyncio.gather(*slow)
        assert [r.status for r in results] == [200, 200, 200]
        assert await asyncio.get_running_loop().run_in_executor(None, proc.p.wait, 15) == 0
        lines = proc.lines()
        decisions = [x for x in lines if x["type"] == "decision"]
        assert len(decisions) == 4 and {d["status"] for d in decisions} == {200}
        assert lines[-1]["type"] == "checkpoint" and lines[-1]["final"] is True
        v = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", str(proc.audit),
                            "--public-key", str(pki.root / "audit.pub")],
                           capture_output=True, text=True, cwd=ROOT)
        assert v.returncode == 0, v.stdout + v.stderr
        # after exit nothing listens any more
        r = await curl(url + "/api/x", pki.client("frontend"), cacert=pki.bundle)
        assert r.rc != 0
    finally:
        proc.kill()


async def test_audit_verify_detects_tampering_of_a_real_log(pki, upstream, ports):
    port, admin = ports
    cfg = write_config(pki, upstream_url=upstream.url, port=port, admin_port=admin,
                       extra={"audit": {"signing_key_file": "audit.key", "checkpoint_every_records": 3}})
    proc = Proc(cfg)
    try:
        await ready(admin)
        url = f"https://127.0.0.1:{port}"
        for i in range(7):
            who = "frontend" if i % 2 == 0 else "batch"
            await curl(url + f"/api/{i}", pki.client(who), cacert=pki.bundle)
        proc.p.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, proc.p.wait, 15) == 0
    finally:
        proc.kill()
    pub = str(pki.root / "audit.pub")
    good = proc.audit.read_bytes().splitlines(keepends=True)

    def verify(lines: list[bytes]) -> subprocess.CompletedProcess:
        path = proc.dir / "tampered.jsonl"
        path.write_bytes(b"".join(lines))
        return subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", str(path),
                               "--public-key", pub], capture_output=True, text=True, cwd=ROOT)

    assert verify(good).returncode == 0
    first_deny = next(i for i, ln in enumerate(good) if b'"decision":"deny"' in ln)
    edited = list(good)
    edited[first_deny] = good[first_deny].replace(b'"decision":"deny"', b'"decision":"allow"')
    cases = {
        "edit": edited,
        "delete": good[:2] + good[3:],
        "insert": good[:2] + [good[1]] + good[2:],
        "reorder": good[:1] + [good[2], good[1]] + good[3:],
        "truncate": good[:-2],
    }
    for name, lines in cases.items():
        r = verify(lines)
        assert r.returncode == 1, (name, r.stdout)
        assert "line" in r.stdout.lower(), (name, r.stdout)


async def test_sighup_rereads_inputs(pki, upstream, ports):
    port, admin = ports
    cfg = write_config(pki, upstream_url=upstream.url, port=port, admin_port=admin,
                       extra={"policy": {"file": "policy.yaml", "watch_interval_s": 3600},
                              "identity": {"watch_interval_s": 3600}})
    proc = Proc(cfg)
    try:
        await ready(admin)
        url = f"https://127.0.0.1:{port}/api/x"
        assert (await curl(url, pki.client("batch"), cacert=pki.bundle)).status == 403
        (pki.root / "policy.yaml").write_text(
            "version: 1\nrevision: hup\nrules:\n- id: b\n  effect: allow\n"
            "  from: {workloads: [spiffe://example.org/ns/demo/sa/batch]}\n  to: [{paths: ['/**']}]\n")
        await asyncio.sleep(0.3)
        assert (await curl(url, pki.client("batch"), cacert=pki.bundle)).status == 403  # not polled
        proc.p.send_signal(signal.SIGHUP)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await curl(url, pki.client("batch"), cacert=pki.bundle)).status == 200:
                break
        else:
            raise AssertionError("SIGHUP did not reload the policy")
    finally:
        proc.p.send_signal(signal.SIGTERM)
        await asyncio.get_running_loop().run_in_executor(None, proc.p.wait, 15)
        proc.kill()


async def test_two_workers_share_the_port_and_keep_separate_audit_chains(pki, upstream, ports):
    port, admin = ports
    cfg = write_config(pki, upstream_url=upstream.url, port=port, admin_port=admin)
    proc = Proc(cfg, "--workers", "2")
    try:
        st = await ready(admin, timeout=30)
        assert len(st["workers"]) == 2 and all(w["ready"] for w in st["workers"])
        url = f"https://127.0.0.1:{port}/api/x"
        results = await asyncio.gather(*(curl(url, pki.client("frontend"), cacert=pki.bundle)
                                         for _ in range(30)))
        assert {r.status for r in results} == {200}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
        assert "portcullis_requests_total{code=\"allowed\",decision=\"allow\"} 30.0" in text, [l for l in text.splitlines() if "requests_total{" in l]
        proc.p.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, proc.p.wait, 30) == 0
        lines = proc.lines()
        chains = {x["chain"] for x in lines}
        assert len([x for x in lines if x["type"] == "decision"]) == 30
        finals = [x for x in lines if x["type"] == "checkpoint" and x["final"]]
        assert len(finals) == 2 and len(chains) == 2  # one chain per worker, each sealed
        v = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", str(proc.audit),
                            "--public-key", str(pki.root / "audit.pub")],
                           capture_output=True, text=True, cwd=ROOT)
        assert v.returncode == 0, v.stdout
    finally:
        proc.kill()


async def test_serve_with_bad_config_exits_2_naming_the_problem(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("listener: {port: 99999}\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "listener.port" in r.stderr and r.stdout == ""


def test_version_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("portcullis ")


async def test_a_single_worker_sidecar_runs_without_aiohttp(pki, upstream, ports):
    """The usual sidecar (one worker, admin listener on, no remote JWKS or control plane) never
    loads aiohttp: ~12 MiB of resident memory per sidecar (bench/bench_memory.py)."""
    port, admin = ports
    proc = Proc(write_config(pki, upstream_url=upstream.url, port=port, admin_port=admin))
    try:
        await ready(admin)
        r = await curl(f"https://127.0.0.1:{port}/api/x", pki.client("frontend"), cacert=pki.bundle)
        assert r.status == 200
        maps = Path(f"/proc/{proc.p.pid}/maps").read_text()
        assert "/uvloop/" in maps and "/httptools/" in maps  # what it does load, for contrast
        assert "/aiohttp/" not in maps and "/yarl/" not in maps and "/multidict/" not in maps
    finally:
        proc.kill()
