"""HTTP/1.x heads, targets, credentials and body framing (pyegress.protocols.http1)."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyegress.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pyegress.protocols.http1 import (
    MAX_HEAD_SIZE,
    AbsoluteURI,
    BodyFraming,
    BodyReader,
    RequestHead,
    ResponseHead,
    basic_credentials,
    parse_absolute_uri,
    parse_basic_credentials,
    parse_connect_target,
    parse_request_head,
    parse_response_head,
    render_request_head,
    render_response,
    request_body_framing,
    response_body_framing,
    strip_hop_by_hop,
    without_headers,
)

FUZZ = settings(max_examples=250, deadline=None)

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def request(head: bytes) -> RequestHead:
    parsed = parse_request_head(head)
    assert parsed is not None
    return parsed[0]


def response(head: bytes) -> ResponseHead:
    parsed = parse_response_head(head)
    assert parsed is not None
    return parsed[0]


def request_error(head: bytes) -> LocalProtocolError:
    with pytest.raises(LocalProtocolError) as info:
        parse_request_head(head)
    return info.value


# --------------------------------------------------------------------------- request heads


def test_parse_connect_request_as_sent_by_gost() -> None:
    raw = (
        b"CONNECT example.com:443 HTTP/1.1\r\n"
        b"Host: example.com:443\r\n"
        b"User-Agent: Chrome/78.0.3904.106\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"\r\n"
    )
    parsed = parse_request_head(raw + b"\x16\x03\x01")
    assert parsed is not None
    head, consumed = parsed
    assert consumed == len(raw)
    assert head == RequestHead(
        method="CONNECT",
        target="example.com:443",
        version="HTTP/1.1",
        headers=(
            ("Host", "example.com:443"),
            ("User-Agent", "Chrome/78.0.3904.106"),
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("Proxy-Connection", "keep-alive"),
        ),
    )
    assert head.get("proxy-authorization") == "Basic dXNlcjpwYXNz"
    assert parse_basic_credentials(head.get("Proxy-Authorization")) == ("user", "pass")


def test_header_names_keep_case_and_values_lose_ows() -> None:
    head = request(b"GET / HTTP/1.1\r\nX-Thing:  a  b \t\r\nx-thing:\tc\r\nEmpty:\r\n\r\n")
    assert head.headers == (("X-Thing", "a  b"), ("x-thing", "c"), ("Empty", ""))
    assert head.get("X-THING") == "a  b"
    assert head.get_all("x-Thing") == ["a  b", "c"]
    assert head.get("missing") is None
    assert head.get_all("missing") == []


def test_no_headers_and_obs_text() -> None:
    head = request(b"GET http://h/ HTTP/1.0\r\n\r\n")
    assert head.headers == ()
    head = request(b"GET / HTTP/1.1\r\nX: caf\xe9\r\n\r\n")
    assert head.get("x") == "caf\u00e9"


def test_leading_empty_lines_are_skipped() -> None:
    raw = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    parsed = parse_request_head(raw)
    assert parsed is not None
    assert parsed[1] == len(raw)
    assert parsed[0].method == "GET"
    assert parse_request_head(b"\r\n") is None
    assert parse_request_head(b"\r\n\r") is None
    assert request_error(b"\r\n" * 9 + b"GET / HTTP/1.1\r\n\r\n").http_status == 400


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        b"G",
        b"GET",
        b"GET ",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r",
    ],
)
def test_incomplete_request_head(partial: bytes) -> None:
    assert parse_request_head(partial) is None
    assert parse_request_head(bytearray(partial)) is None


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET  / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1 \r\n\r\n", 400),
        (b" GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"GET / x HTTP/1.1\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
        (b"GET\t/ HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\n\r\n", 505),
        (b"GET / HTTP/3\r\n\r\n", 505),
        (b"GET / http/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1x\r\n\r\n", 400),
        (b"GET / HTTP/\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n\tfolded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX(y): a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)
def test_malformed_request_heads(raw: bytes, status: int) -> None:
    assert request_error(raw).http_status == status


def test_target_of_exactly_8192_bytes_is_accepted() -> None:
    target = "/" + "a" * 8191
    assert request(f"GET {target} HTTP/1.1\r\n\r\n".encode()).target == target


def test_malformed_request_line_is_rejected_before_the_head_is_complete() -> None:
    # A client speaking TLS or SOCKS to an HTTP port is told at once.
    assert request_error(b"\x16\x03\x01\x02\x00\x01").http_status == 400
    assert request_error(b"\x05\x01\x00").http_status == 400
    assert request_error(b"GET / HTTP/1.1x\r\nHost: a\r\n").http_status == 400
    assert request_error(b"GET / HTTP/2.0\r\n").http_status == 505


def test_head_size_limit() -> None:
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 100 + b"\r\n"
    assert parse_request_head(big, max_size=200) is None
    with pytest.raises(LocalProtocolError) as info:
        parse_request_head(big + b"a" * 100, max_size=200)
    assert info.value.http_status == 431
    complete = big + b"\r\n"
    assert parse_request_head(complete, max_size=len(complete)) is not None
    with pytest.raises(LocalProtocolError) as info:
        parse_request_head(complete, max_size=len(complete) - 1)
    assert info.value.http_status == 431
    with pytest.raises(LocalProtocolError) as info:
        parse_request_head(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_SIZE)
    assert info.value.http_status == 431


@pytest.mark.parametrize(
    ("raw", "keep"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nProxy-Connection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: upgrade, keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", False),
    ],
)
def test_request_keep_alive(raw: bytes, keep: bool) -> None:
    assert request(raw).keep_alive() is keep


# --------------------------------------------------------------------------- response heads


def test_parse_response_head() -> None:
    raw = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: gost/2.11\r\n\r\n"
    parsed = parse_response_head(raw + b"SSH-2.0-OpenSSH_9.6\r\n")
    assert parsed is not None
    head, consumed = parsed
    assert consumed == len(raw)
    assert head == ResponseHead(
        version="HTTP/1.1",
        status=200,
        reason="Connection established",
        headers=(("Proxy-Agent", "gost/2.11"),),
    )
    assert head.get("proxy-agent") == "gost/2.11"


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        (b"HTTP/1.1 200 OK", 200, "OK"),
        (b"HTTP/1.0 404 Not  Found ", 404, "Not  Found "),
        (b"HTTP/1.1 204 ", 204, ""),
        (b"HTTP/1.1 204", 204, ""),
        (b"HTTP/1.1 599 x\ty", 599, "x\ty"),
        (b"HTTP/1.1 101 Switching Protocols", 101, "Switching Protocols"),
    ],
)
def test_status_lines(line: bytes, status: int, reason: str) -> None:
    head = response(line + b"\r\n\r\n")
    assert (head.status, head.reason) == (status, reason)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 bad\r\n",
    ],
)
def test_malformed_response_heads(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_response_head(raw)
    assert info.value.http_status == 502


def test_response_incomplete_and_too_large() -> None:
    assert parse_response_head(b"HTTP/1.1 200 OK\r\n") is None
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nX: y\r\n\r") is None
    with pytest.raises(RemoteProtocolError) as info:
        parse_response_head(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 300, max_size=100)
    assert info.value.http_status == 502


@pytest.mark.parametrize(
    ("raw", "keep"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nProxy-Connection: keep-alive\r\n\r\n", False),
    ],
)
def test_response_keep_alive(raw: bytes, keep: bool) -> None:
    assert response(raw).keep_alive() is keep


# --------------------------------------------------------------------------- rendering


def test_render_request_head() -> None:
    raw = render_request_head(
        "CONNECT",
        "example.com:443",
        [("Host", "example.com:443"), ("Proxy-Connection", "keep-alive")],
    )
    assert raw == (
        b"CONNECT example.com:443 HTTP/1.1\r\n"
        b"Host: example.com:443\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"\r\n"
    )
    assert render_request_head("GET", "/", [], "HTTP/1.0") == b"GET / HTTP/1.0\r\n\r\n"
    assert render_request_head("GET", "/", [("X", "caf\u00e9")]).endswith(b"X: caf\xe9\r\n\r\n")


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GE T", "/", []),
        ("GET", "/ x", []),
        ("GET", "", []),
        ("GET", "/", [("X", "a\r\nInjected: 1")]),
        ("GET", "/", [("X Y", "a")]),
        ("GET", "/", [("X", "\u20ac")]),
    ],
)
def test_render_request_head_rejects_injection(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        render_request_head(method, target, headers)


def test_render_response() -> None:
    assert render_response(200, "Connection established", [("Proxy-Agent", "pyegress")]) == (
        b"HTTP/1.1 200 Connection established\r\nProxy-Agent: pyegress\r\n\r\n"
    )
    assert render_response(403, headers=[("Content-Length", "0")]) == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    )
    assert render_response(407, headers=[("Proxy-Authenticate", 'Basic realm="gost"')]) == (
        b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="gost"'
        b"\r\n\r\n"
    )
    assert render_response(503, body=b"dial failed\n") == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 12\r\n\r\ndial failed\n"
    )
    assert render_response(200, "OK", [("content-length", "2")], b"hi") == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
    )
    assert render_response(599) == b"HTTP/1.1 599 \r\n\r\n"
    assert render_response(200, version="HTTP/1.0") == b"HTTP/1.0 200 OK\r\n\r\n"
    with pytest.raises(ValueError):
        render_response(99)
    with pytest.raises(ValueError):
        render_response(200, "OK\r\nX: y")


# --------------------------------------------------------------------------- credentials


def test_basic_credentials() -> None:
    assert basic_credentials("user", "pass") == "Basic dXNlcjpwYXNz"
    assert parse_basic_credentials("Basic dXNlcjpwYXNz") == ("user", "pass")
    assert parse_basic_credentials("basic  dXNlcjpwYXNz ") == ("user", "pass")
    assert parse_basic_credentials("BASIC dXNlcjpwYXNz") == ("user", "pass")
    token = base64.b64encode(b"user:pa:ss").decode()
    assert parse_basic_credentials("Basic " + token) == ("user", "pa:ss")
    assert parse_basic_credentials("Basic " + base64.b64encode(b":").decode()) == ("", "")
    latin = base64.b64encode(b"j\xf6rg:p\xe4ss").decode()
    assert parse_basic_credentials("Basic " + latin) == ("j\u00f6rg", "p\u00e4ss")
    utf8 = base64.b64encode("jörg:päss".encode()).decode()
    assert parse_basic_credentials("Basic " + utf8) == ("jörg", "päss")


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer dXNlcjpwYXNz",
        "Basic dXNlcnBhc3M=",  # no colon
        "Basic dXNlcjpwYXNz!",
        "Basic dXNlcjpwYXN",  # bad padding
        "Basic d\u00e9",
        "Digest username=x",
    ],
)
def test_parse_basic_credentials_rejects(value: str | None) -> None:
    assert parse_basic_credentials(value) is None


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("http://example.com/path?q=1", AbsoluteURI("http", "example.com", 80, "/path?q=1")),
        ("HTTP://Example.com:8080", AbsoluteURI("http", "Example.com", 8080, "/")),
        ("http://example.com?q", AbsoluteURI("http", "example.com", 80, "/?q")),
        ("https://example.com/", AbsoluteURI("https", "example.com", 443, "/")),
        ("http://[::1]:8080/x", AbsoluteURI("http", "::1", 8080, "/x")),
        ("http://[::1]/x", AbsoluteURI("http", "::1", 80, "/x")),
        ("http://10.0.0.1:/x", AbsoluteURI("http", "10.0.0.1", 80, "/x")),
        ("http://h/a#frag", AbsoluteURI("http", "h", 80, "/a")),
        ("http://h#frag", AbsoluteURI("http", "h", 80, "/")),
        ("http://h/a/b//c?x=/y&z=%20", AbsoluteURI("http", "h", 80, "/a/b//c?x=/y&z=%20")),
    ],
)
def test_parse_absolute_uri(target: str, expected: AbsoluteURI) -> None:
    assert parse_absolute_uri(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "/path",
        "example.com:80",
        "ftp://example.com/",
        "://example.com/",
        "http://",
        "http:///path",
        "http://user:pass@example.com/",
        "http://user@example.com/",
        "http://::1/",
        "http://host:0/",
        "http://host:99999/",
        "http://host:x/",
        "http://ho st/",
        "http://host/a b",
        "http://host/\x00",
        "http://[::1/",
        "http://[bad]/",
    ],
)
def test_parse_absolute_uri_errors(target: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_absolute_uri(target)
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("example.com:443", ("example.com", 443)),
        ("10.0.0.1:22", ("10.0.0.1", 22)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ],
)
def test_parse_connect_target(target: str, expected: tuple[str, int]) -> None:
    assert parse_connect_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "example.com",
        "example.com:",
        "example.com:0",
        "2001:db8::1:443",
        "http://example.com:443",
        "example.com:443/x",
        "user@example.com:443",
        "/",
        "",
    ],
)
def test_parse_connect_target_errors(target: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_connect_target(target)
    assert info.value.http_status == 400


# --------------------------------------------------------------------------- header helpers


def test_without_headers() -> None:
    headers = [("Host", "a"), ("Gost-Target", "x"), ("x-gost-target", "y"), ("Accept", "*/*")]
    assert without_headers(headers, ["gost-target", "X-Gost-Target"]) == [
        ("Host", "a"),
        ("Accept", "*/*"),
    ]
    assert without_headers(headers, []) == headers


def test_strip_hop_by_hop() -> None:
    headers = [
        ("Host", "example.com"),
        ("Connection", "keep-alive, X-Private"),
        ("Proxy-Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("TE", "trailers"),
        ("Trailer", "Expires"),
        ("Upgrade", "websocket"),
        ("x-private", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Accept", "*/*"),
    ]
    assert strip_hop_by_hop(headers) == [
        ("Host", "example.com"),
        ("Transfer-Encoding", "chunked"),
        ("Accept", "*/*"),
    ]


def test_strip_hop_by_hop_never_drops_framing_or_host() -> None:
    headers = [
        ("Host", "h"),
        ("Connection", "Content-Length, Transfer-Encoding, Host"),
        ("Content-Length", "5"),
        ("Transfer-Encoding", "chunked"),
    ]
    assert strip_hop_by_hop(headers) == [
        ("Host", "h"),
        ("Content-Length", "5"),
        ("Transfer-Encoding", "chunked"),
    ]


def test_strip_hop_by_hop_keeps_upgrade() -> None:
    headers = [
        ("Host", "h"),
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "abc"),
        ("Proxy-Authenticate", "Basic"),
        ("connection", "x-other"),
        ("X-Other", "1"),
    ]
    assert strip_hop_by_hop(headers) == [
        ("Host", "h"),
        ("Connection", "upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "abc"),
    ]
    # Connection: upgrade without an Upgrade header upgrades nothing.
    assert strip_hop_by_hop([("Connection", "upgrade"), ("A", "b")]) == [("A", "b")]


# --------------------------------------------------------------------------- framing


def req(headers: str, version: str = "HTTP/1.1", method: str = "POST") -> RequestHead:
    return request(f"{method} / {version}\r\n{headers}\r\n".encode("latin-1"))


def resp(headers: str, status: int = 200, version: str = "HTTP/1.1") -> ResponseHead:
    return response(f"{version} {status} X\r\n{headers}\r\n".encode("latin-1"))


@pytest.mark.parametrize(
    ("headers", "version", "expected"),
    [
        ("", "HTTP/1.1", BodyFraming("none")),
        ("Content-Length: 10\r\n", "HTTP/1.1", BodyFraming("length", 10)),
        ("Content-Length: 0\r\n", "HTTP/1.1", BodyFraming("length", 0)),
        ("Content-Length: 7\r\nContent-Length: 7\r\n", "HTTP/1.1", BodyFraming("length", 7)),
        ("Content-Length: 7, 7\r\n", "HTTP/1.1", BodyFraming("length", 7)),
        ("Transfer-Encoding: chunked\r\n", "HTTP/1.1", BodyFraming("chunked")),
        ("Transfer-Encoding: gzip, Chunked\r\n", "HTTP/1.1", BodyFraming("chunked")),
        ("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", "HTTP/1.1",
         BodyFraming("chunked")),
    ],
)  # fmt: skip
def test_request_body_framing(headers: str, version: str, expected: BodyFraming) -> None:
    assert request_body_framing(req(headers, version)) == expected


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "HTTP/1.1"),
        ("Transfer-Encoding: gzip\r\n", "HTTP/1.1"),
        ("Transfer-Encoding: chunked, gzip\r\n", "HTTP/1.1"),
        ("Transfer-Encoding: chunked, chunked\r\n", "HTTP/1.1"),
        ("Transfer-Encoding: \r\n", "HTTP/1.1"),
        ("Transfer-Encoding: chunked\r\n", "HTTP/1.0"),
        ("Content-Length: 5\r\nContent-Length: 6\r\n", "HTTP/1.1"),
        ("Content-Length: 5, 6\r\n", "HTTP/1.1"),
        ("Content-Length: -5\r\n", "HTTP/1.1"),
        ("Content-Length: +5\r\n", "HTTP/1.1"),
        ("Content-Length: 0x10\r\n", "HTTP/1.1"),
        ("Content-Length: 5 5\r\n", "HTTP/1.1"),
        ("Content-Length: \r\n", "HTTP/1.1"),
        ("Content-Length: 1,\r\n", "HTTP/1.1"),
        ("Content-Length: \u00b2\r\n", "HTTP/1.1"),  # SUPERSCRIPT TWO: isdigit() is true
        ("Content-Length: 9999999999999999999999\r\n", "HTTP/1.1"),
    ],
)
def test_request_body_framing_errors(headers: str, version: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        request_body_framing(req(headers, version))
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("headers", "status", "method", "version", "expected"),
    [
        ("Content-Length: 5\r\n", 200, "GET", "HTTP/1.1", BodyFraming("length", 5)),
        ("Content-Length: 5\r\n", 200, "HEAD", "HTTP/1.1", BodyFraming("none")),
        ("", 200, "GET", "HTTP/1.1", BodyFraming("close")),
        ("", 200, "GET", "HTTP/1.0", BodyFraming("close")),
        ("Transfer-Encoding: chunked\r\n", 200, "GET", "HTTP/1.1", BodyFraming("chunked")),
        ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 200, "GET", "HTTP/1.1",
         BodyFraming("chunked")),
        ("Transfer-Encoding: gzip\r\n", 200, "GET", "HTTP/1.1", BodyFraming("close")),
        ("Transfer-Encoding: chunked\r\n", 200, "GET", "HTTP/1.0", BodyFraming("close")),
        ("Content-Length: 5\r\n", 204, "GET", "HTTP/1.1", BodyFraming("none")),
        ("Content-Length: 5\r\n", 304, "GET", "HTTP/1.1", BodyFraming("none")),
        ("", 100, "POST", "HTTP/1.1", BodyFraming("none")),
        ("Upgrade: websocket\r\n", 101, "GET", "HTTP/1.1", BodyFraming("none")),
        ("", 200, "CONNECT", "HTTP/1.1", BodyFraming("none")),
        ("Transfer-Encoding: chunked\r\n", 299, "CONNECT", "HTTP/1.1", BodyFraming("none")),
        ("Content-Length: 9\r\n", 407, "CONNECT", "HTTP/1.1", BodyFraming("length", 9)),
        ("", 502, "CONNECT", "HTTP/1.1", BodyFraming("close")),
    ],
)  # fmt: skip
def test_response_body_framing(
    headers: str, status: int, method: str, version: str, expected: BodyFraming
) -> None:
    assert response_body_framing(resp(headers, status, version), method) == expected


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: abc\r\n",
    ],
)
def test_response_body_framing_errors(headers: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        response_body_framing(resp(headers), "GET")
    assert info.value.http_status == 502


# --------------------------------------------------------------------------- body reader


CHUNKED = (
    b"4\r\nWiki\r\n"
    b"6;name=value\r\npedia \r\n"
    b"E \r\nin \r\n\r\nchunks.\r\n"
    b"0\r\n"
    b"Expires: never\r\n"
    b"\r\n"
)
NEXT = b"GET /next HTTP/1.1\r\n\r\n"


def feed_all(reader: BodyReader, data: bytes, sizes: list[int]) -> int:
    """Feed ``data`` in pieces of the given sizes (rest in one piece); return the body
    length the reader claimed, asserting it stops claiming bytes once done."""
    taken = 0
    pos = 0
    pieces = []
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    pieces.append(data[pos:])
    for piece in pieces:
        used, done = reader.feed(piece)
        assert 0 <= used <= len(piece)
        taken += used
        if done:
            assert reader.done
        if used < len(piece):
            assert done
    return taken


def test_chunked_body_in_one_piece() -> None:
    reader = BodyReader(BodyFraming("chunked"))
    assert reader.feed(CHUNKED + NEXT) == (len(CHUNKED), True)
    assert reader.done
    assert reader.feed(NEXT) == (0, True)
    assert reader.feed_eof()


def test_chunked_body_one_byte_at_a_time() -> None:
    reader = BodyReader(BodyFraming("chunked"))
    data = CHUNKED + NEXT
    results = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert [used for used, _ in results] == [1] * len(CHUNKED) + [0] * len(NEXT)
    assert [done for _, done in results].index(True) == len(CHUNKED) - 1


def test_chunked_body_accepts_memoryview_and_bytearray() -> None:
    reader = BodyReader(BodyFraming("chunked"))
    assert reader.feed(memoryview(CHUNKED[:10])) == (10, False)
    assert reader.feed(bytearray(CHUNKED[10:] + NEXT)) == (len(CHUNKED) - 10, True)


def test_chunked_body_without_trailers_and_truncation() -> None:
    reader = BodyReader(BodyFraming("chunked"))
    assert reader.feed(b"3\r\nabc\r\n0\r\n") == (11, False)
    assert not reader.feed_eof()
    assert reader.feed(b"\r\n") == (2, True)
    assert reader.feed_eof()


@pytest.mark.parametrize(
    "body",
    [
        b"x\r\n",
        b"\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"1_0\r\n",
        b"5\nhello\r\n",
        b"5\r\nhelloX\r\n",
        b"5\r\nhello\rX",
        b"5\r\nhello\n",
        b"5;a\rb\r\n",
        b"5;a\x00b\r\n",
        b"5\r\r\n",
        b"11111111111111111\r\n",
        b"0\r\nExpires: never\n\r\n",
        b"0\r\nNoColon\r\n\r\n",
        b"0\r\n folded: x\r\n\r\n",
        b"0\r\n\n",
        b"5" + b";" * 1030 + b"\r\n",
        b"0\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n",
    ],
)
def test_chunked_errors(body: bytes) -> None:
    with pytest.raises(LocalProtocolError) as info:
        BodyReader(BodyFraming("chunked")).feed(body)
    assert info.value.http_status == 400
    with pytest.raises(RemoteProtocolError) as remote_info:
        BodyReader(BodyFraming("chunked"), remote=True).feed(body)
    assert remote_info.value.http_status == 502


def test_chunked_errors_across_feeds() -> None:
    reader = BodyReader(BodyFraming("chunked"))
    reader.feed(b"5" + b"0" * 500)
    with pytest.raises(LocalProtocolError):
        reader.feed(b"0" * 600)
    reader = BodyReader(BodyFraming("chunked"))
    assert reader.feed(b"2\r\nab") == (5, False)
    with pytest.raises(LocalProtocolError):
        reader.feed(b"\rX")


def test_chunk_size_line_and_ext_whitespace_tolerated() -> None:
    body = b'a ;ext=1 ; other="q"\t\r\n0123456789\r\nA\r\n0123456789\r\n0 \r\n\r\n'
    assert BodyReader(BodyFraming("chunked")).feed(body + NEXT) == (len(body), True)


def test_length_body() -> None:
    reader = BodyReader(BodyFraming("length", 5))
    assert not reader.done
    assert reader.feed(b"ab") == (2, False)
    assert not reader.feed_eof()
    assert reader.feed(memoryview(b"cdefg")) == (3, True)
    assert reader.done
    assert reader.feed(b"x") == (0, True)
    assert reader.feed_eof()


@pytest.mark.parametrize("framing", [BodyFraming("none"), BodyFraming("length", 0)])
def test_empty_bodies_are_done_at_once(framing: BodyFraming) -> None:
    reader = BodyReader(framing)
    assert reader.done
    assert reader.feed(NEXT) == (0, True)
    assert reader.feed_eof()


def test_close_delimited_body() -> None:
    reader = BodyReader(BodyFraming("close"))
    assert reader.feed(b"abc") == (3, False)
    assert reader.feed(b"") == (0, False)
    assert not reader.done
    assert reader.feed_eof()
    assert reader.done
    assert reader.feed(b"x") == (0, True)


# --------------------------------------------------------------------------- property tests

tokens = st.text(alphabet=TCHARS, min_size=1, max_size=12)
field_values = st.text(
    alphabet=st.characters(min_codepoint=0x09, max_codepoint=0xFF, exclude_characters="\n\r\x7f")
    .filter(lambda ch: ch == "\t" or ord(ch) >= 0x20),
    max_size=30,
).map(lambda value: value.strip(" \t"))  # fmt: skip
targets = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"),
    min_size=1,
    max_size=40,
)
versions = st.sampled_from(["HTTP/1.0", "HTTP/1.1"])
field_lists = st.lists(st.tuples(tokens, field_values), max_size=8).filter(
    lambda fields: sum(name.lower() == "host" for name, _ in fields) <= 1
)


@FUZZ
@given(tokens, targets, field_lists, versions, st.binary(max_size=20))
def test_request_round_trip(
    method: str,
    target: str,
    fields: list[tuple[str, str]],
    version: str,
    rest: bytes,
) -> None:
    raw = render_request_head(method, target, fields, version)
    parsed = parse_request_head(raw + rest)
    assert parsed == (RequestHead(method, target, version, tuple(fields)), len(raw))
    for cut in range(len(raw)):
        assert parse_request_head(raw[:cut]) is None


@FUZZ
@given(
    st.integers(100, 999),
    st.one_of(st.none(), field_values),
    field_lists,
    versions,
    st.binary(max_size=20),
)
def test_response_round_trip(
    status: int, reason: str | None, fields: list[tuple[str, str]], version: str, body: bytes
) -> None:
    raw = render_response(status, reason, fields, body, version)
    parsed = parse_response_head(raw)
    assert parsed is not None
    head, consumed = parsed
    assert raw[consumed:] == body
    assert (head.version, head.status) == (version, status)
    if reason is not None:
        assert head.reason == reason
    assert list(head.headers[: len(fields)]) == fields
    if body and not any(name.lower() == "content-length" for name, _ in fields):
        assert head.headers[len(fields) :] == (("Content-Length", str(len(body))),)


@FUZZ
@given(st.binary(max_size=300))
def test_request_fuzz(data: bytes) -> None:
    status = 0
    try:
        parsed = parse_request_head(data, max_size=200)
    except LocalProtocolError as exc:
        status = exc.http_status
        parsed = None
    assert status in (0, 400, 414, 431, 505)
    if parsed is not None:
        head, consumed = parsed
        assert 0 < consumed <= min(len(data), 200)
        assert data[consumed - 4 : consumed] == b"\r\n\r\n"
        head.keep_alive()
        with contextlib.suppress(LocalProtocolError):
            request_body_framing(head)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [b"GET", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"\r\n", b"\r", b"\n",
             b"Host", b":", b"a", b"\t", b"\x00", b"Connection", b"close", b"\xff"]
        ),
        max_size=40,
    )
)  # fmt: skip
def test_request_fuzz_from_pieces(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    with contextlib.suppress(LocalProtocolError):
        parse_request_head(data)


@FUZZ
@given(st.binary(max_size=300))
def test_response_fuzz(data: bytes) -> None:
    status = 502
    try:
        parsed = parse_response_head(data, max_size=200)
    except RemoteProtocolError as exc:
        status = exc.http_status
        parsed = None
    assert status == 502
    if parsed is not None:
        head, _ = parsed
        head.keep_alive()
        for method in ("GET", "HEAD", "CONNECT"):
            with contextlib.suppress(RemoteProtocolError):
                response_body_framing(head, method)


@FUZZ
@given(st.text(max_size=60))
def test_absolute_uri_and_connect_target_fuzz(text: str) -> None:
    try:
        uri = parse_absolute_uri(text)
    except LocalProtocolError:
        pass
    else:
        assert uri.scheme in ("http", "https")
        assert uri.origin_form.startswith("/")
        assert 1 <= uri.port <= 65535
    try:
        host, port = parse_connect_target(text)
    except LocalProtocolError:
        pass
    else:
        assert host
        assert 1 <= port <= 65535


@FUZZ
@given(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters=":"), max_size=20),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
)
def test_basic_credentials_round_trip(user: str, password: str) -> None:
    assert parse_basic_credentials(basic_credentials(user, password)) == (user, password)


@FUZZ
@given(st.text(max_size=40))
def test_parse_basic_credentials_never_raises(value: str) -> None:
    result = parse_basic_credentials(value)
    assert result is None or len(result) == 2
    parse_basic_credentials("Basic " + value)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5)):
        size = format(len(data), draw(st.sampled_from(["x", "X", "04x"])))
        ext = draw(st.sampled_from([b"", b";a=b", b" ; x", b';q="1;2"']))
        parts.append(size.encode() + ext + b"\r\n" + data + b"\r\n")
    parts.append(b"0" * draw(st.integers(1, 3)) + b"\r\n")
    for name, value in draw(st.lists(st.tuples(tokens, field_values), max_size=3)):
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    parts.append(b"\r\n")
    return b"".join(parts)


@FUZZ
@given(chunked_bodies(), st.lists(st.integers(0, 30), max_size=20), st.binary(max_size=30))
def test_chunked_reader_finds_the_end_across_splits(
    body: bytes, sizes: list[int], rest: bytes
) -> None:
    reader = BodyReader(BodyFraming("chunked"))
    assert feed_all(reader, body + rest, sizes) == len(body)
    assert reader.done


@FUZZ
@given(st.integers(0, 100), st.lists(st.integers(0, 30), max_size=10), st.binary(max_size=150))
def test_length_reader_across_splits(length: int, sizes: list[int], data: bytes) -> None:
    reader = BodyReader(BodyFraming("length", length))
    taken = feed_all(reader, data, sizes)
    assert taken == min(length, len(data))
    assert reader.done is (len(data) >= length)


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans())
def test_chunked_reader_fuzz(pieces: list[bytes], remote: bool) -> None:
    reader = BodyReader(BodyFraming("chunked"), remote=remote)
    expected = RemoteProtocolError if remote else LocalProtocolError
    raised: type[ProtocolError] = expected
    try:
        for piece in pieces:
            used, done = reader.feed(piece)
            assert 0 <= used <= len(piece)
            if done:
                break
    except ProtocolError as exc:
        raised = type(exc)
    assert raised is expected
    reader.feed_eof()
