"""The tier link end to end: curl -> sidecar -> mutual-TLS HTTP/2 -> DMZ -> origin, and
what goes over the wire, checked with a decoder pyegress did not write."""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hyperframe.frame
import pytest
import trustme
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame

from tests.conftest import PyegressFactory, TierCerts
from tests.support.clients import http_connect, recv_exact, recv_until
from tests.support.h2raw import PREFACE, RawH2, tls_client
from tests.support.origins import HttpOrigin, TcpOrigin, pattern
from tests.support.ports import free_port
from tests.support.procs import Pyegress


@dataclass
class Tier:
    dmz: Pyegress
    sidecar: Pyegress
    http_port: int
    socks_port: int


def _start_tier(
    pyegress: PyegressFactory,
    certs: TierCerts,
    dmz_extra: str = "",
    sidecar_extra: str = "",
    link: str = "h2",
) -> Tier:
    dmz_params = certs.dmz_params() if link == "h2" else ""
    dmz = pyegress(["-L", f"{link}://127.0.0.1:{{0}}?{dmz_params}{dmz_extra}"])
    side_params = certs.sidecar_params() if link == "h2" else ""
    sidecar = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-L",
            "socks5://127.0.0.1:{1}",
            "-F",
            f"{link}://127.0.0.1:{dmz.ports[0]}?{side_params}{sidecar_extra}",
        ]
    )
    ports = sidecar.ports
    return Tier(dmz, sidecar, ports[0], ports[1])


@pytest.fixture
def tier(pyegress: PyegressFactory, tier_certs: TierCerts) -> Tier:
    return _start_tier(pyegress, tier_certs)


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "30", *args], capture_output=True, timeout=60
    )


def test_curl_connect_to_tls_origin_through_both_tiers(
    tier: Tier, tls_origin: HttpOrigin, ca_file: Path
) -> None:
    size = 24 * 1024 * 1024
    url = f"https://localhost:{tls_origin.port}/bytes/{size}"
    out = _curl("-p", "-x", f"http://127.0.0.1:{tier.http_port}", "--cacert", str(ca_file), url)
    assert out.returncode == 0, (
        out.stderr,
        tier.sidecar.output()[-2000:],
        tier.dmz.output()[-2000:],
    )
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(pattern(size)).digest()
    target = f"localhost:{tls_origin.port}"
    dmz = tier.dmz.record(target=target)
    assert dmz["identity"] == TierCerts.IDENTITY
    assert dmz["kind"] == "http-connect"
    assert dmz["status"] == 200
    assert int(str(dmz["bytes_down"])) > size
    side = tier.sidecar.record(target=target)
    assert side["kind"] == "http-connect"
    assert side["bytes_down"] == dmz["bytes_down"]


