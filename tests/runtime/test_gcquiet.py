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
