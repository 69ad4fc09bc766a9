"""SNI and Host consistency inside a tunnel, without decrypting anything.

A tunnel has been judged on the host the client *asked for* (CONNECT, SOCKS, transparent
name) and dialed, and the client has been told so, but nothing has been relayed yet.
Before the first byte goes upstream, :func:`inspect` peeks at what the client sends and
checks that it is about the same host:

* **TLS** (the bytes start a TLS handshake record): the ClientHello is reassembled across
  reads and records (:mod:`pyegress.protocols.tls_hello`) and its server_name (SNI) is
  compared with the requested host. This is the domain-fronting defence: a CDN routes on
  the SNI, so ``CONNECT allowed.example:443`` followed by ``SNI evil.example`` would
  otherwise reach a host the policy never allowed.
* **Plain HTTP/1.x** (the first line is a request line): the ``Host`` header, and the
  target when it is in absolute or authority form, must name the requested host and
  port.
* Anything else is ``other``: refused on a port that requires TLS (``protocol_not_allowed``)
  unless the rule says ``protocol: tcp``, passed elsewhere.

Every byte read is put back with ``unread`` so the relay forwards it unchanged.

Semantics (the policy file's ``tls:`` section maps onto :class:`TlsSettings`):

* Names are compared normalised: lower case, one trailing dot removed, IDNA A-labels
  (:func:`~pyegress.policy.patterns.normalize_name`). Addresses are compared as
  addresses (``::ffff:a.b.c.d`` equals ``a.b.c.d``).
* ``sni: strict`` (default): the SNI must equal the requested host. ``identity``: the SNI
  may also be any name this identity may reach (the ``name_allowed`` callback, which the
  caller binds to the identity and the requested port). ``log``: like ``strict`` but
  ``sni_mismatch``, ``sni_missing`` and ``ech_present`` are only recorded
  (``would_deny``); malformed input and the Host check are still enforced. ``off``:
  nothing is read or checked at all (``require_tls_ports`` and ``host_check`` included).
* Requested host is an IP literal: a ClientHello without SNI passes (there is no name to
  compare). One with an SNI name passes only if ``name_allowed(sni)`` says the identity
  may reach that name, in every mode: the address was allowed, and the name the server
  will route on is allowed too, so nothing is gained over asking for the name; any
  other name is ``sni_mismatch``.
* An SNI that is an IP literal (RFC 6066 section 3 forbids it, but some clients send it)
  passes only when it is the requested address; otherwise ``sni_mismatch``. An SNI that
  is neither a name nor an address (``example.123``) is ``sni_mismatch``.
* No SNI and the requested host is a name: ``sni_missing`` when ``missing_sni: deny``.
* More than one host_name entry in server_name (RFC 6066: "MUST NOT contain more than
  one name of the same name_type") is ``malformed_request``, whatever the names: a
  server could route on another entry than the one we checked.
* Encrypted Client Hello (extension 0xfe0d): ``ech_present`` when ``ech: deny``. The SNI
  of an ECH ClientHello is the outer, public name; the real one is encrypted. With
  ``ech: allow`` the outer SNI is still checked like any SNI, so ECH passes when its
  public name is one the check accepts ("allow-outer").
* A malformed ClientHello (not merely incomplete), one spread over more than
  :data:`MAX_HELLO_RECORDS` records, or one not complete when the client stops sending
  (EOF or the wait running out) is ``malformed_request``, on any port.
* Ports in ``require_tls_ports``: bytes that cannot start a TLS handshake record, or no
  bytes within ``handshake_timeout``, are ``protocol_not_allowed`` unless
  ``tcp_allowed``. Other ports wait ``sniff_timeout`` for the client's first bytes
  (server-speaks-first protocols send nothing): then ``kind="none"``, passed.
* HTTP: a first line that looks like a request line (method token, whitespace, ...,
  ``HTTP/``) commits to HTTP; the head is then parsed strictly
  (:func:`~pyegress.protocols.http1.parse_request_head`) and any error (bare LF,
  obsolete folding, duplicate ``Host``, head over 64 KiB, ...) is ``malformed_request``,
  so lenient servers cannot be fed a request we read differently. HTTP/1.1 without
  ``Host``, or with an empty one, is ``malformed_request``. ``Host`` and an absolute-form
  or authority-form (``CONNECT``) target must name the requested host, and their port
  (explicit, or the scheme default: 80 for a ``Host`` without port, 80/443 for
  ``http://``/``https://`` targets) must be the requested port; else ``host_mismatch``.
  Cleartext HTTP/2 with prior knowledge (``PRI * HTTP/2.0``) cannot be checked without
  decoding HPACK and is ``protocol_not_allowed`` while ``host_check`` is on.
  More than 16 CR/LF bytes before the first line is ``malformed_request`` (some servers
  skip any number of them). With ``host_check: false`` HTTP is recognised and recorded
  but never refused.

Limits, by design of a peek: only the first request of a plain-HTTP connection is
checked (later keep-alive requests are relayed unread), and on ports that do not
require TLS a client that waits longer than ``sniff_timeout`` before its first byte is
passed as ``none`` without inspection. Put TLS ports in ``require_tls_ports`` (or make
``sniff_timeout`` longer) where that matters.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal

from pyegress.endpoint import Endpoint
from pyegress.errors import LocalProtocolError
from pyegress.policy.literals import canonical, parse_host_literal
from pyegress.policy.patterns import normalize_name, unmap
from pyegress.protocols.addresses import split_host_port
from pyegress.protocols.http1 import (
    RequestHead,
    parse_absolute_uri,
    parse_connect_target,
    parse_request_head,
)
from pyegress.protocols.tls_hello import (
    CONTENT_TYPE_HANDSHAKE,
    EXT_SERVER_NAME,
    RECORD_HEADER_LENGTH,
    ClientHello,
    looks_like_tls,
    parse_client_hello,
)

__all__ = [
    "MAX_HELLO_RECORDS",
    "MAX_INSPECT_BYTES",
    "REASONS",
    "Inspection",
    "TlsSettings",
    "examine",
    "inspect",
]

MAX_INSPECT_BYTES = 65536
"""Most bytes looked at before deciding; a ClientHello or request head that does not fit
is ``malformed_request`` (post-quantum key shares make ClientHellos of 16 KiB+ normal)."""

MAX_HELLO_RECORDS = 256
"""Most TLS records a ClientHello may be spread over (real clients use one to four)."""

REASONS = frozenset(
    {
        "sni_mismatch",
        "sni_missing",
        "ech_present",
        "host_mismatch",
        "protocol_not_allowed",
        "malformed_request",
    }
)
"""Every reason code an :class:`Inspection` may carry (``docs/audit.md``)."""

# Reasons that ``sni: log`` only records.
_REPORTABLE = frozenset({"sni_mismatch", "sni_missing", "ech_present"})

_MAX_DETAIL = 512
_MAX_NAME = 253
_MAX_ALPN_ENTRIES = 16
_MAX_ALPN_LENGTH = 64
_MAX_LEADING_EMPTY = 16
# A request line longer than this (target limit plus method and version) is not waited on.
_MAX_REQUEST_LINE = 8192 + 256
_HTTP_DEFAULT_PORT = 80
_HTTPS_DEFAULT_PORT = 443
_H2_PREFACE_LINE = b"PRI * HTTP/2.0"
_EOF = "when the client stopped sending"

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# A complete first line that commits to HTTP: method, whitespace, anything, "HTTP/".
_HTTP_LINE = re.compile(_TOKEN + rb"+[ \t][^\r\n]*HTTP/", re.IGNORECASE)
# An incomplete first line that may still become one.
_HTTP_PREFIX = re.compile(_TOKEN + rb"*(?:[ \t][^\x00-\x08\x0a-\x1f\x7f]*)?")
# An incomplete first line that has started a request line (method and whitespace).
_HTTP_STARTED = re.compile(_TOKEN + rb"+[ \t][^\x00-\x08\x0a-\x1f\x7f]*")
_LINE_END = re.compile(rb"[\r\n]")
# What new bytes must contain for a re-examination to be useful.
_NOT_TOKEN = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BLANK_LINE = re.compile(rb"\n\r?\n")

SniMode = Literal["strict", "identity", "log", "off"]
Kind = Literal["tls", "http", "other", "none"]


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The ``tls:`` knobs of a policy (see the module docstring for the semantics)."""

    sni: SniMode = "strict"
    missing_sni: Literal["deny", "allow"] = "deny"
    ech: Literal["deny", "allow"] = "deny"
    require_tls_ports: frozenset[int] = frozenset({443})
    host_check: bool = True
    sniff_timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the client's first bytes showed, and the verdict.

    ``reason`` None means pass. With a reason and ``would_deny`` True (``sni: log``) the
    tunnel passes too and the reason is only recorded; :attr:`refused` says whether to
    refuse. ``sni_match`` is whether the SNI names the requested host (None without an
    SNI), independent of the verdict (``identity`` mode may pass a False). ``sni`` is
    normalised and ``host_header`` raw; both are capped at 253 characters and ``detail``
    at 512, with ``...`` appended when cut.
    """

    kind: Kind
    sni: str | None = None
    ech: bool = False
    alpn: tuple[str, ...] = ()
    host_header: str | None = None
    reason: str | None = None
    would_deny: bool = False
    detail: str = ""
    sni_match: bool | None = None

    @property
    def refused(self) -> bool:
        """True when the tunnel must be closed without relaying."""
        return self.reason is not None and not self.would_deny

    def audit_fields(self) -> dict[str, object]:
        """The ``tls`` / ``http`` objects of the audit record (empty for other kinds)."""
        if self.kind == "tls":
            tls = {"sni": self.sni, "sni_match": self.sni_match, "ech": self.ech}
            return {"tls": {**tls, "alpn": list(self.alpn)}}
        if self.kind == "http":
            return {"http": {"host": self.host_header}}
        return {}


def _cap(text: str, limit: int) -> str:
    """Client-controlled text capped like the audit log does (``...`` when cut)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _show(text: str) -> str:
    return repr(_cap(text, 80))


