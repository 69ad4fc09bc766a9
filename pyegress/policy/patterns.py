"""Destination patterns of the policy grammar, and port sets.

One pattern is one entry of a rule's ``allow:`` / ``deny:`` list (or one item of a gost
``bypass=`` value). :func:`parse_pattern` turns its text into a :class:`Pattern` or
raises :class:`PatternError` with the reason; the loader adds file and line.

Kinds (``docs/policy.md`` has the full grammar):

``exact``       ``example.com``: that host only.
``subdomains``  ``*.example.com``: any name below ``example.com`` (any depth), not the apex.
``suffix``      ``.example.com``: the apex and every name below it, on a label boundary
                (``badexample.com`` does not match).
``network``     ``10.0.0.1``, ``10.0.0.0/8``, ``2001:db8::/32``: an address or a CIDR
                block (an address is a block of one).
``range``       ``10.0.0.1-10.0.0.9``: an inclusive address range (gost v3 syntax).

Any pattern may end in ``:port`` or ``:lo-hi`` (IPv6 in brackets: ``[2001:db8::1]:443``,
``[2001:db8::/32]:443``); such a pattern matches those ports whatever the rule's
``ports:`` says.

Names are normalised the same way for patterns and for requests
(:func:`normalize_name`): lower-case, one trailing dot removed, internationalised names
converted to punycode with Python's ``idna`` codec. IPv4-mapped IPv6 (``::ffff:a.b.c.d``)
is unmapped to IPv4, in patterns and requests alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Literal

from pyegress.errors import LocalProtocolError
from pyegress.policy.literals import canonical, parse_host_literal

__all__ = [
    "ANY_PORT",
    "DEFAULT_PORTS",
    "MAX_NAME_LENGTH",
    "Pattern",
    "PatternError",
    "PatternKind",
    "PortSet",
    "normalize_name",
    "parse_pattern",
    "parse_port_range",
    "unmap",
]

Address = IPv4Address | IPv6Address

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

PatternKind = Literal["exact", "subdomains", "suffix", "network", "range"]
NAME_KINDS: frozenset[str] = frozenset({"exact", "subdomains", "suffix"})

_LABEL = re.compile(r"[a-z0-9_-]+", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_MAPPED_PREFIX = 0xFFFF << 32
_V4_BITS = 32


class PatternError(ValueError):
    """A pattern, port or port range that cannot be used; the message is the reason."""


# --------------------------------------------------------------------------------------
# Ports


@dataclass(frozen=True, slots=True)
class PortSet:
    """Inclusive port ranges: ``PortSet(((443, 443), (8000, 8999)))``."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


ANY_PORT = PortSet(((1, 65535),))
DEFAULT_PORTS = PortSet(((443, 443),))


