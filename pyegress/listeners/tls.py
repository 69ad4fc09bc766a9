"""Server-side TLS that we drive ourselves, so every refused handshake is logged.

asyncio's built-in ``create_server(ssl=...)`` drops a failed handshake silently (an
``ssl.SSLError`` is an ``OSError``, logged only in debug mode). An egress exit must say
who was refused and why (a missing or untrusted client certificate), so TLS listeners
accept plain TCP and run the handshake with ``loop.start_tls`` here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from pyegress.observe.log import Logger


class TlsAcceptor(asyncio.Protocol):
    """Accepts TCP, completes TLS, then hands the TLS transport to the real protocol."""

    __slots__ = ("_context", "_factory", "_log", "_spawn", "_timeout")

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        timeout: float,
        log: Logger,
        spawn: Callable[[Any], None],
    ) -> None:
        self._factory = factory
        self._context = context
        self._timeout = timeout
        self._log = log
        self._spawn = spawn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Nothing may be read before the TLS layer takes over the transport.
        transport.pause_reading()  # type: ignore[attr-defined]
        self._spawn(self._handshake(transport))

    async def _handshake(self, transport: Any) -> None:
        loop = asyncio.get_running_loop()
        protocol = self._factory()
        peer = transport.get_extra_info("peername")
        try:
            new = await loop.start_tls(
                transport,
                protocol,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self._timeout,
            )
        except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self._log.warning(
                "tls_handshake_failed",
                peer=f"{peer[0]}:{peer[1]}" if peer else "",
                reason=str(reason),
                error=str(exc) or type(exc).__name__,
            )
            transport.abort()
            return
        if new is None:
            transport.abort()
            return
        protocol.connection_made(new)
