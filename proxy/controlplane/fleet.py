"""Fleet status: what every sidecar last reported (`POST /v1/status`), for `GET /v1/fleet`.

Rules:
- A report is identified by the reporter's verified mTLS SPIFFE ID, never by anything in the body.
- The body is validated with `core.schema` (unknown keys and wrong types are 400 with every
  problem); `last_success` is POSIX seconds; `last_error` and `version` are kept to
  `MAX_TEXT_CHARS` (a long error message is cut, never a reason to lose the report).
- Reports live in memory only (a restarted control plane learns the fleet again within one report
  interval). At most `max_reporters` are kept; the least recently reporting one is forgotten first.
- A report older than `stale_after_s` is flagged `stale`; a sidecar whose active revision is lower
  than the bundle's current revision is flagged `behind`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from proxy.controlplane.config import BUNDLE_NAME
from proxy.core.schema import meta

MAX_TEXT_CHARS = 1024  # kept of `last_error` / `version` (longer values are cut, not refused)
MAX_INPUT_CHARS = 65536


def _bounded(v: str) -> str | None:
    return None if len(v) <= MAX_INPUT_CHARS else f"longer than {MAX_INPUT_CHARS} characters"


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The body of `POST /v1/status`."""

    bundle: str = field(metadata=meta(pattern=BUNDLE_NAME, doc="bundle name"))
    active_revision: int | None = field(default=None, metadata=meta(min=0, doc="installed revision (null: none yet)"))
    last_success: float | None = field(default=None, metadata=meta(min=0, doc="POSIX time of the last successful fetch"))
    last_error: str | None = field(default=None, metadata=meta(check=_bounded, doc="last fetch/verify problem"))
    version: str | None = field(default=None, metadata=meta(check=_bounded, doc="sidecar version"))


@dataclass(frozen=True, slots=True)
class _Entry:
    report: StatusReport
    received_at: float


class Fleet:
    def __init__(self, *, stale_after_s: float, max_reporters: int) -> None:
        self.stale_after_s = stale_after_s
        self.max_reporters = max_reporters
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def report(self, spiffe_id: str, report: StatusReport, now: float) -> None:
        cut = MAX_TEXT_CHARS
        if len(report.last_error or "") > cut or len(report.version or "") > cut:
            report = replace(report, last_error=report.last_error and report.last_error[:cut],
                             version=report.version and report.version[:cut])
        self._entries.pop(spiffe_id, None)
        self._entries[spiffe_id] = _Entry(report, now)
        while len(self._entries) > self.max_reporters:
            self._entries.popitem(last=False)

    def view(self, now: float, current_revision: Callable[[str], int | None]) -> dict[str, Any]:
        sidecars = []
        stale = behind = 0
        for spiffe_id in sorted(self._entries):
            e = self._entries[spiffe_id]
            r = e.report
            age = max(0.0, now - e.received_at)
            is_stale = age > self.stale_after_s
            current = current_revision(r.bundle)
            is_behind = current is not None and (r.active_revision or 0) < current
            stale += is_stale
            behind += is_behind
            sidecars.append({
                "spiffe_id": spiffe_id,
                "bundle": r.bundle,
                "active_revision": r.active_revision,
                "current_revision": current,
                "behind": is_behind,
                "last_success": r.last_success,
                "last_error": r.last_error,
                "version": r.version,
                "reported_at": e.received_at,
                "age_s": round(age, 3),
                "stale": is_stale,
            })
        return {"now": now, "stale_after_s": self.stale_after_s, "total": len(sidecars),
                "stale": stale, "behind": behind, "sidecars": sidecars}
