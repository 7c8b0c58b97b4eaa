"""The control plane process: inputs, the bundle store, the mTLS listener, refresh and shutdown.

Rules:
- Inputs are validated once at load (`load`): own SVID, the callers' trust bundles, the API policy,
  the signing key and the stored revisions; every problem is reported together (ConfigError).
- Own SVID, trust bundles and the API policy are files watched every `identity.watch_interval_s`
  (`runtime.refresher`: a failed refresh keeps the last good value). New TLS material is used by
  new handshakes at once (`runtime.tls.TlsSwitch`); a new trust store gets a new version.
- Bundles with `expires_after_s` are re-signed at half-life by the same loop.
- Stop: every long poll is answered at once (304), then the listener closes.
- Audit lines go to `audit_out` (stdout by default), one JSON object per line. Keys never do.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import Any, Callable

import orjson
from aiohttp import web

from proxy.bundles.io import Limits
from proxy.config import compile_policy_bytes, file_revision
from proxy.controlplane.api import make_app
from proxy.controlplane.config import ControlPlaneConfig
from proxy.controlplane.fleet import Fleet
from proxy.controlplane.store import BundleStore, load_public_keys, load_signing_key
from proxy.core.policy import CompiledPolicy
from proxy.core.spiffe import OwnSvid, TrustBundle, TrustStore, load_own_svid, parse_bundle
from proxy.errors import ConfigError, Problem
from proxy.runtime.refresher import Refreshable
from proxy.runtime.sources import FileSource
from proxy.runtime.tasks import cancel_and_wait
from proxy.runtime.tls import TlsSwitch, server_context

log = logging.getLogger("portcullis.controlplane")


def _stdout_writer(line: bytes) -> None:
    out = sys.stdout.buffer
    out.write(line)
    out.flush()


def parse_api_policy(data: bytes, digest: str, *, source: str,
                     trust_domains: frozenset[str]) -> CompiledPolicy:
    return compile_policy_bytes(data, source=source, revision=file_revision(digest),
                                trust_domains=trust_domains)


class ControlPlane:
    def __init__(self, cfg: ControlPlaneConfig, *, clock: Callable[[], float] = time.time,
                 audit_out: Callable[[bytes], None] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self._audit_out = audit_out or _stdout_writer
        ident = cfg.identity
        self.svid_input: Refreshable[OwnSvid] = Refreshable(
            "svid", f"own SVID {ident.svid_file}",
            [FileSource(ident.svid_file), FileSource(ident.svid_key_file)],
            lambda data, _d: load_own_svid(data[0], data[1], self.clock()))
        self.bundle_inputs: dict[str, Refreshable[TrustBundle]] = {
            td.name: Refreshable(
                "trust_bundle", f"trust bundle {td.name} ({td.bundle_file})",
                [FileSource(td.bundle_file)],
                lambda data, _d, td=td: parse_bundle(td.name, data[0], td.format))
            for td in ident.trust_domains}
        tds = cfg.trust_domain_names
        self.policy_input: Refreshable[CompiledPolicy] = Refreshable(
            "policy", f"control plane policy {cfg.policy.file}", [FileSource(cfg.policy.file)],
            lambda data, digests: parse_api_policy(data[0], digests[0], source=cfg.policy.file,
                                                   trust_domains=tds))
        self.trust: TrustStore = TrustStore({})
        self.policy: CompiledPolicy | None = None  # type: ignore[assignment]
        self.store: BundleStore | None = None  # type: ignore[assignment]
        lim = cfg.limits
        self.limits = Limits(max_total_bytes=lim.max_total_bytes, max_files=lim.max_files,
                             max_file_bytes=lim.max_file_bytes)
        self.fleet = Fleet(stale_after_s=cfg.fleet.stale_after_s,
                           max_reporters=cfg.fleet.max_reporters)
        self.switch: TlsSwitch | None = None
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._trust_version = 0
        self._todo: list[tuple[str, str]] = []
        self._watch: asyncio.Task | None = None

    # -- inputs --------------------------------------------------------------------------------

    def _inputs(self) -> list[Refreshable]:
        return [self.svid_input, *self.bundle_inputs.values(), self.policy_input]

    def _rebuild_trust(self) -> None:
        self._trust_version += 1
        self.trust = TrustStore.of((b.value for b in self.bundle_inputs.values()),
                                   version=self._trust_version)

    def _tls_context(self):
        return server_context(self.svid_input.value, self.trust,
                              min_version=self.cfg.listener.tls_min_version)

    def load(self) -> None:
        """Load every input and the stored revisions; ConfigError listing all that failed."""
        now = self.clock()
        problems: list[Problem] = []
        for r in self._inputs():
            r.poll(now, force=True)
            if r.value is None:
                problems.append(Problem("", f"{r.name}: {r.last_error}"))
        signer = previous = None
        try:
            signer = load_signing_key(self.cfg.signing.key_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
        try:
            previous = load_public_keys(self.cfg.signing.previous_public_key_files)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        self._rebuild_trust()
        self.policy = self.policy_input.value  # type: ignore[assignment]
        self.store = BundleStore(
            self.cfg.state.dir, self.cfg.bundles, signer=signer, previous_keys=previous or (),
            keep_revisions=self.cfg.state.keep_revisions, limits=self.limits,
            max_revocation_entries=self.cfg.limits.max_revocation_entries, clock=self.clock)
        self._todo = self.store.load()

    def poll_inputs(self, force: bool = False) -> None:
        """Refresh own SVID, trust bundles and the API policy (last good value kept)."""
        now = self.clock()
        tls_changed = False
        for r in (self.svid_input, *self.bundle_inputs.values()):
            if r.poll(now, force) == "changed":
                tls_changed = True
        if self.policy_input.poll(now, force) == "changed":
            self.policy = self.policy_input.value  # type: ignore[assignment]
            log.info("control plane policy reloaded (%s)", self.policy.revision)
        if tls_changed:
            self._rebuild_trust()
            if self.switch is not None:
                self.switch.swap(self._tls_context())
            log.info("TLS material reloaded")

    # -- audit ---------------------------------------------------------------------------------

    def audit(self, record: dict[str, Any]) -> None:
        try:
            self._audit_out(orjson.dumps(record) + b"\n")
        except (OSError, ValueError) as exc:
            log.error("cannot write the audit line: %s", exc)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> int:
        """Serve (after `load`). Returns the bound port."""
        if self.store is None:
            self.load()
        assert self.store is not None
        self.store.lock_state()
        await self.store.start(self._todo)
        self._todo = []
        await self.store.refresh_expiring(self.clock())
        self.switch = TlsSwitch(self._tls_context())
        self.runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False,
                                    shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.listener.address, self.cfg.listener.port,
                           ssl_context=self.switch.dispatch, reuse_address=True)
        await site.start()
        addresses = self.runner.addresses
        self.port = addresses[0][1] if addresses else self.cfg.listener.port
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
        log.info("control plane serving on %s:%s (bundles: %s; signing key %s)",
                 self.cfg.listener.address, self.port, ", ".join(self.store.slots),
                 self.store.kid)
        return self.port

    async def _watch_loop(self) -> None:
        interval = self.cfg.identity.watch_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll_inputs()
                assert self.store is not None
                await self.store.refresh_expiring(self.clock())
            except Exception:  # keep serving the last good state
                log.exception("refresh failed")

    async def stop(self) -> None:
        if self.store is not None:
            self.store.close()  # long polls answer now
        await cancel_and_wait(self._watch)
        self._watch = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.store is not None:
            self.store.unlock_state()

    async def run(self, *, install_signals: bool = True) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, self.poll_inputs, True)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
