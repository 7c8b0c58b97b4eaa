"""Decision ids (runtime.listener._DecisionIds): 24 hex digits from the OS CSPRNG, buffered; unique
within a process and never shared by forked workers (the buffer is dropped in the child)."""

from __future__ import annotations

import os
import re

import pytest

from proxy.runtime import listener


def test_ids_are_24_hex_digits_and_unique_across_buffer_refills():
    ids = listener._DecisionIds()
    got = [ids.next() for _ in range(3 * 341 + 5)]  # crosses three refills
    assert all(re.fullmatch(r"[0-9a-f]{24}", x) for x in got)
    assert len(set(got)) == len(got)


# Python 3.12+ warns about fork() in a multi-threaded process (pytest's own threads): the child
# here only reads the generator, calls os.urandom and os.write, then os._exit: no lock is taken.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_worker_never_hands_out_the_parents_next_ids():
    listener._next_decision_id()  # the parent's buffer is filled: its next ids are decided
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what the module-level generator gives after fork
        try:
            os.write(w, ",".join(listener._next_decision_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 4096).decode().split(",")
    os.close(r)
    os.waitpid(pid, 0)
    parent = [listener._next_decision_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)
