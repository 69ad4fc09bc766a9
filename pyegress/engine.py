"""Service lifecycle: listen, hand each connection to its listener, drain on shutdown.

The engine composes stages and parses nothing itself. A :class:`Service` is one ``-L``
node: a listening socket, the listener that speaks its protocol, and the chain it dials
through. Listeners call back into the service for the three things every tunnel does:
open its record (:meth:`Service.tunnel`), dial (:meth:`Service.dial`) and relay
(:meth:`Service.relay`).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, NoReturn

from pyegress import __version__, splice
from pyegress.chain import Chain, direct
from pyegress.config.nodes import Node
from pyegress.endpoint import Endpoint, TcpEndpoint
from pyegress.errors import ConfigError, Denied, PyegressError, Unavailable
from pyegress.h2link import H2Link
from pyegress.limits import LimitExceeded, Limits
from pyegress.observe import log as logmod
from pyegress.observe import metrics
from pyegress.observe.admin import parse_admin_address, start_admin
from pyegress.observe.audit import Output, cap
from pyegress.observe.log import Logger
from pyegress.policy.enforce import judge, policy_fallback
from pyegress.policy.inspect import TlsSettings, inspect
from pyegress.policy.loader import from_gost_bypass
from pyegress.policy.resolve import Address
from pyegress.policy.rules import Policy, Request
from pyegress.protocols.addresses import join_host_port, split_host_port
from pyegress.relay import Relay
from pyegress.tls import handshake_failure, server_context
from pyegress.tunnel import DETAIL_CAP, HOST_CAP, Tunnel, decision_fields

Handler = Callable[[Endpoint, "Service"], Awaitable[None]]

# When the client's request must be complete: set once when the connection is accepted
# (in the task serving it), so waiting for the first byte and reading the request share
# one handshake_timeout.
HANDSHAKE_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("handshake_deadline")


def handshake_deadline(timeout: float) -> float:
    """The loop time by which the client's request must be complete."""
    found = HANDSHAKE_DEADLINE.get(None)
    return found if found is not None else asyncio.get_running_loop().time() + timeout


DEFAULT_HANDSHAKE_TIMEOUT = 15.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_DRAIN_TIMEOUT = 30.0


def _handler_for(node: Node) -> Handler:
    # Imported here: listeners import this module for the Service type.
    from pyegress.listeners import auto, forward, http, redirect, socks4, socks5

    handlers: dict[str, Handler] = {
        "auto": auto.serve,
        "http": http.serve,
        "socks5": socks5.serve,
        "socks4": socks4.serve,
        "socks4a": socks4.serve,
        "tcp": forward.serve,
        "redirect": redirect.serve,
        "dns": redirect.not_a_stream,  # the DNS listener answers by itself
    }
    if (node.kind == "dns") != (node.transport == "dns") or (
        node.kind == "redirect" and node.transport not in ("redirect", "tcp")
    ):
        raise ConfigError(f"-L {node.redacted()}: {node.kind!r} cannot run over {node.transport!r}")
    if node.transport not in _LISTENERS:
        raise ConfigError(f"-L {node.redacted()}: listener {node.transport!r} is not supported yet")
    if node.kind == "http2":
        if node.transport != "http2":
            raise ConfigError(f"-L {node.redacted()}: the http2 proxy needs the http2 listener")
        return http.serve  # http2 streams are served by listeners/h2.py
    handler = handlers.get(node.kind)
    if handler is None:
        raise ConfigError(f"-L {node.redacted()}: handler {node.kind!r} is not supported yet")
    return handler


_LISTENERS = {"tcp", "tls", "h2", "h2c", "http2", "redirect", "dns"}


class TunnelScope:
    """``with service.tunnel(client, kind) as t``: opens the tunnel's record; leaving
    the block by any path (an error, a cancellation) notes why and writes the records.
    A plain context manager: nothing here waits, so no coroutine is made per tunnel."""

    __slots__ = ("_tunnel", "service")

    def __init__(self, service: Service, client: Endpoint, kind: str) -> None:
        self.service = service
        engine = service.engine
        t = self._tunnel = Tunnel(
            service=service.name,
            kind=kind,
            client=client.peer_address,
            identity=client.identity,
            tier=engine.tier,
            instance=engine.instance,
            worker=engine.worker,
        )
        state = t.state = engine.state  # the tunnel keeps it across a reload
        if state.policy is not None:
            t.policy_version = state.policy.version

    def __enter__(self) -> Tunnel:
        t = self._tunnel
        self.service.engine.tunnels.add(t)
        metrics.tunnel_opened(t.tier, t.mode)
        return t

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any
    ) -> None:
        t = self._tunnel
        if exc is not None:
            if isinstance(exc, PyegressError):
                t.reason = t.reason or exc.close_reason
                t.error = str(exc)
            elif isinstance(exc, asyncio.CancelledError):
                t.reason = t.reason or "drain"
            elif isinstance(exc, Exception):
                t.reason = "internal_error"
                t.error = f"{type(exc).__name__}: {exc}"
        self.service._closed(t)


