"""Proxy chains: the ``-F`` hops a tunnel goes through, in order (gost-compat 1.5, 1.6).

Dialing a chain reaches the first hop, then asks each hop in turn to connect to the
next one, and the last hop to connect to the target. The target travels as the client
named it: a name is resolved only by whoever dials it.

A multiplexing hop (``h2``, ``h2c``, ``http2``) cuts the chain as gost does: the hops
before it only carry its long-lived connection, and every tunnel starts as a new stream
on that connection. Each hop may be a node group (``a:443,b:443`` or ``ip=``); members
are tried in the order of ``strategy`` (round, random, fifo), and a member that failed
``max_fails`` times is skipped for ``fail_timeout`` unless no other is left.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence

from pyegress.chain import direct, http, socks5
from pyegress.chain.h2 import H2Node
from pyegress.config.nodes import Node, join_host_port
from pyegress.endpoint import Endpoint, TcpEndpoint
from pyegress.errors import ConfigError, PyegressError, UpstreamError
from pyegress.observe import metrics
from pyegress.policy.loader import from_gost_bypass
from pyegress.policy.rules import Request
from pyegress.tls import ClientTLS, client_context

Connector = Callable[[Endpoint, Node, str, int, float, str | None], Awaitable[None]]

_CONNECTORS: dict[str, Connector] = {
    "http": http.connect,
    "socks5": socks5.connect,
}
_MUX = {"h2", "h2c", "http2"}
_DIALERS = {"tcp", "tls", *_MUX}
_STRATEGIES = {
    "round": "round",
    "rr": "round",
    "random": "random",
    "rand": "random",
    "fifo": "fifo",
    "ha": "fifo",
}

DEFAULT_DIAL_TIMEOUT = 5.0


class Member:
    """One address of a hop's node group, with its failure bookkeeping."""

    __slots__ = ("fails", "h2", "last_fail", "node", "tls")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.fails = 0
        self.last_fail = 0.0
        self.h2: H2Node | None = None
        self.tls: ClientTLS | None = None

    def failed(self) -> None:
        self.fails += 1
        self.last_fail = time.monotonic()

    def succeeded(self) -> None:
        self.fails = 0


class Hop:
    """One ``-F`` node (possibly a group): how to reach it and how to ask it onward."""

    def __init__(self, node: Node) -> None:
        if node.transport not in _DIALERS:
            raise ConfigError(
                f"-F {node.redacted()}: transport {node.transport!r} is not supported"
            )
        connector = _CONNECTORS.get(node.kind)
        if connector is None and node.transport != "http2":
            raise ConfigError(f"-F {node.redacted()}: connector {node.kind!r} is not supported")
        self.node = node
        self.connector = connector
        self.timeout = node.duration("timeout", DEFAULT_DIAL_TIMEOUT)
        strategy = (node.param("strategy") or "round").lower()
        if strategy not in _STRATEGIES:
            raise ConfigError(f"-F {node.redacted()}: unknown strategy {strategy!r}")
        self.strategy = _STRATEGIES[strategy]
        self.max_fails = max(1, node.integer("max_fails", 1))
        self.fail_timeout = node.duration("fail_timeout", 10.0)
        self.members = [Member(node.with_address(h, p)) for h, p in node.members]
        # gost hop bypass (gost-compat 3.3): a bypassed target truncates the route before
        # this hop (direct when it is the first).
        bypass = node.param("bypass")
        self.bypass = from_gost_bypass(bypass, service_level=False) if bypass else None
        if node.transport == "tls":
            for member in self.members:
                member.tls = client_context(member.node, None)
        self._cursor = 0

    @property
    def mux(self) -> bool:
        return self.node.transport in _MUX

    @property
    def unverified_tls(self) -> bool:
        if self.node.transport not in ("tls", "h2", "http2"):
            return False
        return not (self.node.param("ca") or self.node.flag("secure", False))

    def candidates(self) -> list[Member]:
        """Members in the order to try them; recently failed ones only as a last resort."""
        members = self.members
        if len(members) > 1:
            if self.strategy == "round":
                start = self._cursor % len(members)
                self._cursor += 1
                members = members[start:] + members[:start]
            elif self.strategy == "random":
                members = random.sample(members, len(members))
        now = time.monotonic()
        healthy = [
            m for m in members if m.fails < self.max_fails or now - m.last_fail >= self.fail_timeout
        ]
        failed = [m for m in members if m not in healthy]
        return healthy + failed


