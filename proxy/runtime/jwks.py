"""Issuer keys (JWKS) fetched over HTTPS, kept fresh in the background, never on the hot path.

Rules (DESIGN rule 6; RFC 7517; RFC 9110 sections 8.8.3 and 13.1.2 for ETag / If-None-Match):
- Each issuer with a `jwks_url` has one `RemoteJwks`: a background task refreshes it every
  `refresh_interval_s` (+/- 10% jitter) with `If-None-Match`; 304 keeps the keys; a failure keeps
  the last good keys, is counted and retried with exponential backoff (capped at the interval).
- HTTPS only (an `http://` JWKS URL is refused at load), with the configured CA file or the system
  trust store, a timeout and a size cap. Redirects are not followed.
- An unknown `kid` in a token asks for ONE refresh: requests that arrive while it runs wait for the
  same fetch (single flight); unknown-kid refreshes happen at most once per
  `min_refresh_interval_s` (rate limit), so a flood of tokens with random kids costs at most one
  fetch per interval.
  Nothing ever blocks the event loop: callers `await` the in-flight future.
- The parsed key set object is replaced only when the content changed, so verified-token cache
  entries (keyed on the key set object) survive refreshes that brought nothing new.
- Past `max_staleness_s` without a successful refresh the issuer's keys are reported stale; the
  worker then fails closed for tokens of that issuer (503 `jwks_stale`) and /readyz turns red.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import time
from typing import Callable

import aiohttp

from proxy.core.jose import JWKSet, parse_jwks
from proxy.errors import InvalidValue
from proxy.runtime.tasks import cancel_and_wait

log = logging.getLogger("portcullis.jwks")


class RemoteJwks:
    def __init__(self, issuer: str, url: str, *, refresh_interval_s: float,
                 min_refresh_interval_s: float, max_staleness_s: float, timeout_s: float,
                 max_bytes: int, ca_file: str | None, on_change: Callable[[], None],
                 count: Callable[[str], None]) -> None:
        self.issuer = issuer
        self.url = url
        self.refresh_interval_s = refresh_interval_s
        self.min_refresh_interval_s = min_refresh_interval_s
        self.max_staleness_s = max_staleness_s
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.on_change = on_change
        self.count = count  # metrics: result label ("changed", "unchanged", "failed")
        self.value: JWKSet | None = None
        self.digest: str | None = None
        self.etag: str | None = None
        self.last_success = 0.0
        self.last_attempt = 0.0
        self.last_kid_refresh: float | None = None  # rate limit of unknown-kid refreshes
        self.last_error: str | None = None
        self.failures = 0
        self._inflight: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ssl = ssl.create_default_context(cafile=ca_file)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=2))
        await self.refresh("start")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            delay = self.refresh_interval_s
            if self.last_error is not None:  # backoff: 1, 2, 4 ... seconds, capped at the interval
                delay = min(self.refresh_interval_s, 2.0 ** min(self.failures - 1, 16))
            await asyncio.sleep(delay * random.uniform(0.9, 1.1))
            await self.refresh("interval")

    # -- refreshing ------------------------------------------------------------------------------
    def refresh(self, reason: str) -> "asyncio.Future[bool]":
        """Start (or join) a refresh; the future resolves True when the keys changed."""
        if self._inflight is not None and not self._inflight.done():
            return self._inflight
        loop = asyncio.get_running_loop()
        self._inflight = loop.create_task(self._fetch(reason))
        return self._inflight

    def refresh_for_unknown_kid(self) -> "asyncio.Future[bool] | None":
        """Single-flight, rate-limited refresh for a token whose kid is unknown; None when a refresh
        happened too recently (the caller then fails the token without waiting)."""
        if self._inflight is not None and not self._inflight.done():
            return self._inflight
        now = time.monotonic()
        if self.last_kid_refresh is not None and now - self.last_kid_refresh < self.min_refresh_interval_s:
            return None
        self.last_kid_refresh = now
        return self.refresh("unknown_kid")

    async def _fetch(self, reason: str) -> bool:
        self.last_attempt = time.monotonic()
        headers = {"Accept": "application/jwk-set+json, application/json"}
        if self.etag and self.value is not None:
            headers["If-None-Match"] = self.etag
        try:
            assert self._session is not None
            async with self._session.get(self.url, headers=headers, allow_redirects=False) as resp:
                if resp.status == 304 and self.value is not None:
                    return self._ok("unchanged")
                if resp.status != 200:
                    raise InvalidValue(f"HTTP {resp.status}")
                body = await resp.content.read(self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    raise InvalidValue(f"JWKS larger than {self.max_bytes} bytes")
                etag = resp.headers.get("ETag")
            digest = hashlib.sha256(body).hexdigest()
            if digest == self.digest and self.value is not None:
                self.etag = etag
                return self._ok("unchanged")
            keys = parse_jwks(body)
        except (aiohttp.ClientError, asyncio.TimeoutError, InvalidValue, OSError) as exc:
            self.failures += 1
            msg = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if msg != self.last_error:
                log.error("JWKS of %s (%s) refresh failed (%s; %s): %s", self.issuer, self.url,
                          reason, "keeping the last good keys" if self.value else "no keys yet", msg)
            self.last_error = msg
            self.count("failed")
            return False
        self.value, self.digest, self.etag = keys, digest, etag
        self._ok("changed")
        log.info("JWKS of %s: %d keys loaded (%s)", self.issuer, len(keys.keys), reason)
        self.on_change()
        return True

    def _ok(self, result: str) -> bool:
        self.last_success = time.time()
        self.failures = 0
        self.last_error = None
        self.count(result)
        return result == "changed"

    def stale(self, now: float) -> bool:
        return self.value is None or (self.max_staleness_s > 0
                                      and now - self.last_success > self.max_staleness_s)
