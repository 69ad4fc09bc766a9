"""Hostile and broken clients against a running pyegress, over real sockets.

One pyegress process serves every listener kind (HTTP, SOCKS5, SOCKS4, auto, with and
without credentials, and with a 2 s ``readTimeout``) for the whole module, so each bad
client is followed by a good one on the same process: the proxy must answer the bad
client exactly, write exactly one close record for it, print no traceback, and go on
serving. Close records are matched to clients by the client's own address.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.clients import http_connect, recv_exact, socks4_connect, socks5_connect
from tests.support.origins import HttpOrigin, TcpOrigin
from tests.support.ports import free_port, wait_port
from tests.support.procs import Pyegress, flat_close

# Listener name -> -L URL template (the port is filled in).
SERVICES = {
    "http": "http://127.0.0.1:{}",
    "socks5": "socks5://127.0.0.1:{}",
    "socks4": "socks4://127.0.0.1:{}",
    "auto": "127.0.0.1:{}",
    "socks5_auth": "socks5://u:p@127.0.0.1:{}",
    "socks4_auth": "socks4://u:p@127.0.0.1:{}",
    "auto_auth": "u:p@127.0.0.1:{}",
    "slow_http": "http://127.0.0.1:{}?readTimeout=2",
    "slow_socks5": "socks5://127.0.0.1:{}?readTimeout=2",
    "slow_socks4": "socks4://127.0.0.1:{}?readTimeout=2",
    "slow_auto": "127.0.0.1:{}?readTimeout=2",
}
SLOW_TIMEOUT = 2.0


@dataclass
class Proxy:
    proc: Pyegress
    ports: dict[str, int]
    origin: TcpOrigin
    http_origin: HttpOrigin
    mark: int = 0

    def new_output(self) -> str:
        """What the process printed since the current test started."""
        return self.proc.output()[self.mark :]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    origin = TcpOrigin().start()
    http_origin = HttpOrigin().start()
    ports = {name: free_port() for name in SERVICES}
    args: list[str] = []
    for name, url in SERVICES.items():
        args += ["-L", url.format(ports[name])]
    proc = Pyegress(args, tmp_path_factory.mktemp("bad-input"))
    try:
        for port in ports.values():
            try:
                wait_port("127.0.0.1", port, 15)
            except TimeoutError:
                raise AssertionError(f"pyegress did not start:\n{proc.output()}") from None
        yield Proxy(proc, ports, origin, http_origin)
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()
        origin.stop()
        http_origin.stop()


@pytest.fixture
def proxy(shared: Proxy) -> Iterator[Proxy]:
    assert shared.proc.proc.poll() is None, f"pyegress died:\n{shared.proc.output()[-3000:]}"
    shared.mark = len(shared.proc.output())
    yield shared
    out = shared.new_output()
    assert "Traceback" not in out, out
    assert '"handler_bug"' not in out, out


# --------------------------------------------------------------------------- helpers


def connect(proxy: Proxy, listener: str, timeout: float = 5.0) -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", proxy.ports[listener]), timeout=timeout)
    host, port = sock.getsockname()[:2]
    return sock, f"{host}:{port}"


def read_to_close(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything the proxy sends until it closes: ``(bytes, "eof" | "reset")``."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(buf), "reset"
        except TimeoutError:
            raise AssertionError(
                f"the proxy did not close within {timeout}s; got {bytes(buf)[:200]!r}"
            ) from None
        if not chunk:
            return bytes(buf), "eof"
        buf += chunk


def exchange(
    proxy: Proxy, listener: str, *messages: bytes, shut: bool = False
) -> tuple[bytes, str]:
    """Send ``messages`` on a fresh connection; return (all bytes until close, client)."""
    sock, client = connect(proxy, listener)
    with sock:
        for message in messages:
            try:
                sock.sendall(message)
            except (BrokenPipeError, ConnectionResetError):
                break
        if shut:
            sock.shutdown(socket.SHUT_WR)
        data, _ = read_to_close(sock)
    return data, client


def records_for(proxy: Proxy, listener: str, client: str) -> list[dict[str, Any]]:
    """Close records of ``client`` on ``listener`` written since the test started (a
    client port is reused across listeners, so the address alone is not enough)."""
    service = f"service-{list(SERVICES).index(listener)}"
    out = []
    for line in proxy.new_output().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # not a record, or a line still being written
            continue
        if not isinstance(record, dict) or record.get("event") != "close":
            continue
        record = flat_close(record)
        if (
            record.get("event") == "close"
            and record.get("client") == client
            and record.get("service") == service
        ):
            out.append(record)
    return out


def close_record(proxy: Proxy, listener: str, client: str, timeout: float = 5.0) -> dict[str, Any]:
    """The close record of ``client``'s connection to ``listener`` (waits for it)."""
    deadline = time.monotonic() + timeout
    found = records_for(proxy, listener, client)
    while not found and time.monotonic() < deadline:
        time.sleep(0.02)
        found = records_for(proxy, listener, client)
    assert found, f"no tunnel_closed record for {client}:\n{proxy.new_output()[-3000:]}"
    return found[0]


