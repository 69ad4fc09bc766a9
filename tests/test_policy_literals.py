"""IP literals in every spelling (pyegress.policy.literals)."""

from __future__ import annotations

import socket
import sys
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyegress.errors import SOCKS5_GENERAL_FAILURE, LocalProtocolError
from pyegress.policy.literals import canonical, parse_host_literal
from pyegress.policy.special import classify

FUZZ = settings(max_examples=500, deadline=None)

LOOPBACK = IPv4Address("127.0.0.1")
METADATA = IPv4Address("169.254.169.254")


def fullwidth(text: str) -> str:
    """The fullwidth (U+FF01..U+FF5E) spelling of printable ASCII text."""
    return "".join(chr(ord(ch) + 0xFEE0) for ch in text)


# (host, expected address); None = a DNS name.
VALID: list[tuple[str, IPv4Address | IPv6Address | None]] = [
    # dotted decimal
    ("127.0.0.1", LOOPBACK),
    ("1.2.3.4", IPv4Address("1.2.3.4")),
    ("0.0.0.0", IPv4Address("0.0.0.0")),
    ("255.255.255.255", IPv4Address("255.255.255.255")),
    ("169.254.169.254", METADATA),
    # trailing dot
    ("127.0.0.1.", LOOPBACK),
    ("2130706433.", LOOPBACK),
    ("0x7f.1.", LOOPBACK),
    # inet_aton short forms: the last part fills the remaining bytes
    ("127.1", LOOPBACK),
    ("127.0.1", LOOPBACK),
    ("169.16689662", METADATA),
    ("169.254.43518", METADATA),
    ("2130706433", LOOPBACK),
    ("2852039166", METADATA),
    ("4294967295", IPv4Address("255.255.255.255")),
    ("0", IPv4Address("0.0.0.0")),
    ("00", IPv4Address("0.0.0.0")),
    ("1", IPv4Address("0.0.0.1")),
    # hexadecimal, any case
    ("0x7f.1", LOOPBACK),
    ("0X7F.1", LOOPBACK),
    ("0x7f000001", LOOPBACK),
    ("0X7F000001", LOOPBACK),
    ("0xA9FEA9FE", METADATA),
    ("0xa9.0xfe.0xa9.0xfe", METADATA),
    ("0x0", IPv4Address("0.0.0.0")),
    ("0xffffffff", IPv4Address("255.255.255.255")),
    ("0x00000000000000007f.1", LOOPBACK),
    # octal: a leading zero means octal
    ("017700000001", LOOPBACK),
    ("0177.0.0.1", LOOPBACK),
    ("0177.1", LOOPBACK),
    ("01.02.03.04", IPv4Address("1.2.3.4")),
    ("0251.0376.0251.0376", METADATA),
    ("037777777777", IPv4Address("255.255.255.255")),
    ("010.0.0.1", IPv4Address("8.0.0.1")),
    ("0000127.0.0.1", IPv4Address("87.0.0.1")),
    # mixed bases
    ("0x7f.0.0.01", LOOPBACK),
    ("0177.0x0.1", LOOPBACK),
    ("0xa9.254.0251.0xfe", METADATA),
    # IPv6, bracketed or not, with an embedded dotted quad
    ("::1", IPv6Address("::1")),
    ("[::1]", IPv6Address("::1")),
    ("::", IPv6Address("::")),
    ("[::]", IPv6Address("::")),
    ("[::ffff:127.0.0.1]", IPv6Address("::ffff:7f00:1")),
    ("::ffff:127.0.0.1", IPv6Address("::ffff:7f00:1")),
    ("::ffff:7f00:1", IPv6Address("::ffff:7f00:1")),
    ("::FFFF:7F00:1", IPv6Address("::ffff:7f00:1")),
    ("[2001:DB8::1]", IPv6Address("2001:db8::1")),
    ("fe80::1", IPv6Address("fe80::1")),
    ("64:ff9b::169.254.169.254", IPv6Address("64:ff9b::a9fe:a9fe")),
    ("0:0:0:0:0:ffff:127.0.0.1", IPv6Address("::ffff:7f00:1")),
    # names: the resolver decides
    ("localhost", None),
    ("localhost.", None),
    ("example.com", None),
    ("Example.COM.", None),
    ("1e100.net", None),
    ("123.example", None),
    ("0x7f.example", None),
    ("0xdeadbeef.com", None),
    ("127.0.0.1.example", None),
    ("1.2.3.4.nip.io", None),
    ("xn--nxasmq6b.example", None),
    ("a-1.b-2", None),
    ("café.example", None),
    ("例え.テスト", None),
    ("x0", None),
    ("00x1", None),
    ("0xx1", None),
    ("1.2.3.-1", None),
]

