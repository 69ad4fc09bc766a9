"""Real clients through pyegress: curl over every listener, with the origins of conftest.

curl is the judge of the wire: it fails on a malformed status line, a body cut short or
framed wrongly, a TLS handshake broken by a stray byte. Each test checks what curl got
(status, CONNECT status, body byte for byte, which connection carried which request) and
what pyegress wrote about it (one ``tunnel_closed`` record per tunnel).
"""

from __future__ import annotations

import base64
import hashlib
import random
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import LOOPS, PyegressFactory
from tests.support import curl as curlmod
from tests.support.clients import recv_all, recv_exact, recv_until
from tests.support.curl import CurlRun, curl, curl_steps
from tests.support.origins import HttpOrigin, TcpOrigin, pattern
from tests.support.ports import free_port, wait_port
from tests.support.procs import ROOT, Pyegress

pytestmark = pytest.mark.skipif(not curlmod.available(), reason="curl is not installed")

MB = 1024 * 1024


def _port(p: Pyegress, index: int = 0) -> int:
    return int(p.ports[index])


def _ok(run: CurlRun, p: Pyegress | None = None) -> None:
    log = f"\npyegress log:\n{p.output()[-4000:]}" if p is not None else ""
    assert run.returncode == 0, run.describe() + log
    assert run.transfers, run.describe() + log


def _client(run: CurlRun, index: int = 0) -> str:
    """The ``client`` field pyegress writes for curl's connection of transfer ``index``."""
    info = run.transfers[index].info
    ip = info["local_ip"]
    return f"[{ip}]:{info['local_port']}" if ":" in ip else f"{ip}:{info['local_port']}"


# -- HTTP listener: CONNECT ------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_curl_connect_to_tls_origin_is_byte_exact(
    pyegress: PyegressFactory, tls_origin: HttpOrigin, ca_file: Path, tmp_path: Path, loop: str
) -> None:
    size = 8 * MB
    p = pyegress(["-L", "http://127.0.0.1:{0}"], loop=loop)
    url = f"https://localhost:{tls_origin.port}/bytes/{size}"
    run = curl(
        tmp_path, [url], "-p", "-x", f"http://127.0.0.1:{_port(p)}", "--cacert", str(ca_file)
    )
    _ok(run, p)
    t = run.only
    assert t.http_connect == 200
    assert t.http_code == 200
    assert len(t.body) == size
    assert hashlib.sha256(t.body).digest() == hashlib.sha256(pattern(size)).digest()
    assert "HTTP/1.1 200 Connection established" in run.headers
    record = p.record(kind="http-connect")
    assert record["status"] == 200
    assert record["target"] == f"localhost:{tls_origin.port}"
    assert record["client"] == _client(run)
    assert record["reason"] == "eof"
    # TLS adds records and the handshake on top of the body.
    assert size < record["bytes_down"] < size + 256 * 1024
    assert 0 < record["bytes_up"] < 64 * 1024
    assert tls_origin.requests == [("GET", f"/bytes/{size}", f"localhost:{tls_origin.port}")]


# -- HTTP listener: absolute-URI forwarding --------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_curl_absolute_uri_get(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path, loop: str
) -> None:
    size = 5 * MB
    p = pyegress(["-L", "http://127.0.0.1:{0}"], loop=loop)
    url = f"http://127.0.0.1:{http_origin.port}/bytes/{size}"
    run = curl(tmp_path, [url], "-x", f"http://127.0.0.1:{_port(p)}")
    _ok(run, p)
    assert run.only.http_code == 200
    assert run.only.body == pattern(size)
    # The origin sees origin-form, with the client's Host.
    assert http_origin.requests == [("GET", f"/bytes/{size}", f"127.0.0.1:{http_origin.port}")]
    record = p.record(kind="http-forward")
    assert record["status"] == 200
    assert record["target"] == f"127.0.0.1:{http_origin.port}"
    assert record["client"] == _client(run)
    assert size < record["bytes_down"] < size + 4096


