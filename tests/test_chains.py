"""Chains (``-F``) through real proxies: squid, microsocks, dante and a second pyegress.

curl talks to the entry pyegress; the entry reaches the origin through every hop in
order. A TLS origin proves the CONNECT tunnel is clean end to end (curl verifies the
certificate and every byte), an absolute-URI GET proves forwarding through a chain.
Failures are checked where the client sees them (status codes, SOCKS reply codes) and
where pyegress records them (the close record's ``reason``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PyegressFactory
from tests.support import curl as curlmod
from tests.support import procs
from tests.support.clients import socks5_connect
from tests.support.curl import CurlRun, curl
from tests.support.origins import HttpOrigin, pattern
from tests.support.ports import free_port
from tests.support.procs import Pyegress

pytestmark = pytest.mark.skipif(not curlmod.available(), reason="curl is not installed")

MB = 1024 * 1024
HOP_SECRET = "hopS3cret-x1"
DIAL_FAILURES = {
    "connect_refused",
    "connect_timeout",
    "resolve_failed",
    "host_unreachable",
    "dial_failed",
    "hop_refused",
}


def _port(p: Pyegress, index: int = 0) -> int:
    return int(p.ports[index])


def _client(run: CurlRun) -> str:
    info = run.only.info
    return f"{info['local_ip']}:{info['local_port']}"


def _sock_client(sock: socket.socket) -> str:
    """The ``client`` field pyegress writes for a connection from ``sock``."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _ok(run: CurlRun, *ps: Pyegress) -> None:
    logs = "".join(f"\npyegress log:\n{p.output()[-4000:]}" for p in ps)
    assert run.returncode == 0, run.describe() + logs
    assert run.transfers, run.describe() + logs


def _check_through(
    entry: Pyegress,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
    host: str = "127.0.0.1",
    more: tuple[Pyegress, ...] = (),
) -> tuple[CurlRun, CurlRun]:
    """CONNECT to the TLS origin (4 MB, byte-exact) and an absolute-URI GET (1 MB)."""
    proxy = f"http://127.0.0.1:{_port(entry)}"
    size = 4 * MB
    tls = curl(
        tmp_path,
        [f"https://{host}:{tls_origin.port}/bytes/{size}"],
        "-p",
        "-x",
        proxy,
        "--cacert",
        str(ca_file),
    )
    _ok(tls, entry, *more)
    assert tls.only.http_connect == 200
    assert tls.only.http_code == 200
    assert len(tls.only.body) == size
    assert hashlib.sha256(tls.only.body).digest() == hashlib.sha256(pattern(size)).digest()
    record = entry.record(kind="http-connect", client=_client(tls))
    assert record["status"] == 200
    assert record["reason"] == "eof"
    assert record["target"] == f"{host}:{tls_origin.port}"
    assert size < record["bytes_down"] < size + 256 * 1024

    plain = curl(tmp_path, [f"http://{host}:{http_origin.port}/bytes/{MB}"], "-x", proxy)
    _ok(plain, entry, *more)
    assert plain.only.http_code == 200
    assert plain.only.body == pattern(MB)
    assert http_origin.requests[-1] == ("GET", f"/bytes/{MB}", f"{host}:{http_origin.port}")
    record = entry.record(kind="http-forward", client=_client(plain))
    assert record["status"] == 200
    assert record["target"] == f"{host}:{http_origin.port}"
    return tls, plain


# -- One third-party hop ---------------------------------------------------------------


def _start_hop(name: str, tmp_path: Path) -> tuple[procs.Process, int]:
    """Start a third-party proxy the test can stop itself (the fixtures hide the process)."""
    if not procs.have(name):
        pytest.skip(f"{name} is not installed")
    if name == "squid":
        return procs.start_squid(tmp_path)
    if name == "microsocks":
        return procs.start_microsocks(tmp_path)
    if os.geteuid() != 0:
        pytest.skip("danted needs root here")
    return procs.start_danted(tmp_path)


@pytest.fixture
def hop_procs(tmp_path: Path) -> Iterator[Callable[[str], tuple[procs.Process, int]]]:
    started: list[procs.Process] = []

    def start(name: str) -> tuple[procs.Process, int]:
        proc, port = _start_hop(name, tmp_path)
        started.append(proc)
        return proc, port

    yield start
    procs.stop_all(started)


