"""HTTP proxy listener: CONNECT tunnels and absolute-URI forwarding (gost-compat 2.3).

CONNECT: authenticate, dial ``host:port`` through the chain, answer
``200 Connection established`` with ``Proxy-Agent``, relay.

Absolute-URI requests (``GET http://host/path``): each request is routed by its own
target (gost-compat pitfall 5: a keep-alive connection is never bound to its first
host), sent origin-form on a fresh upstream connection with ``Connection: close``, and
the response is streamed back with its framing tracked so the client connection can stay
open for the next request. Bodies pass through verbatim (chunked included); a ``101``
response turns the connection into a raw relay.
"""

from __future__ import annotations

import asyncio
import re

from pyegress.chain.http import CONN_ID_HEADER, NAME_SOURCE_HEADER, ORIG_DST_HEADER
from pyegress.endpoint import Endpoint, read_message
from pyegress.engine import Service, handshake_deadline
from pyegress.errors import (
    AuthRequired,
    ConnectTimeout,
    Denied,
    HandshakeTimeout,
    LocalProtocolError,
    PyegressError,
    RemoteProtocolError,
)
from pyegress.policy.inspect import check_request_head
from pyegress.policy.literals import canonical, parse_host_literal
from pyegress.protocols.addresses import join_host_port, split_host_port
from pyegress.protocols.http1 import (
    BodyFraming,
    BodyReader,
    RequestHead,
    ResponseHead,
    parse_absolute_uri,
    parse_basic_credentials,
    parse_connect_target,
    parse_request_head,
    parse_response_head,
    render_request_head,
    render_response,
    request_body_framing,
    response_body_framing,
    strip_hop_by_hop,
    without_headers,
)
from pyegress.tunnel import Tunnel

_CONN_ID = re.compile(r"[0-9a-f]{16,32}")


class _ClientGoneError(PyegressError):
    """The client closed between requests: nothing to answer or record."""

    close_reason = "client_closed"


def _truncated_request(partial: bytes) -> PyegressError:
    if not partial:
        return _ClientGoneError()
    return LocalProtocolError("client closed in the middle of a request head")


async def serve(client: Endpoint, service: Service) -> None:
    first = True
    while True:
        try:
            head = await _read_request(client, service, first)
        except _ClientGoneError:
            return
        except TimeoutError:
            if first:
                await _refuse(client, service, HandshakeTimeout("no complete request in time"))
            return
        except PyegressError as exc:
            await _refuse(client, service, exc)
            return
        first = False
        # Handed over in a box: a tunnel's frames keep no parsed head while it relays.
        box = [head]
        del head
        if not await handle_request(client, service, box):
            return


async def _read_request(client: Endpoint, service: Service, first: bool) -> RequestHead:
    # The first request must come within the handshake timeout; later ones on a
    # keep-alive connection may wait as long as an idle tunnel may.
    if first:
        deadline = handshake_deadline(service.handshake_timeout)
    else:
        deadline = asyncio.get_running_loop().time() + service.idle_timeout
    async with asyncio.timeout_at(deadline):
        return await read_message(client, parse_request_head, _truncated_request)


async def _refuse(client: Endpoint, service: Service, exc: PyegressError) -> None:
    """Answer a request that never became a tunnel, and record it."""
    with service.tunnel(client, "http") as t:
        t.reason, t.error = exc.close_reason, str(exc)
        t.status = _reply_error(client, service, exc)


def _reply_error(client: Endpoint, service: Service, exc: PyegressError) -> int:
    status = exc.http_status
    headers: list[tuple[str, str]] = []
    if isinstance(exc, AuthRequired):
        headers.append(("Proxy-Authenticate", f'Basic realm="{service.realm}"'))
    retry_after = getattr(exc, "retry_after", None)
    if status == 429 and retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    headers += [("Proxy-Agent", service.proxy_agent), ("Connection", "close")]
    client.write(render_response(status, headers=[*headers, ("Content-Length", "0")]))
    return status


def _authenticate(service: Service, head: RequestHead) -> str | None:
    """The authenticated user name (``None`` when the service needs no auth)."""
    if not service.requires_auth:
        return None
    creds = parse_basic_credentials(head.get("Proxy-Authorization"))
    if creds is None or not service.check_credentials(*creds):
        raise AuthRequired("proxy authentication required")
    return creds[0]


async def handle_request(client: Endpoint, service: Service, box: list[RequestHead]) -> bool:
    """Serve one request (taken out of ``box``); True when the client connection may
    carry another."""
    head = box.pop()
    kind = "http-connect" if head.method == "CONNECT" else "http-forward"
    with service.tunnel(client, kind) as t:
        conn_id = head.get(CONN_ID_HEADER)
        # Only a peer with a verified certificate (a sidecar on the tier link) may name
        # the conn_id; an application's header would let it forge audit joins.
        if conn_id is not None and client.identity is not None and _CONN_ID.fullmatch(conn_id):
            t.conn_id = conn_id  # minted by the sidecar: joins both tiers' records
        if client.identity is not None:
            _transparent_origin(t, head)
        try:
            t.user = _authenticate(service, head)
            if head.method == "CONNECT":
                host, port = parse_connect_target(head.target)
                t.host, t.port = host, port
                upstream = await service.dial(t, host, port)
            else:
                return await _forward(client, service, head, t)
        except AuthRequired as exc:
            t.status = _reply_error(client, service, exc)
            t.reason, t.error = exc.close_reason, str(exc)
            # A browser answers a 407 on the same connection: keep it when we can.
            return head.keep_alive() and request_body_framing(head).kind == "none"
        except PyegressError as exc:
            t.status = _reply_error(client, service, exc)
            raise
        t.status = 200
        client.write(
            b"HTTP/1.1 200 Connection established\r\nProxy-Agent: "
            + service.proxy_agent.encode("latin-1", "replace")
            + b"\r\n\r\n"
        )
        del head  # an idle tunnel holds no header strings (about 1 KiB each)
        await service.relay(t, client, upstream)
        return False


