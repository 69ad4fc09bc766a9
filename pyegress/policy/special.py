"""The special-purpose address table: which destination addresses the DMZ must not dial.

The SSRF defence runs **after** DNS resolution (and on IP literals): every address the
DMZ is about to dial is passed to :func:`classify`, and :func:`is_refused` decides.
The answer comes only from :data:`TABLE`, an explicit list built from the IANA IPv4 and
IPv6 Special-Purpose Address Registries (RFC 6890 and updates), the IANA IPv6 Address
Space registry, and the cloud providers' metadata endpoints. ``ipaddress`` is used for
parsing and prefix arithmetic only: its ``is_private`` / ``is_global`` / ``is_reserved``
answers changed between CPython patch releases (CVE-2024-4032) and are never consulted.

Lookup
    The most specific (longest-prefix) entry wins, so a metadata ``/32`` beats the
    link-local ``/16`` around it, and ``255.255.255.255`` (broadcast) beats ``240/4``.
    An address that matches no entry gets category ``None``: globally routable as far
    as the table knows.

Categories
    Stable strings (they become audit reason codes and metric labels), see
    :data:`CATEGORIES`. ``self`` is never in the table; only :func:`classify_with_self`
    returns it.

IPv4 embedded in IPv6 (decided here, tested in ``tests/test_policy_special.py``)
    These prefixes are checked before the table lookup. The embedded IPv4 address is
    classified on its own and, if the table has a category for it (private, loopback,
    metadata, ...), the whole IPv6 address gets **that** category, with
    :attr:`Verdict.embedded` set. If the embedded IPv4 is globally routable:

    * ``::ffff:0:0/96`` IPv4-mapped (RFC 4291 2.5.5.2): ``None``. It is the IPv4
      address itself, as a dual-stack socket dials it; every IPv4 address and its
      mapped form classify the same.
    * ``64:ff9b::/96`` NAT64 well-known prefix (RFC 6052), IPv4 in the low 32 bits:
      ``None`` (allowed): this is how IPv6-only clusters reach IPv4 hosts through DNS64.
    * ``64:ff9b:1::/48`` local-use translation prefix (RFC 8215): the low 32 bits are
      classified as for NAT64. With a global embedded IPv4 the address is ``None`` only
      inside ``64:ff9b:1::/96``; elsewhere in the ``/48`` it is ``translation``: the
      operator may use any RFC 6052 layout (``/48`` ... ``/96``) there, so the IPv4 the
      translator really dials may not be the low 32 bits.
    * ``2002::/16`` 6to4 (RFC 3056), IPv4 in bits 16-47: ``translation``. 6to4 relays
      are deprecated (RFC 7526); the tunnel endpoint is refused by default.
    * ``2001::/32`` Teredo (RFC 4380), client IPv4 = bitwise NOT of the low 32 bits:
      ``translation`` (tunnelling to an arbitrary host; refused by default). The Teredo
      server address (bits 32-63) is not classified: packets are not sent to it.

    ``::/96`` (IPv4-compatible, deprecated by RFC 4291) is *not* treated as an
    embedding: it is ``reserved``, except ``::`` (``unspecified``) and ``::1``
    (``loopback``).

Deliberately conservative choices
    * ``192.0.0.0/24`` and ``2001::/23`` (IETF protocol assignments) are refused whole
      (``protocol_assignments``), including the few anycast, AMT, AS112 and drone-id
      blocks inside them that IANA lists as globally reachable: none of them is a
      destination for an egress proxy. ORCHID/ORCHIDv2 are identifiers, not locators
      (``reserved``).
    * IPv6 space outside ``2000::/3`` that IANA has not allocated ("Reserved by IETF")
      is ``reserved``, so a future allocation needs a table change before it is dialed.
    * ``168.63.129.16`` (Azure WireServer) is a public address but is refused as
      ``metadata``, as is every metadata endpoint listed in :data:`TABLE`.

Allowing categories
    :func:`is_refused` refuses everything with a category unless the operator allows
    that category. ``metadata`` can never be allowed (:data:`NEVER_ALLOWED`): the
    allowed set is ignored for it, so no configuration opens the credentials endpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = [
    "BENCHMARKING",
    "BROADCAST",
    "CATEGORIES",
    "CGNAT",
    "DISCARD",
    "DOCUMENTATION",
    "LINK_LOCAL",
    "LOOPBACK",
    "METADATA",
    "MULTICAST",
    "NEVER_ALLOWED",
    "PRIVATE",
    "PROTOCOL_ASSIGNMENTS",
    "RESERVED",
    "SELF",
    "SITE_LOCAL",
    "TABLE",
    "THIS_NETWORK",
    "TRANSLATION",
    "ULA",
    "UNSPECIFIED",
    "SpecialRange",
    "Verdict",
    "classify",
    "classify_with_self",
    "is_refused",
]

IPAddress = IPv4Address | IPv6Address

UNSPECIFIED = "unspecified"
LOOPBACK = "loopback"
PRIVATE = "private"
LINK_LOCAL = "link_local"
METADATA = "metadata"
CGNAT = "cgnat"
MULTICAST = "multicast"
BROADCAST = "broadcast"
RESERVED = "reserved"
DOCUMENTATION = "documentation"
BENCHMARKING = "benchmarking"
ULA = "ula"
SITE_LOCAL = "site_local"
DISCARD = "discard"
THIS_NETWORK = "this_network"
PROTOCOL_ASSIGNMENTS = "protocol_assignments"
TRANSLATION = "translation"
SELF = "self"

#: Every category :func:`classify` or :func:`classify_with_self` can return.
CATEGORIES: frozenset[str] = frozenset(
    {
        UNSPECIFIED,
        LOOPBACK,
        PRIVATE,
        LINK_LOCAL,
        METADATA,
        CGNAT,
        MULTICAST,
        BROADCAST,
        RESERVED,
        DOCUMENTATION,
        BENCHMARKING,
        ULA,
        SITE_LOCAL,
        DISCARD,
        THIS_NETWORK,
        PROTOCOL_ASSIGNMENTS,
        TRANSLATION,
        SELF,
    }
)

#: Categories :func:`is_refused` refuses whatever ``allowed_categories`` says.
NEVER_ALLOWED: frozenset[str] = frozenset({METADATA})


@dataclass(frozen=True, slots=True)
class SpecialRange:
    """One entry of :data:`TABLE`: a network, its category and where it comes from."""

    network: IPv4Network | IPv6Network
    category: str
    note: str


def _v4(cidr: str, category: str, note: str) -> SpecialRange:
    return SpecialRange(IPv4Network(cidr), category, note)


def _v6(cidr: str, category: str, note: str) -> SpecialRange:
    return SpecialRange(IPv6Network(cidr), category, note)


_IETF_RESERVED_V6 = "IANA IPv6 Address Space registry: reserved by IETF (RFC 4291), unallocated"

#: The special-purpose address table. Order does not matter: lookup is longest-prefix.
TABLE: tuple[SpecialRange, ...] = (
    # ---- IPv4: IANA IPv4 Special-Purpose Address Registry and related RFCs
    _v4("0.0.0.0/8", THIS_NETWORK, "RFC 791 3.2, RFC 1122 3.2.1.3: 'this network'"),
    _v4("0.0.0.0/32", UNSPECIFIED, "RFC 1122 3.2.1.3: unspecified ('this host'); dials local"),
    _v4("10.0.0.0/8", PRIVATE, "RFC 1918: private-use"),
    _v4("100.64.0.0/10", CGNAT, "RFC 6598: shared address space (carrier-grade NAT)"),
    _v4("127.0.0.0/8", LOOPBACK, "RFC 1122 3.2.1.3: loopback"),
    _v4("169.254.0.0/16", LINK_LOCAL, "RFC 3927: link-local"),
    _v4("172.16.0.0/12", PRIVATE, "RFC 1918: private-use"),
    _v4(
        "192.0.0.0/24",
        PROTOCOL_ASSIGNMENTS,
        "RFC 6890 2.1: IETF protocol assignments (DS-Lite, PCP/TURN anycast, NAT64 discovery)",
    ),
    _v4("192.0.2.0/24", DOCUMENTATION, "RFC 5737: documentation (TEST-NET-1)"),
    _v4("192.88.99.0/24", RESERVED, "RFC 7526: deprecated 6to4 relay anycast (RFC 3068)"),
    _v4("192.168.0.0/16", PRIVATE, "RFC 1918: private-use"),
    _v4("198.18.0.0/15", BENCHMARKING, "RFC 2544: network device benchmarking"),
    _v4("198.51.100.0/24", DOCUMENTATION, "RFC 5737: documentation (TEST-NET-2)"),
    _v4("203.0.113.0/24", DOCUMENTATION, "RFC 5737: documentation (TEST-NET-3)"),
    _v4("224.0.0.0/4", MULTICAST, "RFC 5771: multicast"),
    _v4("240.0.0.0/4", RESERVED, "RFC 1112 4: reserved for future use"),
    _v4("255.255.255.255/32", BROADCAST, "RFC 919, RFC 8190: limited broadcast"),
    # ---- IPv4 cloud metadata endpoints (more specific than the ranges around them)
    _v4(
        "169.254.169.254/32",
        METADATA,
        "instance metadata service (AWS IMDS, GCP, Azure IMDS, OpenStack, OCI, others)",
    ),
    _v4("169.254.170.2/32", METADATA, "AWS ECS task metadata and credentials endpoint"),
    _v4("169.254.170.23/32", METADATA, "AWS EKS Pod Identity Agent credentials endpoint"),
    _v4("100.100.100.200/32", METADATA, "Alibaba Cloud ECS instance metadata service"),
    _v4("192.0.0.192/32", METADATA, "Oracle Cloud Infrastructure instance metadata (legacy)"),
    _v4(
        "168.63.129.16/32",
        METADATA,
        "Azure WireServer platform endpoint (public address, refused as metadata)",
    ),
    # ---- IPv6: IANA IPv6 Special-Purpose Address Registry and related RFCs
    _v6("::/128", UNSPECIFIED, "RFC 4291 2.5.2: unspecified"),
    _v6("::1/128", LOOPBACK, "RFC 4291 2.5.3: loopback"),
    _v6("::/96", RESERVED, "RFC 4291 2.5.5.1: IPv4-compatible IPv6 (deprecated)"),
    _v6(
        "::ffff:0:0/96",
        TRANSLATION,
        "RFC 4291 2.5.5.2: IPv4-mapped; classified by the embedded IPv4",
    ),
    _v6(
        "64:ff9b::/96",
        TRANSLATION,
        "RFC 6052: NAT64 well-known prefix; classified by the embedded IPv4 (low 32 bits)",
    ),
    _v6(
        "64:ff9b:1::/48",
        TRANSLATION,
        "RFC 8215: local-use IPv4/IPv6 translation; classified by the low 32 bits",
    ),
    _v6("100::/64", DISCARD, "RFC 6666: discard-only"),
    _v6("2001::/23", PROTOCOL_ASSIGNMENTS, "RFC 2928, RFC 6890 2.2: IETF protocol assignments"),
    _v6(
        "2001::/32",
        TRANSLATION,
        "RFC 4380: Teredo; classified by the client IPv4 (NOT of the low 32 bits)",
    ),
    _v6("2001:2::/48", BENCHMARKING, "RFC 5180: benchmarking"),
    _v6("2001:10::/28", RESERVED, "RFC 4843: ORCHID (deprecated)"),
    _v6("2001:20::/28", RESERVED, "RFC 7343: ORCHIDv2 identifiers, not locators"),
    _v6("2001:db8::/32", DOCUMENTATION, "RFC 3849: documentation"),
    _v6("2002::/16", TRANSLATION, "RFC 3056: 6to4; classified by the embedded IPv4 (bits 16-47)"),
    _v6("3fff::/20", DOCUMENTATION, "RFC 9637: documentation"),
    _v6("5f00::/16", RESERVED, "RFC 9602: SRv6 SIDs, not destinations"),
    _v6("fc00::/7", ULA, "RFC 4193: unique local"),
    _v6("fe80::/10", LINK_LOCAL, "RFC 4291 2.5.6: link-local unicast"),
    _v6("fec0::/10", SITE_LOCAL, "RFC 3879: site-local (deprecated)"),
    _v6("ff00::/8", MULTICAST, "RFC 4291 2.7: multicast"),
    # ---- IPv6 cloud metadata endpoints
    _v6("fd00:ec2::254/128", METADATA, "AWS instance metadata service over IPv6 (Nitro)"),
    _v6("fd00:ec2::23/128", METADATA, "AWS EKS Pod Identity Agent credentials endpoint (IPv6)"),
    # ---- IPv6 space outside 2000::/3 that IANA has not allocated
    _v6("::/8", RESERVED, _IETF_RESERVED_V6),
    _v6("100::/8", RESERVED, _IETF_RESERVED_V6),
    _v6("200::/7", RESERVED, _IETF_RESERVED_V6),
    _v6("400::/6", RESERVED, _IETF_RESERVED_V6),
    _v6("800::/5", RESERVED, _IETF_RESERVED_V6),
    _v6("1000::/4", RESERVED, _IETF_RESERVED_V6),
    _v6("4000::/3", RESERVED, _IETF_RESERVED_V6),
    _v6("6000::/3", RESERVED, _IETF_RESERVED_V6),
    _v6("8000::/3", RESERVED, _IETF_RESERVED_V6),
    _v6("a000::/3", RESERVED, _IETF_RESERVED_V6),
    _v6("c000::/3", RESERVED, _IETF_RESERVED_V6),
    _v6("e000::/4", RESERVED, _IETF_RESERVED_V6),
    _v6("f000::/5", RESERVED, _IETF_RESERVED_V6),
    _v6("f800::/6", RESERVED, _IETF_RESERVED_V6),
    _v6("fe00::/9", RESERVED, _IETF_RESERVED_V6),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the table says about one address.

    ``category`` is ``None`` when the address is globally routable as far as the table
    knows. ``embedded`` is the IPv4 address carried inside an IPv4-mapped, NAT64, 6to4
    or Teredo address (whatever its category), else ``None``.
    """

    address: IPv4Address | IPv6Address
    category: str | None
    note: str
    embedded: IPv4Address | None


