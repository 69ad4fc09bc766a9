"""An origin that records every byte it receives: the oracle for "nothing went upstream".

:class:`ByteRecorder` serves listening sockets the test made (for instance with
:meth:`tests.support.netns.Namespace.listen`, so it can sit on an address of the fake
internet). Each accepted connection is echoed back (so a client can see its bytes made
the round trip) and recorded as a :class:`Received`: where it was accepted, every byte
that arrived, and how it ended (``eof`` or ``reset``). A tunnel the DMZ dialed and then
refused shows up as a connection with ``data == b""``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Received:
    local: str
    peer: str
    data: bytearray = field(default_factory=bytearray)
    end: str | None = None  # None while open; then "eof" or "reset"


def _show(address: tuple[object, ...]) -> str:
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ByteRecorder:
    def __init__(self, listeners: Iterable[socket.socket]) -> None:
        self._listeners = list(listeners)
        self._lock = threading.Lock()
        self._seen: list[Received] = []
        self._conns: list[socket.socket] = []
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> ByteRecorder:
        for listener in self._listeners:
            listener.settimeout(0.2)
            thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping = True
        for thread in self._threads:
            thread.join(2)
        for sock in [*self._listeners, *self._conns]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            item = Received(_show(conn.getsockname()), _show(peer))
            with self._lock:
                self._seen.append(item)
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, item), daemon=True).start()

    def _serve(self, conn: socket.socket, item: Received) -> None:
        conn.settimeout(30)
        end = "eof"
        try:
            while chunk := conn.recv(65536):
                with self._lock:
                    item.data += chunk
                conn.sendall(chunk)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            end = "reset"
        except OSError:
            end = "error"
        finally:
            with self._lock:
                item.end = end
            with contextlib.suppress(OSError):
                conn.close()

    # -- what tests ask ------------------------------------------------------------------

    def seen(self, local: str | None = None) -> list[Received]:
        """Connections so far (open or ended), oldest first; ``local`` filters by the
        accepting address (``"1.1.1.1:8443"``)."""
        with self._lock:
            return [r for r in self._seen if local is None or r.local == local]

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def wait_ended(self, count: int, timeout: float = 10.0) -> list[Received]:
        """At least ``count`` connections, all ended; fails with what was seen."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.seen()
            if len(seen) >= count and all(r.end is not None for r in seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} ended connections, saw {seen}")
            time.sleep(0.02)
