"""One coarse timer for every connection of a worker.

Rules: the hot path never creates or cancels a timer handle; a connection just stores
`deadline` (loop time, `inf` when none) and this sweeper calls `on_deadline()` on the ones past it,
a few times per second. Timeouts are therefore precise to about `interval_s`, which is what
header, idle and upstream response timeouts need.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("portcullis.deadlines")


class HasDeadline(Protocol):
    deadline: float

    def on_deadline(self) -> None: ...


class Sweeper:
    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.25) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self.members: set[HasDeadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def add(self, member: HasDeadline) -> None:
        self.members.add(member)

    def discard(self, member: HasDeadline) -> None:
        self.members.discard(member)

    def _tick(self) -> None:
        now = self.loop.time()
        expired = [m for m in self.members if m.deadline <= now]
        for m in expired:
            try:
                m.on_deadline()
            except Exception:  # a bug in one connection must not stop every other timeout
                log.exception("deadline handler failed")
        self._handle = self.loop.call_later(self.interval_s, self._tick)
