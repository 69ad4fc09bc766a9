"""SOCKS5 handshake messages (pyegress.protocols.socks5)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from pyegress.errors import (
    SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED,
    SOCKS5_GENERAL_FAILURE,
    SOCKS5_HOST_UNREACHABLE,
    SOCKS5_SUCCEEDED,
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
)
from pyegress.protocols import socks5
from pyegress.protocols.socks5 import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERPASS,
    Socks5Request,
    parse_greeting,
    parse_method_choice,
    parse_reply,
    parse_request,
    parse_userpass,
    parse_userpass_status,
    render_greeting,
    render_method_choice,
    render_reply,
    render_request,
    render_userpass,
    render_userpass_status,
)

FUZZ = settings(max_examples=250, deadline=None)


def assert_prefixes_incomplete(parse: object, raw: bytes) -> None:
    assert callable(parse)
    for cut in range(len(raw)):
        assert parse(raw[:cut]) is None, raw[:cut]


def test_constants() -> None:
    assert socks5.VERSION == 5
    assert (METHOD_NO_AUTH, METHOD_USERPASS, METHOD_NO_ACCEPTABLE) == (0x00, 0x02, 0xFF)
    assert (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE) == (1, 2, 3)
    assert (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6) == (1, 3, 4)


# --------------------------------------------------------------------------- server side


def test_parse_greeting() -> None:
    assert parse_greeting(b"\x05\x01\x00") == (frozenset({0}), 3)
    # gost v2 client: 00, 02, 80; surplus bytes are left alone.
    assert parse_greeting(b"\x05\x03\x00\x02\x80\x05\x01") == (frozenset({0, 2, 0x80}), 5)
    assert parse_greeting(bytearray(b"\x05\x02\x02\x02")) == (frozenset({2}), 4)
    assert_prefixes_incomplete(parse_greeting, b"\x05\x03\x00\x02\x80")


@pytest.mark.parametrize(("raw", "named"), [(b"\x04", "4"), (b"GET ", "71"), (b"\x05\x00", "no")])
def test_parse_greeting_errors(raw: bytes, named: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_greeting(raw)
    assert named in str(info.value)
    assert info.value.socks5_reply == SOCKS5_GENERAL_FAILURE


def test_render_method_choice() -> None:
    assert render_method_choice(METHOD_NO_AUTH) == b"\x05\x00"
    assert render_method_choice(METHOD_USERPASS) == b"\x05\x02"
    assert render_method_choice(METHOD_NO_ACCEPTABLE) == b"\x05\xff"


def test_parse_userpass() -> None:
    raw = b"\x01\x04user\x04pass"
    assert parse_userpass(raw + b"\x05") == ("user", "pass", 11)
    assert_prefixes_incomplete(parse_userpass, raw)
    assert parse_userpass(b"\x01\x01u\x00") == ("u", "", 4)
    assert parse_userpass(b"\x01\x05j\xc3\xb6rg\x01p") == ("j\u00f6rg", "p", 9)
    assert parse_userpass(b"\x01\x04j\xf6rg\x01p") == ("j\u00f6rg", "p", 8)


@pytest.mark.parametrize("raw", [b"\x05\x04user\x04pass", b"\x00", b"\x01\x00\x04pass"])
def test_parse_userpass_errors(raw: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        parse_userpass(raw)


def test_render_userpass_status() -> None:
    assert render_userpass_status(True) == b"\x01\x00"
    assert render_userpass_status(False) == b"\x01\x01"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b"\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb",
            Socks5Request(CMD_CONNECT, "10.0.0.1", 443, ATYP_IPV4),
        ),
        (
            b"\x05\x01\x00\x03\x0bexample.com\x00\x50",
            Socks5Request(CMD_CONNECT, "example.com", 80, ATYP_DOMAIN),
        ),
        (
            b"\x05\x01\x00\x03\x0bExample.COM\x00\x50",
            Socks5Request(CMD_CONNECT, "Example.COM", 80, ATYP_DOMAIN),
        ),
        (  # gost v2 sends IP literals as ATYP 3 text
            b"\x05\x01\x00\x03\x0810.0.0.1\x01\xbb",
            Socks5Request(CMD_CONNECT, "10.0.0.1", 443, ATYP_DOMAIN),
        ),
        (
            b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16",
            Socks5Request(CMD_CONNECT, "::1", 22, ATYP_IPV6),
        ),
        (  # UDP ASSOCIATE from a client that does not know its address yet
            b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
            Socks5Request(CMD_UDP_ASSOCIATE, "0.0.0.0", 0, ATYP_IPV4),
        ),
        (  # unknown commands are the handler's business (reply 0x07)
            b"\x05\xf3\x00\x01\x00\x00\x00\x00\x00\x00",
            Socks5Request(0xF3, "0.0.0.0", 0, ATYP_IPV4),
        ),
        (  # non-zero RSV tolerated
            b"\x05\x01\x7f\x01\x01\x02\x03\x04\x00\x50",
            Socks5Request(CMD_CONNECT, "1.2.3.4", 80, ATYP_IPV4),
        ),
        (
            b"\x05\x01\x00\x03\x05[::1]\x00\x50",
            Socks5Request(CMD_CONNECT, "::1", 80, ATYP_DOMAIN),
        ),
    ],
)
def test_parse_request(raw: bytes, expected: Socks5Request) -> None:
    assert parse_request(raw + b"early data") == (expected, len(raw))
    assert_prefixes_incomplete(parse_request, raw)


@pytest.mark.parametrize(
    ("raw", "reply", "named"),
    [
        (b"\x04\x01\x00\x01", SOCKS5_GENERAL_FAILURE, "version 4"),
        (b"\x05\x01\x00\x02", SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED, "address type 2"),
        (b"\x05\x01\x00\x00", SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED, "address type 0"),
        (b"\x05\x01\x00\x03\x00\x00\x50", SOCKS5_GENERAL_FAILURE, "empty"),
        (b"\x05\x01\x00\x03\x06b\xc3\xbc.de\x00\x50", SOCKS5_GENERAL_FAILURE, "punycode"),
        (b"\x05\x01\x00\x03\x03a b\x00\x50", SOCKS5_GENERAL_FAILURE, "0x20"),
        (b"\x05\x01\x00\x03\x03a/b\x00\x50", SOCKS5_GENERAL_FAILURE, "0x2f"),
        (b"\x05\x01\x00\x03\x03a\x00b\x00\x50", SOCKS5_GENERAL_FAILURE, "0x00"),
        (b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00", SOCKS5_GENERAL_FAILURE, "port 0"),
    ],
)
def test_parse_request_errors(raw: bytes, reply: int, named: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_request(raw)
    assert info.value.socks5_reply == reply
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((SOCKS5_SUCCEEDED,), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((SOCKS5_HOST_UNREACHABLE,), b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((SOCKS5_SUCCEEDED, "10.1.2.3", 40000), b"\x05\x00\x00\x01\x0a\x01\x02\x03\x9c\x40"),
        ((SOCKS5_SUCCEEDED, "::1", 22), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x16"),
        ((SOCKS5_SUCCEEDED, "proxy.local", 1080), b"\x05\x00\x00\x03\x0bproxy.local\x04\x38"),
    ],
)
def test_render_reply(args: tuple[int, str, int], expected: bytes) -> None:
    assert render_reply(*args) == expected


def test_render_reply_rejects_unsendable_hosts() -> None:
    with pytest.raises(LocalProtocolError):
        render_reply(0, "a" * 256, 80)
    with pytest.raises(LocalProtocolError):
        render_reply(0, "", 80)
    with pytest.raises(ValueError):
        render_reply(0, "1.2.3.4", 65536)


# --------------------------------------------------------------------------- client side


def test_client_messages() -> None:
    assert render_greeting([METHOD_NO_AUTH, METHOD_USERPASS]) == b"\x05\x02\x00\x02"
    assert render_greeting([0x00]) == b"\x05\x01\x00"
    with pytest.raises(ValueError):
        render_greeting([])
    assert parse_method_choice(b"\x05\x02\x01") == (METHOD_USERPASS, 2)
    assert parse_method_choice(b"\x05\xff") == (METHOD_NO_ACCEPTABLE, 2)
    assert_prefixes_incomplete(parse_method_choice, b"\x05\x00")
    assert render_userpass("user", "pass") == b"\x01\x04user\x04pass"
    assert render_userpass("j\u00f6rg", "") == b"\x01\x05j\xc3\xb6rg\x00"
    assert parse_userpass_status(b"\x01\x00") == (True, 2)
    assert parse_userpass_status(b"\x01\x01rest") == (False, 2)
    assert parse_userpass_status(b"\x05\x00") == (True, 2)
    assert_prefixes_incomplete(parse_userpass_status, b"\x01\x00")


def test_render_userpass_limits() -> None:
    render_userpass("u" * 255, "p" * 255)
    for user, password in [("", "p"), ("u" * 256, "p"), ("u", "p" * 256), ("\u00e9" * 128, "")]:
        with pytest.raises(ConfigError):
            render_userpass(user, password)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((CMD_CONNECT, "example.com", 443), b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"),
        ((CMD_CONNECT, "Example.COM", 80), b"\x05\x01\x00\x03\x0bExample.COM\x00\x50"),
        ((CMD_CONNECT, "10.0.0.1", 80), b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50"),
        ((CMD_CONNECT, "::1", 80), b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50"),
        ((CMD_UDP_ASSOCIATE, "0.0.0.0", 0), b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((CMD_CONNECT, "b\u00fccher.de", 80), b"\x05\x01\x00\x03\x10xn--bcher-kva.de\x00\x50"),
    ],
)
def test_render_request(args: tuple[int, str, int], expected: bytes) -> None:
    assert render_request(*args) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00", (0, "0.0.0.0", 0, 10)),
        (b"\x05\x05\x00\x01\x0a\x00\x00\x02\x1f\x90", (5, "10.0.0.2", 8080, 10)),
        (b"\x05\x00\x00\x03\x04host\x00\x16", (0, "host", 22, 11)),
        (b"\x05\x00\x00\x03\x00\x00\x16", (0, "", 22, 7)),
        (b"\x05\x00\xff\x04" + bytes(15) + b"\x01\x00\x16", (0, "::1", 22, 22)),
    ],
)
def test_parse_reply(raw: bytes, expected: tuple[int, str, int, int]) -> None:
    assert parse_reply(raw + b"SSH-2.0-x") == expected
    assert_prefixes_incomplete(parse_reply, raw)


@pytest.mark.parametrize(
    ("parse", "raw"),
    [
        (parse_method_choice, b"\x04\x00"),
        (parse_method_choice, b"HTTP/1.1 400"),
        (parse_userpass_status, b"\x02\x00"),
        (parse_reply, b"\x04\x00\x00\x01"),
        (parse_reply, b"\x05\x00\x00\x05"),
        (parse_reply, b"\x05\x00\x00\x00"),
    ],
)
def test_client_parse_errors(parse: object, raw: bytes) -> None:
    assert callable(parse)
    with pytest.raises(RemoteProtocolError) as info:
        parse(raw)
    assert info.value.http_status == 502


# --------------------------------------------------------------------------- property tests

hosts = st.one_of(domains(), st.ip_addresses().map(str))
commands = st.integers(0, 255)
ports = st.integers(1, 65535)


def normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


@FUZZ
@given(commands, hosts, ports, st.binary(max_size=10))
def test_request_round_trip(command: int, host: str, port: int, rest: bytes) -> None:
    raw = render_request(command, host, port)
    parsed = parse_request(raw + rest)
    assert parsed is not None
    request, consumed = parsed
    assert consumed == len(raw)
    assert (request.command, request.host, request.port) == (command, normal_host(host), port)
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        assert request.atyp == ATYP_DOMAIN
    else:
        assert request.atyp == (ATYP_IPV4 if version == 4 else ATYP_IPV6)
    assert_prefixes_incomplete(parse_request, raw)


@FUZZ
@given(st.integers(0, 255), hosts, st.integers(0, 65535))
def test_reply_round_trip(reply: int, host: str, port: int) -> None:
    raw = render_reply(reply, host, port)
    assert parse_reply(raw) == (reply, normal_host(host), port, len(raw))


@FUZZ
@given(st.lists(st.integers(0, 255), min_size=1, max_size=255))
def test_greeting_round_trip(methods: list[int]) -> None:
    raw = render_greeting(methods)
    assert parse_greeting(raw) == (frozenset(methods), len(raw))


@FUZZ
@given(st.integers(0, 255))
def test_method_choice_round_trip(method: int) -> None:
    assert parse_method_choice(render_method_choice(method)) == (method, 2)


@FUZZ
@given(
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.booleans(),
)
def test_userpass_round_trip(user: str, password: str, ok: bool) -> None:
    raw = render_userpass(user, password)
    assert parse_userpass(raw) == (user, password, len(raw))
    assert parse_userpass_status(render_userpass_status(ok)) == (ok, 2)


@FUZZ
@given(st.binary(max_size=80))
def test_server_parsers_fuzz(data: bytes) -> None:
    for parse in (parse_greeting, parse_userpass, parse_request):
        try:
            result = parse(data)
        except LocalProtocolError:
            continue
        if result is not None:
            assert 0 < result[-1] <= len(data)


@FUZZ
@given(st.binary(max_size=80))
def test_client_parsers_fuzz(data: bytes) -> None:
    for parse in (parse_method_choice, parse_userpass_status, parse_reply):
        try:
            result = parse(data)
        except RemoteProtocolError:
            continue
        if result is not None:
            assert 0 < result[-1] <= len(data)


@FUZZ
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300), st.binary(max_size=4))
def test_request_fuzz_with_valid_header(
    command: int, atyp: int, address: bytes, rest: bytes
) -> None:
    data = bytes((5, command, 0, atyp)) + address + rest
    try:
        result = parse_request(data)
    except LocalProtocolError:
        return
    if result is not None:
        request, consumed = result
        assert request.atyp in (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6)
        assert consumed <= len(data)
