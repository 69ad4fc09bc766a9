"""Faults on the tier link: a DMZ that dies, freezes, stays silent, refuses the sidecar's
certificate, receives garbage, drains on SIGTERM, limits its streams or comes back.

Every scenario runs real ``pyegress`` processes (sidecar ``-L http -F h2://...`` and one
or two DMZs ``-L h2://...`` over mutual TLS) and checks what the outside can see: the
client's bytes and status lines, each process's ``tunnel_closed`` records and log
events, and the HTTP/2 frames a DMZ answers with, decoded by hyperframe.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hyperframe.frame import GoAwayFrame, SettingsFrame

from tests.conftest import PyegressFactory, TierCerts
from tests.support.clients import http_connect, recv_exact
from tests.support.faults import (
    PREFACE,
    RefusingH2Server,
    SilentServer,
    frozen,
    h2_tls_client,
    raw_frame,
    read_frames,
    tls_server_context,
    wait_until,
)
from tests.support.origins import TcpOrigin, pattern
from tests.support.pki import CertAuthority
from tests.support.ports import wait_port
from tests.support.procs import Pyegress

GROUP = "strategy=fifo&max_fails=1&fail_timeout=10s"
DIAL_FAILURES = {
    "connect_refused",
    "connect_timeout",
    "dial_failed",
    "host_unreachable",
    "hop_refused",
    "tier_link_lost",
}
PROTOCOL_ERROR = 0x1
FRAME_SIZE_ERROR = 0x6
SOURCE_SIZE = 64 * 1024 * 1024


# -- processes --------------------------------------------------------------------------


def _port(p: Pyegress, index: int = 0) -> int:
    port: int = p.ports[index]
    return port


def _dmz(
    pyegress: PyegressFactory,
    certs: TierCerts,
    params: str = "",
    extra: Sequence[str] = (),
    port: int | None = None,
) -> Pyegress:
    """A DMZ ``-L h2://`` with mutual TLS, debug logging (``link_open``)."""
    query = certs.dmz_params() + (f"&{params}" if params else "")
    if port is None:
        return pyegress([*extra, "-D", "-L", f"h2://127.0.0.1:{{0}}?{query}"])
    proc = pyegress([*extra, "-D", "-L", f"h2://127.0.0.1:{port}?{query}"], nports=0)
    try:
        wait_port("127.0.0.1", port, 15)
    except TimeoutError:
        raise AssertionError(f"DMZ did not start on {port}:\n{proc.output()}") from None
    return proc


def _sidecar(
    pyegress: PyegressFactory,
    certs: TierCerts,
    dmz_ports: Sequence[int],
    params: str = "",
    tls: str | None = None,
) -> Pyegress:
    """A sidecar whose one hop is an h2 node group over the given DMZ ports, fifo."""
    members = ",".join(f"127.0.0.1:{p}" for p in dmz_ports)
    tls_params = certs.sidecar_params() if tls is None else tls
    query = "&".join(q for q in (GROUP, params, tls_params) if q)
    return pyegress(["-D", "-L", "http://127.0.0.1:{0}", "-F", f"h2://{members}?{query}"])


def _tail(*procs: Pyegress) -> str:
    return "".join(f"\n--- {' '.join(p.argv[3:])[:160]}\n{p.output()[-4000:]}" for p in procs)


# -- clients ----------------------------------------------------------------------------


def _target(origin: TcpOrigin) -> str:
    return f"127.0.0.1:{origin.port}"


def _open(sidecar: Pyegress, origin: TcpOrigin, timeout: float = 10) -> tuple[socket.socket, int]:
    """CONNECT through the sidecar; the socket and the status code."""
    sock, head = http_connect(("127.0.0.1", _port(sidecar)), _target(origin), timeout)
    return sock, int(head.split(b" ", 2)[1])


