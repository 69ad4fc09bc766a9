"""Transparent listener: ``-L redirect://:15001`` (also ``red://``, ``redir://``).

A connection the firewall redirected here (iptables/nft ``REDIRECT``, or TPROXY with
``tproxy=true``) carries no proxy request: the application thinks it talks to its
destination. The listener

1. learns the **original destination** (:mod:`pyegress.transparent.origdst`); a
   connection made to the listener itself (not redirected) is refused;
2. recovers a **name** for it (gost v3 ``sniffing`` semantics, on by default,
   ``sniffing=false`` to turn off): a synthetic address handed out by this process's
   DNS listener is turned back into its name; otherwise the client's first bytes are
   read for a bounded time (``sniffing_timeout``, default 1s) and the TLS ClientHello's
   SNI or the HTTP ``Host`` header becomes the target, as ``name:original-port``. No
   name (raw TCP, a server-speaks-first protocol, no SNI) means the original IP;
3. dials that target through the chain like any tunnel: the service's ``bypass=`` and
   any policy judge the **recovered name**, never the IP it was found behind (gost once
   checked its allowlist on the IP before sniffing); and the original destination
   travels up the chain to the DMZ (``Pyegress-Orig-Dst``), so both tiers record it.

Every byte read while sniffing is put back and relayed unchanged. The listener is TCP
only: UDP is not redirected, except DNS through ``-L dns://`` (docs/transparent.md).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyegress.chain.http import transparent_origin
from pyegress.endpoint import Endpoint, TcpEndpoint
from pyegress.errors import ConfigError, LocalProtocolError, ResolveError
from pyegress.observe.audit import cap
from pyegress.policy.literals import parse_host_literal
from pyegress.policy.patterns import normalize_name
from pyegress.protocols.addresses import split_host_port
from pyegress.protocols.http1 import parse_request_head
from pyegress.protocols.tls_hello import looks_like_tls, parse_client_hello
from pyegress.transparent import fakeip
from pyegress.transparent.origdst import NotRedirected, OrigDst, original_dst, transparent_socket
from pyegress.tunnel import HOST_CAP, decision_fields

if TYPE_CHECKING:
    from pyegress.engine import Service

DEFAULT_SNIFF_TIMEOUT = 1.0
MAX_SNIFF_BYTES = 65536

# gost v3's HTTP sniffing methods (gost-compat 2.6.2), as a first token.
_METHODS = frozenset(
    {b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"HEAD", b"CONNECT", b"TRACE"}
)
_TOKEN_END = re.compile(rb"[ \t]")
# Those methods and every prefix of them: a first read that may still become one.
_METHOD_PREFIXES = frozenset(m[:n] for m in _METHODS for n in range(1, len(m) + 1))


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the client's first bytes named: ``source`` is ``sni`` or ``host``."""

    kind: str  # "tls", "http", "other", "none"
    name: str | None = None
    source: str | None = None
    ech: bool = False
    alpn: tuple[str, ...] = ()
    host_header: str | None = None


def _classify(buf: bytes | bytearray) -> str:
    """``tls``, ``http``, ``other``, or ``more`` (cannot tell yet)."""
    if buf[0] == 0x16:
        return "tls" if looks_like_tls(buf[:5]) else "other"
    found = _TOKEN_END.search(buf, 0, 16)
    if found is None:
        return "more" if bytes(buf[:16]) in _METHOD_PREFIXES else "other"
    return "http" if bytes(buf[: found.start()]) in _METHODS else "other"


def _usable_name(text: str | None) -> str | None:
    """A DNS name to dial (normalised), or None for nothing or an IP literal."""
    if not text:
        return None
    try:
        if parse_host_literal(text) is not None:
            return None
    except LocalProtocolError:
        return None
    return normalize_name(text)


def examine(buf: bytes | bytearray) -> Sniffed | None:
    """What ``buf`` names; None while more bytes could tell."""
    if not buf:
        return None
    kind = _classify(buf)
    if kind == "more":
        return None
    if kind == "other":
        return Sniffed("other")
    try:
        if kind == "tls":
            hello = parse_client_hello(buf, MAX_SNIFF_BYTES)
            if hello is None:
                return None
            name = _usable_name(hello.sni)
            source = "sni" if name is not None else None
            return Sniffed("tls", name, source, hello.has_ech, hello.alpn)
        parsed = parse_request_head(buf, MAX_SNIFF_BYTES)
    except LocalProtocolError:
        return Sniffed(kind)
    if parsed is None:
        return None
    host_header = parsed[0].get("Host")
    name = None
    if host_header:
        try:
            name = _usable_name(split_host_port(host_header, 0)[0])
        except LocalProtocolError:
            name = None
    return Sniffed("http", name, "host" if name is not None else None, host_header=host_header)