def test_curl_chunked_response_then_keep_alive(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    size = 3 * MB + 17
    p = pyegress(["-L", "http://127.0.0.1:{0}"])
    base = f"http://127.0.0.1:{http_origin.port}"
    run = curl(
        tmp_path,
        [f"{base}/chunked/{size}", f"{base}/bytes/1000"],
        "-x",
        f"http://127.0.0.1:{_port(p)}",
    )
    _ok(run, p)
    first, second = run.transfers
    assert first.http_code == 200
    assert first.body == pattern(size)
    assert "transfer-encoding: chunked" in run.headers.lower()
    # The chunked body (with its trailer) ended exactly: the connection carries on.
    assert second.http_code == 200
    assert second.body == pattern(1000)
    assert [first.num_connects, second.num_connects] == [1, 0]
    records = p.matching(2, kind="http-forward")
    assert [r["status"] for r in records] == [200, 200]
    assert {r["client"] for r in records} == {_client(run)}


def test_curl_close_delimited_response(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    size = 3 * MB + 5
    p = pyegress(["-L", "http://127.0.0.1:{0}"])
    base = f"http://127.0.0.1:{http_origin.port}"
    run = curl(
        tmp_path, [f"{base}/close/{size}", f"{base}/bytes/10"], "-x", f"http://127.0.0.1:{_port(p)}"
    )
    _ok(run, p)
    first, second = run.transfers
    assert first.http_code == 200
    assert first.body == pattern(size)
    # A body that ends with the connection cannot leave the client connection reusable.
    assert "connection: close" in run.headers.lower().split("\r\n\r\n")[0]
    assert second.body == pattern(10)
    assert second.num_connects == 1
    assert len(http_origin.requests) == 2


def test_curl_head_then_get_on_the_same_connection(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    p = pyegress(["-L", "http://127.0.0.1:{0}"])
    proxy = ["-x", f"http://127.0.0.1:{_port(p)}"]
    base = f"http://127.0.0.1:{http_origin.port}"
    run = curl_steps(
        tmp_path,
        [([f"{base}/bytes/1000000"], ["-I", *proxy]), ([f"{base}/bytes/1000"], proxy)],
        timeout=10,
    )
    _ok(run, p)
    head, get = run.transfers
    assert head.http_code == 200
    # A HEAD response announces a length but has no body: the proxy must not wait for one.
    assert "content-length: 1000000" in run.headers.lower()
    assert head.info["size_download"] == 0
    assert get.http_code == 200
    assert get.body == pattern(1000)
    assert get.num_connects == 0
    assert [r[0] for r in http_origin.requests] == ["HEAD", "GET"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_curl_post_body(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path, chunked: bool
) -> None:
    body = random.Random(3).randbytes(3 * MB + 11)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body)
    p = pyegress(["-L", "http://127.0.0.1:{0}"])
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    base = f"http://127.0.0.1:{http_origin.port}"
    run = curl_steps(
        tmp_path,
        [
            (
                [f"{base}/echo"],
                ["-x", f"http://127.0.0.1:{_port(p)}", "--data-binary", f"@{upload}", *extra],
            ),
            ([f"{base}/bytes/100"], ["-x", f"http://127.0.0.1:{_port(p)}"]),
        ],
    )
    _ok(run, p)
    post, get = run.transfers
    assert post.http_code == 200
    assert post.body == f"{hashlib.sha256(body).hexdigest()} {len(body)}".encode()
    # (With chunked framing curl counts the chunk heads too.)
    assert post.info["size_upload"] >= len(body)
    # After the whole body went through, the connection is good for the next request.
    assert get.body == pattern(100)
    assert get.num_connects == 0
    assert [r[:2] for r in http_origin.requests] == [("POST", "/echo"), ("GET", "/bytes/100")]
    record = p.matching(2, kind="http-forward")[0]
    assert record["status"] == 200
    assert record["bytes_up"] > len(body)


@pytest.mark.parametrize("loop", LOOPS)
def test_curl_keep_alive_three_urls_one_connection(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path, loop: str
) -> None:
    p = pyegress(["-L", "http://127.0.0.1:{0}"], loop=loop)
    base = f"http://127.0.0.1:{http_origin.port}"
    sizes = [1000, 200000, 3]
    run = curl(tmp_path, [f"{base}/bytes/{n}" for n in sizes], "-x", f"http://127.0.0.1:{_port(p)}")
    _ok(run, p)
    assert [t.body for t in run.transfers] == [pattern(n) for n in sizes]
    assert [t.num_connects for t in run.transfers] == [1, 0, 0]
    records = p.matching(3, kind="http-forward")
    assert len(records) == 3
    # One accepted client connection carried all three requests.
    assert {r["client"] for r in records} == {_client(run)}
    assert len(http_origin.requests) == 3


def test_curl_keep_alive_routes_each_request_by_its_own_host(
    pyegress: PyegressFactory, tmp_path: Path
) -> None:
    a, b = HttpOrigin().start(), HttpOrigin().start()
    try:
        p = pyegress(["-L", "http://127.0.0.1:{0}"])
        urls = [
            f"http://127.0.0.1:{a.port}/host",
            f"http://127.0.0.1:{b.port}/host",
            f"http://127.0.0.1:{a.port}/host",
        ]
        run = curl(tmp_path, urls, "-x", f"http://127.0.0.1:{_port(p)}")
        _ok(run, p)
        assert [t.body for t in run.transfers] == [
            f"127.0.0.1:{a.port}".encode(),
            f"127.0.0.1:{b.port}".encode(),
            f"127.0.0.1:{a.port}".encode(),
        ]
        assert [t.num_connects for t in run.transfers] == [1, 0, 0]
        assert a.requests == [("GET", "/host", f"127.0.0.1:{a.port}")] * 2
        assert b.requests == [("GET", "/host", f"127.0.0.1:{b.port}")]
        records = p.matching(3, kind="http-forward")
        assert [r["target"] for r in records] == [u.split("/")[2] for u in urls]
        assert {r["client"] for r in records} == {_client(run)}
    finally:
        a.stop()
        b.stop()


class _HeadCapture:
    """An origin that keeps every request head it gets and answers ``200 ok``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.heads: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.heads.append(recv_until(conn, b"\r\n\r\n"))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                except (OSError, EOFError, ValueError):
                    pass

    def stop(self) -> None:
        self.sock.close()
        self._thread.join(5)


# -- Proxy authentication --------------------------------------------------------------

SECRET = "s3cret-Pw9"
WRONG = "wr0ng-Guess7"


def _assert_no_secret(p: Pyegress, *secrets: str) -> None:
    out = p.output()
    for secret in secrets:
        assert secret not in out, f"{secret!r} leaked into the pyegress output:\n{out}"


@pytest.mark.parametrize("form", ["userinfo", "auth-param"])
def test_http_proxy_auth(
    pyegress: PyegressFactory,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
    form: str,
) -> None:
    b64 = base64.b64encode(f"user:{SECRET}".encode()).decode()
    if form == "userinfo":
        node = f"http://user:{SECRET}@127.0.0.1:{{0}}"
    else:
        node = f"http://127.0.0.1:{{0}}?auth={b64}"
    p = pyegress(["-D", "-L", node])
    proxy = ["-x", f"http://127.0.0.1:{_port(p)}"]
    plain = f"http://127.0.0.1:{http_origin.port}/bytes/1000"
    tls = f"https://localhost:{tls_origin.port}/bytes/1000"
    tls_opts = ["-p", "--cacert", str(ca_file)]

    # No credentials: 407 with a Basic challenge, for a forward and for CONNECT.
    run = curl(tmp_path, [plain], *proxy)
    assert run.only.http_code == 407, run.describe()
    assert 'proxy-authenticate: basic realm="' in run.headers.lower()
    run = curl(tmp_path, [tls], *proxy, *tls_opts)
    assert run.only.http_connect == 407, run.describe()
    assert 'proxy-authenticate: basic realm="' in run.headers.lower()

    # Wrong password: 407 again.
    run = curl(tmp_path, [plain], *proxy, "--proxy-user", f"user:{WRONG}")
    assert run.only.http_code == 407, run.describe()
    run = curl(tmp_path, [tls], *proxy, *tls_opts, "--proxy-user", f"user:{WRONG}")
    assert run.only.http_connect == 407, run.describe()
    assert http_origin.requests == []
    assert tls_origin.requests == []

    # The right one: through.
    run = curl(tmp_path, [plain], *proxy, "--proxy-user", f"user:{SECRET}")
    _ok(run, p)
    assert run.only.http_code == 200
    assert run.only.body == pattern(1000)
    run = curl(tmp_path, [tls], *proxy, *tls_opts, "--proxy-user", f"user:{SECRET}")
    _ok(run, p)
    assert run.only.http_connect == 200
    assert run.only.body == pattern(1000)

    refused = p.matching(4, reason="auth_failed")
    assert [r["status"] for r in refused] == [407] * 4
    assert p.record(kind="http-forward", status=200)["user"] == "user"
    assert p.record(kind="http-connect", status=200)["user"] == "user"
    # The credentials go to nobody: the origin never sees Proxy-Authorization, and the
    # log never sees the password, in any form.
    capture = _HeadCapture()
    try:
        run = curl(
            tmp_path,
            [f"http://127.0.0.1:{capture.port}/x?y=1"],
            *proxy,
            "--proxy-user",
            f"user:{SECRET}",
            "-H",
            "Proxy-Connection: keep-alive",
        )
        _ok(run, p)
        assert run.only.body == b"ok"
    finally:
        capture.stop()
    [head] = capture.heads
    assert head.startswith(b"GET /x?y=1 HTTP/1.1\r\n"), head
    assert b"proxy-authorization" not in head.lower(), head
    assert b"proxy-connection" not in head.lower(), head
    assert f"Host: 127.0.0.1:{capture.port}\r\n".encode() in head, head
    wrong_b64 = base64.b64encode(f"user:{WRONG}".encode()).decode()
    _assert_no_secret(p, SECRET, b64, WRONG, wrong_b64)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_printed_config_masks_the_password(fmt: str) -> None:
    b64 = base64.b64encode(f"user:{SECRET}".encode()).decode()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyegress",
            "-L",
            f"http://user:{SECRET}@127.0.0.1:8080",
            "-L",
            f"socks5://127.0.0.1:1080?auth={b64}",
            "-F",
            f"socks5://hop:{SECRET}@127.0.0.1:1081",
            "-O",
            fmt,
        ],
        capture_output=True,
        timeout=20,
        cwd=str(ROOT),
    )
    assert out.returncode == 0, out
    text = out.stdout.decode() + out.stderr.decode()
    assert "127.0.0.1:8080" in text
    assert SECRET not in text
    assert b64 not in text


# -- SOCKS listeners -------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_curl_socks5_hostname_keeps_the_name(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path, loop: str
) -> None:
    size = 4 * MB
    p = pyegress(["-L", "socks5://127.0.0.1:{0}"], loop=loop)
    url = f"http://localhost:{http_origin.port}/bytes/{size}"
    run = curl(tmp_path, [url], "--socks5-hostname", f"127.0.0.1:{_port(p)}")
    _ok(run, p)
    assert run.only.http_code == 200
    assert run.only.body == pattern(size)
    # (The factory's readiness probe left a record of its own: match curl's port.)
    record = p.record(kind="socks5", client=_client(run))
    assert record["target"] == f"localhost:{http_origin.port}"
    assert record["status"] == 0
    assert record["reason"] == "eof"
    assert size < record["bytes_down"] < size + 4096


def test_curl_socks5_with_ip_target(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    p = pyegress(["-L", "socks://127.0.0.1:{0}"])
    url = f"http://127.0.0.1:{http_origin.port}/bytes/100000"
    run = curl(tmp_path, [url], "--socks5", f"127.0.0.1:{_port(p)}")
    _ok(run, p)
    assert run.only.body == pattern(100000)
    record = p.record(kind="socks5", client=_client(run))
    assert record["target"] == f"127.0.0.1:{http_origin.port}"
    assert record["status"] == 0


def test_curl_socks5_user_password(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    p = pyegress(["-D", "-L", f"socks5://user:{SECRET}@127.0.0.1:{{0}}"])
    proxy = ["-x", f"socks5h://127.0.0.1:{_port(p)}"]
    url = f"http://localhost:{http_origin.port}/bytes/5000"

    run = curl(tmp_path, [url], *proxy, "--proxy-user", f"user:{SECRET}")
    _ok(run, p)
    assert run.only.body == pattern(5000)
    ok = p.record(kind="socks5", status=0)
    assert ok["user"] == "user"
    assert ok["target"] == f"localhost:{http_origin.port}"

    run = curl(tmp_path, [url], *proxy, "--proxy-user", f"user:{WRONG}")
    assert run.returncode != 0, run.describe()
    assert run.only.body == b""
    run = curl(tmp_path, [url], *proxy)  # offers no user/password method at all
    assert run.returncode != 0, run.describe()
    assert len(p.matching(2, reason="auth_failed")) == 2
    assert len(http_origin.requests) == 1
    _assert_no_secret(p, SECRET, WRONG)


def test_curl_socks4a_and_socks4(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    p = pyegress(["-L", "socks4a://127.0.0.1:{0}"])
    proxy = f"127.0.0.1:{_port(p)}"
    run = curl(tmp_path, [f"http://localhost:{http_origin.port}/bytes/300000"], "--socks4a", proxy)
    _ok(run, p)
    assert run.only.body == pattern(300000)
    record = p.record(kind="socks4", target=f"localhost:{http_origin.port}")
    assert record["status"] == 90
    assert record["client"] == _client(run)
    run = curl(tmp_path, [f"http://127.0.0.1:{http_origin.port}/bytes/7"], "--socks4", proxy)
    _ok(run, p)
    assert run.only.body == pattern(7)
    assert p.record(kind="socks4", target=f"127.0.0.1:{http_origin.port}")["status"] == 90


@pytest.mark.parametrize("loop", LOOPS)
def test_auto_listener_serves_http_socks5_and_socks4a_on_one_port(
    pyegress: PyegressFactory,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
    loop: str,
) -> None:
    p = pyegress(["-L", "127.0.0.1:{0}"], loop=loop)
    port = _port(p)
    base = f"http://localhost:{http_origin.port}"
    runs = {
        "http-forward": curl(tmp_path, [f"{base}/bytes/1001"], "-x", f"http://127.0.0.1:{port}"),
        "http-connect": curl(
            tmp_path,
            [f"https://localhost:{tls_origin.port}/bytes/1002"],
            "-p",
            "-x",
            f"http://127.0.0.1:{port}",
            "--cacert",
            str(ca_file),
        ),
        "socks5": curl(tmp_path, [f"{base}/bytes/1003"], "-x", f"socks5h://127.0.0.1:{port}"),
        "socks4": curl(tmp_path, [f"{base}/bytes/1004"], "-x", f"socks4a://127.0.0.1:{port}"),
    }
    for n, (kind, run) in enumerate(runs.items(), start=1001):
        _ok(run, p)
        assert run.only.http_code == 200, kind
        assert run.only.body == pattern(n), kind
        record = p.record(kind=kind, client=_client(run))
        assert record["status"] == {"socks5": 0, "socks4": 90}.get(kind, 200)
        if kind.startswith("socks"):
            assert record["target"] == f"localhost:{http_origin.port}", kind


# -- Port forwarding -------------------------------------------------------------------


def test_tcp_forward_serves_plain_curl(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    size = 2 * MB
    p = pyegress(["-L", f"tcp://127.0.0.1:{{0}}/127.0.0.1:{http_origin.port}"])
    port = _port(p)
    run = curl(tmp_path, [f"http://127.0.0.1:{port}/bytes/{size}"])
    _ok(run, p)
    assert run.only.http_code == 200
    assert run.only.body == pattern(size)
    assert http_origin.requests == [("GET", f"/bytes/{size}", f"127.0.0.1:{port}")]
    record = p.record(kind="tcp", client=_client(run))
    assert record["target"] == f"127.0.0.1:{http_origin.port}"
    assert size < record["bytes_down"] < size + 4096


def test_tcp_forward_round_robin(pyegress: PyegressFactory, tmp_path: Path) -> None:
    a, b = HttpOrigin().start(), HttpOrigin().start()
    try:
        p = pyegress(["-L", f"tcp://127.0.0.1:{{0}}/127.0.0.1:{a.port},127.0.0.1:{b.port}"])
        port = _port(p)
        runs = [curl(tmp_path, [f"http://127.0.0.1:{port}/host"]) for _ in range(4)]
        for run in runs:
            _ok(run, p)
            assert run.only.body == f"127.0.0.1:{port}".encode()
        # Four connections in turn: two to each target.
        assert len(a.requests) == 2
        assert len(b.requests) == 2
        targets = [p.record(kind="tcp", client=_client(run))["target"] for run in runs]
        assert targets[0] != targets[1]
        assert targets[0::2] == [targets[0]] * 2
        assert targets[1::2] == [targets[1]] * 2
        assert set(targets) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    finally:
        a.stop()
        b.stop()


# -- IPv6 ------------------------------------------------------------------------------


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _socks5_connect_ipv6(proxy: tuple[str, int], ip: str, port: int) -> tuple[socket.socket, int]:
    """SOCKS5 CONNECT with ATYP 4 (an IPv6 address in 16 bytes)."""
    sock = socket.create_connection(proxy, timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    addr = socket.inet_pton(socket.AF_INET6, ip)
    sock.sendall(b"\x05\x01\x00\x04" + addr + struct.pack("!H", port))
    head = recv_exact(sock, 4)
    recv_exact(sock, {1: 6, 4: 18}[head[3]])
    return sock, head[1]


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("loop", LOOPS)
def test_ipv6_listener_and_atyp4_target(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path, loop: str
) -> None:
    port = free_port("::1")
    p = pyegress(["-L", f"socks5://[::1]:{port}"], loop=loop, wait=False, nports=0)
    try:
        wait_port("::1", port, 15)
    except TimeoutError:
        raise AssertionError(f"pyegress did not listen on [::1]:{port}:\n{p.output()}") from None

    origin = TcpOrigin(host="::1").start()
    try:
        size = 2 * MB
        sock, rep = _socks5_connect_ipv6(("::1", port), "::1", origin.port)
        assert rep == 0
        sock.sendall(f"SOURCE {size}\n".encode())
        data = recv_all(sock)
        sock.close()
        assert data == pattern(size)
        record = p.record(kind="socks5", target=f"[::1]:{origin.port}")
        assert record["status"] == 0
        assert record["client"].startswith("[::1]:")
        assert record["bytes_down"] == size
    finally:
        origin.stop()

    # curl over the IPv6 listener to an IPv4 origin named by name.
    run = curl(
        tmp_path,
        [f"http://localhost:{http_origin.port}/bytes/1000"],
        "-x",
        f"socks5h://[::1]:{port}",
    )
    _ok(run, p)
    assert run.only.body == pattern(1000)
    record = p.record(kind="socks5", target=f"localhost:{http_origin.port}")
    assert record["client"] == _client(run)
