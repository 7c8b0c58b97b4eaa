"""Faults in every dependency of the sidecar, each answered by failing closed or by keeping the last
good value (DESIGN rule 6), over real TLS on 127.0.0.1 with a real upstream and curl:

- a control plane that answers garbage (junk, 500, a truncated tar.gz, an older validly signed
  bundle, a bundle signed by another key, an oversized body) or never answers;
- the own SVID rotated while following a control plane (the control plane client must move on);
- a last-good cache that cannot be written (a real kernel write error, see that test);
- the audit stdout going away and coming back (a FIFO whose reader closes and reopens);
- the trust bundle file removed (last good value until `identity.max_staleness_s`, then 503);
- a wall-clock jump past the own SVID's expiry and back;
- an upstream that resets or answers garbage under concurrent load (no connection or fd leak).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.bundles.io import load_persisted, persist, to_targz, write_targz
from proxy.core.bundle import build, parse_manifest, verify
from tests.conftest import RawClient, client_ssl, curl
from tests.controlplane.conftest import CP_ID, cp, env  # noqa: F401  (fixtures)
from tests.factories import (BATCH_ID, DEFAULT_POLICY, FRONTEND_ID, SIDECAR_ID, free_port,
                             write_config)

ROOT = Path(__file__).resolve().parents[2]
BATCH_API = {"id": "batch-api", "effect": "allow", "from": {"workloads": [BATCH_ID]},
             "to": [{"paths": ["/api/**"]}]}


# --------------------------------------------------------------------------------------------
# helpers


async def until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll an async or sync predicate until it holds (synchronisation, never a timing check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return True
        await asyncio.sleep(step)
    return False


async def admin_get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, await r.text()


async def readyz(port: int) -> tuple[int, list[str]]:
    status, text = await admin_get(port, "/readyz")
    doc = json.loads(text)
    return status, doc.get("reasons", [])


def policy_with(*rules) -> bytes:
    doc = dict(DEFAULT_POLICY)
    doc["rules"] = list(DEFAULT_POLICY["rules"]) + list(rules)
    return yaml.safe_dump(doc, sort_keys=False).encode()


def signer_pair(root: Path, name: str = "bundle-signer") -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    pub = root / f"{name}.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def bundle_targz(revision: int, key, policy: bytes | None = None, **files: bytes) -> bytes:
    return to_targz(build({"policy.yaml": policy or policy_with(), **files}, revision=revision,
                          now=time.time(), expires_at=None, signer=key))


def counter(sc, source: str, result: str) -> float:
    return sc.worker.metrics.refreshes.values.get((source, result), 0)


async def status_of(sc, who: str, path: str = "/api/x") -> int:
    return (await curl(sc.url(path), sc.pki.client(who), cacert=sc.pki.bundle)).status


class FakeControlPlane:
    """A stand-in control plane on 127.0.0.1: real TLS with the control plane's SVID, answering
    `GET /bundles/demo` as `mode` says (the real control plane never sends garbage, so a fake is
    the only way to make it). In mode "hang" it never answers; `open_hanging()` counts the
    connections of such requests the client has not closed yet."""

    def __init__(self, svid_dir: Path) -> None:
        self.svid_dir = svid_dir
        self.mode = "good"
        self.bodies: dict[str, bytes] = {}
        self.hits = 0
        self.hung: list[asyncio.BaseTransport] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def bundle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        mode = self.mode
        if mode == "500":
            return web.Response(status=500, text="internal error")
        if mode == "hang":
            self.hung.append(request.transport)
            await asyncio.sleep(3600)
        return web.Response(body=self.bodies[mode], content_type="application/gzip",
                            headers={"ETag": f'"{mode}-{len(self.bodies[mode])}"'})

    def open_hanging(self) -> int:
        return sum(1 for t in self.hung if t is not None and not t.is_closing())

    async def status(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"received": True})

    async def start(self) -> "FakeControlPlane":
        app = web.Application()
        app.router.add_get("/bundles/demo", self.bundle)
        app.router.add_post("/v1/status", self.status)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.svid_dir / "svid.pem", self.svid_dir / "svid_key.pem")
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/bundles/demo"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def follow(url: str, pub: Path, cache: Path, **over) -> dict:
    cfg = {"url": url, "public_keys": [str(pub)], "server_id": CP_ID, "cache_dir": str(cache),
           "long_poll_s": 0, "min_delay_s": 0.05, "max_delay_s": 0.1, "timeout_s": 0.5,
           "max_bytes": 65536}
    cfg.update(over)
    return {"policy": {"file": None, "bundle": cfg}}


@pytest.fixture
async def fake_cp(pki):
    d = pki.root / "fake-cp"
    pki.ca.issue_svid(CP_ID).write(d, bundle_pem=pki.ca.bundle_pem())
    fake = await FakeControlPlane(d).start()
    yield fake
    await fake.close()


# --------------------------------------------------------------------------------------------
# the control plane misbehaves


async def test_control_plane_garbage_keeps_the_last_good_bundle_and_is_counted(
        sidecar_factory, pki, upstream, fake_cp):
    key, pub = signer_pair(pki.root)
    other_key, _ = signer_pair(pki.root, "someone-else")
    fake_cp.bodies = {
        "good": bundle_targz(5, key),
        "junk": b"<html><body>Service temporarily unavailable</body></html>",
        "truncated": bundle_targz(6, key, policy_with(BATCH_API))[:300],
        "older": bundle_targz(3, key, policy_with(BATCH_API)),  # validly signed, lower revision
        "other_key": bundle_targz(9, other_key, policy_with(BATCH_API)),
        "too_large": os.urandom(70000),  # above max_bytes (65536)
    }
    sc = await sidecar_factory(extra=follow(fake_cp.url(), pub, pki.root / "cache"))
    bundle = sc.worker.inputs.bundle
    assert sc.worker.state.policy.revision == "demo@5"
    assert await status_of(sc, "frontend") == 200 and await status_of(sc, "batch") == 403

    cases = [("junk", "bundle_unreadable"), ("500", "bundle_http_error"),
             ("truncated", "bundle_unreadable"), ("older", "bundle_rollback"),
             ("other_key", "bundle_unknown_key"), ("too_large", "bundle_too_large")]
    for mode, code in cases:
        before = counter(sc, "policy", "failed")
        fake_cp.mode = mode
        assert await until(lambda: code in (bundle.last_error or "")), (mode, bundle.last_error)
        assert counter(sc, "policy", "failed") > before, mode
        # the last good bundle is still the one deciding, and nothing crashed
        assert sc.worker.state.policy.revision == "demo@5", mode
        assert await status_of(sc, "frontend") == 200, mode
        assert await status_of(sc, "batch") == 403, mode  # revision 6/9 (batch allowed) never won
        assert not sc.task.done()
        assert (await readyz(sc.admin_port))[0] == 200, mode

    # the client keeps polling: a good, newer bundle still gets through afterwards
    fake_cp.bodies["good"] = bundle_targz(7, key, policy_with(BATCH_API))
    fake_cp.mode = "good"
    assert await until(lambda: sc.worker.state.policy.revision == "demo@7")
    assert await status_of(sc, "batch") == 200
    assert bundle.last_error is None
    _, text = await admin_get(sc.admin_port, "/metrics")
    assert 'portcullis_refresh_total{result="failed",source="policy"}' in text
    await sc.stop()  # flushes the audit log
    recs = sc.records()
    assert len(recs) == 2 + 2 * len(cases) + 1
    assert [r["policy_revision"] for r in recs] == ["demo@5"] * (len(recs) - 1) + ["demo@7"]


async def test_control_plane_that_never_answers_times_out_and_the_sidecar_keeps_serving(
        sidecar_factory, pki, upstream, fake_cp):
    key, pub = signer_pair(pki.root)
    fake_cp.bodies = {"good": bundle_targz(5, key)}
    sc = await sidecar_factory(extra=follow(fake_cp.url(), pub, pki.root / "cache"))
    bundle = sc.worker.inputs.bundle
    fake_cp.mode = "hang"
    before = counter(sc, "policy", "failed")
    seen_open: list[int] = []

    def timed_out_three_times() -> bool:
        seen_open.append(fake_cp.open_hanging())
        return counter(sc, "policy", "failed") >= before + 3
    # each fetch is cut by its timeout (timeout_s 0.5 + long_poll_s 0): failures pile up...
    assert await until(timed_out_three_times)
    assert "Timeout" in (bundle.last_error or ""), bundle.last_error
    # ...while the sidecar serves on its last good bundle, with nothing piling up at the server
    assert await status_of(sc, "frontend") == 200
    assert sc.worker.state.policy.revision == "demo@5"
    assert (await readyz(sc.admin_port))[0] == 200
    # one fetch at a time (and its status report), each closed when it timed out: no pile-up
    assert len(fake_cp.hung) >= 3 and max(seen_open) <= 2, seen_open
    fake_cp.mode = "good"
    assert await until(lambda: bundle.last_error is None)
    assert await until(lambda: fake_cp.open_hanging() == 0)


async def test_control_plane_that_never_completes_the_handshake_at_start_uses_the_cache(
        sidecar_factory, pki, upstream):
    """A TCP listener that accepts and never says a word: the first fetch times out, the sidecar
    starts from its persisted last good bundle and serves."""
    key, pub = signer_pair(pki.root)
    cache = pki.root / "cache"
    b = build({"policy.yaml": policy_with(BATCH_API)}, revision=4, now=time.time(),
              expires_at=None, signer=key)
    persist(verify(b, public_keys=[key.public_key()], require_signature=True, now=time.time(),
                   active_revision=None), cache)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_r, w):
        accepted.append(w)

    hole = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    try:
        sc = await sidecar_factory(extra=follow(f"https://127.0.0.1:{port}/bundles/demo", pub,
                                                cache))
        assert sc.worker.state.policy.revision == "demo@4"
        assert await status_of(sc, "batch") == 200
        assert "Timeout" in (sc.worker.inputs.bundle.last_error or "")
        assert await until(lambda: counter(sc, "policy", "failed") >= 2)
        assert await status_of(sc, "frontend") == 200
        assert accepted  # it really connected and waited
    finally:
        for w in accepted:
            w.close()
        hole.close()


async def test_own_svid_rotation_reaches_the_control_plane_client(sidecar_factory, pki, cp, env,
                                                                   upstream):
    """The sidecar starts with a short-lived SVID, which is rotated (as SPIRE does at half-life);
    once the first one has expired, bundles must still arrive: the control plane client presents
    the current SVID, not the one the process started with."""
    now = time.time()
    short = pki.ca.issue_svid(SIDECAR_ID, now=now, ttl_s=4, not_before=now - 60)
    short.write(pki.sidecar_dir, bundle_pem=pki.ca.bundle_pem())
    extra = follow(cp.url("/bundles/demo"), env.root / "signing.key.pub",
                   env.root / "sidecar-cache", long_poll_s=1, timeout_s=2)
    sc = await sidecar_factory(extra=extra)
    assert await status_of(sc, "frontend") == 200
    renewed = pki.ca.issue_svid(SIDECAR_ID)
    (pki.sidecar_dir / "svid_key.pem").write_bytes(renewed.key_pem())
    (pki.sidecar_dir / "svid.pem").write_bytes(renewed.cert_pem())
    assert await until(lambda: sc.worker.inputs.svid.value.not_after
                       == renewed.cert.not_valid_after_utc.timestamp())
    # past the first SVID's expiry by more than one long poll (1 s): every request the control
    # plane sees from now on was sent after it expired
    await asyncio.sleep(max(0.0, short.cert.not_valid_after_utc.timestamp() - time.time()) + 2.0)
    s = cp.session(pki.client("deployer"))
    async with s.post(cp.url("/v1/bundles/demo/revocations"), json={"spiffe_ids": [FRONTEND_ID]}) as r:
        assert r.status == 201

    async def revoked():
        r = await curl(sc.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
        return r.status == 403 and r.json()["error"] == "revoked_workload"
    assert await until(revoked), sc.worker.inputs.bundle.last_error
    assert sc.worker.state.policy.revision == "demo@2"


# --------------------------------------------------------------------------------------------
# the sidecar as a process: its disk and its stdout fail


class SidecarProcess:
    """`portcullis serve` as an operator runs it, stdout (the audit log) going to `stdout`."""

    def __init__(self, cfg: Path, stdout, *, preexec_fn=None) -> None:
        self.err = cfg.parent / f"stderr-{time.monotonic_ns()}.log"
        self.p = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(cfg)], stdout=stdout,
            stderr=open(self.err, "wb"), cwd=ROOT, preexec_fn=preexec_fn,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    async def ready(self, admin: int, timeout: float = 30.0) -> None:
        async def ok():
            assert self.p.poll() is None, self.stderr()
            try:
                return (await readyz(admin))[0] == 200
            except aiohttp.ClientError:
                return False
        assert await until(ok, timeout, 0.1), self.stderr()

    async def terminate(self, timeout: float = 20.0) -> int:
        self.p.send_signal(signal.SIGTERM)
        return await asyncio.get_running_loop().run_in_executor(None, self.p.wait, timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def audit_verify(path: Path, pub: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", str(path),
                           "--public-key", str(pub)], capture_output=True, text=True, cwd=ROOT)


FSIZE_LIMIT = 128 * 1024


def _limit_file_size() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


@pytest.mark.slow
async def test_last_good_cache_that_cannot_be_written_leaves_the_active_bundle_alone(pki, upstream):
    """The write fault is real: the sidecar process runs with RLIMIT_FSIZE, so the kernel refuses
    to grow any file past 128 KiB (EFBIG; Python ignores SIGXFSZ), exactly where a full disk
    would say ENOSPC. A read-only directory would not do: these tests may run as root, whom
    permission bits do not stop. The audit log and the logs stay far below the limit."""
    key, pub = signer_pair(pki.root)
    src, cache = pki.root / "bundle.tar.gz", pki.root / "cache"

    def publish(revision: int, policy: bytes, **files: bytes) -> None:
        write_targz(build({"policy.yaml": policy, **files}, revision=revision, now=time.time(),
                          expires_at=None, signer=key), src)

    publish(1, policy_with())
    port, admin = free_port(), free_port()
    cfg = write_config(pki, upstream_url=upstream.url, port=port, admin_port=admin, extra={
        "policy": {"file": None, "watch_interval_s": 0.05,
                   "bundle": {"path": str(src), "public_keys": [str(pub)],
                              "cache_dir": str(cache)}}})
    audit = pki.root / "audit.jsonl"
    proc = SidecarProcess(cfg, open(audit, "wb"), preexec_fn=_limit_file_size)
    url = f"https://127.0.0.1:{port}/api/x"
    try:
        await proc.ready(admin)
        assert (await curl(url, pki.client("batch"), cacert=pki.bundle)).status == 403
        assert parse_manifest(load_persisted(cache).manifest_bytes).revision == 1
        # revision 2 carries 400 KB of incompressible data: persisting it must fail
        publish(2, policy_with(BATCH_API), **{"data/blob.bin": os.urandom(400 * 1024)})

        async def batch_allowed():
            return (await curl(url, pki.client("batch"), cacert=pki.bundle)).status == 200
        assert await until(batch_allowed), proc.stderr()
        assert await until(lambda: "cannot persist policy bundle revision 2" in proc.stderr())
        assert "File too large" in proc.stderr()
        _, text = await admin_get(admin, "/metrics")
        assert 'portcullis_refresh_total{result="persist_failed",source="policy"} 1.0' in text
        assert (await readyz(admin))[0] == 200
        # the previous last good bundle is intact, and no partial temp file is left behind
        assert parse_manifest(load_persisted(cache).manifest_bytes).revision == 1
        assert sorted(p.name for p in cache.iterdir()) == [".lock", "last-good.tar.gz"]
        # a bundle that fits is persisted again
        publish(3, policy_with())
        assert await until(lambda: parse_manifest(load_persisted(cache).manifest_bytes).revision
                           == 3), proc.stderr()
        assert (await curl(url, pki.client("batch"), cacert=pki.bundle)).status == 403
        assert await proc.terminate() == 0
    finally:
        proc.kill()
    assert audit_verify(audit, pki.root / "audit.pub").returncode == 0


class FifoReader:
    """Reads one FIFO read end in a thread, line by line, until told to stop (then closes it)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = bytearray()
        self.eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select

        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP)
        try:
            while not self._stop.is_set():
                if not poller.poll(20):
                    continue
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:  # every writer is gone (the sidecar exited)
                    self.eof = True
                    return
                self.data += chunk
        finally:
            os.close(self.fd)

    def lines(self) -> list[dict]:
        return [orjson.loads(x) for x in bytes(self.data).splitlines()]

    def decisions(self) -> int:
        return sum(1 for x in self.lines() if x["type"] == "decision")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.slow
