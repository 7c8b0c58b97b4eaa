"""runtime.gcquiet: the cyclic collector paused around policy parse + compile, and restored."""

from __future__ import annotations

import gc
import threading

import pytest

from proxy.runtime import inputs, policy_load
from proxy.runtime.gcquiet import gc_paused


@pytest.fixture(autouse=True)
def _collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_and_restored_after_even_on_error() -> None:
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("compile failed")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_overlapping_threads_reenable_only_when_the_last_leaves() -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with gc_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with gc_paused():
            second_in.set()
            first_out.wait(5)
            seen["after_first_left"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after_first_left": False} and gc.isenabled()


def test_the_policy_file_is_parsed_and_compiled_with_the_collector_paused(monkeypatch) -> None:
    seen = []
    real = policy_load.compile_policy_bytes  # reads and compiles

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(policy_load, "compile_policy_bytes", spy)
    text = b'{"version": 1, "rules": [{"id": "r", "effect": "allow", ' \
           b'"from": {"workloads": ["spiffe://example.org/a"]}, "to": [{"paths": ["/"]}]}]}'
    policy = inputs.parse_policy_file(text, "0" * 64, source="p",
                                      trust_domains=frozenset({"example.org"}))
    assert seen == [False] and gc.isenabled() and policy.revision.startswith("sha256:")


def test_the_switch_interval_is_short_inside_and_restored_after() -> None:
    import sys

    from proxy.runtime import gcquiet
    before = sys.getswitchinterval()
    with gc_paused():
        assert sys.getswitchinterval() == min(before, gcquiet.SWITCH_INTERVAL_S)
        with gc_paused():
            pass
        assert sys.getswitchinterval() == min(before, gcquiet.SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == before


def test_what_a_load_allocates_joins_the_oldest_generation_unscanned() -> None:
    """Left young, a new policy would be scanned whole by the next young collections (the
    reload stall of bench_reload.py); nothing stays frozen."""
    scans = []

    def spy(phase, info):
        if phase == "stop":
            scans.append(info["generation"])

    with gc_paused():
        policy = [[i] for i in range(1000)]  # stands for a compiled policy
    assert gc.get_freeze_count() == 0
    assert any(o is policy for o in gc.get_objects(generation=2))
    assert not any(o is policy for o in gc.get_objects(generation=0))
    gc.callbacks.append(spy)
    try:
        gc.collect(0)
        gc.collect(1)
    finally:
        gc.callbacks.remove(spy)
    assert scans == [0, 1] and any(o is policy for o in gc.get_objects(generation=2))


def test_cyclic_garbage_made_during_a_load_is_still_collected() -> None:
    import weakref

    class Node:
        pass

    with gc_paused():
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
    assert gone() is not None  # a cycle: only the collector frees it
    gc.collect()
    assert gone() is None


# -- release_in_background --------------------------------------------------------------------

class _Node:
    __slots__ = ("kids", "__weakref__")

    def __init__(self, kids=()) -> None:
        self.kids = list(kids)


def _tree(depth: int, fan: int) -> _Node:
    return _Node(_tree(depth - 1, fan) for _ in range(fan)) if depth else _Node()


def _walk(node: _Node) -> list[_Node]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.kids)
    return out


def test_a_released_graph_is_freed_a_slice_at_a_time_root_first(monkeypatch) -> None:
    import weakref

    from proxy.runtime import gcquiet
    root = _tree(4, 4)  # 341 nodes (+ their lists)
    nodes = _walk(root)
    refs = [weakref.ref(n) for n in nodes]
    del nodes
    alive_at: list[int] = []
    monkeypatch.setattr(gcquiet, "RELEASE_SLICE", 50)
    real_sleep = gcquiet.time.sleep

    def boundary(s):
        if s == 0:
            alive_at.append(sum(r() is not None for r in refs))
        else:
            real_sleep(s)

    monkeypatch.setattr(gcquiet.time, "sleep", boundary)
    box = [root]
    del root
    gcquiet._Releaser().release(box)
    assert all(r() is None for r in refs)
    # freed in many steps, none larger than a slice, the root in the first
    assert len(alive_at) >= 10 and alive_at == sorted(alive_at, reverse=True)
    steps = [a - b for a, b in zip([len(refs)] + alive_at, alive_at)]
    assert max(steps) <= 50 and refs[0]() is None and alive_at[0] < len(refs)


def test_what_something_else_still_holds_is_not_freed(monkeypatch) -> None:
    import weakref

    from proxy.runtime import gcquiet
    shared = _tree(2, 3)  # also held by the new state, say
    root = _Node([_tree(2, 3), shared, _tree(2, 3)])
    kept = [weakref.ref(n) for n in _walk(shared)]
    shape = [len(n.kids) for n in _walk(shared)]
    dropped = weakref.ref(root.kids[0])
    walked = gcquiet._graph(root)
    assert not any(o is shared for o in walked)  # never followed into what others hold
    assert sum(type(o) is _Node for o in walked) == 1 + 13 * 2
    del walked
    monkeypatch.setattr(gcquiet, "RELEASE_SLICE", 5)
    box = [root]
    del root
    gcquiet._Releaser().release(box)
    assert dropped() is None and all(r() is not None for r in kept)
    assert [len(n.kids) for n in _walk(shared)] == shape == [3, 3, 0, 0, 0] + [3, 0, 0, 0] * 2


def test_a_release_waits_until_the_caller_let_go(monkeypatch) -> None:
    import time
    import weakref

    from proxy.runtime import gcquiet
    obj = _tree(3, 3)
    leaf = weakref.ref(obj.kids[0].kids[0])
    released = gcquiet._releaser.released
    gcquiet.release_in_background(obj)  # `obj` is still held by this frame
    time.sleep(0.2)
    assert leaf() is not None and gcquiet._releaser.released == released  # still waiting
    del obj
    deadline = time.monotonic() + 5
    while (leaf() is not None or gcquiet._releaser.released == released) and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    assert leaf() is None and gcquiet._releaser.released == released + 1


def test_a_graph_held_elsewhere_past_the_wait_is_freed_by_its_last_holder(monkeypatch) -> None:
    import weakref

    from proxy.runtime import gcquiet
    monkeypatch.setattr(gcquiet, "RELEASE_WAIT_S", 0.05)
    obj = _tree(3, 3)
    holder = [obj]
    leaf = weakref.ref(obj.kids[2].kids[2])
    box = [obj]
    del obj
    gcquiet._Releaser().release(box)  # gives up waiting, frees nothing still reachable
    assert leaf() is not None and len(holder[0].kids) == 3
    holder.clear()
    assert leaf() is None


def test_a_replaced_compiled_policy_is_freed_entirely(monkeypatch) -> None:
    from proxy.core.policy import compile_policy
    from proxy.core.policy.model import CompiledPolicy, CompiledRule, PolicyIndex
    from proxy.runtime import gcquiet
    from tests.factories import DEFAULT_POLICY

    def alive() -> tuple[int, int, int]:
        objs = gc.get_objects()  # holds this frame, which holds it: cleared before returning
        counts = tuple(sum(type(o) is t for o in objs)
                       for t in (CompiledPolicy, PolicyIndex, CompiledRule))
        objs.clear()
        return counts  # type: ignore[return-value]

    baseline = alive()
    policy = compile_policy(DEFAULT_POLICY, revision="r1")
    n = len(policy.rules)  # (not inside an assert: pytest's rewriting would keep a reference)
    assert alive() == (baseline[0] + 1, baseline[1] + 1, baseline[2] + n)
    monkeypatch.setattr(gcquiet, "RELEASE_SLICE", 3)
    gc.disable()  # reference counting alone must free it
    try:
        box = [policy]
        del policy
        gcquiet._Releaser().release(box)
        assert alive() == baseline
    finally:
        gc.enable()
