"""Process lifecycle of one worker: load, listen, refresh, drain, shut down in order.

Rules:
- Start: every input (own SVID, trust bundles, policy, audit key) must load, or the process exits
  with status 2 naming each problem; nothing listens before a complete State exists.
- Refresh: inputs are polled every `watch_interval_s` in a thread (file reads and policy compiles
  never block the event loop); SIGHUP forces an immediate re-read. A new State replaces the old one
  atomically; TLS material changes swap the listener's context for new handshakes only.
- Readiness (/readyz): red ("not_listening") until the data listener is bound, so an orchestrator
  never routes traffic to a worker that would refuse the connection; red while an input is
  missing or stale, the audit sink is unhealthy, or the worker drains.
- SIGTERM/SIGINT: /readyz turns red, the listener keeps accepting for `drain_delay_s`, then stops
  accepting; idle keep-alive connections close, busy ones finish their exchange (bounded by
  `drain_timeout_s`, then aborted); the audit sink is flushed with a final signed checkpoint; exit 0.
- With `--workers N` each worker is one of these, listening with SO_REUSEPORT, keeping its own audit
  chain; the supervisor (`runtime.supervisor`) serves the admin listener for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.config import Config
from proxy.core.audit import AuditChain
from proxy.core.pipeline import State
from proxy.errors import ConfigError, Problem
from proxy.runtime.audit_sink import AuditSink
from proxy.runtime.deadlines import Sweeper
from proxy.runtime.gcquiet import release_in_background
from proxy.runtime.inputs import Inputs
from proxy.runtime.listener import DataPlane
from proxy.runtime.metrics import Metrics
from proxy.runtime.tls import TlsSwitch, server_context
from proxy.runtime.upstream import Upstream

log = logging.getLogger("portcullis.server")


def load_signing_key(path: str | None) -> Ed25519PrivateKey | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as exc:
        raise ConfigError([Problem("audit.signing_key_file", f"cannot read: {exc.strerror}")]) from None
    except (ValueError, TypeError):
        raise ConfigError([Problem("audit.signing_key_file", "not an unencrypted PEM private key")]) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError([Problem("audit.signing_key_file", "must be an Ed25519 key")])
    return key


def chain_id(index: int) -> str:
    return f"{socket.gethostname()}/w{index}/{os.urandom(4).hex()}"


class Worker:
    """One data-plane process (or the whole sidecar when --workers 1)."""

    def __init__(self, cfg: Config, *, index: int = 0, reuse_port: bool = False,
                 audit_fd: int = 1) -> None:
        self.cfg = cfg
        self.index = index
        self.reuse_port = reuse_port
        self.audit_fd = audit_fd
        self.metrics = Metrics()
        self.inputs = Inputs(cfg, self.metrics)
        self.state: State | None = None
        self.tls: TlsSwitch | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.plane: DataPlane | None = None
        self.sink: AuditSink | None = None
        self.draining = False
        self.bound: tuple[str, int] | None = None
        self.admin_port: int | None = None
        self._stop = asyncio.Event()
        self._force_refresh = False
        self._refreshing = False
        self._server: asyncio.AbstractServer | None = None
        self._refresh_task: asyncio.Task | None = None
        self.trust = None

    # ----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load every input once; raise ConfigError listing all that failed."""
        now = time.time()
        if self.inputs.bundle is not None:
            self.inputs.bundle.load_cached(now)  # the last good bundle, if the cache has one
        self.inputs.poll(now, force=True)
        errors = self.inputs.load_errors()
        try:
            self.signing_key = load_signing_key(self.cfg.audit.signing_key_file)
        except ConfigError as exc:
            errors += [str(p) for p in exc.problems]
        if errors:
            raise ConfigError([Problem("", e) for e in errors])
        self.trust = self.inputs.trust_store()
        if self.inputs.policy.value is not None:
            self.state = self.inputs.build_state(now, self.trust)
        self.inputs.update_gauges(now)
        self.tls = TlsSwitch(self._server_ctx())

    def _server_ctx(self) -> ssl.SSLContext:
        return server_context(self.inputs.svid.value, self.trust,  # type: ignore[arg-type]
                              min_version=self.cfg.listener.tls_min_version)

    def get_state(self) -> State:
        return self.state  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------
    async def run(self, *, admin: bool = True, install_signals: bool = True,
                  control: Any = None) -> None:
        loop = self.loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._exception_handler)
        cfg = self.cfg
        self.sink = AuditSink(
            AuditChain(chain_id(self.index), signer=self.signing_key), fd=self.audit_fd,
            max_queue_records=cfg.audit.queue_max_records, on_full=cfg.audit.on_full,
            checkpoint_every_records=cfg.audit.checkpoint_every_records,
            checkpoint_every_s=cfg.audit.checkpoint_every_s)
        self.sink.start(loop)
        sweeper = Sweeper(loop)
        sweeper.start()
        upstream = Upstream(loop, cfg.upstream, self.metrics, sweeper)
        self.plane = DataPlane(loop=loop, cfg=cfg, metrics=self.metrics, sink=self.sink,
                               upstream=upstream, sweeper=sweeper, get_state=self.get_state,
                               worker=str(self.index))
        self._wire_gauges(upstream)
        self.plane.refresh_issuer_keys = self.refresh_issuer_keys
        admin_runner = None
        if admin and cfg.admin.enabled:
            from proxy.runtime.admin import start_admin

            admin_runner, self.admin_port = await start_admin(
                cfg.admin.address, cfg.admin.port, self.admin_status, self.metrics)
            log.info("admin listening on http://%s:%d", cfg.admin.address, self.admin_port)
        await self._start_remote_jwks()
        if not await self._start_remote_bundle():
            await self._shutdown(upstream, sweeper, listening=False)
            if admin_runner is not None:
                await admin_runner.close()
            return
        self._server = await loop.create_server(
            self.plane.factory, cfg.listener.address, cfg.listener.port, ssl=self.tls.dispatch,
            ssl_handshake_timeout=cfg.listener.handshake_timeout_s, backlog=cfg.listener.backlog,
            reuse_port=self.reuse_port or None, reuse_address=True)
        sock = self._server.sockets[0]
        self.bound = sock.getsockname()[:2]
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_refresh)
        log.info("worker %d listening on %s:%d (mTLS), upstream %s, policy %s", self.index,
                 self.bound[0], self.bound[1], cfg.upstream.url, self.state.policy.revision)
        self._refresh_task = loop.create_task(self._refresh_loop())
        if control is not None:
            loop.add_reader(control.fileno(), self._on_control, control)
        await self._stop.wait()
        if control is not None:
            loop.remove_reader(control.fileno())
        await self._shutdown(upstream, sweeper)
        if admin_runner is not None:
            await admin_runner.close()

    async def _start_remote_bundle(self) -> bool:
        """With a control plane URL: fetch the bundle before listening (readiness stays red until
        a policy is active); retried until it works or the worker is asked to stop."""
        bundle = self.inputs.bundle
        if bundle is None or bundle.cfg.url is None:
            return True
        from proxy.runtime.tls import client_context

        bundle.on_change = lambda: self.apply(time.time(), True, False)
        await bundle.start_remote(client_context(self.inputs.svid.value, self.trust))
        delay = 0.5
        while bundle.value is None:
            log.error("no policy yet (%s): retrying in %.1fs", bundle.last_error, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return False  # asked to stop before any policy arrived
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, bundle.cfg.max_delay_s)
            await bundle.fetch(long_poll=False)
        self.apply(time.time(), True, False)
        return True

    async def _start_remote_jwks(self) -> None:
        tok = self.cfg.tokens
        if all(i.jwks_url is None for i in tok.issuers):
            return  # runtime.jwks (and aiohttp, ~12 MiB resident) only when a JWKS is fetched
        from proxy.runtime.jwks import RemoteJwks

        for i in tok.issuers:
            if i.jwks_url is None:
                continue
            remote = RemoteJwks(
                i.issuer, i.jwks_url, refresh_interval_s=tok.jwks_refresh_interval_s,
                min_refresh_interval_s=tok.jwks_min_refresh_interval_s,
                max_staleness_s=tok.jwks_max_staleness_s, timeout_s=tok.jwks_timeout_s,
                max_bytes=tok.jwks_max_bytes, ca_file=i.jwks_ca_file,
                on_change=lambda: self.apply(time.time(), True, False),
                count=lambda result: self.metrics.refreshes.inc(("jwks", result)))
            self.inputs.remote_jwks[i.issuer] = remote
            await remote.start()
        if self.inputs.remote_jwks:
            self.apply(time.time(), True, False)

    def refresh_issuer_keys(self, issuer: str | None):
        """Unknown kid: one single-flight, rate-limited refresh of that issuer's remote keys; the
        future resolves when it is done (None: nothing to refresh or refreshed too recently)."""
        remote = self.inputs.remote_jwks.get(issuer) if issuer else None
        return remote.refresh_for_unknown_kid() if remote is not None else None

    def stop(self) -> None:
        if not self._stop.is_set():
            log.info("worker %d: shutting down", self.index)
            self.draining = True
            self.metrics.draining.set(1)
            self.metrics.ready.set(0)
            self._stop.set()

    def _on_control(self, conn: Any) -> None:
        """A supervisor request on the control pipe (see runtime.supervisor)."""
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(conn.fileno())
            self.stop()  # the supervisor is gone: drain and exit
            return
        if msg == "status":
            conn.send({"status": self.admin_status(), "metrics": self.metrics.snapshot()})

    def request_refresh(self) -> None:
        log.info("worker %d: SIGHUP, re-reading inputs", self.index)
        self._force_refresh = True
        if self.loop is not None and not self._refreshing:
            self.loop.create_task(self._refresh_once())

    async def _shutdown(self, upstream: Upstream, sweeper: Sweeper, *, listening: bool = True) -> None:
        cfg = self.cfg.server
        if cfg.drain_delay_s and listening:
            await asyncio.sleep(cfg.drain_delay_s)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self.inputs.bundle is not None:
            await self.inputs.bundle.close()
        if self._server is not None:
            self._server.close()
        self.plane.drain()
        deadline = time.monotonic() + cfg.drain_timeout_s
        while self.plane.conns and time.monotonic() < deadline:
            if not self.plane.in_flight():
                for c in list(self.plane.conns):
                    c.close()
            await asyncio.sleep(0.02)
        if self.plane.conns:
            log.warning("worker %d: drain timeout, aborting %d connections", self.index,
                        len(self.plane.conns))
            self.plane.abort_all()
            await asyncio.sleep(0)
        upstream.close()
        sweeper.stop()
        for remote in self.inputs.remote_jwks.values():
            await remote.close()
        await self.sink.close()
        log.info("worker %d: stopped (audit records %d, checkpoints %d)", self.index,
                 self.sink.records_emitted, self.sink.checkpoints)

    # ----------------------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        interval = min(self.cfg.identity.watch_interval_s, self.cfg.policy.watch_interval_s)
        while True:
            await asyncio.sleep(interval)
            await self._refresh_once()

    async def _refresh_once(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True
        try:
            force, self._force_refresh = self._force_refresh, False
            now = time.time()
            changed, tls_changed = await self.loop.run_in_executor(None, self.inputs.poll, now, force)
            self.apply(now, changed, tls_changed)
        except Exception:
            log.exception("refresh failed unexpectedly")
        finally:
            self._refreshing = False

    def apply(self, now: float, changed: bool, tls_changed: bool) -> None:
        """Publish a new State (and TLS context) if anything changed or availability moved."""
        if self.inputs.policy.value is None:
            return  # nothing can be decided before a policy is active (control plane bundle)
        if tls_changed:
            self.trust = self.inputs.trust_store()
            try:
                self.tls.swap(self._server_ctx())
            except (ssl.SSLError, OSError, ValueError) as exc:
                log.error("new TLS material rejected by OpenSSL, keeping the old context: %s", exc)
            bundle = self.inputs.bundle
            if bundle is not None and bundle.cfg.url is not None:
                from proxy.runtime.tls import client_context

                try:  # the control plane client presents the new SVID, trusts the new bundles
                    bundle.set_tls(client_context(self.inputs.svid.value, self.trust))
                except (ssl.SSLError, OSError, ValueError) as exc:
                    log.error("new TLS material rejected for the control plane client: %s", exc)
        new = self.inputs.build_state(now, self.trust)
        old = self.state
        if changed or tls_changed or old is None or new.unavailable != old.unavailable:
            if new.unavailable and (old is None or old.unavailable != new.unavailable):
                log.error("failing closed: %s", new.unavailable)
            if changed and old is not None and new.policy.revision != old.policy.revision:
                log.info("policy revision %s active", new.policy.revision)
            self.state = new
            if old is not None and old.policy is not new.policy:
                # freed at once here, a 10,000-rule policy would hold the loop ~90 ms
                release_in_background(old)
        self.inputs.update_gauges(now)

    # ----------------------------------------------------------------------------------------
    def admin_status(self) -> dict[str, Any]:
        now = time.time()
        r = self.inputs.readiness(now)
        reasons = list(r.reasons)
        if self.bound is None:
            reasons.append("not_listening")
        if self.draining:
            reasons.append("draining")
        if self.sink is not None and not self.sink.healthy:
            reasons.append("audit_unhealthy")
        return {"ready": not reasons, "reasons": reasons, "worker": self.index,
                "policy_revision": self.state.policy.revision if self.state else None}

    def _wire_gauges(self, upstream: Upstream) -> None:
        m, sink = self.metrics, self.sink
        m.upstream_idle.fn = upstream.idle_count
        m.audit_queue.fn = lambda: sink.queue_depth
        m.ready.fn = lambda: 1.0 if self.admin_status()["ready"] else 0.0
        # counters owned by the sink, read at scrape time
        m.audit_records.fn = lambda: sink.records_written
        m.audit_checkpoints.fn = lambda: sink.checkpoints
        m.audit_write_errors.fn = lambda: sink.write_errors
        m.audit_saturated.fn = lambda: sink.saturated_events
        m.audit_dropped.fn = lambda: sink.dropped

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        msg = context.get("message", "")
        if isinstance(exc, (ssl.SSLError, ConnectionResetError, TimeoutError)) or "SSL" in msg \
                or "handshake" in msg:
            self.metrics.tls_failures.inc()
            log.debug("TLS handshake failed: %s %r", msg, exc)
            return
        loop.default_exception_handler(context)
