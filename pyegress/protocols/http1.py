"""HTTP/1.x for a forwarding proxy: message heads, targets, credentials, body framing.

Implements the parts of RFC 9112 (HTTP/1.1 message syntax: request/status line,
field lines, section 6 message body length, section 7.1 chunked coding) and RFC 9110
(CONNECT authority-form, connection options, hop-by-hop fields) a proxy needs, plus
the Basic scheme of RFC 7617 for ``Proxy-Authorization``.

Bodies are never decoded: :class:`BodyReader` only finds where a message ends so the
caller can forward the body bytes verbatim. Heads are decoded as latin-1, so every byte
maps to one character and re-encoding gives the bytes back.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

from pyegress.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pyegress.protocols.addresses import split_host_port

__all__ = [
    "MAX_CHUNK_LINE_SIZE",
    "MAX_HEAD_SIZE",
    "MAX_TARGET_SIZE",
    "MAX_TRAILER_SIZE",
    "AbsoluteURI",
    "BodyFraming",
    "BodyReader",
    "RequestHead",
    "ResponseHead",
    "basic_credentials",
    "parse_absolute_uri",
    "parse_basic_credentials",
    "parse_connect_target",
    "parse_request_head",
    "parse_response_head",
    "render_request_head",
    "render_response",
    "request_body_framing",
    "response_body_framing",
    "strip_hop_by_hop",
    "without_headers",
]

MAX_HEAD_SIZE = 65536
"""Default limit on a request or response head, terminator included."""
MAX_TARGET_SIZE = 8192
"""Longest request target accepted (414 above)."""
MAX_CHUNK_LINE_SIZE = 1024
"""Longest chunk-size line (size, extensions and CRLF)."""
MAX_TRAILER_SIZE = 65536
"""Longest trailer section of a chunked body, final empty line included."""

# Empty lines tolerated before a request line (RFC 9112 section 2.2).
_MAX_LEADING_EMPTY_LINES = 8

Headers = tuple[tuple[str, str], ...]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Field values and reason phrases: any byte but controls; HTAB is allowed.
_VALUE_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Request targets: no controls, no whitespace.
_TARGET_BAD = re.compile(r"[\x00-\x20\x7f]")
_VERSION_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_HEX_DIGITS = b"0123456789abcdefABCDEF"
# Bytes allowed in a chunk-size line before CRLF: HTAB and everything but controls.
_CHUNK_LINE_ALLOWED = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
_MAX_CHUNK_SIZE_DIGITS = 16


def _show(text: str, limit: int = 80) -> str:
    """``repr`` of untrusted text, shortened for error messages."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


# --------------------------------------------------------------------------- heads


def _get(headers: Headers, name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _get_all(headers: Headers, name: str) -> list[str]:
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


def _comma_tokens(values: Iterable[str]) -> list[str]:
    """Lower-cased, non-empty elements of comma-separated list values."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            token = item.strip(" \t").lower()
            if token:
                out.append(token)
    return out


def _connection_options(headers: Headers, names: tuple[str, ...]) -> set[str]:
    return set(_comma_tokens(v for k, v in headers if k.lower() in names))


def _keep_alive(version: str, options: set[str]) -> bool:
    if "close" in options:
        return False
    if version == "HTTP/1.1":
        return True
    return "keep-alive" in options


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request line and header section; header names keep their case."""

    method: str
    target: str
    version: str
    headers: Headers

    def get(self, name: str) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), or None."""
        return _get(self.headers, name)

    def get_all(self, name: str) -> list[str]:
        """Values of every header called ``name`` (case-insensitive), in order."""
        return _get_all(self.headers, name)

    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept after this exchange.

        HTTP/1.1: yes unless ``close`` is among the ``Connection``/``Proxy-Connection``
        options; HTTP/1.0: only with ``keep-alive`` there (and no ``close``).
        """
        options = _connection_options(self.headers, ("connection", "proxy-connection"))
        return _keep_alive(self.version, options)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed status line and header section; header names keep their case."""

    version: str
    status: int
    reason: str
    headers: Headers

    def get(self, name: str) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), or None."""
        return _get(self.headers, name)

    def get_all(self, name: str) -> list[str]:
        """Values of every header called ``name`` (case-insensitive), in order."""
        return _get_all(self.headers, name)

    def keep_alive(self) -> bool:
        """Whether the server keeps the connection: the ``Connection`` rules of
        :meth:`RequestHead.keep_alive` (``Proxy-Connection`` is not looked at)."""
        return _keep_alive(self.version, _connection_options(self.headers, ("connection",)))


