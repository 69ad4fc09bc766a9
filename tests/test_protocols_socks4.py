"""SOCKS4 and SOCKS4a (pyegress.protocols.socks4)."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from pyegress.errors import LocalProtocolError
from pyegress.protocols.socks4 import (
    CMD_BIND,
    CMD_CONNECT,
    REPLY_GRANTED,
    REPLY_REJECTED,
    Socks4Request,
    parse_request,
    render_reply,
)

FUZZ = settings(max_examples=250, deadline=None)


def assert_prefixes_incomplete(raw: bytes) -> None:
    for cut in range(len(raw)):
        assert parse_request(raw[:cut]) is None, raw[:cut]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b"\x04\x01\x00\x50\x01\x02\x03\x04user\x00",
            Socks4Request(CMD_CONNECT, "1.2.3.4", 80, "user", False),
        ),
        (
            b"\x04\x01\x01\xbb\x0a\x00\x00\x01\x00",
            Socks4Request(CMD_CONNECT, "10.0.0.1", 443, "", False),
        ),
        (
            b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00",
            Socks4Request(CMD_CONNECT, "example.com", 443, "", True),
        ),
        (
            b"\x04\x01\x00\x16\x00\x00\x00\xffbob\x00Host.Example\x00",
            Socks4Request(CMD_CONNECT, "Host.Example", 22, "bob", True),
        ),
        (  # 0.0.0.0 is not the 4a marker
            b"\x04\x02\x00\x00\x00\x00\x00\x00\x00",
            Socks4Request(CMD_BIND, "0.0.0.0", 0, "", False),
        ),
        (
            b"\x04\x01\x00\x50\x01\x02\x03\x04j\xc3\xb6rg\x00",
            Socks4Request(CMD_CONNECT, "1.2.3.4", 80, "j\u00f6rg", False),
        ),
        (
            b"\x04\x01\x00\x50\x01\x02\x03\x04j\xf6rg\x00",
            Socks4Request(CMD_CONNECT, "1.2.3.4", 80, "j\u00f6rg", False),
        ),
        (  # unknown commands are returned for the handler to reject
            b"\x04\x09\x00\x50\x01\x02\x03\x04\x00",
            Socks4Request(9, "1.2.3.4", 80, "", False),
        ),
    ],
)
def test_parse_request(raw: bytes, expected: Socks4Request) -> None:
    assert parse_request(raw + b"GET / HTTP/1.1\r\n") == (expected, len(raw))
    assert parse_request(bytearray(raw)) == (expected, len(raw))
    assert_prefixes_incomplete(raw)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"\x05", "version 5"),
        (b"G", "version 71"),
        (b"\x04\x01\x00\x00\x01\x02\x03\x04\x00", "port 0"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", "empty"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a b\x00", "0x20"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00b\xc3\xbccher.de\x00", "punycode"),
        (b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 1100, "user id"),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * 1100, "host name"),
    ],
)
def test_parse_request_errors(raw: bytes, named: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_request(raw)
    assert named in str(info.value)


def test_max_size() -> None:
    raw = b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 10 + b"\x00"
    assert parse_request(raw, max_size=len(raw)) is not None
    with pytest.raises(LocalProtocolError):
        parse_request(raw, max_size=len(raw) - 1)
    assert parse_request(raw[:-1], max_size=len(raw)) is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((True,), b"\x00\x5a\x00\x00\x00\x00\x00\x00"),
        ((False,), b"\x00\x5b\x00\x00\x00\x00\x00\x00"),
        ((True, "10.0.0.1", 443), b"\x00\x5a\x01\xbb\x0a\x00\x00\x01"),
    ],
)
def test_render_reply(args: tuple[bool, str, int], expected: bytes) -> None:
    assert render_reply(*args) == expected
    assert (REPLY_GRANTED, REPLY_REJECTED) == (90, 91)


@pytest.mark.parametrize(("host", "port"), [("::1", 80), ("example.com", 80), ("1.2.3.4", -1)])
def test_render_reply_errors(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        render_reply(True, host, port)


def render_request(command: int, host: str, port: int, user: bytes) -> bytes:
    """A test-side encoder (the module has no client side)."""
    head = bytes((4, command)) + port.to_bytes(2, "big")
    try:
        return head + ipaddress.IPv4Address(host).packed + user + b"\x00"
    except ValueError:
        return head + b"\x00\x00\x00\x01" + user + b"\x00" + host.encode("ascii") + b"\x00"


@FUZZ
@given(
    st.integers(0, 255),
    st.one_of(
        domains(),
        # 0.0.0.x (x != 0) is the 4a marker, so it cannot be sent as an address.
        st.ip_addresses(v=4).map(str).filter(lambda ip: not ip.startswith("0.0.0.")),
    ),
    st.integers(1, 65535),
    st.binary(max_size=30).map(lambda user: user.replace(b"\x00", b"")),
    st.binary(max_size=10),
)
def test_request_round_trip(command: int, host: str, port: int, user: bytes, rest: bytes) -> None:
    raw = render_request(command, host, port, user)
    parsed = parse_request(raw + rest)
    assert parsed is not None
    request, consumed = parsed
    assert consumed == len(raw)
    assert (request.command, request.host, request.port) == (command, host, port)
    try:
        assert request.user_id == user.decode("utf-8")
    except UnicodeDecodeError:
        assert request.user_id == user.decode("latin-1")
    assert request.is_4a is not host.replace(".", "").isdigit()


@FUZZ
@given(st.binary(max_size=120), st.integers(9, 200))
def test_parse_request_fuzz(data: bytes, max_size: int) -> None:
    try:
        result = parse_request(data, max_size)
    except LocalProtocolError:
        return
    if result is not None:
        request, consumed = result
        assert consumed <= min(len(data), max_size)
        assert 0 <= request.port <= 65535


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=120))
def test_parse_request_fuzz_4a(command: int, tail: bytes) -> None:
    data = bytes((4, command, 0, 80, 0, 0, 0, 7)) + tail
    with contextlib.suppress(LocalProtocolError):
        parse_request(data)