class Chain:
    def __init__(self, nodes: Sequence[Node]) -> None:
        self.hops = [Hop(node) for node in nodes]
        self._prefixes: dict[int, Chain] = {}
        mux = [i for i, hop in enumerate(self.hops) if hop.mux]
        self.cut = mux[-1] if mux else -1
        if self.cut >= 0:
            route = Chain.__new__(Chain)
            route.hops = self.hops[: self.cut]
            route.cut = -1
            route._prefixes = {}
            for member in self.hops[self.cut].members:
                member.h2 = H2Node(member.node, route.dial)
                member.h2.on_failure = member.failed

    def describe(self) -> list[str]:
        return [hop.node.redacted() for hop in self.hops]

    def unverified(self) -> list[str]:
        return [hop.node.redacted() for hop in self.hops if hop.unverified_tls]

    def _h2_nodes(self) -> list[H2Node]:
        return [m.h2 for hop in self.hops for m in hop.members if m.h2 is not None]

    def streams_open(self) -> int:
        """Streams open on every tier link."""
        return sum(len(link.streams) for node in self._h2_nodes() for link in node.links)

    def link_states(self) -> tuple[int, int, int]:
        """Tier links (h2 members) up, connecting and down."""
        states = [node.state() for node in self._h2_nodes()]
        return states.count("up"), states.count("connecting"), states.count("down")

    async def warm(self) -> None:
        """Keep one tier link up: when no member of the h2 hop has one, try the members
        in the hop's own order until one connects (bounded by their timeouts)."""
        if self.cut < 0:
            return
        hop = self.hops[self.cut]
        if any(m.h2 is not None and m.h2.state() != "down" for m in hop.members):
            return
        for member in hop.candidates():
            if member.h2 is not None:
                await member.h2.warm()
                if member.h2.state() == "up":
                    return

    def new_tls_contexts(self) -> list[tuple[Member, ClientTLS]]:
        """Client TLS contexts read afresh from every TLS hop's files (for a reload)."""
        out: list[tuple[Member, ClientTLS]] = []
        for hop in self.hops:
            for member in hop.members:
                if member.h2 is not None and member.h2.tls is not None:
                    out.append((member, client_context(member.node, ["h2"])))
                elif member.tls is not None:
                    out.append((member, client_context(member.node, None)))
        return out

    def set_tls_contexts(self, contexts: list[tuple[Member, ClientTLS]]) -> None:
        """New connections use the new contexts; open links keep theirs."""
        for member, ctx in contexts:
            if member.h2 is not None:
                member.h2.tls = ctx
            else:
                member.tls = ctx

    def close(self) -> None:
        for hop in self.hops:
            for member in hop.members:
                if member.h2 is not None:
                    member.h2.close()

    def _next_address(self, index: int, host: str, port: int) -> tuple[str, int]:
        if index + 1 < len(self.hops):
            nxt = self.hops[index + 1].node
            return nxt.host, nxt.port
        return host, port

    def route_for(self, host: str, port: int) -> Chain:
        """This chain, or the part of it before the first hop whose ``bypass=`` says the
        target skips it."""
        for index, hop in enumerate(self.hops):
            if hop.bypass is None:
                continue
            verdict = hop.bypass.decide(Request(identity=None, host=host, port=port))
            if verdict.route == "direct":
                return self._prefix(index)
        return self

    def _prefix(self, length: int) -> Chain:
        found = self._prefixes.get(length)
        if found is None:
            found = Chain.__new__(Chain)
            found.hops = self.hops[:length]
            found.cut = self.cut if self.cut < length else -1
            found._prefixes = {}
            self._prefixes[length] = found
        return found

    async def dial(
        self, host: str, port: int, timeout: float, conn_id: str | None = None
    ) -> Endpoint:
        """A connected endpoint whose bytes reach ``host:port`` through every hop (up to
        a hop that ``bypass=`` tells the target to skip)."""
        route = self.route_for(host, port)
        if route is not self:
            return await route.dial(host, port, timeout, conn_id)
        if not self.hops:
            return await direct.dial(host, port, timeout)
        if self.cut >= 0:
            endpoint, first = await self._open_stream(host, port), self.cut
        else:
            endpoint, first = await self._dial_first(timeout), 0
        try:
            for index in range(first, len(self.hops)):
                hop = self.hops[index]
                if hop.connector is None:  # http2: the stream already leads onward
                    continue
                if hop.node.transport == "tls" and index > first:
                    await _start_tls(endpoint, hop.members[0], hop.timeout)
                next_host, next_port = self._next_address(index, host, port)
                await hop.connector(endpoint, hop.node, next_host, next_port, hop.timeout, conn_id)
        except BaseException:
            endpoint.abort()
            raise
        return endpoint

    async def _dial_first(self, timeout: float) -> Endpoint:
        hop = self.hops[0]
        last: PyegressError | None = None
        for member in hop.candidates():
            try:
                endpoint = await direct.dial(member.node.host, member.node.port, hop.timeout)
                if member.tls is not None:
                    await _start_tls(endpoint, member, hop.timeout)
            except PyegressError as exc:
                member.failed()
                last = exc
                continue
            member.succeeded()
            return endpoint
        assert last is not None
        raise last

    async def _open_stream(self, host: str, port: int) -> Endpoint:
        hop = self.hops[self.cut]
        target = join_host_port(*self._next_address(self.cut, host, port))
        last: PyegressError | None = None
        for member in hop.candidates():
            assert member.h2 is not None
            try:
                stream = await member.h2.open_stream(target)
            except PyegressError as exc:
                last = exc
                # A refusal from a live node is an answer, not a node failure.
                if isinstance(exc, UpstreamError) and exc.close_reason != "hop_refused":
                    member.failed()
                    continue
                raise
            member.succeeded()
            if last is not None:  # an earlier member failed: this tunnel failed over
                metrics.failover()
            return stream
        assert last is not None
        raise last


async def _start_tls(endpoint: Endpoint, member: Member, timeout: float) -> None:
    if not isinstance(endpoint, TcpEndpoint) or member.tls is None:
        raise ConfigError(f"TLS to {member.node.address} over this hop is not supported")
    await endpoint.start_tls(member.tls.context, member.tls.server_hostname, timeout)
