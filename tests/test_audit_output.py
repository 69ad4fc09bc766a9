"""The audit output path: bounded queue, counted drops, size rotation, escaping."""

from __future__ import annotations

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
