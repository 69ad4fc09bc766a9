"""SOCKS4 and SOCKS4a requests and replies, server side.

Implements the SOCKS4 protocol note (Ying-Da Lee, "SOCKS: A protocol for TCP proxy
across firewalls") and its 4a extension ("SOCKS 4A: A Simple Extension to SOCKS 4
Protocol"): a DSTIP of ``0.0.0.x`` with x != 0 means a NUL-terminated host name follows
the user id. There is no RFC for SOCKS4.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyegress.errors import LocalProtocolError
from pyegress.protocols.addresses import decode_host_name

__all__ = [
    "CMD_BIND",
    "CMD_CONNECT",
    "REPLY_GRANTED",
    "REPLY_IDENTD_MISMATCH",
    "REPLY_IDENTD_UNREACHABLE",
    "REPLY_REJECTED",
    "VERSION",
    "Socks4Request",
    "parse_request",
    "render_reply",
]

VERSION = 4
CMD_CONNECT = 1
CMD_BIND = 2

REPLY_GRANTED = 90
REPLY_REJECTED = 91
REPLY_IDENTD_UNREACHABLE = 92
REPLY_IDENTD_MISMATCH = 93

_HEADER_SIZE = 8  # VN CD DSTPORT(2) DSTIP(4)


@dataclass(frozen=True, slots=True)
class Socks4Request:
    """A SOCKS4/4a request: ``host`` is IPv4 text, or the 4a name as sent."""

    command: int
    host: str
    port: int
    user_id: str
    is_4a: bool


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _find_nul(buf: bytes | bytearray, start: int, max_size: int, what: str) -> int | None:
    nul = buf.find(b"\x00", start, max_size)
    if nul >= 0:
        return nul
    if len(buf) >= max_size:
        raise LocalProtocolError(f"SOCKS4 {what} not NUL-terminated within {max_size} bytes")
    return None


def parse_request(buf: bytes | bytearray, max_size: int = 1024) -> tuple[Socks4Request, int] | None:
    """Request ``VN CD DSTPORT DSTIP USERID NUL [HOST NUL]``: ``(request, consumed)``.

    Returns None until complete. Raises :class:`LocalProtocolError` for a version other
    than 4 (checked on the first byte), a request not complete within ``max_size``
    bytes, an invalid 4a host name, or CONNECT to port 0. The user id is UTF-8, falling
    back to latin-1. Commands are returned as sent.
    """
    if not buf:
        return None
    if buf[0] != VERSION:
        raise LocalProtocolError(f"SOCKS version {buf[0]} not supported (expected 4)")
    if len(buf) < _HEADER_SIZE:
        return None
    command = buf[1]
    port = int.from_bytes(buf[2:4], "big")
    packed = bytes(buf[4:8])
    user_end = _find_nul(buf, _HEADER_SIZE, max_size, "user id")
    if user_end is None:
        return None
    user_id = _decode_text(bytes(buf[_HEADER_SIZE:user_end]))
    end = user_end + 1
    is_4a = packed[:3] == b"\x00\x00\x00" and packed[3] != 0
    if is_4a:
        host_end = _find_nul(buf, end, max_size, "4a host name")
        if host_end is None:
            return None
        host = decode_host_name(bytes(buf[end:host_end]))
        end = host_end + 1
    else:
        host = str(ipaddress.IPv4Address(packed))
    if port == 0 and command == CMD_CONNECT:
        raise LocalProtocolError("SOCKS4 CONNECT to port 0")
    return Socks4Request(command, host, port, user_id, is_4a), end


def render_reply(granted: bool, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """Reply ``00 CD DSTPORT DSTIP`` with CD 90 (granted) or 91 (rejected); ``host``
    must be IPv4 text (``ValueError`` otherwise)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    packed = ipaddress.IPv4Address(host).packed
    code = REPLY_GRANTED if granted else REPLY_REJECTED
    return bytes((0, code)) + port.to_bytes(2, "big") + packed
