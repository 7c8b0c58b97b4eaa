"""proxy.core.replay: the bounded single-use store (one test per rule of the module docstring)."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.replay import MemoryReplayStore, ReplayStore
from proxy.errors import ReplayStoreFull, ServiceUnavailable


def key(i: int | str) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def test_memory_store_implements_the_protocol() -> None:
    assert isinstance(MemoryReplayStore(), ReplayStore)


def test_first_use_is_recorded_and_a_second_use_within_expiry_is_seen() -> None:
    store = MemoryReplayStore()
    assert store.seen(key(1), expires_at=100.0, now=10.0) is False
    assert store.seen(key(1), expires_at=100.0, now=99.9) is True
    assert store.seen(key(2), expires_at=100.0, now=50.0) is False  # other keys are independent


def test_after_expiry_the_key_is_recorded_again() -> None:
    store = MemoryReplayStore()
    assert store.seen(key(1), 100.0, now=10.0) is False
    assert store.seen(key(1), 200.0, now=100.0) is False  # expired exactly at expires_at
    assert store.seen(key(1), 300.0, now=150.0) is True  # the new record holds until 200


def test_a_value_already_outside_its_window_is_not_recorded() -> None:
    store = MemoryReplayStore()
    assert store.seen(key(1), expires_at=5.0, now=10.0) is False
    assert len(store) == 0


@pytest.mark.parametrize("bad", ["jti-raw-value", b"short", b"x" * 65, bytearray(32)],
                         ids=["str", "short", "long", "bytearray"])
def test_keys_are_digests_not_raw_values(bad) -> None:
    with pytest.raises(ValueError):
        MemoryReplayStore().seen(bad, 100.0, 0.0)


@pytest.mark.parametrize("expires_at", [float("inf"), float("nan")])
def test_expiry_must_be_finite(expires_at: float) -> None:
    with pytest.raises(ValueError):
        MemoryReplayStore().seen(key(1), expires_at, 0.0)


def test_full_of_live_records_fails_closed_and_forgets_nothing() -> None:
    store = MemoryReplayStore(max_entries=3)
    for i in range(3):
        assert store.seen(key(i), 100.0, now=0.0) is False
    with pytest.raises(ReplayStoreFull) as info:
        store.seen(key("new"), 100.0, now=1.0)
    err = info.value
    assert isinstance(err, ServiceUnavailable) and err.status == 503
    assert err.code == "replay_store_full"
    assert ("Retry-After", "5") in err.extra_headers
    for i in range(3):  # every live record is still there
        assert store.seen(key(i), 100.0, now=2.0) is True


def test_full_store_purges_expired_records_before_refusing() -> None:
    store = MemoryReplayStore(max_entries=3)
    for i in range(3):
        store.seen(key(i), 10.0, now=0.0)
    assert store.seen(key("new"), 100.0, now=10.0) is False
    assert len(store) == 1


def test_purge_is_lazy_and_incremental() -> None:
    store = MemoryReplayStore(max_entries=1000, purge_budget=8)
    for i in range(100):
        store.seen(key(i), 10.0, now=0.0)
    store.seen(key("a"), 100.0, now=20.0)  # one call frees at most `purge_budget` records
    assert len(store) == 100 + 1 - 8
    for i in range(20):
        store.seen(key(("b", i)), 100.0, now=20.0)
    assert len(store) == 1 + 20  # ...and repeated calls catch up
    assert store.purge(now=200.0) == 21


def test_a_stale_bucket_slot_never_removes_a_live_record() -> None:
    store = MemoryReplayStore()
    store.seen(key(1), 5.0, now=0.0)
    store.seen(key(1), 50.0, now=6.0)  # expired, recorded again: its old slot is stale
    store.purge(now=10.0)
    assert store.seen(key(1), 50.0, now=10.0) is True


def test_memory_per_record_is_bounded() -> None:
    n = 20_000
    tracemalloc.start()
    try:
        store = MemoryReplayStore(max_entries=n)
        for i in range(n):
            store.seen(hashlib.sha256(i.to_bytes(4, "big")).digest(), 1000.5 + i % 65, now=999.0)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == n
    assert used / n < 256


def test_constructor_validates_its_bounds() -> None:
    for kwargs in ({"max_entries": 0}, {"bucket_s": 0}, {"purge_budget": 1}):
        with pytest.raises(ValueError):
            MemoryReplayStore(**kwargs)


ops = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 30), st.integers(0, 3)),
               min_size=1, max_size=120)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 5))
def test_answers_like_an_unbounded_model_until_full(seq, bucket_s) -> None:
    """With a clock that never goes back, the store answers exactly like a plain dict model, and
    when it refuses, the model indeed holds max_entries live records."""
    store = MemoryReplayStore(max_entries=6, bucket_s=bucket_s, purge_budget=2)
    model: dict[bytes, float] = {}
    now = 0.0
    for k, ttl, step in seq:
        now += step * 0.7
        exp = now + ttl * 0.9
        live = {kk: e for kk, e in model.items() if e > now}
        kb = key(k)
        if kb in live:
            assert store.seen(kb, exp, now) is True
            continue
        if exp > now and len(live) >= 6:
            with pytest.raises(ReplayStoreFull):
                store.seen(kb, exp, now)
            model = live
            continue
        assert store.seen(kb, exp, now) is False
        model = live
        if exp > now:
            model[kb] = exp


class _CountingStore(MemoryReplayStore):
    __slots__ = ("scans",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scans = 0

    def _purge_current(self, now: float) -> float:
        self.scans += 1
        return super()._purge_current(now)


def test_a_store_that_stays_full_refuses_without_rescanning() -> None:
    """Overload must not make every refusal cost a scan of the current bucket: after one full
    pass, nothing can expire before the earliest expiry it kept, so later refusals are O(1)."""
    store = _CountingStore(max_entries=500)
    for i in range(500):
        store.seen(key(i), 60.2 + i / 1000, now=0.0)  # all in the bucket that holds t=60
    for n in range(200):
        with pytest.raises(ReplayStoreFull):
            store.seen(key(("new", n)), 200.0, now=60.0 + n / 10_000)  # before 60.2: none expired
    assert store.scans == 1
    # time reaches the earliest expiry: the store looks again, frees what expired, records
    assert store.seen(key("later"), 200.0, now=60.25) is False
    assert store.scans == 2
    assert store.seen(key(0), 200.0, now=60.25) is False  # expired at 60.2: a new record
    assert store.seen(key(499), 200.0, now=60.25) is True  # live until 60.699


def test_an_insert_lowers_the_bound_of_a_full_store() -> None:
    """A record recorded after the full pass may expire before what that pass saw: the refusal
    shortcut must not outlive it (else a freed slot would stay unused)."""
    store = MemoryReplayStore(max_entries=2)
    store.seen(key("a"), 100.0, now=0.0)
    store.seen(key("b"), 5.0, now=0.0)
    with pytest.raises(ReplayStoreFull):
        store.seen(key("c"), 100.0, now=1.0)  # full pass: bound is 5.0 (b)
    assert store.seen(key("c"), 100.0, now=6.0) is False  # b expired: freed, c recorded
    with pytest.raises(ReplayStoreFull):
        store.seen(key("d"), 100.0, now=7.0)  # refused at once: nothing expires before 100.0
    store.purge(now=150.0)  # both expired and freed
    store.seen(key("e"), 151.0, now=150.0)  # an insert earlier than any bound seen
    store.seen(key("f"), 300.0, now=150.0)
    with pytest.raises(ReplayStoreFull):
        store.seen(key("g"), 300.0, now=150.5)
    assert store.seen(key("g"), 300.0, now=151.0) is False  # e expired at 151.0: its slot is free
