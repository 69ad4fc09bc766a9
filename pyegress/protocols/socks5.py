"""SOCKS5 handshake messages, server and client side.

Implements RFC 1928 (method negotiation, requests, replies) and RFC 1929 (username/
password sub-negotiation). Parsers take the bytes received so far and return None until
a whole message is there, else the message and the number of bytes it used; surplus
bytes belong to whatever follows. Reply codes live in :mod:`pyegress.errors`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pyegress.errors import (
    SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED,
    SOCKS5_GENERAL_FAILURE,
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
)
from pyegress.protocols.addresses import decode_host_name, is_ip_literal

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_BIND",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "METHOD_NO_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "METHOD_USERPASS",
    "USERPASS_VERSION",
    "VERSION",
    "Socks5Request",
    "parse_greeting",
    "parse_method_choice",
    "parse_reply",
    "parse_request",
    "parse_userpass",
    "parse_userpass_status",
    "render_greeting",
    "render_method_choice",
    "render_reply",
    "render_request",
    "render_userpass",
    "render_userpass_status",
]

VERSION = 5
USERPASS_VERSION = 1

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

_ADDRESS_LENGTHS = {ATYP_IPV4: 4, ATYP_IPV6: 16}


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# --------------------------------------------------------------------------- server side


def parse_greeting(buf: bytes | bytearray) -> tuple[frozenset[int], int] | None:
    """Client greeting ``VER NMETHODS METHODS...``: ``(methods, consumed)`` or None.

    Raises :class:`LocalProtocolError` (reply 0x01) for a version other than 5 (checked
    on the first byte) or an empty method list.
    """
    if not buf:
        return None
    if buf[0] != VERSION:
        raise LocalProtocolError(
            f"SOCKS version {buf[0]} not supported (expected 5)",
            socks5_reply=SOCKS5_GENERAL_FAILURE,
        )
    if len(buf) < 2:
        return None
    count = buf[1]
    if count == 0:
        raise LocalProtocolError(
            "SOCKS5 greeting offers no methods", socks5_reply=SOCKS5_GENERAL_FAILURE
        )
    end = 2 + count
    if len(buf) < end:
        return None
    return frozenset(buf[2:end]), end


def render_method_choice(method: int) -> bytes:
    """Server's method selection ``05 METHOD``."""
    return bytes((VERSION, method))


def parse_userpass(buf: bytes | bytearray) -> tuple[str, str, int] | None:
    """RFC 1929 request ``01 ULEN UNAME PLEN PASSWD``: ``(user, password, consumed)``.

    Text is UTF-8, falling back to latin-1. An empty user name or a sub-negotiation
    version other than 1 raises :class:`LocalProtocolError`; an empty password is
    accepted (and left to the credential check).
    """
    if not buf:
        return None
    if buf[0] != USERPASS_VERSION:
        raise LocalProtocolError(
            f"username/password sub-negotiation version {buf[0]} not supported (expected 1)"
        )
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if ulen == 0:
        raise LocalProtocolError("empty user name in SOCKS5 username/password request")
    plen_at = 2 + ulen
    if len(buf) <= plen_at:
        return None
    end = plen_at + 1 + buf[plen_at]
    if len(buf) < end:
        return None
    user = _decode_text(bytes(buf[2:plen_at]))
    password = _decode_text(bytes(buf[plen_at + 1 : end]))
    return user, password, end


def render_userpass_status(ok: bool) -> bytes:
    """RFC 1929 status: ``01 00`` success, ``01 01`` failure."""
    return bytes((USERPASS_VERSION, 0 if ok else 1))


@dataclass(frozen=True, slots=True)
class Socks5Request:
    """A SOCKS5 request. ``host`` is IP text for ATYP 1/4, else the name as sent
    (which may itself be IP text); ``command`` may be any code, known or not."""

    command: int
    host: str
    port: int
    atyp: int


def _parse_address(
    buf: bytes | bytearray, offset: int, remote: bool
) -> tuple[int, str, int, int] | None:
    """``(atyp, host, port, end)`` of ``ATYP ADDR PORT`` at ``offset``, or None."""
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    if atyp == ATYP_DOMAIN:
        if len(buf) <= offset + 1:
            return None
        name_len = buf[offset + 1]
        start = offset + 2
        end = start + name_len
        if len(buf) < end + 2:
            return None
        raw = bytes(buf[start:end])
        if remote:
            host = raw.decode("latin-1")
        else:
            host = decode_host_name(raw, socks5_reply=SOCKS5_GENERAL_FAILURE)
    elif atyp in _ADDRESS_LENGTHS:
        start = offset + 1
        end = start + _ADDRESS_LENGTHS[atyp]
        if len(buf) < end + 2:
            return None
        packed = bytes(buf[start:end])
        host = str(
            ipaddress.IPv4Address(packed) if atyp == ATYP_IPV4 else ipaddress.IPv6Address(packed)
        )
    elif remote:
        raise RemoteProtocolError(f"SOCKS5 reply with unknown address type {atyp}")
    else:
        raise LocalProtocolError(
            f"SOCKS5 address type {atyp} not supported",
            socks5_reply=SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED,
        )
    port = int.from_bytes(buf[end : end + 2], "big")
    return atyp, host, port, end + 2