def _echo_tunnel(sidecar: Pyegress, origin: TcpOrigin, *procs: Pyegress) -> socket.socket:
    sock, status = _open(sidecar, origin)
    if status != 200:
        sock.close()
        raise AssertionError(f"CONNECT answered {status}" + _tail(sidecar, *procs))
    sock.sendall(b"ECHO\n")
    _round_trip(sock, b"hello")
    return sock


def _round_trip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data)) == data


def _finish(sock: socket.socket) -> None:
    """Half-close, read the echo's FIN, close: the tunnel ends with ``eof``."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(10)
    while sock.recv(65536):
        pass
    sock.close()


def _read_to_end(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """Read as fast as possible until the tunnel ends: ("eof"|"reset", bytes read)."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"tunnel still open {timeout}s later ({len(data)} bytes read)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return "reset", bytes(data)
        except TimeoutError:
            continue
        if not chunk:
            return "eof", bytes(data)
        data += chunk


def _no_traceback(*procs: Pyegress) -> None:
    for p in procs:
        out = p.output()
        assert "Traceback" not in out, _tail(p)
        bad = [r for r in p.records() if r.get("level") in ("error", "critical")]
        assert not bad, bad


# -- 1. DMZ killed mid-transfer ---------------------------------------------------------


def test_dmz_killed_mid_transfer_ends_the_tunnel_and_fails_over(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    dmz_a = _dmz(pyegress, tier_certs)
    dmz_b = _dmz(pyegress, tier_certs)
    sidecar = _sidecar(pyegress, tier_certs, [_port(dmz_a), _port(dmz_b)])

    sock, status = _open(sidecar, tcp_origin)
    try:
        assert status == 200, _tail(sidecar, dmz_a)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        # Far more than the slow reader takes in the test's time. (tcp_origin builds its
        # pattern up front: SOURCE 2000000000 would cost 2 GB and seconds of hashing.)
        sock.sendall(b"SOURCE %d\n" % SOURCE_SIZE)
        received = bytearray(recv_exact(sock, 1))
        slow_until = time.monotonic() + 1.0
        while time.monotonic() < slow_until:  # a slow reader: 16 KiB every 10 ms
            received += sock.recv(16384)
            time.sleep(0.01)
        assert len(received) > 0
        assert dmz_a.records("link_open"), "fifo: A first"
        assert not dmz_b.records("link_open")

        dmz_a.proc.kill()
        killed = time.monotonic()
        how, rest = _read_to_end(sock, timeout=5)
        ended_after = time.monotonic() - killed
    finally:
        sock.close()
    received += rest
    assert how in ("eof", "reset")
    assert ended_after < 5
    # Whatever arrived is the origin's byte stream, in order, and far from complete.
    assert bytes(received) == pattern(len(received))
    assert len(received) < SOURCE_SIZE // 4

    record = sidecar.record(target=_target(tcp_origin))
    assert record["reason"] == "tier_link_lost", record
    assert record["status"] == 200
    assert record["bytes_down"] >= len(received)

    # The next tunnel goes to DMZ-B.
    sock = _echo_tunnel(sidecar, tcp_origin, dmz_b)
    _round_trip(sock, b"after the kill")
    _finish(sock)
    on_b = dmz_b.record(target=_target(tcp_origin))
    assert on_b["bytes_up"] == len(b"ECHO\nhelloafter the kill")
    assert on_b["reason"] == "eof"
    assert sidecar.matching(2)[-1]["reason"] == "eof"


# -- 2. DMZ frozen (SIGSTOP): the PING deadline closes the link --------------------------


def test_frozen_dmz_is_dropped_by_ping_and_new_tunnels_go_to_b(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    dmz_a = _dmz(pyegress, tier_certs)
    dmz_b = _dmz(pyegress, tier_certs)
    # ping=1: a PING every second; unanswered for max(1, 10) = 10 s closes the link.
    sidecar = _sidecar(pyegress, tier_certs, [_port(dmz_a), _port(dmz_b)], "ping=1&timeout=2")
    sock = _echo_tunnel(sidecar, tcp_origin, dmz_a)
    try:
        time.sleep(1.5)  # a PING or two answered: the keepalive runs
        _round_trip(sock, b"before the freeze")
        assert dmz_a.records("link_open")
        assert not dmz_b.records("link_open")
        with frozen(dmz_a.pid):
            stopped = time.monotonic()
            how, _ = _read_to_end(sock, timeout=16)
            detected = time.monotonic() - stopped
            record = sidecar.record(target=_target(tcp_origin))
            # While A is still frozen, new tunnels are served by B.
            started = time.monotonic()
            fresh = _echo_tunnel(sidecar, tcp_origin, dmz_a, dmz_b)
            first_new = time.monotonic() - started
            _round_trip(fresh, b"via b")
            _finish(fresh)
            again = _echo_tunnel(sidecar, tcp_origin, dmz_a, dmz_b)
            _finish(again)
            b_records = dmz_b.matching(2, target=_target(tcp_origin))
    finally:
        sock.close()
    assert how in ("eof", "reset")
    assert detected < 13.5, f"link to the frozen DMZ closed only after {detected:.1f}s"
    assert record["reason"] == "tier_link_lost", record
    assert record["status"] == 200
    assert record["bytes_up"] == len(b"ECHO\nhellobefore the freeze")
    assert len(b_records) == 2
    # (Reconnecting to the frozen A can take up to timeout=2 before B is tried.)
    assert first_new < 5, f"first tunnel after the loss took {first_new:.1f}s"


# -- 3./4. A DMZ that accepts and never speaks ---------------------------------------------


@pytest.fixture(params=["tcp-silent", "tls-no-settings"])
def silent(request: pytest.FixtureRequest, tier_certs: TierCerts) -> Iterator[SilentServer]:
    """A member that accepts TCP and says nothing, or completes TLS (ALPN h2, the DMZ's
    certificate) and then sends no SETTINGS."""
    tls = None
    if request.param == "tls-no-settings":
        tls = tls_server_context(tier_certs.server_cert, tier_certs.server_key, ["h2"])
    with SilentServer(tls) as server:
        yield server


def test_silent_dmz_is_a_504_connect_timeout(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    tcp_origin: TcpOrigin,
    silent: SilentServer,
) -> None:
    sidecar = _sidecar(pyegress, tier_certs, [silent.port], "timeout=1")
    started = time.monotonic()
    sock, status = _open(sidecar, tcp_origin)
    elapsed = time.monotonic() - started
    sock.close()
    assert status == 504, _tail(sidecar)
    assert elapsed < 3, f"504 only after {elapsed:.1f}s"
    record = sidecar.record(target=_target(tcp_origin))
    assert record["reason"] == "connect_timeout", record
    assert record["status"] == 504
    assert silent.accepted >= 1
    if silent.tls is not None:
        # The handshake was done: it is the missing SETTINGS that timed out.
        assert silent.handshakes >= 1, silent.handshake_errors


def test_silent_member_is_skipped_for_the_next_member(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    tcp_origin: TcpOrigin,
    silent: SilentServer,
) -> None:
    real = _dmz(pyegress, tier_certs)
    sidecar = _sidecar(pyegress, tier_certs, [silent.port, _port(real)], "timeout=1")
    sock = _echo_tunnel(sidecar, tcp_origin, real)
    _finish(sock)
    assert silent.accepted == 1
    durations = []
    for i in range(3):
        started = time.monotonic()
        sock, status = _open(sidecar, tcp_origin)
        durations.append(time.monotonic() - started)
        assert status == 200, _tail(sidecar)
        sock.sendall(b"ECHO\n")
        _round_trip(sock, f"tunnel {i}".encode())
        _finish(sock)
    # The silent member failed once and is skipped for fail_timeout: nobody dials it.
    assert silent.accepted == 1
    assert max(durations) < 1.0, durations
    assert len(real.matching(4, target=_target(tcp_origin))) == 4
    assert [r["status"] for r in sidecar.matching(4)] == [200] * 4


# -- 5. Client certificate problems ------------------------------------------------------


@pytest.mark.parametrize("problem", ["no-client-cert", "cert-from-another-ca"])
def test_refused_client_certificate(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    tcp_origin: TcpOrigin,
    tmp_path: Path,
    problem: str,
) -> None:
    dmz = _dmz(pyegress, tier_certs)
    if problem == "no-client-cert":
        tls = f"ca={tier_certs.ca}&serverName=dmz.test"
    else:
        other_dir = tmp_path / "other-ca"
        other_dir.mkdir()
        other = CertAuthority(other_dir, "another test CA")
        # Same identity, wrong issuer.
        issued = other.issue("web", uris=(TierCerts.IDENTITY,), client=True)
        tls = f"cert={issued.cert}&key={issued.key}&ca={tier_certs.ca}&serverName=dmz.test"
    bad = _sidecar(pyegress, tier_certs, [_port(dmz)], "timeout=3", tls=tls)

    sock, status = _open(bad, tcp_origin)
    sock.close()
    assert status == 502, _tail(bad, dmz)
    record = bad.record(target=_target(tcp_origin))
    assert record["reason"] in DIAL_FAILURES, record
    assert record["status"] == 502

    # The refusal is logged with its reason (the readiness probe's bare TCP connect
    # leaves a record of its own, without a certificate reason).
    def refusals() -> list[dict[str, Any]]:
        return [
            r
            for r in dmz.records("tls_handshake_failed")
            if "CERTIFICATE" in str(r.get("reason", "")).upper()
        ]

    assert wait_until(lambda: bool(refusals()), 5), _tail(dmz)
    failure = refusals()[0]
    assert str(failure.get("peer", "")).startswith("127.0.0.1:"), failure
    assert failure.get("error"), failure

    # No tunnel reached the DMZ's handler; each refused handshake is one refused
    # tunnel in the audit trail: a client_auth decision and an auth_failed close.
    # The log line is written before the records: wait until every decision has its close.
    def paired() -> bool:
        opened = sorted(d["conn_id"] for d in dmz.records("decision"))
        closed = sorted(c["conn_id"] for c in dmz.records("tunnel_closed"))
        return bool(closed) and opened == closed

    assert wait_until(paired, 5), _tail(dmz)
    closes = dmz.records("tunnel_closed")
    assert all(r["reason"] == "auth_failed" for r in closes), closes
    decisions = dmz.records("decision")
    assert {d["decision"]["reason"] for d in decisions} == {"client_auth"}, decisions

    # The DMZ keeps serving a correctly configured sidecar.
    good = _sidecar(pyegress, tier_certs, [_port(dmz)], "timeout=3")
    sock = _echo_tunnel(good, tcp_origin, dmz)
    _finish(sock)
    served = dmz.record(target=_target(tcp_origin))
    assert served["identity"] == TierCerts.IDENTITY
    _no_traceback(dmz)


# -- 6. HTTP/2 garbage --------------------------------------------------------------------

GARBAGE: dict[str, tuple[bytes, int | None]] = {
    # Not the preface at all: the DMZ hangs up (no GOAWAY required before a preface).
    "not-a-preface": (b"GET / HTTP/1.1\r\nHost: dmz.test\r\nX-Pad: padpadpad\r\n\r\n", None),
    # DATA must belong to a stream.
    "data-on-stream-0": (raw_frame(0x0, 0, 0, b"oops"), PROTOCOL_ERROR),
    # Longer than the DMZ's SETTINGS_MAX_FRAME_SIZE (64 KiB).
    "oversized-frame": (raw_frame(0x0, 0, 1, b"x" * 70000), FRAME_SIZE_ERROR),
    # PING bodies are exactly 8 bytes.
    "short-ping": (raw_frame(0x6, 0, 0, b"1234"), FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_h2_garbage_closes_the_connection_and_the_dmz_serves_on(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin, case: str
) -> None:
    dmz = _dmz(pyegress, tier_certs)
    payload, goaway_code = GARBAGE[case]
    with h2_tls_client(
        _port(dmz), tier_certs.ca, tier_certs.client_cert, tier_certs.client_key
    ) as conn:
        assert conn.selected_alpn_protocol() == "h2"
        if goaway_code is None:
            conn.sendall(payload)
        else:
            conn.sendall(PREFACE + SettingsFrame(0).serialize())
            settings = read_frames(conn, timeout=0.5).frames  # SETTINGS, WINDOW_UPDATE, ACK
            assert any(isinstance(f, SettingsFrame) for f in settings), settings
            conn.sendall(payload)
        back = read_frames(conn, timeout=5)
    assert back.ended, f"the DMZ kept the connection open after {case}"
    assert not back.undecodable, back
    goaways = [f for f in back.frames if isinstance(f, GoAwayFrame)]
    if goaway_code is not None:
        assert goaways, f"no GOAWAY before the close: {back}"
        assert goaways[-1].error_code == goaway_code, goaways[-1]
        assert back.frames[-1] is goaways[-1], "GOAWAY is the last frame"

    _no_traceback(dmz)
    sidecar = _sidecar(pyegress, tier_certs, [_port(dmz)])
    sock = _echo_tunnel(sidecar, tcp_origin, dmz)
    _finish(sock)
    dmz.record(target=_target(tcp_origin), reason="eof")
    _no_traceback(dmz)


# -- 7. Graceful DMZ shutdown --------------------------------------------------------------


def test_sigterm_drains_open_tunnels_and_new_ones_go_to_b(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    drain = 5.0
    dmz_a = _dmz(pyegress, tier_certs, extra=["--drain-timeout", str(drain)])
    dmz_b = _dmz(pyegress, tier_certs)
    sidecar = _sidecar(pyegress, tier_certs, [_port(dmz_a), _port(dmz_b)])
    sock = _echo_tunnel(sidecar, tcp_origin, dmz_a)
    sent = len(b"ECHO\nhello")
    # Each expectation is checked even when an earlier one failed; all are reported.
    problems: list[str] = []
    try:
        assert dmz_a.records("link_open")
        assert not dmz_b.records("link_open")
        dmz_a.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert wait_until(lambda: bool(dmz_a.records("draining")), 3), _tail(dmz_a)

        # A new tunnel from the same sidecar goes to B right away (A sent GOAWAY).
        started = time.monotonic()
        fresh = _echo_tunnel(sidecar, tcp_origin, dmz_a, dmz_b)
        first_new = time.monotonic() - started
        _finish(fresh)
        dmz_b.record(target=_target(tcp_origin))
        if first_new >= 2:
            problems.append(f"the first tunnel after SIGTERM took {first_new:.1f}s")

        # The open tunnel keeps working for a while after the signal.
        sock.settimeout(2)
        round_trips = 0
        while time.monotonic() - signalled < 3.0:
            data = b"tick %d" % round_trips
            try:
                _round_trip(sock, data)
            except (TimeoutError, ConnectionError) as exc:
                problems.append(
                    f"the open tunnel stopped carrying bytes after SIGTERM: {round_trips} "
                    f"echo round trips, then {type(exc).__name__} "
                    f"{time.monotonic() - signalled:.1f}s after the signal"
                )
                break
            sent += len(data)
            round_trips += 1
            time.sleep(0.1)
        if dmz_a.proc.poll() is not None:
            problems.append("DMZ-A exited before its drain deadline")

        try:
            code: int | None = dmz_a.wait(max(0.1, drain + 4 - (time.monotonic() - signalled)))
        except subprocess.TimeoutExpired:
            code = None
        exited = time.monotonic() - signalled
        how, _ = _read_to_end(sock, timeout=5)
    finally:
        sock.close()
    if code != 0:
        problems.append(f"DMZ-A exit status {code} ({exited:.1f}s after SIGTERM)")
    assert how in ("eof", "reset")
    on_a = dmz_a.record(target=_target(tcp_origin))
    if on_a["reason"] != "drain" or on_a["bytes_up"] != sent:
        problems.append(f"DMZ-A's record {on_a} (expected reason drain, bytes_up {sent})")
    assert not problems, "\n".join(problems) + _tail(sidecar, dmz_a)
    _no_traceback(dmz_a, dmz_b)


# -- 8. maxStreams --------------------------------------------------------------------------


def test_max_streams_makes_the_sidecar_open_more_links(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    dmz = _dmz(pyegress, tier_certs, "maxStreams=2")
    sidecar = _sidecar(pyegress, tier_certs, [_port(dmz)])
    socks: list[socket.socket] = []
    try:
        for _ in range(5):
            socks.append(_echo_tunnel(sidecar, tcp_origin, dmz))
        # All five are open at once, and each still works.
        for i, sock in enumerate(socks):
            _round_trip(sock, f"tunnel {i} of 5".encode())
        for sock in socks:
            _finish(sock)
    finally:
        for sock in socks:
            sock.close()
    records = dmz.matching(5, target=_target(tcp_origin))
    assert all(r["reason"] == "eof" for r in records), records
    links = {r["client"] for r in records}
    assert len(links) >= 3, f"5 tunnels over {len(links)} link(s) with maxStreams=2: {links}"
    assert len(dmz.records("link_open")) >= 3


# -- 9. Reconnect after the DMZ comes back -------------------------------------------------


def test_sidecar_reconnects_to_a_restarted_dmz(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    dmz = _dmz(pyegress, tier_certs)
    port = _port(dmz)
    sidecar = _sidecar(pyegress, tier_certs, [port])
    _finish(_echo_tunnel(sidecar, tcp_origin, dmz))

    dmz.proc.kill()
    dmz.proc.wait(5)
    sock, status = _open(sidecar, tcp_origin)
    sock.close()
    assert status == 502
    down = sidecar.matching(2)[-1]
    assert down["reason"] in DIAL_FAILURES, down

    again = _dmz(pyegress, tier_certs, port=port)
    restarted = time.monotonic()
    statuses: list[int] = []
    while True:
        sock, status = _open(sidecar, tcp_origin)
        statuses.append(status)
        if status == 200:
            break
        sock.close()
        if time.monotonic() - restarted > 10:
            raise AssertionError(f"no tunnel 10 s after the restart: {statuses}" + _tail(sidecar))
        time.sleep(0.2)
    try:
        sock.sendall(b"ECHO\n")
        _round_trip(sock, b"back again")
        _finish(sock)
    finally:
        sock.close()
    record = again.record(target=_target(tcp_origin))
    assert record["reason"] == "eof"
    assert record["bytes_up"] == len(b"ECHO\nback again")


# -- 10. A stream the DMZ refuses -----------------------------------------------------------


def test_refused_stream_is_retried_on_the_next_member(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin
) -> None:
    """RST_STREAM(REFUSED_STREAM) is what a stopping DMZ answers a stream that crossed its
    GOAWAY (listeners/h2.py: "try another node"); RFC 9113 section 8.7: the stream was not
    processed, so it may be retried. The sidecar should open it on the next member."""
    ctx = tls_server_context(tier_certs.server_cert, tier_certs.server_key, ["h2"])
    with RefusingH2Server(ctx) as refusing:
        real = _dmz(pyegress, tier_certs)
        sidecar = _sidecar(pyegress, tier_certs, [refusing.port, _port(real)], "timeout=3")
        try:
            sock, status = _open(sidecar, tcp_origin)
        except ConnectionError as exc:
            raise AssertionError(
                f"the sidecar answered the CONNECT with {type(exc).__name__}, no status"
                + _tail(sidecar)
            ) from None
        try:
            assert refusing.refused, f"the refusing member was not tried: {refusing.__dict__}"
            assert status == 200, f"CONNECT answered {status}" + _tail(sidecar)
            sock.sendall(b"ECHO\n")
            _round_trip(sock, b"via the next member")
            _finish(sock)
        finally:
            sock.close()
    real.record(target=_target(tcp_origin), reason="eof")
    _no_traceback(sidecar)
