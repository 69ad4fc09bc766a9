"""The server end of the tier link: ``-L h2://``, ``h2c://``, ``http2://`` and the combined
forms (``http+h2``, ``socks5+h2``).

Tunnel mode (gost's ``h2``/``h2c``, gost-compat 2.1): every CONNECT stream is answered
200 at once, whatever its ``:authority``; the stream then carries an inner protocol read
by the node's handler (auto for a bare ``h2``: HTTP CONNECT or absolute-URI, SOCKS5,
SOCKS4, or a raw TLS ClientHello). With ``path=`` the tunnel is opened by ``GET`` on
exactly that path instead (400 for another path; 405 for other methods).

Proxy mode (``http2://``, gost-compat 2.2): the target is the stream's ``:authority``,
the answer (200, 403, 407, 503) comes after the dial.

The TLS session may have selected ALPN ``h2`` or no ALPN at all (gost v2 clients never
offer it); h2 itself checks that the session starts with the HTTP/2 preface.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pyegress.errors import AuthRequired, PyegressError
from pyegress.h2link import H2Link, H2Stream, header
from pyegress.protocols.http1 import parse_basic_credentials, parse_connect_target
from pyegress.tls import transport_identity

if TYPE_CHECKING:
    from pyegress.engine import Service


class H2ServerLink(H2Link):
    client_side = False

    def __init__(self, service: Service) -> None:
        super().__init__(service.max_streams)
        self.service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.identity = transport_identity(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            chosen = ssl_object.selected_alpn_protocol()
            if chosen not in (None, "h2"):
                self.service.log.info(
                    "link_refused", peer=self.peer_address[0], reason=f"ALPN {chosen}"
                )
                self.close(f"ALPN {chosen!r} is not h2")
                return
        self.service.engine.links.add(self)
        self.add_close_callback(self.service.engine.links.discard)
        self.service.log.debug(
            "link_open",
            peer=f"{self.peer_address[0]}:{self.peer_address[1]}",
            identity=self.identity,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.lost_reason
        super().connection_lost(exc)
        if reason is not None and "protocol error" in reason:
            self.service.log.warning(
                "link_protocol_error",
                peer=f"{self.peer_address[0]}:{self.peer_address[1]}",
                identity=self.identity,
                reason=reason,
            )

    def respond(
        self, stream_id: int, status: int, end: bool = False, retry_after: int | None = None
    ) -> None:
        headers = [(":status", str(status))]
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end)
        except Exception:  # the stream may be gone already
            return
        self._flush()

    def on_request(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        service = self.service
        if self.goaway or service.engine.stopping:
            self.reset_stream(stream_id, 7)  # REFUSED_STREAM: try another node
            return
        method = header(headers, ":method")
        path = header(headers, ":path")
        stream = H2Stream(self, stream_id)
        stream.headers = headers
        self.streams[stream_id] = stream
        if service.h2_path is not None:
            if path != service.h2_path:
                self._refuse(stream, 400)
                return
        elif method != "CONNECT":
            self._refuse(stream, 405)
            return
        if service.node.kind == "http2":
            service.engine.spawn(_serve_http2_safely(stream, self, service))
            return
        stream.headers = ()  # read no further: an idle tunnel holds no header strings
        self.respond(stream_id, 200)
        service.engine.spawn(service.serve(stream))

    def _refuse(self, stream: H2Stream, status: int) -> None:
        self.respond(stream.stream_id, status, end=True)
        stream._local_ended = True
        stream.close()
        self.service.engine.spawn(_record_refusal(stream, self.service, status))


async def _record_refusal(stream: H2Stream, service: Service, status: int) -> None:
    """A stream refused for its method or path is still a tunnel with one record."""
    with service.tunnel(stream, "h2") as t:
        t.reason, t.status = "malformed", status
        method = header(stream.headers, ":method") or ""
        path = header(stream.headers, ":path") or ""
        t.error = f"h2 stream {method[:16]} {path[:128]} refused with {status}"


async def _serve_http2_safely(stream: H2Stream, link: H2ServerLink, service: Service) -> None:
    """Like ``Service.serve``: an answered refusal is logged, the stream always closed."""
    try:
        await _serve_http2(stream, link, service)
    except PyegressError as exc:
        service.log.debug("connection_error", error=str(exc))
    except Exception as exc:  # a bug must not take the link down
        service.log.error("handler_bug", error=f"{type(exc).__name__}: {exc}")
        stream.abort()
    finally:
        stream.close()


async def _serve_http2(stream: H2Stream, link: H2ServerLink, service: Service) -> None:
    """Standard HTTP/2 CONNECT proxy: dial ``:authority``, then answer."""
    with service.tunnel(stream, "http2") as t:
        try:
            authority = header(stream.headers, ":authority") or ""
            if service.requires_auth:
                creds = parse_basic_credentials(header(stream.headers, "proxy-authorization"))
                if creds is None or not service.check_credentials(*creds):
                    raise AuthRequired("proxy authentication required")
                t.user = creds[0]
            host, port = parse_connect_target(authority)
            upstream = await service.dial(t, host, port)
        except PyegressError as exc:
            t.status = exc.http_status
            retry_after = getattr(exc, "retry_after", None) if exc.http_status == 429 else None
            link.respond(stream.stream_id, exc.http_status, end=True, retry_after=retry_after)
            stream.abort()
            raise
        t.status = 200
        link.respond(stream.stream_id, 200)
        await service.relay(t, stream, upstream)
