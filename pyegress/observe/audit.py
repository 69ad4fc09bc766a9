"""The output path for audit records and log lines: bounded, non-blocking, counted.

Everything this process writes as JSON lines goes through one :class:`LineSink`. Lines
put on an event loop gather there for :data:`BATCH_DELAY` seconds and are written as one
text. Where a write can wait (a pipe, a terminal, a socket) the loop tries it without
waiting (``RWF_NOWAIT``) while no earlier batch is queued, and a writer thread writes
what that left, in order; when lines are queued past the capacity they are dropped
and counted (per event), and the count is reported in an ``audit_dropped`` line once the
sink has room again, so a stalled stdout pipe never stops a tunnel and never loses a
record silently. Where a write cannot wait for a reader (a regular file, whose writes go
to the page cache, or ``/dev/null``) the loop writes the batch itself: no thread, no
hand-off, one system call per batch.

Sinks: a text stream (stdout) and a file rotated by size (``path``, ``path.1`` … ).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import json
import os
import stat
import sys
import threading
import time
from asyncio import _get_running_loop
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from pyegress.errors import ConfigError

DEFAULT_CAPACITY = 100_000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 5
BATCH_DELAY = 0.005  # seconds an event loop gathers lines before the writer gets them

# Wall time anchored once to the monotonic clock: record times never jump backwards
# when the system clock is stepped.
_WALL_ANCHOR = time.time() - time.monotonic()


def wall_time(monotonic: float | None = None) -> float:
    return _WALL_ANCHOR + (time.monotonic() if monotonic is None else monotonic)


# The last whole second formatted, and its text: one tuple, replaced as a whole (the
# writer thread formats times too).
_second: tuple[int, str] = (-1, "")


def iso_time(monotonic: float | None = None) -> str:
    """UTC, microseconds, ``Z`` suffix (the date and time of day formatted once a
    second: records are written several times per tunnel)."""
    global _second
    moment = wall_time(monotonic)
    second = int(moment // 1)
    cached = _second
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _second = cached
    micros = min(999_999, int((moment - second) * 1_000_000))
    return f"{cached[1]}.{micros:06d}Z"


def cap(text: str | None, limit: int) -> str | None:
    """Attacker-controlled text, capped (JSON encoding escapes control characters)."""
    if text is None:
        return None
    return text if len(text) <= limit else text[:limit] + "..."


class Sink(Protocol):
    # True when a write never waits for a reader (see :func:`never_waits`): the event
    # loop may write to it itself.
    inline: bool

    def write(self, text: str) -> None: ...

    def close(self) -> None: ...


def never_waits(fd: int) -> bool:
    """Whether writes to ``fd`` go to a regular file or ``/dev/null``: they never wait
    for a reader, unlike a pipe's, a terminal's or a socket's."""
    try:
        mode = os.fstat(fd)
        if stat.S_ISREG(mode.st_mode):
            return True
        return stat.S_ISCHR(mode.st_mode) and mode.st_rdev == os.stat(os.devnull).st_rdev
    except OSError:
        return False


def stream_fd(stream: Any) -> int:
    """The descriptor under a text stream, or -1 (a ``StringIO``, a wrapper)."""
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return -1


class Attempt(enum.Enum):
    """What :meth:`StreamSink.try_write` did."""

    DONE = "done"  # all of it is written
    KEPT = "kept"  # a part is; the rest is kept for the next write(), which must follow
    LATER = "later"  # nothing is: write it later (the writer thread)


