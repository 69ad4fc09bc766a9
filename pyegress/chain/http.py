"""HTTP CONNECT connector: asks an HTTP proxy hop to open a tunnel (gost-compat 2.4)."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

from pyegress import __version__
from pyegress.config.nodes import Node
from pyegress.endpoint import Endpoint, read_message
from pyegress.errors import ConnectTimeout, RemoteProtocolError, hop_refusal
from pyegress.protocols.addresses import join_host_port
from pyegress.protocols.http1 import basic_credentials, parse_response_head, render_request_head

USER_AGENT = f"pyegress/{__version__}"
CONN_ID_HEADER = "Pyegress-Conn-Id"
# A transparent tunnel's original destination ("ip:port") and where its name came from
# (sni, host, orig_dst, dns); a pyegress DMZ records them and checks the address
# against the name (policy orig_dst_check). Like the conn id, honoured only from a
# verified peer.
ORIG_DST_HEADER = "Pyegress-Orig-Dst"
NAME_SOURCE_HEADER = "Pyegress-Name-Source"

# Set by the redirect listener around its dial: (original destination, name source).
# A context variable rather than a parameter so every connector in the chain sees it
# without each hop's signature carrying transparent mode.
transparent_origin: ContextVar[tuple[str, str] | None] = ContextVar(
    "pyegress_transparent_origin", default=None
)


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
        # Only the tunnel's own CONNECT (it has a conn id), never a link carrier's.
        origin = transparent_origin.get()
        if origin is not None:
            headers.append((ORIG_DST_HEADER, origin[0]))
            headers.append((NAME_SOURCE_HEADER, origin[1]))
    endpoint.write(render_request_head("CONNECT", target, headers))

    def truncated(_: bytes) -> RemoteProtocolError:
        return RemoteProtocolError(f"hop {node.address} closed before answering CONNECT")

    try:
        async with asyncio.timeout(timeout):
            head = await read_message(endpoint, parse_response_head, truncated)
    except TimeoutError:
        raise ConnectTimeout(f"hop {node.address} did not answer CONNECT in time") from None
    if head.status != 200:
        raise hop_refusal(head.status, head.reason, node.address, head.get("Retry-After"))
