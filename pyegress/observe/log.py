"""structlog set up for JSON lines on stdout.

One line per event; tunnel close records are the main traffic. Credentials never reach
a log call: node URLs are logged through ``Node.redacted()`` and request headers are
never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

Logger = Any  # structlog's filtering bound logger; its type is generated at runtime.


def configure(debug: bool = False, stream: TextIO | None = None) -> None:
    level = logging.DEBUG if debug else logging.INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(**context: Any) -> Logger:
    return structlog.get_logger("pyegress").bind(**context)
