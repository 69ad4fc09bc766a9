"""The audit output path: bounded queue, counted drops, size rotation, escaping."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from pyegress.observe.audit import LineSink, Output, RotatingFileSink, cap


class _StuckSink:
    """A sink whose writes block until released: a stalled stdout pipe."""

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
        assert output.record({"event": "close", "n": i, "pad": "x" * 50})
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
    output.record({"event": "decision", "requested": {"host": cap(host, 253)}})
    output.record({"event": "decision", "requested": {"host": cap("a" * 1000, 253)}})
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
