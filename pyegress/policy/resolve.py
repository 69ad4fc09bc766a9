"""Resolution with pinning: resolve a name once, classify every answer, dial only an
address that was checked.

A name is looked up exactly once per tunnel. Each answer is classified against the
special-purpose address table (``special.py``); answers in a refused category are
dropped (and reported), and the tunnel dials the first remaining answer by its IP, so a
second lookup (DNS rebinding) can never change where the bytes go.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyegress.errors import ResolveError
from pyegress.policy.special import Verdict, classify_with_self, is_refused

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ResolveTimeout(ResolveError):
    close_reason = "dns_timeout"
    http_status = 504
    result = "timeout"


@dataclass(frozen=True, slots=True)
class Pinned:
    """The outcome of checking a target's addresses."""

    address: Address | None
    answers: tuple[Address, ...]
    rejected: tuple[Verdict, ...] = field(default=())

    @property
    def refusal(self) -> str | None:
        """The reason code when no answer may be dialed."""
        if self.address is not None:
            return None
        if not self.rejected:
            return "dns_error"
        category = self.rejected[0].category or "reserved"
        if self.rejected[0].embedded is not None and category not in ("metadata", "loopback"):
            return "resolved_ipv6_embedded"
        if category == "self":
            return "self_connection"
        return f"resolved_{category}"


_GAI_RESULTS = {
    socket.EAI_NONAME: "nxdomain",
    socket.EAI_AGAIN: "servfail",
    getattr(socket, "EAI_NODATA", -5): "nodata",
}


async def resolve(host: str, port: int, timeout: float) -> tuple[Address, ...]:
    """Look ``host`` up once (A and AAAA, in the system resolver's order)."""
    from pyegress.observe import metrics

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = "ok"
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        result = "timeout"
        raise ResolveTimeout(f"resolving {host}: no answer within {timeout:g}s") from None
    except OSError as exc:
        result = _GAI_RESULTS.get(exc.errno or 0, "error")
        error = ResolveError(f"resolving {host}: {result}: {exc.strerror or exc}")
        error.result = result
        raise error from None
    except ValueError as exc:  # e.g. UnicodeError: a label over 63 octets
        result = "error"
        raise ResolveError(f"resolving {host}: bad name: {exc}") from None
    finally:
        metrics.resolver_lookup("error" if result == "nodata" else result, loop.time() - started)
    seen: list[Address] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    return tuple(seen)


def pin(
    answers: Iterable[Address],
    port: int,
    allowed: frozenset[str],
    self_endpoints: Iterable[tuple[Address, int]] = (),
) -> Pinned:
    """Choose the first answer that is routable or in a category the rule allows.

    An answer that is one of this process's own listening endpoints (address and port)
    is refused as ``self``: dialing it would loop the tunnel back into the proxy.
    """
    answers = tuple(answers)
    own = [address for address, own_port in self_endpoints if own_port == port]
    rejected: list[Verdict] = []
    for address in answers:
        verdict = classify_with_self(address, own)
        if not is_refused(verdict, allowed):
            return Pinned(address, answers, tuple(rejected))
        rejected.append(verdict)
    return Pinned(None, answers, tuple(rejected))
