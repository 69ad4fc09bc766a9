"""Auto listener: SOCKS5, SOCKS4 or HTTP on one port, told apart by the first byte."""

from __future__ import annotations

from pyegress.endpoint import Endpoint
from pyegress.engine import Service
from pyegress.listeners import http, socks4, socks5


async def serve(client: Endpoint, service: Service) -> None:
    # Service.serve has already waited for the first bytes.
    first = await client.read()
    if not first:
        return
    client.unread(first)
    if first[0] == 0x05:
        await socks5.serve(client, service)
    elif first[0] == 0x04:
        await socks4.serve(client, service)
    else:
        await http.serve(client, service)
