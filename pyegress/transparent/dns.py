"""The sidecar's DNS listener: ``-L dns://127.0.0.1:5353?...`` (UDP and TCP).

In an air-gapped cluster an application's lookup of an outside name fails before any
connection exists, so a redirect alone never sees it. This listener answers:

* **cluster-internal names** (under a ``suffix=``, ``cluster.local`` by default;
  single-label names; reverse lookups outside the synthetic ranges): forwarded to the
  real cluster DNS (``upstream=``), over UDP (and again over TCP when the answer is
  truncated) or over TCP for TCP clients, with a timeout; SERVFAIL when no upstream
  answers (or none is configured);
* **outside names**, A and AAAA: an address from the reserved range (``range=``,
  ``198.18.0.0/15`` by default; ``range6=`` for AAAA, ``fc00:ffff::/96`` by default,
  ``off`` for none), remembered in the shared table (:mod:`pyegress.transparent.fakeip`)
  so the redirect listener turns it back into the name, which goes to the DMZ and is
  resolved there for real. Other types for outside names answer NOERROR without records;
  a PTR for a synthetic address answers the name.

Parameters (all optional): ``range``, ``range6``, ``upstream`` (alias ``forward``;
``host:port`` list, port 53 by default), ``suffix`` (comma list), ``ttl`` (answer TTL,
default 30s), ``keep`` (how long a mapping outlives its last use, default 10m),
``size`` (entries per family, default 65536), ``timeout`` (per upstream, default 2s).
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from pyegress.errors import ConfigError
from pyegress.observe.log import Logger
from pyegress.protocols.addresses import split_host_port
from pyegress.transparent import dnswire as wire
from pyegress.transparent.fakeip import (
    DEFAULT_KEEP,
    DEFAULT_RANGE,
    DEFAULT_RANGE6,
    DEFAULT_SIZE,
    FakeNames,
    Network,
    register,
    unregister,
)

if TYPE_CHECKING:
    from pyegress.engine import Service

DEFAULT_SUFFIXES = ("cluster.local",)
DEFAULT_TTL = 30.0
DEFAULT_UPSTREAM_TIMEOUT = 2.0
MAX_PENDING = 512  # UDP queries in flight; more are answered SERVFAIL
TCP_IDLE = 10.0
_LOCAL_ONLY = ("localhost",)


def _network(text: str | None, default: str, what: str) -> Network | None:
    value = default if text is None or text == "" else text
    if value.lower() in ("off", "none", "false", "0"):
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{what}={value!r}: {exc}") from None


def _upstreams(text: str | None) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in (text or "").split(","):
        item = item.strip()
        if item:
            try:
                out.append(split_host_port(item, 53))
            except Exception as exc:
                raise ConfigError(f"upstream={item!r}: {exc}") from None
    return out


def _suffixes(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_SUFFIXES
    return tuple(s.strip().strip(".").lower() for s in text.split(",") if s.strip().strip("."))


class Resolver:
    """The answering logic, without sockets: what to say to one query."""

    def __init__(
        self,
        table: FakeNames,
        upstreams: Sequence[tuple[str, int]],
        suffixes: Sequence[str],
        ttl: int,
        timeout: float,
        log: Logger | None = None,
    ) -> None:
        self.table = table
        self.upstreams = list(upstreams)
        self.suffixes = tuple(suffixes)
        self.ttl = ttl
        self.timeout = timeout
        self.log = log

    def is_internal(self, name: str) -> bool:
        """Names the cluster DNS answers: under a suffix, single-label, localhost, and
        reverse names outside the synthetic ranges."""
        if "." not in name or name in _LOCAL_ONLY:
            return True
        if any(name == s or name.endswith("." + s) for s in self.suffixes):
            return True
        if name.endswith((".in-addr.arpa", ".ip6.arpa")) or name in ("in-addr.arpa", "ip6.arpa"):
            address = wire.reverse_name_address(name)
            return address is None or not self.table.covers(address)
        return False

    async def answer(self, data: bytes, tcp: bool) -> bytes | None:
        """The reply to one message; None to stay silent (not even a header)."""
        try:
            query = wire.parse_message(data)
        except wire.DnsFormatError as exc:
            self._note("dns_bad_query", detail=str(exc))
            return wire.error_response(data, wire.FORMERR)
        if query.is_response:
            self._note("dns_bad_query", detail="a response, not a query")
            return None
        question = query.question
        if query.opcode != wire.OPCODE_QUERY:
            return wire.build_response(query, wire.NOTIMP)
        if question is None or query.counts[0] != 1:
            return wire.build_response(query, wire.FORMERR)
        if question.qclass != wire.CLASS_IN:
            return wire.build_response(query, wire.REFUSED)
        name = question.name
        if self.is_internal(name):
            return await self.forward(data, query, tcp)
        if question.qtype == wire.TYPE_PTR:
            address = wire.reverse_name_address(name)
            found = self.table.name_for(address) if address is not None else None
            if found is None:
                return wire.build_response(query, wire.NXDOMAIN)
            return wire.build_response(query, wire.NOERROR, (wire.ptr_record(found, self.ttl),))
        if not _valid_name(name):
            return wire.build_response(query, wire.NXDOMAIN)
        records: tuple[wire.Record, ...] = ()
        if question.qtype in (wire.TYPE_A, wire.TYPE_AAAA):
            version = 4 if question.qtype == wire.TYPE_A else 6
            address = self.table.address_for(name, version)
            if address is not None:
                records = (wire.address_record(address, self.ttl),)
        return wire.build_response(query, wire.NOERROR, records)

    async def forward(self, data: bytes, query: wire.Message, tcp: bool) -> bytes:
        """Ask the upstreams in turn; SERVFAIL when none answers in time."""
        for host, port in self.upstreams:
            ident = secrets.randbits(16)
            message = wire.with_ident(data, ident)
            try:
                async with asyncio.timeout(self.timeout):
                    if tcp:
                        reply = await _ask_tcp(host, port, message)
                    else:
                        reply = await _ask_udp(host, port, message, ident)
                        if _truncated(reply):
                            reply = await _ask_tcp(host, port, message)
            except (OSError, TimeoutError, EOFError, wire.DnsFormatError) as exc:
                self._note(
                    "dns_upstream_failed",
                    upstream=f"{host}:{port}",
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    warn=True,
                )
                continue
            if wire.header_ident(reply) != ident:
                continue
            return wire.with_ident(reply, query.ident)
        if not self.upstreams:
            self._note("dns_no_upstream", name=(query.question.name if query.question else ""))
        return wire.build_response(query, wire.SERVFAIL)

    def _note(self, event: str, warn: bool = False, **fields: Any) -> None:
        if self.log is not None:
            (self.log.warning if warn else self.log.debug)(event, **fields)


def _valid_name(name: str) -> bool:
    from pyegress.policy.patterns import normalize_name

    return normalize_name(name) is not None


def _truncated(reply: bytes) -> bool:
    return len(reply) >= 4 and bool(int.from_bytes(reply[2:4], "big") & wire.FLAG_TC)


class _UdpAsk(asyncio.DatagramProtocol):
    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if wire.header_ident(data) == self.ident and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _ask_udp(host: str, port: int, message: bytes, ident: int) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpAsk(ident), remote_addr=(host, port)
    )
    try:
        transport.sendto(message)
        return await protocol.reply
    finally:
        transport.close()


async def _ask_tcp(host: str, port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(message)) + message)
        await writer.drain()
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise EOFError("upstream closed the TCP connection early") from exc
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(self.pending) >= MAX_PENDING:
            with suppress(wire.DnsFormatError):
                reply = wire.build_response(wire.parse_message(data), wire.SERVFAIL)
                self._send(reply, addr)
            return
        task = asyncio.ensure_future(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr: Any) -> None:
        try:
            reply = await self.resolver.answer(data, tcp=False)
        except Exception as exc:  # a bug must not stop the listener
            self.resolver._note("dns_bug", error=f"{type(exc).__name__}: {exc}", warn=True)
            reply = wire.error_response(data, wire.SERVFAIL)
        if reply is not None:
            if len(reply) > wire.MAX_UDP_PAYLOAD and not _truncated(reply):
                reply = _truncate(reply)
            self._send(reply, addr)

    def _send(self, reply: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


def _truncate(reply: bytes) -> bytes:
    """A too-long UDP reply cut to its header and question with TC set (the client
    asks again over TCP)."""
    try:
        message = wire.parse_message(reply)
    except wire.DnsFormatError:
        return reply[: wire.MAX_UDP_PAYLOAD]
    question = message.question.wire if message.question is not None else b""
    qd = 1 if message.question is not None else 0
    flags = message.flags | wire.FLAG_TC
    return wire.HEADER.pack(message.ident, flags, qd, 0, 0, 0) + question


async def _serve_tcp(
    resolver: Resolver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            async with asyncio.timeout(TCP_IDLE):
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                data = await reader.readexactly(size)
            reply = await resolver.answer(data, tcp=True)
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    except Exception as exc:  # a bug must not stop the listener
        resolver._note("dns_bug", error=f"{type(exc).__name__}: {exc}", warn=True)
    finally:
        writer.close()


def _sockets(host: str | None, port: int) -> tuple[socket.socket, socket.socket]:
    """A TCP and a UDP socket on the same address and port (port 0: the TCP one's)."""
    if not host:
        family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
        address: tuple[str, int] = ("::" if family == socket.AF_INET6 else "0.0.0.0", port)
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        address = (str(sockaddr[0]), int(sockaddr[1]))
    made: list[socket.socket] = []
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            sock = socket.socket(family, kind)
            made.append(sock)
            if family == socket.AF_INET6 and not host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
                address = (address[0], int(sock.getsockname()[1]))
            sock.setblocking(False)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made[0], made[1]


class DnsServer:
    """What a :class:`~pyegress.engine.Service` needs of a server: ``sockets`` (the TCP
    one first), ``close``, ``wait_closed``."""

    def __init__(self, resolver: Resolver, owner: Any) -> None:
        self.resolver = resolver
        self.owner = owner
        self.sockets: list[socket.socket] = []
        self._tcp: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_protocol: _UdpServer | None = None

    async def start(self, host: str | None, port: int) -> None:
        loop = asyncio.get_running_loop()
        tcp, udp = _sockets(host, port)
        try:
            self._tcp = await asyncio.start_server(
                lambda r, w: _serve_tcp(self.resolver, r, w), sock=tcp
            )
            protocol = _UdpServer(self.resolver)
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=udp)
        except BaseException:
            tcp.close()
            udp.close()
            raise
        self._udp, self._udp_protocol = transport, protocol
        self.sockets = [tcp]
        register(self.owner, self.resolver.table)

    def close(self) -> None:
        unregister(self.owner, self.resolver.table)
        if self._tcp is not None:
            self._tcp.close()
        if self._udp is not None:
            self._udp.close()
        if self._udp_protocol is not None:
            for task in self._udp_protocol.pending:
                task.cancel()

    async def wait_closed(self) -> None:
        if self._tcp is not None:
            await self._tcp.wait_closed()


