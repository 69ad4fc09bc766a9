"""Auto listener: SOCKS5, SOCKS4, a raw TLS ClientHello or HTTP on one port, told apart
by the first bytes (gost-compat 1.3)."""

from __future__ import annotations

from pyegress.endpoint import Endpoint
from pyegress.engine import Service
from pyegress.listeners import http, sni, socks4, socks5
from pyegress.protocols.tls_hello import looks_like_tls


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
    elif first[0] == 0x16 and looks_like_tls(first):
        await sni.serve(client, service)
    else:
        await http.serve(client, service)
