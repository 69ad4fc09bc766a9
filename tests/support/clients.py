"""Minimal blocking clients written from the RFCs, independent of pyegress's parsers."""

from __future__ import annotations

import socket
import struct


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until(sock: socket.socket, marker: bytes, limit: int = 65536) -> bytes:
    buf = bytearray()
    while marker not in buf:
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"EOF before {marker!r}: {bytes(buf)!r}")
        buf += chunk
        if len(buf) > limit:
            raise ValueError("no marker")
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(1 << 20):
        buf += chunk
    return bytes(buf)


def http_connect(
    proxy: tuple[str, int], target: str, timeout: float = 10
) -> tuple[socket.socket, bytes]:
    """CONNECT through an HTTP proxy; returns the socket and the response head."""
    sock = socket.create_connection(proxy, timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = recv_until(sock, b"\r\n\r\n")
    return sock, head


def socks5_connect(
    proxy: tuple[str, int], host: str, port: int, timeout: float = 10
) -> tuple[socket.socket, int]:
    """SOCKS5 CONNECT with a domain (or IP text) target; returns the socket and REP."""
    sock = socket.create_connection(proxy, timeout=timeout)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
    head = recv_exact(sock, 4)
    atyp = head[3]
    if atyp == 1:
        recv_exact(sock, 6)
    elif atyp == 4:
        recv_exact(sock, 18)
    elif atyp == 3:
        recv_exact(sock, recv_exact(sock, 1)[0] + 2)
    return sock, head[1]


def socks4_connect(
    proxy: tuple[str, int], host: str, port: int, timeout: float = 10
) -> tuple[socket.socket, int]:
    """SOCKS4a CONNECT (domain) or SOCKS4 (IPv4 literal)."""
    sock = socket.create_connection(proxy, timeout=timeout)
    try:
        ip = socket.inet_aton(host)
        sock.sendall(b"\x04\x01" + struct.pack("!H", port) + ip + b"u\x00")
    except OSError:
        sock.sendall(
            b"\x04\x01"
            + struct.pack("!H", port)
            + b"\x00\x00\x00\x01u\x00"
            + host.encode()
            + b"\x00"
        )
    reply = recv_exact(sock, 8)
    return sock, reply[1]