class StreamSink:
    """A text stream (stdout). Several processes may write to one (``--workers``), each
    batch of whole lines with one ``write``: to a regular file such writes do not
    interleave; to a pipe or a terminal they may, past PIPE_BUF bytes, so there every
    writer holds ``lock_path`` (an ``flock`` on a file all of them open) while it writes.
    The lock file's first byte says a write is under way (``1``): a writer that finds it
    set took the lock from one that died inside a write (a SIGKILL, or a stop while the
    pipe was full), so it ends that cut line with a newline before its own.

    A pipe or a terminal can also be tried without waiting (:meth:`try_write`,
    ``RWF_NOWAIT``): the event loop writes a batch itself while the reader keeps up."""

    def __init__(self, stream: TextIO, lock_path: str | None = None) -> None:
        self._stream = stream
        self._fd = stream_fd(stream)
        self.inline = self._fd >= 0 and never_waits(self._fd)
        self._lock = -1
        if lock_path is not None and self._fd >= 0 and not self.inline:
            try:
                self._lock = os.open(lock_path, os.O_RDWR)
            except OSError as exc:
                raise ConfigError(
                    f"cannot open the stdout lock file {lock_path}: {exc.strerror or exc}"
                ) from None
        # Whether try_write may try (not for a file: that is written inline anyway).
        self.can_try = self._fd >= 0 and not self.inline and hasattr(os, "RWF_NOWAIT")
        self._rest = b""  # what try_write left, with the lock still held

    def write(self, text: str) -> None:
        if self._fd < 0:
            self._stream.write(text)
            self._stream.flush()
            return
        rest, self._rest = self._rest, b""  # try_write's rest: the lock is held for it
        try:
            if self._lock >= 0 and not rest:
                fcntl.flock(self._lock, fcntl.LOCK_EX)
                if self._begin():
                    self._write_all(b"\n")  # a cut line from a writer that died
            self._write_all(rest)  # before anything else, the stream's buffer included
            self._stream.flush()
            self._write_all(text.encode("utf-8", "replace"))
            if self._lock >= 0:
                os.pwrite(self._lock, b"0", 0)  # the write is whole
        finally:
            if self._lock >= 0:
                fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _begin(self) -> bool:
        """(lock held) Mark a write under way; True when the last one was cut."""
        cut = os.pread(self._lock, 1, 0) == b"1"
        os.pwrite(self._lock, b"1", 0)
        return cut

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def try_write(self, text: str) -> Attempt:
        """Write ``text`` now if that needs no waiting (not for the lock, not for room
        in the pipe). A part written keeps the lock and the rest for the next
        :meth:`write`, so nothing can come between them."""
        if not self.can_try or self._rest:
            return Attempt.LATER
        if self._lock >= 0:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another process is writing
                return Attempt.LATER
            try:
                cut = self._begin()
            except OSError:
                cut = True
            if cut:  # mending a cut line may wait: the writer thread does it
                fcntl.flock(self._lock, fcntl.LOCK_UN)
                return Attempt.LATER
        data = text.encode("utf-8", "replace")
        try:
            self._stream.flush()
            written = os.pwritev(self._fd, [data], -1, os.RWF_NOWAIT)
        except (BlockingIOError, ValueError):  # full, or a closed stream (write() says so)
            written = 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE):
                self.can_try = False  # this kernel or this file cannot: the thread writes
            written = 0
        if written == len(data):
            result = Attempt.DONE
        elif written:
            self._rest = data[written:]
            return Attempt.KEPT  # the lock stays held, the mark set, for the rest
        else:
            result = Attempt.LATER
        if self._lock >= 0:
            with contextlib.suppress(OSError):
                os.pwrite(self._lock, b"0", 0)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        return result

    def close(self) -> None:
        self._stream.flush()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