def _result(
    kind: Kind,
    detail: str,
    reason: str | None = None,
    *,
    host_header: str | None = None,
    would_deny: bool = False,
) -> Inspection:
    return Inspection(
        kind,
        host_header=None if host_header is None else _cap(host_header, _MAX_NAME),
        reason=reason,
        would_deny=would_deny,
        detail=_cap(detail, _MAX_DETAIL),
    )


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class _Target:
    """The requested destination, normalised once."""

    text: str
    port: int
    name: str | None  # set when the host is a DNS name
    address: IPv4Address | IPv6Address | None  # set when it is an IP literal


def _target(host: str, port: int) -> _Target:
    address: IPv4Address | IPv6Address | None
    try:
        address = parse_host_literal(host)
    except LocalProtocolError:
        address = None
    if address is not None:
        return _Target(host, port, None, unmap(address))
    return _Target(host, port, normalize_name(host) or host.lower(), None)


def _same_host(text: str, target: _Target) -> bool | None:
    """Whether host text (a name or an IP literal) names the target; None if it is
    neither a usable name nor an address."""
    try:
        address = parse_host_literal(text)
    except LocalProtocolError:
        return None
    if address is not None:
        return target.address is not None and unmap(address) == target.address
    name = normalize_name(text)
    if name is None:
        return None
    return target.name is not None and name == target.name


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class _More:
    """Not decided yet: re-examining is useful once ``at_least`` bytes are in and, with
    a ``trigger``, once the new bytes match it or the buffer is over ``limit`` bytes.
    This keeps a client that trickles one byte per segment from costing quadratic time."""

    at_least: int
    trigger: re.Pattern[bytes] | None = None
    limit: int = MAX_INSPECT_BYTES