def _port_number(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise PatternError(f"port {text!r} is not a number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise PatternError(f"port {value} is out of range 1-65535")
    return value


def parse_port_range(value: int | str) -> tuple[int, int]:
    """``443`` / ``"443"`` -> (443, 443); ``"80-443"`` -> (80, 443).

    Ports are 1-65535; a range needs ``lo <= hi``.
    """
    if isinstance(value, bool):
        raise PatternError(f"port {value!r} is not a number")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise PatternError(f"port {value} is out of range 1-65535")
        return value, value
    lo_text, dash, hi_text = value.partition("-")
    lo = _port_number(lo_text)
    if not dash:
        return lo, lo
    hi = _port_number(hi_text)
    if lo > hi:
        raise PatternError(f"port range {value!r} is empty (low end above high end)")
    return lo, hi


def port_set(ranges: list[tuple[int, int]]) -> PortSet:
    """Sorted, merged ranges."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return PortSet(tuple(merged))


# --------------------------------------------------------------------------------------
# Addresses and names


def unmap(address: Address) -> Address:
    """``::ffff:a.b.c.d`` -> ``a.b.c.d``; every other address unchanged."""
    if isinstance(address, IPv6Address) and int(address) >> 32 == 0xFFFF:
        return IPv4Address(int(address) & 0xFFFF_FFFF)
    return address


def normalize_name(name: str) -> str | None:
    """A DNS name as patterns store it, or ``None`` if it cannot be one.

    Lower-case, one trailing dot removed, non-ASCII converted with the ``idna`` codec.
    ``None`` when the codec refuses the name or it is longer than 253 characters.
    Labels are not validated here (that is the pattern parser's job).
    """
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
        if name.endswith("."):
            name = name[:-1]
    if not name or len(name) > MAX_NAME_LENGTH:
        return None
    return name


@dataclass(frozen=True, slots=True)
class Pattern:
    """One parsed pattern.

    ``name`` is the normalised base name of a name pattern (``example.com`` for all of
    ``example.com``, ``*.example.com`` and ``.example.com``). IP patterns carry their IP
    ``version`` and the inclusive integer bounds ``first``..``last``; ``prefixlen`` is
    the CIDR length of a ``network`` (32 or 128 for a single address). ``ports`` is the
    pattern's own port suffix, ``None`` when it has none. ``text`` is the canonical
    spelling, shown in decision details.
    """

    kind: PatternKind
    text: str
    name: str = ""
    version: int = 0
    first: int = 0
    last: int = 0
    prefixlen: int = 0
    ports: PortSet | None = None

    @property
    def is_name(self) -> bool:
        return self.kind in NAME_KINDS


def _split_port(text: str) -> tuple[str, PortSet | None, bool]:
    """(host part, port suffix, bracketed)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise PatternError("'[' without a closing ']'")
        inner, rest = text[1:close], text[close + 1 :]
        if ":" not in inner:
            raise PatternError("brackets may only enclose an IPv6 address or network")
        if not rest:
            return inner, None, True
        if not rest.startswith(":"):
            raise PatternError(f"unexpected {rest!r} after ']' (expected ':port')")
        return inner, port_set([parse_port_range(rest[1:])]), True
    if "[" in text or "]" in text:
        raise PatternError("stray bracket (IPv6 with a port is written '[2001:db8::1]:443')")
    if text.count(":") >= 2:
        return text, None, False  # bare IPv6 (no port: bracket it to add one)
    if ":" in text:
        host, _, port = text.rpartition(":")
        if not host:
            raise PatternError("no host before ':'")
        return host, port_set([parse_port_range(port)]), False
    return text, None, False


def _address(text: str) -> Address | None:
    try:
        return ip_address(text)
    except ValueError:
        return None


def _network_pattern(network: IPv4Network | IPv6Network, ports: PortSet | None) -> Pattern:
    version = network.version
    first = int(network.network_address)
    prefixlen = network.prefixlen
    if version == 6 and prefixlen >= 96 and first >> 32 == 0xFFFF:
        version, first, prefixlen = 4, first & 0xFFFF_FFFF, prefixlen - 96
    bits = _V4_BITS if version == 4 else 128
    last = first | ((1 << (bits - prefixlen)) - 1)
    start = IPv4Address(first) if version == 4 else IPv6Address(first)
    host = canonical(start)
    if prefixlen != bits:
        host = f"{host}/{prefixlen}"
    return Pattern(
        kind="network",
        text=_with_ports(host, ports, version == 6),
        version=version,
        first=first,
        last=last,
        prefixlen=prefixlen,
        ports=ports,
    )


def _with_ports(host: str, ports: PortSet | None, bracket: bool) -> str:
    if ports is None:
        return host
    if bracket:
        host = f"[{host}]"
    return f"{host}:{ports}"


def _ip_pattern(host: str, ports: PortSet | None) -> Pattern | None:
    """An IP, CIDR or range pattern, ``None`` if ``host`` is none of them."""
    if "%" in host:
        raise PatternError("'%' is not allowed (IPv6 zone identifiers are not accepted)")
    if "/" in host:
        address_text, _, length = host.partition("/")
        if _address(address_text) is None:
            raise PatternError("invalid CIDR block (the part before '/' is not an IP address)")
        if not _DIGITS.fullmatch(length):
            raise PatternError("invalid CIDR block (the prefix length must be a number)")
        try:
            network = ip_network(host, strict=True)
        except ValueError:
            try:
                loose = ip_network(host, strict=False)
            except ValueError:
                raise PatternError("invalid CIDR block (prefix length out of range)") from None
            raise PatternError(
                f"CIDR block has host bits set (the network is {loose.network_address}/"
                f"{loose.prefixlen})"
            ) from None
        return _network_pattern(network, ports)
    single = _address(host)
    if single is not None:
        return _network_pattern(ip_network(single), ports)
    if "-" in host:
        lo_text, _, hi_text = host.partition("-")
        lo, hi = _address(lo_text), _address(hi_text)
        if lo is None or hi is None:
            if ":" in host:
                raise PatternError("invalid IPv6 address range")
            return None  # a name with a hyphen, checked as a name
        lo, hi = unmap(lo), unmap(hi)
        if lo.version != hi.version:
            raise PatternError("address range mixes IPv4 and IPv6")
        if int(lo) > int(hi):
            raise PatternError("address range is empty (first address above last)")
        text = f"{canonical(lo)}-{canonical(hi)}"
        return Pattern(
            kind="range",
            text=_with_ports(text, ports, lo.version == 6),
            version=lo.version,
            first=int(lo),
            last=int(hi),
            ports=ports,
        )
    if ":" in host:
        raise PatternError("invalid IPv6 address")
    return None


def _check_name(name: str, *, wildcard: bool) -> None:
    """Validate a normalised base name (no wildcard prefix)."""
    if "*" in name:
        raise PatternError("'*' is only allowed as the whole leftmost label, as in '*.example.com'")
    if "?" in name:
        raise PatternError("glob characters are not supported ('?')")
    if len(name) > MAX_NAME_LENGTH:
        raise PatternError(f"name longer than {MAX_NAME_LENGTH} characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise PatternError("empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise PatternError(f"label longer than {MAX_LABEL_LENGTH} characters")
        if not _LABEL.fullmatch(label):
            bad = next(ch for ch in label if not _LABEL.fullmatch(ch))
            raise PatternError(f"invalid character {bad!r} in a host name")
    if wildcard and len(labels) < 2:
        raise PatternError("a wildcard over a top-level domain would match too much")
    try:
        literal = parse_host_literal(name)
    except LocalProtocolError:
        raise PatternError("numeric host that is not a valid IP address") from None
    if literal is not None:
        if wildcard:
            raise PatternError("a wildcard cannot apply to an IP address")
        raise PatternError(f"IP address in a non-canonical form (write {canonical(literal)})")


def _name_pattern(host: str, ports: PortSet | None) -> Pattern:
    lowered = host.lower()
    if lowered in ("*", "*.", ".", ".."):
        raise PatternError("would match every host")
    kind: PatternKind
    if lowered.startswith("*."):
        kind, base, prefix = "subdomains", lowered[2:], "*."
    elif lowered.startswith("."):
        kind, base, prefix = "suffix", lowered[1:], "."
    else:
        kind, base, prefix = "exact", lowered, ""
    if not base or base == ".":
        raise PatternError("no name after the wildcard")
    if base.endswith(".") and not base.endswith(".."):
        base = base[:-1]
    if not base.isascii():
        if "*" in base:
            raise PatternError(
                "'*' is only allowed as the whole leftmost label, as in '*.example.com'"
            )
        try:
            base = base.encode("idna").decode("ascii")
        except UnicodeError:
            raise PatternError("cannot be encoded as an internationalised name (IDNA)") from None
        base = base.removesuffix(".")
    _check_name(base, wildcard=kind != "exact")
    return Pattern(kind=kind, text=_with_ports(prefix + base, ports, False), name=base, ports=ports)


def parse_pattern(text: str) -> Pattern:
    """Parse one pattern; :class:`PatternError` says why it is not acceptable."""
    if not text:
        raise PatternError("empty pattern")
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0 or ch.isspace():
            raise PatternError("whitespace or control character in a pattern")
    host, ports, bracketed = _split_port(text)
    if not host:
        raise PatternError("empty host")
    ip = _ip_pattern(host, ports)
    if ip is not None:
        return ip
    if bracketed:
        raise PatternError("brackets may only enclose an IPv6 address or network")
    return _name_pattern(host, ports)
