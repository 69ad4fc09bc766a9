"""Where a redirected connection was going: the original destination (Linux).

Two ways a connection reaches a transparent listener, two ways to learn its destination:

* **NAT REDIRECT / DNAT** (iptables ``-j REDIRECT``, nft ``redirect``): the kernel
  rewrote the destination; conntrack remembers the original one and
  ``getsockopt(SO_ORIGINAL_DST)`` returns it as a ``struct sockaddr_in`` (IPv4, level
  ``SOL_IP``) or ``struct sockaddr_in6`` (IPv6, level ``SOL_IPV6``, option
  ``IP6T_SO_ORIGINAL_DST``; both options are 80). The port is big-endian in both.
* **TPROXY** (``tproxy=true``): nothing was rewritten; the listening socket has
  ``IP_TRANSPARENT`` and accepted a connection addressed to somewhere else, so the
  accepted socket's *local* address is the original destination.

Which ``getsockopt`` to ask is chosen by the accepted socket's local address, not its
family: a dual-stack ``AF_INET6`` listener accepts IPv4 clients as ``::ffff:a.b.c.d``,
and their conntrack entry is an IPv4 one. Asking the wrong family's option is never
tried as a fallback.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyegress.errors import LocalProtocolError
from pyegress.policy.literals import canonical

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = 0
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class NotRedirected(LocalProtocolError):
    """The connection carries no original destination (it was not redirected)."""


@dataclass(frozen=True, slots=True)
class OrigDst:
    """An original destination: the address (IPv4-mapped IPv6 unmapped) and port."""

    address: Address
    port: int
    host: str = field(init=False)  # the address as text (canonical), made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", canonical(self.address))

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def unmapped(text: str) -> Address:
    """An address from socket text; ``::ffff:a.b.c.d`` becomes ``a.b.c.d``, a zone is
    dropped."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_sockaddr_in(raw: bytes) -> OrigDst:
    """A ``struct sockaddr_in`` as ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` returns it."""
    if len(raw) < 8:
        raise LocalProtocolError(f"sockaddr_in of {len(raw)} bytes")
    port = struct.unpack_from("!H", raw, 2)[0]
    return OrigDst(ipaddress.IPv4Address(raw[4:8]), port)


def parse_sockaddr_in6(raw: bytes) -> OrigDst:
    """A ``struct sockaddr_in6`` as ``getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)``
    returns it (an IPv4-mapped address is unmapped)."""
    if len(raw) < 24:
        raise LocalProtocolError(f"sockaddr_in6 of {len(raw)} bytes")
    port = struct.unpack_from("!H", raw, 2)[0]
    address: Address = ipaddress.IPv6Address(raw[8:24])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return OrigDst(address, port)


def original_dst(sock: Any, tproxy: bool = False, local: tuple[str, int] | None = None) -> OrigDst:
    """The original destination of an accepted connection ``sock`` (a socket, or
    uvloop's socket-alike) whose local address is ``local`` (asked of ``sock`` when not
    given). Raises :class:`NotRedirected` when there is none: no conntrack entry, or
    the original destination is this very listener (the connection was made to the
    listener itself, not redirected to it)."""
    local_text, local_port = local if local is not None else sock.getsockname()[:2]
    if tproxy:
        return OrigDst(unmapped(str(local_text)), int(local_port))
    if sock.family == socket.AF_INET or unmapped(str(local_text)).version == 4:
        found = _asked(sock, SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN, parse_sockaddr_in)
    else:
        found = _asked(sock, SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6, parse_sockaddr_in6)
    # Only a connection made to the listener itself has the listener's own port.
    if found.port == int(local_port) and found.address == unmapped(str(local_text)):
        raise NotRedirected(
            f"the original destination {found} is this listener itself (not redirected)"
        )
    return found


def _asked(
    sock: Any, level: int, option: int, size: int, parse: Callable[[bytes], OrigDst]
) -> OrigDst:
    try:
        raw = sock.getsockopt(level, option, size)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            raise NotRedirected(
                "no original destination (not a redirected connection: no NAT entry)"
            ) from None
        raise NotRedirected(f"SO_ORIGINAL_DST failed: {exc.strerror or exc}") from None
    return parse(raw)


def transparent_socket(
    host: str | None, port: int, backlog: int = 1024, reuse_port: bool = False
) -> socket.socket:
    """A listening TCP socket with ``IP_TRANSPARENT`` (and ``IPV6_TRANSPARENT``) set
    before bind, for TPROXY. Needs CAP_NET_ADMIN. No host: dual stack when possible."""
    if not host:
        family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
        address: tuple[str, int] = ("::" if family == socket.AF_INET6 else "0.0.0.0", port)
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        address = (str(sockaddr[0]), int(sockaddr[1]))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # one listening socket per worker (--workers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            if not host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        if family == socket.AF_INET or not host:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