class Service:
    """One ``-L`` node at work."""

    def __init__(self, name: str, node: Node, chain: Chain, engine: Engine) -> None:
        self.name = name
        self.node = node
        self.chain = chain
        self.engine = engine
        self.handler = _handler_for(node)
        self.log = engine.log.bind(service=name)
        self.handshake_timeout = node.duration("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT)
        self.idle_timeout = node.duration("idle_timeout", DEFAULT_IDLE_TIMEOUT)
        self.dial_timeout = node.duration("timeout", 10.0)
        self.retries = max(1, node.integer("retries", 1))
        self.dns_timeout = node.duration("dns_timeout", 5.0)
        self.max_lifetime = node.duration("max_lifetime", 0.0)
        self._tls_server: Any = None
        self.proxy_agent = node.param("proxy_agent") or f"pyegress/{__version__}"
        self.realm = node.param("realm") or "pyegress"
        self.user = node.user
        self.password = node.password
        self.server: asyncio.Server | None = None
        self.max_streams = max(1, node.integer("max_streams", 1000))
        # The zero-copy relay where both legs are plain TCP (splice.py).
        self.splice = node.flag("splice", True) and splice.enabled()
        # gost's service bypass (gost-compat 3.3): matching targets are rejected, or with
        # "~" only matching targets pass. Judged on the target as named, never resolved.
        bypass = node.param("bypass")
        self.bypass = from_gost_bypass(bypass, service_level=True) if bypass else None
        self.h2_path = node.param("path") or None
        if self.h2_path is not None and not self.h2_path.startswith("/"):
            self.h2_path = "/" + self.h2_path
        self._forward_targets = [split_host_port(t) for t in node.forward_targets]
        self._forward_cursor = 0

    def next_forward_target(self) -> tuple[str, int]:
        """The next ``-L .../host:port`` target, round robin."""
        target = self._forward_targets[self._forward_cursor % len(self._forward_targets)]
        self._forward_cursor += 1
        return target

    @property
    def requires_auth(self) -> bool:
        return self.user is not None

    def check_credentials(self, user: str, password: str) -> bool:
        import hmac

        if self.user is None:
            return True
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_pass = hmac.compare_digest(password.encode(), (self.password or "").encode())
        return ok_user and ok_pass

    def new_tls_context(self) -> ssl.SSLContext | None:
        """This service's server TLS context, freshly read from its files."""
        transport = self.node.transport
        if transport in ("tls", "h2", "http2"):
            alpn = None if transport == "tls" else ["h2"]
            return server_context(self.node, alpn, self.log.warning)
        return None

    def set_tls_context(self, ctx: ssl.SSLContext | None) -> None:
        """New handshakes use ``ctx``; open connections keep theirs."""
        if ctx is not None and self._tls_server is not None:
            self._tls_server.context = ctx

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.node.host or None
        factory: Callable[[], asyncio.BaseProtocol]
        if self.node.transport in ("h2", "h2c", "http2"):
            from pyegress.listeners.h2 import H2ServerLink

            factory = lambda: H2ServerLink(self)  # noqa: E731
        else:
            factory = lambda: TcpEndpoint(self._accepted)  # noqa: E731
        if self.node.kind in ("redirect", "dns"):
            from pyegress.listeners.redirect import start_transparent

            self.server = await start_transparent(self, factory)
            return
        ctx = self.new_tls_context()
        try:
            if ctx is None:
                self.server = await loop.create_server(
                    factory,
                    host,
                    self.node.port,
                    reuse_address=True,
                    reuse_port=self.engine.reuse_port or None,
                    backlog=1024,
                )
            else:
                from pyegress.listeners.tls import TlsServer

                server = TlsServer(factory, ctx, self.handshake_timeout, self.log)
                server.on_result = self._handshake_result
                await server.start(host, self.node.port, reuse_port=self.engine.reuse_port)
                self._tls_server = server
                self.server = server  # type: ignore[assignment]
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.node.address}: {exc.strerror or exc}"
            ) from None

    def _handshake_result(self, peer: Any, exc: BaseException | None, quiet: bool) -> None:
        """Count every TLS handshake; a refused client certificate is also a tunnel
        refused for ``client_auth``, with its two records."""
        tier = self.engine.tier
        if exc is None:
            metrics.tls_handshake(tier, "peer", "ok")
            return
        if quiet:
            return
        result = handshake_failure(exc)
        metrics.tls_handshake(tier, "peer", result)
        address = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        t = Tunnel(
            service=self.name,
            kind=self.node.kind if self.node.transport == "tls" else "h2",
            client=address,
            tier=tier,
            instance=self.engine.instance,
            worker=self.engine.worker,
        )
        state = self.engine.state
        version = state.policy.version if state.policy is not None else None
        t.policy_version = version
        t.reason, t.error = "auth_failed", f"TLS handshake failed ({result}): {exc}"
        t.decision = decision_fields("deny", "client_auth", None, version, t.error)
        metrics.tunnel_opened(tier, t.mode)
        self._log_decision(t)
        self.engine.output.line("close", t.close_line())
        metrics.tunnel_closed(tier, t.mode, "auth_failed", 0.0)

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        if self.server is None:
            return []
        out = []
        for sock in self.server.sockets:
            name = sock.getsockname()
            out.append((str(name[0]), int(name[1])))
        return out

    def _accepted(self, endpoint: TcpEndpoint) -> None:
        self.engine.spawn(self.serve(endpoint))

    async def serve(self, endpoint: Endpoint) -> None:
        """Run this service's handler on one client connection or stream."""
        try:
            # A redirected connection may be server-speaks-first: it sniffs by itself.
            waits = self.node.kind not in ("tcp", "redirect")
            if waits and not await self._first_bytes(endpoint):
                return
            await self.handler(endpoint, self)
        except PyegressError as exc:
            # A listener lets a project error escape only after answering the client.
            self.log.debug("connection_error", error=str(exc))
        except Exception as exc:  # a bug must not take the process down
            self.log.error("handler_bug", error=f"{type(exc).__name__}: {exc}")
            endpoint.abort()
        finally:
            endpoint.close()

    async def _first_bytes(self, endpoint: Endpoint) -> bool:
        """Wait for the client's first bytes. A connection closed before saying anything
        (a port probe) is no tunnel; one silent past the handshake timeout is recorded."""
        loop = asyncio.get_running_loop()
        HANDSHAKE_DEADLINE.set(loop.time() + self.handshake_timeout)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                first = await endpoint.read()
        except TimeoutError:
            with self.tunnel(endpoint, self.node.kind) as t:
                t.reason = "handshake_timeout"
                t.error = "no bytes from the client in time"
            return False
        endpoint.unread(first)
        return bool(first)

    # -- what listeners call ----------------------------------------------------------

    def tunnel(self, client: Endpoint, kind: str) -> TunnelScope:
        """A tunnel whose decision and close records are each written exactly once,
        however the ``with`` block ends."""
        return TunnelScope(self, client, kind)

    def _closed(self, t: Tunnel) -> None:
        """The end of a :class:`TunnelScope`: release, record, count."""
        engine = self.engine
        engine.tunnels.discard(t)
        for slot in t.slots:
            slot.release()
        t.slots.clear()
        if not t.decision_logged:
            if t.decision is None:
                # Ended before any verdict (malformed, timed out, auth): still one
                # decision record, a refusal with the reason it ended.
                t.decision = policy_fallback(t)
            self._log_decision(t)
        engine.output.line("close", t.close_line())
        if t.reason in _EARLY_TIMEOUTS:
            metrics.timeout(t.tier, _EARLY_TIMEOUTS[t.reason])
        metrics.tunnel_closed(t.tier, t.mode, t.close_reason, time.monotonic() - t.started)
        metrics.add_bytes(t.tier, *t.unmetered())

    def _log_decision(self, t: Tunnel) -> None:
        t.decision_logged = True
        decision = t.decision or {}
        self.engine.output.line("decision", t.decision_line())
        metrics.decision(
            t.tier,
            t.mode,
            str(decision.get("action", "")),
            str(decision.get("reason", "")),
            decision.get("rule_id") or "",
            self.engine.identity_class(t.identity),
        )

    def refuse(self, t: Tunnel, reason: str, exc: PyegressError) -> NoReturn:
        """Refuse the tunnel before anything is dialed: write its decision, raise."""
        version = t.policy_version
        t.decision = decision_fields("deny", reason, policy_version=version, detail=str(exc))
        self._log_decision(t)
        raise exc

    async def dial(self, t: Tunnel, host: str, port: int) -> Endpoint:
        t.host, t.port = host, port
        if t.name_source is None:
            t.name_source = _NAME_SOURCES.get(t.mode, "connect")
        engine = self.engine
        if engine.stopping:
            self.refuse(t, "draining", Unavailable("draining: not accepting new tunnels"))
        if self.bypass is not None:
            verdict = self.bypass.decide(Request(identity=None, host=host, port=port))
            if verdict.action == "deny":
                exc = Denied(f"{host}:{port} rejected by bypass= ({verdict.reason})")
                self.refuse(t, "bypass", exc)
        state: State = t.state
        policy = state.policy
        via_chain = True
        if state.limits is not None:
            try:
                t.slots.extend(state.limits.acquire(t.identity))
            except LimitExceeded as exc:
                metrics.limit_rejected(t.tier, exc.limit)
                self.refuse(t, "limit_exceeded", exc)
        if policy is not None:
            record: dict[str, Any] = {}
            try:
                route = await judge(
                    policy,
                    record,
                    t.identity,
                    host,
                    port,
                    dns_timeout=self.dns_timeout,
                    self_endpoints=engine.self_endpoints(),
                    have_proxy=bool(self.chain.hops),
                    # A synthetic address (the sidecar's DNS) says nothing to check.
                    orig_dst=t.orig_dst if t.name_source != "dns" else None,
                )
            finally:
                t.decision = record.get("decision")
                t.dns = record.get("dns")
                t.upstream = record.get("upstream")
                if t.action == "deny":
                    self._log_decision(t)
            host, port, via_chain = route.host, route.port, route.via_proxy
            t.dialed = join_host_port(host, port)
            if state.tls.sni == "off":
                self._log_decision(t)
        else:
            t.decision = decision_fields("allow", "no_policy")
            self._log_decision(t)
        via = "proxy" if via_chain and self.chain.hops else "direct"
        last: PyegressError | None = None
        for _ in range(self.retries):
            started = time.monotonic()
            try:
                if via_chain:
                    upstream = await self.chain.dial(host, port, self.dial_timeout, t.conn_id)
                else:
                    upstream = await direct.dial(host, port, self.dial_timeout)
            except PyegressError as exc:
                metrics.upstream_error(via, _CONNECT_ERRORS.get(exc.close_reason, "proxy_error"))
                if exc.close_reason == "connect_timeout":
                    metrics.timeout(t.tier, "connect")
                last = exc
            else:
                metrics.upstream_connect(via, time.monotonic() - started)
                return upstream
        assert last is not None
        raise last

    async def _inspect(self, t: Tunnel, client: Endpoint, upstream: Endpoint) -> bool:
        """The DMZ's look at the tunnel's first bytes (SNI, Host); False when refused."""
        state: State = t.state
        policy = state.policy
        assert policy is not None
        rule_id = (t.decision or {}).get("rule_id")
        identity = t.identity

        def name_allowed(name: str) -> bool:
            verdict = policy.decide(Request(identity=identity, host=name, port=t.port))
            return verdict.action != "deny"

        seen = await inspect(
            client,
            t.host,
            t.port,
            state.tls,
            tcp_allowed=policy.tcp_allowed(rule_id),
            name_allowed=name_allowed,
            handshake_timeout=self.handshake_timeout,
        )
        if seen.kind == "tls":
            t.tls = {
                "sni": cap(seen.sni, HOST_CAP),
                "sni_match": seen.sni_match,
                "ech": seen.ech,
                "alpn": [cap(a, 64) for a in seen.alpn[:8]],
            }
        elif seen.kind == "http":
            t.http = {"host": cap(seen.host_header, HOST_CAP)}
        if seen.reason is None:
            return True
        decision = dict(t.decision or {})
        decision["detail"] = cap(seen.detail, DETAIL_CAP)
        if seen.would_deny:
            decision.update(action="report", would_deny=True, reason=seen.reason)
            t.decision = decision
            return True
        decision.update(action="deny", would_deny=False, reason=seen.reason)
        t.decision = decision
        t.reason = seen.reason if seen.reason == "sni_mismatch" else "denied"
        t.error = seen.detail
        upstream.abort()
        client.abort()
        return False

    def _meter(self, t: Tunnel, relay: Relay) -> None:
        """Byte metering of a tunnel without an idle timeout (no idle check to ride)."""
        if t.relay is not relay or relay.reason is not None:
            return
        t.meter()
        asyncio.get_running_loop().call_later(_METER_PERIOD, self._meter, t, relay)

    async def relay(self, t: Tunnel, client: Endpoint, upstream: Endpoint) -> None:
        kind = splice.SpliceRelay if self.splice else Relay
        relay = kind(client, upstream, self.idle_timeout)  # byte counts start here
        t.relay = relay
        lifetime: asyncio.TimerHandle | None = None
        meter: asyncio.TimerHandle | None = None
        try:
            state: State = t.state
            if not t.decision_logged:
                inspecting = state.policy is not None and state.tls.sni != "off"
                if inspecting and not await self._inspect(t, client, upstream):
                    return
                self._log_decision(t)
            max_lifetime = state.max_lifetime or self.max_lifetime
            loop = asyncio.get_running_loop()
            if max_lifetime > 0:
                lifetime = loop.call_later(max_lifetime, relay.stop, "max_lifetime")
            if relay.idle_timeout > 0:
                relay.on_tick = t.meter  # rides on the idle check's timer
            else:
                meter = loop.call_later(_METER_PERIOD, self._meter, t, relay)
            t.reason = await relay.run()
            if t.reason in _TIMEOUT_KINDS:
                metrics.timeout(t.tier, _TIMEOUT_KINDS[t.reason])
        finally:
            for handle in (lifetime, meter):
                if handle is not None:
                    handle.cancel()
            t.bytes_up += relay.bytes_up
            t.bytes_down += relay.bytes_down
            if relay.reason is not None:
                t.relay_kind = relay.kind
            t.relay = None