def echo_through(sock: socket.socket) -> None:
    sock.sendall(b"ECHO\nping")
    assert recv_exact(sock, 4) == b"ping"
    sock.sendall(b"pong")
    assert recv_exact(sock, 4) == b"pong"


def _socks5_userpass(port: int, user: str, password: str, target_port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"\x05\x01\x02")
    assert recv_exact(sock, 2) == b"\x05\x02"
    sock.sendall(
        bytes((1, len(user))) + user.encode() + bytes((len(password),)) + password.encode()
    )
    assert recv_exact(sock, 2) == b"\x01\x00"
    sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", target_port))
    reply = recv_exact(sock, 10)
    assert reply[:2] == b"\x05\x00", reply
    return sock


def assert_serves(proxy: Proxy, listener: str) -> None:
    """A good client gets a working ECHO tunnel through ``listener``."""
    address = ("127.0.0.1", proxy.ports[listener])
    origin = proxy.origin
    target = f"127.0.0.1:{origin.port}"
    if listener in ("http", "auto", "slow_http", "slow_auto"):
        sock, head = http_connect(address, target, timeout=5)
        assert head.startswith(b"HTTP/1.1 200 "), head
    elif listener in ("socks5", "slow_socks5"):
        sock, rep = socks5_connect(address, "127.0.0.1", origin.port, timeout=5)
        assert rep == 0
    elif listener in ("socks4", "slow_socks4"):
        sock, rep = socks4_connect(address, "127.0.0.1", origin.port, timeout=5)
        assert rep == 90
    elif listener == "socks5_auth":
        sock = _socks5_userpass(address[1], "u", "p", origin.port)
    elif listener == "auto_auth":
        sock = socket.create_connection(address, timeout=5)
        creds = base64.b64encode(b"u:p").decode()
        sock.sendall(
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            f"Proxy-Authorization: Basic {creds}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 "), head
    else:  # socks4_auth serves nobody (SOCKS4 has no password): check the HTTP listener
        assert_serves(proxy, "http")
        return
    with sock:
        echo_through(sock)


