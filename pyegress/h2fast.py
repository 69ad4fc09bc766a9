"""The fast path for DATA frames on the tier link: the bytes of a tunnel bypass the
parts of the ``h2`` library that do no work for us, while ``h2`` keeps every piece of
state it owns.

Profiles of a bulk download through the two-tier chain (benchmarks/README.md,
``--profile``) showed the h2 library spending more time than TLS: on the sending side,
each DATA frame's payload is copied three times (the frame object's ``serialize``, the
outbound ``bytearray``, ``data_to_send``'s ``bytes``); on the receiving side, every
frame goes through a frame buffer, a frame object with flag sets and padding fields,
and an event object. Neither does anything a tunnel needs for DATA.

Sending (:func:`send_frames`): for a stream ``h2`` considers open, the same checks and
window bookkeeping ``H2Connection.send_data`` makes (connection and stream state
machines, both outbound windows), then the 9-byte frame header is written in front of
the payload in one buffer. Whatever ``h2`` had queued (HEADERS, WINDOW_UPDATE, a PING
ACK) goes out first, so the order on the wire is the order of the calls.

Receiving (:class:`FrameReader`): the link's bytes are cut into frames here. A DATA
frame without padding for a stream the link relays, in a state where ``h2`` would
accept it, is delivered straight to the stream, in the pieces it arrives in (no copy,
no wait for the whole frame), after the same state checks and window accounting
``h2`` makes (``window_consumed`` on both inbound windows, which raises on a peer that
overruns them). Its END_STREAM goes to ``h2`` as an empty DATA frame with the flag, so
``h2``'s stream state machine sees the end. Every other frame (SETTINGS, HEADERS,
WINDOW_UPDATE, RST_STREAM, PING, GOAWAY, padded or unknown-stream DATA, and the
client's connection preface) is handed to ``h2.receive_data`` whole, and its events
are dispatched as before. A frame longer than our SETTINGS_MAX_FRAME_SIZE ends the link
at its header (GOAWAY FRAME_SIZE_ERROR). A DATA piece is handed out as a slice of the
received buffer when it is most of that buffer, and copied otherwise, so a transport
holding it never pins a much larger buffer.

``h2`` attributes used beyond its public API (stable across h2 4.x): ``streams``,
each stream's ``state_machine``, ``outbound_flow_control_window`` and
``_inbound_window_manager``, the connection's ``_inbound_flow_control_window_manager``
and ``incoming_buffer._headers_buffer`` (a HEADERS block waiting for CONTINUATION:
while one is open, everything goes to ``h2``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import h2.connection
import h2.exceptions
import h2.stream

PREFACE_LENGTH = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", sent by the client first
_HEADER = struct.Struct(">BHBBL")  # 24-bit length as 8 + 16 bits, type, flags, stream id
_DATA = 0x0
_END_STREAM = 0x1
_PADDED = 0x8
_RECEIVING = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)
_SENDING = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)
_CONN_SEND = h2.connection.ConnectionInputs.SEND_DATA
_CONN_RECV = h2.connection.ConnectionInputs.RECV_DATA
_STREAM_SEND = h2.stream.StreamInputs.SEND_DATA
_STREAM_RECV = h2.stream.StreamInputs.RECV_DATA


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id)


def send_frames(
    conn: h2.connection.H2Connection, stream_id: int, data: bytes | bytearray | memoryview
) -> bytes | None:
    """What to write for ``data`` as DATA frames on ``stream_id`` (after anything
    ``h2`` had queued), with ``h2``'s windows charged; None when ``h2`` would refuse to
    send on that stream now (then nothing was charged). The caller keeps ``data``
    within the windows."""
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _SENDING:
        return None
    size = len(data)
    try:
        conn.state_machine.process_input(_CONN_SEND)
        stream.state_machine.process_input(_STREAM_SEND)
    except h2.exceptions.ProtocolError:
        return None
    conn.outbound_flow_control_window -= size
    stream.outbound_flow_control_window -= size
    frame = conn.max_outbound_frame_size
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    queued = conn.data_to_send()
    if queued:
        pieces.append(queued)
    for start in range(0, size, frame):
        end = min(start + frame, size)
        pieces.append(frame_header(end - start, _DATA, 0, stream_id))
        pieces.append(view[start:end])
    return b"".join(pieces)


class FrameReader:
    """Cuts the link's received bytes into frames; DATA for relayed streams goes to the
    stream, the rest to ``h2`` (see the module text)."""

    __slots__ = (
        "_conn",
        "_end",
        "_head",
        "_left",
        "_max_frame",
        "_preface",
        "_slow",
        "_stream_id",
        "_target",
        "_targets",
        "data_bytes",
    )

    def __init__(
        self,
        conn: h2.connection.H2Connection,
        targets: dict[int, Any],
        server: bool,
        max_frame: int,
    ) -> None:
        self._conn = conn
        self._targets = targets  # the link's stream table, by stream id
        self._max_frame = max_frame
        self._preface = PREFACE_LENGTH if server else 0
        self._head = b""  # part of a frame header
        self._left = 0  # bytes of the current frame's payload still to come
        self._target: Any = None  # the stream of a fast DATA frame in progress
        self._stream_id = 0
        self._end = False  # ... and whether it carries END_STREAM
        self._slow: bytearray | None = None  # a frame for h2, being gathered
        self.data_bytes = 0  # flow-controlled bytes delivered since last asked

    def feed(self, data: bytes, dispatch: Callable[[list[Any]], None]) -> None:
        """Process ``data``; ``dispatch`` gets the events of each frame ``h2`` parsed.
        ``h2.exceptions.ProtocolError`` propagates (the link ends)."""
        conn = self._conn
        view = memoryview(data)
        n = len(view)
        pos = 0
        if self._preface:
            take = min(self._preface, n)
            self._preface -= take
            dispatch(conn.receive_data(view[:take]))
            pos = take
        while pos < n:
            left = self._left
            if left:
                take = left if left <= n - pos else n - pos
                chunk = view[pos : pos + take]
                pos += take
                self._left = left - take
                target = self._target
                if target is not None:
                    self.data_bytes += take
                    if not target.closed:
                        # A slice keeps the whole received buffer alive for as long as
                        # a transport holds it: hand out slices only of most of it.
                        target._on_data(chunk if 2 * take >= n else bytes(chunk), take)
                else:
                    assert self._slow is not None
                    self._slow += chunk
                if self._left == 0:
                    self._frame_done(dispatch)
                continue
            need = 9 - len(self._head)
            if n - pos < need:
                self._head += bytes(view[pos:])
                return
            head = self._head + bytes(view[pos : pos + need])
            self._head = b""
            pos += need
            self._start(head, dispatch)

    def _start(self, head: bytes, dispatch: Callable[[list[Any]], None]) -> None:
        high, low, ftype, flags, stream_id = _HEADER.unpack(head)
        length = (high << 16) | low
        stream_id &= 0x7FFF_FFFF
        if ftype == _DATA and not flags & _PADDED and length <= self._max_frame:
            target = self._targets.get(stream_id)
            if target is not None and self._accept(stream_id, length):
                self._target, self._stream_id = target, stream_id
                self._end = bool(flags & _END_STREAM)
                self._left = length
                if length == 0:
                    self._frame_done(dispatch)
                return
        if length > self._max_frame:
            # Longer than our SETTINGS_MAX_FRAME_SIZE: the link ends (FRAME_SIZE_ERROR).
            raise h2.exceptions.FrameTooLargeError(f"frame of {length} bytes")
        self._target = None
        self._slow = bytearray(head)
        self._left = length
        if length == 0:
            self._frame_done(dispatch)

    def _accept(self, stream_id: int, length: int) -> bool:
        """``h2``'s checks and accounting for a DATA frame, or False to let ``h2``
        handle the frame itself."""
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if (
            stream is None
            or stream.state_machine.state not in _RECEIVING
            or stream._expected_content_length is not None
            or conn.incoming_buffer._headers_buffer
        ):
            return False
        conn.state_machine.process_input(_CONN_RECV)
        conn._inbound_flow_control_window_manager.window_consumed(length)
        stream.state_machine.process_input(_STREAM_RECV)
        stream._inbound_window_manager.window_consumed(length)
        return True

    def _frame_done(self, dispatch: Callable[[list[Any]], None]) -> None:
        if self._target is not None:
            self._target = None
            if self._end:
                self._end = False
                # The end of the stream, for h2's state machine: an empty DATA frame.
                end = frame_header(0, _DATA, _END_STREAM, self._stream_id)
                dispatch(self._conn.receive_data(end))
            return
        frame, self._slow = self._slow, None
        assert frame is not None
        dispatch(self._conn.receive_data(bytes(frame)))

    def take_data_bytes(self) -> int:
        """Flow-controlled bytes delivered on the fast path since the last call (the
        link credits the connection window with them)."""
        count, self.data_bytes = self.data_bytes, 0
        return count
