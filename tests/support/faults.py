"""Misbehaving peers and small tools for the tier link's fault-injection tests.

- :class:`SilentServer` accepts TCP connections and never says a word; with a TLS
  context it completes the TLS handshake first (ALPN ``h2`` if the context offers it)
  and then stays silent: no HTTP/2 SETTINGS, ever.
- :func:`h2_tls_client` opens a TLS connection to a DMZ like a sidecar would, so a test
  can write raw bytes into it; :func:`read_frames` decodes what comes back with
  hyperframe, independently of pyegress's h2 code.
- :class:`RefusingH2Server` is a DMZ that speaks HTTP/2 but answers every stream with
  RST_STREAM(REFUSED_STREAM), the code that tells a client "not processed, retry
  elsewhere" (RFC 9113 section 8.7).
- :func:`frozen` SIGSTOPs a process and always SIGCONTs it.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from hyperframe.frame import Frame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class SilentServer:
    """Accepts and holds connections on a free loopback port; reads and drops whatever
    arrives, sends nothing. ``accepted`` counts TCP connections, ``handshakes`` counts
    completed TLS handshakes (with ``tls``)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.handshakes = 0
        self.handshake_errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self._accept_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._accept_thread.join(5)
        for thread in list(self._threads):
            thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            thread = threading.Thread(target=self._hold, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _hold(self, conn: socket.socket) -> None:
        sock: socket.socket = conn
        try:
            if self.tls is not None:
                conn.settimeout(5)
                try:
                    sock = self.tls.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    with self._lock:
                        self.handshake_errors.append(f"{type(exc).__name__}: {exc}")
                    return
                with self._lock:
                    self.handshakes += 1
            sock.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    if not sock.recv(65536):
                        return
                except TimeoutError:
                    continue
                except (OSError, ssl.SSLError):
                    return
        finally:
            with suppress(OSError):
                sock.close()
            with suppress(OSError):
                conn.close()


REFUSED_STREAM = 0x7


class RefusingH2Server(SilentServer):
    """TLS + HTTP/2 server side written with hyperframe: SETTINGS, SETTINGS ACK and PING
    ACK as required, then RST_STREAM(REFUSED_STREAM) for every HEADERS it receives."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        super().__init__(tls)
        self.refused: list[int] = []

    def _hold(self, conn: socket.socket) -> None:
        assert self.tls is not None
        conn.settimeout(5)
        try:
            sock = self.tls.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            with self._lock:
                self.handshake_errors.append(f"{type(exc).__name__}: {exc}")
            conn.close()
            return
        with self._lock:
            self.handshakes += 1
        try:
            self._serve(sock)
        except (OSError, ssl.SSLError, EOFError):
            pass
        finally:
            sock.close()

    def _serve(self, sock: ssl.SSLSocket) -> None:
        sock.settimeout(0.1)
        buf = bytearray()
        preface_seen = False
        sock.sendall(SettingsFrame(0).serialize())
        while not self._stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            buf += chunk
            if not preface_seen:
                if len(buf) < len(PREFACE):
                    continue
                if bytes(buf[: len(PREFACE)]) != PREFACE:
                    return
                del buf[: len(PREFACE)]
                preface_seen = True
            while len(buf) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
                if len(buf) < 9 + length:
                    break
                frame.parse_body(memoryview(bytes(buf[9 : 9 + length])))
                del buf[: 9 + length]
                self._answer(sock, frame)

    def _answer(self, sock: ssl.SSLSocket, frame: Any) -> None:
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            sock.sendall(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(frame, HeadersFrame):
            with self._lock:
                self.refused.append(frame.stream_id)
            sock.sendall(RstStreamFrame(frame.stream_id, error_code=REFUSED_STREAM).serialize())


def tls_server_context(cert: Path, key: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def h2_tls_client(
    port: int,
    ca: Path,
    cert: Path | None,
    key: Path | None,
    server_name: str = "dmz.test",
    timeout: float = 5.0,
) -> ssl.SSLSocket:
    """A TLS connection to a DMZ offering ALPN h2, as a sidecar opens it."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame built by hand, so it can be as wrong as a test wants it."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([frame_type, flags])
        + struct.pack(">I", stream_id & 0x7FFFFFFF)
        + payload
    )


@dataclass
class Readback:
    """What a peer sent before it closed: decoded frames and how the socket ended."""

    frames: list[Any] = field(default_factory=list)
    ended: str = ""  # "eof", "reset", "tls-error: ..."; "" if still open at the deadline
    undecodable: bytes = b""


def read_frames(sock: socket.socket, timeout: float) -> Readback:
    """Read HTTP/2 frames until the peer closes (or ``timeout`` passes)."""
    out = Readback()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            out.ended = "reset"
            break
        except ssl.SSLError as exc:
            out.ended = f"tls-error: {exc}"
            break
        if not chunk:
            out.ended = "eof"
            break
        buf += chunk
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(buf[9 : 9 + length])))
            out.frames.append(frame)
            del buf[: 9 + length]
    out.undecodable = bytes(buf)
    return out


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block; SIGCONT however the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
