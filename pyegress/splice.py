"""The zero-copy relay: ``os.splice`` through a pipe, for tunnels whose legs are both
plain TCP connections (a listener dialing directly, or through a plain HTTP/SOCKS hop).

Theory of operation. :class:`SpliceRelay` is a :class:`~pyegress.relay.Relay` that, when
it starts, looks at its two endpoints. If both are plain TCP (no TLS, not an h2 stream),
still open and with nothing waiting in their write buffers, it takes their sockets out
of the event loop's transports; otherwise it runs as the plain relay, unchanged.

Taking a socket over: the transport owns its descriptor and neither uvloop nor the
standard loop lets ``add_reader`` watch a descriptor a transport owns (and uvloop hands
out only a pseudo-socket). So the relay ``dup()``\\s the descriptor, then closes the
transport: that closes the transport's descriptor, not the connection, which lives on
in the duplicate, with no FIN or RST sent. Bytes the handshake left in the endpoint's
buffer (pipelined data, the first bytes the DMZ inspected) are sent first, from user
space; everything after them moves socket -> pipe -> socket inside the kernel.

Each direction (a *leg*) is driven by readiness callbacks on the raw descriptors:

- source readable: ``splice(src -> pipe)``, then, unless the destination is known to be
  full, ``splice(pipe -> dst)``. What does not fit stays in the pipe and the leg waits
  for the destination to be writable.
- Backpressure is the pipe: a full pipe stops reading the source until the destination
  has taken everything. ``EAGAIN`` from ``socket -> pipe`` is ambiguous (no data, or no
  pipe slot left, since a slot may hold less than a page): with bytes in the pipe it is
  read as "full" and reading waits for the writer, which always runs then; with an
  empty pipe it is a spurious wake-up.
- ``splice`` returning 0 is the source's FIN: once the pipe is empty the destination
  gets ``shutdown(SHUT_WR)`` and the other leg keeps flowing. Both legs ended: ``eof``.
- An error on a socket (``ECONNRESET``, ``EPIPE``...) is that side's reset: both sides
  are closed with ``SO_LINGER`` 0, so the other one gets an RST, as in the plain relay.
- :meth:`Relay.stop` (drain, ``max_lifetime``) and the idle timeout close gracefully:
  bytes already taken from one side still go to the other (for at most
  ``FLUSH_TIMEOUT`` seconds), then each socket is closed.

Byte counts are the sums of what ``splice`` took from each source (plus the buffered
handshake bytes), so they mean what the plain relay's counts mean: bytes received from
one side for the other.

Pipes are held only while bytes are in flight: a leg takes one from a small pool when
its source becomes readable and gives it back once it is empty again, so an idle tunnel
holds no pipe. Each pipe is raised to ``PIPE_SIZE`` (``F_SETPIPE_SZ``) when the system
allows it and keeps the default size otherwise.

When it takes over. Setting up the splice legs costs more system calls than a short
tunnel saves (a pipe, a reader and a writer registration per direction, a ``dup`` per
socket), so by default a tunnel starts on the plain relay and switches once either side
has sent ``PYEGRESS_SPLICE_AFTER`` bytes (default 128 KiB; ``0`` splices from the first
byte): API calls and handshakes stay on the cheap path, downloads and uploads move to
the kernel. The switch happens between two reads, when neither transport holds unsent
bytes (otherwise it is tried again after the next ``PYEGRESS_SPLICE_AFTER`` bytes, so a
slow reader never stalls the tunnel): both endpoints are detached and stop reading,
and on the next loop iteration the sockets are taken over as above. A side that was
lost in between leaves the tunnel on the plain relay, which applies its usual rules.

Turned off by ``PYEGRESS_SPLICE=0`` in the environment or ``splice=false`` on a ``-L``
node, and off by itself where ``os.splice`` does not exist or does not work.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
from contextlib import suppress

from pyegress.endpoint import NEVER, Endpoint, TcpEndpoint
from pyegress.relay import Relay

PIPE_SIZE = 1 << 20
DEFAULT_SPLICE_AFTER = 128 * 1024  # bytes from one side before a tunnel switches over
POOL_MAX = 32  # empty pipes kept for the next leg that needs one
FLUSH_TIMEOUT = 10.0  # after a graceful stop, how long taken bytes may take to leave

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_LINGER_RESET = struct.pack("ii", 1, 0)
# No SPLICE_F_MORE: it corks the socket and delays small messages (golang #10948).
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

_available: bool | None = None


def available() -> bool:
    """Whether ``os.splice`` exists and moves bytes socket -> pipe -> socket here."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def enabled() -> bool:
    """Whether the zero-copy relay may be chosen: available and not turned off by
    ``PYEGRESS_SPLICE=0``."""
    if os.environ.get("PYEGRESS_SPLICE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return available()


_splice_after: int | None = None


def splice_after() -> int:
    """Bytes one side sends before a tunnel leaves the plain relay for the splice legs
    (``PYEGRESS_SPLICE_AFTER``; 0 = from the start). Read once per process."""
    global _splice_after
    if _splice_after is None:
        text = os.environ.get("PYEGRESS_SPLICE_AFTER", "").strip()
        try:
            _splice_after = max(0, int(text)) if text else DEFAULT_SPLICE_AFTER
        except ValueError:
            _splice_after = DEFAULT_SPLICE_AFTER
    return _splice_after


def _probe() -> bool:
    if not hasattr(os, "splice"):
        return False
    try:
        a, b = socket.socketpair()
    except OSError:
        return False
    pipe: _Pipe | None = None
    try:
        pipe = _Pipe()
        a.send(b"x")
        moved_in = os.splice(b.fileno(), pipe.w, 1, flags=_FLAGS)
        moved_out = os.splice(pipe.r, b.fileno(), 1, flags=_FLAGS)
        return moved_in == 1 and moved_out == 1 and a.recv(1) == b"x"
    except OSError:
        return False
    finally:
        a.close()
        b.close()
        if pipe is not None:
            pipe.close()


class _Pipe:
    __slots__ = ("r", "size", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Refused (fs.pipe-max-size, per-user pipe limits): the pipe keeps its size.
        with suppress(OSError):
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_SIZE)
        try:
            self.size = fcntl.fcntl(self.w, _F_GETPIPE_SZ)
        except OSError:
            self.size = 65536

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


_pool: list[_Pipe] = []


def _acquire() -> _Pipe:
    return _pool.pop() if _pool else _Pipe()


def _release(pipe: _Pipe) -> None:
    """Return an empty pipe to the pool."""
    if len(_pool) < POOL_MAX:
        _pool.append(pipe)
    else:
        pipe.close()


def pooled() -> int:
    """How many empty pipes the pool holds (two descriptors each)."""
    return len(_pool)


def clear_pool() -> None:
    """Close the pooled pipes."""
    while _pool:
        _pool.pop().close()


# A forked worker must not share pipes with its parent.
os.register_at_fork(after_in_child=clear_pool)


def _abort_socket(sock: socket.socket) -> None:
    """Close with an RST."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class _Leg:
    """One direction: bytes from ``src`` (``src_side``'s socket) to ``dst``."""

    __slots__ = (
        "count",
        "dst",
        "dst_fd",
        "dst_side",
        "eof",
        "in_pipe",
        "pending",
        "pipe",
        "reading",
        "shut",
        "src",
        "src_fd",
        "src_side",
        "writing",
    )

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        src_side: Endpoint,
        dst_side: Endpoint,
        pending: bytes,
    ) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.src_side = src_side
        self.dst_side = dst_side
        self.pending = pending  # handshake bytes, sent before the pipe's
        self.pipe: _Pipe | None = None
        self.in_pipe = 0  # bytes in the pipe, exactly
        self.count = 0  # bytes spliced out of the source
        self.eof = False  # the source sent its FIN
        self.shut = False  # ... and it was passed on (shutdown(SHUT_WR) on dst)
        self.reading = False  # a reader callback is registered on src
        self.writing = False  # a writer callback is registered on dst


class SpliceRelay(Relay):
    """A relay that splices when both endpoints are plain TCP, and is the plain relay
    otherwise (see the module text)."""

    __slots__ = ("_after", "_down", "_flush_handle", "_loop", "_switch", "_up")

    def __init__(
        self,
        client: Endpoint,
        upstream: Endpoint,
        idle_timeout: float,
        after: int | None = None,
    ) -> None:
        super().__init__(client, upstream, idle_timeout)
        self._after = splice_after() if after is None else after
        self._up: _Leg | None = None
        self._down: _Leg | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        # While switching over: the callback that takes the sockets.
        self._switch: asyncio.Handle | None = None

    @property
    def kind(self) -> str:
        return "splice" if self._up is not None else "plain"

    @property
    def bytes_up(self) -> int:
        up = self._up
        return super().bytes_up + (up.count if up is not None else 0)

    @property
    def bytes_down(self) -> int:
        down = self._down
        return super().bytes_down + (down.count if down is not None else 0)

    # -- start ------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._after > 0:
            super()._begin()
            client, upstream = self.client, self.upstream
            if (
                self.reason is None
                and isinstance(client, TcpEndpoint)
                and isinstance(upstream, TcpEndpoint)
            ):
                client.upgrade_at = client.bytes_in + self._after
                upstream.upgrade_at = upstream.bytes_in + self._after
            return
        if not self._take_sockets():
            super()._begin()
            return
        self._start_legs()

    def _start_legs(self) -> None:
        assert self._up is not None
        assert self._down is not None
        self._loop = asyncio.get_running_loop()
        for leg in (self._up, self._down):
            if self.reason is None:
                self._start_reading(leg)
            if self.reason is None and leg.pending:
                self._flush(leg)

    # -- switching over from the plain relay ----------------------------------------

    def upgrade(self) -> None:
        """One side has sent enough to be worth splicing: switch over, from the next
        loop iteration (see the module text)."""
        client, upstream = self.client, self.upstream
        if self.reason is not None or self._up is not None or self._switch is not None:
            return
        if not (isinstance(client, TcpEndpoint) and isinstance(upstream, TcpEndpoint)):
            return
        client.upgrade_at = upstream.upgrade_at = NEVER
        if self.client_eof or self.upstream_eof:
            return  # half closed already: not worth the trouble
        if not (client.splice_capable() and upstream.splice_capable()):
            return
        if client.write_buffered() or upstream.write_buffered():
            # A side is behind (a slow reader): try again after the next stretch of
            # bytes rather than stop both directions to wait for it.
            client.upgrade_at = client.bytes_in + self._after
            upstream.upgrade_at = upstream.bytes_in + self._after
            return
        client.detach()
        upstream.detach()
        self._switch = asyncio.get_running_loop().call_soon(self._switch_over)

    def _switch_over(self) -> None:
        self._switch = None
        client, upstream = self.client, self.upstream
        assert isinstance(client, TcpEndpoint)
        assert isinstance(upstream, TcpEndpoint)
        if self.reason is not None:
            return
        for side in (client, upstream):
            if side.closed:  # lost while detached: the relay's usual rules apply
                self._stay_plain()
                self.on_lost(side, side.error)
                return
        if not self._take_sockets():  # (nothing was written since the drained check)
            self._stay_plain()
            return
        self._start_legs()

    def _stay_plain(self) -> None:
        """Give up switching: the endpoints deliver to each other again."""
        client, upstream = self.client, self.upstream
        assert isinstance(client, TcpEndpoint)
        assert isinstance(upstream, TcpEndpoint)
        client.reattach(upstream, self)
        upstream.reattach(client, self)

    def _take_sockets(self) -> bool:
        client, upstream = self.client, self.upstream
        if not (isinstance(client, TcpEndpoint) and isinstance(upstream, TcpEndpoint)):
            return False
        if not (client.splice_ready() and upstream.splice_ready()):
            return False
        socks: list[socket.socket] = []
        try:
            socks.append(client.dup_socket())
            socks.append(upstream.dup_socket())
        except OSError:  # out of descriptors: the plain relay needs none
            for sock in socks:
                sock.close()
            return False
        a, b = socks
        self._up = _Leg(a, b, client, upstream, client.hand_over())
        self._down = _Leg(b, a, upstream, client, upstream.hand_over())
        return True

    # -- readiness callbacks ----------------------------------------------------------

    def _readable(self, leg: _Leg) -> None:
        if not leg.reading:  # stopped by a callback that ran first in this iteration
            return
        pipe = leg.pipe
        if pipe is None:
            try:
                pipe = leg.pipe = _acquire()
            except OSError:  # no descriptor left for a pipe: this tunnel cannot go on
                self.finish("internal_error", reset=True)
                return
        try:
            n = os.splice(leg.src_fd, pipe.w, pipe.size - leg.in_pipe, flags=_FLAGS)
        except BlockingIOError:
            if leg.in_pipe:
                self._stop_reading(leg)  # the pipe may be full: the writer resumes us
            else:
                leg.pipe = None
                _release(pipe)
            return
        except OSError as exc:
            self.on_lost(leg.src_side, exc)
            return
        if n == 0:
            leg.eof = True
            self._stop_reading(leg)
            if not leg.writing:
                self._flush(leg)
            return
        leg.in_pipe += n
        leg.count += n
        if not leg.writing:
            self._flush(leg)
        elif leg.in_pipe >= pipe.size:
            self._stop_reading(leg)

    def _writable(self, leg: _Leg) -> None:
        if leg.writing:
            self._flush(leg)

    def _flush(self, leg: _Leg) -> None:
        """Move what the leg holds to its destination; then pass on a FIN, give the
        pipe back and read again, or wait for the destination."""
        if leg.pending:
            try:
                sent = leg.dst.send(leg.pending)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._dst_failed(leg, exc)
                return
            leg.pending = leg.pending[sent:]
            if leg.pending:
                self._start_writing(leg)
                return
        pipe = leg.pipe
        if leg.in_pipe:
            assert pipe is not None
            try:
                n = os.splice(pipe.r, leg.dst_fd, leg.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._dst_failed(leg, exc)
                return
            leg.in_pipe -= n
            if leg.in_pipe:
                self._start_writing(leg)
                if leg.in_pipe >= pipe.size:
                    self._stop_reading(leg)
                return
        # Everything taken from the source has reached the destination.
        self._stop_writing(leg)
        if pipe is not None:
            leg.pipe = None
            _release(pipe)
        if self.reason is not None:  # a graceful stop was waiting for this
            self._flushed(leg)
        elif leg.eof:
            self._pass_eof(leg)
        elif not leg.reading:
            self._start_reading(leg)

    def _pass_eof(self, leg: _Leg) -> None:
        if leg.shut:
            return
        leg.shut = True
        try:
            leg.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.on_lost(leg.dst_side, exc)
            return
        up, down = self._up, self._down
        assert up is not None
        assert down is not None
        if up.shut and down.shut:
            self.finish("eof")

    def _dst_failed(self, leg: _Leg, exc: OSError) -> None:
        if self.reason is None:
            self.on_lost(leg.dst_side, exc)
            return
        # Flushing after a graceful stop: give up on this side.
        self._stop_writing(leg)
        self._drop_pipe(leg)
        _abort_socket(leg.dst)
        self._flushed(leg)

    # -- registration -----------------------------------------------------------------

    def _start_reading(self, leg: _Leg) -> None:
        if not leg.reading and not leg.eof:
            assert self._loop is not None
            leg.reading = True
            self._loop.add_reader(leg.src_fd, self._readable, leg)

    def _stop_reading(self, leg: _Leg) -> None:
        if leg.reading:
            assert self._loop is not None
            leg.reading = False
            self._loop.remove_reader(leg.src_fd)

    def _start_writing(self, leg: _Leg) -> None:
        if not leg.writing:
            assert self._loop is not None
            leg.writing = True
            self._loop.add_writer(leg.dst_fd, self._writable, leg)

    def _stop_writing(self, leg: _Leg) -> None:
        if leg.writing:
            assert self._loop is not None
            leg.writing = False
            self._loop.remove_writer(leg.dst_fd)

    def _drop_pipe(self, leg: _Leg) -> None:
        """Close the leg's pipe with whatever it still holds."""
        pipe = leg.pipe
        if pipe is not None:
            leg.pipe = None
            if leg.in_pipe:
                pipe.close()
            else:
                _release(pipe)
        leg.in_pipe = 0
        leg.pending = b""

    # -- the end ----------------------------------------------------------------------

    def _close_sides(self, reset: bool) -> None:
        if self._switch is not None:  # ended while switching: still the plain relay's
            self._switch.cancel()
            self._switch = None
        up, down = self._up, self._down
        if up is None or down is None:
            super()._close_sides(reset)
            return
        for leg in (up, down):
            self._stop_reading(leg)
        if reset:
            for leg in (up, down):
                self._stop_writing(leg)
                self._drop_pipe(leg)
                _abort_socket(leg.dst)
            return
        # Each socket is the destination of one leg: it closes once that leg has
        # delivered what it took from the other side.
        flushing = False
        for leg in (up, down):
            if leg.pending or leg.in_pipe:
                flushing = True
                self._start_writing(leg)
            else:
                self._stop_writing(leg)
                self._flushed(leg)
        if flushing:
            assert self._loop is not None
            self._flush_handle = self._loop.call_later(FLUSH_TIMEOUT, self._flush_expired)

    def _flushed(self, leg: _Leg) -> None:
        """After a graceful stop: this leg is done, close its destination."""
        self._drop_pipe(leg)
        if leg.dst.fileno() != -1:
            leg.dst.close()
        up, down = self._up, self._down
        assert up is not None
        assert down is not None
        handle = self._flush_handle
        if handle is not None and up.dst.fileno() == -1 and down.dst.fileno() == -1:
            self._flush_handle = None
            handle.cancel()

    def _flush_expired(self) -> None:
        self._flush_handle = None
        for leg in (self._up, self._down):
            if leg is not None and leg.dst.fileno() != -1:
                self._stop_writing(leg)
                self._drop_pipe(leg)
                _abort_socket(leg.dst)
