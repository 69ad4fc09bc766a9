"""SOCKS5 listener (RFC 1928, RFC 1929 user/password).

CONNECT with IPv4, IPv6 and domain targets; BIND and UDP ASSOCIATE are answered with
reply 0x07 (command not supported). The gost TLS method (0x80) is never chosen: a
SOCKS5 hop inside the TLS tier link needs no second encryption (gost-compat pitfall 11).
"""

from __future__ import annotations

import asyncio

from pyegress.endpoint import Endpoint, read_message
from pyegress.engine import Service, handshake_deadline
from pyegress.errors import (
    SOCKS5_COMMAND_NOT_SUPPORTED,
    AuthRequired,
    HandshakeTimeout,
    LocalProtocolError,
    PyegressError,
    UnsupportedCommand,
)
from pyegress.protocols import socks5
from pyegress.tunnel import Tunnel


def _truncated(_: bytes) -> PyegressError:
    return LocalProtocolError("client closed during the SOCKS5 handshake")


async def serve(client: Endpoint, service: Service) -> None:
    with service.tunnel(client, "socks5") as t:
        try:
            async with asyncio.timeout_at(handshake_deadline(service.handshake_timeout)):
                request = await _handshake(client, service, t)
        except TimeoutError:
            raise HandshakeTimeout("SOCKS5 handshake not completed in time") from None
        t.host, t.port = request.host, request.port
        if request.command != socks5.CMD_CONNECT:
            t.status = SOCKS5_COMMAND_NOT_SUPPORTED
            client.write(socks5.render_reply(SOCKS5_COMMAND_NOT_SUPPORTED))
            raise UnsupportedCommand(f"SOCKS5 command {request.command:#x} is not supported")
        try:
            upstream = await service.dial(t, request.host, request.port)
        except PyegressError as exc:
            t.status = exc.socks5_reply
            client.write(socks5.render_reply(exc.socks5_reply))
            raise
        t.status = 0
        bound_host, bound_port = upstream.local_address
        client.write(socks5.render_reply(0, bound_host or "0.0.0.0", bound_port))
        await service.relay(t, client, upstream)


async def _handshake(client: Endpoint, service: Service, t: Tunnel) -> socks5.Socks5Request:
    methods = await read_message(client, socks5.parse_greeting, _truncated)
    if service.requires_auth:
        if socks5.METHOD_USERPASS not in methods:
            client.write(socks5.render_method_choice(socks5.METHOD_NO_ACCEPTABLE))
            raise AuthRequired("SOCKS5 client offered no user/password method")
        client.write(socks5.render_method_choice(socks5.METHOD_USERPASS))
        user, password = await read_message(client, _parse_userpass, _truncated)
        if not service.check_credentials(user, password):
            client.write(socks5.render_userpass_status(False))
            raise AuthRequired(f"SOCKS5 credentials rejected for user {user!r}")
        t.user = user
        client.write(socks5.render_userpass_status(True))
    else:
        if socks5.METHOD_NO_AUTH not in methods:
            client.write(socks5.render_method_choice(socks5.METHOD_NO_ACCEPTABLE))
            raise AuthRequired("SOCKS5 client offered no acceptable method")
        client.write(socks5.render_method_choice(socks5.METHOD_NO_AUTH))
    try:
        return await read_message(client, socks5.parse_request, _truncated)
    except LocalProtocolError as exc:
        # A request we cannot parse still gets a reply code before we close.
        t.status = exc.socks5_reply
        client.write(socks5.render_reply(exc.socks5_reply))
        raise


def _parse_userpass(buf: bytearray) -> tuple[tuple[str, str], int] | None:
    parsed = socks5.parse_userpass(buf)
    if parsed is None:
        return None
    user, password, consumed = parsed
    return (user, password), consumed