# ---------------------------------------------------------------------------------------
# Longest-prefix index over TABLE: per IP version, (mask, {network int: entry}) pairs
# ordered from the longest prefix to the shortest.

_Index = tuple[tuple[int, dict[int, SpecialRange]], ...]


def _build_index(version: int) -> _Index:
    by_length: dict[int, dict[int, SpecialRange]] = {}
    for entry in TABLE:
        if entry.category not in CATEGORIES or entry.category == SELF:
            raise RuntimeError(f"special table: bad category {entry.category!r}")
        if not entry.note:
            raise RuntimeError(f"special table: {entry.network} has no note")
        net = entry.network
        if net.version != version:
            continue
        slot = by_length.setdefault(net.prefixlen, {})
        key = int(net.network_address)
        if key in slot:
            raise RuntimeError(f"special table: {net} listed twice")
        slot[key] = entry
    return tuple(
        (_mask(version, length), slot) for length, slot in sorted(by_length.items(), reverse=True)
    )


def _mask(version: int, length: int) -> int:
    bits = 32 if version == 4 else 128
    return ((1 << length) - 1) << (bits - length)


_INDEX_V4 = _build_index(4)
_INDEX_V6 = _build_index(6)


def _lookup(address: IPAddress) -> SpecialRange | None:
    index = _INDEX_V4 if address.version == 4 else _INDEX_V6
    value = int(address)
    for mask, slot in index:
        entry = slot.get(value & mask)
        if entry is not None:
            return entry
    return None


