"""`--workers N`: one supervisor process, N share-nothing worker processes.

Rules:
- Workers are spawned (not forked: no event loop or thread crosses a fork) and each binds the data
  port with SO_REUSEPORT, so the kernel spreads connections and nothing is shared on the hot path.
  Each worker loads its own inputs, keeps its own audit chain (chain id names the worker) and
  writes whole-line batches to the inherited stdout.
- The supervisor validates the whole configuration before spawning (exit 2 on any problem), serves
  the admin listener for all workers (readiness = every worker alive and ready; metrics = the
  workers' values merged), forwards SIGHUP, and on SIGTERM/SIGINT forwards SIGTERM, waits for every
  worker to drain, and exits 0. A worker that dies unexpectedly is restarted (with a delay) and
  the supervisor is not ready until it is back.
- Control messages travel on one pipe per worker: the supervisor asks ("status"), the worker
  answers with its readiness and a metrics snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client import generate_latest

from proxy.config import Config
from proxy.runtime.admin import start_app
from proxy.runtime.metrics import Metrics, make_registry

log = logging.getLogger("portcullis.supervisor")

_RESTART_DELAY_S = 1.0
_STATUS_TIMEOUT_S = 2.0


def worker_main(config_path: str, index: int, conn: Connection) -> None:
    """Entry point of a worker process."""
    import uvloop

    from proxy.cli import _setup_logging
    from proxy.config import load_config
    from proxy.runtime.server import Worker

    cfg = load_config(config_path)
    _setup_logging(cfg.server.log_level)
    worker = Worker(cfg, index=index, reuse_port=True)
    worker.load()
    uvloop.run(worker.run(admin=False, control=conn))


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: mp.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.lock = asyncio.Lock()
        self.restarts = 0


class Supervisor:
    def __init__(self, config_path: str, cfg: Config, workers: int) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.children = [_Child(i) for i in range(workers)]
        self.metrics = Metrics()
        self.stopping = False
        self._ctx = mp.get_context("spawn")
        self._stop = asyncio.Event()
        self._merged: dict[str, Any] = {}

    def _spawn(self, child: _Child) -> None:
        parent, kid = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(self.config_path, child.index, kid),
                                 name=f"portcullis-worker-{child.index}", daemon=False)
        proc.start()
        kid.close()
        child.proc, child.conn = proc, parent
        log.info("worker %d started (pid %d)", child.index, proc.pid)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for c in self.children:
            self._spawn(c)
        runner = None
        if self.cfg.admin.enabled:
            runner, port = await start_app(self.status, self.exposition, self.cfg.admin.address,
                                           self.cfg.admin.port)
            log.info("admin listening on http://%s:%d (supervisor of %d workers)",
                     self.cfg.admin.address, port, len(self.children))
        loop.add_signal_handler(signal.SIGTERM, self._request_stop)
        loop.add_signal_handler(signal.SIGINT, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        monitor = loop.create_task(self._monitor())
        await self._stop.wait()
        monitor.cancel()
        self._forward(signal.SIGTERM)
        limit = self.cfg.server.drain_delay_s + self.cfg.server.drain_timeout_s + 10
        deadline = time.monotonic() + limit
        for c in self.children:
            if c.proc is None:
                continue
            remaining = max(0.0, deadline - time.monotonic())
            await loop.run_in_executor(None, c.proc.join, remaining)
            if c.proc.is_alive():
                log.error("worker %d did not stop in time: killing it", c.index)
                c.proc.kill()
                await loop.run_in_executor(None, c.proc.join, 5)
        if runner is not None:
            await runner.close()
        bad = [c.index for c in self.children if c.proc is not None and c.proc.exitcode not in (0, None)]
        if bad:
            log.error("workers %s exited with errors", bad)
        return 0

    def _request_stop(self) -> None:
        if not self.stopping:
            log.info("supervisor: shutting down %d workers", len(self.children))
            self.stopping = True
            self._stop.set()

    def _forward(self, sig: int) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.is_alive():
                try:
                    os.kill(c.proc.pid, sig)
                except ProcessLookupError:
                    pass

    async def _monitor(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            for c in self.children:
                if c.proc is not None and not c.proc.is_alive() and not self.stopping:
                    code = c.proc.exitcode
                    log.error("worker %d exited unexpectedly (status %s); restarting", c.index, code)
                    c.restarts += 1
                    await asyncio.sleep(_RESTART_DELAY_S)
                    if not self.stopping:
                        self._spawn(c)

    async def _ask(self, child: _Child) -> dict[str, Any] | None:
        if child.conn is None or child.proc is None or not child.proc.is_alive():
            return None
        loop = asyncio.get_running_loop()
        async with child.lock:
            conn = child.conn

            def roundtrip() -> Any:
                conn.send("status")
                if not conn.poll(_STATUS_TIMEOUT_S):
                    return None
                return conn.recv()

            try:
                return await loop.run_in_executor(None, roundtrip)
            except (EOFError, OSError, BrokenPipeError):
                return None

    async def _collect(self) -> list[dict[str, Any] | None]:
        return list(await asyncio.gather(*(self._ask(c) for c in self.children)))

    async def status(self) -> dict[str, Any]:
        answers = await self._collect()
        reasons: list[str] = []
        workers = []
        for c, a in zip(self.children, answers):
            if a is None:
                reasons.append(f"worker_{c.index}_down")
                continue
            st = a["status"]
            workers.append(st)
            reasons += [f"worker_{c.index}:{r}" for r in st["reasons"]]
        if self.stopping:
            reasons.append("draining")
        return {"ready": not reasons, "reasons": reasons, "workers": workers}

    async def exposition(self) -> bytes:
        answers = await self._collect()
        snaps = [a["metrics"] for a in answers if a is not None]
        merged = self.metrics.merged(snaps)
        ready = 1.0 if len(snaps) == len(self.children) and all(
            a["status"]["ready"] for a in answers if a is not None) and not self.stopping else 0.0
        merged["portcullis_ready"] = {(): ready}
        return generate_latest(make_registry(self.metrics, values=lambda: merged))


def replay_scope_warning(cfg: Config, workers: int) -> str | None:
    """The start-up warning SECURITY.md promises: with token issuers and several workers, DPoP `jti`
    replay detection is per worker process (`core.replay.MemoryReplayStore`)."""
    if not cfg.tokens.issuers or workers < 2:
        return None
    return (f"--workers {workers}: DPoP proof replay (jti) detection is per worker process; a proof "
            "replayed on a connection served by another worker is not detected by the jti check "
            "(it stays bound to method, URI, iat window and token). Use tokens.dpop.require_nonce "
            "or one worker per replica until a shared replay store is available.")


def run_supervisor(config_path: str, cfg: Config, workers: int) -> int:
    import uvloop

    from proxy.cli import _print_config_error
    from proxy.errors import ConfigError
    from proxy.runtime.server import Worker

    try:
        Worker(cfg).load()  # fail fast, once, before spawning anything
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    warning = replay_scope_warning(cfg, workers)
    if warning:
        log.warning("%s", warning)
    sys.stdout.flush()
    return uvloop.run(Supervisor(config_path, cfg, workers).run())
