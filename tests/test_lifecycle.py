"""Process and tunnel lifecycle: drain on SIGTERM/SIGINT, idle and connect timeouts, and
credentials kept out of the logs. Every test runs pyegress as a real process."""

from __future__ import annotations

import base64
import select
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import LOOPS, PyegressFactory
from tests.support.clients import http_connect, recv_exact, recv_until, socks5_connect
from tests.support.origins import TcpOrigin
from tests.support.procs import Pyegress


def _port(proc: Pyegress, i: int = 0) -> int:
    port: int = proc.ports[i]
    return port


def _echo_tunnel(proc: Pyegress, origin: TcpOrigin) -> socket.socket:
    sock, head = http_connect(("127.0.0.1", _port(proc)), f"127.0.0.1:{origin.port}", timeout=5)
    assert head.startswith(b"HTTP/1.1 200 "), head
    sock.sendall(b"ECHO\n")
    _echo(sock, b"hello")
    return sock


def _echo(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data)) == data


def _wait_closed(sock: socket.socket, timeout: float) -> str:
    """Read until the proxy closes the connection: "eof" or "reset"."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout}s") from None
    return "eof"


def _record(proc: Pyegress, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [
            r for r in proc.records("tunnel_closed") if all(r.get(k) == v for k, v in match.items())
        ]
        if found:
            assert len(found) == 1, found
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no tunnel_closed record with {match}:\n{proc.output()[-3000:]}")
        time.sleep(0.02)


def _client(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _refused_within(port: int, limit: float) -> float:
    """Seconds until a new connection to ``port`` is refused (fails after ``limit``)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except ConnectionRefusedError:
            return time.monotonic() - start
        probe.close()
        time.sleep(0.01)
    raise AssertionError(f"127.0.0.1:{port} still accepts {limit}s after the signal")


# --------------------------------------------------------------------------- drain

DRAIN = 2.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("loop", LOOPS)
def test_signal_drains_open_tunnel_until_deadline(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin, loop: str, sig: signal.Signals
) -> None:
    proc = pyegress(["-L", "http://127.0.0.1:{0}", "--drain-timeout", str(DRAIN)], loop=loop)
    sock = _echo_tunnel(proc, tcp_origin)
    client = _client(sock)
    with sock:
        t0 = time.monotonic()
        proc.signal(sig)
        # The listener stops accepting at once.
        assert _refused_within(_port(proc), 1.0) < 1.0
        # The open tunnel keeps working until the deadline.
        rounds = 0
        while time.monotonic() - t0 < DRAIN - 0.4:
            _echo(sock, b"still-there-%d" % rounds)
            rounds += 1
            time.sleep(0.3)
        assert rounds >= 3
        assert proc.proc.poll() is None, "exited before the drain deadline"
        # Then it is closed.
        how = _wait_closed(sock, DRAIN + 3)
        closed_after = time.monotonic() - t0
    assert how == "eof", how
    assert DRAIN - 0.3 <= closed_after <= DRAIN + 2.0, closed_after
    assert proc.wait(max(0.1, t0 + DRAIN + 4 - time.monotonic())) == 0
    record = _record(proc, client=client)
    assert record["reason"] == "drain", record
    assert record["bytes_up"] >= len(b"ECHO\nhello") + rounds * len(b"still-there-0")
    assert record["bytes_down"] == record["bytes_up"] - len(b"ECHO\n")
    assert "Traceback" not in proc.output()


def test_sigterm_without_tunnels_exits_at_once(pyegress: PyegressFactory) -> None:
    proc = pyegress(["-L", "http://127.0.0.1:{0}", "-L", "socks5://127.0.0.1:{1}"])
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - t0 < 1.5
    assert proc.records("stopped"), proc.output()
    assert "Traceback" not in proc.output()


