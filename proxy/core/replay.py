"""The replay / single-use store: the one mutable collaborator of the decision core (DESIGN section 3).

Protocol (`ReplayStore.seen(key, expires_at, now) -> bool`), atomically:
- True when `key` was recorded before and that record has not expired (`expires_at > now`): the
  caller must refuse the value (a replayed DPoP proof `jti`, RFC 9449 section 11.1; a reused
  transaction token).
- Otherwise the key is recorded until `expires_at` and False is returned.
- Keys are digests computed by the caller (SHA-256 of jti || key thumbprint || URI...), never raw
  values: a store never holds anything that could be replayed or that identifies a subject.
- A store that cannot record a key must not answer False: it raises `ReplayStoreFull` (503), so a
  value is never accepted without being remembered (fail closed).

`MemoryReplayStore` (the default; a shared store such as Redis implements the same protocol when
several replicas or worker processes must see each other's records):
- Bounded: at most `max_entries` live records. When it is full of unexpired records it raises
  `ReplayStoreFull`; it never evicts a live record to make room (evicting one would re-open the
  replay window of that value).
- A dict `key -> expires_at` answers `seen` in O(1). Expiry uses a time-bucketed wheel: a record
  goes into the bucket `floor(expires_at) // bucket_s + 1`, whose end time `bucket * bucket_s` is
  strictly after every `expires_at` in it (integer arithmetic: exact). A min-heap holds the bucket
  numbers (a few dozen for a one-minute window, whatever the number of records), so finding the
  oldest bucket is O(log buckets), independent of the number of records.
- Purging is lazy and incremental: each `seen` call frees at most `purge_budget` records from
  buckets that have fully expired (each record is freed once, and each call adds at most one, so
  the purge keeps up: O(1) amortised per call). Only when the store is full does one call purge
  every expired record (all fully expired buckets, then the expired records of the bucket that
  holds `now`: O(records per bucket)) before deciding whether to refuse. That pass also leaves a
  lower bound on every live record's expiry (the earliest expiry it kept, or the end of that
  bucket, whichever is first; an insert lowers it): until `now` reaches it no record can have
  expired, so a store that stays full refuses at O(1) per call, not one scan per refused value
  (overload must not make each refusal cost a bucket scan).
- A key that expired and is recorded again simply gets a new expiry (and a new bucket slot); the
  stale slot in its old bucket is recognised on purge (its current expiry is still in the future)
  and dropped without touching the live record.
- Memory bound, per live record on CPython 3.11 (64-bit), measured with tracemalloc for 100,000
  32-byte digests: ~150 bytes (the 32-byte `bytes` key 65 B, the `float` 24 B, the dict slot
  ~40-60 B at its load factor, the bucket list slot ~9 B). The default 100,000 records is ~15 MB;
  `tests/core/test_replay.py` holds it under 256 bytes per record.
  Sizing: records live for the proof acceptance window (~65 s for DPoP), so 100,000 records carry
  a sustained ~1,500 distinct proofs per second per process.
- The clock is an argument (`now`). A clock that steps back only keeps records longer; one that
  jumps forward expires them early (as any time-window check would).
- Not thread-safe: the sidecar runs one event loop per process and `seen` never awaits, so each
  call is atomic with respect to other requests of the same process. Records are per process:
  with `--workers N` a proof replayed to another worker is not detected (use a shared store).
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol, runtime_checkable

from proxy.errors import ReplayStoreFull

MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64


@runtime_checkable
class ReplayStore(Protocol):
    """Atomic check-and-record of single-use values (as digests)."""

    def seen(self, key: bytes, expires_at: float, now: float) -> bool:
        """True if `key` is recorded and unexpired; else record it until `expires_at`, return False.
        Raises `ReplayStoreFull` (a `ServiceUnavailable`) when it cannot record the key."""
        ...


class MemoryReplayStore:
    """Bounded in-memory `ReplayStore` (see the module docstring for the structure and its bound)."""

    __slots__ = ("max_entries", "bucket_s", "purge_budget", "_expiry", "_buckets", "_order",
                 "_live_until")

    def __init__(self, max_entries: int = 100_000, *, bucket_s: int = 1, purge_budget: int = 8) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError("max_entries must be a positive integer")
        if not isinstance(bucket_s, int) or bucket_s < 1:
            raise ValueError("bucket_s must be a positive integer")
        if not isinstance(purge_budget, int) or purge_budget < 2:
            raise ValueError("purge_budget must be an integer >= 2 (each call adds one record)")
        self.max_entries = max_entries
        self.bucket_s = bucket_s
        self.purge_budget = purge_budget
        self._expiry: dict[bytes, float] = {}
        self._buckets: dict[int, list[bytes]] = {}
        self._order: list[int] = []  # min-heap of the bucket numbers present in _buckets
        self._live_until = -math.inf  # no record expires before this (module docstring)

    def __len__(self) -> int:
        """Records held, including expired ones not purged yet."""
        return len(self._expiry)

    def seen(self, key: bytes, expires_at: float, now: float) -> bool:
        if type(key) is not bytes or not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise ValueError("replay keys are 16..64-byte digests")
        if not math.isfinite(expires_at):
            raise ValueError("expires_at must be a finite number")
        expiry = self._expiry
        exp = expiry.get(key)
        if exp is not None and exp > now:
            return True
        self._purge(now, self.purge_budget)
        if expires_at <= now:
            return False  # nothing to remember: the value is already outside its window
        if key not in expiry and len(expiry) >= self.max_entries:
            if now >= self._live_until:  # else nothing can have expired since it last looked
                self._purge(now, None)
                self._live_until = self._purge_current(now)
            if len(expiry) >= self.max_entries:
                raise ReplayStoreFull(detail=f"{len(expiry)} live records (max_entries)")
        expiry[key] = expires_at
        if expires_at < self._live_until:
            self._live_until = expires_at
        bucket = math.floor(expires_at) // self.bucket_s + 1
        slot = self._buckets.get(bucket)
        if slot is None:
            self._buckets[bucket] = [key]
            heapq.heappush(self._order, bucket)
        else:
            slot.append(key)
        return False

    def purge(self, now: float) -> int:
        """Free every expired record now (the store also does this by itself). Returns how many."""
        before = len(self._expiry)
        self._purge(now, None)
        self._live_until = self._purge_current(now)
        return before - len(self._expiry)

    def _purge(self, now: float, budget: int | None) -> None:
        order, buckets, expiry, width = self._order, self._buckets, self._expiry, self.bucket_s
        done = 0
        while order and order[0] * width <= now:
            slot = buckets[order[0]]
            while slot:
                if budget is not None and done >= budget:
                    return
                key = slot.pop()
                done += 1
                exp = expiry.get(key)
                if exp is not None and exp <= now:
                    del expiry[key]
            del buckets[heapq.heappop(order)]

    def _purge_current(self, now: float) -> float:
        """Free the expired records of the oldest remaining bucket, the one that holds `now` once
        `_purge` has run (its end is still ahead, so some of its records may be live). Returns a
        lower bound on the expiry of every record left: a record in a later bucket expires at or
        after this bucket's end, one kept here at or after the earliest expiry kept."""
        if not self._order:
            return math.inf  # no record at all
        start = (self._order[0] - 1) * self.bucket_s
        if start > now:
            return start  # no bucket holds `now`: every remaining record is live until then
        bucket = self._order[0]
        expiry, keep = self._expiry, []
        low = start + self.bucket_s  # the end of this bucket
        for key in self._buckets[bucket]:
            exp = expiry.get(key)
            if exp is None:
                continue  # a duplicate slot of a record freed just before
            if exp <= now:
                del expiry[key]
            else:
                keep.append(key)
                if exp < low:
                    low = exp
        if keep:
            self._buckets[bucket] = keep
        else:
            del self._buckets[heapq.heappop(self._order)]
        return low
