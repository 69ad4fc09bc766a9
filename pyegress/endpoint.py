"""One side of a tunnel: a byte stream with a handshake phase and a relay phase.

Theory of operation. Every connection pyegress holds (the client's, the one to a hop or
the origin, later an h2 stream) is an :class:`Endpoint`. It lives in two phases:

1. *Handshake*: a listener or connector reads with ``await read()`` and writes replies;
   received bytes collect in a small buffer. Bytes a parser did not consume go back
   with ``unread()`` so nothing the client pipelined is lost.
2. *Relay*: :meth:`Endpoint.attach` links two endpoints. From then on received bytes go
   straight to the peer's ``write`` from the event loop callback (no task, no queue),
   and write-side pressure pauses the peer's reading. That is the whole backpressure
   rule: a side whose outgoing buffer is over the high-water mark stops the other side
   from reading until it drains below the low-water mark.

:class:`TcpEndpoint` is the ``asyncio.Protocol`` implementation for TCP and TLS
transports (``loop.start_tls`` keeps the same protocol object).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pyegress.errors import LocalProtocolError, PyegressError, ResolveError, map_os_error

if TYPE_CHECKING:
    from pyegress.relay import Relay

# Relay legs: bigger than asyncio's 64 KiB default so one full read (256 KiB) fits.
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024
# Handshake-phase read buffer: past this, reading pauses until the parser consumes.
HANDSHAKE_BUFFER_LIMIT = 256 * 1024
NEVER = 1 << 62  # an upgrade_at no byte count reaches

_LINGER_RESET = struct.pack("ii", 1, 0)
_T = TypeVar("_T")


class Endpoint:
    """The interface the relay and the handshake code see."""

    __slots__ = ()

    # Bytes handed to a consumer (``read`` or the relay peer) and bytes written.
    bytes_in: int
    bytes_out: int

    async def read(self) -> bytes:
        """Next received bytes in the handshake phase; ``b""`` at EOF."""
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet (a ``read()`` returns them at once)."""
        return 0

    def unread(self, data: bytes | bytearray) -> None:
        """Put bytes back in front of the receive buffer."""
        raise NotImplementedError

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        """Wait until the outgoing buffer is below the low-water mark."""
        raise NotImplementedError

    def can_write_eof(self) -> bool:
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def attach(self, peer: Endpoint, relay: Relay) -> None:
        """Enter the relay phase: deliver buffered and future bytes to ``peer``."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush what is buffered, then close (FIN)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Close at once with a reset (TCP RST), dropping buffered bytes."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    @property
    def write_paused(self) -> bool:
        raise NotImplementedError

    @property
    def peer_address(self) -> tuple[str, int]:
        raise NotImplementedError

    @property
    def local_address(self) -> tuple[str, int]:
        raise NotImplementedError

    @property
    def identity(self) -> str | None:
        """The verified client certificate identity, when the peer presented one."""
        return None


class BufferedEndpoint(Endpoint):
    """What every endpoint does the same way: the handshake-phase receive buffer, the
    waiter that ``read`` and ``drain`` sleep on, and the shared state flags.

    Subclasses feed ``_buf`` and call ``_wake``; ``_consumed`` is their hook for what
    taking bytes out of the buffer means (resume a paused socket, credit a stream).
    """

    __slots__ = (
        "_buf",
        "_closed",
        "_eof",
        "_exc",
        "_peer",
        "_read_paused",
        "_relay",
        "_waiters",
        "_write_paused",
        "bytes_in",
        "bytes_out",
    )

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        self._exc: BaseException | None = None
        # Tasks sleeping in read() or drain(): a body copier may drain while another
        # task reads, so every waiter is woken by any change.
        self._waiters: list[asyncio.Future[None]] = []
        self._write_paused = False
        self._read_paused = False
        self._peer: Endpoint | None = None
        self._relay: Relay | None = None

    def _wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _remote_eof(self) -> None:
        """The peer ended its direction: tell the relay, or a waiting reader."""
        self._eof = True
        relay = self._relay
        if relay is not None:
            relay.on_eof(self)
        else:
            self._wake()

    def _consumed(self) -> None:
        """Bytes were taken out of the handshake buffer."""

    def _take_buffer(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        self.bytes_in += len(data)
        self._consumed()
        return data

    async def read(self) -> bytes:
        while True:
            if self._buf:
                return self._take_buffer()
            if self._eof:
                return b""
            if self._closed:
                if self._exc is not None:
                    raise map_os_error(self._exc, "read")
                return b""
            await self._wait()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def unread(self, data: bytes | bytearray) -> None:
        if data:
            self.bytes_in -= len(data)
            self._buf[:0] = data

    async def drain(self) -> None:
        while self._write_paused and not self._closed:
            await self._wait()
        if self._closed and self._exc is not None:
            raise map_os_error(self._exc, "write")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def error(self) -> BaseException | None:
        return self._exc


class TcpEndpoint(asyncio.Protocol, BufferedEndpoint):
    __slots__ = (
        "_local_address",
        "_on_made",
        "_paused_by_buffer",
        "_peer_address",
        "transport",
        "upgrade_at",
    )

    def __init__(self, on_made: Callable[[TcpEndpoint], None] | None = None) -> None:
        BufferedEndpoint.__init__(self)
        self.transport: asyncio.Transport | None = None
        self._peer_address: tuple[str, int] | None = None  # looked up once, when asked
        self._local_address: tuple[str, int] | None = None
        # While relaying: once bytes_in reaches this, the relay is asked to upgrade()
        # (the zero-copy relay switches over then; see splice.py).
        self.upgrade_at = NEVER
        self._paused_by_buffer = False
        self._on_made = on_made

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self._on_made is not None:
            on_made, self._on_made = self._on_made, None
            on_made(self)

    def data_received(self, data: bytes) -> None:
        peer = self._peer
        if peer is not None:
            count = self.bytes_in + len(data)
            self.bytes_in = count
            peer.write(data)
            if count >= self.upgrade_at:
                self.upgrade_at = NEVER
                relay = self._relay
                if relay is not None:
                    relay.upgrade()
            return
        self._buf += data
        if len(self._buf) > HANDSHAKE_BUFFER_LIMIT and not self._paused_by_buffer:
            self._paused_by_buffer = True
            self._set_reading(False)
        self._wake()

    def eof_received(self) -> bool:
        self._remote_eof()
        # Keep the transport open: the other direction may still be sending. (A TLS
        # transport cannot stay half open, and says so if asked to.)
        transport = self.transport
        return transport is None or transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if exc is not None and self._exc is None:
            self._exc = exc
        self._wake()
        relay = self._relay
        if relay is not None:
            relay.on_lost(self, exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        peer = self._peer
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()
        peer = self._peer
        if peer is not None:
            peer.resume_reading()

    # -- handshake phase --------------------------------------------------------------

    def _consumed(self) -> None:
        if self._paused_by_buffer:
            self._paused_by_buffer = False
            self._set_reading(True)

    # -- writing and closing ----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            return
        self.bytes_out += len(data)
        transport.write(data)

    def can_write_eof(self) -> bool:
        transport = self.transport
        return transport is not None and transport.can_write_eof()

    def write_eof(self) -> None:
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()

    def _set_reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            return
        if on:
            if transport.is_reading():
                return
            transport.resume_reading()
        elif transport.is_reading():
            transport.pause_reading()

    def pause_reading(self) -> None:
        self._read_paused = True
        self._set_reading(False)

    def resume_reading(self) -> None:
        self._read_paused = False
        if not self._paused_by_buffer:
            self._set_reading(True)

    def attach(self, peer: Endpoint, relay: Relay) -> None:
        self._peer = peer
        self._relay = relay
        if self._buf:
            peer.write(self._take_buffer())
        if self._paused_by_buffer:
            self._paused_by_buffer = False
            if not self._read_paused:
                self._set_reading(True)
        if peer.write_paused:
            self.pause_reading()
        if self._eof:
            relay.on_eof(self)

    def take_buffered(self) -> bytes:
        """Hand over (and forget) what was received but not read yet."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # -- leaving the socket to the zero-copy relay (splice.py) --------------------------

    def splice_ready(self) -> bool:
        """Whether a raw-socket relay may take this connection over: a plain TCP
        connection (no TLS), still open, with nothing waiting to be written."""
        transport = self.transport
        if transport is None or self._closed or self._relay is not None:
            return False
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        if transport.get_extra_info("sslcontext") is not None:
            return False
        if transport.get_extra_info("ssl_object") is not None:
            return False
        sock = transport.get_extra_info("socket")
        return (
            sock is not None
            and sock.type == socket.SOCK_STREAM
            and sock.family in (socket.AF_INET, socket.AF_INET6)
        )

    def splice_capable(self) -> bool:
        """A plain TCP connection, still open (what a switch-over needs before it
        detaches the endpoint)."""
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            return False
        return transport.get_extra_info("sslcontext") is None

    def detach(self) -> None:
        """Stop relaying (a switch-over is under way): stop reading, forget the peer
        and the relay. What the transport still has to write, it writes."""
        self._set_reading(False)
        self._peer = None
        self._relay = None

    def reattach(self, peer: Endpoint, relay: Relay) -> None:
        """Undo :meth:`detach`: relay again, reading unless the peer is full."""
        self._read_paused = False
        if not self._closed:
            self._set_reading(True)
        self.attach(peer, relay)

    def write_buffered(self) -> int:
        """Bytes the transport holds that the socket has not taken yet."""
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def dup_socket(self) -> socket.socket:
        """A second, non-blocking handle on this connection's socket (``OSError`` when
        no descriptor is left). The transport keeps its own until :meth:`hand_over`."""
        assert self.transport is not None
        fd = os.dup(self.transport.get_extra_info("socket").fileno())
        try:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
        except OSError:
            os.close(fd)
            raise
        return sock

    def hand_over(self) -> bytes:
        """Leave the connection to the holder of a :meth:`dup_socket` handle.

        Returns what was received but not read yet (counted in ``bytes_in``, as the
        relay counts what it delivers), then closes the transport: that closes the
        transport's descriptor only, so the connection stays open on the other handle
        with no FIN or RST sent. The endpoint is closed from here on: writes, ``close``
        and ``abort`` do nothing, and the transport's ``connection_lost`` reaches no relay.
        """
        data = bytes(self._buf)
        self._buf.clear()
        self.bytes_in += len(data)
        self._paused_by_buffer = False
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        return data

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    # -- state ------------------------------------------------------------------------

    def _address(self, key: str) -> tuple[str, int]:
        if self.transport is None:
            return ("", 0)
        value: Any = self.transport.get_extra_info(key)  # a system call each time
        if isinstance(value, tuple) and len(value) >= 2:
            return (str(value[0]), int(value[1]))
        return ("", 0)

    @property
    def peer_address(self) -> tuple[str, int]:
        found = self._peer_address
        if found is None:
            found = self._address("peername")
            if found[1]:
                self._peer_address = found
        return found

    @property
    def local_address(self) -> tuple[str, int]:
        found = self._local_address
        if found is None:
            found = self._address("sockname")
            if found[1]:
                self._local_address = found
        return found

    @property
    def identity(self) -> str | None:
        if self.transport is None:
            return None
        from pyegress.tls import transport_identity

        return transport_identity(self.transport)

    async def start_tls(
        self, context: ssl.SSLContext, server_hostname: str | None, timeout: float
    ) -> None:
        """Upgrade this (handshake-phase) connection to TLS as a client."""
        if self.transport is None:
            raise LocalProtocolError("start_tls on an unconnected endpoint")
        if self._buf:
            raise PyegressError("bytes arrived before the TLS handshake")
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                self.transport,
                self,
                context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.abort()
            raise map_os_error(exc, f"TLS handshake with {server_hostname}") from None
        new = cast(asyncio.Transport, new)
        self.transport = new
        new.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)