# (host, words the error message must contain)
MALFORMED: list[tuple[str, str]] = [
    ("", "empty"),
    (".", "empty label"),
    ("0x", "no hex digits"),
    ("0x.1", "no hex digits"),
    ("0x7f.0x", "no hex digits"),
    ("0x1g.1", "not a number"),
    ("example.123", "not a number"),
    ("example.0x7f", "not a number"),
    ("1.2.3.4.5", "at most 4"),
    ("1.2.3.4.5.", "at most 4"),
    ("256.1.1.1", "larger than 255"),
    ("999.1.1.1", "larger than 255"),
    ("1.256.1.1", "larger than 255"),
    ("1.2.3.256", "does not fit"),
    ("1.2.65536", "does not fit"),
    ("1.16777216", "does not fit"),
    ("4294967296", "does not fit in 32 bits"),
    ("999999999999", "out of range"),
    ("0x100000000", "out of range"),
    ("040000000000", "does not fit in 32 bits"),
    ("08.1.1.1", "not octal"),
    ("09", "not octal"),
    ("1.2.3.08", "not octal"),
    ("1..2", "not a number"),
    (".1", "not a number"),
    ("1.2.3.4..", "empty label"),
    ("a..b", "empty label"),
    (".example.com", "empty label"),
    ("[1.2.3.4]", "only enclose an IPv6"),
    ("[]", "only enclose an IPv6"),
    ("[example.com]", "only enclose an IPv6"),
    ("[::1", "brackets"),
    ("::1]", "brackets"),
    ("[[::1]]", "brackets"),
    ("[::1].", "brackets"),
    ("fe80::1%eth0", "zone"),
    ("[fe80::1%25eth0]", "zone"),
    ("127.0.0.1%20", "'%'"),
    ("1:2", "IPv6"),
    (":::", "IPv6"),
    ("1.2.3.4:80", "IPv6"),
    ("::ffff:127.1", "IPv6"),
    ("::ffff:0127.0.0.1", "IPv6"),
    ("::1.", "IPv6"),
    ("1::2::3", "IPv6"),
    ("g::1", "IPv6"),
    ("127.0.0.1 ", "whitespace"),
    (" 127.0.0.1", "whitespace"),
    ("127.0.0.1 x", "whitespace"),
    ("127.0.0.1\x00", "control"),
    ("127.0.0.1\t", "whitespace"),
    ("exa\x7fmple.com", "control"),
    (fullwidth("127.0.0.1"), "non-ASCII spelling"),
    ("127\u30020\u30020\u30021", "non-ASCII spelling"),  # ideographic full stops
    ("127" + fullwidth(".") + "1", "non-ASCII spelling"),
    ("\u2460\u2461\u2466.0.0.1", "non-ASCII spelling"),  # circled digits
    (fullwidth("127.0.0.1.5"), "at most 4"),
    (fullwidth("0x7f") + ".1", "non-ASCII spelling"),
    ("[" + fullwidth("::1") + "]", "non-ASCII spelling"),
    ("café..example", "empty label"),
]


@pytest.mark.parametrize(("host", "expected"), VALID)
def test_parse_host_literal(host: str, expected: IPv4Address | IPv6Address | None) -> None:
    result = parse_host_literal(host)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(("host", "words"), MALFORMED)
def test_malformed_hosts_are_errors(host: str, words: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_host_literal(host)
    error = info.value
    assert words in str(error)
    assert repr(host[:80]) in str(error)
    assert error.http_status == 400
    assert error.socks5_reply == SOCKS5_GENERAL_FAILURE


def test_tables_are_large_enough() -> None:
    assert len(VALID) + len(MALFORMED) >= 40
    assert len({h for h, _ in VALID} | {h for h, _ in MALFORMED}) == len(VALID) + len(MALFORMED)


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0x7f.1", "017700000001", "127.1", "[::ffff:127.0.0.1]", "0177.0.0.1"],
)
def test_alternate_loopback_spellings_classify_as_loopback(host: str) -> None:
    address = parse_host_literal(host)
    assert address is not None
    assert classify(address).category == "loopback"


@pytest.mark.parametrize(
    "host", ["0xa9fea9fe", "2852039166", "0251.0376.0251.0376", "[::ffff:169.254.169.254]"]
)
def test_alternate_metadata_spellings_classify_as_metadata(host: str) -> None:
    address = parse_host_literal(host)
    assert address is not None
    assert classify(address).category == "metadata"


def test_long_inputs_are_cheap_errors() -> None:
    for host in ("1" * 5000, "0" * 4999 + "9", "0x" + "f" * 5000, "1." * 3000 + "1"):
        with pytest.raises(LocalProtocolError) as info:
            parse_host_literal(host)
        assert len(str(info.value)) < 400
    assert parse_host_literal("0" * 5000) == IPv4Address("0.0.0.0")
    assert parse_host_literal("0x" + "0" * 5000 + "1") == IPv4Address("0.0.0.1")
    assert parse_host_literal("a" * 5000) is None