async def test_audit_stdout_gone_fails_closed_and_recovers_when_it_is_back(pki, upstream):
    """stdout is a FIFO: its reader goes away (writes fail with EPIPE) and a new one comes back
    later (writes work again), which a pipe that is simply closed could never do."""
    fifo = pki.root / "audit.fifo"
    os.mkfifo(fifo)
    first = FifoReader(fifo)
    writer = os.open(fifo, os.O_WRONLY)  # does not block: a reader is there
    port, admin = free_port(), free_port()
    cfg = write_config(pki, upstream_url=upstream.url, port=port, admin_port=admin)
    proc = SidecarProcess(cfg, writer)
    os.close(writer)
    second = None
    url = f"https://127.0.0.1:{port}/api/x"

    async def get() -> tuple[int, dict]:
        r = await curl(url, pki.client("frontend"), cacert=pki.bundle)
        return r.status, (r.json() if r.status != 200 else {})

    try:
        await proc.ready(admin)
        for _ in range(3):
            assert (await get())[0] == 200
        assert await until(lambda: first.decisions() == 3)
        first.close()  # every record so far was read; now nobody reads
        # the sidecar cannot know before it writes: this request passes, its record fails
        assert (await get())[0] == 200
        assert await until(lambda: "audit_unhealthy" in proc_reasons(admin_sync(admin)))
        forwarded = len(upstream.received)
        refused = [await get() for _ in range(2)]
        assert [s for s, _ in refused] == [503, 503]
        assert {b["error"] for _, b in refused} == {"audit_unavailable"}
        assert len(upstream.received) == forwarded  # nothing went through unrecorded
        assert (await readyz(admin))[0] == 503
        assert "failed" in proc.stderr() and "sink unhealthy" in proc.stderr()
        second = FifoReader(fifo)  # stdout is back
        assert await until(lambda: readyz_status(admin) == 200), proc.stderr()
        assert (await get())[0] == 200
        assert await proc.terminate() == 0
        assert await until(lambda: second.eof)
    finally:
        proc.kill()
        if second is not None:
            second.close()
    # nothing was lost: every answered request has its record, the chain verifies
    log = pki.root / "audit.jsonl"
    log.write_bytes(bytes(first.data) + bytes(second.data))
    recs = [x for x in first.lines() + second.lines() if x["type"] == "decision"]
    assert len(recs) == 7
    assert [r["code"] for r in recs].count("audit_unavailable") == 2
    assert not [x for x in first.lines() + second.lines() if x["type"] == "audit_dropped"]
    v = audit_verify(log, pki.root / "audit.pub")
    assert v.returncode == 0, v.stdout


