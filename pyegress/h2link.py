"""An HTTP/2 connection that carries one tunnel per stream (gost's ``h2`` transport).

Theory of operation. :class:`H2Link` is the ``asyncio.Protocol`` that owns one TLS (or
plain, for ``h2c``) transport and one ``h2.connection.H2Connection``; each tunnel is an
:class:`H2Stream`, an :class:`~pyegress.endpoint.Endpoint` like a TCP connection, so the
listeners, connectors and the relay do not know they run over a stream.

Mapping (RFC 9113 section 8.5): DATA carries the bytes, END_STREAM is a FIN, RST_STREAM
is a reset (we send CONNECT_ERROR), the link going away ends every stream with the close
reason ``tier_link_lost``.

Flow control is the backpressure. Two rules:

1. *Receiving.* The connection window is credited as soon as bytes arrive (they are
   then already in this process and bounded by the stream windows), but a stream's own
   window is credited only once its bytes were handed onward *and* the receiving side
   is not paused. A tunnel whose reader stalls therefore stops its own sender after one
   stream window, and never its siblings.
2. *Sending.* A stream sends what the peer's windows allow; the rest waits in the
   stream's pending buffer and goes out on WINDOW_UPDATE. Over the high-water mark the
   stream reports ``write_paused`` and pauses the endpoint that feeds it. When the
   socket's own buffer is full, every stream holds its bytes until it drains.

DATA frames bypass the h2 library's frame objects and copies both ways
(:mod:`pyegress.h2fast`); h2 still keeps the state machines and the windows.

The h2 library formats every received frame with ``repr()`` for a trace log even when no
logger is set; for DATA frames that hex-encodes the whole payload. :func:`_lean_data_repr`
replaces DATA's body repr with its length (see ``tests/test_h2_link.py``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from pyegress.endpoint import BufferedEndpoint, Endpoint
from pyegress.errors import TierLinkLost
from pyegress.h2fast import FrameReader, send_frames

if TYPE_CHECKING:
    from pyegress.relay import Relay

# Sizes (python-notes 2.4, 2.6): 64 KiB frames, 2 MiB stream windows, a 64 MiB
# connection window raised right after the preface. DATA frames take the fast path
# (h2fast.py); h2 gets the other frames one whole frame at a time.
MAX_FRAME_SIZE = 64 * 1024
STREAM_WINDOW = 2 * 1024 * 1024
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 1000
PENDING_HIGH_WATER = 256 * 1024
TRANSPORT_HIGH_WATER = 1024 * 1024
TRANSPORT_LOW_WATER = 256 * 1024


def _lean_data_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# DataFrame has no body repr of its own; the inherited one hex-encodes the payload on
# every received frame. Frame subclasses may provide their own (hyperframe's comment on
# Frame._body_repr); this one prints the length.
hyperframe.frame.DataFrame._body_repr = _lean_data_repr  # type: ignore[method-assign, assignment]


class _GracefulH2Connection(h2.connection.H2Connection):
    """h2 treats a GOAWAY, sent or received, as the end of the connection: its state
    machine goes to CLOSED and refuses to send DATA, and receiving one drops the queued
    outbound bytes. RFC 9113 section 6.8 lets streams up to the last stream id finish, and
    a drain needs exactly that. This subclass keeps the state machine open across a
    GOAWAY and keeps the queued bytes (window updates, ACKs); :class:`H2Link` itself
    refuses new streams once a GOAWAY went either way."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.kept_output = b""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        self.kept_output += self.data_to_send()
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        return result

    def send_goaway(self, last_stream_id: int) -> None:
        state = self.state_machine.state
        self.close_connection(error_code=0, last_stream_id=last_stream_id)
        self.state_machine.state = state

    def data_to_send(self, amount: int | None = None) -> bytes:
        data = super().data_to_send(amount)
        if self.kept_output:
            data, self.kept_output = self.kept_output + data, b""
        return data