def examine(
    data: bytes | bytearray,
    eof: bool,
    host: str,
    port: int,
    settings: TlsSettings,
    *,
    tcp_allowed: bool,
    name_allowed: Callable[[str], bool] | None,
) -> Inspection | None:
    """Decide on the client's first bytes ``data``; None when more bytes are needed.

    ``eof`` True means no more bytes will come (the client closed its side): the answer
    is then never None. ``host`` is the requested host as judged (a name, or an IP
    literal with IPv6 unbracketed), ``port`` the requested port. ``tcp_allowed``: the
    rule allows raw TCP (``protocol: tcp``). ``name_allowed(name)``: may this identity
    reach that normalised name on this port (None: no such check; ``identity`` mode
    then acts like ``strict``). Pure, looks at no more than :data:`MAX_INSPECT_BYTES`
    bytes, and raises nothing whatever the input (``name_allowed`` exceptions propagate).
    """
    outcome = _decide(data, _EOF if eof else None, host, port, settings, tcp_allowed, name_allowed)
    return None if isinstance(outcome, _More) else outcome


def _decide(
    data: bytes | bytearray,
    final: str | None,
    host: str,
    port: int,
    settings: TlsSettings,
    tcp_allowed: bool,
    name_allowed: Callable[[str], bool] | None,
) -> Inspection | _More:
    """:func:`examine` with the reason no more bytes will come as ``final`` (None while
    more may), and with the earliest useful re-examination when undecided."""
    if settings.sni == "off":
        return _result("none", "inspection disabled (tls.sni: off)")
    if not data:
        return _More(1) if final is None else _result("none", "the client sent nothing")
    if len(data) > MAX_INSPECT_BYTES:
        data = data[:MAX_INSPECT_BYTES]
        final = f"within {MAX_INSPECT_BYTES} bytes"
    if looks_like_tls(data[:RECORD_HEADER_LENGTH]):
        return _decide_tls(data, final, host, port, settings, name_allowed)
    if port in settings.require_tls_ports and not tcp_allowed:
        kind: Kind = "http" if _first_line(data) == "http" else "other"
        what = "an HTTP request" if kind == "http" else "bytes that are not a TLS handshake"
        return _result(
            kind, f"port {port} requires TLS but the client sent {what}", "protocol_not_allowed"
        )
    return _decide_plain(data, final, host, port, settings)