def test_tunnel_that_ends_during_drain_is_eof_and_exit_is_early(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin
) -> None:
    proc = pyegress(["-L", "http://127.0.0.1:{0}", "--drain-timeout", "6"])
    sock = _echo_tunnel(proc, tcp_origin)
    client = _client(sock)
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)
    _refused_within(_port(proc), 1.0)
    with sock:
        _echo(sock, b"after the signal")
        sock.shutdown(socket.SHUT_WR)  # the origin answers our FIN with its own
        assert _wait_closed(sock, 3) == "eof"
    assert proc.wait(3) == 0
    assert time.monotonic() - t0 < 3.0, "waited for the drain deadline"
    record = _record(proc, client=client)
    assert record["reason"] == "eof", record
    assert not [r for r in proc.records("tunnel_closed") if r.get("reason") == "drain"]


def test_handshake_in_progress_at_shutdown_does_not_hold_the_exit(
    pyegress: PyegressFactory,
) -> None:
    """A client that connected but never sent its request is not a tunnel to wait for
    past the drain deadline."""
    proc = pyegress(["-L", "http://127.0.0.1:{0}", "--drain-timeout", "1"])
    with socket.create_connection(("127.0.0.1", _port(proc)), timeout=5):
        time.sleep(0.1)
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(6) == 0
        assert time.monotonic() - t0 < 4.0
    assert "Traceback" not in proc.output()


# --------------------------------------------------------------------------- idle


def test_idle_timeout_closes_held_tunnel_not_active_one(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin
) -> None:
    proc = pyegress(["-L", "http://127.0.0.1:{0}?idleTimeout=1"])
    target = f"127.0.0.1:{tcp_origin.port}"
    held, head = http_connect(("127.0.0.1", _port(proc)), target, timeout=5)
    assert head.startswith(b"HTTP/1.1 200 "), head
    active = _echo_tunnel(proc, tcp_origin)
    held_client, active_client = _client(held), _client(active)
    with held, active:
        held.sendall(b"HOLD\n")
        t0 = time.monotonic()
        held_closed_at: float | None = None
        while time.monotonic() - t0 < 2.7:
            _echo(active, b"tick")
            readable, _, _ = select.select([held], [], [], 0.3)
            if readable and held_closed_at is None:
                try:
                    data = held.recv(100)
                except ConnectionResetError:
                    data = b""
                assert data == b"", data
                held_closed_at = time.monotonic() - t0
        assert held_closed_at is not None, "the held tunnel was not closed"
        assert 0.8 <= held_closed_at <= 2.5, held_closed_at
        # The active tunnel outlived the idle timeout by far and still works.
        _echo(active, b"still here")
        active.shutdown(socket.SHUT_WR)
        assert _wait_closed(active, 3) == "eof"
    assert _record(proc, client=held_client)["reason"] == "idle_timeout"
    assert _record(proc, client=active_client)["reason"] == "eof"


# --------------------------------------------------------------------------- connect timeout


