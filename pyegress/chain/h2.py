"""The client end of the tier link: HTTP/2 connections to one h2/h2c/http2 node.

All tunnels to a node share one connection, a stream each (gost-compat 2.1); with
``conns=N`` (a pyegress extension) up to N connections are kept and each new tunnel
goes to the one carrying the fewest streams, so one TCP connection's head-of-line
blocking, one DMZ replica behind a Service, or one core at the far end is not the
limit. A further connection is opened when the peer's MAX_CONCURRENT_STREAMS is reached
or the current one is going away (GOAWAY). A stream is opened exactly as gost opens it: HEADERS with
``:method CONNECT`` and ``:authority`` = the node's address (or ``host=``), no
``:scheme``/``:path``; with ``path=`` it is gost's GET mode instead. ``ping=N`` sends an
HTTP/2 PING every N seconds and closes a link whose PING goes unanswered.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress

from pyegress.config.nodes import Node, join_host_port
from pyegress.endpoint import Endpoint, TcpEndpoint
from pyegress.errors import (
    ConfigError,
    ConnectTimeout,
    PyegressError,
    TierLinkLost,
    UpstreamError,
    hop_refusal,
    map_os_error,
)
from pyegress.h2link import H2Link, H2Stream, header
from pyegress.observe import metrics
from pyegress.tls import ClientTLS, client_context, handshake_failure

# Dials the TCP connection that carries a link: directly, or through earlier hops.
RouteDialer = Callable[[str, int, float], Awaitable[Endpoint]]

# Stream ids are 31-bit; rotate to a new connection well before they run out.
_LAST_STREAM_ID = 2**31 - 1000
MAX_CONNS = 64
_GROW_BACKOFF = 5.0  # seconds before another extra link after one failed


class H2ClientLink(H2Link):
    client_side = True

    def can_open(self) -> bool:
        if self.closed or self.goaway or not self.settings_received.done():
            return False
        if self.settings_received.exception() is not None:
            return False
        limit = self.conn.remote_settings.max_concurrent_streams
        if self.conn.open_outbound_streams >= limit:
            return False
        return self.conn.highest_outbound_stream_id is None or (
            self.conn.highest_outbound_stream_id < _LAST_STREAM_ID
        )

    def open_stream(self, headers: list[tuple[str, str]]) -> H2Stream:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=False)
        stream = H2Stream(self, stream_id)
        stream.response = asyncio.get_running_loop().create_future()
        self.streams[stream_id] = stream
        self._flush()
        return stream


class H2Node:
    """Connections to one member of an h2-family hop."""

    def __init__(self, node: Node, route: RouteDialer, log: object | None = None) -> None:
        self.node = node
        self.route = route
        self.timeout = node.duration("timeout", 5.0)
        self.ping_interval = node.duration("ping", 0.0)
        self.ping_timeout = max(self.ping_interval, 10.0) if self.ping_interval else 0.0
        self.tls: ClientTLS | None = None
        if node.transport in ("h2", "http2"):
            self.tls = client_context(node, ["h2"])
        self.authority = node.param("host") or node.address
        self.path = node.param("path") or None
        self.conns = node.integer("conns", 1)
        if not 1 <= self.conns <= MAX_CONNS:
            raise ConfigError(f"conns={self.conns}: between 1 and {MAX_CONNS} connections")
        self.links: list[H2ClientLink] = []
        self._connecting: asyncio.Future[H2ClientLink] | None = None
        # Reconnect backoff: after a failed connect, new tunnels fail fast (or go to
        # another group member) until the backoff passes; it doubles up to 30 s.
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error: PyegressError | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._grow_after = 0.0  # after a failed extra link (conns=N), grow again then
        # Called when a link of this node dies of a missed PING (marks the member failed).
        self.on_failure: Callable[[], None] | None = None

    def _request_headers(self, target: str | None) -> list[tuple[str, str]]:
        if self.node.transport == "http2":
            # Standard HTTP/2 CONNECT proxy (gost-compat 2.2): the target is :authority.
            assert target is not None
            headers = [(":method", "CONNECT"), (":authority", target)]
            if self.node.user is not None:
                from pyegress.protocols.http1 import basic_credentials

                cred = basic_credentials(self.node.user, self.node.password or "")
                headers.append(("proxy-authorization", cred))
            return headers
        if self.path:
            scheme = "https" if self.node.transport == "h2" else "http"
            return [
                (":method", "GET"),
                (":scheme", scheme),
                (":path", self.path),
                (":authority", self.authority),
            ]
        return [(":method", "CONNECT"), (":authority", self.authority)]

    async def open_stream(self, target: str | None = None) -> H2Stream:
        """A new tunnel stream, answered 200 by the node."""
        link = self._usable_link() or await self._connect_shared()
        stream = link.open_stream(self._request_headers(target))
        assert stream.response is not None
        try:
            async with asyncio.timeout(self.timeout):
                response = await stream.response
        except TimeoutError:
            stream.abort()
            raise ConnectTimeout(f"h2 node {self.node.address} did not answer the stream") from None
        except PyegressError:
            raise
        except ConnectionError as exc:
            raise UpstreamError(f"h2 node {self.node.address} reset the stream: {exc}") from None
        except BaseException:
            stream.abort()
            raise
        status = header(response, ":status")
        if status != "200":
            stream.abort()
            code = int(status) if status and status.isdigit() else 502
            raise hop_refusal(
                code,
                "",
                f"h2 node {self.node.address}",
                header(response, "retry-after"),
                pass_bad_request=self.node.transport == "http2",
            )
        return stream

    def _usable_link(self) -> H2ClientLink | None:
        """The open link with the fewest streams; below ``conns`` links, one more is
        started in the background for the tunnels after this one."""
        best: H2ClientLink | None = None
        usable = 0
        for link in self.links:
            if link.can_open():
                usable += 1
                if best is None or len(link.streams) < len(best.streams):
                    best = link
        if best is not None and usable < self.conns and self._connecting is None:
            self._grow()
        return best

    def _grow(self) -> None:
        loop = asyncio.get_running_loop()
        if self._closed or loop.time() < self._grow_after:
            return
        task = asyncio.ensure_future(self._add_link())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_link(self) -> None:
        """One more link (``conns``). A failure here backs off growth only: tunnels
        keep using the links there are, and their own dials report failures."""
        if self._connecting is not None:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[H2ClientLink] = loop.create_future()
        self._connecting = future
        try:
            link = await self._connect()
        except BaseException as exc:
            # Tunnels waiting for this connect get its failure, and retry themselves.
            failure = exc if isinstance(exc, PyegressError) else TierLinkLost(f"{exc!r}")
            future.set_exception(failure)
            future.exception()
            if not isinstance(exc, Exception):
                raise  # cancelled: the node is closing
            self._grow_after = loop.time() + _GROW_BACKOFF
            return
        finally:
            self._connecting = None
        future.set_result(link)

    async def _connect_shared(self) -> H2ClientLink:
        # Tunnels that arrive while a connection is being made wait for that one.
        while True:
            if self._connecting is None:
                loop = asyncio.get_running_loop()
                if self._last_error is not None and loop.time() < self._retry_at:
                    raise type(self._last_error)(
                        f"{self._last_error} (reconnect in {self._retry_at - loop.time():.1f}s)"
                    )
                future: asyncio.Future[H2ClientLink] = asyncio.get_running_loop().create_future()
                self._connecting = future
                try:
                    link = await self._connect()
                except PyegressError as exc:
                    self._backoff = min(30.0, max(0.5, self._backoff * 2))
                    self._retry_at = loop.time() + self._backoff
                    self._last_error = exc
                    self._connecting = None
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()
                    raise
                except BaseException as exc:
                    self._connecting = None
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()  # retrieved here; waiters re-raise it
                    raise
                self._connecting = None
                self._backoff = 0.0
                self._last_error = None
                future.set_result(link)
                return link
            link = await asyncio.shield(self._connecting)
            if link.can_open():
                return link

    async def _connect(self) -> H2ClientLink:
        loop = asyncio.get_running_loop()
        what = f"h2 link to {self.node.address}"
        link = H2ClientLink()
        try:
            async with asyncio.timeout(self.timeout):
                carrier = await self.route(self.node.host, self.node.port, self.timeout)
                assert isinstance(carrier, TcpEndpoint), "an h2 link needs a TCP carrier"
                transport = carrier.transport
                assert transport is not None
                pending = carrier.take_buffered()
                if self.tls is not None:
                    new = await loop.start_tls(
                        transport,
                        link,
                        self.tls.context,
                        server_hostname=self.tls.server_hostname,
                    )
                    assert new is not None
                    link.connection_made(new)
                else:
                    transport.set_protocol(link)
                    link.connection_made(transport)
                    if pending:
                        link.data_received(pending)
                if self.tls is not None:
                    ssl_object = (
                        link.transport.get_extra_info("ssl_object") if link.transport else None
                    )
                    chosen = ssl_object.selected_alpn_protocol() if ssl_object else None
                    if chosen not in (None, "h2"):
                        link.abort("peer chose ALPN " + str(chosen))
                        raise TierLinkLost(f"{what}: peer selected ALPN {chosen!r}, not h2")
                await link.settings_received
        except ssl.SSLError as exc:
            link.abort("TLS handshake failed")
            metrics.tls_handshake("sidecar", "client", handshake_failure(exc))
            raise map_os_error(exc, what) from None
        except TimeoutError:
            link.abort("TLS or SETTINGS not completed in time")
            raise ConnectTimeout(
                f"{what}: TLS handshake or SETTINGS not completed in time"
            ) from None
        except PyegressError:
            link.abort("connect failed")
            raise
        except (OSError, ValueError) as exc:
            link.abort("connect failed")
            raise map_os_error(exc, what) from None
        except BaseException:  # cancelled (shutdown): no half-made link stays open
            link.abort("connect cancelled")
            raise
        if self.tls is not None:
            metrics.tls_handshake("sidecar", "client", "ok")
        self.links.append(link)
        link.add_close_callback(self._forget)
        if self.ping_interval > 0:
            task = asyncio.ensure_future(self._keepalive(link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return link

    def _forget(self, link: H2Link) -> None:
        with suppress(ValueError):
            self.links.remove(link)  # type: ignore[arg-type]

    async def _keepalive(self, link: H2ClientLink) -> None:
        while not link.closed:
            await asyncio.sleep(self.ping_interval)
            if link.closed:
                return
            try:
                await link.ping(self.ping_timeout)
            except PyegressError:
                if self.on_failure is not None:
                    self.on_failure()
                return

    def state(self) -> str:
        """``up`` (a link can take streams), ``connecting`` or ``down``."""
        if self._usable_link() is not None:
            return "up"
        return "connecting" if self._connecting is not None else "down"

    async def warm(self) -> None:
        """Make sure one link is up (a no-op when one is; errors are the link's state)."""
        if self._usable_link() is not None or self._connecting is not None:
            return
        loop = asyncio.get_running_loop()
        if self._last_error is not None and loop.time() < self._retry_at:
            return
        try:
            await self._connect_shared()
        except PyegressError:
            # A failed warm-up is no reason to fail the next tunnel fast: it tries itself.
            self._last_error = None
            self._retry_at = 0.0

    def close(self) -> None:
        self._closed = True
        for link in list(self.links):
            link.close("shutdown")
        for task in list(self._tasks):
            task.cancel()

    def describe(self) -> str:
        return join_host_port(self.node.host, self.node.port)
