"""Destination patterns and port sets of the policy grammar (pyegress.policy.patterns)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyegress.policy.patterns import (
    ANY_PORT,
    DEFAULT_PORTS,
    PatternError,
    PortSet,
    normalize_name,
    parse_pattern,
    parse_port_range,
    port_set,
    unmap,
)

FUZZ = settings(max_examples=300, deadline=None)

# (pattern text, kind, canonical text, base name or "", port suffix or None)
VALID: list[tuple[str, str, str, str, str | None]] = [
    ("example.com", "exact", "example.com", "example.com", None),
    ("localhost", "exact", "localhost", "localhost", None),
    ("EXAMPLE.Com", "exact", "example.com", "example.com", None),
    ("example.com.", "exact", "example.com", "example.com", None),
    ("_dmarc.example.com", "exact", "_dmarc.example.com", "_dmarc.example.com", None),
    ("*.example.com", "subdomains", "*.example.com", "example.com", None),
    ("*.Example.COM.", "subdomains", "*.example.com", "example.com", None),
    (".example.com", "suffix", ".example.com", "example.com", None),
    ("*.co.uk", "subdomains", "*.co.uk", "co.uk", None),
    ("api.example.com:8443", "exact", "api.example.com:8443", "api.example.com", "8443"),
    (".example.com:80-443", "suffix", ".example.com:80-443", "example.com", "80-443"),
    ("*.example.com:443", "subdomains", "*.example.com:443", "example.com", "443"),
    ("bücher.example", "exact", "xn--bcher-kva.example", "xn--bcher-kva.example", None),
    ("*.BÜCHER.example", "subdomains", "*.xn--bcher-kva.example", "xn--bcher-kva.example", None),
    (".xn--bcher-kva.example", "suffix", ".xn--bcher-kva.example", "xn--bcher-kva.example", None),
    ("10-20.example.com", "exact", "10-20.example.com", "10-20.example.com", None),
    ("1e100.net", "exact", "1e100.net", "1e100.net", None),
    ("10.0.0.1", "network", "10.0.0.1", "", None),
    ("10.0.0.1:22", "network", "10.0.0.1:22", "", "22"),
    ("10.0.0.0/8", "network", "10.0.0.0/8", "", None),
    ("10.0.0.0/8:80-90", "network", "10.0.0.0/8:80-90", "", "80-90"),
    ("0.0.0.0/0", "network", "0.0.0.0/0", "", None),
    ("::1", "network", "::1", "", None),
    ("2001:DB8::1", "network", "2001:db8::1", "", None),
    ("[2001:db8::1]", "network", "2001:db8::1", "", None),
    ("[2001:db8::1]:443", "network", "[2001:db8::1]:443", "", "443"),
    ("2001:db8::/32", "network", "2001:db8::/32", "", None),
    ("[2001:db8::/32]:8000-8999", "network", "[2001:db8::/32]:8000-8999", "", "8000-8999"),
    ("::ffff:10.0.0.1", "network", "10.0.0.1", "", None),
    ("::ffff:10.0.0.0/104", "network", "10.0.0.0/8", "", None),
    ("[::ffff:10.0.0.1]:22", "network", "10.0.0.1:22", "", "22"),
    ("10.0.0.1-10.0.0.9", "range", "10.0.0.1-10.0.0.9", "", None),
    ("10.0.0.1-10.0.0.9:22", "range", "10.0.0.1-10.0.0.9:22", "", "22"),
    ("10.0.0.5-10.0.0.5", "range", "10.0.0.5-10.0.0.5", "", None),
    ("2001:db8::1-2001:db8::ff", "range", "2001:db8::1-2001:db8::ff", "", None),
]


@pytest.mark.parametrize(("text", "kind", "canonical", "name", "ports"), VALID)
def test_valid_patterns(text: str, kind: str, canonical: str, name: str, ports: str | None) -> None:
    pattern = parse_pattern(text)
    assert pattern.kind == kind
    assert pattern.text == canonical
    assert pattern.name == name
    assert (str(pattern.ports) if pattern.ports is not None else None) == ports
    assert pattern.is_name == (kind in ("exact", "subdomains", "suffix"))


def test_ip_pattern_bounds() -> None:
    net = parse_pattern("192.168.0.0/16")
    assert (net.version, net.prefixlen) == (4, 16)
    assert net.first == int(IPv4Address("192.168.0.0"))
    assert net.last == int(IPv4Address("192.168.255.255"))
    single = parse_pattern("2001:db8::1")
    assert (single.version, single.prefixlen, single.first, single.last) == (
        6,
        128,
        int(IPv6Address("2001:db8::1")),
        int(IPv6Address("2001:db8::1")),
    )
    rng = parse_pattern("10.0.0.1-10.0.0.9")
    assert (rng.first, rng.last) == (int(IPv4Address("10.0.0.1")), int(IPv4Address("10.0.0.9")))


# (pattern text, fragment of the reason)
INVALID: list[tuple[str, str]] = [
    ("", "empty pattern"),
    ("*", "every host"),
    ("*.", "every host"),
    (".", "every host"),
    ("**.example.com", "leftmost label"),
    ("*example.com", "leftmost label"),
    ("a*b.com", "leftmost label"),
    ("a.*.com", "leftmost label"),
    ("a.*.test", "leftmost label"),
    ("*.*.example.com", "leftmost label"),
    ("example.*", "leftmost label"),
    ("*.com", "top-level domain"),
    ("*.test", "top-level domain"),
    (".com", "top-level domain"),
    ("*.com.", "top-level domain"),
    ("ex?mple.com", "glob"),
    ("a..example.com", "empty label"),
    ("example.com..", "empty label"),
    (".example.com.:443x", "not a number"),
    ("x" * 64 + ".example.com", "label longer than 63"),
    (".".join(["a" * 60] * 5), "longer than 253"),
    ("exa mple.com", "whitespace"),
    ("example.com\n", "whitespace"),
    ("ex@mple.com", "invalid character '@'"),
    ("ex!ample.com", "invalid character '!'"),
    ("\u2603\u2603.example\ufffd", "IDNA"),
    ("example.com:0", "out of range"),
    ("example.com:65536", "out of range"),
    ("example.com:-1", "not a number"),
    ("example.com:http", "not a number"),
    ("example.com:443-80", "empty"),
    ("example.com:", "not a number"),
    (":443", "no host"),
    ("10.0.0.1/8", "host bits set (the network is 10.0.0.0/8)"),
    ("2001:db8::1/32", "host bits set (the network is 2001:db8::/32)"),
    ("10.0.0.0/33", "prefix length out of range"),
    ("10.0.0.0/x", "prefix length must be a number"),
    ("10.0.0.0/255.0.0.0", "prefix length must be a number"),
    ("example.com/8", "not an IP address"),
    ("10.0.0.256", "not a valid IP address"),
    ("1.2.3.4.5", "not a valid IP address"),
    ("127.1", "non-canonical form (write 127.0.0.1)"),
    ("0x7f.0.0.1", "non-canonical form (write 127.0.0.1)"),
    ("2130706433", "non-canonical form (write 127.0.0.1)"),
    ("*.10.0.0.1", "wildcard cannot apply to an IP address"),
    ("10.0.0.9-10.0.0.1", "range is empty"),
    ("10.0.0.1-2001:db8::1", "mixes IPv4 and IPv6"),
    ("2001:db8::1-zz", "invalid IPv6 address range"),
    ("fe80::1%eth0", "zone"),
    ("2001:db8::g", "invalid IPv6 address"),
    ("[1.2.3.4]", "brackets"),
    ("[example.com]:443", "brackets"),
    ("[2001:db8::1", "without a closing"),
    ("[2001:db8::1]443", "expected ':port'"),
    ("2001:db8::1]", "stray bracket"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID)
def test_invalid_patterns(text: str, fragment: str) -> None:
    with pytest.raises(PatternError) as info:
        parse_pattern(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(443, (443, 443)), ("443", (443, 443)), ("80-443", (80, 443)), ("1-65535", (1, 65535))],
)
def test_port_ranges(value: int | str, expected: tuple[int, int]) -> None:
    assert parse_port_range(value) == expected


@pytest.mark.parametrize(
    "value", [0, 65536, -1, True, "0", "65536", "x", "", "80-", "-80", "443-80", "+1", "1_0"]
)
def test_bad_port_ranges(value: int | str) -> None:
    with pytest.raises(PatternError):
        parse_port_range(value)


def test_port_sets() -> None:
    ports = port_set([(8000, 8999), (443, 443), (444, 445), (22, 22)])
    assert ports.ranges == ((22, 22), (443, 445), (8000, 8999))
    assert str(ports) == "22,443-445,8000-8999"
    assert 444 in ports
    assert 446 not in ports
    assert 443 in DEFAULT_PORTS
    assert 80 not in DEFAULT_PORTS
    assert 1 in ANY_PORT
    assert 65535 in ANY_PORT
    assert 0 not in ANY_PORT
    assert 65536 not in ANY_PORT
    assert PortSet(()).ranges == ()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("B\u00fccher.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("\uff41\uff42\uff43.com", "abc.com"),  # fullwidth letters, folded by nameprep
        ("", None),
        (".", None),
        ("\u2603" * 70 + ".com", None),  # label too long for IDNA
        ("a" * 254, None),
    ],
)
def test_normalize_name(name: str, expected: str | None) -> None:
    assert normalize_name(name) == expected


def test_unmap() -> None:
    assert unmap(IPv6Address("::ffff:10.0.0.1")) == IPv4Address("10.0.0.1")
    assert unmap(IPv6Address("2001:db8::1")) == IPv6Address("2001:db8::1")
    assert unmap(IPv4Address("10.0.0.1")) == IPv4Address("10.0.0.1")


@FUZZ
@given(st.text(max_size=40))
def test_parse_pattern_only_raises_pattern_error(text: str) -> None:
    try:
        pattern = parse_pattern(text)
    except PatternError:
        return
    # Whatever is accepted has a canonical text that parses to the same pattern.
    assert parse_pattern(pattern.text) == pattern
