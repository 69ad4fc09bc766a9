"""The relay conformance suite: every relay path must pass every scenario.

A path is a way a client's bytes reach the origin through pyegress: each listener with a
direct dial, port forwarding, and chains through a second pyegress over HTTP CONNECT
and SOCKS5, on uvloop and on the standard loop. Scenarios: byte integrity and order on
large transfers, half-close, resets both ways, backpressure, and the close record.

Paths whose legs are all plain TCP run twice: with the zero-copy relay from the first
byte (``splice``, ``PYEGRESS_SPLICE_AFTER=0``) and with it turned off (``splice=false``:
the ``plain`` relay). The HTTP and SOCKS5 listeners run a third time, switching from the
plain relay to the zero-copy one mid-tunnel (``lazy``, ``PYEGRESS_SPLICE_AFTER=1``, the
way the default of 128 KiB behaves on a download). Paths through the h2 tier link run
once and must fall back to the plain relay by themselves. Every case checks the close
records for the relay that actually ran (``result.relay``), so a silent fallback fails
the splice cases.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import PyegressFactory
from tests.support.clients import (
    http_connect,
    recv_all,
    recv_exact,
    recv_until,
    socks4_connect,
    socks5_connect,
)
from tests.support.origins import TcpOrigin, pattern
from tests.support.procs import Pyegress

Opener = Callable[[], socket.socket]


@dataclass
class Path:
    open: Opener
    procs: list[Pyegress]
    relay: str = "plain"  # the relay every tunnel of this path must have used

    @property
    def entry(self) -> Pyegress:
        return self.procs[0]


def _http_opener(port: int, origin: TcpOrigin) -> Opener:
    def open_() -> socket.socket:
        sock, head = http_connect(("127.0.0.1", port), f"{origin.host}:{origin.port}")
        assert head.startswith(b"HTTP/1.1 200 Connection established\r\n"), head
        return sock

    return open_


def _socks5_opener(port: int, origin: TcpOrigin) -> Opener:
    def open_() -> socket.socket:
        sock, rep = socks5_connect(("127.0.0.1", port), "localhost", origin.port)
        assert rep == 0
        return sock

    return open_


def _socks4_opener(port: int, origin: TcpOrigin) -> Opener:
    def open_() -> socket.socket:
        sock, rep = socks4_connect(("127.0.0.1", port), "localhost", origin.port)
        assert rep == 90
        return sock

    return open_


TCP_PATHS = [
    "http-uvloop",
    "http-asyncio",
    "socks5",
    "socks4a",
    "auto-socks5",
    "tcp-forward",
    "chain-http",
    "chain-socks5",
]
H2_PATHS = [
    "h2-link",
    "h2-link-asyncio",
    "h2c-link-socks5",
]
LAZY_PATHS = ["http-uvloop", "http-asyncio", "socks5"]
PATHS = [
    *(f"{name}/{relay}" for name in TCP_PATHS for relay in ("plain", "splice")),
    *(f"{name}/lazy" for name in LAZY_PATHS),
    *(f"{name}/auto" for name in H2_PATHS),
]
SPLICE_AFTER = {"splice": "0", "lazy": "1"}


def _relays_used(proc: Pyegress) -> list[str]:
    return [
        r["result"]["relay"]
        for r in proc.records("close")
        if isinstance(r.get("result"), dict) and "relay" in r["result"]
    ]


@pytest.fixture(params=PATHS)
def path(
    request: pytest.FixtureRequest,
    pyegress: PyegressFactory,
    tcp_origin: TcpOrigin,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    after = SPLICE_AFTER.get(str(request.param).split("/")[1])
    if after is not None:
        monkeypatch.setenv("PYEGRESS_SPLICE_AFTER", after)
    built = _build_path(request.param, pyegress, tcp_origin)
    yield built
    # Every process relayed at least one tunnel, each with the relay this path expects.
    for proc in built.procs:
        deadline = time.monotonic() + 10
        used = _relays_used(proc)
        while not used and time.monotonic() < deadline:
            time.sleep(0.02)
            used = _relays_used(proc)
        assert used, "no close record names its relay:\n" + proc.output()[-2000:]
        if built.relay == "lazy":
            # A tunnel that ends while switching stays plain; the transfers are checked
            # for the switch in their own tests (_switched).
            assert set(used) <= {"plain", "splice"}, used
        else:
            assert set(used) == {built.relay}, f"expected the {built.relay} relay, got {used}"


def _build_path(param: str, pyegress: PyegressFactory, tcp_origin: TcpOrigin) -> Path:
    name, relay = param.split("/")
    path = _build(name, relay, pyegress, tcp_origin)
    path.relay = relay if relay in ("splice", "lazy") else "plain"
    return path


def _switched(path: Path, record: dict[str, object]) -> None:
    """On a lazy path, a long transfer ends on the zero-copy relay."""
    if path.relay == "lazy":
        result = record["result"]
        assert isinstance(result, dict)
        assert result["relay"] == "splice", record


def _build(name: str, relay: str, pyegress: PyegressFactory, tcp_origin: TcpOrigin) -> Path:
    idle = "?idleTimeout=30" + ("&splice=false" if relay == "plain" else "")
    if name in ("http-uvloop", "http-asyncio"):
        loop = name.split("-")[1]
        p = pyegress(["-L", "http://127.0.0.1:{0}" + idle], loop=loop)
        return Path(_http_opener(p.ports[0], tcp_origin), [p])
    if name == "socks5":
        p = pyegress(["-L", "socks5://127.0.0.1:{0}" + idle])
        return Path(_socks5_opener(p.ports[0], tcp_origin), [p])
    if name == "socks4a":
        p = pyegress(["-L", "socks4a://127.0.0.1:{0}" + idle])
        return Path(_socks4_opener(p.ports[0], tcp_origin), [p])
    if name == "auto-socks5":
        p = pyegress(["-L", "127.0.0.1:{0}" + idle])
        return Path(_socks5_opener(p.ports[0], tcp_origin), [p])
    if name == "tcp-forward":
        p = pyegress(["-L", f"tcp://127.0.0.1:{{0}}/127.0.0.1:{tcp_origin.port}" + idle])
        port = p.ports[0]
        return Path(lambda: socket.create_connection(("127.0.0.1", port), timeout=10), [p])
    if name.startswith(("h2-link", "h2c-link")):
        # The tier link: sidecar -> HTTP/2 stream -> DMZ -> origin.
        loop = "asyncio" if name.endswith("asyncio") else "uvloop"
        link = "h2c" if name.startswith("h2c") else "h2"
        dmz = pyegress(["-L", link + "://127.0.0.1:{0}" + idle], loop=loop)
        inner = "socks5+" if name.endswith("socks5") else ""
        sidecar = pyegress(
            [
                "-L",
                "http://127.0.0.1:{0}" + idle,
                "-F",
                f"{inner}{link}://127.0.0.1:{dmz.ports[0]}",
            ],
            loop=loop,
        )
        opener = _http_opener(sidecar.ports[0], tcp_origin)
        return Path(opener, [sidecar, dmz])
    # Chains: the entry pyegress dials the origin through a second pyegress.
    scheme = "http" if name == "chain-http" else "socks5"
    hop = pyegress(["-L", scheme + "://127.0.0.1:{0}" + idle])
    entry = pyegress(
        ["-L", "http://127.0.0.1:{0}" + idle, "-F", f"{scheme}://127.0.0.1:{hop.ports[0]}"]
    )
    return Path(_http_opener(entry.ports[0], tcp_origin), [entry, hop])


def test_large_download_is_byte_exact(path: Path) -> None:
    size = 48 * 1024 * 1024
    sock = path.open()
    sock.sendall(f"SOURCE {size}\n".encode())
    data = recv_all(sock)
    sock.close()
    assert len(data) == size
    assert hashlib.sha256(data).digest() == hashlib.sha256(pattern(size)).digest()
    record = path.entry.record(bytes_down=size)
    assert record["bytes_up"] == len(f"SOURCE {size}\n")
    assert record["reason"] == "eof"
    _switched(path, record)


def test_half_close_upload_then_10mb_download(path: Path) -> None:
    """The client sends FIN after its upload; the origin then streams 10 MB back."""
    upload = random.Random(7).randbytes(8 * 1024 * 1024)
    sock = path.open()
    sock.sendall(b"UPLOAD 10485760\n" + upload)
    sock.shutdown(socket.SHUT_WR)
    line = recv_until(sock, b"\n")
    digest, length = line.decode().split()
    assert digest == hashlib.sha256(upload).hexdigest()
    assert int(length) == len(upload)
    rest = recv_all(sock)
    sock.close()
    assert rest == pattern(10 * 1024 * 1024)


def test_echo_keeps_order_across_interleaved_writes(path: Path) -> None:
    rng = random.Random(11)
    sock = path.open()
    sock.sendall(b"ECHO\n")
    sent = bytearray()
    received = bytearray()
    for _ in range(200):
        chunk = rng.randbytes(rng.randint(1, 70000))
        sock.sendall(chunk)
        sent += chunk
        if rng.random() < 0.5:
            received += recv_exact(sock, rng.randint(0, len(sent) - len(received)))
    sock.shutdown(socket.SHUT_WR)
    received += recv_all(sock)
    sock.close()
    assert bytes(received) == bytes(sent)


def test_client_reset_resets_the_origin_side(path: Path, tcp_origin: TcpOrigin) -> None:
    sock = path.open()
    sock.sendall(b"ECHO\nhello")
    assert recv_exact(sock, 5) == b"hello"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    # (The readiness probe of the port forwarder leaves an empty-command event.)
    deadline = time.monotonic() + 10
    echo_events: list[tuple[str, str]] = []
    while time.monotonic() < deadline and not echo_events:
        echo_events = [e for e in tcp_origin.events if e[0] == "ECHO"]
        time.sleep(0.02)
    assert echo_events == [("ECHO", "ConnectionResetError")]
    assert path.entry.record(reason="client_reset")["bytes_up"] == len(b"ECHO\nhello")


def test_origin_reset_reaches_the_client_as_a_reset(path: Path) -> None:
    sock = path.open()
    sock.sendall(b"RESET\n")
    with pytest.raises(ConnectionResetError):
        recv_all(sock)
    sock.close()
    path.entry.record(reason="upstream_reset")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_stops_reading_does_not_grow_proxy_memory(path: Path) -> None:
    sock = path.open()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    before = [_rss_kib(p.pid) for p in path.procs]
    sock.sendall(b"SOURCE 1000000000\n")
    time.sleep(3)  # the origin pushes as fast as it can; the client reads nothing
    after = [_rss_kib(p.pid) for p in path.procs]
    # What may pile up is bounded by socket buffers and the relay's write high-water
    # mark, not by the 1 GB on offer.
    for b, a in zip(before, after, strict=True):
        assert a - b < 24 * 1024, f"proxy RSS grew by {a - b} KiB"
    got = len(sock.recv(1 << 20))
    assert got > 0
    sock.close()