_METER_PERIOD = 5.0  # long tunnels add to the byte counters while they stream


# Close reasons of a failed dial as pyegress_upstream_connect_errors_total labels.
_CONNECT_ERRORS = {
    "connect_timeout": "timeout",
    "dns_timeout": "timeout",
    "connect_refused": "refused",
    "host_unreachable": "unreachable",
    "network_unreachable": "unreachable",
    "resolve_failed": "unreachable",
    "tier_link_lost": "reset",
    "hop_refused": "proxy_denied",
    "auth_failed": "proxy_407",
    "tls_failed": "tls",
}

_EARLY_TIMEOUTS = {"handshake_timeout": "handshake", "dns_timeout": "dns"}
_TIMEOUT_KINDS = {"idle_timeout": "idle", "max_lifetime": "max_lifetime", "drain": "drain"}
_NAME_SOURCES = {"socks5": "socks", "socks4": "socks", "sni": "sni", "transparent": "orig_dst"}


@dataclass(frozen=True, slots=True)
class State:
    """What a tunnel is judged by; replaced as a whole on reload, so a tunnel keeps the
    state it started with."""

    policy: Policy | None
    tls: TlsSettings
    limits: Limits | None
    max_lifetime: float


class Engine:
    def __init__(
        self,
        listen: Sequence[Node],
        forward: Sequence[Node],
        log: Logger,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        policy: Policy | None = None,
        *,
        policy_path: str | None = None,
        metrics_address: str | None = None,
        output: Output | None = None,
        worker: int | None = None,
    ) -> None:
        if not listen:
            raise ConfigError("nothing to serve: give at least one -L")
        self.log = log
        self.output = output or logmod.output()
        self.drain_timeout = drain_timeout
        self.chain = Chain(forward)
        self.services = [
            Service(f"service-{i}", node, self.chain, self) for i, node in enumerate(listen)
        ]
        self.tunnels: set[Tunnel] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.links: set[H2Link] = set()
        self.stopping = False
        self.started = False
        self.policy_path = policy_path
        self.metrics_address = metrics_address
        self.admin: asyncio.AbstractServer | None = None
        self.instance = socket.gethostname()
        # One of several --workers processes: listeners share their ports (SO_REUSEPORT),
        # records name the worker, and on_change tells the supervisor of every readiness
        # or policy change ("ready", "reload", "draining").
        self.worker = worker
        self.reuse_port = worker is not None
        self.on_change: Callable[[str], None] | None = None
        self.tier = _tier_of(listen, forward, policy)
        self._limits = Limits(policy.limits) if policy is not None else None
        self.state = self._state_for(policy)
        self._stop: asyncio.Event | None = None
        self._self_endpoints: list[tuple[Address, int]] | None = None
        self._identity_classes: dict[str, str] = {}

    @property
    def policy(self) -> Policy | None:
        return self.state.policy

    def _state_for(self, policy: Policy | None) -> State:
        if policy is None:
            return State(None, TlsSettings(sni="off"), None, 0.0)
        limits = None
        if not policy.limits.empty:
            if self._limits is None:
                self._limits = Limits(policy.limits)
            self._limits.spec = policy.limits
            limits = self._limits
        return State(policy, policy.tls, limits, policy.limits.max_lifetime or 0.0)

    def identity_class(self, identity: str | None) -> str:
        """A bounded metric label for an identity: the first policy group it is in, else
        ``other`` (raw identities never become label values)."""
        if identity is None:
            return "none"
        policy = self.state.policy
        if policy is None:
            return "other"
        found = self._identity_classes.get(identity)
        if found is None:
            found = policy.group_of(identity) or "other"
            if len(self._identity_classes) < 10_000:
                self._identity_classes[identity] = found
        return found

    def readiness(self) -> tuple[bool, str]:
        if not self.started:
            return False, "starting"
        if self.stopping:
            return False, "draining"
        if self.tier == "sidecar":
            up, _connecting, _down = self.chain.link_states()
            if up == 0:
                return False, "no tier link up"
        return True, "ready"

    def self_endpoints(self) -> list[tuple[Address, int]]:
        """Our own listening (address, port) pairs: a tunnel may never dial them. A
        wildcard listener stands for every address of this host's interfaces."""
        if self._self_endpoints is None:
            out: list[tuple[Address, int]] = []
            for service in self.services:
                for host, port in service.bound_addresses:
                    address = ipaddress.ip_address(host.split("%", 1)[0])
                    if address.is_unspecified:
                        out += [(local, port) for local in _interface_addresses()]
                    else:
                        out.append((address, port))
            self._self_endpoints = out
        return self._self_endpoints

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self) -> None:
        self._stop = asyncio.Event()
        started: list[Service] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
        except BaseException:
            for service in started:
                if service.server is not None:
                    service.server.close()
            raise
        for hop in self.chain.unverified():
            self.log.warning(
                "tls_unverified",
                node=hop,
                detail="the server certificate is not verified: give ca= or secure=true",
            )
        for service in self.services:
            self.log.info(
                "listening",
                service=service.name,
                node=service.node.redacted(),
                addresses=[f"{h}:{p}" for h, p in service.bound_addresses],
                chain=self.chain.describe(),
            )
        if self.metrics_address is not None:
            host, port = parse_admin_address(self.metrics_address)
            try:
                self.admin = await start_admin(host, port, self.readiness)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on -metrics {self.metrics_address}: {exc.strerror or exc}"
                ) from None
            self.log.info("admin_listening", address=self.metrics_address)
        metrics.init(self.tier)
        if self.state.policy is not None:
            metrics.set_policy(self.tier, self.state.policy.version, len(self.state.policy.rules))
        self._export_cert_expiry()
        self.started = True
        metrics.set_ready(self.tier, True)
        if self.tier == "sidecar":
            self.spawn(self._watch_links())
        if metrics.MULTIPROCESS:  # a worker: its files are all the supervisor reads
            self.spawn(self._publish_metrics())
        self._changed("ready")

    def _changed(self, what: str) -> None:
        if self.on_change is not None:
            self.on_change(what)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Errors the event loop catches (a failed TLS handshake, mostly) as one log line."""
        exc = context.get("exception")
        transport = context.get("transport")
        peer = transport.get_extra_info("peername") if transport is not None else None
        fields: dict[str, Any] = {"detail": context.get("message", "")}
        if peer:
            fields["peer"] = f"{peer[0]}:{peer[1]}"
        if exc is not None:
            fields["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
            self.log.warning("tls_handshake_failed", **fields)
        else:
            self.log.error("loop_error", **fields)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and return."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        assert self._stop is not None
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        await self.shutdown()

    def reload(self) -> None:
        """SIGHUP: re-read the policy and the TLS files; keep the old ones if anything
        is invalid. Open tunnels keep the state they started with."""
        if self.stopping:
            return
        old = self.state
        policy = old.policy
        try:
            if self.policy_path is not None:
                from pyegress.policy.loader import load_policy

                policy = load_policy(self.policy_path)
            contexts = [service.new_tls_context() for service in self.services]
            client_contexts = self.chain.new_tls_contexts()
        except (ConfigError, OSError, ssl.SSLError, ValueError) as exc:
            metrics.config_reload(self.tier, False)
            self.log.error(
                "config_reload",
                result="error",
                error=str(exc).splitlines()[0][:512],
                policy_version=old.policy.version if old.policy is not None else None,
            )
            self._changed("reload")
            return
        for service, ctx in zip(self.services, contexts, strict=True):
            service.set_tls_context(ctx)
        self.chain.set_tls_contexts(client_contexts)
        self.state = self._state_for(policy)
        self._identity_classes.clear()
        if policy is not None:
            metrics.set_policy(self.tier, policy.version, len(policy.rules))
        self._export_cert_expiry()
        metrics.config_reload(self.tier, True)
        self.log.info(
            "config_reload",
            result="success",
            policy_version=policy.version if policy is not None else None,
            previous_version=old.policy.version if old.policy is not None else None,
        )
        self._changed("reload")

    def _export_cert_expiry(self) -> None:
        for kind, path in self._cert_files():
            try:
                metrics.cert_expiry(self.tier, kind, path)
            except (ConfigError, OSError, ValueError) as exc:
                self.log.warning("cert_unreadable", file=path, error=str(exc)[:200])

    def _cert_files(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for node in (*(s.node for s in self.services), *(h.node for h in self.chain.hops)):
            role = "server" if node.role == "listen" else "client"
            cert, ca = node.param("cert"), node.param("ca")
            if cert:
                out.append((role, cert))
            if ca:
                out.append(("ca", ca))
        return out

    async def _watch_links(self) -> None:
        """A sidecar keeps one tier link warm, so readiness means a DMZ is reachable."""
        while not self.stopping:
            await self.chain.warm()
            up, connecting, down = self.chain.link_states()
            metrics.set_tier_links(up, connecting, down)
            metrics.set_tier_streams(self.chain.streams_open())
            await asyncio.sleep(1.0)

    async def _publish_metrics(self) -> None:
        while not self.stopping:
            metrics.publish()
            await asyncio.sleep(metrics.PUBLISH_PERIOD)

    async def shutdown(self) -> None:
        """Stop accepting, let tunnels finish until the drain deadline, then end them."""
        self.stopping = True
        metrics.set_ready(self.tier, False)
        metrics.set_draining(self.tier, True)
        self._changed("draining")
        for service in self.services:
            if service.server is not None:
                service.server.close()
        # Tell sidecars on our h2 links to open new streams elsewhere.
        for link in list(self.links):
            link.send_goaway()
        self.log.info("draining", tunnels=len(self.tunnels), deadline_s=self.drain_timeout)
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=self.drain_timeout)
            if pending:
                for t in list(self.tunnels):
                    if t.relay is not None:
                        t.relay.stop("drain")
                _, pending = await asyncio.wait(pending, timeout=1.0)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5.0)
        for service in self.services:
            if service.server is not None:
                with suppress(Exception):
                    await asyncio.wait_for(service.server.wait_closed(), 1.0)
        for link in list(self.links):
            link.close("shutdown")
        self.chain.close()
        if self.admin is not None:
            self.admin.close()
        metrics.publish()
        self.log.info("stopped")


def _tier_of(listen: Sequence[Node], forward: Sequence[Node], policy: Policy | None) -> str:
    if policy is not None or any(n.transport in _H2_FAMILY for n in listen):
        return "dmz"
    if any(n.transport in _H2_FAMILY for n in forward):
        return "sidecar"
    return "proxy"


_H2_FAMILY = frozenset({"h2", "h2c", "http2"})


def _interface_addresses() -> list[Address]:
    """Every address configured on this host's interfaces (pyroute2; loopback if that
    fails, e.g. without netlink access)."""
    found: list[Address] = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ip:
            for entry in ip.get_addr():
                value = entry.get_attr("IFA_ADDRESS")
                if value:
                    address = ipaddress.ip_address(str(value).split("%", 1)[0])
                    if address not in found:
                        found.append(address)
    except Exception:  # netlink unavailable: loopback is still covered
        pass
    return found