async def sniff(client: Endpoint, timeout: float) -> Sniffed:
    """Read the client's first bytes for at most ``timeout`` seconds and say what they
    name; every byte is put back."""
    buf = bytearray()
    if client.buffered:  # the first bytes are here already: often they are enough
        buf += await client.read()
        found = examine(buf)
        if found is not None:
            client.unread(buf)
            return found
    try:
        async with asyncio.timeout(timeout):
            while len(buf) <= MAX_SNIFF_BYTES:
                data = await client.read()
                if not data:
                    break
                buf += data
                found = examine(buf)
                if found is not None:
                    return found
    except TimeoutError:
        pass
    finally:
        client.unread(buf)
    if not buf:
        return Sniffed("none")
    return Sniffed("tls" if buf[0] == 0x16 else "other")


async def serve(client: Endpoint, service: Service) -> None:
    with service.tunnel(client, "redirect") as t:
        orig = _original(client, service)
        t.orig_dst = str(orig)
        host, source = orig.host, "orig_dst"
        synthetic, fake_name = fakeip.lookup(service.engine, orig.address)
        if synthetic:
            if fake_name is None:
                detail = f"{orig.address} is a synthetic DNS address with no name (expired?)"
                t.decision = decision_fields("deny", "dns_error", None, t.policy_version, detail)
                raise ResolveError(detail)
            host, source = fake_name, "dns"
        if service.node.flag("sniffing", True):
            timeout = service.node.duration("sniffing_timeout", DEFAULT_SNIFF_TIMEOUT)
            seen = await sniff(client, timeout)
            _note(t, seen, host if synthetic else None)
            if not synthetic and seen.name is not None and seen.source is not None:
                host, source = seen.name, seen.source
        t.name_source = source
        token = transparent_origin.set((t.orig_dst, source))
        try:
            upstream = await service.dial(t, host, orig.port)
        finally:
            transparent_origin.reset(token)
        await service.relay(t, client, upstream)


def _original(client: Endpoint, service: Service) -> OrigDst:
    transport = client.transport if isinstance(client, TcpEndpoint) else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        raise NotRedirected("no socket to ask for the original destination")
    # The transport looked the local address up when the connection was made.
    local = client.local_address
    return original_dst(
        sock, tproxy=service.node.flag("tproxy", False), local=local if local[1] else None
    )


def _note(t: Any, seen: Sniffed, expected: str | None) -> None:
    """The sniffed SNI / Host in the sidecar's own record."""
    if seen.kind == "tls":
        name = seen.name
        target = expected or name
        t.tls = {
            "sni": cap(name, HOST_CAP),
            "sni_match": None if name is None else name == target,
            "ech": seen.ech,
            "alpn": [cap(a, 64) for a in seen.alpn[:8]],
        }
    elif seen.kind == "http":
        t.http = {"host": cap(seen.host_header, HOST_CAP)}


async def not_a_stream(client: Endpoint, service: Service) -> None:  # pragma: no cover
    """The DNS listener has no stream handler (it serves its own sockets)."""
    client.abort()


async def start_transparent(service: Service, factory: Callable[[], Any]) -> Any:
    """Listen for a redirect (``tproxy=true``: a transparent socket) or DNS service;
    returns the server object the service keeps."""
    node = service.node
    loop = asyncio.get_running_loop()
    host = node.host or None
    try:
        if node.kind == "dns":
            from pyegress.transparent import dns

            return await dns.start(service)
        reuse_port = service.engine.reuse_port
        if node.flag("tproxy", False):
            sock = transparent_socket(host, node.port, reuse_port=reuse_port)
            return await loop.create_server(factory, sock=sock)
        return await loop.create_server(
            factory,
            host,
            node.port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
    except PermissionError as exc:
        raise ConfigError(
            f"cannot listen on {node.address}: {exc.strerror or exc}"
            + (" (tproxy=true needs CAP_NET_ADMIN)" if node.flag("tproxy", False) else "")
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot listen on {node.address}: {exc.strerror or exc}") from None