# ---------------------------------------------------------------------------------------
# IPv4 embedded in IPv6.


@dataclass(frozen=True, slots=True)
class _Embedding:
    network: IPv6Network
    extract: Callable[[int], int]
    # Category of the whole address when the embedded IPv4 is globally routable.
    if_global: str | None
    name: str


_LOW32 = 0xFFFF_FFFF


def _low32(value: int) -> int:
    return value & _LOW32


def _six_to_four(value: int) -> int:
    return (value >> 80) & _LOW32


def _teredo_client(value: int) -> int:
    return ~value & _LOW32


# Most specific first: 64:ff9b:1::/96 must be tried before 64:ff9b:1::/48.
_EMBEDDINGS: tuple[_Embedding, ...] = (
    _Embedding(IPv6Network("::ffff:0:0/96"), _low32, None, "IPv4-mapped"),
    _Embedding(IPv6Network("64:ff9b::/96"), _low32, None, "NAT64 64:ff9b::/96"),
    _Embedding(IPv6Network("64:ff9b:1::/96"), _low32, None, "local-use NAT64 64:ff9b:1::/96"),
    _Embedding(
        IPv6Network("64:ff9b:1::/48"), _low32, TRANSLATION, "local-use translation 64:ff9b:1::/48"
    ),
    _Embedding(IPv6Network("2001::/32"), _teredo_client, TRANSLATION, "Teredo client"),
    _Embedding(IPv6Network("2002::/16"), _six_to_four, TRANSLATION, "6to4"),
)


