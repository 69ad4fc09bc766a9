"""SOCKS4 and SOCKS4a listener.

SOCKS4 carries no password, so a service that requires authentication refuses it
(as gost v2 does). Only CONNECT is served; BIND is rejected.
"""

from __future__ import annotations

import asyncio

from pyegress.endpoint import Endpoint, read_message
from pyegress.engine import Service, handshake_deadline
from pyegress.errors import (
    AuthRequired,
    HandshakeTimeout,
    LocalProtocolError,
    PyegressError,
    UnsupportedCommand,
)
from pyegress.protocols import socks4


def _truncated(_: bytes) -> PyegressError:
    return LocalProtocolError("client closed during the SOCKS4 request")


async def serve(client: Endpoint, service: Service) -> None:
    with service.tunnel(client, "socks4") as t:
        try:
            async with asyncio.timeout_at(handshake_deadline(service.handshake_timeout)):
                request = await read_message(client, socks4.parse_request, _truncated)
        except TimeoutError:
            raise HandshakeTimeout("SOCKS4 request not completed in time") from None
        except LocalProtocolError:
            t.status = socks4.REPLY_REJECTED
            client.write(socks4.render_reply(False))
            raise
        t.host, t.port = request.host, request.port
        t.status = socks4.REPLY_REJECTED
        if service.requires_auth:
            client.write(socks4.render_reply(False))
            raise AuthRequired("SOCKS4 has no authentication and this service requires it")
        if request.command != 1:
            client.write(socks4.render_reply(False))
            raise UnsupportedCommand(f"SOCKS4 command {request.command} is not supported")
        try:
            upstream = await service.dial(t, request.host, request.port)
        except PyegressError:
            client.write(socks4.render_reply(False))
            raise
        t.status = socks4.REPLY_GRANTED
        client.write(socks4.render_reply(True))
        await service.relay(t, client, upstream)
