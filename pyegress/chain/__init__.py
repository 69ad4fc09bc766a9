"""Proxy chains: the ``-F`` hops a tunnel goes through, in order (gost-compat 1.5).

Dialing a chain opens a TCP connection to the first hop, then asks each hop in turn to
connect to the next one, and the last hop to connect to the target. The target travels
as the client named it: a name is resolved only by whoever dials it (the last hop, or
this process when there are no hops).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from pyegress.chain import direct, http, socks5
from pyegress.config.nodes import Node
from pyegress.endpoint import Endpoint
from pyegress.errors import ConfigError, PyegressError

Connector = Callable[[Endpoint, Node, str, int, float], Awaitable[None]]

_CONNECTORS: dict[str, Connector] = {
    "http": http.connect,
    "socks5": socks5.connect,
}
_SUPPORTED_DIALERS = {"tcp"}

DEFAULT_DIAL_TIMEOUT = 5.0


class Hop:
    """One ``-F`` node: where to reach it and how to ask it for the next connection."""

    __slots__ = ("connector", "node", "timeout")

    def __init__(self, node: Node) -> None:
        connector = _CONNECTORS.get(node.kind)
        if connector is None:
            raise ConfigError(f"-F {node.redacted()}: connector {node.kind!r} is not supported")
        if node.transport not in _SUPPORTED_DIALERS:
            raise ConfigError(
                f"-F {node.redacted()}: transport {node.transport!r} is not supported yet"
            )
        self.node = node
        self.connector = connector
        self.timeout = node.duration("timeout", DEFAULT_DIAL_TIMEOUT)


class Chain:
    __slots__ = ("hops",)

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.hops = [Hop(node) for node in nodes]

    def describe(self) -> list[str]:
        return [hop.node.redacted() for hop in self.hops]

    async def dial(self, host: str, port: int, timeout: float) -> Endpoint:
        """A connected endpoint whose bytes reach ``host:port`` through every hop."""
        if not self.hops:
            return await direct.dial(host, port, timeout)
        first = self.hops[0]
        endpoint = await direct.dial(first.node.host, first.node.port, first.timeout)
        try:
            for index, hop in enumerate(self.hops):
                if index + 1 < len(self.hops):
                    nxt = self.hops[index + 1].node
                    next_host, next_port = nxt.host, nxt.port
                else:
                    next_host, next_port = host, port
                await hop.connector(endpoint, hop.node, next_host, next_port, hop.timeout)
        except PyegressError:
            endpoint.abort()
            raise
        except BaseException:
            endpoint.abort()
            raise
        return endpoint
