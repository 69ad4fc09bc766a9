"""Direct dialing: a TCP connection from this process to the address given."""

from __future__ import annotations

from pyegress.endpoint import TcpEndpoint, open_tcp


async def dial(host: str, port: int, timeout: float) -> TcpEndpoint:
    return await open_tcp(host, port, timeout)