def check_after(proxy: Proxy, listener: str, client: str) -> dict[str, Any]:
    """The bad client's single close record, after a good client was served."""
    record = close_record(proxy, listener, client)
    assert_serves(proxy, listener)
    found = records_for(proxy, listener, client)
    assert len(found) == 1, found
    assert proxy.proc.proc.poll() is None, proxy.new_output()
    return record


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {data[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, body


# --------------------------------------------------------------------------- HTTP


def _http_cases(origin_port: int, web_port: int) -> dict[str, tuple[bytes, int]]:
    target = f"127.0.0.1:{origin_port}"
    web = f"127.0.0.1:{web_port}"
    connect_line = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode()
    many_headers = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"v" * 40) for i in range(1500))
    return {
        "garbage": (b"GARBAGE\r\n\r\n", 400),
        "method_only": (b"GET\r\n\r\n", 400),
        "two_tokens": (b"GET http://x/\r\n\r\n", 400),
        "connect_without_port": (b"CONNECT host HTTP/1.1\r\nHost: host\r\n\r\n", 400),
        "connect_empty_host": (b"CONNECT :80 HTTP/1.1\r\nHost: :80\r\n\r\n", 400),
        "connect_port_too_big": (b"CONNECT h:99999 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        "connect_port_zero": (b"CONNECT h:0 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        "connect_port_not_number": (b"CONNECT h:http HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        "connect_url_target": (f"CONNECT http://{target}/ HTTP/1.1\r\n\r\n".encode(), 400),
        "connect_http2": (f"CONNECT {target} HTTP/2.0\r\nHost: {target}\r\n\r\n".encode(), 505),
        "get_http2": (f"GET http://{web}/ HTTP/2.0\r\nHost: {web}\r\n\r\n".encode(), 505),
        "version_garbage": (f"CONNECT {target} HTCPCP/1.0\r\n\r\n".encode(), 400),
        "header_without_colon": (connect_line + b"NoColonHere\r\n\r\n", 400),
        "obs_fold": (connect_line + b"X-A: a\r\n  folded\r\n\r\n", 400),
        "space_before_colon": (connect_line + b"X-A : a\r\n\r\n", 400),
        "nul_in_target": (f"GET http://{web}/a\x00b HTTP/1.1\r\n\r\n".encode(), 400),
        "nul_in_header_value": (connect_line + b"X-A: a\x00b\r\n\r\n", 400),
        "nul_in_header_name": (connect_line + b"X-\x00A: b\r\n\r\n", 400),
        "nul_in_method": (f"CON\x00NECT {target} HTTP/1.1\r\n\r\n".encode(), 400),
        "two_host_headers": (
            f"GET http://{web}/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".encode(),
            400,
        ),
        "huge_header": (connect_line + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n", 431),
        "many_headers": (connect_line + many_headers + b"\r\n", 431),
        "long_target": (
            b"GET http://127.0.0.1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
        ),
        "origin_form_to_proxy": (f"GET /relative HTTP/1.1\r\nHost: {web}\r\n\r\n".encode(), 400),
        "absolute_https_without_connect": (
            f"GET https://{web}/ HTTP/1.1\r\nHost: {web}\r\n\r\n".encode(),
            400,
        ),
        "ftp_url": (f"GET ftp://{web}/ HTTP/1.1\r\nHost: {web}\r\n\r\n".encode(), 400),
        "userinfo_in_url": (f"GET http://a:b@{web}/ HTTP/1.1\r\n\r\n".encode(), 400),
        "smuggling_cl_and_te": (
            f"POST http://{web}/ HTTP/1.1\r\nHost: {web}\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
            400,
        ),
        "smuggling_conflicting_lengths": (
            f"POST http://{web}/ HTTP/1.1\r\nHost: {web}\r\nContent-Length: 1\r\n"
            "Content-Length: 2\r\n\r\nab".encode(),
            400,
        ),
        "smuggling_te_not_chunked_last": (
            f"POST http://{web}/ HTTP/1.1\r\nHost: {web}\r\n"
            "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".encode(),
            400,
        ),
    }


HTTP_CASES = list(_http_cases(1, 1))


@pytest.mark.parametrize("listener", ["http", "auto"])
@pytest.mark.parametrize("case", HTTP_CASES)
def test_malformed_http_request_is_refused(proxy: Proxy, listener: str, case: str) -> None:
    raw, expected = _http_cases(proxy.origin.port, proxy.http_origin.port)[case]
    before = len(proxy.http_origin.requests)
    data, client = exchange(proxy, listener, raw)
    status, headers, body = parse_response(data)
    assert status == expected, data[:300]
    assert headers.get("connection", "").lower() == "close", data[:300]
    assert headers.get("content-length") == "0", data[:300]
    assert body == b"", data[:300]
    record = check_after(proxy, listener, client)
    assert record["reason"] == "malformed", record
    assert record.get("status") == expected, record
    assert record["bytes_up"] == 0, record
    assert record["bytes_down"] == 0, record
    # Nothing malformed is ever passed on to an origin.
    assert len(proxy.http_origin.requests) == before


def test_pipelined_bytes_after_refusal_are_not_served(proxy: Proxy) -> None:
    """A request after a refused one on the same connection is never answered."""
    web = f"127.0.0.1:{proxy.http_origin.port}"
    good = f"GET http://{web}/bytes/3 HTTP/1.1\r\nHost: {web}\r\n\r\n".encode()
    before = len(proxy.http_origin.requests)
    data, client = exchange(proxy, "http", b"GARBAGE\r\n\r\n" + good)
    status, _, body = parse_response(data)
    assert status == 400
    assert body == b"", data
    assert check_after(proxy, "http", client)["reason"] == "malformed"
    assert len(proxy.http_origin.requests) == before


def test_http_truncated_head_then_close(proxy: Proxy) -> None:
    target = f"127.0.0.1:{proxy.origin.port}"
    data, client = exchange(
        proxy, "http", f"CONNECT {target} HTTP/1.1\r\nHost: ".encode(), shut=True
    )
    if data:
        status, headers, _ = parse_response(data)
        assert status == 400
        assert headers.get("connection") == "close"
    record = check_after(proxy, "http", client)
    assert record["reason"] == "malformed", record


def test_bare_lf_request_is_answered_promptly(proxy: Proxy) -> None:
    """Bare LF line ends: RFC 9112 section 2.2 lets a recipient accept them (gost, via Go's
    net/http, does) or reject them; leaving the client hanging until readTimeout is
    neither."""
    web = f"127.0.0.1:{proxy.http_origin.port}"
    sock, client = connect(proxy, "http", timeout=3)
    with sock:
        sock.sendall(
            f"GET http://{web}/bytes/3 HTTP/1.1\nHost: {web}\nConnection: close\n\n".encode()
        )
        started = time.monotonic()
        sock.settimeout(2)
        try:
            first = sock.recv(65536)
        except TimeoutError:
            first = b""
        waited = time.monotonic() - started
    assert first.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 400 ")), (waited, first)
    check_after(proxy, "http", client)


# --------------------------------------------------------------------------- SOCKS5

IPV4_ORIGIN = b"\x01\x7f\x00\x00\x01"


def _socks5_reply(data: bytes, code: int) -> None:
    assert len(data) == 10, data
    assert data[:4] == bytes((5, code, 0, 1)), data


@pytest.mark.parametrize(
    "greeting",
    [b"\x06\x01\x00", b"\x00\x01\x00", b"\x05\x00"],
    ids=["version_6", "version_0", "nmethods_0"],
)
def test_socks5_bad_greeting(proxy: Proxy, greeting: bytes) -> None:
    """Wrong version, or no method offered: no method is chosen, the proxy closes."""
    data, client = exchange(proxy, "socks5", greeting)
    assert data in (b"", b"\x05\xff"), data
    record = check_after(proxy, "socks5", client)
    assert record["reason"] == "malformed", record


@pytest.mark.parametrize("listener", ["socks5", "auto"])
def test_socks5_only_unsupported_methods(proxy: Proxy, listener: str) -> None:
    data, client = exchange(proxy, listener, b"\x05\x02\x01\x03")  # GSSAPI, CHAP
    assert data == b"\x05\xff"
    record = check_after(proxy, listener, client)
    assert record["reason"] in ("unsupported", "auth_failed"), record


def _request(command: int, address: bytes, port: int) -> bytes:
    return bytes((5, command, 0)) + address + struct.pack("!H", port)


SOCKS5_BAD_REQUESTS = [
    ("bad_atyp", b"\x05\x01\x00\x07\x7f\x00\x00\x01\x00\x50", 8, "malformed"),
    ("atyp_zero", b"\x05\x01\x00\x00\x7f\x00\x00\x01\x00\x50", 8, "malformed"),
    ("domain_length_0", b"\x05\x01\x00\x03\x00\x00\x50", 1, "malformed"),
    ("domain_with_slash", b"\x05\x01\x00\x03\x03a/b\x00\x50", 1, "malformed"),
    ("domain_with_nul", b"\x05\x01\x00\x03\x03a\x00b\x00\x50", 1, "malformed"),
    ("request_version_4", b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", 1, "malformed"),
    ("connect_port_0", b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00", 1, "malformed"),
    ("bind", _request(2, IPV4_ORIGIN, 80), 7, "unsupported"),
    ("udp_associate", _request(3, IPV4_ORIGIN, 0), 7, "unsupported"),
    ("command_9", _request(9, IPV4_ORIGIN, 80), 7, "unsupported"),
    ("command_0", _request(0, IPV4_ORIGIN, 80), 7, "unsupported"),
]


@pytest.mark.parametrize("listener", ["socks5", "auto"])
@pytest.mark.parametrize(
    ("name", "request_bytes", "code", "reason"),
    SOCKS5_BAD_REQUESTS,
    ids=[case[0] for case in SOCKS5_BAD_REQUESTS],
)
def test_socks5_bad_request(
    proxy: Proxy, listener: str, name: str, request_bytes: bytes, code: int, reason: str
) -> None:
    sock, client = connect(proxy, listener)
    with sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(request_bytes)
        data, _ = read_to_close(sock)
    _socks5_reply(data, code)
    record = check_after(proxy, listener, client)
    assert record["reason"] == reason, record
    assert record["bytes_up"] == 0, record
    assert record["bytes_down"] == 0, record
    # README: status is the SOCKS reply sent.
    assert record.get("status") == code, record


def test_socks5_wrong_password(proxy: Proxy) -> None:
    sock, client = connect(proxy, "socks5_auth")
    with sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x01u\x05wrong")
        data, _ = read_to_close(sock)
    assert data == b"\x01\x01"
    record = check_after(proxy, "socks5_auth", client)
    assert record["reason"] == "auth_failed", record
    assert "wrong" not in proxy.new_output()


def test_socks5_wrong_user(proxy: Proxy) -> None:
    sock, client = connect(proxy, "socks5_auth")
    with sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x01x\x01p")
        data, _ = read_to_close(sock)
    assert data == b"\x01\x01"
    assert check_after(proxy, "socks5_auth", client)["reason"] == "auth_failed"


def test_socks5_no_auth_offered_to_auth_service(proxy: Proxy) -> None:
    data, client = exchange(proxy, "socks5_auth", b"\x05\x01\x00")
    assert data == b"\x05\xff"
    assert check_after(proxy, "socks5_auth", client)["reason"] == "auth_failed"


def test_socks5_bad_userpass_version(proxy: Proxy) -> None:
    sock, client = connect(proxy, "socks5_auth")
    with sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x05\x01u\x01p")
        data, _ = read_to_close(sock)
    assert data in (b"", b"\x01\x01"), data
    assert check_after(proxy, "socks5_auth", client)["reason"] == "malformed"


@pytest.mark.parametrize(
    ("listener", "steps"),
    [
        ("socks5", [b"\x05\x02\x00"]),  # says two methods, sends one
        ("socks5", [b"\x05"]),
        ("auto", [b"\x05\x01"]),
        ("socks5", [b"\x05\x01\x00", b"\x05\x01\x00\x03\x0aexam"]),  # half a domain
        ("socks5", [b"\x05\x01\x00", b"\x05\x01\x00\x01\x7f\x00"]),  # half an IPv4
        ("auto", [b"\x05\x01\x00", b"\x05\x01"]),
        ("socks5_auth", [b"\x05\x01\x02", b"\x01\x05us"]),  # half a user name
    ],
    ids=["greeting", "version_only", "auto_greeting", "domain", "ipv4", "auto_request", "user"],
)
def test_socks5_truncated_handshake(proxy: Proxy, listener: str, steps: list[bytes]) -> None:
    """Half a handshake, then the client's FIN: the proxy closes, reason malformed."""
    sock, client = connect(proxy, listener)
    with sock:
        for i, step in enumerate(steps):
            sock.sendall(step)
            if i + 1 < len(steps):
                assert recv_exact(sock, 2) in (b"\x05\x00", b"\x05\x02")
        sock.shutdown(socket.SHUT_WR)
        data, _ = read_to_close(sock)
    # Nothing, or a general-failure reply before closing.
    if data:
        _socks5_reply(data, 1)
    record = check_after(proxy, listener, client)
    assert record["reason"] == "malformed", record


def test_socks5_truncated_then_full_close(proxy: Proxy) -> None:
    """The client disappears entirely (close, not just FIN) in mid-request."""
    sock, client = connect(proxy, "socks5")
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x03\x0aexam")
    sock.close()
    record = check_after(proxy, "socks5", client)
    assert record["reason"] in ("malformed", "client_reset"), record


# --------------------------------------------------------------------------- SOCKS4


def _socks4_rejected(data: bytes, record: dict[str, Any]) -> None:
    """A SOCKS4 rejection is reply 91 (8 bytes, recorded as status 91) or, for garbage,
    a plain close."""
    if data:
        assert len(data) == 8, data
        assert data[:2] == b"\x00\x5b", data
        assert record.get("status") == 91, record


def test_socks4_wrong_version(proxy: Proxy) -> None:
    data, client = exchange(proxy, "socks4", b"\x05\x01\x00\x50\x7f\x00\x00\x01u\x00")
    record = check_after(proxy, "socks4", client)
    assert record["reason"] == "malformed", record
    _socks4_rejected(data, record)


@pytest.mark.parametrize("listener", ["socks4", "auto"])
def test_socks4_user_id_without_nul(proxy: Proxy, listener: str) -> None:
    request = b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"A" * 4000
    data, client = exchange(proxy, listener, request)
    record = check_after(proxy, listener, client)
    assert record["reason"] == "malformed", record
    _socks4_rejected(data, record)


@pytest.mark.parametrize("listener", ["socks4", "auto"])
def test_socks4a_host_without_nul(proxy: Proxy, listener: str) -> None:
    request = b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00" + b"h" * 4000
    data, client = exchange(proxy, listener, request)
    record = check_after(proxy, listener, client)
    assert record["reason"] == "malformed", record
    _socks4_rejected(data, record)


SOCKS4_BAD_REQUESTS = [
    ("bind", b"\x04\x02\x00\x50\x7f\x00\x00\x01u\x00", "unsupported"),
    ("command_9", b"\x04\x09\x00\x50\x7f\x00\x00\x01u\x00", "unsupported"),
    ("connect_port_0", b"\x04\x01\x00\x00\x7f\x00\x00\x01u\x00", "malformed"),
    ("4a_bad_name", b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00a/b\x00", "malformed"),
    ("4a_empty_name", b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00\x00", "malformed"),
]


@pytest.mark.parametrize("listener", ["socks4", "auto"])
@pytest.mark.parametrize(
    ("name", "request_bytes", "reason"),
    SOCKS4_BAD_REQUESTS,
    ids=[case[0] for case in SOCKS4_BAD_REQUESTS],
)
def test_socks4_bad_request_gets_91(
    proxy: Proxy, listener: str, name: str, request_bytes: bytes, reason: str
) -> None:
    data, client = exchange(proxy, listener, request_bytes)
    assert len(data) == 8, data
    assert data[:2] == b"\x00\x5b", data
    record = check_after(proxy, listener, client)
    assert record["reason"] == reason, record
    assert record.get("status") == 91, record


@pytest.mark.parametrize("listener", ["socks4_auth", "auto_auth"])
def test_socks4_on_service_with_credentials(proxy: Proxy, listener: str) -> None:
    port = proxy.origin.port
    request = b"\x04\x01" + struct.pack("!H", port) + b"\x7f\x00\x00\x01u\x00"
    data, client = exchange(proxy, listener, request)
    assert len(data) == 8, data
    assert data[:2] == b"\x00\x5b", data
    record = check_after(proxy, listener, client)
    assert record["reason"] == "auth_failed", record
    assert record.get("status") == 91, record
    assert record["bytes_down"] == 0, record


@pytest.mark.parametrize("listener", ["socks4", "auto"])
def test_socks4_truncated_request(proxy: Proxy, listener: str) -> None:
    data, client = exchange(proxy, listener, b"\x04\x01\x00\x50\x7f", shut=True)
    record = check_after(proxy, listener, client)
    assert record["reason"] == "malformed", record
    _socks4_rejected(data, record)


# --------------------------------------------------------------------------- slow clients


def dribble(
    sock: socket.socket,
    data: bytes,
    interval: float = 1.0,
    limit: float = 8.0,
    after_first: Callable[[], None] | None = None,
) -> tuple[bytes, float]:
    """Send ``data`` one byte per ``interval`` until the proxy closes.

    Returns what the proxy sent and the seconds from the first byte to the close;
    ``after_first`` runs once, right after the first byte went out.
    """
    start = time.monotonic()
    received = bytearray()
    sent = 0
    next_send = start
    while True:
        now = time.monotonic()
        if now - start > limit:
            raise AssertionError(f"not cut off after {limit}s; got {bytes(received)!r}")
        if sent < len(data) and now >= next_send:
            try:
                sock.send(data[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                sent = len(data)
            else:
                sent += 1
                next_send += interval
                if sent == 1 and after_first is not None:
                    after_first()
        wait = max(0.0, min(next_send - time.monotonic(), 0.1)) if sent < len(data) else 0.1
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return bytes(received), time.monotonic() - start
            if not chunk:
                return bytes(received), time.monotonic() - start
            received += chunk


def _good_tunnel_while_pending(proxy: Proxy, listener: str) -> Callable[[], None]:
    def run() -> None:
        started = time.monotonic()
        assert_serves(proxy, listener)
        assert time.monotonic() - started < 1.0, "a slow client held up a good one"

    return run


@pytest.mark.parametrize("listener", ["slow_http", "slow_auto"])
def test_slow_http_client_gets_408(proxy: Proxy, listener: str) -> None:
    target = f"127.0.0.1:{proxy.origin.port}"
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    sock, client = connect(proxy, listener)
    with sock:
        data, elapsed = dribble(
            sock, request, after_first=_good_tunnel_while_pending(proxy, listener)
        )
    assert SLOW_TIMEOUT - 0.5 <= elapsed <= SLOW_TIMEOUT + 2.5, elapsed
    status, headers, body = parse_response(data)
    assert status == 408, data
    assert headers.get("connection") == "close"
    assert body == b""
    record = check_after(proxy, listener, client)
    assert record["reason"] == "handshake_timeout", record
    assert record.get("status") == 408, record


@pytest.mark.parametrize(
    ("listener", "request_bytes"),
    [
        ("slow_socks5", b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),
        ("slow_socks4", b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00"),
    ],
)
def test_slow_socks_client_is_cut_off(proxy: Proxy, listener: str, request_bytes: bytes) -> None:
    sock, client = connect(proxy, listener)
    with sock:
        data, elapsed = dribble(
            sock, request_bytes, after_first=_good_tunnel_while_pending(proxy, listener)
        )
    assert SLOW_TIMEOUT - 0.5 <= elapsed <= SLOW_TIMEOUT + 2.5, elapsed
    # The request never completed: at most the method choice went out, never a success.
    assert data in (b"", b"\x05\x00") or (listener == "slow_socks4" and data[:2] == b"\x00\x5b")
    record = check_after(proxy, listener, client)
    assert record["reason"] == "handshake_timeout", record


def test_silent_clients_are_closed_after_the_timeout(proxy: Proxy) -> None:
    listeners = ["slow_http", "slow_socks5", "slow_socks4", "slow_auto"]
    socks = {name: connect(proxy, name) for name in listeners}
    start = time.monotonic()
    # Meanwhile a good client is served on every listener.
    for name in listeners:
        assert_serves(proxy, name)
    assert time.monotonic() - start < SLOW_TIMEOUT - 0.5
    for name, (sock, client) in socks.items():
        with sock:
            data, _ = read_to_close(sock, timeout=SLOW_TIMEOUT + 3)
        elapsed = time.monotonic() - start
        assert elapsed >= SLOW_TIMEOUT - 0.5, (name, elapsed)
        assert elapsed <= SLOW_TIMEOUT + 2.5, (name, elapsed)
        if name == "slow_http":
            if data:
                assert parse_response(data)[0] == 408, data
        else:
            assert data == b"", (name, data)
        record = check_after(proxy, name, client)
        assert record["reason"] == "handshake_timeout", (name, record)


def test_proxy_survives_the_whole_module(proxy: Proxy) -> None:
    """Last check: after everything above the process is alive, clean and serving."""
    for name in ("http", "socks5", "socks4", "auto", "socks5_auth", "auto_auth"):
        assert_serves(proxy, name)
    out = proxy.proc.output()
    assert "Traceback" not in out
    assert '"handler_bug"' not in out
    assert '"internal_error"' not in out
