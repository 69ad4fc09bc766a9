"""Small tools for the operational scenarios (tests/test_scenarios_ops.py).

- :func:`scrape` reads ``/metrics`` of an admin listener into ``{(name, labels): value}``;
  :func:`value` and :func:`series` query that.
- :func:`http_get` is a one-shot HTTP/1.1 GET (status and body) for ``/readyz``.
- :class:`PairOrigin` accepts TCP connections and hands each accepted socket to the
  test, so a test can write from the origin's side whenever it wants (idle timers).
- :func:`connect_status` opens a CONNECT tunnel and returns the socket, the status and
  the response head; :func:`reset` closes a socket with an RST.
- :func:`fd_count` and :func:`rss_bytes` read ``/proc`` for a PID.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import recv_until

Labels = frozenset[tuple[str, str]]
Series = tuple[str, Labels]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` from ``127.0.0.1:port``; the status and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def scrape(port: int) -> dict[Series, float]:
    status, body = http_get(port, "/metrics")
    assert status == 200, body[:200]
    out: dict[Series, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def value(metrics: dict[Series, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and wanted <= ls)


def series(metrics: dict[Series, float], name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name``."""
    return [dict(ls) for (n, ls) in metrics if n == name]


def wait_for(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def connect_status(
    port: int, target: str, timeout: float = 10.0, source: str | None = None
) -> tuple[socket.socket, int, bytes]:
    """CONNECT ``target`` through the HTTP proxy on ``127.0.0.1:port``."""
    address = (source, 0) if source is not None else None
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=address)
    try:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = recv_until(sock, b"\r\n\r\n")
    except BaseException:
        sock.close()
        raise
    return sock, int(head.split(b" ", 2)[1]), head


def header(head: bytes, name: str) -> str | None:
    """A response header's value (case-insensitive name), or ``None``."""
    for line in head.split(b"\r\n")[1:]:
        key, sep, val = line.partition(b":")
        if sep and key.strip().lower() == name.lower().encode():
            return val.strip().decode("latin-1")
    return None


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """Read until EOF or reset; ``("eof" | "reset" | "timeout", bytes read)``."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return "timeout", bytes(data)
    except ConnectionResetError:
        return "reset", bytes(data)
    return "eof", bytes(data)


class PairOrigin:
    """A TCP origin on a free loopback port that hands each accepted socket to the test
    (:meth:`accepted`); the test then speaks for the origin. Sockets it handed out are
    closed by :meth:`stop`."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self._queue: queue.Queue[socket.socket] = queue.Queue()
        self._handed: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> PairOrigin:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._queue.put(conn)

    def accepted(self, timeout: float = 10.0) -> socket.socket:
        conn = self._queue.get(timeout=timeout)
        self._handed.append(conn)
        return conn

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        while True:
            try:
                self._handed.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for conn in self._handed:
            conn.close()


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