@pytest.fixture
def silent_hop() -> Iterator[int]:
    """A port whose kernel accepts connections that nobody ever reads or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port that never answers a SYN: a listener with backlog 0 whose
    accept queue is full (the kernel drops further SYNs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
        time.sleep(0.05)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
    except TimeoutError:
        pass
    else:
        pytest.fail("could not build a loopback port that drops SYNs")
    finally:
        probe.close()
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


def _http_status(sock: socket.socket) -> int:
    head = recv_until(sock, b"\r\n\r\n")
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("hop", ["http", "socks5"])
def test_silent_hop_times_out(pyegress: PyegressFactory, silent_hop: int, hop: str) -> None:
    proc = pyegress(
        ["-L", "http://127.0.0.1:{0}", "-F", f"{hop}://127.0.0.1:{silent_hop}?timeout=1"]
    )
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", _port(proc)), timeout=6)
    with sock:
        client = _client(sock)
        sock.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
        status = _http_status(sock)
        elapsed = time.monotonic() - t0
    assert status in (502, 503, 504), status
    assert 0.8 <= elapsed <= 3.0, elapsed
    record = _record(proc, client=client)
    assert record["reason"] == "connect_timeout", record
    assert record["status"] == status


def test_silent_hop_times_out_for_socks5_client(pyegress: PyegressFactory, silent_hop: int) -> None:
    proc = pyegress(
        ["-L", "socks5://127.0.0.1:{0}", "-F", f"http://127.0.0.1:{silent_hop}?timeout=1"]
    )
    t0 = time.monotonic()
    sock, rep = socks5_connect(("127.0.0.1", _port(proc)), "127.0.0.1", 9, timeout=6)
    with sock:
        client = _client(sock)
    elapsed = time.monotonic() - t0
    assert rep == 6, rep  # TTL expired: the SOCKS5 word for a timeout
    assert 0.8 <= elapsed <= 3.0, elapsed
    assert _record(proc, client=client)["reason"] == "connect_timeout"


def test_direct_dial_times_out(pyegress: PyegressFactory, blackhole: int) -> None:
    proc = pyegress(["-L", "http://127.0.0.1:{0}?timeout=1"])
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", _port(proc)), timeout=6)
    with sock:
        client = _client(sock)
        target = f"127.0.0.1:{blackhole}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status = _http_status(sock)
        elapsed = time.monotonic() - t0
    assert status in (502, 503, 504), status
    assert 0.8 <= elapsed <= 3.0, elapsed
    record = _record(proc, client=client)
    assert record["reason"] == "connect_timeout", record


# --------------------------------------------------------------------------- credentials


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _connect_with(port: int, target: str, user: str, password: str) -> tuple[socket.socket, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        f"Proxy-Authorization: Basic {_basic(user, password)}\r\n\r\n".encode()
    )
    return sock, _http_status(sock)


def test_credentials_never_reach_the_logs(pyegress: PyegressFactory, tcp_origin: TcpOrigin) -> None:
    hop = pyegress(["-D", "-L", "socks5://bob:hunter2@127.0.0.1:{0}"])
    hop_port = _port(hop)
    entry = pyegress(
        [
            "-D",
            "-L",
            "http://alice:s3cret@127.0.0.1:{0}",
            "-F",
            f"socks5://bob:hunter2@127.0.0.1:{hop_port}",
        ]
    )
    bad_hop = pyegress(
        [
            "-D",
            "-L",
            "http://alice:s3cret@127.0.0.1:{0}",
            "-F",
            f"socks5://bob:badpass@127.0.0.1:{hop_port}",
        ]
    )
    target = f"127.0.0.1:{tcp_origin.port}"

    sock, status = _connect_with(_port(entry), target, "alice", "s3cret")
    ok_client = _client(sock)
    with sock:
        assert status == 200
        sock.sendall(b"ECHO\n")
        _echo(sock, b"through two proxies")
        sock.shutdown(socket.SHUT_WR)
        assert _wait_closed(sock, 5) == "eof"

    sock, status = _connect_with(_port(entry), target, "alice", "wrong-pw")
    with sock:
        assert status == 407
    sock, status = _connect_with(_port(bad_hop), target, "alice", "s3cret")
    with sock:
        assert status == 502

    entry_record = _record(entry, client=ok_client)
    assert entry_record["reason"] == "eof", entry_record
    assert entry_record.get("user") == "alice", entry_record
    hop_record = _record(hop, reason="eof")
    assert hop_record.get("user") == "bob", hop_record
    _record(entry, reason="auth_failed")
    _record(bad_hop, reason="hop_refused")
    _record(hop, reason="auth_failed")

    for proc in (entry, hop, bad_hop):  # let them write their last lines too
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    secrets = [
        "s3cret",
        "hunter2",
        "wrong-pw",
        "badpass",
        _basic("alice", "s3cret"),
        _basic("alice", "wrong-pw"),
    ]
    for proc in (entry, hop, bad_hop):
        out = proc.output()
        assert "Traceback" not in out
        for secret in secrets:
            assert secret not in out, f"{secret!r} in the log:\n{out}"
