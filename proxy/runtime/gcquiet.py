"""The cyclic garbage collector paused while a policy is parsed and compiled.

Rules:
- Parsing and compiling a large policy (10,000 rules: ~600,000 tracked objects) in a worker
  thread triggers collections that scan the whole heap while holding the GIL, so the event loop,
  which shares the GIL, stalls for 100+ ms at a time (`bench/bench_reload.py`). Inside
  `gc_paused()` only the cyclic collector waits: reference counting still frees everything
  acyclic at once, and the collector runs normally again afterwards.
- Several threads may be inside at once (file policy and control plane bundle): the collector is
  re-enabled when the last one leaves, and only if it was enabled before the first entered.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