def _parse_field_line(line: str, error: type[ProtocolError]) -> tuple[str, str]:
    if line[:1] in (" ", "\t"):
        raise error("obsolete line folding (continuation line) in header section")
    name, colon, value = line.partition(":")
    if not colon:
        raise error(f"header line without ':': {_show(line)}")
    if not name:
        raise error(f"header line with empty name: {_show(line)}")
    if name[-1] in " \t":
        raise error(f"whitespace between header name and ':' in {_show(name)}")
    if not _TOKEN.fullmatch(name):
        raise error(f"invalid header name {_show(name)}")
    value = value.strip(" \t")
    if _VALUE_CTL.search(value):
        raise error(f"control character in value of header {_show(name)}")
    return name, value


def _parse_fields(lines: list[str], error: type[ProtocolError]) -> Headers:
    return tuple(_parse_field_line(line, error) for line in lines)


def _check_version(
    version: str, error: type[ProtocolError], unsupported_status: int, garbage_status: int
) -> None:
    if version in ("HTTP/1.0", "HTTP/1.1"):
        return
    if version.startswith("HTTP/") and _VERSION_NUMBER.fullmatch(version[5:]):
        raise error(f"unsupported HTTP version {_show(version)}", http_status=unsupported_status)
    raise error(f"malformed HTTP version {_show(version)}", http_status=garbage_status)