def admin_sync(admin: int) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def proc_reasons(got: tuple[int, dict]) -> list[str]:
    return got[1].get("reasons", [])


def readyz_status(admin: int) -> int:
    return admin_sync(admin)[0]


# --------------------------------------------------------------------------------------------
# inputs disappear, time jumps


async def test_removed_trust_bundle_keeps_the_last_good_until_max_staleness_then_503(
        sidecar_factory, pki, upstream):
    sc = await sidecar_factory(extra={"identity": {"max_staleness_s": 3}})
    bundle = pki.root / "bundles" / "example.org.pem"
    good = bundle.read_bytes()
    assert await status_of(sc, "frontend") == 200
    bundle.unlink()
    assert await until(lambda: counter(sc, "trust_bundle", "failed") >= 1)
    # within max_staleness_s: the last good bundle still verifies callers
    assert await status_of(sc, "frontend") == 200
    assert (await readyz(sc.admin_port))[0] == 200

    async def stale():
        r = await curl(sc.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
        return r.status == 503 and r.json()["error"] == "trust_bundle_stale"
    assert await until(stale)
    status, reasons = await readyz(sc.admin_port)
    assert status == 503 and "trust_bundle_stale" in reasons
    forwarded = len(upstream.received)
    assert await stale() and len(upstream.received) == forwarded  # nothing passes any more
    bundle.write_bytes(good)  # back: the sidecar recovers by itself
    assert await until(lambda: _status_is(sc, "frontend", 200))
    assert (await readyz(sc.admin_port))[0] == 200


async def _status_is(sc, who: str, status: int) -> bool:
    return await status_of(sc, who) == status


async def test_wall_clock_jump_past_the_own_svid_expiry_fails_closed_and_recovers(
        sidecar, pki, upstream, monkeypatch):
    """Simulated by shifting `time.time` in this process, which runs the sidecar. Why: the runtime
    reads the wall clock only through `time.time()` (DESIGN rule 2: core gets `now`), while its
    timers use the monotonic loop clock — exactly what an NTP step does to CLOCK_REALTIME and
    CLOCK_MONOTONIC. Rewriting the SVID with a short validity (tests/integration/test_reload.py)
    only moves forward and cannot show the way back; stepping the host clock needs CAP_SYS_TIME
    and disturbs everything else. Difference from a real step: OpenSSL's own handshake check
    still sees the real time, so the client certificates pass the TLS gate and the refusal
    comes from the sidecar's own availability check."""
    real = time.time
    offset = 0.0
    monkeypatch.setattr(time, "time", lambda: real() + offset)
    svid_end = sidecar.worker.inputs.svid.value.not_after
    assert await status_of(sidecar, "frontend") == 200
    forwarded = len(upstream.received)

    offset = svid_end - real() + 3600  # an hour past the SVID's expiry
    async def expired():
        r = await curl(sidecar.url("/api/x"), pki.client("frontend"), cacert=pki.bundle)
        return r.status == 503 and r.json()["error"] == "svid_expired"
    assert await until(expired)
    status, reasons = await readyz(sidecar.admin_port)
    assert status == 503 and "svid_expired" in reasons
    assert len(upstream.received) == forwarded

    offset = 0.0  # the clock is stepped back
    assert await until(lambda: _status_is(sidecar, "frontend", 200))
    assert (await readyz(sidecar.admin_port))[0] == 200
    await sidecar.stop()
    recs = sidecar.records()
    codes = [r["code"] for r in recs]
    assert codes[0] == "allowed" and codes[-1] == "allowed"
    jumped = recs[1:codes.index("allowed", 1)]
    # 503 once the sidecar noticed its own SVID expired (at its next refresh, within
    # identity.watch_interval_s); before that, the caller's SVID was already expired too (403)
    assert jumped and jumped[-1]["status"] == 503 and jumped[-1]["decision"] == "error"
    assert {(r["decision"], r["status"], r["code"]) for r in jumped} <= {
        ("error", 503, "svid_expired"), ("deny", 403, "svid_expired")}


# --------------------------------------------------------------------------------------------
# the upstream misbehaves under load


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


GET_PATHS = ("/ok", "/garbage", "/reset-mid", "/close-reset", "/keepalive-close", "/chunked",
             "/status/503", "/ok")


async def test_upstream_resets_and_garbage_under_load_leak_no_connection_or_fd(
        sidecar_factory, pki, upstream):
    """Bounded load: 8 concurrent keep-alive clients x 3 rounds over a mix of good and broken
    upstream answers (~200 requests). Afterwards every connection is gone and the process holds
    exactly as many file descriptors as before the load."""
    sc = await sidecar_factory(extra={"upstream": {"response_timeout_s": 1.0,
                                                   "idle_timeout_s": 0.2}})
    plane = sc.worker.plane
    client = pki.client("frontend")

    async def settle() -> int:
        assert await until(lambda: not plane.conns and not upstream.open_transports
                           and not plane.upstream.idle), (len(plane.conns),
                                                          len(upstream.open_transports))
        return open_fds()

    async def worker(rounds: int, outcomes: list) -> None:
        c = None
        for i in range(rounds):
            for path in GET_PATHS:
                if c is None:
                    c = await RawClient.connect(sc.port, client, pki)
                await c.send(f"GET {path}?w={i} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
                try:
                    status, headers, _ = await c.read_response()
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    outcomes.append((path, None))
                    await c.close()
                    c = None
                    continue
                outcomes.append((path, status))
                if headers.get("connection", "").lower() == "close":
                    await c.close()
                    c = None
        if c is not None:
            await c.close()

    warm: list = []
    await worker(1, warm)  # creates what the loop and the ssl module make lazily (not a leak)
    before = await settle()
    outcomes: list = []
    await asyncio.gather(*(worker(3, outcomes) for _ in range(8)))
    assert len(outcomes) == 8 * 3 * len(GET_PATHS)
    by_path: dict[str, set] = {}
    for path, status in outcomes:
        by_path.setdefault(path, set()).add(status)
    assert by_path["/ok"] == {200} and by_path["/chunked"] == {200}
    assert by_path["/garbage"] == {502} and by_path["/status/503"] == {503}
    assert by_path["/reset-mid"] == {None}  # the client connection is aborted, never "complete"
    assert await settle() == before
    assert sc.worker.metrics.connections_active.current() in ({(): 0}, {(): 0.0}, {})
    await sc.stop()
    recs = sc.records()
    assert len(recs) == len(warm) + len(outcomes)
    assert sum(r["outcome"] == "upstream_reset" for r in recs) == 2 * (1 + 8 * 3)
