"""gost's service bypass on a -L node: ``bypass=~list`` lets only matching targets pass,
``bypass=list`` rejects them (403 / SOCKS reply 2), judged on the target as named."""

from __future__ import annotations

from tests.conftest import PyegressFactory
from tests.support.clients import http_connect, recv_exact, socks5_connect
from tests.support.origins import TcpOrigin


def test_whitelist_passes_only_matching_targets(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin
) -> None:
    proxy = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}?bypass=~localhost",
            "-L",
            "socks5://127.0.0.1:{1}?bypass=~localhost",
        ]
    )
    sock, head = http_connect(("127.0.0.1", proxy.ports[0]), f"localhost:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(b"ECHO\nok")
    assert recv_exact(sock, 2) == b"ok"
    sock.close()
    sock, head = http_connect(("127.0.0.1", proxy.ports[0]), f"127.0.0.1:{tcp_origin.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert proxy.record(target=f"127.0.0.1:{tcp_origin.port}")["reason"] == "denied"
    sock, rep = socks5_connect(("127.0.0.1", proxy.ports[1]), "example.com", 443)
    sock.close()
    assert rep == 2


def test_blacklist_rejects_matching_targets(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin
) -> None:
    proxy = pyegress(["-L", "http://127.0.0.1:{0}?bypass=.example.com,10.0.0.0/8"])
    for target in ("example.com:443", "api.example.com:443", "10.1.2.3:80"):
        sock, head = http_connect(("127.0.0.1", proxy.ports[0]), target)
        sock.close()
        assert head.startswith(b"HTTP/1.1 403"), target
    sock, head = http_connect(("127.0.0.1", proxy.ports[0]), f"localhost:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.close()


def _hop_saw(hop: object, target: str) -> bool:
    from tests.support.procs import Pyegress

    assert isinstance(hop, Pyegress)
    return any(r.get("target") == target for r in hop.records("tunnel_closed"))


def test_hop_bypass_skips_the_hop_for_matching_targets(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin
) -> None:
    """``-F ...?bypass=list``: a listed target truncates the route before that hop (here
    the only hop: it is dialed directly); ``~list`` sends only listed targets through."""
    for bypass, direct_target, hop_target in (
        ("127.0.0.1", "127.0.0.1", "localhost"),
        ("~127.0.0.1", "localhost", "127.0.0.1"),
    ):
        hop = pyegress(["-L", "http://127.0.0.1:{0}"])
        via = f"http://127.0.0.1:{hop.ports[0]}"
        entry = pyegress(["-L", "http://127.0.0.1:{0}", "-F", f"{via}?bypass={bypass}"])
        for host in (direct_target, hop_target):
            target = f"{host}:{tcp_origin.port}"
            sock, head = http_connect(("127.0.0.1", entry.ports[0]), target)
            assert head.startswith(b"HTTP/1.1 200"), head
            sock.sendall(b"ECHO\nok")
            assert recv_exact(sock, 2) == b"ok"
            sock.close()
            entry.record(target=target)
        hop.record(target=f"{hop_target}:{tcp_origin.port}")
        assert not _hop_saw(hop, f"{direct_target}:{tcp_origin.port}")
