"""A TLS listening server that sees every handshake's outcome, so refusals are logged.

asyncio's ``create_server(ssl=...)`` drops a failed handshake silently (``ssl.SSLError``
is an ``OSError``, logged only in debug mode), and running ``start_tls`` on an accepted
transport races with uvloop, which may deliver the first bytes before the TLS layer is
in place. So TLS listeners accept raw sockets themselves and hand each one to
``loop.connect_accepted_socket(..., ssl=...)``, which returns once the handshake is
done or raises why it failed: a missing or untrusted client certificate is one log line
naming the peer and the reason.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from pyegress.observe.log import Logger


def _listening_sockets(
    host: str | None, port: int, backlog: int, reuse_port: bool = False
) -> list[socket.socket]:
    """``reuse_port``: SO_REUSEPORT, so every worker of ``--workers`` binds the port and
    the kernel spreads new connections over them."""
    if not host:
        if socket.has_dualstack_ipv6():
            sock = socket.create_server(
                ("", port),
                family=socket.AF_INET6,
                dualstack_ipv6=True,
                backlog=backlog,
                reuse_port=reuse_port,
            )
        else:
            sock = socket.create_server(("", port), backlog=backlog, reuse_port=reuse_port)
        return [sock]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return [
        socket.create_server(address[:2], family=family, backlog=backlog, reuse_port=reuse_port)
    ]


class TlsServer:
    """The part of ``asyncio.Server``'s surface a service uses: sockets, close, wait."""

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        handshake_timeout: float,
        log: Logger,
    ) -> None:
        self._factory = factory
        self.context = context
        self._timeout = handshake_timeout
        self._log = log
        self.sockets: list[socket.socket] = []
        # Told of every handshake: (peer, the error or None, whether it was a quiet probe).
        self.on_result: Callable[[Any, BaseException | None, bool], None] | None = None
        self._accepting: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(
        self, host: str | None, port: int, backlog: int = 1024, reuse_port: bool = False
    ) -> None:
        self.sockets = _listening_sockets(host, port, backlog, reuse_port)
        for sock in self.sockets:
            sock.setblocking(False)
            self._accepting.append(asyncio.ensure_future(self._accept(sock)))

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                self._log.warning("accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            peer: Any = conn.getpeername()
        except OSError:
            peer = None
        try:
            await loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=self.context,
                ssl_handshake_timeout=self._timeout,
            )
            if self.on_result is not None:
                self.on_result(peer, None, False)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            # A peer that hangs up before its ClientHello (a TCP probe) is not a refusal.
            quiet = isinstance(exc, ConnectionResetError | ssl.SSLEOFError) or reason in (
                "UNEXPECTED_EOF_WHILE_READING",
                "EOF",
            )
            (self._log.debug if quiet else self._log.warning)(
                "tls_handshake_failed",
                peer=f"{peer[0]}:{peer[1]}" if peer else "",
                reason=str(reason),
                error=str(exc) or type(exc).__name__,
            )
            with suppress(OSError):
                conn.close()
            if self.on_result is not None:
                self.on_result(peer, exc, quiet)

    def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        if self._accepting:
            await asyncio.gather(*self._accepting, return_exceptions=True)