def _embedding(address: IPv6Address) -> tuple[_Embedding, IPv4Address] | None:
    value = int(address)
    for emb in _EMBEDDINGS:
        net = emb.network
        if value & int(net.netmask) == int(net.network_address):
            return emb, IPv4Address(emb.extract(value))
    return None


# ---------------------------------------------------------------------------------------
# Public API.


def classify(address: IPv4Address | IPv6Address) -> Verdict:
    """Classify one address against :data:`TABLE` (see the module docstring).

    Longest prefix wins; IPv4-mapped, NAT64, 6to4 and Teredo addresses are classified
    by the IPv4 address they carry. Never raises for any ``IPv4Address``/``IPv6Address``.
    """
    if isinstance(address, IPv6Address):
        found = _embedding(address)
        if found is not None:
            emb, inner = found
            inner_entry = _lookup(inner)
            if inner_entry is not None:
                note = f"{emb.name} embeds {inner}: {inner_entry.note}"
                return Verdict(address, inner_entry.category, note, inner)
            if emb.if_global is None:
                note = f"{emb.name} embeds {inner}, globally routable"
            else:
                note = f"{emb.name} embeds {inner}, globally routable; the embedding is refused"
            return Verdict(address, emb.if_global, note, inner)
    entry = _lookup(address)
    if entry is None:
        return Verdict(address, None, "no special-purpose range: globally routable", None)
    return Verdict(address, entry.category, entry.note, None)


