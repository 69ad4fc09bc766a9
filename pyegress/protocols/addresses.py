"""Host and port text as it appears in proxy requests.

Implements the ``host:port`` authority syntax of RFC 3986 section 3.2.2/3.2.3 (IPv6
literals in square brackets) as used by HTTP CONNECT (RFC 9110 section 9.3.6) and node
addresses, plus the checks on host names that arrive as raw bytes in SOCKS4a/SOCKS5.
Host names keep the case they were given in; only IPv6 brackets are stripped.
"""

from __future__ import annotations

import ipaddress

from pyegress.errors import LocalProtocolError

__all__ = [
    "decode_host_name",
    "is_ip_literal",
    "join_host_port",
    "split_host_port",
]

# Characters never allowed in a host (name or literal) outside of brackets.
_FORBIDDEN_HOST_CHARS = frozenset("/\\@[]?#")

# Characters besides letters and digits allowed in an IP literal (incl. IPv6 scope id).
_LITERAL_PUNCT = frozenset(".:%_-")

# Bytes allowed in a host name received on the wire (SOCKS4a/SOCKS5 ATYP 3):
# printable ASCII without space, '/', '\\' and '@'.
_WIRE_NAME_ALLOWED = bytes(b for b in range(0x21, 0x7F) if b not in b"/\\@")


def _show(text: str, limit: int = 80) -> str:
    """``repr`` of untrusted text, shortened for error messages."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _literal_chars_ok(text: str) -> bool:
    # ipaddress accepts any text after '%' as an IPv6 scope id; allow only what
    # interface names and numbers use.
    return text.isascii() and all(ch.isalnum() or ch in _LITERAL_PUNCT for ch in text)


def is_ip_literal(host: str) -> bool:
    """True if ``host`` is an IPv4 or IPv6 address literal (no brackets, no port)."""
    if not _literal_chars_ok(host):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    if not _literal_chars_ok(text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str, whole: str) -> int:
    # Digits only (no sign, no spaces, no non-ASCII digits); bound the length before
    # int() so a huge digit string costs nothing.
    if not text or not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > 5:
        raise LocalProtocolError(f"invalid port {_show(text)} in {_show(whole)}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise LocalProtocolError(f"port {port} out of range 1-65535 in {_show(whole)}")
    return port


def _check_host(host: str, whole: str) -> None:
    if not host:
        raise LocalProtocolError(f"empty host in {_show(whole)}")
    for ch in host:
        if ch in _FORBIDDEN_HOST_CHARS or ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise LocalProtocolError(f"invalid character {ch!r} in host of {_show(whole)}")


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port``, or a bare ``host``/``[v6]`` into (host, port).

    The host is returned as given (case kept) with IPv6 brackets removed. A missing port
    uses ``default_port``; without one it is an error. An unbracketed IPv6 literal such
    as ``::1`` is accepted only when ``default_port`` is given and the whole text is an
    IPv6 address (it cannot carry a port). Raises :class:`LocalProtocolError` (HTTP 400)
    naming the offending value.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise LocalProtocolError(f"unterminated '[' in {_show(text)}")
        host = text[1:close]
        if not _is_ipv6(host):
            raise LocalProtocolError(f"invalid IPv6 literal {_show(host)} in {_show(text)}")
        rest = text[close + 1 :]
        if not rest:
            if default_port is None:
                raise LocalProtocolError(f"missing port in {_show(text)}")
            return host, default_port
        if not rest.startswith(":"):
            raise LocalProtocolError(f"unexpected {_show(rest)} after ']' in {_show(text)}")
        return host, _parse_port(rest[1:], text)

    colons = text.count(":")
    if colons == 0:
        if default_port is None:
            raise LocalProtocolError(f"missing port in {_show(text)}")
        _check_host(text, text)
        return text, default_port
    if colons == 1:
        host, _, port_text = text.partition(":")
        _check_host(host, text)
        return host, _parse_port(port_text, text)
    if default_port is not None and _is_ipv6(text):
        return text, default_port
    raise LocalProtocolError(f"IPv6 address must be in brackets: {_show(text)}")


def join_host_port(host: str, port: int) -> str:
    """Render ``host:port``, bracketing IPv6 literals (any host containing ':')."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def decode_host_name(raw: bytes, *, socks5_reply: int | None = None) -> str:
    """Check and decode a host name received as bytes (SOCKS4a, SOCKS5 ATYP 3).

    Allowed: printable ASCII without space, '/', '\\' and '@'. IP address text is a valid
    "name" and kept as text; a bracketed IPv6 literal loses its brackets. Non-ASCII bytes
    are rejected: internationalised names must arrive as punycode (``xn--``).
    Raises :class:`LocalProtocolError` carrying ``socks5_reply`` when given.
    """
    if not raw:
        raise LocalProtocolError("empty host name", socks5_reply=socks5_reply)
    bad = raw.translate(None, _WIRE_NAME_ALLOWED)
    if bad:
        shown = _show(raw.decode("latin-1"))
        if bad[0] >= 0x80:
            raise LocalProtocolError(
                f"host name {shown} contains non-ASCII byte 0x{bad[0]:02x}; "
                "internationalised names must be sent as punycode (xn--...)",
                socks5_reply=socks5_reply,
            )
        raise LocalProtocolError(
            f"host name {shown} contains invalid byte 0x{bad[0]:02x}",
            socks5_reply=socks5_reply,
        )
    text = raw.decode("ascii")
    if text.startswith("[") and text.endswith("]") and _is_ipv6(text[1:-1]):
        return text[1:-1]
    if "[" in text or "]" in text:
        raise LocalProtocolError(
            f"invalid brackets in host name {_show(text)}", socks5_reply=socks5_reply
        )
    return text
