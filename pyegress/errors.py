"""The one exception tree of pyegress.

Every error that crosses a stage boundary is one of these, never a raw ``OSError`` or
``ssl.SSLError``: connectors wrap what the socket layer raises with :func:`map_os_error`.
Each class carries the one client-visible answer it maps to (HTTP status, SOCKS5 reply
code) and the close reason recorded for the tunnel, so listeners answer from one table.
"""

from __future__ import annotations

import errno
import socket
import ssl

# SOCKS5 reply codes, RFC 1928 section 6.
SOCKS5_SUCCEEDED = 0x00
SOCKS5_GENERAL_FAILURE = 0x01
SOCKS5_NOT_ALLOWED = 0x02
SOCKS5_NETWORK_UNREACHABLE = 0x03
SOCKS5_HOST_UNREACHABLE = 0x04
SOCKS5_CONNECTION_REFUSED = 0x05
SOCKS5_TTL_EXPIRED = 0x06
SOCKS5_COMMAND_NOT_SUPPORTED = 0x07
SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class PyegressError(Exception):
    """Base of every project error."""

    http_status = 500
    socks5_reply = SOCKS5_GENERAL_FAILURE
    close_reason = "internal_error"


class ConfigError(PyegressError):
    """A command line, node URL or config file that cannot be used; the message names
    the offending part and is printed as one line."""


class ProtocolError(PyegressError):
    """Bytes that do not follow the protocol expected at this point."""

    http_status = 400
    close_reason = "malformed"

    def __init__(
        self, message: str, *, http_status: int | None = None, socks5_reply: int | None = None
    ) -> None:
        super().__init__(message)
        if http_status is not None:
            self.http_status = http_status
        if socks5_reply is not None:
            self.socks5_reply = socks5_reply


class LocalProtocolError(ProtocolError):
    """The peer that talks to us (a client) broke the protocol."""


class RemoteProtocolError(ProtocolError):
    """A server we talk to (an upstream hop) broke the protocol."""

    http_status = 502
    close_reason = "upstream_protocol_error"


class HandshakeTimeout(PyegressError):
    """The client did not complete its handshake in time."""

    http_status = 408
    close_reason = "handshake_timeout"


class AuthRequired(PyegressError):
    """Missing or wrong proxy credentials."""

    http_status = 407
    socks5_reply = SOCKS5_NOT_ALLOWED
    close_reason = "auth_failed"


class Denied(PyegressError):
    """The request is refused by a rule (bypass, policy)."""

    http_status = 403
    socks5_reply = SOCKS5_NOT_ALLOWED
    close_reason = "denied"


class Unavailable(PyegressError):
    """The service cannot take the tunnel now (shutting down)."""

    http_status = 503
    close_reason = "drain"


class UnsupportedCommand(PyegressError):
    """A SOCKS command or HTTP feature we do not serve."""

    http_status = 501
    socks5_reply = SOCKS5_COMMAND_NOT_SUPPORTED
    close_reason = "unsupported"


class UpstreamError(PyegressError):
    """Reaching the target (or a hop on the way) failed: 502, or 504 for a timeout
    (gost answers 503 for both; the audit record's close reason tells them apart)."""

    http_status = 502
    socks5_reply = SOCKS5_GENERAL_FAILURE
    close_reason = "dial_failed"


class ConnectRefused(UpstreamError):
    socks5_reply = SOCKS5_CONNECTION_REFUSED
    close_reason = "connect_refused"


class ConnectTimeout(UpstreamError):
    http_status = 504
    socks5_reply = SOCKS5_TTL_EXPIRED
    close_reason = "connect_timeout"


class HostUnreachable(UpstreamError):
    socks5_reply = SOCKS5_HOST_UNREACHABLE
    close_reason = "host_unreachable"


class NetworkUnreachable(UpstreamError):
    socks5_reply = SOCKS5_NETWORK_UNREACHABLE
    close_reason = "network_unreachable"


class ResolveError(UpstreamError):
    """The name did not resolve."""

    socks5_reply = SOCKS5_HOST_UNREACHABLE
    close_reason = "resolve_failed"
    result = "error"  # nxdomain | servfail | nodata | timeout | error


class HopRefused(UpstreamError):
    """A proxy hop answered our handshake with a refusal (its status or reply code)."""

    http_status = 502
    close_reason = "hop_refused"

    def __init__(
        self,
        message: str,
        *,
        http_status: int = 502,
        socks5_reply: int = 1,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.socks5_reply = socks5_reply
        self.retry_after = retry_after


def hop_refusal(
    status: int,
    reason: str,
    hop: str,
    retry_after: str | None = None,
    *,
    pass_bad_request: bool = True,
) -> HopRefused:
    """A hop's (or the DMZ's) non-2xx answer as the answer our own client gets.

    A refusal by rule (403), a limit (429, with its ``Retry-After``) and a malformed
    target (400) are passed on, so the application sees what the DMZ decided; anything
    else is the hop failing us: a gateway error (502, or its own 502/503/504). With
    ``pass_bad_request`` False a 400 is about our own request to the hop (an h2 stream
    on the wrong path, say): a gateway error too.
    """
    text = f"hop {hop} answered {status} {reason}".rstrip()
    if status in (403, 429) or (status == 400 and pass_bad_request):
        after = int(retry_after) if retry_after and retry_after.isdigit() else None
        if status == 429 and after is None:
            after = 1
        reply = SOCKS5_GENERAL_FAILURE if status == 400 else SOCKS5_NOT_ALLOWED
        return HopRefused(text, http_status=status, socks5_reply=reply, retry_after=after)
    code = status if status in (502, 503, 504) else 502
    return HopRefused(text, http_status=code, socks5_reply=SOCKS5_GENERAL_FAILURE)


class TierLinkLost(UpstreamError):
    """The HTTP/2 link between sidecar and DMZ went away (closed, PING unanswered,
    GOAWAY before the stream was processed)."""

    close_reason = "tier_link_lost"


def map_os_error(exc: BaseException, what: str) -> PyegressError:
    """Turn an error from the socket or TLS layer into a project error.

    ``what`` names the thing we were doing ("connect 10.0.0.1:443") for the message.
    """
    if isinstance(exc, PyegressError):
        return exc
    if isinstance(exc, TimeoutError):
        return ConnectTimeout(f"{what}: timed out")
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(f"{what}: TLS error: {exc.reason or exc}")
    if isinstance(exc, socket.gaierror):
        return ResolveError(f"{what}: {exc.strerror or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectRefused(f"{what}: connection refused")
    if isinstance(exc, OSError):
        code = exc.errno
        text = exc.strerror or str(exc)
        if code in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
            return HostUnreachable(f"{what}: {text}")
        if code in (errno.ENETUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL):
            return NetworkUnreachable(f"{what}: {text}")
        if code == errno.ETIMEDOUT:
            return ConnectTimeout(f"{what}: {text}")
        return UpstreamError(f"{what}: {text}")
    return UpstreamError(f"{what}: {exc!r}")
