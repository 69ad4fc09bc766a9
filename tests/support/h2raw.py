"""HTTP/2 at the frame level with hyperframe and hpack only: an independent peer for
wire-evidence tests (it shares no code with pyegress's h2 link)."""

from __future__ import annotations

import socket
import ssl

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class RawH2:
    """One HTTP/2 connection driven frame by frame over a blocking socket."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    def send(self, frame: Frame) -> None:
        self.sock.sendall(frame.serialize())

    def read_frame(self) -> Frame:
        header = _recv_exact(self.sock, 9)
        frame, length = Frame.parse_frame_header(memoryview(header))
        body = _recv_exact(self.sock, length) if length else b""
        frame.parse_body(memoryview(body))
        return frame

    def headers_of(self, frame: HeadersFrame) -> list[tuple[str, str]]:
        return [
            (k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
            for k, v in self.decoder.decode(frame.data)
        ]

    # -- client side --------------------------------------------------------------

    def client_start(self, window: int = 16 * 1024 * 1024) -> None:
        self.sock.sendall(PREFACE)
        self.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: window}))
        update = WindowUpdateFrame(0)
        update.window_increment = window
        self.send(update)

    def send_headers(
        self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool = False
    ) -> None:
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(headers)
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        self.send(frame)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        frame = DataFrame(stream_id)
        frame.data = data
        if end_stream:
            frame.flags.add("END_STREAM")
        self.send(frame)

    def next_on_stream(self, stream_id: int) -> Frame:
        """The next HEADERS/DATA/RST frame of ``stream_id``, answering SETTINGS and PINGs."""
        while True:
            frame = self.read_frame()
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                ack = SettingsFrame(0)
                ack.flags.add("ACK")
                self.send(ack)
                continue
            if isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                pong = PingFrame(0)
                pong.opaque_data = frame.opaque_data
                pong.flags.add("ACK")
                self.send(pong)
                continue
            if frame.stream_id == stream_id:
                return frame

    def read_stream_data(self, stream_id: int, n: int) -> bytes:
        """Read ``n`` bytes of DATA on a stream, crediting the windows as we go."""
        out = bytearray()
        while len(out) < n:
            frame = self.next_on_stream(stream_id)
            if isinstance(frame, DataFrame):
                out += frame.data
                if frame.data:
                    for sid in (0, stream_id):
                        update = WindowUpdateFrame(sid)
                        update.window_increment = len(frame.data)
                        self.send(update)
                if "END_STREAM" in frame.flags:
                    break
            elif not isinstance(frame, WindowUpdateFrame):
                raise AssertionError(f"unexpected frame {frame!r}")
        return bytes(out)


def tls_client(host: str, port: int, alpn: list[str] | None, **load: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if load:
        ctx.load_cert_chain(load["cert"], load["key"])
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="dmz.test")