@pytest.mark.parametrize("hop", ["squid", "microsocks", "danted"])
def test_chain_through_a_real_proxy(
    hop_procs: Callable[[str], tuple[procs.Process, int]],
    pyegress: PyegressFactory,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
    hop: str,
) -> None:
    hop_proc, hop_port = hop_procs(hop)
    scheme = "http" if hop == "squid" else "socks5"
    entry = pyegress(["-L", "http://127.0.0.1:{0}", "-F", f"{scheme}://127.0.0.1:{hop_port}"])
    _check_through(entry, http_origin, tls_origin, ca_file, tmp_path)

    # A SOCKS5 listener in front of the same hop.
    socks_entry = pyegress(
        ["-L", "socks5://127.0.0.1:{0}", "-F", f"{scheme}://127.0.0.1:{hop_port}"]
    )
    run = curl(
        tmp_path,
        [f"http://127.0.0.1:{http_origin.port}/bytes/12345"],
        "-x",
        f"socks5h://127.0.0.1:{_port(socks_entry)}",
    )
    _ok(run, socks_entry)
    assert run.only.body == pattern(12345)
    assert socks_entry.record(kind="socks5", client=_client(run))["status"] == 0

    # The hop really is on the path: without it the same request fails to dial.
    hop_proc.stop()
    run = curl(
        tmp_path,
        [f"http://127.0.0.1:{http_origin.port}/bytes/1"],
        "-x",
        f"http://127.0.0.1:{_port(entry)}",
    )
    assert run.only.http_code == 502, run.describe()
    assert entry.record(kind="http-forward", client=_client(run))["reason"] == "connect_refused"


@pytest.fixture
def microsocks_auth(tmp_path: Path) -> Iterator[int]:
    if not procs.have("microsocks"):
        pytest.skip("microsocks is not installed")
    proc, port = procs.start_microsocks(tmp_path, "user", HOP_SECRET)
    yield port
    proc.stop()