def test_curl_absolute_uri_get_through_both_tiers(tier: Tier, http_origin: HttpOrigin) -> None:
    size = 8 * 1024 * 1024
    for path in (f"/bytes/{size}", f"/chunked/{size}"):
        out = _curl(
            "-x", f"http://127.0.0.1:{tier.http_port}", f"http://127.0.0.1:{http_origin.port}{path}"
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == pattern(size)
    assert [r[1] for r in http_origin.requests] == [f"/bytes/{size}", f"/chunked/{size}"]


def test_curl_socks5_hostname_keeps_the_name_to_the_dmz(
    tier: Tier, http_origin: HttpOrigin
) -> None:
    size = 4 * 1024 * 1024
    out = _curl(
        "--socks5-hostname",
        f"127.0.0.1:{tier.socks_port}",
        f"http://localhost:{http_origin.port}/bytes/{size}",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == pattern(size)
    # The name travelled as a name: the DMZ, not the sidecar, resolved it.
    tier.dmz.record(target=f"localhost:{http_origin.port}", kind="http-connect")
    tier.sidecar.record(target=f"localhost:{http_origin.port}", kind="socks5")


def test_200_tunnels_share_one_link_and_a_stalled_reader_stalls_nobody(
    tier: Tier, tcp_origin: TcpOrigin
) -> None:
    # One tunnel whose client never reads a 1 GB download.
    stalled, head = http_connect(("127.0.0.1", tier.http_port), f"127.0.0.1:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200")
    stalled.sendall(b"SOURCE 1000000000\n")
    time.sleep(0.5)

    def one(i: int) -> bytes:
        sock, head = http_connect(("127.0.0.1", tier.http_port), f"127.0.0.1:{tcp_origin.port}")
        try:
            assert head.startswith(b"HTTP/1.1 200")
            payload = pattern(256 * 1024, seed=str(i).encode())
            sock.sendall(b"ECHO\n")
            for start in range(0, len(payload), 65536):
                sock.sendall(payload[start : start + 65536])
            return recv_exact(sock, len(payload))
        finally:
            sock.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(one, range(200)))
    for i, got in enumerate(results):
        assert got == pattern(256 * 1024, seed=str(i).encode())
    stalled.close()
    records = tier.dmz.wait_records("tunnel_closed", 201, timeout=20)
    # Every tunnel came over the same sidecar connection (one source port).
    assert len(records) >= 200
    assert len({r["client"] for r in records}) == 1


def test_conns_spreads_tunnels_over_several_links(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    """conns=3: the sidecar keeps three links to the DMZ and puts each new tunnel on
    the one with the fewest streams; every byte still arrives."""
    tier = _start_tier(pyegress, tier_certs, sidecar_extra="&conns=3")
    held = []
    for i in range(12):
        sock, head = http_connect(("127.0.0.1", tier.http_port), f"127.0.0.1:{tcp_origin.port}")
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"ECHO\n" + str(i).encode())
        assert recv_exact(sock, len(str(i))) == str(i).encode()
        held.append(sock)
        time.sleep(0.05)  # the further links come up in the background
    payload = pattern(4 * 1024 * 1024)
    sock, head = http_connect(("127.0.0.1", tier.http_port), f"127.0.0.1:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(b"ECHO\n")
    reader = concurrent.futures.ThreadPoolExecutor(1).submit(recv_exact, sock, len(payload))
    sock.sendall(payload)
    assert reader.result(timeout=30) == payload
    sock.close()
    for s in held:
        s.close()
    records = tier.dmz.wait_records("tunnel_closed", 13, timeout=20)
    links = {r["client"] for r in records}
    assert len(links) == 3, links
    # The last tunnels were spread: no link carried more than half of the 13.
    per_link = [sum(1 for r in records if r["client"] == c) for c in links]
    assert max(per_link) <= 7, per_link


def test_conns_out_of_range_is_refused(pyegress: PyegressFactory) -> None:
    proc = pyegress(["-L", "http://127.0.0.1:{0}", "-F", "h2://127.0.0.1:9?conns=0"], wait=False)
    assert proc.wait(10) == 2
    assert "conns=0: between 1 and 64 connections" in proc.output()


def test_sidecar_headers_and_inner_connect_decoded_independently(
    pyegress: PyegressFactory, tier_certs: TierCerts
) -> None:
    """A fake DMZ decodes what the sidecar sends with hyperframe and hpack."""
    port = free_port()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tier_certs.server_cert, tier_certs.server_key)
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", port))
    seen: dict[str, object] = {}

    def fake_dmz() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as conn:
            seen["alpn"] = conn.selected_alpn_protocol()
            assert recv_exact(conn, len(PREFACE)) == PREFACE
            h2 = RawH2(conn)
            h2.send(SettingsFrame(0))
            frame = h2.read_frame()
            while not isinstance(frame, HeadersFrame):
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    ack = SettingsFrame(0)
                    ack.flags.add("ACK")
                    h2.send(ack)
                frame = h2.read_frame()
            seen["headers"] = h2.headers_of(frame)
            seen["stream"] = frame.stream_id
            seen["flags"] = set(frame.flags)
            h2.send_headers(frame.stream_id, [(":status", "200")])
            inner = b""
            while b"\r\n\r\n" not in inner:
                nxt = h2.next_on_stream(frame.stream_id)
                if isinstance(nxt, DataFrame):
                    inner += nxt.data
            seen["inner"] = inner
            h2.send_data(frame.stream_id, b"HTTP/1.1 200 Connection established\r\n\r\nhello")
            time.sleep(0.5)

    thread = threading.Thread(target=fake_dmz, daemon=True)
    thread.start()
    sidecar = pyegress(
        ["-L", "http://127.0.0.1:{0}", "-F", f"h2://127.0.0.1:{port}?{tier_certs.sidecar_params()}"]
    )
    sock, head = http_connect(("127.0.0.1", sidecar.ports[0]), "example.com:443")
    assert head.startswith(b"HTTP/1.1 200 Connection established\r\n")
    assert recv_exact(sock, 5) == b"hello"
    sock.close()
    thread.join(10)
    listener.close()
    assert seen["alpn"] == "h2"
    # Exactly what gost sends: CONNECT to the node address, no :scheme, no :path.
    headers = dict(seen["headers"])  # type: ignore[call-overload]
    assert headers[":method"] == "CONNECT"
    assert headers[":authority"] == f"127.0.0.1:{port}"
    assert ":scheme" not in headers
    assert ":path" not in headers
    assert "END_STREAM" not in seen["flags"]  # type: ignore[operator]
    inner = bytes(seen["inner"])  # type: ignore[call-overload]
    assert inner.startswith(b"CONNECT example.com:443 HTTP/1.1\r\n")
    assert b"\r\nHost: example.com:443\r\n" in inner


@pytest.mark.parametrize("alpn", [["h2"], None], ids=["alpn-h2", "no-alpn-gost-v2"])
def test_independent_h2_client_opens_a_tunnel_like_gost(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin, alpn: list[str] | None
) -> None:
    dmz = pyegress(["-L", "h2://127.0.0.1:{0}?" + tier_certs.dmz_params()])
    port = dmz.ports[0]
    conn = tls_client(
        "127.0.0.1", port, alpn, cert=str(tier_certs.client_cert), key=str(tier_certs.client_key)
    )
    h2 = RawH2(conn)
    h2.client_start()
    h2.send_headers(
        1,
        [
            (":method", "CONNECT"),
            (":authority", f"dmz.example:{port}"),
            ("user-agent", "Go-http-client/2.0"),
        ],
    )
    frame = h2.next_on_stream(1)
    assert isinstance(frame, HeadersFrame)
    assert (":status", "200") in h2.headers_of(frame)
    target = f"127.0.0.1:{tcp_origin.port}"
    h2.send_data(1, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += h2.read_stream_data(1, 1)
    assert reply.startswith(b"HTTP/1.1 200 Connection established\r\n")
    h2.send_data(1, b"ECHO\nping-through-gost-style-stream")
    assert h2.read_stream_data(1, 30) == b"ping-through-gost-style-stream"
    conn.close()
    record = dmz.record(target=target)
    assert record["identity"] == TierCerts.IDENTITY


def test_path_mode_uses_get_on_the_exact_path(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    good = _start_tier(pyegress, tier_certs, dmz_extra="&path=/tun", sidecar_extra="&path=/tun")
    sock, head = http_connect(("127.0.0.1", good.http_port), f"127.0.0.1:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(b"ECHO\nabc")
    assert recv_exact(sock, 3) == b"abc"
    sock.close()
    # As gost answers: a path-mode DMZ refuses another path or a CONNECT with 400; a
    # DMZ without a path refuses a GET with 405.
    plain = pyegress(["-L", "h2://127.0.0.1:{0}?" + tier_certs.dmz_params()])
    cases = (
        (good.dmz, "&path=/other", "400"),
        (good.dmz, "", "400"),
        (plain, "&path=/tun", "405"),
    )
    for dmz, extra, status in cases:
        port = dmz.ports[0]
        side = pyegress(
            [
                "-L",
                "http://127.0.0.1:{0}",
                "-F",
                f"h2://127.0.0.1:{port}?{tier_certs.sidecar_params()}{extra}",
            ]
        )
        sock, head = http_connect(("127.0.0.1", side.ports[0]), f"127.0.0.1:{tcp_origin.port}")
        sock.close()
        assert head.startswith(b"HTTP/1.1 502"), head
        assert str(side.record(reason="hop_refused")["error"]).endswith(f"answered {status}")
        # The DMZ records the refused stream too.
        assert dmz.record(reason="malformed", status=int(status))["kind"] == "h2"


@pytest.mark.parametrize(
    ("dmz_scheme", "side_scheme"),
    [
        ("h2c", "h2c"),
        ("h2c", "socks5+h2c"),
        ("http2", "http2"),
        ("tls", "tls"),
        ("tls", "socks5+tls"),
        ("https", "https"),
        ("socks5+h2", "socks5+h2"),
        ("http+h2", "h2"),
    ],
)
def test_link_forms(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    tcp_origin: TcpOrigin,
    dmz_scheme: str,
    side_scheme: str,
) -> None:
    tls = dmz_scheme != "h2c"
    dmz_q = "?" + tier_certs.dmz_params() if tls else ""
    side_q = "?" + tier_certs.sidecar_params() if tls else ""
    dmz = pyegress(["-L", f"{dmz_scheme}://127.0.0.1:{{0}}{dmz_q}"])
    side = pyegress(
        ["-L", "http://127.0.0.1:{0}", "-F", f"{side_scheme}://127.0.0.1:{dmz.ports[0]}{side_q}"]
    )
    size = 4 * 1024 * 1024
    sock, head = http_connect(("127.0.0.1", side.ports[0]), f"localhost:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.sendall(f"SOURCE {size}\n".encode())
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    sock.close()
    assert bytes(data) == pattern(size)
    record = dmz.record(target=f"localhost:{tcp_origin.port}")
    if tls:
        assert record["identity"] == TierCerts.IDENTITY


def test_https_listener_serves_curl_with_an_https_proxy(
    pyegress: PyegressFactory, tier_certs: TierCerts, http_origin: HttpOrigin
) -> None:
    proxy = pyegress(
        ["-L", f"https://127.0.0.1:{{0}}?cert={tier_certs.server_cert}&key={tier_certs.server_key}"]
    )
    out = _curl(
        "--proxy",
        f"https://localhost:{proxy.ports[0]}",
        "--proxy-cacert",
        str(tier_certs.ca),
        f"http://127.0.0.1:{http_origin.port}/bytes/1000",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == pattern(1000)


def test_earlier_hop_carries_the_link(
    pyegress: PyegressFactory, tier_certs: TierCerts, squid: int, tcp_origin: TcpOrigin
) -> None:
    """-F http://squid -F h2://dmz: the TLS link itself goes through squid."""
    dmz = pyegress(["-L", "h2://127.0.0.1:{0}?" + tier_certs.dmz_params()])
    side = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-F",
            f"http://127.0.0.1:{squid}",
            "-F",
            f"h2://127.0.0.1:{dmz.ports[0]}?{tier_certs.sidecar_params()}",
        ]
    )
    for _ in range(3):
        sock, head = http_connect(("127.0.0.1", side.ports[0]), f"127.0.0.1:{tcp_origin.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.sendall(b"ECHO\nvia-squid")
        assert recv_exact(sock, 9) == b"via-squid"
        sock.close()
    records = dmz.wait_records("tunnel_closed", 3)
    # All three tunnels are streams of one link, and that link came from squid's side.
    assert len({r["client"] for r in records}) == 1
    assert all(r["identity"] == TierCerts.IDENTITY for r in records)


def test_data_frame_repr_does_not_hex_encode_the_payload() -> None:
    import pyegress.h2link  # noqa: F401  (installs the lean repr)

    frame = hyperframe.frame.DataFrame(1, data=b"\xab" * 1_000_000)
    text = repr(frame)
    assert "1000000 bytes" in text
    assert "ab" * 10 not in text
    assert len(text) < 200
    # Other frames keep their own repr.
    assert "window_increment=5" in repr(WindowUpdateFrame(0, window_increment=5))


def test_stream_end_is_a_fin_both_ways(tier: Tier, tcp_origin: TcpOrigin) -> None:
    """Half-close across the link: upload, FIN, then the origin's 10 MB all arrive."""
    sock, head = http_connect(("127.0.0.1", tier.http_port), f"127.0.0.1:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200")
    upload = pattern(3 * 1024 * 1024, seed=b"up")
    sock.sendall(b"UPLOAD 10485760\n" + upload)
    sock.shutdown(socket.SHUT_WR)
    line = recv_until(sock, b"\n")
    assert line.split()[0].decode() == hashlib.sha256(upload).hexdigest()
    rest = bytearray()
    while chunk := sock.recv(1 << 20):
        rest += chunk
    sock.close()
    assert bytes(rest) == pattern(10 * 1024 * 1024)


def test_auto_handler_forwards_a_raw_client_hello_to_its_sni(
    pyegress: PyegressFactory, ca: trustme.CA, ca_file: Path
) -> None:
    """A stream that starts with a TLS ClientHello goes to SNI:443, bytes untouched."""
    cert = ca.issue_cert("localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    try:
        origin = HttpOrigin(tls=ctx, port=443).start()
    except OSError:
        pytest.skip("port 443 on loopback is not available (needs root and a free port)")
    try:
        proxy = pyegress(["-L", "127.0.0.1:{0}"])
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        raw = socket.create_connection(("127.0.0.1", proxy.ports[0]), timeout=10)
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(
                b"GET /bytes/5000 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            data = bytearray()
            while chunk := conn.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert data.endswith(pattern(5000))
        record = proxy.record(kind="tls-sni")
        assert record["target"] == "localhost:443"
    finally:
        origin.stop()