# --- canonical


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (IPv4Address("127.0.0.1"), "127.0.0.1"),
        (IPv4Address(0), "0.0.0.0"),
        (IPv6Address("::"), "::"),
        (IPv6Address("::1"), "::1"),
        (IPv6Address("1::"), "1::"),
        (IPv6Address("2001:DB8:0:0:1:0:0:1"), "2001:db8::1:0:0:1"),
        (IPv6Address("2001:db8:0:1:1:1:1:1"), "2001:db8:0:1:1:1:1:1"),
        (IPv6Address("1:0:0:2:0:0:0:3"), "1:0:0:2::3"),
        (IPv6Address("2001:0db8:0000:0000:0000:0000:0002:0001"), "2001:db8::2:1"),
        (IPv6Address("::ffff:127.0.0.1"), "::ffff:127.0.0.1"),
        (IPv6Address("::ffff:7f00:1"), "::ffff:127.0.0.1"),
        (IPv6Address("64:ff9b::a9fe:a9fe"), "64:ff9b::a9fe:a9fe"),
        (IPv6Address("fe80::1%eth0"), "fe80::1"),
        (IPv6Address("1:2:3:4:5:6:7:8"), "1:2:3:4:5:6:7:8"),
    ],
)
def test_canonical(address: IPv4Address | IPv6Address, text: str) -> None:
    assert canonical(address) == text


# --- properties

HOSTY = st.text(alphabet="0123456789abcdefxXgG.:[]%-_ \t", max_size=40)


@FUZZ
@given(st.one_of(st.text(max_size=60), HOSTY))
@example("0x" * 100)
@example("9" * 5000)
def test_parse_raises_only_local_protocol_error(host: str) -> None:
    try:
        result = parse_host_literal(host)
    except LocalProtocolError:
        return
    assert result is None or isinstance(result, IPv4Address | IPv6Address)
    if result is not None:
        assert parse_host_literal(canonical(result)) == result


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_decimal_integer_parses(n: int) -> None:
    assert parse_host_literal(str(n)) == IPv4Address(n)


def _spell(value: int, base: int, zeros: int, upper: bool) -> str:
    if base == 16:
        digits = f"{value:X}" if upper else f"{value:x}"
        return ("0X" if upper else "0x") + "0" * zeros + digits
    if base == 8:
        return "0" + "0" * zeros + f"{value:o}"
    return str(value)


@st.composite
def spellings(draw: st.DrawFn) -> tuple[str, IPv4Address]:
    n = draw(st.integers(0, 2**32 - 1))
    parts = draw(st.integers(1, 4))
    tail_bytes = 5 - parts
    byte_values = [(n >> (8 * (3 - i))) & 0xFF for i in range(parts - 1)]
    values = [*byte_values, n & ((1 << (8 * tail_bytes)) - 1)]
    labels = [
        _spell(
            value,
            draw(st.sampled_from([8, 10, 16])),
            draw(st.integers(0, 3)),
            draw(st.booleans()),
        )
        for value in values
    ]
    host = ".".join(labels) + draw(st.sampled_from(["", "."]))
    return host, IPv4Address(n)


@FUZZ
@given(spellings())
def test_every_inet_aton_spelling_parses(case: tuple[str, IPv4Address]) -> None:
    host, address = case
    assert parse_host_literal(host) == address


@FUZZ
@given(st.integers(0, 2**128 - 1))
def test_canonical_matches_rfc5952_and_round_trips(n: int) -> None:
    address = IPv6Address(n)
    text = canonical(address)
    assert IPv6Address(text) == address
    assert parse_host_literal(text) == address
    assert parse_host_literal(f"[{text}]") == address
    if n >> 32 != 0xFFFF:
        assert text == str(address)


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_mapped_canonical_round_trips(n: int) -> None:
    address = IPv6Address(0xFFFF << 32 | n)
    assert canonical(address) == f"::ffff:{IPv4Address(n)}"
    assert parse_host_literal(canonical(address)) == address


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="oracle is glibc inet_aton")
@FUZZ
@given(st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=24))
@example("0x")
@example("0x.1")
@example("08")
@example("1.2.3.4.5")
@example("4294967296")
def test_agrees_with_libc_inet_aton(host: str) -> None:
    """Every string the C library reads as an IPv4 address is that address here, and
    every IPv4 address parsed here (without the trailing dot libc refuses) is libc's."""
    try:
        oracle: IPv4Address | None = IPv4Address(socket.inet_aton(host))
    except OSError:
        oracle = None
    try:
        ours = parse_host_literal(host)
    except LocalProtocolError:
        ours = None
    if oracle is not None:
        assert ours == oracle
    elif isinstance(ours, IPv4Address):
        assert host.endswith(".")