def test_socks5_hop_with_credentials(
    pyegress: PyegressFactory,
    microsocks_auth: int,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    entry = pyegress(
        [
            "-D",
            "-L",
            "http://127.0.0.1:{0}",
            "-F",
            f"socks5://user:{HOP_SECRET}@127.0.0.1:{microsocks_auth}",
        ]
    )
    _check_through(entry, http_origin, tls_origin, ca_file, tmp_path)
    assert HOP_SECRET not in entry.output()


def test_socks5_hop_with_wrong_credentials_is_a_502(
    pyegress: PyegressFactory,
    microsocks_auth: int,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    entry = pyegress(
        [
            "-D",
            "-L",
            "http://127.0.0.1:{0}",
            "-F",
            f"socks5://user:wrong-{HOP_SECRET}@127.0.0.1:{microsocks_auth}",
        ]
    )
    proxy = f"http://127.0.0.1:{_port(entry)}"
    run = curl(tmp_path, [f"http://127.0.0.1:{http_origin.port}/bytes/10"], "-x", proxy)
    assert run.only.http_code == 502, run.describe()
    record = entry.record(kind="http-forward", client=_client(run))
    assert record["reason"] == "hop_refused"
    assert record["status"] == 502

    run = curl(
        tmp_path,
        [f"https://127.0.0.1:{tls_origin.port}/bytes/10"],
        "-p",
        "-x",
        proxy,
        "--cacert",
        str(ca_file),
    )
    assert run.only.http_connect == 502, run.describe()
    record = entry.record(kind="http-connect", client=_client(run))
    assert record["reason"] == "hop_refused"
    assert record["status"] == 502
    assert http_origin.requests == []
    assert tls_origin.requests == []
    assert HOP_SECRET not in entry.output()


# -- Two hops --------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["squid-microsocks", "microsocks-squid"])
def test_two_third_party_hops(
    pyegress: PyegressFactory,
    hop_procs: Callable[[str], tuple[procs.Process, int]],
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
    order: str,
) -> None:
    first, second = order.split("-")
    started = {name: hop_procs(name) for name in (first, second)}
    url = {
        "squid": f"http://127.0.0.1:{started['squid'][1]}",
        "microsocks": f"socks5://127.0.0.1:{started['microsocks'][1]}",
    }
    entry = pyegress(["-L", "http://127.0.0.1:{0}", "-F", url[first], "-F", url[second]])
    _check_through(entry, http_origin, tls_origin, ca_file, tmp_path)

    # Both hops are on the path, in order: with the second one gone, the first one
    # (reached, asked for the second) refuses.
    started[second][0].stop()
    run = curl(
        tmp_path,
        [f"http://127.0.0.1:{http_origin.port}/bytes/1"],
        "-x",
        f"http://127.0.0.1:{_port(entry)}",
    )
    assert run.only.http_code in (502, 503), run.describe()
    record = entry.record(kind="http-forward", client=_client(run))
    assert record["reason"] == "hop_refused"
    assert record["status"] == run.only.http_code


def test_chain_through_a_second_pyegress_with_credentials(
    pyegress: PyegressFactory,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    exit_ = pyegress(["-D", "-L", f"http://u:{HOP_SECRET}@127.0.0.1:{{0}}"])
    hop = f"127.0.0.1:{_port(exit_)}"
    entry = pyegress(["-D", "-L", "http://127.0.0.1:{0}", "-F", f"http://u:{HOP_SECRET}@{hop}"])
    _check_through(entry, http_origin, tls_origin, ca_file, tmp_path, more=(exit_,))
    # The exit saw two tunnels, both authenticated as u (the forward went as CONNECT).
    tunnels = exit_.matching(2, kind="http-connect", status=200)
    assert {r["user"] for r in tunnels} == {"u"}
    assert {r["target"] for r in tunnels} == {
        f"127.0.0.1:{tls_origin.port}",
        f"127.0.0.1:{http_origin.port}",
    }

    # Without credentials on the hop the exit answers 407, which the entry turns into 502.
    bare = pyegress(["-L", "http://127.0.0.1:{0}", "-F", f"http://{hop}"])
    run = curl(
        tmp_path,
        [f"http://127.0.0.1:{http_origin.port}/bytes/10"],
        "-x",
        f"http://127.0.0.1:{_port(bare)}",
    )
    assert run.only.http_code == 502, run.describe()
    record = bare.record(kind="http-forward", client=_client(run))
    assert record["reason"] == "hop_refused"
    assert exit_.matching(1, reason="auth_failed")[0]["status"] == 407
    for p in (exit_, entry, bare):
        assert HOP_SECRET not in p.output()


# -- A name stays a name ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5", "http"])
def test_a_name_stays_a_name_to_the_last_hop(
    pyegress: PyegressFactory,
    http_origin: HttpOrigin,
    tls_origin: HttpOrigin,
    ca_file: Path,
    tmp_path: Path,
    scheme: str,
) -> None:
    exit_ = pyegress(["-L", f"{scheme}://127.0.0.1:{{0}}"])
    entry = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-L",
            "socks5://127.0.0.1:{1}",
            "-F",
            f"{scheme}://127.0.0.1:{_port(exit_)}",
        ]
    )
    _check_through(entry, http_origin, tls_origin, ca_file, tmp_path, "localhost", (exit_,))
    # The exit, which dials, was asked for the name, not for an address.
    kind, ok = ("socks5", 0) if scheme == "socks5" else ("http-connect", 200)
    targets = [r["target"] for r in exit_.matching(2, kind=kind, status=ok)]
    assert targets == [f"localhost:{tls_origin.port}", f"localhost:{http_origin.port}"]

    # A SOCKS5 client naming the host (socks5h) on the entry: the name travels too.
    run = curl(
        tmp_path,
        [f"http://localhost:{http_origin.port}/bytes/4321"],
        "-x",
        f"socks5h://127.0.0.1:{_port(entry, 1)}",
    )
    _ok(run, entry, exit_)
    assert run.only.body == pattern(4321)
    assert entry.record(kind="socks5", client=_client(run))["target"] == (
        f"localhost:{http_origin.port}"
    )
    targets = [r["target"] for r in exit_.matching(3, kind=kind, status=ok)]
    assert targets[2] == f"localhost:{http_origin.port}"


# -- Dial failures ---------------------------------------------------------------------


def _dead_port() -> int:
    """A loopback port with nothing listening (connecting to it is refused)."""
    return free_port()


def test_target_refused_direct(pyegress: PyegressFactory, tmp_path: Path) -> None:
    p = pyegress(["-L", "http://127.0.0.1:{0}", "-L", "socks5://127.0.0.1:{1}"])
    dead = _dead_port()
    proxy = f"http://127.0.0.1:{_port(p)}"

    run = curl(tmp_path, [f"http://127.0.0.1:{dead}/"], "-x", proxy)
    assert run.only.http_code == 502, run.describe()
    record = p.record(kind="http-forward", client=_client(run))
    assert (record["status"], record["reason"]) == (502, "connect_refused")
    assert record["target"] == f"127.0.0.1:{dead}"

    run = curl(tmp_path, [f"https://127.0.0.1:{dead}/"], "-p", "-x", proxy)
    assert run.returncode != 0
    assert run.only.http_connect == 502, run.describe()
    record = p.record(kind="http-connect", client=_client(run))
    assert (record["status"], record["reason"]) == (502, "connect_refused")

    sock, rep = socks5_connect(("127.0.0.1", _port(p, 1)), "localhost", dead)
    client = _sock_client(sock)
    sock.close()
    assert rep == 5
    record = p.record(kind="socks5", client=client)
    assert (record["status"], record["reason"]) == (5, "connect_refused")
    assert record["target"] == f"localhost:{dead}"


def test_first_hop_down(pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path) -> None:
    dead = _dead_port()
    p = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-L",
            "socks5://127.0.0.1:{1}",
            "-F",
            f"http://127.0.0.1:{dead}",
        ]
    )
    proxy = f"http://127.0.0.1:{_port(p)}"
    run = curl(tmp_path, [f"http://127.0.0.1:{http_origin.port}/"], "-x", proxy)
    assert run.only.http_code in (502, 503), run.describe()
    record = p.record(kind="http-forward", client=_client(run))
    assert record["status"] == run.only.http_code
    assert record["reason"] in DIAL_FAILURES

    run = curl(tmp_path, [f"https://127.0.0.1:{http_origin.port}/"], "-p", "-x", proxy)
    assert run.only.http_connect in (502, 503), run.describe()
    record = p.record(kind="http-connect", client=_client(run))
    assert record["status"] == run.only.http_connect
    assert record["reason"] in DIAL_FAILURES

    sock, rep = socks5_connect(("127.0.0.1", _port(p, 1)), "127.0.0.1", http_origin.port)
    client = _sock_client(sock)
    sock.close()
    assert rep != 0
    record = p.record(kind="socks5", client=client)
    assert record["status"] == rep
    assert record["reason"] in DIAL_FAILURES
    assert http_origin.requests == []