def parse_request(buf: bytes | bytearray) -> tuple[Socks5Request, int] | None:
    """Request ``VER CMD RSV ATYP DST.ADDR DST.PORT``: ``(request, consumed)`` or None.

    Raises :class:`LocalProtocolError`: version other than 5 (reply 0x01), address type
    other than 1/3/4 (reply 0x08), an empty or invalid domain name (printable ASCII
    without space, '/', '\\', '@'; non-ASCII must come as punycode) and port 0 for
    CONNECT (reply 0x01). A non-zero RSV byte is tolerated, as gost does. Unknown
    commands are returned for the handler to answer 0x07.
    """
    if not buf:
        return None
    if buf[0] != VERSION:
        raise LocalProtocolError(
            f"SOCKS version {buf[0]} in request not supported (expected 5)",
            socks5_reply=SOCKS5_GENERAL_FAILURE,
        )
    if len(buf) < 3:
        return None
    command = buf[1]
    address = _parse_address(buf, 3, remote=False)
    if address is None:
        return None
    atyp, host, port, end = address
    if port == 0 and command == CMD_CONNECT:
        raise LocalProtocolError("SOCKS5 CONNECT to port 0", socks5_reply=SOCKS5_GENERAL_FAILURE)
    return Socks5Request(command, host, port, atyp), end


def _encode_address(host: str, port: int) -> bytes:
    """``ATYP ADDR PORT`` for ``host``: IPv4/IPv6 literals as ATYP 1/4, names as ATYP 3.

    A name that cannot be sent (empty, over 255 bytes, not IDNA-encodable) raises
    :class:`LocalProtocolError`: such names come from a client request.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if is_ip_literal(host):
        address = ipaddress.ip_address(host)
        atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
        return bytes((atyp,)) + address.packed + port.to_bytes(2, "big")
    try:
        raw = host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError as exc:
        raise LocalProtocolError(f"host name {host!r} cannot be encoded: {exc}") from exc
    if not 1 <= len(raw) <= 255:
        raise LocalProtocolError(f"host name of {len(raw)} bytes cannot be sent in SOCKS5")
    return bytes((ATYP_DOMAIN, len(raw))) + raw + port.to_bytes(2, "big")


def render_reply(reply: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """Reply ``05 REP 00 ATYP BND.ADDR BND.PORT``; ``host`` an IP literal or a name."""
    return bytes((VERSION, reply, 0)) + _encode_address(host, port)


# --------------------------------------------------------------------------- client side


def render_greeting(methods: Iterable[int]) -> bytes:
    """Client greeting ``05 NMETHODS METHODS...`` (1 to 255 methods)."""
    codes = bytes(methods)
    if not 1 <= len(codes) <= 255:
        raise ValueError(f"a SOCKS5 greeting offers 1 to 255 methods, not {len(codes)}")
    return bytes((VERSION, len(codes))) + codes


def parse_method_choice(buf: bytes | bytearray) -> tuple[int, int] | None:
    """Server's method selection: ``(method, consumed)`` or None; a version other than 5
    raises :class:`RemoteProtocolError`."""
    if not buf:
        return None
    if buf[0] != VERSION:
        raise RemoteProtocolError(f"SOCKS5 server answered with version {buf[0]} (expected 5)")
    if len(buf) < 2:
        return None
    return buf[1], 2


def render_userpass(user: str, password: str) -> bytes:
    """RFC 1929 request (UTF-8). User 1-255 bytes, password 0-255 bytes, else
    :class:`ConfigError` (the credentials come from configuration)."""
    raw_user = user.encode("utf-8")
    raw_password = password.encode("utf-8")
    if not 1 <= len(raw_user) <= 255:
        raise ConfigError(f"SOCKS5 user name must be 1-255 bytes, not {len(raw_user)}")
    if len(raw_password) > 255:
        raise ConfigError(f"SOCKS5 password must be at most 255 bytes, not {len(raw_password)}")
    return (
        bytes((USERPASS_VERSION, len(raw_user)))
        + raw_user
        + bytes((len(raw_password),))
        + raw_password
    )


def parse_userpass_status(buf: bytes | bytearray) -> tuple[bool, int] | None:
    """RFC 1929 status: ``(ok, consumed)`` or None. Version 1 is expected; 5 is also
    accepted, as some servers send it. Others raise :class:`RemoteProtocolError`."""
    if not buf:
        return None
    if buf[0] not in (USERPASS_VERSION, VERSION):
        raise RemoteProtocolError(f"username/password status with version {buf[0]} (expected 1)")
    if len(buf) < 2:
        return None
    return buf[1] == 0, 2


def render_request(command: int, host: str, port: int) -> bytes:
    """Request ``05 CMD 00 ATYP DST.ADDR DST.PORT``: IPv4 literal as ATYP 1, IPv6 as
    ATYP 4, anything else as a name (ATYP 3; non-ASCII names IDNA-encoded)."""
    return bytes((VERSION, command, 0)) + _encode_address(host, port)


def parse_reply(buf: bytes | bytearray) -> tuple[int, str, int, int] | None:
    """Server reply: ``(reply code, bound host, bound port, consumed)`` or None.

    A version other than 5 or an unknown address type raises
    :class:`RemoteProtocolError`; a bound name is decoded as latin-1, unchecked.
    """
    if not buf:
        return None
    if buf[0] != VERSION:
        raise RemoteProtocolError(f"SOCKS5 reply with version {buf[0]} (expected 5)")
    if len(buf) < 3:
        return None
    reply = buf[1]
    address = _parse_address(buf, 3, remote=True)
    if address is None:
        return None
    _, host, port, end = address
    return reply, host, port, end
