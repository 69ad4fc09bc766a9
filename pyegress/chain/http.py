"""HTTP CONNECT connector: asks an HTTP proxy hop to open a tunnel (gost-compat 2.4)."""

from __future__ import annotations

import asyncio

from pyegress import __version__
from pyegress.config.nodes import Node
from pyegress.endpoint import Endpoint, read_message
from pyegress.errors import ConnectTimeout, HopRefused, RemoteProtocolError
from pyegress.protocols.addresses import join_host_port
from pyegress.protocols.http1 import basic_credentials, parse_response_head, render_request_head

USER_AGENT = f"pyegress/{__version__}"
CONN_ID_HEADER = "Pyegress-Conn-Id"


def _refusal(status: int, reason: str, hop: str) -> HopRefused:
    # A hop's 403 means a rule refused the target: the client sees a refusal too.
    # Anything else is the hop failing us: a gateway error.
    if status == 403:
        return HopRefused(f"hop {hop} refused: {status} {reason}", http_status=403, socks5_reply=2)
    code = status if status in (502, 503, 504) else 502
    return HopRefused(f"hop {hop} answered {status} {reason}", http_status=code, socks5_reply=1)


async def connect(
    endpoint: Endpoint,
    node: Node,
    host: str,
    port: int,
    timeout: float,
    conn_id: str | None = None,
) -> None:
    """Send ``CONNECT host:port`` over ``endpoint`` and wait for the hop's 200.

    Bytes the hop sends after its response head stay buffered in the endpoint, so an
    early server greeting is not lost (gost-compat 2.4's read-ahead pitfall).
    """
    target = join_host_port(host, port)
    headers = [("Host", target), ("User-Agent", USER_AGENT)]
    if node.user is not None:
        headers.append(("Proxy-Authorization", basic_credentials(node.user, node.password or "")))
    headers.append(("Proxy-Connection", "keep-alive"))
    if conn_id is not None:
        # Joins this tier's records with the next tier's (a pyegress DMZ reads it).
        headers.append((CONN_ID_HEADER, conn_id))
    endpoint.write(render_request_head("CONNECT", target, headers))

    def truncated(_: bytes) -> RemoteProtocolError:
        return RemoteProtocolError(f"hop {node.address} closed before answering CONNECT")

    try:
        async with asyncio.timeout(timeout):
            head = await read_message(endpoint, parse_response_head, truncated)
    except TimeoutError:
        raise ConnectTimeout(f"hop {node.address} did not answer CONNECT in time") from None
    if head.status != 200:
        raise _refusal(head.status, head.reason, node.address)