_NAME_SOURCES = frozenset({"sni", "host", "orig_dst", "dns"})


def _transparent_origin(t: Tunnel, head: RequestHead) -> None:
    """A verified sidecar's transparent tunnel: its original destination and where the
    name came from (chain/http.py). A value that does not parse is ignored."""
    value = head.get(ORIG_DST_HEADER)
    if value is None or len(value) > 64:
        return
    try:
        host, port = split_host_port(value.strip())
        address = parse_host_literal(host)
    except LocalProtocolError:
        return
    if address is None or port == 0:
        return
    t.orig_dst = join_host_port(canonical(address), port)
    source = head.get(NAME_SOURCE_HEADER)
    if source in _NAME_SOURCES:
        t.name_source = source


async def _forward(client: Endpoint, service: Service, head: RequestHead, t: Tunnel) -> bool:
    uri = parse_absolute_uri(head.target)
    if uri.scheme != "http":
        raise LocalProtocolError(f"cannot forward a {uri.scheme!r} URL; use CONNECT")
    framing = request_body_framing(head)
    t.host, t.port = uri.host, uri.port
    state = service.engine.state
    if state.policy is None or state.tls.host_check:
        # The Host header must name the URI's host and port: an origin (or a CDN in
        # front of it) routes on Host, so a mismatch would reach a host never judged.
        seen = check_request_head(head, uri.host, uri.port)
        if seen.reason is not None:
            t.http = {"host": seen.host_header}
            status = 400 if seen.reason == "malformed_request" else 403
            refusal = Denied(seen.detail) if status == 403 else LocalProtocolError(seen.detail)
            service.refuse(t, seen.reason, refusal)
    upstream = await service.dial(t, uri.host, uri.port)
    # Count only this request's bytes, not the hops' own handshakes.
    sent_before, received_before = upstream.bytes_out, upstream.bytes_in
    try:
        headers = without_headers(
            strip_hop_by_hop(head.headers), (CONN_ID_HEADER, ORIG_DST_HEADER, NAME_SOURCE_HEADER)
        )
        if head.get("Host") is None:
            headers.insert(0, ("Host", t.target if uri.port != 80 else uri.host))
        headers.append(("Connection", "close"))
        upstream.write(render_request_head(head.method, uri.origin_form, headers, head.version))
        return await _exchange(client, upstream, service, head, framing, t)
    finally:
        t.bytes_up += upstream.bytes_out - sent_before
        t.bytes_down += upstream.bytes_in - received_before
        upstream.close()


async def _exchange(
    client: Endpoint,
    upstream: Endpoint,
    service: Service,
    head: RequestHead,
    framing: BodyFraming,
    t: Tunnel,
) -> bool:
    body_task: asyncio.Task[bool] | None = None
    if framing.kind != "none":
        body_task = asyncio.ensure_future(_copy_body(client, upstream, BodyReader(framing)))
    try:
        try:
            async with asyncio.timeout(service.idle_timeout):
                while True:
                    response = await read_message(upstream, parse_response_head, _upstream_closed)
                    if 100 <= response.status < 200 and response.status != 101:
                        client.write(_render_head(response, keep_alive=None))
                        continue
                    break
        except TimeoutError:
            raise ConnectTimeout("upstream sent no response in time") from None
        t.status = response.status
        if response.status == 101:
            client.write(_render_head(response, keep_alive=None))
            if body_task is not None:
                body_task.cancel()
            await service.relay(t, client, upstream)
            return False
        resp_framing = response_body_framing(response, head.method)
        keep = head.keep_alive() and resp_framing.kind != "close"
        client.write(_render_head(response, keep_alive=keep))
        if resp_framing.kind != "none":
            try:
                async with asyncio.timeout(service.idle_timeout):
                    clean = await _copy_body(
                        upstream, client, BodyReader(resp_framing, remote=True)
                    )
            except TimeoutError:
                clean = False
            if not clean:
                # The head is out: an error status now would corrupt the body the
                # client is reading. A reset tells it the response is incomplete.
                client.abort()
                raise RemoteProtocolError("upstream response body cut short")
        if body_task is not None:
            if not body_task.done():
                # The response is complete but the client is still sending the body:
                # the connection cannot be reused.
                body_task.cancel()
                return False
            if body_task.cancelled() or body_task.exception() or not body_task.result():
                return False
        t.reason = "eof"
        return keep
    except BaseException:
        if body_task is not None and not body_task.done():
            body_task.cancel()
        raise


def _upstream_closed(partial: bytes) -> PyegressError:
    return RemoteProtocolError("upstream closed before sending a complete response head")


def _render_head(response: ResponseHead, keep_alive: bool | None) -> bytes:
    headers = list(response.headers)
    if keep_alive is not None:
        headers = without_headers(headers, ("Connection", "Keep-Alive", "Proxy-Connection"))
        headers.append(("Connection", "keep-alive" if keep_alive else "close"))
    lines = [f"{response.version} {response.status} {response.reason}".rstrip(" ")]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


async def _copy_body(src: Endpoint, dst: Endpoint, reader: BodyReader) -> bool:
    """Copy one message body; True when it ended cleanly, False when cut short."""
    while not reader.done:
        data = await src.read()
        if not data:
            return reader.feed_eof()
        used, done = reader.feed(data)
        if used:
            dst.write(data[:used] if used < len(data) else data)
        if used < len(data):
            src.unread(data[used:])
        await dst.drain()
        if done:
            break
    return True