class H2Stream(BufferedEndpoint):
    """One tunnel: an HTTP/2 stream seen as a byte stream. ``_eof`` is the peer's
    END_STREAM; ``_local_ended`` ours."""

    __slots__ = (
        "_buf_credit",
        "_credit",
        "_end_after_pending",
        "_held",
        "_local_ended",
        "_pending",
        "_reset_after_pending",
        "headers",
        "link",
        "response",
        "stream_id",
    )

    def __init__(self, link: H2Link, stream_id: int) -> None:
        super().__init__()
        self.link = link
        self.stream_id = stream_id
        # The request's headers, kept only where a handler reads them later.
        self.headers: Sequence[tuple[str, str]] = ()
        self.response: asyncio.Future[list[tuple[str, str]]] | None = None
        self._buf_credit = 0
        self._pending = bytearray()
        self._local_ended = False
        self._end_after_pending = False
        self._reset_after_pending = False
        self._credit = 0
        self._held = 0

    # -- events from the link ---------------------------------------------------------

    def _on_data(self, data: bytes | memoryview, flow_length: int) -> None:
        peer = self._peer
        if peer is not None:
            self.bytes_in += len(data)
            peer.write(data)
            if self._read_paused:
                self._held += flow_length
            else:
                self._add_credit(flow_length)
            return
        self._buf += data
        self._buf_credit += flow_length
        self._wake()

    def _on_end(self) -> None:
        self._remote_eof()
        self._maybe_forget()

    def _on_lost(self, exc: BaseException) -> None:
        """Reset by the peer, or the whole link went away."""
        if self._closed:
            return
        self._closed = True
        self._exc = exc
        self._pending.clear()
        self._wake()
        if self.response is not None and not self.response.done():
            self.response.set_exception(exc)
            self.response.exception()  # the opener may have given up already
        relay = self._relay
        if relay is not None:
            relay.on_lost(self, exc)

    def _add_credit(self, n: int) -> None:
        self._credit += n
        if self._credit >= STREAM_WINDOW // 4:
            credit, self._credit = self._credit, 0
            self.link.credit_stream(self.stream_id, credit)

    # -- handshake phase --------------------------------------------------------------

    def _consumed(self) -> None:
        credit, self._buf_credit = self._buf_credit, 0
        if credit:
            self._add_credit(credit)

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._local_ended or self._end_after_pending or not data:
            return
        self.bytes_out += len(data)
        if self._pending:
            self._pending += data
        else:
            sent = self.link.send_data(self, data)
            if sent < len(data):
                self._pending += memoryview(data)[sent:]
                self.link.mark_blocked(self)
        if len(self._pending) > PENDING_HIGH_WATER and not self._write_paused:
            self._write_paused = True
            peer = self._peer
            if peer is not None:
                peer.pause_reading()

    def _flush_pending(self) -> None:
        """Send what the windows now allow (called by the link)."""
        if self._closed:
            return
        if self._pending:
            sent = self.link.send_data(self, self._pending)
            if sent:
                del self._pending[:sent]
        if self._pending:
            self.link.mark_blocked(self)
            return
        if self._write_paused:
            self._write_paused = False
            self._wake()
            peer = self._peer
            if peer is not None:
                peer.resume_reading()
        if self._end_after_pending:
            self._end_after_pending = False
            self._send_end()

    def _send_end(self) -> None:
        if self._local_ended or self._closed:
            return
        self._local_ended = True
        self.link.end_stream(self.stream_id)
        if self._reset_after_pending and not self._eof:
            self.abort(h2.errors.ErrorCodes.CANCEL)
            return
        self._maybe_forget()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closed or self._local_ended:
            return
        if self._pending:
            self._end_after_pending = True
        else:
            self._send_end()

    # -- reading control --------------------------------------------------------------

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        held, self._held = self._held, 0
        if held:
            self._add_credit(held)

    def attach(self, peer: Endpoint, relay: Relay) -> None:
        self._peer = peer
        self._relay = relay
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self.bytes_in += len(data)
            peer.write(data)
        # What the buffer held is now handed onward: credit it unless the peer is full.
        credit, self._buf_credit = self._buf_credit, 0
        if credit:
            if peer.write_paused:
                self._held += credit
            else:
                self._add_credit(credit)
        if peer.write_paused:
            self.pause_reading()
        if self._eof:
            relay.on_eof(self)

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """End our side after the pending bytes; stop the peer's side if still open."""
        if self._closed:
            return
        if not self._eof:
            self._reset_after_pending = True
        if self._local_ended:
            if not self._eof:
                self.abort(h2.errors.ErrorCodes.CANCEL)
            return
        self.write_eof()

    def abort(self, code: int = h2.errors.ErrorCodes.CONNECT_ERROR) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self.link.reset_stream(self.stream_id, code)
        self._wake()
        self.link.forget(self.stream_id)

    def _maybe_forget(self) -> None:
        if self._local_ended and self._eof and not self._closed:
            self._closed = True
            self._wake()
            self.link.forget(self.stream_id)

    # -- state ------------------------------------------------------------------------

    @property
    def peer_address(self) -> tuple[str, int]:
        return self.link.peer_address

    @property
    def local_address(self) -> tuple[str, int]:
        return self.link.local_address

    @property
    def identity(self) -> str | None:
        return self.link.identity


