"""Large policies loaded and dropped beside live traffic without stalling the event loop.

A 10,000-rule policy is ~3.8 MB of JSON and ~480,000 objects the cyclic collector tracks. The
event loop shares the GIL with the thread that loads it, so anything that holds the GIL for long
stalls every request in flight (`bench/bench_reload.py` measures it). Rules:
- `gc_paused()` around a load (parse + compile, in a worker thread):
  - the cyclic collector waits: collections would scan the whole growing heap while holding the
    GIL (100+ ms each). Reference counting still frees everything acyclic at once;
  - on leaving, everything allocated meanwhile joins the oldest generation without being scanned
    (`gc.freeze()` then `gc.unfreeze()`: two list splices). Left in the youngest generation, the
    new policy would be scanned whole by the next young collection and again by the next middle
    one, ~0.1-0.3 s of GIL each, right after every reload. Nothing is frozen for good: cyclic
    garbage that joined the oldest generation is still found by its next collection;
  - the interpreter's switch interval is 1 ms instead of 5 (also while a release runs): a thread
    that wants the GIL (the event loop) waits about that long, not 5 ms, for the busy one.
  Several threads may be inside at once (file policy and control plane bundle): the collector and
  the switch interval are restored when the last one leaves, the collector only if it was enabled
  before the first entered.
- `release_in_background(obj)`: the caller's last reference to a large, no longer used object
  graph (the State a reload replaced, with its policy) is dropped by a daemon thread a slice at a
  time. Dropped at once, a 10,000-rule policy is ~90 ms of deallocation in one C call, on
  whichever thread let go last (the event loop, when it swaps the State). The thread first lists
  the graph breadth-first, following only objects referenced by their parent alone (the
  reference count tells), so an object shared with anything still in use is never followed;
  then it lets go of the list a slice at a time, root first: each object freed has its children
  still held by the list, so no single step frees more than a slice. It starts once the caller's
  reference is gone (the root's reference count tells; it waits up to `RELEASE_WAIT_S`).
"""

from __future__ import annotations

import gc
import logging
import queue
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger("portcullis.gcquiet")

SWITCH_INTERVAL_S = 0.001  # while a load or a release runs beside the event loop
RELEASE_SLICE = 500  # objects let go of per step
RELEASE_WAIT_S = 10.0  # how long a release waits for the caller to let go of the root

class _WhileAny:
    """A process-wide setting held while any thread is inside: `enter()` runs when the first
    thread enters and returns what `leave(saved)` restores when the last one leaves."""

    def __init__(self, enter: Callable[[], Any], leave: Callable[[Any], None]) -> None:
        self._enter, self._leave = enter, leave
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: Any = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = self._enter()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._leave(self._saved)


def _shorten_switch_interval() -> float:
    was = sys.getswitchinterval()
    sys.setswitchinterval(min(was, SWITCH_INTERVAL_S))
    return was


def _pause_gc() -> bool:
    was = gc.isenabled()
    gc.disable()
    return was


def _resume_gc(was_enabled: bool) -> None:
    if was_enabled:
        gc.freeze()  # every generation -> the permanent one, unscanned
        gc.unfreeze()  # ... -> the oldest generation
        gc.enable()


_short_switch_interval = _WhileAny(_shorten_switch_interval, sys.setswitchinterval)
_gc_off = _WhileAny(_pause_gc, _resume_gc)


@contextmanager
def gc_paused() -> Iterator[None]:
    with _gc_off(), _short_switch_interval():
        yield


def _child_refs(obj: Any) -> list[tuple[Any, int]]:
    return [(c, sys.getrefcount(c)) for c in gc.get_referents(obj)]


# the count `_child_refs` sees for a child that only its parent refers to (calibrated: it depends
# on the interpreter's own temporary references)
_ALONE = _child_refs([object()])[0][1]
_probe = [object()]
_IN_BOX = sys.getrefcount(_probe[0])  # the count `release` sees for an object only its box holds
del _probe


def _graph(root: Any) -> list[Any]:
    """`root` and every object reachable from it through objects referenced by their parent
    alone, breadth-first."""
    out = [root]
    i = 0
    while i < len(out):
        for child, refs in _child_refs(out[i]):
            if refs == _ALONE:
                out.append(child)
        i += 1
    return out


class _Releaser:
    def __init__(self) -> None:
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.released = 0  # graphs let go of (tests and logs)

    def put(self, obj: Any) -> None:
        self.q.put(obj)
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.run, name="portcullis-release",
                                               daemon=True)
                self.thread.start()

    def run(self) -> None:
        while True:
            box = [self.q.get()]  # no frame of this thread may hold the root itself
            try:
                self.release(box)
            except Exception:  # never lose the thread over one graph
                log.exception("releasing a replaced object graph failed")

    def release(self, box: list[Any]) -> None:
        """Let go of the object in `box`, a slice at a time, once no one else refers to it."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + RELEASE_WAIT_S
        while sys.getrefcount(box[0]) > _IN_BOX and time.monotonic() < deadline:
            time.sleep(0.005)  # the caller's frame still holds it (or something else does:
            # then, past the deadline, the slices free what they can and its last holder the rest)
        with _short_switch_interval():
            objs = _graph(box.pop())
            n = len(objs)
            objs.reverse()  # root last: deleting from the end lets go of it first
            while objs:
                del objs[-RELEASE_SLICE:]
                time.sleep(0)  # let a waiting event loop have the GIL between slices
        self.released += 1
        log.debug("released %d objects in %.0f ms", n, (time.perf_counter() - t0) * 1000)


_releaser = _Releaser()


def release_in_background(obj: Any) -> None:
    """Take over the caller's reference to `obj` and drop it from a daemon thread, a slice at a
    time (see the module docstring). The caller must not keep using `obj`."""
    _releaser.put(obj)
