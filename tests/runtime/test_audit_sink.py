"""proxy.runtime.audit_sink: a non-blocking writer over real pipes, verified with verify_lines."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.core.audit import AuditChain, format_time, verify_lines
from proxy.runtime.audit_sink import PIPE_BUF, AuditSink

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key()
REPO = Path(__file__).resolve().parents[2]


def rec(i: int, pad: int = 0) -> dict:
    return {"type": "decision", "time": "2026-11-28T14:00:00.123Z", "decision_id": f"d{i}",
            "request_id": f"r{i}", "method": "GET", "path": "/x" + "y" * pad,
            "decision": "allow", "code": "allowed", "duration_us": i}


class Reader:
    """Reads a pipe in a thread until EOF."""

    def __init__(self, fd: int) -> None:
        self.fd, self.chunks = fd, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Reader":
        self.thread.start()
        return self

    def _run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.chunks.append(chunk)

    def lines(self) -> list[bytes]:
        self.thread.join(30)
        assert not self.thread.is_alive(), "reader did not see EOF"
        return b"".join(self.chunks).splitlines(keepends=True)


def fill_pipe(w: int) -> None:
    """Fill the pipe so completely that even a 1-byte write blocks (blank lines: verify skips them)."""
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    for size in (65536, 4096, 1):
        try:
            while True:
                os.write(w, b"\n" * size)
        except BlockingIOError:
            pass
    fcntl.fcntl(w, fcntl.F_SETFL, flags)


async def wait_until(cond, guard_s: float = 20.0) -> None:
    """Poll `cond` (a deadlock guard, not a timing assertion)."""
    deadline = time.monotonic() + guard_s
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.002)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fds = {"r": r, "w": w}
    yield fds
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


def close_w(fds) -> None:
    os.close(fds.pop("w"))


def kinds(lines):
    return [orjson.loads(x)["type"] for x in lines if x.strip()]


# --------------------------------------------------------------------------------------------


async def test_blocked_reader_saturates_the_queue_while_the_loop_keeps_running(pipe):
    loop = asyncio.get_running_loop()
    fill_pipe(pipe["w"])
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"], max_queue_records=20)
    sink.start(loop)
    for i in range(19):
        sink.emit(rec(i))
    assert not sink.saturated and sink.saturated_events == 0
    sink.emit(rec(19))
    assert sink.saturated and sink.saturated_events == 1 and sink.queue_depth == 20

    ran = []
    loop.call_soon(ran.append, "loop alive")
    await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert ran == ["loop alive"]
    assert sink.records_written == 0 and sink._thread.is_alive()  # the writer is the one blocked

    drained = loop.create_future()
    sink.add_drain_waiter(lambda: drained.set_result(sink.queue_depth))
    await asyncio.sleep(0)
    assert not drained.done()

    reader = Reader(pipe["r"]).start()
    depth_at_drain = await asyncio.wait_for(drained, 30)
    assert depth_at_drain < 20 and not sink.saturated
    await sink.close()
    close_w(pipe)
    lines = reader.lines()
    report = verify_lines(lines, PUB)
    assert report.ok, report.problems
    assert kinds(lines) == ["decision"] * 20 + ["checkpoint"]
    assert (sink.records_emitted, sink.records_written, sink.checkpoints) == (20, 21, 1)
    assert sink.dropped == 0 and sink.queue_depth == 0 and sink.healthy


async def test_drain_waiter_runs_at_once_when_not_saturated(pipe):
    loop = asyncio.get_running_loop()
    sink = AuditSink(AuditChain("w1"), fd=pipe["w"])
    sink.start(loop)
    called = loop.create_future()
    sink.add_drain_waiter(lambda: called.set_result(True))
    assert await asyncio.wait_for(called, 10)
    reader = Reader(pipe["r"]).start()
    await sink.close()
    close_w(pipe)
    assert verify_lines(reader.lines(), None).ok


@pytest.mark.parametrize("emits, dropped", [(10, 0), (13, 3)])
async def test_past_the_hard_cap_records_are_counted_and_reported(pipe, capsys, emits, dropped):
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"], max_queue_records=5)
    for i in range(emits):  # not started: nothing leaves the queue, emit must still never raise
        sink.emit(rec(i))
    assert sink.dropped == dropped and sink.queue_depth == 10 and sink.saturated
    err = capsys.readouterr().err.splitlines()
    assert len([x for x in err if "DROPPED" in x]) == dropped
    if dropped:
        assert "decision_id=d10" in err[0] and "hard cap of 10" in err[0]

    reader = Reader(pipe["r"]).start()
    sink.start(asyncio.get_running_loop())
    await sink.close()
    close_w(pipe)
    lines = reader.lines()
    report = verify_lines(lines, PUB)
    assert report.ok, report.problems  # the chain has no gap: dropped records were never sealed
    notices = [orjson.loads(x) for x in lines if b'"audit_dropped"' in x]
    assert [n["dropped"] for n in notices] == ([dropped] if dropped else [])


async def test_emit_after_close_is_counted_and_reported(pipe, capsys):
    reader = Reader(pipe["r"]).start()
    sink = AuditSink(AuditChain("w1"), fd=pipe["w"])
    sink.start(asyncio.get_running_loop())
    await sink.close()
    sink.emit(rec(1))
    assert sink.dropped == 1
    assert "sink is closed" in capsys.readouterr().err
    close_w(pipe)
    assert verify_lines(reader.lines(), None).ok


def _broken_pipe_fd(fds) -> int:
    os.close(fds.pop("r"))
    return fds["w"]


def _read_only_fd(fds) -> int:
    fds["ro"] = os.open(os.devnull, os.O_RDONLY)
    return fds["ro"]


def _full_disk_fd(fds) -> int:
    fds["full"] = os.open("/dev/full", os.O_WRONLY)
    return fds["full"]


@pytest.mark.parametrize("make_fd", [_broken_pipe_fd, _read_only_fd, _full_disk_fd],
                         ids=["EPIPE", "EBADF", "ENOSPC"])
async def test_write_error_marks_unhealthy_logs_once_and_keeps_the_records(pipe, capsys, make_fd):
    fd = make_fd(pipe)
    sink = AuditSink(AuditChain("w1"), fd=fd, write_retry_s=0.001)
    sink.start(asyncio.get_running_loop())
    for i in range(3):
        sink.emit(rec(i))
    await wait_until(lambda: sink.write_errors >= 3)  # it keeps retrying
    assert not sink.healthy
    assert sink.records_written == 0 and sink.queue_depth == 3 and sink.dropped == 0
    await sink.close()
    err = capsys.readouterr().err.splitlines()
    assert len([x for x in err if "failed" in x]) == 1
    assert sink.dropped == 4  # 3 records + the final checkpoint, given up only at close...
    assert any("DROPPED 4 audit line(s) at close" in x for x in err)  # ...and never silently


async def test_sink_recovers_when_the_fd_becomes_writable_again(pipe, capsys):
    target = os.open("/dev/full", os.O_WRONLY)
    pipe["target"] = target
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=target, write_retry_s=0.001)
    sink.start(asyncio.get_running_loop())
    sink.emit(rec(1))
    await wait_until(lambda: not sink.healthy)
    reader = Reader(pipe["r"]).start()
    os.dup2(pipe["w"], target)  # the same fd number now points at a pipe that is read
    sink.emit(rec(2))
    await wait_until(lambda: sink.healthy and sink.records_written == 2)
    await sink.close()
    close_w(pipe)
    os.close(pipe.pop("target"))
    assert "recovered" in capsys.readouterr().err
    lines = reader.lines()
    assert verify_lines(lines, PUB).ok and kinds(lines) == ["decision", "decision", "checkpoint"]


@pytest.mark.parametrize("emits, checkpoints", [(2, 1), (3, 2), (7, 3)])
async def test_checkpoint_every_n_records(pipe, emits, checkpoints):
    reader = Reader(pipe["r"]).start()
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"], checkpoint_every_records=3)
    sink.start(asyncio.get_running_loop())
    for i in range(emits):
        sink.emit(rec(i))
    await sink.close()
    close_w(pipe)
    report = verify_lines(reader.lines(), PUB)
    assert report.ok and report.chains["w1"].checkpoints == checkpoints == sink.checkpoints


def test_checkpoint_every_t_seconds_only_when_records_were_written(pipe):
    now = [1000.0]
    chain = AuditChain("w1")
    sink = AuditSink(chain, fd=pipe["w"], checkpoint_every_s=60, clock=lambda: now[0])
    sink.tick()
    assert sink.checkpoints == 0  # nothing written yet
    sink.emit(rec(1))
    now[0] = 1059.9
    sink.tick()
    assert sink.checkpoints == 0  # not yet T seconds
    now[0] = 1060.0
    sink.tick()
    assert sink.checkpoints == 1 and chain.since_checkpoint == 0
    now[0] = 1200.0
    sink.tick()
    assert sink.checkpoints == 1  # nothing new since the last checkpoint
    sink.emit(rec(2))
    sink.tick()
    assert sink.checkpoints == 2 and sink.queue_depth == 4  # never started: all still queued


async def test_the_loop_timer_drives_time_checkpoints(pipe):
    reader = Reader(pipe["r"]).start()
    sink = AuditSink(AuditChain("w1"), fd=pipe["w"], checkpoint_every_s=0.01)
    sink.start(asyncio.get_running_loop())
    sink.emit(rec(1))
    await wait_until(lambda: sink.checkpoints >= 1)
    await sink.close()
    close_w(pipe)
    assert verify_lines(reader.lines(), None).ok


async def test_close_times_out_instead_of_hanging_on_a_reader_that_stopped(pipe, capsys):
    fill_pipe(pipe["w"])
    sink = AuditSink(AuditChain("w1"), fd=pipe["w"])
    sink.start(asyncio.get_running_loop())
    sink.emit(rec(1))
    await sink.close(timeout_s=0.05)
    assert "close timed out: 2 line(s) not yet written" in capsys.readouterr().err
    reader = Reader(pipe["r"]).start()  # let the daemon thread finish, then check nothing was lost
    sink._thread.join(30)
    close_w(pipe)
    assert verify_lines(reader.lines(), None).ok


async def test_non_blocking_fd_is_waited_on_not_an_error(pipe):
    os.set_blocking(pipe["w"], False)
    fill_pipe(pipe["w"])
    sink = AuditSink(AuditChain("w1"), fd=pipe["w"])
    sink.start(asyncio.get_running_loop())
    for i in range(50):
        sink.emit(rec(i, pad=200))
    reader = Reader(pipe["r"]).start()
    await sink.close()
    close_w(pipe)
    assert verify_lines(reader.lines(), None).ok
    assert sink.write_errors == 0 and sink.healthy and sink.records_written == 51


async def test_a_line_longer_than_pipe_buf_is_written_whole(pipe):
    reader = Reader(pipe["r"]).start()
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"])
    sink.start(asyncio.get_running_loop())
    sink.emit(rec(1))
    sink.emit(rec(2, pad=3 * PIPE_BUF))
    sink.emit(rec(3))
    await sink.close()
    close_w(pipe)
    lines = reader.lines()
    assert verify_lines(lines, PUB).ok and len(lines[1]) > 3 * PIPE_BUF


WORKER = textwrap.dedent("""
    import asyncio, sys
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from proxy.core.audit import AuditChain
    from proxy.runtime.audit_sink import AuditSink

    async def main(fd, name):
        key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
        sink = AuditSink(AuditChain(name, signer=key), fd=fd, checkpoint_every_records=50)
        sink.start(asyncio.get_running_loop())
        for i in range(400):
            sink.emit({"type": "decision", "i": i, "pad": "x" * (i * 37 % 1500)})
            if i % 25 == 0:
                await asyncio.sleep(0)
        await sink.close()

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
""")


def test_worker_processes_sharing_one_pipe_never_interleave_inside_a_line(pipe):
    reader = Reader(pipe["r"]).start()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pipe["w"]), f"w{n}"],
                              pass_fds=(pipe["w"],), cwd=REPO) for n in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    close_w(pipe)
    report = verify_lines(reader.lines(), PUB)
    assert report.ok, report.problems[:5]
    assert sorted(report.chains) == ["w0", "w1", "w2", "w3"]
    assert all(c.records == 400 and c.final for c in report.chains.values())


@pytest.mark.parametrize("kwargs", [
    {"max_queue_records": 0},
    {"checkpoint_every_records": 0},
    {"checkpoint_every_s": 0},
    {"write_retry_s": -1},
    {"on_full": "drop"},
])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        AuditSink(AuditChain("w1"), **kwargs)


def test_checkpoint_time_comes_from_the_injected_clock(pipe):
    sink = AuditSink(AuditChain("w1"), fd=pipe["w"], checkpoint_every_records=1,
                     clock=lambda: 1764338400.5)
    sink.emit(rec(1))
    assert sink.checkpoints == 1
    record, checkpoint = sink._pending  # never started: still waiting to be handed over
    assert orjson.loads(checkpoint)["type"] == "checkpoint"
    assert orjson.loads(checkpoint)["time"] == format_time(1764338400.5) == "2025-11-28T14:00:00.500Z"


# ---------------------------------------------------------------- direct writes from the loop


async def test_a_read_pipe_is_written_from_the_loop_without_waking_the_writer(pipe):
    reader = Reader(pipe["r"]).start()
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"], flush_interval_s=0)
    sink.start(asyncio.get_running_loop())
    assert sink.direct
    for i in range(30):
        sink.emit(rec(i, pad=i * 50))
        if i % 7 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sink.records_written == 30 and sink.queue_depth == 0
    assert sink._written_by_writer == 0  # every batch went out from the loop
    assert os.get_blocking(pipe["w"])  # the shared open file description is left as it was
    await sink.close()
    close_w(pipe)
    lines = reader.lines()
    assert verify_lines(lines, PUB).ok and kinds(lines) == ["decision"] * 30 + ["checkpoint"]


async def test_a_full_pipe_hands_over_to_the_writer_and_the_order_is_kept(pipe):
    fill_pipe(pipe["w"])
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"], flush_interval_s=0)
    sink.start(asyncio.get_running_loop())
    for i in range(5):
        sink.emit(rec(i))
    await asyncio.sleep(0.01)
    assert sink.records_written == 0 and sink.queue_depth == 5  # EAGAIN: the writer holds them
    for i in range(5, 8):  # the writer still holds lines: these must queue behind them
        sink.emit(rec(i))
    await asyncio.sleep(0)
    assert sink._written_direct == 0
    reader = Reader(pipe["r"]).start()
    await wait_until(lambda: sink.queue_depth == 0)
    sink.emit(rec(8))  # the writer is idle again: straight from the loop
    await asyncio.sleep(0)
    assert sink._written_direct == 1 and sink.records_written == 9
    await sink.close()
    close_w(pipe)
    lines = [x for x in reader.lines() if x.strip()]
    assert verify_lines(lines, PUB).ok
    assert [orjson.loads(x).get("decision_id") for x in lines] == [f"d{i}" for i in range(9)] + [None]


async def test_regular_file_and_dev_null_are_direct_terminals_and_sockets_are_not(tmp_path):
    import pty
    import socket
    loop = asyncio.get_running_loop()
    path = tmp_path / "audit.jsonl"
    master, slave = pty.openpty()
    a, b = socket.socketpair()
    fds = {"file": os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
           "null": os.open(os.devnull, os.O_WRONLY), "tty": slave, "socket": a.fileno()}
    try:
        sinks = {k: AuditSink(AuditChain(k, signer=KEY), fd=fd, flush_interval_s=0)
                 for k, fd in fds.items()}
        for s in sinks.values():
            s.start(loop)
        assert {k: s.direct for k, s in sinks.items()} == {
            "file": True, "null": True, "tty": False, "socket": False}
        for s in sinks.values():
            s.emit(rec(1))
        await asyncio.sleep(0)
        assert sinks["file"]._written_direct == 1 and sinks["null"]._written_direct == 1
        await wait_until(lambda: sinks["socket"].records_written == 1)
        assert sinks["socket"]._written_by_writer == 1
        for s in sinks.values():
            await s.close()
        assert verify_lines(path.read_bytes().splitlines(keepends=True), PUB).ok
        assert b.recv(65536).startswith(b'{"')
    finally:
        for fd in (fds["file"], fds["null"], master, slave):
            os.close(fd)
        a.close()
        b.close()


SHORT_WRITE = textwrap.dedent("""
    import asyncio, os, resource, signal, sys, orjson
    from proxy.core.audit import AuditChain, verify_lines
    from proxy.runtime.audit_sink import AuditSink

    async def main(path):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG, no signal
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        sink = AuditSink(AuditChain("w1"), fd=fd, write_retry_s=0.005, flush_interval_s=0)
        sink.start(asyncio.get_running_loop())
        assert sink.direct
        for i in range(6):  # ~350-byte lines, one batch, one write: cut at 1000 bytes
            sink.emit({"type": "decision", "decision_id": f"d{i}", "pad": "x" * 150})
        await asyncio.sleep(0)
        while sink.healthy:  # the writer got the tail of the cut line, and EFBIG
            await asyncio.sleep(0.005)
        head = open(path, "rb").read()
        whole = head.count(b"\\n")  # lines wholly before the cut
        assert len(head) == 1000 and head[-1:] != b"\\n" and 1 <= whole < 5, (len(head), whole)
        assert sink._written_direct == whole and sink.queue_depth == 6 - whole
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        while not sink.healthy or sink.queue_depth:
            await asyncio.sleep(0.005)
        await sink.close()
        lines = open(path, "rb").read().splitlines(keepends=True)
        report = verify_lines(lines, None)
        assert report.ok, report.problems
        assert [orjson.loads(x).get("decision_id") for x in lines] == [f"d{i}" for i in range(6)] + [None]
        assert sink.records_written == 7 and sink.dropped == 0
        print("ok")

    asyncio.run(main(sys.argv[1]))
