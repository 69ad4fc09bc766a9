"""The DATA fast path of the tier link (pyegress/h2fast.py), in-process: a real h2 peer
(the h2 library as a client, or raw frames from hyperframe) against an H2Link whose
transport records what it writes. The whole-process suites (test_tier_link.py,
test_tier_faults.py, the relay conformance suite's h2 paths) run the same code over
sockets; here are the edges they cannot aim at: bytes arriving one at a time, padded
DATA (h2's own path), a peer overrunning a window, END_STREAM on an empty frame, and
the frames the sender writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, PingFrame

from pyegress.h2link import STREAM_WINDOW, H2Link, H2Stream

_T = TypeVar("_T")


class Recorder:
    """A transport that keeps what the link writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data


class Server(H2Link):
    """The DMZ's side, reduced: every request becomes a stream, answered 200."""

    client_side = False

    def on_request(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        self.streams[stream_id] = H2Stream(self, stream_id)
        self.conn.send_headers(stream_id, [(":status", "200")])
        self._flush()


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


async def pair() -> tuple[h2.connection.H2Connection, Server, Recorder]:
    """A client h2 connection and a server link that have exchanged SETTINGS."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server = Server()
    transport = Recorder()
    server.connection_made(transport)  # type: ignore[arg-type]
    server.data_received(client.data_to_send())
    client.receive_data(transport.take())
    server.data_received(client.data_to_send())  # the SETTINGS ACK
    transport.take()
    return client, server, transport


def open_stream(client: h2.connection.H2Connection) -> int:
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "dmz.test:443")])
    return stream_id


def feed(server: Server, data: bytes, step: int) -> None:
    for start in range(0, len(data), step):
        server.data_received(data[start : start + step])


def frames(data: bytes) -> list[Frame]:
    out = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


@pytest.mark.parametrize("step", [1, 7, 9, 10, 4096, 1 << 20])
def test_data_in_any_pieces_arrives_whole_and_ends_the_stream(step: int) -> None:
    """Split anywhere (inside headers, inside payloads), the bytes and the END_STREAM
    reach the stream, and the windows are charged exactly once."""

    async def main() -> None:
        client, server, _ = await pair()
        client.increment_flow_control_window(8 << 20)
        stream_id = open_stream(client)
        payload = bytes(range(256)) * 600  # 153,600 bytes: several 16 KiB frames
        for start in range(0, len(payload), 16384):
            client.send_data(stream_id, payload[start : start + 16384])
        client.end_stream(stream_id)
        feed(server, client.data_to_send(), step)
        stream = server.streams[stream_id]
        assert bytes(stream._buf) == payload
        assert stream._eof
        h2_stream = server.conn.streams[stream_id]
        assert server.conn.remote_flow_control_window(stream_id) == STREAM_WINDOW - len(payload)
        assert h2_stream.state_machine.state.name == "HALF_CLOSED_REMOTE"

    run(main())


def test_padded_data_takes_h2s_own_path() -> None:
    async def main() -> None:
        client, server, _ = await pair()
        stream_id = open_stream(client)
        client.send_data(stream_id, b"padded bytes", pad_length=20)
        client.send_data(stream_id, b" and plain ones", end_stream=True)
        feed(server, client.data_to_send(), 5)
        stream = server.streams[stream_id]
        assert bytes(stream._buf) == b"padded bytes and plain ones"
        assert stream._eof

    run(main())


def test_an_empty_end_stream_frame_and_a_late_frame_on_a_reset_stream() -> None:
    async def main() -> None:
        client, server, transport = await pair()
        first, second = open_stream(client), open_stream(client)
        client.send_data(first, b"x")
        client.end_stream(first)
        server.data_received(client.data_to_send())
        assert server.streams[first]._eof
        # The server resets the second stream; the client's DATA crosses the reset.
        server.streams[second].abort()
        transport.take()
        raw = DataFrame(second)
        raw.data = b"late"
        server.data_received(raw.serialize())
        assert not transport.closed  # a stream error at most, never the link
        assert second not in server.streams

    run(main())


@pytest.mark.parametrize("overrun", ["stream", "connection"])
def test_a_peer_overrunning_a_window_gets_goaway_flow_control_error(overrun: str) -> None:
    """A peer that ignores the windows: raw DATA frames past one stream's window
    (2 MiB), or spread over 40 streams past the connection's (64 MiB), all in one read
    (the server credits nothing meanwhile)."""

    async def main() -> None:
        client, server, transport = await pair()
        sids = [open_stream(client) for _ in range(1 if overrun == "stream" else 40)]
        server.data_received(client.data_to_send())
        transport.take()
        chunk = b"z" * 65536
        per_stream = STREAM_WINDOW // len(chunk) + (1 if overrun == "stream" else 0)
        wire = bytearray()
        for sid in sids:
            for _ in range(per_stream):
                frame = DataFrame(sid)
                frame.data = chunk
                wire += frame.serialize()
        server.data_received(bytes(wire))
        assert transport.closed
        goaways = [f for f in frames(transport.take()) if isinstance(f, GoAwayFrame)]
        assert goaways, "no GOAWAY"
        assert goaways[-1].error_code == 3  # FLOW_CONTROL_ERROR

    run(main())


def test_the_sender_writes_plain_data_frames_within_the_peers_limits() -> None:
    """What the fast sender writes is what h2 would: DATA frames no larger than the
    peer's SETTINGS_MAX_FRAME_SIZE, charged to both windows, readable by h2, after
    whatever h2 had queued."""

    async def main() -> None:
        client, server, transport = await pair()
        stream_id = open_stream(client)
        server.data_received(client.data_to_send())
        client.receive_data(transport.take())  # the 200
        stream = server.streams[stream_id]
        payload = bytes(range(251)) * 200  # 50,200 bytes, under the 65,535 windows
        before = server.conn.local_flow_control_window(stream_id)
        server.conn.ping(b"12345678")  # queued in h2, not flushed yet
        stream.write(payload)
        wire = transport.take()
        sent = frames(wire)
        assert isinstance(sent[0], PingFrame)
        data = [f for f in sent if isinstance(f, DataFrame)]
        assert all(len(f.data) <= 16384 for f in data)  # the client's default
        assert b"".join(f.data for f in data) == payload
        assert server.conn.local_flow_control_window(stream_id) == before - len(payload)
        events = client.receive_data(wire)
        got = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        assert got == payload

    run(main())