class RotatingFileSink:
    """Append to ``path``; before a write would pass ``max_bytes``, shift ``path`` to
    ``path.1`` (``path.1`` to ``path.2`` …) keeping ``backups`` old files."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max(1, max_bytes)
        self.backups = max(0, backups)
        self._file = open(self.path, "a", encoding="ascii")  # noqa: SIM115 - closed in close()
        self._size = self._file.tell()
        self.inline = never_waits(self._file.fileno())

    def write(self, text: str) -> None:
        if self._size + len(text) <= self.max_bytes:  # ASCII: characters are bytes
            self._append(text)
        else:  # a batch that crosses the limit: rotate between its lines
            for line in text.splitlines(keepends=True):
                if self._size and self._size + len(line) > self.max_bytes:
                    self._file.flush()
                    self._rotate()
                self._append(line)
        self._file.flush()

    def _append(self, text: str) -> None:
        self._file.write(text)
        self._size += len(text)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "a", encoding="ascii")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()


Counter = Callable[[str], None]
BatchCounter = Callable[[str, int], None]  # (event, how many lines of it)


def _ignore_batch(_event: str, _count: int) -> None:
    pass


def _ignore(_event: str) -> None:
    return None


class LineSink:
    """A bounded queue of finished lines (see the module text).

    Lines put from a thread running an event loop gather there for
    :data:`BATCH_DELAY` seconds and are written as one text: by the loop itself when
    the sink is ``inline``, else by the writer thread, which wakes once per batch and
    only to write it (every wake-up is a GIL hand-off the event loop pays for). Lines
    put from anywhere else are written at once (inline) or go to the writer at once."""

    def __init__(
        self,
        sink: Sink,
        capacity: int = DEFAULT_CAPACITY,
        on_written: BatchCounter = _ignore_batch,
        on_dropped: Counter = _ignore,
    ) -> None:
        self._sink = sink
        self._capacity = capacity
        self._inline = sink.inline
        # A pipe's batch is first tried without waiting, by the thread that gathered it.
        self._try = sink.try_write if isinstance(sink, StreamSink) and sink.can_try else None
        self._pending: list[tuple[str, str]] = []  # the loop thread's batch
        self._batch_loop: asyncio.AbstractEventLoop | None = None  # gathers _pending
        self._batcher = 0  # the ident of its thread
        self._batches: deque[tuple[str, dict[str, int], int]] = deque()
        self._queued = 0  # lines handed to the writer and not yet written
        self._count_lock = threading.Lock()
        self._write_lock = threading.Lock()  # held by whoever writes to the sink
        self._wake = threading.Event()
        self._closing = False
        self._dropped: dict[str, int] = {}
        self._dropped_total = 0
        self._reported_drops = 0
        self.on_written = on_written
        self.on_dropped = on_dropped
        self._thread: threading.Thread | None = None
        if not self._inline:
            self._thread = threading.Thread(target=self._run, name="pyegress-writer", daemon=True)
            self._thread.start()

    @property
    def dropped(self) -> int:
        return self._dropped_total

    @property
    def inline(self) -> bool:
        """Whether batches are written by the thread that gathered them (no writer thread)."""
        return self._inline

    def put(self, event: str, line: str) -> bool:
        """Queue one line (no trailing newline); False when it was dropped."""
        pending = self._pending
        if len(pending) + self._queued >= self._capacity or self._closing:
            self._dropped[event] = self._dropped.get(event, 0) + 1
            self._dropped_total += 1
            self.on_dropped(event)
            return False
        loop = _get_running_loop()
        if loop is None:  # no loop here to gather a batch on
            self._hand_over([(event, line)])
            return True
        if pending:
            if loop is self._batch_loop:
                pending.append((event, line))
                return True
            if threading.get_ident() != self._batcher:  # another thread's loop gathers
                self._hand_over([(event, line)])
                return True
            self._flush()  # this thread's earlier loop ended before its batch went out
        self._batcher = threading.get_ident()
        self._batch_loop = loop
        self._pending.append((event, line))
        loop.call_later(BATCH_DELAY, self._flush)
        return True

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self._hand_over(batch)

    def _hand_over(self, lines: list[tuple[str, str]]) -> None:
        events: dict[str, int] = {}
        for event, _ in lines:
            events[event] = events.get(event, 0) + 1
        text = "\n".join([line for _, line in lines]) + "\n"
        if self._inline:
            with self._write_lock:
                self._write_batch(text, events)
            return
        if self._try is not None and self._queued == 0 and self._write_lock.acquire(False):
            try:  # the writer is idle: try the write here
                if self._queued == 0:
                    text = self._with_drop_report(text)
                    attempt = self._try(text)
                    if attempt is Attempt.DONE:
                        self._count(events)
                        return
                    if attempt is Attempt.KEPT:
                        text = ""  # the writer writes the rest first
                    self._queue(text, events, len(lines))  # before another thread's
                    return
            finally:
                self._write_lock.release()
        self._queue(text, events, len(lines))

    def _queue(self, text: str, events: dict[str, int], count: int) -> None:
        with self._count_lock:
            self._queued += count
        self._batches.append((text, events, count))
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._batches:
                text, events, count = self._batches.popleft()
                with self._write_lock:
                    self._write_batch(text, events)
                with self._count_lock:
                    self._queued -= count
            if self._closing and not self._batches:
                return

    def _write_batch(self, text: str, events: dict[str, int]) -> None:
        self._emit(self._with_drop_report(text))
        self._count(events)

    def _with_drop_report(self, text: str) -> str:
        """``text``, and an ``audit_dropped`` line when lines were dropped since the last."""
        if self._dropped_total != self._reported_drops:
            self._reported_drops = self._dropped_total
            text += self._drop_line() + "\n"
        return text

    def _count(self, events: dict[str, int]) -> None:
        for event, written in events.items():
            self.on_written(event, written)

    def _drop_line(self) -> str:
        return json.dumps(
            {
                "event": "audit_dropped",
                "level": "error",
                "ts": iso_time(),
                "dropped_total": self._dropped_total,
                "dropped_by_event": dict(self._dropped),
            }
        )

    def _emit(self, text: str) -> None:
        try:
            self._sink.write(text)
        except (OSError, ValueError) as exc:  # a closed or broken sink: say so once
            print(f"pyegress: audit sink failed: {exc}", file=sys.stderr)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the thread."""
        self._flush()
        self._closing = True
        if self._thread is not None:
            self._wake.set()
            self._thread.join(timeout)
            if self._thread.is_alive():  # still inside a write: keep its lock to the end
                return
        self._sink.close()


def _encoder() -> Callable[[Any], str]:
    """ASCII JSON without spaces, ``str()`` for other types: the C encoder made once
    (``JSONEncoder.encode`` builds one per call) and without the cycle check, as
    records are trees built afresh."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the _json accelerator
        return json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str).encode
    ascii_text = json.encoder.encode_basestring_ascii
    chunks = make(None, str, ascii_text, None, ":", ",", False, False, True)

    def encode(record: Any) -> str:
        return "".join(chunks(record, 0))

    return encode


encode_json = _encoder()
encode_string = json.encoder.encode_basestring_ascii  # a JSON string literal, ASCII


class Output:
    """Where records and log lines go: ``log`` lines always to ``logs``; audit records
    to ``audit`` (the same sink unless an audit file is configured)."""

    def __init__(self, logs: LineSink, audit: LineSink | None = None) -> None:
        self.logs = logs
        self.audit = audit or logs

    def line(self, event: str, line: str) -> bool:
        """An audit record already encoded (one JSON object, no newline)."""
        return self.audit.put(event, line)

    def close(self) -> None:
        if self.audit is not self.logs:
            self.audit.close()
        self.logs.close()