# --------------------------------------------------------------------------- TLS


def _hello_records(data: bytes | bytearray) -> tuple[int, bool]:
    """Walk the handshake record headers at the start of ``data``: (where the first
    incomplete record ends, or its header would; whether :data:`MAX_HELLO_RECORDS`
    complete records were walked, in which case the first value is where they end)."""
    at = 0
    for _ in range(MAX_HELLO_RECORDS):
        if len(data) - at < RECORD_HEADER_LENGTH or data[at] != CONTENT_TYPE_HANDSHAKE:
            return at + RECORD_HEADER_LENGTH, False
        end = at + RECORD_HEADER_LENGTH + int.from_bytes(data[at + 3 : at + 5], "big")
        if end > len(data):
            return end, False
        at = end
    return at, True


def _host_name_count(data: bytes | bytearray, length: int) -> int:
    """How many host_name entries the server_name extension of the ClientHello in
    ``data[:length]`` carries (which :func:`parse_client_hello` has validated)."""
    message = bytearray()
    at = 0
    while at + RECORD_HEADER_LENGTH <= length:
        end = at + RECORD_HEADER_LENGTH + int.from_bytes(data[at + 3 : at + 5], "big")
        message += data[at + RECORD_HEADER_LENGTH : end]
        at = end
    pos = 4 + 2 + 32  # handshake header, legacy_version, random
    pos += 1 + message[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(message[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + message[pos]  # legacy_compression_methods
    if pos + 2 > len(message):
        return 0  # no extensions block
    extensions_end = pos + 2 + int.from_bytes(message[pos : pos + 2], "big")
    pos += 2
    while pos + 4 <= extensions_end:
        ext_type = int.from_bytes(message[pos : pos + 2], "big")
        ext_end = pos + 4 + int.from_bytes(message[pos + 2 : pos + 4], "big")
        if ext_type == EXT_SERVER_NAME:
            count = 0
            at = pos + 4 + 2  # extension header, ServerNameList length
            while at + 3 <= ext_end:
                count += message[at] == 0
                at += 3 + int.from_bytes(message[at + 1 : at + 3], "big")
            return count
        pos = ext_end
    return 0


def _decide_tls(
    data: bytes | bytearray,
    final: str | None,
    host: str,
    port: int,
    settings: TlsSettings,
    name_allowed: Callable[[str], bool] | None,
) -> Inspection | _More:
    need, at_limit = _hello_records(data)
    if at_limit:
        data = data[:need]
    try:
        hello = parse_client_hello(data, max_size=MAX_INSPECT_BYTES)
    except LocalProtocolError as exc:
        return _result("tls", f"malformed TLS ClientHello: {exc}", "malformed_request")
    if hello is not None:
        names = _host_name_count(data, hello.length)
        return _judge_hello(hello, names, _target(host, port), settings, name_allowed)
    if at_limit:
        detail = f"TLS ClientHello spread over more than {MAX_HELLO_RECORDS} records"
    elif final is not None:
        detail = f"TLS ClientHello incomplete ({len(data)} bytes) {final}"
    else:
        return _More(max(need, len(data) + 1))
    return _result("tls", detail, "malformed_request")


def _judge_hello(
    hello: ClientHello,
    host_names: int,
    target: _Target,
    settings: TlsSettings,
    name_allowed: Callable[[str], bool] | None,
) -> Inspection:
    sni = hello.sni
    match: bool | None = None
    reason: str | None = None
    if host_names > 1:
        reason = "malformed_request"
        detail = f"{host_names} host_name entries in server_name (RFC 6066 allows one)"
    elif sni is not None:
        match, passes, detail = _sni_check(sni, target, settings.sni, name_allowed)
        if not passes:
            reason = "sni_mismatch"
    elif target.address is not None:
        detail = "no SNI; the requested host is an IP literal"
    elif settings.missing_sni == "deny":
        reason = "sni_missing"
        detail = f"TLS ClientHello without SNI for requested host {_show(target.text)}"
    else:
        detail = "no SNI (tls.missing_sni: allow)"
    if hello.has_ech and reason != "malformed_request":
        outer = "no outer SNI" if sni is None else f"the outer SNI {_show(sni)}"
        note = f"Encrypted Client Hello: {outer} is only the public name, the real one is hidden"
        if settings.ech == "deny":
            reason, detail = "ech_present", f"{note} (tls.ech: deny)"
        else:
            detail = f"{note}; outer name checked: {detail}"
    would_deny = reason in _REPORTABLE and settings.sni == "log"
    if would_deny:
        detail += " (tls.sni: log, not enforced)"
    return Inspection(
        "tls",
        sni=None if sni is None else _cap(sni, _MAX_NAME),
        ech=hello.has_ech,
        alpn=tuple(_cap(name, _MAX_ALPN_LENGTH) for name in hello.alpn[:_MAX_ALPN_ENTRIES]),
        reason=reason,
        would_deny=would_deny,
        detail=_cap(detail, _MAX_DETAIL),
        sni_match=match,
    )


def _sni_check(
    sni: str, target: _Target, mode: SniMode, name_allowed: Callable[[str], bool] | None
) -> tuple[bool, bool, str]:
    """(the SNI names the requested host, the SNI passes, detail)."""
    requested = _show(target.text)
    try:
        address = parse_host_literal(sni)
    except LocalProtocolError:
        return False, False, f"SNI {_show(sni)} is neither a host name nor an IP literal"
    if address is not None:
        address = unmap(address)
        if target.address is not None and address == target.address:
            return True, True, "SNI is the requested IP literal (RFC 6066 forbids literal SNI)"
        return (
            False,
            False,
            (
                f"SNI {canonical(address)} is an IP literal (RFC 6066 forbids it) and not the"
                f" requested host {requested}"
            ),
        )
    name = normalize_name(sni)
    if name is None:
        return False, False, f"SNI {_show(sni)} is not a usable DNS name"
    if target.name is not None and name == target.name:
        return True, True, "SNI matches the requested host"
    # An IP-literal request may carry the SNI of any name the identity may reach; a
    # name request only in identity mode.
    by_identity = mode == "identity" or target.address is not None
    if by_identity and name_allowed is not None and name_allowed(name):
        if target.address is not None:
            detail = f"client dialed IP {requested} with SNI {_show(name)}, a name it may reach"
        else:
            detail = (
                f"SNI {_show(name)} is not the requested host {requested} but a name this"
                " identity may reach (tls.sni: identity)"
            )
        return False, True, detail
    return False, False, f"SNI {_show(name)} does not match requested host {requested}"


# --------------------------------------------------------------------------- plain


def _first_line(data: bytes | bytearray) -> Literal["http", "other", "more", "flood"]:
    """Classify the first line: a request line, not one, not known yet, or too many
    empty lines before it."""
    start = 0
    while start < len(data) and data[start] in b"\r\n":
        start += 1
        if start > _MAX_LEADING_EMPTY:
            return "flood"
    if start == len(data):
        return "more"
    found = _LINE_END.search(data, start, start + _MAX_REQUEST_LINE + 1)
    if found is None:
        if len(data) - start > _MAX_REQUEST_LINE:
            # An over-long line that is still a request line prefix: commit to HTTP so
            # the strict parser refuses it rather than pass it to a lenient server.
            started = _HTTP_STARTED.fullmatch(data, start, start + _MAX_REQUEST_LINE)
            return "http" if started else "other"
        return "more" if _HTTP_PREFIX.fullmatch(data, start) else "other"
    end = found.start()
    if data[end] == 0x0D and end + 1 == len(data):
        return "more"  # a CR that may be followed by its LF
    return "http" if _HTTP_LINE.match(data, start, end) else "other"


def _decide_plain(
    data: bytes | bytearray, final: str | None, host: str, port: int, settings: TlsSettings
) -> Inspection | _More:
    first = _first_line(data)
    if first == "flood":
        detail = f"more than {_MAX_LEADING_EMPTY} CR/LF bytes before the first line"
        return _result("other", detail, "malformed_request")
    if first == "more":
        if not settings.host_check:
            # Nothing to enforce on plain bytes: do not hold a short first message back
            # waiting to learn whether it is an HTTP request line.
            return _result("other", "not TLS (tls.host_check: false)")
        if final is None:
            return _line_wait(data)
        if settings.host_check and _HTTP_STARTED.fullmatch(data.lstrip(b"\r\n").rstrip(b"\r")):
            return _result("http", f"HTTP request line incomplete {final}", "malformed_request")
        return _result("other", "not TLS or HTTP")
    if first == "other":
        return _result("other", "not TLS or HTTP")
    return _decide_http(data, final, _target(host, port), settings)


def _line_wait(data: bytes | bytearray) -> _More:
    """When an incomplete first line can next change its classification."""
    start = len(data) - len(data.lstrip(b"\r\n"))
    if start == len(data) or data.endswith(b"\r"):
        return _More(len(data) + 1)  # anything may follow
    limit = start + _MAX_REQUEST_LINE
    if data.find(b" ", start) < 0 and data.find(b"\t", start) < 0:
        return _More(len(data) + 1, _NOT_TOKEN, limit)  # still in the method
    return _More(len(data) + 1, _CONTROL, limit)  # in the target or version


def _decide_http(
    data: bytes | bytearray, final: str | None, target: _Target, settings: TlsSettings
) -> Inspection | _More:
    if data.lstrip(b"\r\n").startswith(_H2_PREFACE_LINE):
        if settings.host_check:
            detail = "cleartext HTTP/2 (prior knowledge) cannot be Host-checked"
            return _result("http", detail, "protocol_not_allowed")
        return _result("http", "cleartext HTTP/2 (prior knowledge); tls.host_check: false")
    if not settings.host_check:
        host_header = None
        try:
            parsed = parse_request_head(data, MAX_INSPECT_BYTES)
        except LocalProtocolError:
            parsed = None
        if parsed is not None:
            host_header = parsed[0].get("Host")
        detail = "HTTP request; Host not checked (tls.host_check: false)"
        return _result("http", detail, host_header=host_header)
    if final is None and b"\n\r\n" not in data and b"\n\n" not in data:
        return _More(len(data) + 1, _BLANK_LINE)
    try:
        parsed = parse_request_head(data, MAX_INSPECT_BYTES)
    except LocalProtocolError as exc:
        return _result("http", f"malformed HTTP request: {exc}", "malformed_request")
    if parsed is None:
        if final is None:
            return _More(len(data) + 1, _BLANK_LINE)
        return _result("http", f"HTTP request head incomplete {final}", "malformed_request")
    return _check_head(parsed[0], target)


def check_request_head(head: RequestHead, host: str, port: int) -> Inspection:
    """The Host check on a parsed request head (an absolute-URI request at the HTTP
    listener): ``reason`` is None when the head names ``host:port`` (a ``Host`` without a
    port means the scheme's default port), else ``host_mismatch`` or ``malformed_request``."""
    return _check_head(head, _target(host, port))


def _check_head(head: RequestHead, target: _Target) -> Inspection:
    host_header = head.get("Host")
    requested = f"{_show(target.text)} port {target.port}"

    def verdict(detail: str, reason: str | None = None) -> Inspection:
        return _result("http", detail, reason, host_header=host_header)

    default_port = _HTTP_DEFAULT_PORT
    named: tuple[str, int] | None = None
    what = ""
    try:
        if head.method == "CONNECT":
            named, what = parse_connect_target(head.target), "CONNECT target"
        elif not head.target.startswith("/") and "://" in head.target:
            uri = parse_absolute_uri(head.target)
            named, what = (uri.host, uri.port), "absolute request target"
            if uri.scheme == "https":
                default_port = _HTTPS_DEFAULT_PORT
    except LocalProtocolError as exc:
        return verdict(f"invalid request target: {exc}", "malformed_request")
    if named is not None:
        same = _same_host(named[0], target)
        if same is None:
            return verdict(f"invalid host {_show(named[0])} in {what}", "malformed_request")
        if not same or named[1] != target.port:
            detail = f"{what} {_show(head.target)} does not name the requested {requested}"
            return verdict(detail, "host_mismatch")
    if host_header is None:
        if head.version == "HTTP/1.1":
            return verdict("HTTP/1.1 request without a Host header", "malformed_request")
        return verdict(f"{head.version} request without Host")
    if not host_header:
        return verdict("empty Host header", "malformed_request")
    try:
        host, port = split_host_port(host_header, 0)  # port 0: none given
    except LocalProtocolError as exc:
        return verdict(f"invalid Host header: {exc}", "malformed_request")
    same = _same_host(host, target)
    if same is None:
        return verdict(f"invalid host in Host header {_show(host_header)}", "malformed_request")
    if not same or (port or default_port) != target.port:
        detail = f"Host {_show(host_header)} does not name the requested {requested}"
        return verdict(detail, "host_mismatch")
    return verdict("Host matches the requested host")


# --------------------------------------------------------------------------- async


async def inspect(
    endpoint: Endpoint,
    host: str,
    port: int,
    settings: TlsSettings,
    *,
    tcp_allowed: bool,
    name_allowed: Callable[[str], bool] | None,
    handshake_timeout: float,
) -> Inspection:
    """Read the client's first bytes from ``endpoint`` until :func:`examine` decides,
    then ``unread`` every byte read, so the relay sends them on unchanged.

    Waits at most ``handshake_timeout`` on ports in ``settings.require_tls_ports`` (no
    bytes by then: ``protocol_not_allowed`` unless ``tcp_allowed``, else ``kind="none"``)
    and ``settings.sniff_timeout`` on other ports (no bytes: ``kind="none"``, passed).
    Bytes that arrived but did not decide by then are judged as final (an incomplete
    ClientHello or request head is ``malformed_request``). Looks at no more than
    :data:`MAX_INSPECT_BYTES` and re-parses only when new bytes can change the answer
    (a TLS record completed, an HTTP head's blank line arrived), so a client trickling
    one byte per segment costs linear time. Raises only what ``endpoint.read()`` raises
    (the connection failed), after putting the bytes back.
    """
    if settings.sni == "off":
        return _result("none", "inspection disabled (tls.sni: off)")
    args = (host, port, settings, tcp_allowed, name_allowed)
    tls_port = port in settings.require_tls_ports
    wait = handshake_timeout if tls_port else settings.sniff_timeout
    buf = bytearray()
    more = _More(1)
    scanned = 0  # where the next trigger search starts
    try:
        async with asyncio.timeout(wait):
            while True:
                chunk = await endpoint.read()
                buf += chunk
                final = None if chunk else _EOF
                if final is None and len(buf) <= MAX_INSPECT_BYTES:
                    if len(buf) < more.at_least:
                        continue
                    if more.trigger is not None and len(buf) <= more.limit:
                        hit = more.trigger.search(buf, scanned) is not None
                        scanned = max(0, len(buf) - 2)
                        if not hit:
                            continue
                outcome = _decide(bytes(buf), final, *args)
                if isinstance(outcome, Inspection):
                    return outcome
                more = outcome
                scanned = max(0, len(buf) - 2)
    except TimeoutError:
        pass
    finally:
        endpoint.unread(buf)
    if not buf:
        if tls_port and not tcp_allowed:
            detail = f"port {port} requires TLS but the client sent nothing in {wait:g}s"
            return _result("none", detail, "protocol_not_allowed")
        return _result("none", f"the client sent nothing in {wait:g}s")
    outcome = _decide(bytes(buf), f"within {wait:g}s", *args)
    if isinstance(outcome, _More):  # cannot happen: a final decision always decides
        return _result("other", "undecided", "malformed_request")
    return outcome
