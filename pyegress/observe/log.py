"""structlog set up for JSON lines on stdout.

One line per event; tunnel close records are the main traffic. Credentials never reach
a log call: node URLs are logged through ``Node.redacted()`` and request headers are
never logged.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, TextIO

import structlog

Logger = Any  # structlog's filtering bound logger; its type is generated at runtime.


class LineWriter:
    """A structlog logger that writes each line at once and flushes once per event-loop
    iteration: every record reaches the stream within that iteration, and a burst of
    tunnel records costs one flush instead of one each."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._flush_scheduled = False

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._stream.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = msg


def configure(debug: bool = False, stream: TextIO | None = None) -> None:
    level = logging.DEBUG if debug else logging.INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_factory(LineWriter(stream or sys.stdout)),
        cache_logger_on_first_use=True,
    )


def _factory(writer: LineWriter) -> Any:
    def factory(*_args: Any) -> LineWriter:
        return writer

    return factory


def get_logger(**context: Any) -> Logger:
    return structlog.get_logger("pyegress").bind(**context)