class H2Link(asyncio.Protocol):
    """One HTTP/2 connection; subclasses decide what new streams mean."""

    client_side = True

    def __init__(self, max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        self.max_streams = max_streams
        config = h2.config.H2Configuration(
            client_side=self.client_side, header_encoding="utf-8", validate_inbound_headers=True
        )
        self.conn = _GracefulH2Connection(config)
        self.streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.identity: str | None = None
        self.peer_address: tuple[str, int] = ("", 0)
        self.local_address: tuple[str, int] = ("", 0)
        self.closed = False
        self.goaway = False
        self.lost_reason: str | None = None
        self.settings_received: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._blocked: dict[int, H2Stream] = {}
        self._write_paused = False
        self._in_receive = False
        self._conn_credit = 0
        self._ping_waiter: asyncio.Future[None] | None = None
        self._on_closed: list[Callable[[H2Link], None]] = []
        self._reader: FrameReader  # made in connection_made, with the settings

    # -- connection lifecycle ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER, low=TRANSPORT_LOW_WATER)
        self.peer_address = _address(transport.get_extra_info("peername"))
        self.local_address = _address(transport.get_extra_info("sockname"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        initial = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
        }
        if self.client_side:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.conn.local_settings = h2.settings.Settings(
            client=self.client_side, initial_values=initial
        )
        self.conn.max_inbound_frame_size = MAX_FRAME_SIZE
        self._reader = FrameReader(
            self.conn, self.streams, server=not self.client_side, max_frame=MAX_FRAME_SIZE
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = self.lost_reason or (f"link lost: {exc}" if exc else "link closed")
        err = TierLinkLost(reason)
        if not self.settings_received.done():
            self.settings_received.set_exception(err)
            self.settings_received.exception()  # nobody may be waiting: mark it seen
        if self._ping_waiter is not None and not self._ping_waiter.done():
            self._ping_waiter.set_exception(err)
        for stream in list(self.streams.values()):
            stream._on_lost(err)
        self.streams.clear()
        self._blocked.clear()
        for callback in self._on_closed:
            callback(self)

    def add_close_callback(self, callback: Callable[[H2Link], None]) -> None:
        self._on_closed.append(callback)

    def close(self, reason: str, error_code: int = 0) -> None:
        """GOAWAY, then close the socket (streams end with ``tier_link_lost``)."""
        if self.transport is None or self.closed:
            return
        self.lost_reason = self.lost_reason or reason
        with suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(error_code=error_code)
        self._flush()
        self.transport.close()

    def send_goaway(self) -> None:
        """Announce that no new streams will be accepted; open ones may finish."""
        if self.transport is None or self.closed:
            return
        self.goaway = True
        with suppress(h2.exceptions.ProtocolError):
            self.conn.send_goaway(self.conn.highest_inbound_stream_id or 0)
        self._flush()
        if not self.streams:
            self.transport.close()

    def abort(self, reason: str) -> None:
        if self.transport is None or self.closed:
            return
        self.lost_reason = self.lost_reason or reason
        self.transport.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flush_blocked()

    # -- receiving --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._in_receive = True
        try:
            self._reader.feed(data, self._dispatch_all)
        except _Stop:
            return
        except (h2.exceptions.ProtocolError, UnicodeDecodeError, ValueError) as exc:
            # (h2 decodes headers inside receive_data: bad bytes raise UnicodeDecodeError.)
            self.lost_reason = self.lost_reason or f"HTTP/2 protocol error from peer: {exc}"
            self._in_receive = False
            # h2 queued a GOAWAY for what it caught itself (its state is CLOSED then); an
            # error caught on the fast path (a window overrun) gets its GOAWAY here.
            if self.conn.state_machine.state != h2.connection.ConnectionState.CLOSED:
                code = getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
                with suppress(h2.exceptions.ProtocolError):
                    self.conn.close_connection(error_code=code)
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        finally:
            self._in_receive = False
            self._conn_credit += self._reader.take_data_bytes()
        if self._conn_credit >= CONNECTION_WINDOW // 4:
            credit, self._conn_credit = self._conn_credit, 0
            self.conn.increment_flow_control_window(credit)
        self._flush()

    def _dispatch_all(self, events: list[h2.events.Event]) -> None:
        for event in events:
            self._dispatch(event)
        transport = self.transport
        if self.closed or (transport is not None and transport.is_closing()):
            raise _Stop  # what else the read held is for a link that is going away

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            assert event.data is not None
            length = event.flow_controlled_length or 0
            self._conn_credit += length
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_data(event.data, length)
            if event.stream_ended is not None:
                self._end(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self._end(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._blocked.pop(event.stream_id, None)
                    stream._flush_pending()
            else:
                self._flush_blocked()
        elif isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            self.on_request(event.stream_id, _headers(event.headers))
            if event.stream_ended is not None:
                self._end(event.stream_id)
        elif isinstance(event, h2.events.ResponseReceived):
            assert event.stream_id is not None
            stream = self.streams.get(event.stream_id)
            response = stream.response if stream is not None else None
            if response is not None and not response.done():
                response.set_result(_headers(event.headers))
            if event.stream_ended is not None:
                self._end(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            stream = self.streams.pop(event.stream_id, None)
            self._blocked.pop(event.stream_id, None)
            if stream is not None:
                code = event.error_code
                exc: BaseException
                if code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    # Not processed by the peer (it is draining): safe to retry elsewhere.
                    exc = TierLinkLost("stream refused by the peer (REFUSED_STREAM)")
                else:
                    exc = ConnectionResetError(f"stream reset by peer ({code!r})")
                stream._on_lost(exc)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.settings_received.done():
                self.settings_received.set_result(None)
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._flush_blocked()
        elif isinstance(event, h2.events.PingAckReceived):
            if self._ping_waiter is not None and not self._ping_waiter.done():
                self._ping_waiter.set_result(None)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.on_goaway(event.last_stream_id or 0, event.error_code)

    def _end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._on_end()

    # -- hooks for subclasses ---------------------------------------------------------

    def on_request(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        """A peer opened a stream (server side)."""
        self.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)

    def on_goaway(self, last_stream_id: int, error_code: Any) -> None:
        self.goaway = True
        self.lost_reason = f"peer sent GOAWAY ({error_code!r})"
        # Streams the peer never processed end now; the others may finish.
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id and (stream_id % 2 == 1) == self.client_side:
                self.streams.pop(stream_id, None)
                stream._on_lost(TierLinkLost("stream refused by GOAWAY"))
        if not self.streams and self.transport is not None:
            self.transport.close()

    # -- sending ----------------------------------------------------------------------

    def _flush(self) -> None:
        if self._in_receive or self.transport is None:
            return
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def send_data(self, stream: H2Stream, data: bytes | bytearray | memoryview) -> int:
        """Send as much of ``data`` as the windows allow; return how much went."""
        if self._write_paused or self.closed:
            return 0
        stream_id = stream.stream_id
        try:
            window = self.conn.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return 0
        size = min(window, len(data))
        if size <= 0:
            return 0
        out = send_frames(self.conn, stream_id, memoryview(data)[:size])
        if out is None:
            return 0
        assert self.transport is not None
        self.transport.write(out)
        return size

    def mark_blocked(self, stream: H2Stream) -> None:
        self._blocked[stream.stream_id] = stream

    def _flush_blocked(self) -> None:
        if not self._blocked:
            return
        blocked, self._blocked = self._blocked, {}
        for stream in blocked.values():
            if self._write_paused:
                self._blocked[stream.stream_id] = stream
            else:
                stream._flush_pending()

    def end_stream(self, stream_id: int) -> None:
        with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.end_stream(stream_id)
        self._flush()

    def reset_stream(self, stream_id: int, code: int) -> None:
        with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(stream_id, error_code=code)
        self._flush()

    def credit_stream(self, stream_id: int, credit: int) -> None:
        with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.increment_flow_control_window(credit, stream_id=stream_id)
        self._flush()

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self._blocked.pop(stream_id, None)
        if self.goaway and not self.streams and self.transport is not None:
            self.transport.close()

    # -- keepalive --------------------------------------------------------------------

    async def ping(self, timeout: float) -> None:
        """Send a PING and wait for its ACK; close the link when none comes in time."""
        if self.closed:
            raise TierLinkLost("link closed")
        loop = asyncio.get_running_loop()
        self._ping_waiter = loop.create_future()
        self.conn.ping(os.urandom(8))
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                await self._ping_waiter
        except TimeoutError:
            self.abort(f"no PING ACK within {timeout:g}s")
            raise TierLinkLost(f"no PING ACK within {timeout:g}s") from None
        finally:
            self._ping_waiter = None

    @property
    def open_streams(self) -> int:
        return len(self.streams)


class _Stop(Exception):
    """The link closed while its received bytes were being dispatched."""


def _headers(raw: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in raw or ():
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out.append((str(name), str(value)))
    return out


def _address(value: Any) -> tuple[str, int]:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return ("", 0)


def header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None
