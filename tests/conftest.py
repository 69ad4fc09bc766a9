"""Shared fixtures: real origins, real proxies, and pyegress run as its own process."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trustme

from tests.support import procs
from tests.support.origins import HttpOrigin, TcpOrigin
from tests.support.pki import CertAuthority
from tests.support.ports import free_port, wait_port

LOOPS = ["uvloop", "asyncio"]


@pytest.fixture
def tcp_origin() -> Iterator[TcpOrigin]:
    origin = TcpOrigin().start()
    yield origin
    origin.stop()


@pytest.fixture
def http_origin() -> Iterator[HttpOrigin]:
    origin = HttpOrigin().start()
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def tls_origin(ca: trustme.CA) -> Iterator[HttpOrigin]:
    cert = ca.issue_cert("origin.test", "localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    origin = HttpOrigin(tls=ctx).start()
    yield origin
    origin.stop()


PyegressFactory = Callable[..., procs.Pyegress]


@pytest.fixture
def pyegress(tmp_path: Path) -> Iterator[PyegressFactory]:
    """Start ``pyegress`` with the given arguments; it waits for every ``{port}`` slot.

    ``pyegress(["-L", "http://127.0.0.1:{0}"])`` picks a free port for ``{0}``, starts
    the process and waits until it listens. The process object has ``ports``.
    """
    started: list[procs.Pyegress] = []

    def start(
        args: Sequence[str], loop: str = "uvloop", wait: bool = True, nports: int | None = None
    ) -> procs.Pyegress:
        count = nports if nports is not None else sum(a.count("{") for a in args)
        ports = [free_port() for _ in range(count)]
        argv = [a.format(*ports) for a in args]
        proc = procs.Pyegress(argv, tmp_path, loop=loop)
        proc.ports = ports
        started.append(proc)
        if wait:
            for port in ports:
                try:
                    wait_port("127.0.0.1", port, 15)
                except TimeoutError:
                    raise AssertionError(f"pyegress did not start:\n{proc.output()}") from None
        return proc

    yield start
    for proc in started:
        proc.stop()


def _need(program: str) -> None:
    if not procs.have(program):
        pytest.skip(f"{program} is not installed")


@pytest.fixture
def squid(tmp_path: Path) -> Iterator[int]:
    _need("squid")
    proc, port = procs.start_squid(tmp_path)
    yield port
    proc.stop()


@pytest.fixture
def microsocks(tmp_path: Path) -> Iterator[int]:
    _need("microsocks")
    proc, port = procs.start_microsocks(tmp_path)
    yield port
    proc.stop()


@pytest.fixture
def danted(tmp_path: Path) -> Iterator[int]:
    _need("danted")
    if os.geteuid() != 0:
        pytest.skip("danted needs root here")
    proc, port = procs.start_danted(tmp_path)
    yield port
    proc.stop()


class TierCerts:
    """Files for a mutually authenticated tier link from one test CA: the DMZ's server
    certificate (dmz.test, localhost, 127.0.0.1, ::1) and a sidecar client certificate
    whose identity is a SPIFFE-style SAN URI."""

    IDENTITY = "spiffe://cluster.local/ns/shop/sa/web"

    def __init__(self, directory: Path) -> None:
        self.authority = CertAuthority(directory)
        self.ca = self.authority.path
        server = self.authority.issue(
            "dmz.test", dns=("dmz.test", "localhost"), ips=("127.0.0.1", "::1")
        )
        self.server_cert, self.server_key = server.cert, server.key
        client = self.authority.issue("web", uris=(self.IDENTITY,), client=True)
        self.client_cert, self.client_key = client.cert, client.key

    def dmz_params(self) -> str:
        return f"cert={self.server_cert}&key={self.server_key}&ca={self.ca}"

    def sidecar_params(self, server_name: str = "dmz.test") -> str:
        return (
            f"cert={self.client_cert}&key={self.client_key}&ca={self.ca}&serverName={server_name}"
        )


@pytest.fixture
def tier_certs(tmp_path: Path) -> TierCerts:
    d = tmp_path / "certs"
    d.mkdir()
    return TierCerts(d)
