"""The special-purpose address table and its classifier (pyegress.policy.special)."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyegress.policy.special import (
    CATEGORIES,
    METADATA,
    NEVER_ALLOWED,
    SELF,
    TABLE,
    TRANSLATION,
    Verdict,
    classify,
    classify_with_self,
    is_refused,
)

FUZZ = settings(max_examples=500, deadline=None)


def teredo(client: str, server: str = "65.54.227.120") -> str:
    """A Teredo address (RFC 4380 section 4) for a client IPv4, flags 0x8000, port 40000."""
    value = (
        0x2001_0000 << 96
        | int(IPv4Address(server)) << 64
        | 0x8000 << 48
        | (~40000 & 0xFFFF) << 32
        | (~int(IPv4Address(client)) & 0xFFFF_FFFF)
    )
    return str(IPv6Address(value))


def six_to_four(v4: str) -> str:
    return str(IPv6Address(0x2002 << 112 | int(IPv4Address(v4)) << 80 | 1))


CASES: list[tuple[str, str | None]] = [
    # globally routable controls
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("93.184.216.34", None),
    ("2606:4700::1111", None),
    ("2a00:1450:4001:80b::200e", None),
    ("2000::", None),
    # 0.0.0.0/8 and 0.0.0.0/32
    ("0.0.0.0", "unspecified"),
    ("0.0.0.1", "this_network"),
    ("0.255.255.255", "this_network"),
    ("1.0.0.0", None),
    # 10/8
    ("9.255.255.255", None),
    ("10.0.0.0", "private"),
    ("10.255.255.255", "private"),
    ("11.0.0.0", None),
    # 100.64/10 and Alibaba metadata inside it
    ("100.63.255.254", None),
    ("100.63.255.255", None),
    ("100.64.0.0", "cgnat"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.255", "cgnat"),
    ("100.128.0.0", None),
    ("100.128.0.1", None),
    ("100.100.100.199", "cgnat"),
    ("100.100.100.200", "metadata"),
    ("100.100.100.201", "cgnat"),
    # 127/8
    ("126.255.255.255", None),
    ("127.0.0.0", "loopback"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("127.255.255.255", "loopback"),
    ("128.0.0.0", None),
    # 169.254/16 and the metadata addresses inside it
    ("169.253.255.255", None),
    ("169.254.0.0", "link_local"),
    ("169.254.169.253", "link_local"),
    ("169.254.169.254", "metadata"),
    ("169.254.169.255", "link_local"),
    ("169.254.170.1", "link_local"),
    ("169.254.170.2", "metadata"),
    ("169.254.170.3", "link_local"),
    ("169.254.170.23", "metadata"),
    ("169.254.255.255", "link_local"),
    ("169.255.0.0", None),
    # Azure WireServer: a public address refused as metadata
    ("168.63.129.15", None),
    ("168.63.129.16", "metadata"),
    ("168.63.129.17", None),
    # 172.16/12
    ("172.15.255.255", None),
    ("172.16.0.0", "private"),
    ("172.31.255.255", "private"),
    ("172.32.0.0", None),
    # 192.0.0/24 with Oracle metadata, 192.0.2/24
    ("191.255.255.255", None),
    ("192.0.0.0", "protocol_assignments"),
    ("192.0.0.9", "protocol_assignments"),
    ("192.0.0.191", "protocol_assignments"),
    ("192.0.0.192", "metadata"),
    ("192.0.0.193", "protocol_assignments"),
    ("192.0.0.255", "protocol_assignments"),
    ("192.0.1.0", None),
    ("192.0.2.0", "documentation"),
    ("192.0.2.255", "documentation"),
    ("192.0.3.0", None),
    # 192.88.99/24
    ("192.88.98.255", None),
    ("192.88.99.0", "reserved"),
    ("192.88.99.255", "reserved"),
    ("192.88.100.0", None),
    # 192.168/16
    ("192.167.255.255", None),
    ("192.168.0.0", "private"),
    ("192.168.255.255", "private"),
    ("192.169.0.0", None),
    # 198.18/15
    ("198.17.255.255", None),
    ("198.18.0.0", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.20.0.0", None),
    # 198.51.100/24, 203.0.113/24
    ("198.51.99.255", None),
    ("198.51.100.0", "documentation"),
    ("198.51.100.255", "documentation"),
    ("198.51.101.0", None),
    ("203.0.112.255", None),
    ("203.0.113.0", "documentation"),
    ("203.0.113.255", "documentation"),
    ("203.0.114.0", None),
    # 224/4, 240/4, broadcast
    ("223.255.255.255", None),
    ("224.0.0.0", "multicast"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.255", "multicast"),
    ("240.0.0.0", "reserved"),
    ("255.255.255.254", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6 ::/128, ::1, IPv4-compatible ::/96, the rest of ::/8
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::2", "reserved"),
    ("::7f00:1", "reserved"),
    ("::808:808", "reserved"),
    ("::1:0:0", "reserved"),
    ("ff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    # IPv4-mapped
    ("::ffff:0.0.0.0", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:100.64.0.1", "cgnat"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:168.63.129.16", "metadata"),
    ("::ffff:255.255.255.255", "broadcast"),
    ("::ffff:8.8.8.8", None),
    ("::fffe:ffff:ffff", "reserved"),
    ("::1:0:0:0", "reserved"),
    # NAT64 well-known prefix
    ("64:ff9b::a9fe:a9fe", "metadata"),
    ("64:ff9b::a00:1", "private"),
    ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b::a8:3f81:10", "reserved"),  # outside the /96, inside ::/8
    ("64:ff9b::ffff:ffff", "broadcast"),
    ("64:ff9b::808:808", None),
    ("64:ff9b::101:101", None),
    # NAT64 local-use prefix
    ("64:ff9b:1::808:808", None),
    ("64:ff9b:1::a00:1", "private"),
    ("64:ff9b:1::a9fe:a9fe", "metadata"),
    ("64:ff9b:1:abcd::808:808", "translation"),
    ("64:ff9b:1:7f00:0:100:808:808", "translation"),
    ("64:ff9b:1:abcd::a00:1", "private"),
    ("64:ff9b:2::808:808", "reserved"),
    # 6to4
    ("2002:a9fe:a9fe::1", "metadata"),
    ("2002:a00:1::1", "private"),
    ("2002:7f00:1::", "loopback"),
    ("2002:c058:6301::1", "reserved"),
    ("2002:808:808::1", "translation"),
    ("2002::1", "unspecified"),
    ("2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("2003::1", None),
    # Teredo
    (teredo("127.0.0.1"), "loopback"),
    (teredo("10.0.0.1"), "private"),
    (teredo("169.254.169.254"), "metadata"),
    (teredo("8.8.8.8"), "translation"),
    ("2001:0:5ef5:79fd::1234:80ff:fffe", "loopback"),  # written by hand: NOT 7f00:0001
    # IETF protocol assignments 2001::/23 and what is inside
    ("2001:1::1", "protocol_assignments"),
    ("2001:2::1", "benchmarking"),
    ("2001:2:1::", "protocol_assignments"),
    ("2001:3::1", "protocol_assignments"),
    ("2001:10::1", "reserved"),
    ("2001:1f:ffff::1", "reserved"),
    ("2001:20::1", "reserved"),
    ("2001:2f:ffff::1", "reserved"),
    ("2001:30::1", "protocol_assignments"),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", "protocol_assignments"),
    ("2001:200::1", None),
    # documentation
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("2001:db8::", "documentation"),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
    ("2001:db9::", None),
    ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("3fff::", "documentation"),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
    ("3fff:1000::", None),
    # discard, SRv6, unallocated space
    ("100::", "discard"),
    ("100::ffff:ffff:ffff:ffff", "discard"),
    ("100:0:0:1::", "reserved"),
    ("5eff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("5f00::1", "reserved"),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("4000::1", "reserved"),
    ("e000::1", "reserved"),
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    # ULA with the AWS metadata addresses
    ("fc00::", "ula"),
    ("fd00::1", "ula"),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "ula"),
    ("fd00:ec2::253", "ula"),
    ("fd00:ec2::254", "metadata"),
    ("fd00:ec2::255", "ula"),
    ("fd00:ec2::23", "metadata"),
    # link-local, site-local, multicast
    ("fe00::1", "reserved"),
    ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("fe80::", "link_local"),
    ("fe80::1", "link_local"),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "link_local"),
    ("fec0::", "site_local"),
    ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "site_local"),
    ("ff00::", "multicast"),
    ("ff02::2", "multicast"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "multicast"),
]


@pytest.mark.parametrize(("text", "category"), CASES)
def test_classify_table(text: str, category: str | None) -> None:
    address = ipaddress.ip_address(text)
    verdict = classify(address)
    assert verdict.category == category
    assert verdict.address == address
    assert verdict.note
    assert is_refused(verdict) == (category is not None)


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({ipaddress.ip_address(text) for text, _ in CASES}) == len(CASES)


# Networks the table must contain, with their category.
REQUIRED: list[tuple[str, str]] = [
    ("0.0.0.0/8", "this_network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link_local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "protocol_assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    ("169.254.169.254/32", "metadata"),
    ("169.254.170.2/32", "metadata"),
    ("100.100.100.200/32", "metadata"),
    ("192.0.0.192/32", "metadata"),
    ("168.63.129.16/32", "metadata"),
    ("fd00:ec2::254/128", "metadata"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "translation"),
    ("::/96", "reserved"),
    ("64:ff9b::/96", "translation"),
    ("64:ff9b:1::/48", "translation"),
    ("100::/64", "discard"),
    ("2001::/32", "translation"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "translation"),
    ("fc00::/7", "ula"),
    ("fe80::/10", "link_local"),
    ("fec0::/10", "site_local"),
    ("ff00::/8", "multicast"),
    ("2001:10::/28", "reserved"),
    ("2001:20::/28", "reserved"),
    ("5f00::/16", "reserved"),
    ("3fff::/20", "documentation"),
]


@pytest.mark.parametrize(("cidr", "category"), REQUIRED)
def test_table_contains(cidr: str, category: str) -> None:
    network = ipaddress.ip_network(cidr)
    assert [e.category for e in TABLE if e.network == network] == [category]


def test_table_is_well_formed() -> None:
    networks = [entry.network for entry in TABLE]
    assert len(set(networks)) == len(networks)
    for entry in TABLE:
        assert isinstance(entry.network, IPv4Network | IPv6Network)
        assert entry.category in CATEGORIES
        assert entry.category != SELF
        assert entry.note.strip()


def test_every_table_network_classifies_at_both_ends() -> None:
    """First and last address of every non-embedding entry get the entry's category,
    unless a more specific entry covers them."""
    for entry in TABLE:
        if entry.category == TRANSLATION:
            continue
        for address in (entry.network.network_address, entry.network.broadcast_address):
            inner = [
                e
                for e in TABLE
                if e.network.version == address.version
                and address in e.network
                and e.network.prefixlen > entry.network.prefixlen
            ]
            if not inner:
                assert classify(address).category == entry.category, (entry, address)


def test_metadata_entries_are_single_addresses_that_win() -> None:
    metadata = [entry for entry in TABLE if entry.category == METADATA]
    assert len(metadata) >= 6
    for entry in metadata:
        assert entry.network.num_addresses == 1
        assert classify(entry.network.network_address).category == METADATA


def test_embedded_address_is_reported() -> None:
    verdict = classify(IPv6Address("64:ff9b::a9fe:a9fe"))
    assert verdict.embedded == IPv4Address("169.254.169.254")
    assert "169.254.169.254" in verdict.note
    assert classify(IPv6Address("::ffff:8.8.8.8")).embedded == IPv4Address("8.8.8.8")
    assert classify(IPv6Address(teredo("10.1.2.3"))).embedded == IPv4Address("10.1.2.3")
    assert classify(IPv6Address(six_to_four("1.2.3.4"))).embedded == IPv4Address("1.2.3.4")
    assert classify(IPv6Address("::7f00:1")).embedded is None
    assert classify(IPv4Address("127.0.0.1")).embedded is None
    assert classify(IPv6Address("2606:4700::1111")).embedded is None


def test_zone_id_does_not_change_the_verdict() -> None:
    assert classify(IPv6Address("fe80::1%eth0")).category == "link_local"
    assert classify(IPv6Address("::ffff:127.0.0.1%1")).category == "loopback"


# --- is_refused


@pytest.mark.parametrize(
    ("text", "allowed", "refused"),
    [
        ("8.8.8.8", frozenset(), False),
        ("8.8.8.8", frozenset({"private"}), False),
        ("10.0.0.1", frozenset(), True),
        ("10.0.0.1", frozenset({"private"}), False),
        ("10.0.0.1", frozenset({"cgnat"}), True),
        ("::ffff:10.0.0.1", frozenset({"private"}), False),
        ("2002:808:808::1", frozenset(), True),
        ("2002:808:808::1", frozenset({"translation"}), False),
        ("169.254.169.254", frozenset(), True),
        ("169.254.169.254", frozenset({"metadata"}), True),
        ("169.254.169.254", frozenset(CATEGORIES), True),
        ("64:ff9b::a9fe:a9fe", frozenset(CATEGORIES), True),
        ("168.63.129.16", frozenset({"metadata", "private"}), True),
        ("169.254.1.1", frozenset({"link_local"}), False),
    ],
)
def test_is_refused(text: str, allowed: frozenset[str], refused: bool) -> None:
    assert is_refused(classify(ipaddress.ip_address(text)), allowed) is refused


def test_metadata_is_never_allowed() -> None:
    assert METADATA in NEVER_ALLOWED
    verdict = Verdict(IPv4Address("1.2.3.4"), METADATA, "test", None)
    assert is_refused(verdict, frozenset({METADATA}))


# --- classify_with_self


OWN: list[IPv4Address | IPv6Address] = [
    IPv4Address("10.20.0.5"),
    IPv6Address("2001:db8:5::1"),
    IPv4Address("203.0.113.9"),
]


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("10.20.0.5", "self"),
        ("::ffff:10.20.0.5", "self"),
        ("2001:db8:5::1", "self"),
        ("2001:db8:5::1%eth0", "self"),
        ("203.0.113.9", "self"),
        ("64:ff9b::cb00:7109", "self"),  # NAT64 of 203.0.113.9 would loop back
        ("10.20.0.6", "private"),
        ("2001:db8:5::2", "documentation"),
        ("8.8.8.8", None),
    ],
)
def test_classify_with_self(text: str, category: str | None) -> None:
    verdict = classify_with_self(ipaddress.ip_address(text), OWN)
    assert verdict.category == category


def test_self_matches_mapped_listener_and_never_hides_metadata() -> None:
    own: list[IPv4Address | IPv6Address] = [
        IPv6Address("::ffff:192.168.1.1"),
        IPv4Address("169.254.169.254"),
    ]
    assert classify_with_self(IPv4Address("192.168.1.1"), own).category == SELF
    assert classify_with_self(IPv4Address("169.254.169.254"), own).category == METADATA
    assert classify_with_self(IPv4Address("1.1.1.1"), iter(own)).category is None
    assert classify_with_self(IPv4Address("1.1.1.1"), []).category is None


# --- properties

ipv4s = st.integers(0, 2**32 - 1).map(IPv4Address)
ipv6s = st.integers(0, 2**128 - 1).map(IPv6Address)


def _in(prefix: str) -> st.SearchStrategy[IPv6Address]:
    net = IPv6Network(prefix)
    base = int(net.network_address)
    return st.integers(0, net.num_addresses - 1).map(lambda n: IPv6Address(base | n))


interesting_v6 = st.one_of(
    ipv6s,
    _in("::/96"),
    _in("::ffff:0:0/96"),
    _in("64:ff9b::/96"),
    _in("64:ff9b:1::/48"),
    _in("2001::/32"),
    _in("2001::/23"),
    _in("2002::/16"),
    _in("fd00:ec2::/112"),
)


@FUZZ
@given(ipv4s)
def test_ipv4_and_its_mapped_form_agree(v4: IPv4Address) -> None:
    mapped = IPv6Address(0xFFFF << 32 | int(v4))
    plain, via_mapped = classify(v4), classify(mapped)
    assert via_mapped.category == plain.category
    assert via_mapped.embedded == v4
    assert via_mapped.address == mapped


@FUZZ
@given(st.one_of(ipv4s, interesting_v6))
def test_classify_never_raises(address: IPv4Address | IPv6Address) -> None:
    verdict = classify(address)
    assert verdict.category is None or verdict.category in CATEGORIES
    assert verdict.category != SELF
    assert isinstance(verdict.note, str)
    assert isinstance(is_refused(verdict), bool)


@FUZZ
@given(ipv4s)
def test_nat64_follows_the_embedded_address(v4: IPv4Address) -> None:
    verdict = classify(IPv6Address(0x64_FF9B << 96 | int(v4)))
    assert verdict.category == classify(v4).category
    assert verdict.embedded == v4


@FUZZ
@given(ipv4s, st.integers(0, 2**80 - 1))
def test_tunnels_refuse_even_global_embedded(v4: IPv4Address, low: int) -> None:
    plain = classify(v4).category
    via_6to4 = classify(IPv6Address(0x2002 << 112 | int(v4) << 80 | low))
    via_teredo = classify(
        IPv6Address(0x2001_0000 << 96 | (low & (2**64 - 1)) << 32 | (~int(v4) & 0xFFFF_FFFF))
    )
    expected = plain if plain is not None else TRANSLATION
    assert via_6to4.category == expected
    assert via_teredo.category == expected
    assert via_6to4.embedded == v4 == via_teredo.embedded


@FUZZ
@given(ipv4s)
def test_refusal_of_embeddings_is_never_weaker(v4: IPv4Address) -> None:
    """Any embedding of a refused IPv4 address is refused under the same allowances."""
    if not is_refused(classify(v4)):
        return
    for value in (
        0xFFFF << 32 | int(v4),
        0x64_FF9B << 96 | int(v4),
        0x64_FF9B_0001 << 80 | int(v4),
        0x2002 << 112 | int(v4) << 80,
        0x2001_0000 << 96 | (~int(v4) & 0xFFFF_FFFF),
    ):
        assert is_refused(classify(IPv6Address(value)))
