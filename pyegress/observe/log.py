"""structlog set up for JSON lines, written through the bounded output queue.

One line per event. Log lines and audit records share the non-blocking writer of
``observe/audit.py`` (audit records may go to their own file). Credentials never reach
a log call: node URLs are logged through ``Node.redacted()`` and request headers are
never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from pyegress.observe.audit import (
    DEFAULT_BACKUPS,
    DEFAULT_MAX_BYTES,
    LineSink,
    Output,
    RotatingFileSink,
    StreamSink,
)

Logger = Any  # structlog's filtering bound logger; its type is generated at runtime.

_output: Output | None = None


class _QueueWriter:
    """A structlog logger that hands each finished line to the output queue."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.put("log", message)

    debug = info = warning = warn = error = critical = exception = fatal = msg


def configure(
    debug: bool = False,
    stream: TextIO | None = None,
    audit_file: str | None = None,
    audit_max_bytes: int = DEFAULT_MAX_BYTES,
    audit_backups: int = DEFAULT_BACKUPS,
    fields: dict[str, Any] | None = None,
    stdout_lock: str | None = None,
) -> Output:
    """Set up logging and the audit output; returns the output (see :func:`output`).
    ``fields`` are added to every log line (a worker's ``worker`` number);
    ``stdout_lock`` is the lock file of a stdout several processes write (``--workers``)."""
    global _output
    from pyegress.observe import metrics

    logs = LineSink(StreamSink(stream or sys.stdout, stdout_lock))
    audit = None
    if audit_file is not None:
        audit = LineSink(RotatingFileSink(audit_file, audit_max_bytes, audit_backups))
    _output = Output(logs, audit)
    for sink in {id(s): s for s in (logs, _output.audit)}.values():
        sink.on_written = _count_written
        sink.on_dropped = metrics.audit_dropped
    level = logging.DEBUG if debug else logging.INFO
    extra: list[Any] = [_adder(fields)] if fields else []
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            *extra,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_factory(_QueueWriter(logs)),
        cache_logger_on_first_use=True,
    )
    return _output


def output() -> Output:
    """The configured output (a stdout one when :func:`configure` was not called)."""
    global _output
    if _output is None:
        _output = Output(LineSink(StreamSink(sys.stdout)))
    return _output


def close() -> None:
    global _output
    if _output is not None:
        _output.close()
        _output = None


def _count_written(event: str, count: int) -> None:
    if event != "log":  # log lines are not audit events
        from pyegress.observe import metrics

        metrics.audit_event(event, count)


def _adder(fields: dict[str, Any]) -> Any:
    def add(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.update(fields)
        return event

    return add


def _factory(writer: _QueueWriter) -> Any:
    def factory(*_args: Any) -> _QueueWriter:
        return writer

    return factory


def get_logger(**context: Any) -> Logger:
    return structlog.get_logger("pyegress").bind(**context)
