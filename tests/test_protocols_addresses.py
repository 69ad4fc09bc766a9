"""host:port text and wire host names (pyegress.protocols.addresses)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from pyegress.errors import SOCKS5_GENERAL_FAILURE, LocalProtocolError
from pyegress.protocols.addresses import (
    decode_host_name,
    is_ip_literal,
    join_host_port,
    split_host_port,
)

FUZZ = settings(max_examples=250, deadline=None)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("example.com:443", None, ("example.com", 443)),
        ("Example.COM:80", None, ("Example.COM", 80)),
        ("10.0.0.1:8080", None, ("10.0.0.1", 8080)),
        ("[::1]:8080", None, ("::1", 8080)),
        ("[2001:DB8::1]:1", None, ("2001:DB8::1", 1)),
        ("[::1]", 443, ("::1", 443)),
        ("example.com", 80, ("example.com", 80)),
        ("::1", 80, ("::1", 80)),
        ("fe80::1%eth0", 80, ("fe80::1%eth0", 80)),
        ("[fe80::1%eth0]:22", None, ("fe80::1%eth0", 22)),
        ("host:65535", None, ("host", 65535)),
        ("host:00080", None, ("host", 80)),
        ("host:443", 80, ("host", 443)),
    ],
)
def test_split_host_port_examples(
    text: str, default: int | None, expected: tuple[str, int]
) -> None:
    assert split_host_port(text, default) == expected


@pytest.mark.parametrize(
    ("text", "default", "named"),
    [
        ("example.com", None, "missing port"),
        ("[::1]", None, "missing port"),
        ("host:", None, "''"),
        ("host:0", None, "0"),
        ("host:65536", None, "65536"),
        ("host:+80", None, "'+80'"),
        ("host:-1", None, "'-1'"),
        ("host: 80", None, "' 80'"),
        ("host:8 0", None, "'8 0'"),
        ("host:abc", None, "'abc'"),
        ("host:\u0663", None, "'\u0663'"),  # ARABIC-INDIC DIGIT THREE
        ("host:" + "9" * 5000, None, "invalid port"),
        (":80", None, "empty host"),
        ("", 80, "empty host"),
        ("a b:80", None, "' '"),
        ("a\tb", 80, "'\\t'"),
        ("a/b:80", None, "'/'"),
        ("user@host:80", None, "'@'"),
        ("ho\x00st:80", None, "'\\x00'"),
        ("ho\x7fst:80", None, "'\\x7f'"),
        ("[::1", None, "unterminated"),
        ("[example.com]:80", None, "'example.com'"),
        ("[::1]80", None, "'80'"),
        ("[::1]:", None, "''"),
        ("[fe80::1%a b]:80", None, "IPv6"),
        ("::1", None, "brackets"),
        ("::1:80", None, "brackets"),
        ("a:b:c", 80, "brackets"),
    ],
)
def test_split_host_port_errors(text: str, default: int | None, named: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        split_host_port(text, default)
    assert named in str(info.value)
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("example.com", 443, "example.com:443"),
        ("10.0.0.1", 80, "10.0.0.1:80"),
        ("::1", 8080, "[::1]:8080"),
        ("fe80::1%eth0", 22, "[fe80::1%eth0]:22"),
    ],
)
def test_join_host_port(host: str, port: int, expected: str) -> None:
    assert join_host_port(host, port) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.1", True),
        ("::1", True),
        ("2001:db8::1", True),
        ("fe80::1%eth0", True),
        ("example.com", False),
        ("[::1]", False),
        ("10.0.0.1:80", False),
        ("010.0.0.1", False),
        ("fe80::1%a b", False),
        ("", False),
    ],
)
def test_is_ip_literal(host: str, expected: bool) -> None:
    assert is_ip_literal(host) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"example.com", "example.com"),
        (b"Example.COM", "Example.COM"),
        (b"10.0.0.1", "10.0.0.1"),
        (b"::1", "::1"),
        (b"[::1]", "::1"),
        (b"xn--bcher-kva.de", "xn--bcher-kva.de"),
        (b"under_score-1", "under_score-1"),
    ],
)
def test_decode_host_name(raw: bytes, expected: str) -> None:
    assert decode_host_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"", "empty"),
        (b"a b", "0x20"),
        (b"a/b", "0x2f"),
        (b"a\\b", "0x5c"),
        (b"user@host", "0x40"),
        (b"a\x00b", "0x00"),
        (b"\x7f", "0x7f"),
        (b"b\xc3\xbccher.de", "punycode"),
        (b"[example.com]", "brackets"),
        (b"a]b", "brackets"),
    ],
)
def test_decode_host_name_errors(raw: bytes, named: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        decode_host_name(raw, socks5_reply=SOCKS5_GENERAL_FAILURE)
    assert named in str(info.value)
    assert info.value.socks5_reply == SOCKS5_GENERAL_FAILURE


@FUZZ
@given(st.text(max_size=60), st.one_of(st.none(), st.integers(1, 65535)))
def test_split_host_port_fuzz(text: str, default: int | None) -> None:
    try:
        host, port = split_host_port(text, default)
    except LocalProtocolError:
        return
    assert host
    assert 1 <= port <= 65535
    assert not any(ch.isspace() or ch in "/@[]" for ch in host)


@FUZZ
@given(
    st.one_of(domains(), st.ip_addresses().map(str)),
    st.integers(1, 65535),
)
def test_join_split_round_trip(host: str, port: int) -> None:
    assert split_host_port(join_host_port(host, port)) == (host, port)
    assert split_host_port(join_host_port(host, port), 1) == (host, port)


@FUZZ
@given(st.ip_addresses())
def test_is_ip_literal_accepts_every_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert is_ip_literal(str(address))
    assert is_ip_literal(address.exploded)


@FUZZ
@given(domains())
def test_domains_are_not_ip_literals(name: str) -> None:
    assert not is_ip_literal(name)
    assert decode_host_name(name.encode("ascii")) == name


@FUZZ
@given(st.binary(max_size=64))
def test_decode_host_name_fuzz(raw: bytes) -> None:
    try:
        text = decode_host_name(raw)
    except LocalProtocolError:
        return
    assert text
    assert text.isascii()
    assert not any(ch in " /\\@\x00" for ch in text)
