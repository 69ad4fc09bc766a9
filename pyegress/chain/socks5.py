"""SOCKS5 connector: asks a SOCKS5 hop to open a tunnel (RFC 1928, RFC 1929).

The target goes as a domain name when it is one (ATYP 3): a name stays a name until
the hop that dials it.
"""

from __future__ import annotations

import asyncio

from pyegress.config.nodes import Node
from pyegress.endpoint import Endpoint, read_message
from pyegress.errors import (
    SOCKS5_NOT_ALLOWED,
    ConnectTimeout,
    HopRefused,
    RemoteProtocolError,
)
from pyegress.protocols import socks5

_REPLY_TEXT = {
    1: "general failure",
    2: "not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


async def connect(
    endpoint: Endpoint,
    node: Node,
    host: str,
    port: int,
    timeout: float,
    conn_id: str | None = None,
) -> None:
    def truncated(_: bytes) -> RemoteProtocolError:
        return RemoteProtocolError(f"SOCKS5 hop {node.address} closed during the handshake")

    try:
        async with asyncio.timeout(timeout):
            methods = [socks5.METHOD_NO_AUTH]
            if node.user is not None:
                methods = [socks5.METHOD_USERPASS, socks5.METHOD_NO_AUTH]
            endpoint.write(socks5.render_greeting(methods))
            method = await read_message(endpoint, socks5.parse_method_choice, truncated)
            if method == socks5.METHOD_USERPASS and node.user is not None:
                endpoint.write(socks5.render_userpass(node.user, node.password or ""))
                ok = await read_message(endpoint, socks5.parse_userpass_status, truncated)
                if not ok:
                    raise HopRefused(
                        f"SOCKS5 hop {node.address} rejected our credentials",
                        http_status=502,
                        socks5_reply=1,
                    )
            elif method != socks5.METHOD_NO_AUTH:
                raise HopRefused(
                    f"SOCKS5 hop {node.address} accepts none of our methods (chose {method:#x})",
                    http_status=502,
                    socks5_reply=1,
                )
            endpoint.write(socks5.render_request(socks5.CMD_CONNECT, host, port))
            reply = await read_message(endpoint, _parse_reply_code, truncated)
    except TimeoutError:
        raise ConnectTimeout(f"SOCKS5 hop {node.address} did not answer in time") from None
    if reply != 0:
        text = _REPLY_TEXT.get(reply, f"reply {reply:#x}")
        status = 403 if reply == SOCKS5_NOT_ALLOWED else 502
        raise HopRefused(
            f"SOCKS5 hop {node.address}: {text}", http_status=status, socks5_reply=reply
        )


def _parse_reply_code(buf: bytearray) -> tuple[int, int] | None:
    parsed = socks5.parse_reply(buf)
    if parsed is None:
        return None
    code, _host, _port, consumed = parsed
    return code, consumed
