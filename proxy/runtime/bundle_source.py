"""The policy bundle, as the sidecar keeps it: fetched, verified, compiled, activated, persisted.

Rules (DESIGN.md section 5; the OPA bundle HTTP protocol for distribution; `core.bundle` for the
format and the verification rules):
- Sources: a local bundle (`policy.bundle.path`: a directory — its `.manifest.json` is watched — or
  a `.tar.gz`, watched like every other file input) or a control plane URL (`policy.bundle.url`,
  mTLS with the sidecar's own SVID; the server's SPIFFE ID is checked when `server_id` is set).
  When the own SVID or a trust bundle changes, the next request uses a new connection pool with
  the new material (`set_tls`).
- HTTP: `If-None-Match` with the active ETag, `304` = unchanged; optional long polling
  (`Prefer: wait=N`); between polls a delay drawn uniformly from [min_delay_s, max_delay_s];
  a size cap and a timeout; redirects are not followed.
- A new bundle is activated only when it verifies (signature mandatory whenever keys are
  configured, exact file hashes, no rollback: its revision must be higher than the active one),
  its policy compiles and its revocations parse. Activation is one atomic swap of the State; a
  failed download, parse, compile or verification keeps the active bundle, is counted
  (`portcullis_refresh_total{source="policy",result="failed"}`) and logged with the reason.
- The last good bundle is persisted (`cache_dir`) and, verified again, used at start when the
  control plane is unreachable; a persisted bundle never lowers the revision. A failed write
  (disk full, read-only) leaves the active bundle alone; it is logged and counted
  (`portcullis_refresh_total{source="policy",result="persist_failed"}`).
- Expiry: past `expires_at` the bundle stays active for `expiry_grace_s`, then the sidecar fails
  closed (503 `bundle_expired`) and `/readyz` turns red.
- Status (active revision, last success, last error) is reported to the control plane after each
  poll when `report_status` is on; a failed report is only logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization

from proxy import __version__
from proxy.config import BundleConfig
from proxy.core.bundle import EMPTY_REVOCATIONS, Revocations, VerifiedBundle, revocations, verify
from proxy.core.policy import CompiledPolicy
from proxy.errors import BundleError, ConfigError, InvalidValue, Problem
from proxy.runtime.policy_load import load_policy
from proxy.runtime.sources import FileSource
from proxy.runtime.tasks import cancel_and_wait

log = logging.getLogger("portcullis.bundle")

POLICY_FILE = "policy.yaml"


def load_public_keys(paths: tuple[str, ...]) -> list[Any]:
    keys, problems = [], []
    for i, p in enumerate(paths):
        try:
            keys.append(serialization.load_pem_public_key(Path(p).read_bytes()))
        except (OSError, ValueError) as exc:
            problems.append(Problem(f"policy.bundle.public_keys[{i}]", f"cannot load {p}: {exc}"))
    if problems:
        raise ConfigError(problems)
    return keys


def expect_server_id(ctx: ssl.SSLContext, spiffe_id: str) -> None:
    """Make every handshake of `ctx` fail unless the server's certificate carries exactly this
    SPIFFE ID as its one URI SAN (the chain itself is verified by OpenSSL against our bundles)."""

    class _Checked(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            cert = self.getpeercert() or {}
            uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
            if uris != [spiffe_id]:
                raise ssl.SSLCertVerificationError(
                    f"control plane presented {uris}, expected {spiffe_id}")

    ctx.sslobject_class = _Checked


def compile_bundle(vb: VerifiedBundle, *, name: str, trust_domains: frozenset[str]
                   ) -> tuple[CompiledPolicy, Revocations]:
    """The policy and revocations of a verified bundle. The bundle revision is the policy revision
    every audit record names (the document's own `revision`, if any, is informational)."""
    raw = vb.files.get(POLICY_FILE)
    if raw is None:
        raise BundleError("bundle_missing_file", f"{POLICY_FILE} is not in the bundle")
    policy = load_policy(raw, source=f"{name}@{vb.revision}/{POLICY_FILE}",
                         revision=f"{name}@{vb.revision}", trust_domains=trust_domains,
                         stamp_revision=True)
    return policy, revocations(vb)


class BundleSource:
    """The active policy bundle of one sidecar worker (see the module docstring)."""

    source = "policy"

    def __init__(self, cfg: BundleConfig, *, trust_domains: frozenset[str], name: str | None = None,
                 count: Callable[[str], None] = lambda _r: None) -> None:
        self.cfg = cfg
        self.trust_domains = trust_domains
        self.bundle_name = name or (cfg.url.rstrip("/").rsplit("/", 1)[-1] if cfg.url else
                                    Path(cfg.path or "bundle").name.split(".")[0])
        self.name = f"policy bundle {cfg.url or cfg.path}"
        self.keys = load_public_keys(cfg.public_keys)
        self.count = count
        self.value: CompiledPolicy | None = None
        self.revocations: Revocations = EMPTY_REVOCATIONS
        self.active: VerifiedBundle | None = None
        self.etag: str | None = None
        self.last_success = 0.0
        self.last_error: str | None = None
        self.failures = 0
        self.persist_failures = 0
        self.max_staleness_s = 0.0
        self.on_change: Callable[[], None] = lambda: None
        self._file = None if cfg.path is None else FileSource(
            str(Path(cfg.path) / ".manifest.json") if Path(cfg.path).is_dir() else cfg.path)
        self._task: asyncio.Task | None = None
        self._session = None
        self._next_ssl: ssl.SSLContext | None = None

    # -- the verification/activation step, shared by every source ------------------------------
    def accept(self, bundle, now: float) -> bool:
        """Verify, compile and activate `bundle`; True when it became active. Raises BundleError /
        ConfigError / InvalidValue (the caller counts and logs)."""
        active = self.active
        vb = verify(bundle, public_keys=self.keys, require_signature=self.cfg.require_signature,
                    now=now, active_revision=active.revision if active else None,
                    active_digest=active.digest if active else None,
                    grace_s=self.cfg.expiry_grace_s)
        if vb.unchanged:
            return False
        policy, revoked = compile_bundle(vb, name=self.bundle_name, trust_domains=self.trust_domains)
        self.active, self.value, self.revocations = vb, policy, revoked
        self.etag = vb.digest
        log.info("policy bundle %s revision %d active (%d rules, %d revocations)",
                 self.bundle_name, vb.revision, len(policy.rules),
                 sum(map(len, (revoked.spiffe_ids, revoked.subjects, revoked.clients, revoked.jtis))))
        return True

    def _ok(self, now: float, result: str) -> None:
        self.last_success = now
        if self.last_error is not None:
            log.info("%s: recovered", self.name)
        self.last_error = None
        self.count(result)

    def _failed(self, reason: str) -> None:
        self.failures += 1
        if reason != self.last_error:
            verb = "keeping revision %s" % self.active.revision if self.active else "no bundle yet"
            log.error("%s: refresh failed (%s): %s", self.name, verb, reason)
        self.last_error = reason
        self.count("failed")

    # -- start: the persisted last good bundle ---------------------------------------------------
    def load_cached(self, now: float) -> bool:
        if self.cfg.cache_dir is None:
            return False
        from proxy.bundles.io import load_persisted

        try:
            bundle = load_persisted(self.cfg.cache_dir)
            if bundle is None:
                return False
            if self.accept(bundle, now):
                log.info("policy bundle %s: revision %d loaded from the cache %s",
                         self.bundle_name, self.active.revision, self.cfg.cache_dir)
                return True
        except (BundleError, ConfigError, InvalidValue, OSError) as exc:
            log.error("policy bundle cache %s unusable: %s", self.cfg.cache_dir, exc)
        return False

    def persist(self) -> None:
        if self.cfg.cache_dir is None or self.active is None:
            return
        from proxy.bundles.io import persist

        try:
            persist(self.active, self.cfg.cache_dir)
        except OSError as exc:  # disk full, read-only: the active bundle is unaffected
            self.persist_failures += 1
            self.count("persist_failed")  # portcullis_refresh_total{result="persist_failed"}
            log.error("cannot persist policy bundle revision %d to %s: %s",
                      self.active.revision, self.cfg.cache_dir, exc.strerror or exc)

    # -- local path ------------------------------------------------------------------------------
    def poll(self, now: float, force: bool = False) -> str:
        """Local path mode (called with the other file inputs, off the event loop)."""
        if self._file is None:
            return "unchanged" if self.value is not None else "failed"
        from proxy.bundles.io import read_bundle

        try:
            if not force and self.value is not None and not self._file.changed():
                self.last_success = now
                return "unchanged"
            self._file.read()
            changed = self.accept(read_bundle(self.cfg.path), now)
        except (BundleError, ConfigError, InvalidValue, OSError) as exc:
            if self._file is not None:
                self._file.forget()
            self._failed(f"{getattr(exc, 'code', type(exc).__name__)}: {exc}")
            return "failed"
        self._ok(now, "changed" if changed else "unchanged")
        if changed:
            self.persist()
        return "changed" if changed else "unchanged"

    def stale(self, now: float) -> bool:
        return self.value is None or (
            self.max_staleness_s > 0 and now - self.last_success > self.max_staleness_s)

    def expired(self, now: float) -> bool:
        vb = self.active
        return (vb is not None and vb.expires_at is not None
                and now >= vb.expires_at + self.cfg.expiry_grace_s)

    # -- control plane URL -----------------------------------------------------------------------
    def _new_session(self, ssl_context: ssl.SSLContext):
        import aiohttp

        if self.cfg.server_id is not None:
            expect_server_id(ssl_context, self.cfg.server_id)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=2),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s + self.cfg.long_poll_s))

    async def start_remote(self, ssl_context: ssl.SSLContext) -> None:
        self._session = self._new_session(ssl_context)
        await self.fetch(long_poll=False)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def set_tls(self, ssl_context: ssl.SSLContext) -> None:
        """The own SVID or the trust bundles changed: the next request to the control plane goes
        out on a new connection pool with `ssl_context` (a request in flight finishes on its
        connection). Without this, the client would keep presenting the SVID the process started
        with, and fail for good once that one expires."""
        if self._session is not None:
            self._next_ssl = ssl_context

    async def _renew_session(self) -> None:
        ctx, self._next_ssl = self._next_ssl, None
        if ctx is None or self._session is None:
            return
        old, self._session = self._session, self._new_session(ctx)
        await old.close()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            if not self.cfg.long_poll_s or self.last_error is not None:
                await asyncio.sleep(random.uniform(self.cfg.min_delay_s, self.cfg.max_delay_s))
            await self.fetch(long_poll=bool(self.cfg.long_poll_s))

    async def fetch(self, *, long_poll: bool) -> str:
        import aiohttp

        assert self._session is not None
        if self._next_ssl is not None:
            await self._renew_session()
        headers = {"Accept": "application/gzip"}
        if self.etag is not None and self.value is not None:
            headers["If-None-Match"] = f'"{self.etag}"'
            if long_poll:
                headers["Prefer"] = f"wait={self.cfg.long_poll_s}"
        now = time.time()
        try:
            async with self._session.get(self.cfg.url, headers=headers, allow_redirects=False) as r:
                if r.status == 304:
                    self._ok(time.time(), "unchanged")
                    await self._report()
                    return "unchanged"
                if r.status != 200:
                    raise BundleError("bundle_http_error", f"HTTP {r.status}")
                body = await r.content.read(self.cfg.max_bytes + 1)
                if len(body) > self.cfg.max_bytes:
                    raise BundleError("bundle_too_large", f"larger than {self.cfg.max_bytes} bytes")
            from proxy.bundles.io import read_targz_bytes

            now = time.time()
            # unpacking (gzip, tar, per-file limits) runs beside the loop too: for a large
            # policy it is tens of milliseconds the loop would otherwise stand still
            changed = await asyncio.to_thread(
                lambda: self.accept(read_targz_bytes(body), now))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, BundleError, ConfigError,
                InvalidValue) as exc:
            code = getattr(exc, "code", None) or type(exc).__name__
            self._failed(f"{code}: {exc}")
            await self._report()
            return "failed"
        self._ok(now, "changed" if changed else "unchanged")
        if changed:
            await asyncio.to_thread(self.persist)
            self.on_change()
        await self._report()
        return "changed" if changed else "unchanged"

    async def _report(self) -> None:
        if not self.cfg.report_status or self._session is None or self.cfg.url is None:
            return
        base = self.cfg.url.split("/bundles/", 1)[0]
        body = {"bundle": self.bundle_name,
                "active_revision": self.active.revision if self.active else None,
                "last_success": self.last_success or None, "last_error": self.last_error,
                "version": __version__}
        try:
            async with self._session.post(f"{base}/v1/status", data=json.dumps(body),
                                          headers={"Content-Type": "application/json"}) as r:
                if r.status >= 300:
                    log.debug("status report answered HTTP %d", r.status)
        except Exception as exc:  # best effort by design
            log.debug("status report failed: %r", exc)