def is_refused(verdict: Verdict, allowed_categories: frozenset[str] = frozenset()) -> bool:
    """True if the DMZ must not dial ``verdict.address``.

    Refused unless the category is ``None`` or listed in ``allowed_categories``.
    Categories in :data:`NEVER_ALLOWED` (``metadata``) are refused even when listed.
    """
    category = verdict.category
    if category is None:
        return False
    if category in NEVER_ALLOWED:
        return True
    return category not in allowed_categories


def _plain(address: IPAddress) -> IPAddress:
    """The address without IPv6 zone id, IPv4-mapped addresses as IPv4."""
    if isinstance(address, IPv4Address):
        return address
    value = int(address)
    if value >> 32 == 0xFFFF:
        return IPv4Address(value & _LOW32)
    return IPv6Address(value)


def classify_with_self(
    address: IPv4Address | IPv6Address, self_addresses: Iterable[IPv4Address | IPv6Address]
) -> Verdict:
    """:func:`classify`, but category ``self`` for one of the DMZ's own addresses.

    ``self_addresses`` are the addresses the DMZ listens on (a wildcard listener must be
    expanded to the host's addresses by the caller). Matching ignores IPv6 zone ids and
    treats an IPv4-mapped address as its IPv4 address; an address whose embedded IPv4
    (NAT64, 6to4, Teredo) is one of ours also counts, as the translator would loop back.
    ``self`` wins over every table category except ``metadata``, so the never-allowed
    guarantee of :func:`is_refused` holds here too.
    """
    verdict = classify(address)
    if verdict.category == METADATA:
        return verdict
    targets: set[IPAddress] = {_plain(address)}
    if verdict.embedded is not None:
        targets.add(verdict.embedded)
    for own in self_addresses:
        if _plain(own) in targets:
            return Verdict(
                address, SELF, "one of this proxy's own listening addresses", verdict.embedded
            )
    return verdict
