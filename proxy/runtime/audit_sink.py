"""The audit sink: seals records on the event loop, writes JSON lines to a fd without blocking it.

Rules (DESIGN.md section 6; chain format in `proxy.core.audit`):
- `emit()` runs on the event loop thread. It seals the record there (so the chain order is the
  order of decisions) and queues the line. It never blocks and never raises because the queue is
  full. Lines are written in batches (`_flush`): at once when a write's worth (PIPE_BUF bytes)
  is waiting, else `flush_interval_s` (2 ms) after the first line of a batch was sealed, so that
  under load one write carries the records of several loop iterations. A batch is written:
  - directly from the loop, when the write cannot block and nothing is waiting in the writer
    thread (so the order of lines is kept): the fd is a pipe or FIFO, reopened as a private
    non-blocking open file description (`/proc/self/fd/N`: O_NONBLOCK on it does not touch the
    description that other processes share), a regular file (a page-cache copy, as nginx writes
    its access log: only a stalled disk can hold it up), or /dev/null.
    A write that would block (EAGAIN: the reader is behind) or fails hands the lines, from the
    first unwritten one, to the writer thread. This is the common case, and it costs no thread
    wake-up and no GIL hand-over per batch (`bench/ab.py`: -6% CPU per request under wrk with
    the same batching; -8% at 1,000 req/s, where each request is alone in its loop iteration,
    together with the other hot-path changes of the same day);
  - otherwise by one daemon thread, the only place that waits on a blocking `os.write` (a
    socket, a terminal, a full pipe, a failing fd).
- Writes are batches of whole lines of at most PIPE_BUF bytes, so the lines of several worker
  processes sharing one stdout pipe never interleave (POSIX write(2): writes of at most PIPE_BUF
  bytes to a pipe are atomic). A line longer than PIPE_BUF is written alone; partial writes are
  completed; a non-blocking fd is waited on with poll().
- Bounded by policy, not by loss: `saturated` is True while `queue_depth >= max_queue_records`; the
  listener then applies the configured `on_full` ("backpressure": stop admitting; "fail_closed":
  answer 503 while `can_record_refusal`, i.e. while the refusal itself can still be recorded, and
  stop admitting past that). `emit()` still accepts records of requests already in flight up to a hard cap of
  twice that. Past the cap a record is NOT sealed (the chain stays verifiable), is counted in
  `dropped`, and is named on stderr; when the queue is back under the cap a `type: "audit_dropped"`
  record is sealed into the chain with the count, so the log itself shows the loss.
- A write error (EPIPE, EBADF, ENOSPC...) marks the sink unhealthy (the runtime fails closed),
  is counted in `write_errors` and logged on stderr once per episode; the batch is kept and retried
  every `write_retry_s`; success makes the sink healthy again. At `close()` a batch that still
  cannot be written is given up: counted in `dropped` and reported on stderr.
- Checkpoints: every `checkpoint_every_records` records (checked in `emit`), every
  `checkpoint_every_s` seconds when records were sealed since the last one (a loop timer calling
  `tick()`), and a final one in `close()`.
- Counters are plain ints, each written by one thread only (loop: emitted, checkpoints, saturated
  events, dropped by the cap; writer: written, write errors, dropped at close).
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import stat
import sys
import threading
import time
from typing import Callable, Literal

from proxy.core.audit import AuditChain, format_time

PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)
_STOP = object()


def _log(message: str) -> None:
    """One line on stderr (looked up at call time so a redirected stderr is honoured)."""
    try:
        sys.stderr.write(f"portcullis audit: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class AuditSink:
    """Non-blocking audit writer for one worker process. See the module docstring for the rules."""

    def __init__(
        self,
        chain: AuditChain,
        *,
        fd: int = 1,
        max_queue_records: int = 10000,
        on_full: Literal["backpressure", "fail_closed"] = "backpressure",
        checkpoint_every_records: int = 1000,
        checkpoint_every_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        write_retry_s: float = 1.0,
        flush_interval_s: float = 0.002,
    ) -> None:
        if max_queue_records < 1 or checkpoint_every_records < 1:
            raise ValueError("max_queue_records and checkpoint_every_records must be >= 1")
        if checkpoint_every_s <= 0 or write_retry_s <= 0:
            raise ValueError("checkpoint_every_s and write_retry_s must be > 0")
        if not 0 <= flush_interval_s <= 1:
            raise ValueError("flush_interval_s must be between 0 and 1")
        if on_full not in ("backpressure", "fail_closed"):
            raise ValueError("on_full must be 'backpressure' or 'fail_closed'")
        self.chain = chain
        self.fd = fd
        self.max_queue_records = max_queue_records
        self.hard_cap = 2 * max_queue_records
        self.on_full = on_full
        self.checkpoint_every_records = checkpoint_every_records
        self.checkpoint_every_s = checkpoint_every_s
        self.write_retry_s = write_retry_s
        self.flush_interval_s = flush_interval_s
        self._clock = clock
        # stats (plain ints; read by the metrics module at scrape time)
        self.records_emitted = 0
        self._written_by_writer = 0  # writer thread: lines it wrote
        self._written_direct = 0  # loop thread: lines written directly by _flush
        self.checkpoints = 0
        self.write_errors = 0
        self.saturated_events = 0
        self.dropped_by_cap = 0  # loop thread: past the hard cap, or emitted after close
        self.dropped_unwritable = 0  # writer thread: given up at close after write errors
        self.healthy = True
        # internals
        self._q: queue.SimpleQueue = queue.SimpleQueue()  # batches (lists of lines) or _STOP
        self._pending: list[bytes] = []  # sealed, not yet written or handed over (one batch)
        self._pending_bytes = 0
        self._flush_timer: asyncio.Handle | None = None
        self._enqueued = 0  # lines handed to the writer (loop thread only)
        self._was_saturated = False
        self._drops_pending = 0  # dropped since the last audit_dropped record
        self._last_checkpoint_at = clock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = threading.Event()
        self._closed = False
        self._done: asyncio.Future | None = None
        self._done_loop: asyncio.AbstractEventLoop | None = None
        self._drain_waiters: list[Callable[[], object]] = []
        self._want_drain = False  # set by the loop, read by the writer
        self._wfd = fd  # the fd written to (a private non-blocking one for a pipe, see start())
        self._own_wfd = False  # _wfd was opened here; the writer thread closes it when it ends
        self._direct = False  # _flush may write from the loop (see the module docstring)
        self._handed = 0  # loop thread: lines handed to the writer thread

    # ---------------------------------------------------------------- state read by the listener

    @property
    def records_written(self) -> int:
        """Lines fully written: records and checkpoints."""
        return self._written_direct + self._written_by_writer

    @property
    def direct(self) -> bool:
        """Whether batches are written from the loop when the writer thread is idle."""
        return self._direct

    @property
    def queue_depth(self) -> int:
        """Lines sealed but not yet written (records and checkpoints)."""
        return self._enqueued - self.records_written - self.dropped_unwritable

    @property
    def dropped(self) -> int:
        """Records that will never reach the fd; every one was also reported on stderr."""
        return self.dropped_by_cap + self.dropped_unwritable

    @property
    def saturated(self) -> bool:
        return self.queue_depth >= self.max_queue_records

    @property
    def can_record_refusal(self) -> bool:
        """Room to record a fail-closed refusal: up to halfway between the soft limit and the
        hard cap. Past it the listener holds new requests back even in fail_closed mode, so the
        other half of the margin stays free for exchanges already in flight."""
        return self.queue_depth < self.max_queue_records + (self.hard_cap - self.max_queue_records) // 2

    # ---------------------------------------------------------------- lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread and the checkpoint timer (lines emitted before are kept)."""
        if self._thread is not None:
            return
        self._loop = loop
        self._open_direct()
        self._thread = threading.Thread(target=self._run, name="portcullis-audit", daemon=True)
        self._thread.start()
        self._flush()
        self._arm_timer(self.checkpoint_every_s)

    async def close(self, timeout_s: float | None = 10.0) -> None:
        """Write the final checkpoint, flush everything, stop the writer thread.

        If the fd does not accept the lines within `timeout_s` (a reader that stopped reading),
        the number of unwritten lines is reported on stderr and close returns; the daemon thread
        keeps trying until the process exits.
        """
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self.start(loop)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drops_pending:
            self._seal_drop_notice()
        self._enqueue(self.chain.checkpoint(format_time(self._clock()), final=True))
        self.checkpoints += 1
        self._closed = True
        self._flush()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._done_loop = loop
        self._done = loop.create_future()
        self._closing.set()
        self._q.put(_STOP)
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout_s)
        except asyncio.TimeoutError:
            _log(f"close timed out: {self.queue_depth} line(s) not yet written to fd {self.fd}")
            return
        assert self._thread is not None
        self._thread.join()

    # ---------------------------------------------------------------- the hot path (loop thread)

    def emit(self, record: dict, *, owned: bool = False) -> None:
        """Seal `record` now and queue its line. Never blocks; never raises on a full queue.

        A record outside the canonical domain (floats, non-JSON values) raises ValueError: that
        is a bug in the caller, not a runtime condition. `owned=True`: the caller built the record
        for this call only and hands it over (`AuditChain.seal_owned`: no copy, no re-scan).
        """
        if self._closed:
            self._drop(record, "the sink is closed")
            return
        if self.queue_depth >= self.hard_cap:
            self._drop(record, f"queue past its hard cap of {self.hard_cap} lines")
            return
        if self._drops_pending:
            self._seal_drop_notice()
        self._enqueue(self.chain.seal_owned(record) if owned else self.chain.seal(record))
        self.records_emitted += 1
        if self.chain.since_checkpoint >= self.checkpoint_every_records:
            self._checkpoint()
        if self.saturated:
            if not self._was_saturated:
                self._was_saturated = True
                self.saturated_events += 1
        else:
            self._was_saturated = False

    def tick(self) -> None:
        """Write a checkpoint if records were sealed and `checkpoint_every_s` has passed."""
        if self._closed or self.chain.since_checkpoint == 0:
            return
        if self._clock() - self._last_checkpoint_at >= self.checkpoint_every_s:
            self._checkpoint()

    def add_drain_waiter(self, callback: Callable[[], object]) -> None:
        """Call `callback()` once, on the loop, as soon as the sink is no longer saturated."""
        assert self._loop is not None, "start() the sink first"
        if not self.saturated:
            self._loop.call_soon(callback)
            return
        self._drain_waiters.append(callback)
        self._want_drain = True
        if not self.saturated:  # the writer may have drained between the check and the flag
            self._loop.call_soon(self._run_drain_waiters)

    # ---------------------------------------------------------------- loop-thread helpers

    def _enqueue(self, line: bytes) -> None:
        # lines travel as batches: one write (or one queue put) per PIPE_BUF bytes or per
        # flush_interval_s, whichever comes first, not one per record or per loop iteration
        self._enqueued += 1
        self._pending.append(line)
        self._pending_bytes += len(line)
        loop = self._loop
        if loop is None or self._closed:
            return  # start() or close() flushes
        if self._pending_bytes >= PIPE_BUF:
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = loop.call_later(self.flush_interval_s, self._on_flush_timer) \
                if self.flush_interval_s else loop.call_soon(self._on_flush_timer)

    def _on_flush_timer(self) -> None:
        self._flush_timer = None
        self._flush()

    def _open_direct(self) -> None:
        """Decide whether `_flush` may write from the loop, and on which fd."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return  # the writer thread reports the failing fd
        mode = st.st_mode
        if stat.S_ISREG(mode):
            self._direct = True
        elif stat.S_ISCHR(mode):
            # /dev/null; never a terminal (flow control can stop it)
            self._direct = not os.isatty(self.fd) and st.st_rdev == _dev_null_rdev()
        elif stat.S_ISFIFO(mode):
            try:
                wfd = os.open(f"/proc/self/fd/{self.fd}",
                              os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # no /proc, or a FIFO without a reader: the writer thread only
                return
            if os.fstat(wfd).st_ino != st.st_ino:  # pragma: no cover - not the same pipe
                os.close(wfd)
                return
            self._wfd, self._own_wfd, self._direct = wfd, True, True

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self._pending_bytes = 0
        if self._direct and self._handed == self._written_by_writer + self.dropped_unwritable:
            # the writer thread holds nothing: writing here keeps the order
            batch = self._write_direct(batch)
        if batch:  # what is left goes to the writer, behind everything it already holds
            self._handed += len(batch)
            self._q.put(batch)
        if self._want_drain and not self.saturated and self._loop is not None:
            # drained by a direct write: waiters run later, never inside a flush (they start
            # requests whose records would otherwise be written ahead of lines in hand here)
            self._want_drain = False
            self._loop.call_soon(self._run_drain_waiters)

    def _write_direct(self, batch: list[bytes]) -> list[bytes]:
        """Write whole lines, at most PIPE_BUF bytes per write (atomic on a pipe), until a write
        would block or fails. Returns what is left for the writer thread, one item per line; a
        line cut by a short write is left as its unwritten tail (so every line is counted once)."""
        fd, i, n = self._wfd, 0, len(batch)
        while i < n:
            start, size = i, len(batch[i])
            if size > PIPE_BUF:
                return batch[i:]  # a long line is never atomic on a pipe: the writer's job
            i += 1
            while i < n and size + len(batch[i]) <= PIPE_BUF:
                size += len(batch[i])
                i += 1
            try:
                written = os.write(fd, batch[start] if i - start == 1 else b"".join(batch[start:i]))
            except OSError:  # EAGAIN (the reader is behind) or an error: the writer takes over
                return batch[start:]
            if written < size:  # a short write (a file at its size limit, say)
                j = start
                while written >= len(batch[j]):
                    written -= len(batch[j])
                    j += 1
                self._written_direct += j - start
                return [batch[j][written:], *batch[j + 1:]]
            self._written_direct += i - start
        return []

    def _checkpoint(self) -> None:
        now = self._clock()
        self._enqueue(self.chain.checkpoint(format_time(now)))
        self.checkpoints += 1
        self._last_checkpoint_at = now

    def _drop(self, record: dict, why: str) -> None:
        self.dropped_by_cap += 1
        self._drops_pending += 1
        ids = " ".join(f"{k}={record.get(k)}" for k in ("type", "decision_id", "request_id")
                       if record.get(k) is not None)
        _log(f"DROPPED audit record ({why}; {self.dropped} dropped in total): {ids}")

    def _seal_drop_notice(self) -> None:
        count, self._drops_pending = self._drops_pending, 0
        if self.chain.closed:
            return
        self._enqueue(self.chain.seal({
            "type": "audit_dropped", "time": format_time(self._clock()), "dropped": count,
            "dropped_total": self.dropped_by_cap}))

    def _arm_timer(self, delay: float) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(max(delay, 0.001), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        self.tick()
        elapsed = self._clock() - self._last_checkpoint_at
        next_in = self.checkpoint_every_s - elapsed
        self._arm_timer(next_in if 0 < next_in <= self.checkpoint_every_s
                        else self.checkpoint_every_s)

    def _run_drain_waiters(self) -> None:
        if not self._drain_waiters:
            return
        if self.saturated:  # filled up again before we ran: wait for the next drain
            self._want_drain = True
            if not self.saturated:
                assert self._loop is not None
                self._loop.call_soon(self._run_drain_waiters)
            return
        waiters, self._drain_waiters = self._drain_waiters, []
        for cb in waiters:
            cb()

    # ---------------------------------------------------------------- writer thread

    def _notify_written(self, lines: int) -> None:
        self._written_by_writer += lines
        if self._want_drain and not self.saturated:
            self._want_drain = False
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._run_drain_waiters)
                except RuntimeError:  # loop closed meanwhile
                    pass

    def _run(self) -> None:
        try:
            self._write_loop()
        except Exception as exc:  # a bug: never let it pass silently, never hang close()
            self.healthy = False
            _log(f"writer thread crashed ({type(exc).__name__}: {exc}); "
                 f"{self.queue_depth} line(s) not written")
        finally:
            if self._own_wfd:  # after _STOP nothing writes to it any more (close() sent it)
                self._own_wfd = False
                try:
                    os.close(self._wfd)
                except OSError:
                    pass
            self._finish()

    def _write_loop(self) -> None:
        q = self._q
        while True:
            item = q.get()
            if item is _STOP:
                return
            lines: list[bytes] = item
            stop = False
            while True:  # take every batch already waiting: fewer, fuller writes
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                lines.extend(nxt)
            i, n = 0, len(lines)
            while i < n:  # whole lines, at most PIPE_BUF bytes per write (one line alone if larger)
                start, size = i, len(lines[i])
                i += 1
                while i < n and size + len(lines[i]) <= PIPE_BUF:
                    size += len(lines[i])
                    i += 1
                data = lines[start] if i - start == 1 else b"".join(lines[start:i])
                if not self._write_all(data):
                    self._give_up(n - start, stop)
                    return
                self._notify_written(i - start)
            if stop:
                return

    def _write_all(self, data: bytes) -> bool:
        """Write `data` fully; retry on errors until it works or the sink is closing."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._wfd, view)
            except BlockingIOError:  # someone made the fd non-blocking: wait until writable
                poller = select.poll()
                poller.register(self._wfd, select.POLLOUT)
                poller.poll(1000)
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                self.write_errors += 1
                if self.healthy:
                    self.healthy = False
                    _log(f"write to fd {self.fd} failed ({exc.strerror or exc}); sink unhealthy, "
                         f"{self.queue_depth} line(s) kept and retried")
                if self._closing.is_set():
                    return False
                self._closing.wait(self.write_retry_s)
                continue
            view = view[n:]
        if not self.healthy:
            self.healthy = True
            _log(f"write to fd {self.fd} recovered; sink healthy again")
        return True

    def _give_up(self, in_hand: int, stop: bool) -> None:
        """At close, after a failed final attempt: count every line still held as dropped."""
        lost = in_hand
        if not stop:
            while True:
                item = self._q.get()
                if item is _STOP:
                    break
                lost += len(item)
        self.dropped_unwritable += lost
        _log(f"DROPPED {lost} audit line(s) at close: fd {self.fd} cannot be written")

    def _finish(self) -> None:
        loop, done = self._done_loop, self._done
        if loop is None or done is None or loop.is_closed():
            return

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:
            pass


def _dev_null_rdev() -> int:
    try:
        return os.stat(os.devnull).st_rdev
    except OSError:
        return -1
