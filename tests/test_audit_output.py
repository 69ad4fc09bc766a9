"""The audit output path: bounded queue, counted drops, size rotation, escaping."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyegress.observe.audit import LineSink, Output, RotatingFileSink, cap, encode_json
from pyegress.tunnel import Tunnel, decision_fields


class _StuckSink:
    """A sink whose writes block until released: a stalled stdout pipe."""

    inline = False

    def __init__(self) -> None:
        self.release = threading.Event()
        self.text: list[str] = []

    def write(self, text: str) -> None:
        self.release.wait(10)
        self.text.append(text)

    def close(self) -> None:
        pass


def test_a_stalled_sink_never_blocks_the_caller_and_every_drop_is_counted() -> None:
    sink = _StuckSink()
    dropped: list[str] = []
    lines = LineSink(sink, capacity=10, on_dropped=dropped.append)
    started = time.monotonic()
    accepted = sum(lines.put("close", json.dumps({"n": i})) for i in range(1000))
    assert time.monotonic() - started < 1.0  # the caller never waited on the sink
    assert accepted + len(dropped) == 1000
    assert 10 <= accepted <= 11  # one batch may already be in the writer's hands
    assert set(dropped) == {"close"}
    sink.release.set()
    lines.close()
    written = "".join(sink.text).splitlines()
    records = [json.loads(line) for line in written]
    assert [r for r in records if "n" in r] == [{"n": i} for i in range(accepted)]
    report = [r for r in records if r.get("event") == "audit_dropped"]
    assert report
    assert report[-1]["dropped_total"] == len(dropped)
    assert lines.dropped == len(dropped)


def test_file_sink_rotates_by_size_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = LineSink(RotatingFileSink(path, max_bytes=1000, backups=2))
    output = Output(lines)
    for i in range(100):
        assert output.line("close", encode_json({"event": "close", "n": i, "pad": "x" * 50}))
    output.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 1000
    kept = [json.loads(x)["n"] for n in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl")
            for x in (tmp_path / n).read_text().splitlines()]  # fmt: skip
    assert kept == list(range(100 - len(kept), 100))  # newest records, in order


def test_records_are_ascii_json_with_control_characters_escaped(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    output = Output(LineSink(RotatingFileSink(path, 10**6, 1)))
    host = 'evil\r\n{"event":"decision"}\x00\u202e.test'
    output.line("decision", encode_json({"requested": {"host": cap(host, 253)}}))
    output.line("decision", encode_json({"requested": {"host": cap("a" * 1000, 253)}}))
    output.close()
    raw = path.read_bytes()
    assert raw.isascii()
    first, second = (json.loads(line) for line in raw.splitlines())
    assert first["requested"]["host"] == host
    assert len(raw.splitlines()) == 2  # the injected newline stayed inside the string
    assert second["requested"]["host"] == "a" * 253 + "..."


def test_every_reason_code_in_the_metrics_enums_is_documented() -> None:
    from pyegress.observe import metrics

    docs = (Path(__file__).resolve().parents[1] / "docs" / "audit.md").read_text()
    undocumented = {
        reason
        for reason in metrics.REASONS
        if f"`{reason}`" not in docs
        and not (reason.startswith("resolved_") and f"`{reason[9:]}`" in docs)
    }
    assert not undocumented


class _RecordingSink:
    inline = False

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def close(self) -> None:
        pass


def test_lines_put_on_an_event_loop_reach_the_writer_as_one_batch() -> None:
    sink = _RecordingSink()
    written: list[tuple[str, int]] = []
    lines = LineSink(sink, on_written=lambda event, count: written.append((event, count)))

    async def tunnels() -> None:
        for i in range(50):
            assert lines.put("close", json.dumps({"n": i}))
        await asyncio.sleep(0.2)

    asyncio.run(tunnels())
    assert len(sink.writes) == 1
    assert [json.loads(x)["n"] for x in sink.writes[0].splitlines()] == list(range(50))
    assert written == [("close", 50)]
    lines.close()


def test_a_batch_left_by_an_ended_loop_goes_out_first_and_none_is_lost() -> None:
    sink = _RecordingSink()
    lines = LineSink(sink)

    async def put(first: int, count: int, wait: float) -> None:
        for i in range(first, first + count):
            lines.put("close", json.dumps({"n": i}))
        await asyncio.sleep(wait)

    asyncio.run(put(0, 3, 0))  # ends before its batch is handed over
    asyncio.run(put(3, 2, 0.2))  # the next loop on this thread sends it first
    lines.put("log", json.dumps({"n": 5}))  # no loop: straight to the writer
    lines.close()
    got = [json.loads(x)["n"] for text in sink.writes for x in text.splitlines()]
    assert got == list(range(6))


def test_tunnel_record_lines_escape_what_a_client_controls() -> None:
    """The decision and close lines are assembled as text: every string a client can
    reach is escaped (ASCII, one line) and capped, and the line parses back whole."""
    hostile = 'evil"}\r\n{"event":"decision"}\x00\u202e'
    t = Tunnel(service='svc"', kind="redirect", client=("::1", 4321), tier="sidecar")
    t.host, t.port, t.name_source = hostile + "x" * 300, 443, "sni"
    t.identity, t.user, t.error = hostile, hostile, hostile * 100
    t.orig_dst, t.http = "[::1]:443", {"host": hostile}
    t.decision = decision_fields("deny", "not_in_allowlist", "r1", "v1", hostile)
    t.status, t.reason, t.relay_kind, t.bytes_up = 403, "denied", "plain", 7
    for line in (t.decision_line(), t.close_line()):
        assert line.isascii()
        assert "\n" not in line
        assert "\r" not in line
        record = json.loads(line)
        assert record["schema"] == "pyegress.audit/v1"
        assert record["service"] == 'svc"'
        assert record["mode"] == "transparent"
        assert record["client"] == {
            "addr": "::1",
            "port": 4321,
            "identity": hostile,
            "user": hostile,
        }
        assert record["requested"]["host"] == cap(hostile + "x" * 300, 253)
        assert record["http"] == {"host": hostile}
        assert record["decision"]["detail"] == hostile
    close = json.loads(t.close_line())
    assert close["result"] == {
        "client_reply": 403,
        "close_reason": "denied",
        "error": cap(hostile * 100, 512),
        "relay": "plain",
    }
    assert close["bytes"] == {"from_client": 7, "to_client": 0}
    assert isinstance(close["duration_ms"], float)


def test_only_writes_that_never_wait_for_a_reader_are_done_inline(tmp_path: Path) -> None:
    import os
    import socket

    from pyegress.observe.audit import StreamSink, never_waits

    with open(tmp_path / "f", "w") as regular, open(os.devnull, "w") as null:
        assert never_waits(regular.fileno())
        assert never_waits(null.fileno())
        assert StreamSink(regular).inline
    read_end, write_end = os.pipe()
    left, right = socket.socketpair()
    try:
        assert not never_waits(write_end)
        assert not never_waits(left.fileno())
        with os.fdopen(os.dup(write_end), "w") as piped:
            assert not StreamSink(piped).inline
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        left.close()
        right.close()
    assert not never_waits(10_000)  # not open at all


class _InlineSink(_RecordingSink):
    """A sink that never waits: the loop writes to it itself."""

    inline = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def write(self, text: str) -> None:
        self.threads.append(threading.get_ident())
        super().write(text)


def test_an_inline_sink_is_written_by_the_loop_one_write_per_batch() -> None:
    sink = _InlineSink()
    written: list[tuple[str, int]] = []
    lines = LineSink(sink, on_written=lambda event, count: written.append((event, count)))
    assert lines.inline
    writers = [t for t in threading.enumerate() if t.name == "pyegress-writer"]

    async def tunnels() -> None:
        for i in range(30):
            assert lines.put("close", json.dumps({"n": i}))
        assert sink.writes == []  # gathered for BATCH_DELAY first
        await asyncio.sleep(0.2)

    asyncio.run(tunnels())
    assert len(sink.writes) == 1
    assert [json.loads(x)["n"] for x in sink.writes[0].splitlines()] == list(range(30))
    assert sink.threads == [threading.get_ident()]  # the loop's own thread wrote it
    assert written == [("close", 30)]
    lines.put("log", json.dumps({"n": 30}))  # no loop here: written at once
    assert json.loads(sink.writes[-1]) == {"n": 30}
    lines.close()
    assert [t for t in threading.enumerate() if t.name == "pyegress-writer"] == writers


def test_a_file_sink_writes_whole_lines_in_order_after_what_the_stream_held(
    tmp_path: Path,
) -> None:
    """The loop writes a batch to the file's descriptor itself (one ``write`` of whole
    lines: several --workers processes may append to one file), after flushing what
    the stream had buffered."""
    from pyegress.observe.audit import StreamSink

    path = tmp_path / "out.jsonl"
    with open(path, "w") as stream:
        sink = StreamSink(stream)
        lines = LineSink(sink)
        assert lines.inline
        stream.write("{}\n")  # something buffered in the stream goes out first

        async def put() -> None:
            for i in range(2000):
                lines.put("close", json.dumps({"n": i, "pad": "x" * 100}))
            await asyncio.sleep(0.1)

        asyncio.run(put())
        lines.close()
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert got[0] == {}
    assert [r["n"] for r in got[1:]] == list(range(2000))


def _pipe_writers(tmp_path: Path, lock: bool) -> list[bytes]:
    """Two writers of one pipe (one shared open description, as inherited), each writing
    50 KiB batches of whole lines while the reader is slow: what the reader gets."""
    import os

    from pyegress.observe.audit import StreamSink

    lock_path = tmp_path / "stdout.lock"
    lock_path.touch()
    read_end, write_end = os.pipe()
    streams = [os.fdopen(os.dup(write_end), "w") for _ in range(2)]
    sinks = [StreamSink(stream, str(lock_path) if lock else None) for stream in streams]
    os.close(write_end)
    got: list[bytes] = []

    def read() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            while chunk := pipe.read1(4096):
                got.append(chunk)
                time.sleep(0.0005)  # a slow reader: the pipe fills, writers wait in write

    def write(sink: StreamSink, mark: str) -> None:
        for _ in range(10):
            sink.write((mark * 99 + "\n") * 512)  # 50 KiB, more than PIPE_BUF

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(sinks[i], "AB"[i])) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(30)
    for sink, stream in zip(sinks, streams, strict=True):
        sink.close()
        stream.close()
    reader.join(30)
    return b"".join(got).splitlines()


def test_writers_of_one_pipe_take_turns_under_the_stdout_lock(tmp_path: Path) -> None:
    """--workers with stdout a pipe: batches longer than PIPE_BUF from several processes
    would interleave once the pipe is full; under the lock file each lands whole."""
    lines = _pipe_writers(tmp_path, lock=True)
    assert len(lines) == 2 * 10 * 512
    assert set(lines) == {b"A" * 99, b"B" * 99}  # without the lock: mixed lines


class _TracedStreamSink:
    """Which thread called try_write / write of a real StreamSink, and what came of it."""

    @staticmethod
    def make(stream: Any, lock_path: str | None = None) -> Any:
        from pyegress.observe.audit import StreamSink

        class Traced(StreamSink):
            calls: list[tuple[str, int, str]] = []  # noqa: RUF012 - one per test

            def try_write(self, text: str) -> Any:
                result = super().try_write(text)
                self.calls.append(("try", threading.get_ident(), result.value))
                return result

            def write(self, text: str) -> None:
                self.calls.append(("write", threading.get_ident(), ""))
                super().write(text)

        return Traced(stream, lock_path)


def _drain(read_end: int, got: list[bytes], go: threading.Event) -> threading.Thread:
    import os

    def read() -> None:
        go.wait(30)
        with os.fdopen(read_end, "rb") as pipe:
            while chunk := pipe.read1(65536):
                got.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    return reader


def _needs_pipe_nowait() -> None:
    """Skip where the kernel cannot write to a pipe without waiting (the writer thread
    then writes every batch, as before)."""
    import errno
    import os

    read_end, write_end = os.pipe()
    try:
        os.pwritev(write_end, [b"x"], -1, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            pytest.skip(f"this kernel refuses RWF_NOWAIT on a pipe: {exc}")
        raise
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_pipe_batch_is_written_by_the_loop_while_the_reader_keeps_up() -> None:
    import os

    _needs_pipe_nowait()
    read_end, write_end = os.pipe()
    got: list[bytes] = []
    go = threading.Event()
    go.set()
    reader = _drain(read_end, got, go)
    with os.fdopen(write_end, "w") as stream:
        sink = _TracedStreamSink.make(stream)
        assert sink.can_try
        lines = LineSink(sink)

        async def tunnels() -> int:
            for i in range(30):
                lines.put("close", json.dumps({"n": i}))
            await asyncio.sleep(0.1)
            return threading.get_ident()

        loop_thread = asyncio.run(tunnels())
        lines.close()
    reader.join(10)
    assert sink.calls == [("try", loop_thread, "done")]  # no hand-off to the writer
    assert [json.loads(x)["n"] for x in b"".join(got).splitlines()] == list(range(30))


def test_a_full_pipe_leaves_the_batches_to_the_writer_in_order_and_whole() -> None:
    import os

    _needs_pipe_nowait()
    read_end, write_end = os.pipe()
    got: list[bytes] = []
    go = threading.Event()
    reader = _drain(read_end, got, go)  # not reading yet: the pipe fills
    pad = "x" * 900
    with os.fdopen(write_end, "w") as stream:
        sink = _TracedStreamSink.make(stream)
        lines = LineSink(sink)

        async def tunnels() -> None:
            for batch in range(10):  # ten 30 KiB batches: the pipe holds 64 KiB
                for i in range(30):
                    lines.put("close", json.dumps({"n": batch * 30 + i, "pad": pad}))
                await asyncio.sleep(0.02)

        asyncio.run(tunnels())
        results = [r for kind, _, r in sink.calls if kind == "try"]
        assert "done" in results  # while there was room
        assert {"kept", "later"} & set(results)  # then it did not wait: the writer did
        go.set()
        lines.close()
    reader.join(10)
    records = [json.loads(x) for x in b"".join(got).splitlines()]
    assert [r["n"] for r in records] == list(range(300))
    assert lines.dropped == 0


def test_try_write_does_not_wait_for_another_writers_lock(tmp_path: Path) -> None:
    import fcntl
    import os

    from pyegress.observe.audit import Attempt, StreamSink

    _needs_pipe_nowait()
    lock_path = tmp_path / "stdout.lock"
    lock_path.touch()
    read_end, write_end = os.pipe()
    other = os.open(lock_path, os.O_RDWR)
    try:
        with os.fdopen(write_end, "w") as stream:
            sink = StreamSink(stream, str(lock_path))
            fcntl.flock(other, fcntl.LOCK_EX)  # another worker is writing
            assert sink.try_write("a\n") is Attempt.LATER
            fcntl.flock(other, fcntl.LOCK_UN)
            assert sink.try_write("b\n") is Attempt.DONE
            sink.close()
        assert os.read(read_end, 100) == b"b\n"
    finally:
        os.close(other)
        os.close(read_end)


def test_a_kept_rest_goes_out_before_anything_else() -> None:
    """A partial write leaves its rest to the next write(), which writes it before
    anything, even text buffered in the stream meanwhile: no line is cut by another."""
    import fcntl
    import os

    from pyegress.observe.audit import Attempt, StreamSink

    _needs_pipe_nowait()
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    got: list[bytes] = []
    go = threading.Event()
    reader = _drain(read_end, got, go)
    batch = "".join(f"{i:04d}{'x' * 95}\n" for i in range(100))  # 10,000 bytes of lines
    with os.fdopen(write_end, "w") as stream:
        sink = StreamSink(stream)
        assert sink.try_write(batch) is Attempt.KEPT  # the pipe took only a part
        stream.write("print\n")  # something else buffered in the stream meanwhile
        go.set()
        sink.write("next\n")
        sink.close()
    reader.join(10)
    assert b"".join(got).decode() == batch + "print\n" + "next\n"


def test_a_line_cut_by_a_writer_that_died_is_ended_by_the_next(tmp_path: Path) -> None:
    """A worker killed inside a write leaves its mark in the lock file: the next writer
    ends the cut line with a newline before its own lines, and the loop leaves that
    mending to the writer thread."""
    import os

    from pyegress.observe.audit import Attempt, StreamSink

    _needs_pipe_nowait()
    lock_path = tmp_path / "stdout.lock"
    lock_path.write_bytes(b"1")  # a write was under way when its writer died
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"cut')
    with os.fdopen(write_end, "w") as stream:
        sink = StreamSink(stream, str(lock_path))
        assert sink.try_write('{"n":0}\n') is Attempt.LATER
        sink.write('{"n":1}\n')
        assert sink.try_write('{"n":2}\n') is Attempt.DONE
        sink.close()
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b'{"cut\n{"n":1}\n{"n":2}\n'
    assert lock_path.read_bytes() == b"0"


def test_close_keeps_the_lock_while_the_writer_is_still_inside_a_write(
    tmp_path: Path,
) -> None:
    import fcntl
    import os

    from pyegress.observe.audit import StreamSink

    lock_path = tmp_path / "stdout.lock"
    lock_path.touch()
    read_end, write_end = os.pipe()
    got: list[bytes] = []
    go = threading.Event()
    reader = _drain(read_end, got, go)  # not reading: the writer blocks on a full pipe
    other = os.open(lock_path, os.O_RDWR)
    with os.fdopen(write_end, "w") as stream:
        sink = StreamSink(stream, str(lock_path))
        lines = LineSink(sink)
        for i in range(1000):  # no loop here: straight to the writer thread
            lines.put("close", json.dumps({"n": i, "pad": "x" * 200}))
        lines.close(timeout=0.3)
        with pytest.raises(BlockingIOError):  # another worker cannot cut in
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        go.set()  # the reader is back
        lines.close(timeout=10)  # closing again waits for the rest, then closes the sink
    reader.join(10)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the writes are done
    os.close(other)
    assert [json.loads(x)["n"] for x in b"".join(got).splitlines()] == list(range(1000))