async def open_tcp(host: str, port: int, timeout: float) -> TcpEndpoint:
    """Dial ``host:port`` (resolving a name here, at the hop that dials it)."""
    loop = asyncio.get_running_loop()
    what = f"connect {host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(TcpEndpoint, host, port)
    except TimeoutError:
        raise map_os_error(TimeoutError(), what) from None
    except (OSError, ssl.SSLError) as exc:
        raise map_os_error(exc, what) from None
    except ValueError as exc:  # e.g. UnicodeError: a label over 63 octets
        raise ResolveError(f"{what}: bad host name: {exc}") from None
    return protocol


async def read_message(
    endpoint: Endpoint,
    parse: Callable[[bytearray], tuple[_T, int] | None],
    eof_error: Callable[[bytes], PyegressError],
) -> _T:
    """Read until ``parse`` recognises a whole message; surplus bytes stay buffered.

    ``parse`` returns ``None`` while the message is incomplete and raises a project
    error when it is malformed. ``eof_error`` builds the error for an EOF that cuts the
    message short (it gets the bytes read so far).
    """
    buf = bytearray()
    while True:
        data = await endpoint.read()
        if not data:
            raise eof_error(bytes(buf))
        buf += data
        result = parse(buf)
        if result is not None:
            value, consumed = result
            if consumed < len(buf):
                endpoint.unread(buf[consumed:])
            return value