def test_hop_that_never_answers_times_out(
    pyegress: PyegressFactory, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    # A listening socket nobody accepts on: the TCP handshake completes, CONNECT is never
    # answered, so the hop's ?timeout= ends the dial.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        p = pyegress(
            [
                "-L",
                "http://127.0.0.1:{0}",
                "-F",
                f"http://127.0.0.1:{silent.getsockname()[1]}?timeout=1",
            ]
        )
        started = time.monotonic()
        run = curl(
            tmp_path,
            [f"http://127.0.0.1:{http_origin.port}/"],
            "-x",
            f"http://127.0.0.1:{_port(p)}",
            timeout=15,
        )
        elapsed = time.monotonic() - started
        assert run.only.http_code in (502, 503, 504), run.describe()
        assert elapsed < 5
        record = p.record(kind="http-forward", client=_client(run))
        assert record["reason"] == "connect_timeout"
        assert record["status"] == run.only.http_code
    finally:
        silent.close()


@pytest.mark.parametrize("hop", ["squid", "microsocks"])
def test_hop_cannot_reach_the_target(
    request: pytest.FixtureRequest, pyegress: PyegressFactory, tmp_path: Path, hop: str
) -> None:
    hop_port: int = request.getfixturevalue(hop)
    scheme = "http" if hop == "squid" else "socks5"
    p = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-L",
            "socks5://127.0.0.1:{1}",
            "-F",
            f"{scheme}://127.0.0.1:{hop_port}",
        ]
    )
    dead = _dead_port()
    run = curl(tmp_path, [f"https://127.0.0.1:{dead}/"], "-p", "-x", f"http://127.0.0.1:{_port(p)}")
    assert run.only.http_connect in (502, 503), run.describe()
    record = p.record(kind="http-connect", client=_client(run))
    assert record["reason"] == "hop_refused"
    assert record["status"] == run.only.http_connect

    sock, rep = socks5_connect(("127.0.0.1", _port(p, 1)), "127.0.0.1", dead)
    client = _sock_client(sock)
    sock.close()
    record = p.record(kind="socks5", client=client)
    assert record["reason"] == "hop_refused"
    assert record["status"] == rep
    if hop == "microsocks":
        # A SOCKS5 hop's own reply code reaches the SOCKS5 client: 5, refused.
        assert rep == 5
    else:
        assert rep != 0
