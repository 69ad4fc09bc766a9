"""Reading a configuration file (-C): one place for the read and UTF-8 errors."""

from __future__ import annotations

from pathlib import Path

from pyegress.errors import ConfigError


def read_config(path: str | Path, what: str = "") -> tuple[bytes, str]:
    """The file's bytes and its text (UTF-8, a leading BOM dropped). Raises
    :class:`ConfigError` naming the file (and ``what`` it is) and, for bad UTF-8, the line."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        label = f" {what}" if what else ""
        raise ConfigError(f"{source}: cannot read{label}: {exc.strerror or exc}") from None
    try:
        return data, data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        label = f"{what} is " if what else ""
        raise ConfigError(f"{source}:{line}: {label}not UTF-8") from None