""")


def test_a_short_direct_write_leaves_the_cut_line_to_the_writer_and_loses_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(tmp_path / "audit.jsonl")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


async def test_small_batches_wait_for_the_flush_interval_a_full_write_goes_at_once(pipe):
    reader = Reader(pipe["r"]).start()
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"], flush_interval_s=0.05)
    sink.start(asyncio.get_running_loop())
    for i in range(3):
        sink.emit(rec(i))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sink.records_written == 0 and sink.queue_depth == 3  # several iterations, one batch
    await wait_until(lambda: sink.records_written == 3)
    assert sink.queue_depth == 0
    n = 3
    while sink.records_written == 3:  # no await: only a full write's worth can flush now
        sink.emit(rec(n, pad=200))
        n += 1
    assert sink._pending_bytes == 0 and sink.records_written == n
    await sink.close()
    close_w(pipe)
    lines = reader.lines()
    assert verify_lines(lines, PUB).ok and kinds(lines) == ["decision"] * n + ["checkpoint"]
    total, first_full = 0, None
    for k, line in enumerate(lines[3:n], start=1):
        total += len(line)
        if total >= PIPE_BUF:
            first_full = k
            break
    assert n - 3 == first_full  # the emit that brought a write's worth wrote, and no earlier one


def test_flush_interval_is_bounded():
    for bad in (-0.001, 1.5):
        with pytest.raises(ValueError, match="flush_interval_s"):
            AuditSink(AuditChain("w1"), flush_interval_s=bad)


async def test_a_drain_waiter_released_by_a_direct_write_runs_after_the_flush(pipe):
    reader = Reader(pipe["r"]).start()
    sink = AuditSink(AuditChain("w1", signer=KEY), fd=pipe["w"], max_queue_records=3,
                     flush_interval_s=0.05)
    sink.start(asyncio.get_running_loop())
    for i in range(3):  # saturated by lines not yet flushed
        sink.emit(rec(i))
    assert sink.saturated
    ran = []

    def waiter() -> None:  # what the listener does: start the held requests (more records)
        ran.append(sink.queue_depth)
        sink.emit(rec(3))

    sink.add_drain_waiter(waiter)
    assert ran == []
    sink._flush()  # the direct write drains the queue...
    assert sink.queue_depth == 0 and ran == []  # ...and the waiter is not run inside the flush
    await wait_until(lambda: ran == [0])
    await sink.close()
    close_w(pipe)
    lines = reader.lines()
    assert verify_lines(lines, PUB).ok
    assert [orjson.loads(x).get("decision_id") for x in lines] == ["d0", "d1", "d2", "d3", None]