def resolver_for(service: Service) -> Resolver:
    """The DNS listener's settings from its ``-L dns://`` node."""
    node = service.node
    v4 = _network(node.param("range"), DEFAULT_RANGE, "range")
    v6 = _network(node.param("range6"), DEFAULT_RANGE6, "range6")
    if v4 is None and v6 is None:
        raise ConfigError(f"-L {node.redacted()}: range and range6 are both off")
    try:
        table = FakeNames(
            v4,
            v6,
            size=max(1, node.integer("size", DEFAULT_SIZE)),
            keep=node.duration("keep", DEFAULT_KEEP),
        )
    except ValueError as exc:
        raise ConfigError(f"-L {node.redacted()}: {exc}") from None
    return Resolver(
        table,
        _upstreams(node.param("upstream")),
        _suffixes(node.param("suffix")),
        ttl=int(node.duration("ttl", DEFAULT_TTL)),
        timeout=node.duration("timeout", DEFAULT_UPSTREAM_TIMEOUT),
        log=service.log,
    )


async def start(service: Service) -> DnsServer:
    """Bind and serve ``service``'s DNS listener (UDP and TCP on one address)."""
    server = DnsServer(resolver_for(service), service.engine)
    await server.start(service.node.host or None, service.node.port)
    if not service.chain.hops:
        service.log.warning(
            "dns_without_chain",
            detail="synthetic answers need a -F hop that resolves names (the DMZ); "
            "this process must not resolve through its own DNS listener",
        )
    return server
