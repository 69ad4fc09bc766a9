"""Service lifecycle: listen, hand each connection to its listener, drain on shutdown.

The engine composes stages and parses nothing itself. A :class:`Service` is one ``-L``
node: a listening socket, the listener that speaks its protocol, and the chain it dials
through. Listeners call back into the service for the three things every tunnel does:
open its record (:meth:`Service.tunnel`), dial (:meth:`Service.dial`) and relay
(:meth:`Service.relay`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from pyegress import __version__
from pyegress.chain import Chain, direct
from pyegress.config.nodes import Node
from pyegress.endpoint import Endpoint, TcpEndpoint
from pyegress.errors import ConfigError, Denied, PyegressError
from pyegress.h2link import H2Link
from pyegress.observe.log import Logger
from pyegress.policy.enforce import judge, policy_fallback
from pyegress.policy.loader import from_gost_bypass
from pyegress.policy.resolve import Address
from pyegress.policy.rules import Policy, Request
from pyegress.protocols.addresses import split_host_port
from pyegress.relay import Relay
from pyegress.tls import server_context
from pyegress.tunnel import Tunnel

Handler = Callable[[Endpoint, "Service"], Awaitable[None]]

DEFAULT_HANDSHAKE_TIMEOUT = 15.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_DRAIN_TIMEOUT = 30.0


def _handler_for(node: Node) -> Handler:
    # Imported here: listeners import this module for the Service type.
    from pyegress.listeners import auto, forward, http, socks4, socks5

    handlers: dict[str, Handler] = {
        "auto": auto.serve,
        "http": http.serve,
        "socks5": socks5.serve,
        "socks4": socks4.serve,
        "socks4a": socks4.serve,
        "tcp": forward.serve,
    }
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


_LISTENERS = {"tcp", "tls", "h2", "h2c", "http2"}


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
        self.proxy_agent = node.param("proxy_agent") or f"pyegress/{__version__}"
        self.realm = node.param("realm") or "pyegress"
        self.user = node.user
        self.password = node.password
        self.server: asyncio.Server | None = None
        self.max_streams = max(1, node.integer("max_streams", 1000))
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

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.node.host or None
        transport = self.node.transport
        warn = self.log.warning
        factory: Callable[[], asyncio.BaseProtocol]
        if transport in ("h2", "h2c", "http2"):
            from pyegress.listeners.h2 import H2ServerLink

            factory = lambda: H2ServerLink(self)  # noqa: E731
            ctx = None if transport == "h2c" else server_context(self.node, ["h2"], warn)
        else:
            factory = lambda: TcpEndpoint(self._accepted)  # noqa: E731
            ctx = server_context(self.node, None, warn) if transport == "tls" else None
        try:
            if ctx is None:
                self.server = await loop.create_server(
                    factory, host, self.node.port, reuse_address=True, backlog=1024
                )
            else:
                from pyegress.listeners.tls import TlsServer

                server = TlsServer(factory, ctx, self.handshake_timeout, self.log)
                await server.start(host, self.node.port)
                self.server = server  # type: ignore[assignment]
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.node.address}: {exc.strerror or exc}"
            ) from None

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
            if self.node.kind != "tcp" and not await self._first_bytes(endpoint):
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
        try:
            async with asyncio.timeout(self.handshake_timeout):
                first = await endpoint.read()
        except TimeoutError:
            async with self.tunnel(endpoint, self.node.kind) as t:
                t.reason = "handshake_timeout"
                t.error = "no bytes from the client in time"
            return False
        endpoint.unread(first)
        return bool(first)

    # -- what listeners call ----------------------------------------------------------

    @asynccontextmanager
    async def tunnel(self, client: Endpoint, kind: str) -> AsyncIterator[Tunnel]:
        """A tunnel record that is written exactly once, however the block ends."""
        t = Tunnel(
            service=self.name, kind=kind, client=client.peer_address, identity=client.identity
        )
        policy = self.engine.policy
        if policy is not None:
            t.policy_version = policy.version
        self.engine.tunnels.add(t)
        try:
            yield t
        except PyegressError as exc:
            t.reason = t.reason or exc.close_reason
            t.error = str(exc)
            raise
        except asyncio.CancelledError:
            t.reason = t.reason or "drain"
            raise
        except Exception as exc:
            t.reason = "internal_error"
            t.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.engine.tunnels.discard(t)
            if policy is not None and not t.decision_logged:
                # Ended before any verdict (malformed, timed out, auth): still one
                # decision record, a refusal with the reason it ended.
                self._log_decision(t, policy_fallback(t))
            self.log.info("tunnel_closed", **t.close_record())

    def _log_decision(self, t: Tunnel, fields: dict[str, Any]) -> None:
        t.decision_logged = True
        decision = fields.get("decision", {})
        t.decision = str(decision.get("action", ""))
        t.decision_reason = str(decision.get("reason", ""))
        self.log.info("decision", **t.decision_record(fields))

    async def dial(self, t: Tunnel, host: str, port: int) -> Endpoint:
        t.host, t.port = host, port
        if self.bypass is not None:
            verdict = self.bypass.decide(Request(identity=None, host=host, port=port))
            if verdict.action == "deny":
                raise Denied(f"{host}:{port} rejected by bypass= ({verdict.reason})")
        policy = self.engine.policy
        via_chain = True
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
                    self_endpoints=self.engine.self_endpoints(),
                    have_proxy=bool(self.chain.hops),
                )
            finally:
                if "decision" in record:
                    self._log_decision(t, record)
            host, port, via_chain = route.host, route.port, route.via_proxy
            t.dialed = f"{host}:{port}"
        last: PyegressError | None = None
        for _ in range(self.retries):
            try:
                if via_chain:
                    return await self.chain.dial(host, port, self.dial_timeout, t.conn_id)
                return await direct.dial(host, port, self.dial_timeout)
            except PyegressError as exc:
                last = exc
        assert last is not None
        raise last

    async def relay(self, t: Tunnel, client: Endpoint, upstream: Endpoint) -> None:
        relay = Relay(client, upstream, self.idle_timeout)
        t.relay = relay
        try:
            t.reason = await relay.run()
        finally:
            t.bytes_up += relay.bytes_up
            t.bytes_down += relay.bytes_down
            t.relay = None


class Engine:
    def __init__(
        self,
        listen: Sequence[Node],
        forward: Sequence[Node],
        log: Logger,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        policy: Policy | None = None,
    ) -> None:
        if not listen:
            raise ConfigError("nothing to serve: give at least one -L")
        self.log = log
        self.drain_timeout = drain_timeout
        self.chain = Chain(forward)
        self.services = [
            Service(f"service-{i}", node, self.chain, self) for i, node in enumerate(listen)
        ]
        self.tunnels: set[Tunnel] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.links: set[H2Link] = set()
        self.stopping = False
        self.policy = policy
        self._stop: asyncio.Event | None = None
        self._self_endpoints: list[tuple[Address, int]] | None = None

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
        assert self._stop is not None
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let tunnels finish until the drain deadline, then end them."""
        self.stopping = True
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
        self.log.info("stopped")


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
