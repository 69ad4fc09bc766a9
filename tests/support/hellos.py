"""ClientHellos for live tunnels: real ones from the stdlib ``ssl`` module (an SSLObject
over MemoryBIOs, so the bytes are what OpenSSL sends), variants made by editing their
extensions, and a TLS client that runs a real handshake over an already-open socket (a
proxy tunnel) with its first flight re-framed or cut into pieces on the way.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

EXT_SERVER_NAME = 0x0000
EXT_ECH = 0xFE0D
RECORD_HANDSHAKE = 0x16


def _context(ca: Path | None, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def client_hello(server_hostname: str | None, alpn: Sequence[str] = ()) -> bytes:
    """The first flight of a real TLS client; ``None`` sends no server_name."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _context(None, alpn).wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def handshake_payload(stream: bytes) -> bytes:
    """The handshake bytes a run of TLS handshake records carries."""
    out = bytearray()
    at = 0
    while at < len(stream):
        if stream[at] != RECORD_HANDSHAKE:
            raise ValueError(f"record type {stream[at]:#x} at {at}: not a handshake record")
        size = int.from_bytes(stream[at + 3 : at + 5], "big")
        out += stream[at + 5 : at + 5 + size]
        at += 5 + size
    return bytes(out)


def reframe(payload: bytes, sizes: Iterable[int]) -> bytes:
    """``payload`` in handshake records whose lengths cycle through ``sizes``."""
    lengths = list(sizes)
    out = bytearray()
    at = index = 0
    while at < len(payload):
        piece = payload[at : at + lengths[index % len(lengths)]]
        out += bytes((RECORD_HANDSHAKE, 3, 1)) + len(piece).to_bytes(2, "big") + piece
        at += len(piece)
        index += 1
    return bytes(out)


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def server_name(*names: bytes) -> bytes:
    """A server_name extension with one host_name entry per name."""
    entries = b"".join(b"\x00" + len(n).to_bytes(2, "big") + n for n in names)
    return extension(EXT_SERVER_NAME, len(entries).to_bytes(2, "big") + entries)


def ech_outer() -> bytes:
    """An encrypted_client_hello extension of the outer kind (draft-ietf-tls-esni):
    type 0, HPKE suite, config id, an encapsulated key and an opaque payload."""
    enc = bytes(range(32))
    payload = bytes(range(64, 192))
    body = b"\x00" + b"\x00\x20\x00\x01\x00\x01" + b"\x07"
    body += len(enc).to_bytes(2, "big") + enc + len(payload).to_bytes(2, "big") + payload
    return extension(EXT_ECH, body)


def edit_hello(stream: bytes, drop: Iterable[int] = (), add: Iterable[bytes] = ()) -> bytes:
    """The ClientHello of ``stream`` without the extensions whose types are in ``drop``
    and with the encoded extensions ``add`` appended; lengths are fixed up and the result
    is one record."""
    dropped = set(drop)
    message = handshake_payload(stream)
    if message[0] != 0x01:
        raise ValueError("not a ClientHello")
    body = message[4:]
    at = 2 + 32  # legacy_version, random
    at += 1 + body[at]  # session id
    at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher suites
    at += 1 + body[at]  # compression methods
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    kept = bytearray()
    pos = at + 2
    while pos < end:
        size = 4 + int.from_bytes(body[pos + 2 : pos + 4], "big")
        if int.from_bytes(body[pos : pos + 2], "big") not in dropped:
            kept += body[pos : pos + size]
        pos += size
    kept += b"".join(add)
    new_body = body[:at] + len(kept).to_bytes(2, "big") + bytes(kept)
    new_message = b"\x01" + len(new_body).to_bytes(3, "big") + new_body
    return reframe(new_message, [len(new_message)])


def with_sni(*names: bytes, base: bytes | None = None) -> bytes:
    """A real ClientHello whose server_name lists ``names`` (none: no extension)."""
    stream = base if base is not None else client_hello("placeholder.invalid")
    add = [server_name(*names)] if names else []
    return edit_hello(stream, drop=[EXT_SERVER_NAME], add=add)


def send_in_pieces(sock: socket.socket, data: bytes, pieces: int, delay: float) -> None:
    """``data`` in ``pieces`` writes ``delay`` seconds apart (TCP_NODELAY: one segment
    each on loopback-like links)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    step = max(1, -(-len(data) // max(1, pieces)))
    for at in range(0, len(data), step):
        sock.sendall(data[at : at + step])
        if at + step < len(data):
            time.sleep(delay)


class TlsSession:
    """A TLS client session over an open socket (a proxy tunnel), MemoryBIO driven."""

    def __init__(self, sock: socket.socket, server_hostname: str | None, ca: Path | None):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = _context(ca).wrap_bio(
            self.incoming, self.outgoing, server_hostname=server_hostname
        )

    def handshake(
        self,
        first_flight: Callable[[bytes], bytes] | None = None,
        pieces: int = 1,
        delay: float = 0.0,
    ) -> TlsSession:
        """Run the handshake. ``first_flight`` may rewrite the ClientHello's records
        (re-framing keeps the handshake valid: the transcript covers messages, not
        records); the first flight is sent in ``pieces`` writes ``delay`` apart."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.do_handshake()
        first = self.outgoing.read()
        if first_flight is not None:
            first = first_flight(first)
        send_in_pieces(self.sock, first, pieces, delay)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("the tunnel closed during the TLS handshake") from None
                self.incoming.write(data)
        self._flush()
        return self

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def get(self, host: str) -> dict[str, Any]:
        """``GET /echo`` over the session; the origin's JSON echo."""
        self.obj.write(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        self._flush()
        response = bytearray()
        while True:
            try:
                chunk = self.obj.read(65536)
                if not chunk:
                    break
                response += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            data = self.sock.recv(65536)
            if not data:
                break
            self.incoming.write(data)
        head, _, body = bytes(response).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"origin answered {bytes(response[:200])!r}")
        echo: dict[str, Any] = json.loads(body)
        return echo
