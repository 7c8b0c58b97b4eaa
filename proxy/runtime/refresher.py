"""Refreshable inputs that keep their last good value (DESIGN rule 6).

Rules:
- A refresh reads every source of the input, parses/validates it with a pure function and, only if
  that succeeds, replaces the value. A failure keeps the previous value, is counted
  (`portcullis_refresh_total{result="failed"}`) and logged with its reason (never with contents).
- An input whose last successful refresh is older than `max_staleness_s` (0 = never stale) makes
  the sidecar fail closed; an input that never loaded makes it not ready.
- Several files form one input (an SVID is cert + key): any of them changing re-reads all of them,
  and a failure forgets all stat keys so the next poll retries.
"""

from __future__ import annotations

import logging
from typing import Callable, Generic, Sequence, TypeVar

from proxy.errors import ConfigError, InvalidValue
from proxy.runtime.sources import FileSource

T = TypeVar("T")
log = logging.getLogger("portcullis.refresh")


class Refreshable(Generic[T]):
    def __init__(self, source: str, name: str, files: Sequence[FileSource],
                 parse: Callable[[list[bytes], list[str]], T], *, max_staleness_s: float = 0.0) -> None:
        self.source = source  # bounded metric label: svid | trust_bundle | policy
        self.name = name  # for logs: "trust bundle example.org"
        self.files = list(files)
        self.parse = parse
        self.max_staleness_s = max_staleness_s
        self.value: T | None = None
        self.digest: str | None = None
        self.last_success = 0.0
        self.last_error: str | None = None
        self.failures = 0

    def poll(self, now: float, force: bool = False) -> str:
        """Refresh if needed. Returns "changed", "unchanged" or "failed"."""
        try:
            if not force and self.value is not None and not any(f.changed() for f in self.files):
                self.last_success = now
                return "unchanged"
            reads = [f.read() for f in self.files]
            digest = "".join(r.digest for r in reads)
            if digest == self.digest and self.value is not None:
                self.last_success = now
                return "unchanged"
            value = self.parse([r.data for r in reads], [r.digest for r in reads])
        except OSError as exc:
            return self._failed(f"cannot read {getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}")
        except ConfigError as exc:
            return self._failed(str(exc))
        except InvalidValue as exc:
            return self._failed(str(exc))
        except ValueError as exc:  # e.g. YAML errors surface as ValueError subclasses
            return self._failed(str(exc))
        self.value, self.digest = value, digest
        self.last_success = now
        if self.last_error is not None:
            log.info("%s: recovered", self.name)
        self.last_error = None
        return "changed"

    def _failed(self, reason: str) -> str:
        for f in self.files:
            f.forget()
        self.failures += 1
        if reason != self.last_error:
            verb = "keeping the last good value" if self.value is not None else "not loaded"
            log.error("%s: refresh failed (%s): %s", self.name, verb, reason)
        self.last_error = reason
        return "failed"

    def stale(self, now: float) -> bool:
        return self.value is None or (
            self.max_staleness_s > 0 and now - self.last_success > self.max_staleness_s)
