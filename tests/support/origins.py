"""Origin servers the tests talk to through the proxy, each in its own thread.

``TcpOrigin`` speaks a one-line command protocol so one server covers the relay
scenarios; ``HttpOrigin`` is the standard library's HTTP/1.1 server (keep-alive,
chunked and close-delimited bodies), optionally behind TLS with trustme certificates.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from tests.support.ports import free_port


def pattern(n: int, seed: bytes = b"pyegress") -> bytes:
    """``n`` deterministic bytes; a shorter pattern is a prefix of a longer one."""
    return hashlib.shake_256(seed).digest(n)


class TcpOrigin:
    """Commands (first line from the client):

    - ``ECHO``: echo every byte; answer a FIN with a FIN.
    - ``UPLOAD n``: read until the client's FIN, answer ``sha256-hex len\\n`` then ``n``
      pattern bytes, then FIN (the half-close scenario).
    - ``SOURCE n``: send ``n`` pattern bytes, then FIN.
    - ``HOLD``: say nothing, keep the connection.
    - ``RESET``: reset the connection (RST) at once.
    Every connection's end is noted in ``events`` as ``(command, outcome)``.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.events: list[tuple[str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> TcpOrigin:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.05)  # let closing transports finish closing

        fut = asyncio.run_coroutine_threadsafe(close(), self._loop)
        fut.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = ""
        try:
            line = await reader.readline()
            command = line.decode().strip()
            verb, _, arg = command.partition(" ")
            if verb == "ECHO":
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
                await writer.drain()
            elif verb == "UPLOAD":
                digest = hashlib.sha256()
                total = 0
                while data := await reader.read(262144):
                    digest.update(data)
                    total += len(data)
                writer.write(f"{digest.hexdigest()} {total}\n".encode())
                await self._send_pattern(writer, int(arg))
            elif verb == "SOURCE":
                await self._send_pattern(writer, int(arg))
            elif verb == "HOLD":
                await reader.read()
            elif verb == "RESET":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                self.events.append((command, "reset_sent"))
                return
            self.events.append((command, "done"))
        except (ConnectionError, OSError) as exc:
            self.events.append((command, type(exc).__name__))
        finally:
            writer.close()

    async def _send_pattern(self, writer: asyncio.StreamWriter, n: int) -> None:
        data = pattern(n)
        view = memoryview(data)
        for start in range(0, n, 1 << 20):
            writer.write(view[start : start + (1 << 20)])
            await writer.drain()
        writer.write_eof()
        await writer.drain()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "origin/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(length)

    def _send(self, body: bytes, extra: list[tuple[str, str]] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra or []:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        self.server.requests.append((self.command, self.path, self.headers.get("Host", "")))  # type: ignore[attr-defined]
        kind = parts[0]
        n = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if kind == "bytes":
            self._send(pattern(n))
        elif kind == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            data = pattern(n)
            for start in range(0, n, 8191):
                piece = data[start : start + 8191]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif kind == "close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(pattern(n))
            self.close_connection = True
        elif kind == "host":
            self._send(self.headers.get("Host", "").encode())
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        self.server.requests.append((self.command, self.path, self.headers.get("Host", "")))  # type: ignore[attr-defined]
        body = self._body()
        self._send(f"{hashlib.sha256(body).hexdigest()} {len(body)}".encode())


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str, str]]


class HttpOrigin:
    def __init__(
        self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.server = _Server((host, port), _Handler)
        self.server.requests = []
        self.port = int(self.server.server_address[1])
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        return self.server.requests

    def start(self) -> HttpOrigin:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


Stopper = Callable[[], None]
