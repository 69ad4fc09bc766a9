"""Raw TLS forwarding by SNI: a stream that starts with a TLS ClientHello instead of a
proxy request (what a recent gost v3 auto handler accepts, gost-compat 1.3) is sent to
the ClientHello's server name on port 443, bytes untouched.

The ClientHello is reassembled across records and reads before anything is dialed; a
hello without a server name is refused, since there is nothing to judge or dial.
"""

from __future__ import annotations

import asyncio

from pyegress.endpoint import Endpoint
from pyegress.engine import Service, handshake_deadline
from pyegress.errors import HandshakeTimeout, LocalProtocolError
from pyegress.protocols.tls_hello import parse_client_hello

TLS_PORT = 443


async def serve(client: Endpoint, service: Service) -> None:
    with service.tunnel(client, "tls-sni") as t:
        buf = bytearray()
        try:
            async with asyncio.timeout_at(handshake_deadline(service.handshake_timeout)):
                while (hello := parse_client_hello(buf)) is None:
                    data = await client.read()
                    if not data:
                        raise LocalProtocolError("client closed inside its TLS ClientHello")
                    buf += data
        except TimeoutError:
            raise HandshakeTimeout("TLS ClientHello not completed in time") from None
        finally:
            client.unread(buf)
        if not hello.sni:
            raise LocalProtocolError("TLS ClientHello without a server name: nowhere to go")
        upstream = await service.dial(t, hello.sni, TLS_PORT)
        await service.relay(t, client, upstream)