def _parse_request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3:
        raise LocalProtocolError(f"malformed request line {_show(line)}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise LocalProtocolError(f"invalid request method {_show(method)}")
    if len(target) > MAX_TARGET_SIZE:
        raise LocalProtocolError(
            f"request target longer than {MAX_TARGET_SIZE} bytes", http_status=414
        )
    if not target or _TARGET_BAD.search(target):
        raise LocalProtocolError(f"invalid request target {_show(target)}")
    _check_version(version, LocalProtocolError, 505, 400)
    return method, target, version


def _early_request_check(buf: bytes | bytearray, start: int) -> None:
    """Reject an incomplete head as soon as its first line shows it is not HTTP, so a
    client speaking something else is not kept waiting for a terminator."""
    # A bare LF line ending (RFC 9112 section 2.2 lets us reject it) would otherwise
    # leave the client waiting for a CRLF CRLF that never comes.
    lf = buf.find(b"\n", start)
    while lf >= 0:
        if lf == start or buf[lf - 1] != 0x0D:
            raise LocalProtocolError("bare LF line ending in the request head; use CRLF")
        lf = buf.find(b"\n", lf + 1)
    line_end = buf.find(b"\r\n", start)
    if line_end >= 0:
        _parse_request_line(bytes(buf[start:line_end]).decode("latin-1"))
        return
    space = buf.find(b" ", start)
    # A trailing CR may be the start of the line's CRLF (or of an empty line).
    method = bytes(buf[start : space if space >= 0 else len(buf)]).decode("latin-1")
    method = method.removesuffix("\r")
    if method and not _TOKEN.fullmatch(method):
        raise LocalProtocolError(f"invalid request method {_show(method)}")


def parse_request_head(
    buf: bytes | bytearray, max_size: int = MAX_HEAD_SIZE
) -> tuple[RequestHead, int] | None:
    """Parse a request head from the start of ``buf``.

    Returns ``(head, consumed)`` where ``consumed`` counts the bytes up to and including
    the empty line, or None if the head is not complete yet. Raises
    :class:`LocalProtocolError` with ``http_status`` 400 (malformed), 414 (target over
    8192 bytes), 431 (head over ``max_size``) or 505 (HTTP version other than 1.0/1.1).
    Up to 8 empty lines before the request line are skipped; line ends must be CRLF;
    obsolete line folding is rejected; a second ``Host`` header is rejected.
    """
    start = 0
    while buf.startswith(b"\r\n", start):
        start += 2
        if start > 2 * _MAX_LEADING_EMPTY_LINES:
            raise LocalProtocolError("too many empty lines before the request line")
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        if len(buf) > max_size:
            raise LocalProtocolError(f"request head larger than {max_size} bytes", http_status=431)
        _early_request_check(buf, start)
        return None
    consumed = end + 4
    if consumed > max_size:
        raise LocalProtocolError(f"request head larger than {max_size} bytes", http_status=431)
    lines = bytes(buf[start:end]).decode("latin-1").split("\r\n")
    method, target, version = _parse_request_line(lines[0])
    headers = _parse_fields(lines[1:], LocalProtocolError)
    if sum(1 for name, _ in headers if name.lower() == "host") > 1:
        raise LocalProtocolError("more than one Host header")
    return RequestHead(method, target, version, headers), consumed


def _parse_status_line(line: str) -> tuple[str, int, str]:
    version, space, rest = line.partition(" ")
    if not space:
        raise RemoteProtocolError(f"malformed status line {_show(line)}")
    _check_version(version, RemoteProtocolError, 502, 502)
    code, _, reason = rest.partition(" ")
    if len(code) != 3 or not code.isascii() or not code.isdigit() or code[0] == "0":
        raise RemoteProtocolError(f"invalid status code in status line {_show(line)}")
    if _VALUE_CTL.search(reason):
        raise RemoteProtocolError(f"control character in reason phrase {_show(reason)}")
    return version, int(code), reason


def parse_response_head(
    buf: bytes | bytearray, max_size: int = MAX_HEAD_SIZE
) -> tuple[ResponseHead, int] | None:
    """Parse a response head from the start of ``buf``: ``(head, consumed)`` or None
    if incomplete. Errors are :class:`RemoteProtocolError` (HTTP 502). The status line
    is ``HTTP/1.x NNN reason``; the reason may be empty (with or without its space)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > max_size:
            raise RemoteProtocolError(f"response head larger than {max_size} bytes")
        line_end = buf.find(b"\r\n")
        if line_end >= 0:
            _parse_status_line(bytes(buf[:line_end]).decode("latin-1"))
        return None
    consumed = end + 4
    if consumed > max_size:
        raise RemoteProtocolError(f"response head larger than {max_size} bytes")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    version, status, reason = _parse_status_line(lines[0])
    headers = _parse_fields(lines[1:], RemoteProtocolError)
    return ResponseHead(version, status, reason, headers), consumed


def _check_render_fields(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    fields = list(headers)
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {_show(name)}")
        if _VALUE_CTL.search(value):
            raise ValueError(f"invalid value for header {_show(name)}: {_show(value)}")
    return fields


def _render_fields(first_line: str, fields: list[tuple[str, str]]) -> bytes:
    parts = [first_line, "\r\n"]
    for name, value in fields:
        parts += (name, ": ", value, "\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def render_request_head(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    version: str = "HTTP/1.1",
) -> bytes:
    """Render a request head, terminator included, encoded as latin-1.

    Raises ``ValueError`` on text that would not parse back (a guard against header
    injection: callers pass parsed or configured values, so this is a bug if it fires).
    """
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"invalid method {_show(method)}")
    if not target or _TARGET_BAD.search(target):
        raise ValueError(f"invalid request target {_show(target)}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise ValueError(f"invalid HTTP version {_show(version)}")
    fields = _check_render_fields(headers)
    return _render_fields(f"{method} {target} {version}", fields)


def render_response(
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    """Render a complete response: status line, headers, empty line, ``body``.

    ``reason`` defaults to the standard phrase (empty for unknown codes). A
    ``Content-Length`` header is appended when ``body`` is non-empty and ``headers``
    has none. Raises ``ValueError`` on values that would not parse back.
    """
    if not 100 <= status <= 999:
        raise ValueError(f"invalid status code {status}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise ValueError(f"invalid HTTP version {_show(version)}")
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    if _VALUE_CTL.search(reason):
        raise ValueError(f"invalid reason phrase {_show(reason)}")
    fields = _check_render_fields(headers)
    if body and not any(name.lower() == "content-length" for name, _ in fields):
        fields.append(("Content-Length", str(len(body))))
    return _render_fields(f"{version} {status} {reason}", fields) + body


# --------------------------------------------------------------------------- credentials


def _decode_credential_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_basic_credentials(value: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from a ``Basic`` ``Proxy-Authorization`` value, else None.

    The scheme is case-insensitive; the decoded text is split at its first ':'. Text
    is UTF-8, falling back to latin-1 when it is not valid UTF-8. Anything else (other
    schemes, bad base64, no ':') counts as no credentials.
    """
    if value is None:
        return None
    scheme, _, token = value.strip(" \t").partition(" ")
    if scheme.lower() != "basic":
        return None
    token = token.strip(" \t")
    if not token:
        return None
    try:
        raw = base64.b64decode(token.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    user, colon, password = _decode_credential_text(raw).partition(":")
    if not colon:
        return None
    return user, password


def basic_credentials(user: str, password: str) -> str:
    """The ``Proxy-Authorization`` value ``Basic base64(user:password)`` (UTF-8)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return "Basic " + token


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class AbsoluteURI:
    """An absolute-form request target split for forwarding in origin-form."""

    scheme: str
    host: str
    port: int
    origin_form: str


_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_absolute_uri(target: str) -> AbsoluteURI:
    """Split an absolute-form target ``http://host[:port]/path?query``.

    The scheme is lower-cased and must be http (default port 80) or https (443); the
    host keeps its case (IPv6 without brackets). ``origin_form`` is the path and query
    (``/`` when empty, ``/?q`` for a bare query); a fragment is dropped. Userinfo in the
    authority, other schemes and malformed targets raise :class:`LocalProtocolError` 400.
    """
    sep = target.find("://")
    if sep <= 0:
        raise LocalProtocolError(f"request target is not an absolute URI: {_show(target)}")
    scheme = target[:sep].lower()
    default_port = _DEFAULT_PORTS.get(scheme)
    if default_port is None:
        raise LocalProtocolError(f"unsupported URI scheme {_show(target[:sep])}")
    rest = target[sep + 3 :]
    auth_end = len(rest)
    for delimiter in "/?#":
        index = rest.find(delimiter, 0, auth_end)
        if index >= 0:
            auth_end = index
    authority = rest[:auth_end]
    if "@" in authority:
        raise LocalProtocolError("userinfo in request URI is not allowed")
    if not authority:
        raise LocalProtocolError(f"request URI without host: {_show(target)}")
    if not authority.startswith("[") and authority.count(":") > 1:
        raise LocalProtocolError(f"IPv6 address in URI must be in brackets: {_show(target)}")
    if authority.endswith(":"):
        authority = authority[:-1]  # RFC 3986: an empty port means the default
    host, port = split_host_port(authority, default_port)
    path = rest[auth_end:]
    fragment = path.find("#")
    if fragment >= 0:
        path = path[:fragment]
    if _TARGET_BAD.search(path):
        raise LocalProtocolError(f"invalid character in request URI {_show(target)}")
    if not path:
        path = "/"
    elif path.startswith("?"):
        path = "/" + path
    return AbsoluteURI(scheme, host, port, path)


def parse_connect_target(target: str) -> tuple[str, int]:
    """``(host, port)`` from a CONNECT authority-form target ``host:port`` or
    ``[v6]:port``; the port is required. Raises :class:`LocalProtocolError` 400."""
    if "://" in target:
        raise LocalProtocolError(f"CONNECT target must be host:port, got {_show(target)}")
    try:
        return split_host_port(target)
    except LocalProtocolError as exc:
        raise LocalProtocolError(f"invalid CONNECT target: {exc}") from exc


# --------------------------------------------------------------------------- headers

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)
# Never removed, even when a Connection header names them: bodies are forwarded
# verbatim, so their framing headers must travel with them, and dropping Host would
# change where the request goes.
_NEVER_STRIPPED = frozenset({"transfer-encoding", "content-length", "host"})


def without_headers(
    headers: Iterable[tuple[str, str]], names: Iterable[str]
) -> list[tuple[str, str]]:
    """``headers`` minus every header whose name is in ``names`` (case-insensitive)."""
    drop = {name.lower() for name in names}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove the hop-by-hop headers before forwarding a message (RFC 9110 section 7.6.1).

    Removed: ``Connection``, ``Proxy-Connection``, ``Keep-Alive``, ``Proxy-Authorization``,
    ``Proxy-Authenticate``, ``TE``, ``Trailer``, ``Upgrade`` and every header named as a
    ``Connection`` option. Deliberate exceptions:

    - ``Transfer-Encoding`` and ``Content-Length`` stay (and ``Host``), even if named in
      ``Connection``: the body is forwarded verbatim in its original framing, so the
      next hop needs the same framing headers (and naming them is a smuggling trick).
    - When ``Connection`` lists ``upgrade`` and an ``Upgrade`` header is present, the
      ``Upgrade`` header is kept and a single ``Connection: upgrade`` replaces the
      ``Connection`` header(s), so protocol upgrades such as WebSocket pass through.
    """
    fields = list(headers)
    options = set(_comma_tokens(v for k, v in fields if k.lower() == "connection"))
    upgrade = "upgrade" in options and any(k.lower() == "upgrade" for k, _ in fields)
    drop = (_HOP_BY_HOP | options) - _NEVER_STRIPPED
    if upgrade:
        drop -= {"upgrade"}
    out: list[tuple[str, str]] = []
    connection_written = False
    for name, value in fields:
        lower = name.lower()
        if upgrade and lower == "connection":
            if not connection_written:
                out.append((name, "upgrade"))
                connection_written = True
            continue
        if lower not in drop:
            out.append((name, value))
    return out


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class BodyFraming:
    """How a message body is delimited (RFC 9112 section 6.3).

    ``none``: no body; ``length``: exactly ``length`` bytes; ``chunked``: chunked coding
    up to the end of its trailer section; ``close``: everything until the connection
    closes.
    """

    kind: Literal["none", "length", "chunked", "close"]
    length: int = 0


_NO_BODY = BodyFraming("none")


def _content_length(values: list[str], error: type[ProtocolError]) -> int | None:
    if not values:
        return None
    length: int | None = None
    for value in values:
        # Several lines or a list of identical values are accepted (RFC 9110 8.6).
        for item in value.split(","):
            text = item.strip(" \t")
            if not text or not text.isascii() or not text.isdigit() or len(text) > 18:
                raise error(f"invalid Content-Length {_show(value)}")
            number = int(text)
            if length is not None and number != length:
                raise error(f"conflicting Content-Length values {values!r}")
            length = number
    return length


def _transfer_codings(values: list[str]) -> list[str]:
    return [token.split(";", 1)[0].strip(" \t") for token in _comma_tokens(values)]


def request_body_framing(head: RequestHead) -> BodyFraming:
    """Body framing of a request. Raises :class:`LocalProtocolError` 400 when the
    framing is ambiguous or invalid: both ``Transfer-Encoding`` and ``Content-Length``
    (smuggling defence), a transfer coding list not ending in a single ``chunked``,
    ``Transfer-Encoding`` on HTTP/1.0, or a bad ``Content-Length``."""
    te = head.get_all("transfer-encoding")
    cl = head.get_all("content-length")
    if te:
        if cl:
            raise LocalProtocolError("request has both Transfer-Encoding and Content-Length")
        if head.version == "HTTP/1.0":
            raise LocalProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        codings = _transfer_codings(te)
        if not codings or codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise LocalProtocolError(
                f"unsupported request Transfer-Encoding {_show(', '.join(te))}"
            )
        return BodyFraming("chunked")
    length = _content_length(cl, LocalProtocolError)
    if length is None:
        return _NO_BODY
    return BodyFraming("length", length)


def response_body_framing(head: ResponseHead, request_method: str) -> BodyFraming:
    """Body framing of a response to a ``request_method`` request.

    No body for HEAD, 1xx, 204, 304 and a 2xx answer to CONNECT (the tunnel starts).
    ``Transfer-Encoding`` ending in ``chunked`` means chunked and overrides any
    ``Content-Length`` (the caller should drop that header when forwarding); any other
    ``Transfer-Encoding`` (or one on HTTP/1.0) means close-delimited; then
    ``Content-Length``; otherwise close-delimited. A bad ``Content-Length`` raises
    :class:`RemoteProtocolError` 502.
    """
    status = head.status
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return _NO_BODY
    if request_method == "CONNECT" and 200 <= status < 300:
        return _NO_BODY
    te = head.get_all("transfer-encoding")
    if te:
        codings = _transfer_codings(te)
        if head.version == "HTTP/1.1" and codings and codings[-1] == "chunked":
            return BodyFraming("chunked")
        return BodyFraming("close")
    length = _content_length(head.get_all("content-length"), RemoteProtocolError)
    if length is None:
        return BodyFraming("close")
    return BodyFraming("length", length)


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class BodyReader:
    """Finds the end of one message body in a byte stream, without decoding it.

    :meth:`feed` returns how many of the given bytes belong to the body and whether the
    body is complete; the caller forwards exactly those bytes and keeps the rest as the
    start of the next message. Chunked bodies are tracked across arbitrary splits:
    chunk-size lines (hex size, optional ``;`` extensions, at most 1024 bytes), chunk
    data and its CRLF, the last chunk and the trailer section (at most 64 KiB) up to the
    final empty line. Syntax errors raise :class:`LocalProtocolError` 400, or
    :class:`RemoteProtocolError` 502 when ``remote`` is true (a body from a server).
    """

    __slots__ = ("_error", "_framing", "_line", "_remaining", "_state", "_trailer_size")

    def __init__(self, framing: BodyFraming, remote: bool = False) -> None:
        self._framing = framing
        self._error: type[ProtocolError] = RemoteProtocolError if remote else LocalProtocolError
        self._remaining = framing.length
        self._line = bytearray()
        self._trailer_size = 0
        if framing.kind == "none" or (framing.kind == "length" and framing.length == 0):
            self._state = _DONE
        elif framing.kind == "chunked":
            self._state = _SIZE
        else:
            self._state = _DATA

    @property
    def framing(self) -> BodyFraming:
        return self._framing

    @property
    def done(self) -> bool:
        """True once the whole body has been seen."""
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[int, bool]:
        """Account for ``data``: ``(bytes of data that belong to this body, done)``."""
        if self._state == _DONE:
            return 0, True
        kind = self._framing.kind
        if kind == "close":
            return len(data), False
        if kind == "length":
            take = min(len(data), self._remaining)
            self._remaining -= take
            if self._remaining == 0:
                self._state = _DONE
            return take, self._state == _DONE
        if isinstance(data, memoryview):
            data = data.tobytes()
        return self._feed_chunked(data)

    def feed_eof(self) -> bool:
        """The stream ended here. True if that is a clean end of the body (it was
        complete, or it is close-delimited, which this completes); False if truncated."""
        if self._state == _DONE:
            return True
        if self._framing.kind == "close":
            self._state = _DONE
            return True
        return False

    def _feed_chunked(self, data: bytes | bytearray) -> tuple[int, bool]:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                # CRLF after chunk data; _remaining counts the bytes of it already seen.
                expected = 0x0D if self._remaining == 0 else 0x0A
                if data[pos] != expected:
                    raise self._error("chunk data not followed by CRLF")
                pos += 1
                if expected == 0x0A:
                    self._state = _SIZE
                else:
                    self._remaining = 1
            else:
                newline = data.find(b"\n", pos)
                stop = end if newline < 0 else newline + 1
                self._line += data[pos:stop]
                pos = stop
                self._check_line_size()
                if newline < 0:
                    break
                line = bytes(self._line)
                self._line.clear()
                if state == _SIZE:
                    self._chunk_size_line(line)
                elif self._trailer_line(line):
                    self._state = _DONE
                    return pos, True
        return pos, self._state == _DONE

    def _check_line_size(self) -> None:
        if self._state == _SIZE:
            if len(self._line) > MAX_CHUNK_LINE_SIZE:
                raise self._error(f"chunk-size line longer than {MAX_CHUNK_LINE_SIZE} bytes")
        elif self._trailer_size + len(self._line) > MAX_TRAILER_SIZE:
            raise self._error(f"chunked trailer section larger than {MAX_TRAILER_SIZE} bytes")

    def _line_content(self, line: bytes, what: str) -> bytes:
        if not line.endswith(b"\r\n"):
            raise self._error(f"{what} not terminated by CRLF")
        content = line[:-2]
        if content.translate(None, _CHUNK_LINE_ALLOWED):
            raise self._error(f"control character in {what}")
        return content

    def _chunk_size_line(self, line: bytes) -> None:
        content = self._line_content(line, "chunk-size line")
        size_text = content.partition(b";")[0].rstrip(b" \t")
        if (
            not size_text
            or len(size_text) > _MAX_CHUNK_SIZE_DIGITS
            or size_text.translate(None, _HEX_DIGITS)
        ):
            raise self._error(f"invalid chunk size {_show(content.decode('latin-1'))}")
        size = int(size_text, 16)
        if size == 0:
            self._state = _TRAILER
        else:
            self._remaining = size
            self._state = _DATA

    def _trailer_line(self, line: bytes) -> bool:
        content = self._line_content(line, "trailer line")
        self._trailer_size += len(line)
        if not content:
            return True
        _parse_field_line(content.decode("latin-1"), self._error)
        return False
