"""The admin listener: ``/metrics``, ``/livez`` and ``/readyz`` over HTTP/1.1.

A deliberately small server on asyncio streams. It answers one request per connection
(``Connection: close``), always with ``Content-Length``, and never proxies: the request
target is only ever compared with the three paths. Malformed input gets a status, not a
traceback:

* request line not ``METHOD /path HTTP/1.x`` or a malformed header line: 400;
* request head over 8 KiB: 431;
* no complete request head within 5 seconds of accept: 408;
* a method other than GET or HEAD: 405 with ``Allow: GET, HEAD``; unknown paths: 404;
* more than 64 connections at once: the newcomer is closed unanswered.

Rendering ``/metrics`` runs in the default executor so a large registry never stalls the
event loop that also carries tunnels. The address syntax is gost v3's ``-metrics``
value (:func:`parse_admin_address`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import Callable

from pyegress.errors import ConfigError
from pyegress.observe import metrics
from pyegress.observe.log import get_logger

MAX_HEAD_BYTES = 8 * 1024
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
WRITE_TIMEOUT = 10.0
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024

Readiness = Callable[[], tuple[bool, str]]
Render = Callable[[], tuple[bytes, str]]  # the /metrics body and its content type
_Response = tuple[int, bytes, str, tuple[tuple[str, str], ...]]  # status, body, type, headers

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_TEXT = "text/plain; charset=utf-8"
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def parse_admin_address(text: str) -> tuple[str | None, int]:
    """Parse ``:PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` (gost v3 ``-metrics``).

    Returns ``(host, port)``; ``host`` is ``None`` for "every interface". Port 0 asks
    the system for a free port. Raises :class:`ConfigError` naming the bad value."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"admin address {text!r}: {why}; expected [HOST]:PORT, e.g. :9000")

    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise bad("no port")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise bad("port is not a number")
    port = int(port_text)
    if port > 65535:
        raise bad("port out of range 0-65535")
    if host == "":
        return None, port
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise bad("not an IPv6 address in brackets") from None
        return inner, port
    if ":" in host or "[" in host or "]" in host:
        raise bad("an IPv6 host needs brackets")
    if not _HOSTNAME.fullmatch(host):
        raise bad("not a host name or address")
    return host, port


async def start_admin(
    host: str | None,
    port: int,
    readiness: Readiness,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    render: Render = metrics.exposition,
) -> asyncio.Server:
    """Listen on ``host:port`` (``None``: every interface) and serve the admin routes.

    ``readiness()`` returns ``(ready, reason)``; ``/readyz`` answers 200 ``ready`` or
    503 with ``reason`` (e.g. ``draining``). ``render()`` makes the ``/metrics`` body
    (this process's registry unless told otherwise: the supervisor of ``--workers``
    serves every worker's, merged). Connections beyond ``max_connections`` are closed
    unanswered. Close the returned server to stop."""
    server = _AdminServer(readiness, request_timeout, max_connections, render)
    return await asyncio.start_server(server.handle, host, port)


class _AdminServer:
    def __init__(
        self, readiness: Readiness, request_timeout: float, max_connections: int, render: Render
    ):
        self._readiness = readiness
        self._render = render
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._active = 0
        self._log = get_logger(component="admin")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= self._max_connections:
            writer.transport.abort()
            return
        self._active += 1
        try:
            await self._serve(reader, writer)
        except (OSError, TimeoutError):
            writer.transport.abort()  # the client went away or does not read
        except Exception as exc:  # never let a traceback reach the loop's handler
            self._log.warning("admin_error", error=type(exc).__name__)
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = b""
        try:
            async with asyncio.timeout(self._request_timeout):
                head = await _read_head(reader)
            method, path = _parse_head(head)
        except _BadRequest as exc:
            response = _error(exc.status)
        except TimeoutError:
            response = _error(408)
        else:
            response = await self._route(method, path)
        status, body, content_type, extra = response
        async with asyncio.timeout(WRITE_TIMEOUT):
            _write(writer, status, body, content_type, extra, head_only=method == b"HEAD")
            await writer.drain()
        await _linger(reader, writer)

    async def _route(self, method: bytes, path: bytes) -> _Response:
        if method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", _TEXT, (("Allow", "GET, HEAD"),)
        if path == b"/metrics":
            loop = asyncio.get_running_loop()
            metrics.publish()  # on this thread, which makes the counts; then render
            body, content_type = await loop.run_in_executor(None, self._render)
            return 200, body, content_type, ()
        if path == b"/livez":
            return 200, b"ok\n", _TEXT, ()
        if path == b"/readyz":
            ready, reason = self._check_ready()
            if ready:
                return 200, b"ready\n", _TEXT, ()
            return 503, reason.encode("utf-8", "replace") + b"\n", _TEXT, ()
        return 404, b"not found\n", _TEXT, ()

    def _check_ready(self) -> tuple[bool, str]:
        try:
            ready, reason = self._readiness()
        except Exception as exc:
            self._log.warning("readiness_error", error=type(exc).__name__)
            return False, "readiness check failed"
        # One printable line, whatever the callback returned.
        reason = "".join(c if c.isprintable() else " " for c in str(reason))[:200].strip()
        return bool(ready), reason or "not ready"


def _error(status: int) -> _Response:
    return status, _REASONS[status].lower().encode() + b"\n", _TEXT, ()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client still sends for a moment: closing with
    unread input would reset the connection and can destroy the response before the
    client reads it (an oversized head, a pipelined request)."""
    if not writer.can_write_eof():
        return
    writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            discarded = 0
            while discarded < LINGER_BYTES:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                discarded += len(chunk)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Read up to the blank line ending the request head (CRLF or bare LF)."""
    buf = bytearray()
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            raise _BadRequest(400)  # EOF before a complete head
        start = max(0, len(buf) - 3)
        buf += chunk
        ends = [i for i in (buf.find(b"\r\n\r\n", start), buf.find(b"\n\n", start)) if i >= 0]
        if ends:
            end = min(ends)
            if end > MAX_HEAD_BYTES:
                raise _BadRequest(431)
            return bytes(buf[:end]).rstrip(b"\r")
        if len(buf) > MAX_HEAD_BYTES:
            raise _BadRequest(431)


def _parse_head(head: bytes) -> tuple[bytes, bytes]:
    """Validate the request line and header lines; return ``(method, path)``.

    ``path`` is empty for a target that is not origin-form (``/...``): absolute-form
    proxy requests and CONNECT's authority-form are never served here."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _BadRequest(400)
    method, target, version = parts
    if (
        not _TOKEN.fullmatch(method)
        or not _TARGET.fullmatch(target)
        or version not in (b"HTTP/1.0", b"HTTP/1.1")
    ):
        raise _BadRequest(400)
    for line in lines[1:]:
        name, colon, _value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or b"\r" in line:
            raise _BadRequest(400)
    if not target.startswith(b"/"):
        return method, b""
    return method, target.split(b"?", 1)[0]


def _write(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    extra: tuple[tuple[str, str], ...],
    *,
    head_only: bool,
) -> None:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    data = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
    writer.write(data if head_only else data + body)
