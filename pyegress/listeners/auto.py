"""Auto listener: SOCKS5, SOCKS4 or HTTP on one port, told apart by the first byte."""

from __future__ import annotations

import asyncio

from pyegress.endpoint import Endpoint
from pyegress.engine import Service
from pyegress.errors import HandshakeTimeout
from pyegress.listeners import http, socks4, socks5


async def serve(client: Endpoint, service: Service) -> None:
    try:
        async with asyncio.timeout(service.handshake_timeout):
            first = await client.read()
    except TimeoutError:
        async with service.tunnel(client, "auto") as t:
            t.reason = "handshake_timeout"
            t.error = str(HandshakeTimeout("no bytes from the client in time"))
        return
    if not first:
        return
    client.unread(first)
    if first[0] == 0x05:
        await socks5.serve(client, service)
    elif first[0] == 0x04:
        await socks4.serve(client, service)
    else:
        await http.serve(client, service)
