"""The byte pump between a client endpoint and an upstream endpoint.

The relay itself moves no bytes: once both endpoints are attached, each delivers what it
receives straight to the other from the event-loop callback (see ``endpoint.py``). The
relay only keeps the tunnel's end-of-life rules:

- A FIN from one side becomes a FIN to the other (``write_eof``) and the other direction
  keeps flowing: the tunnel ends when both directions have ended (close reason ``eof``).
  A leg that cannot half-close (TLS) gets no FIN: the upstream's end closes the client's
  TLS leg, and a client's end waits for the upstream's answer.
- A reset (the connection lost with an error) on one side resets the other side
  (``client_reset`` / ``upstream_reset``).
- No byte in either direction for ``idle_timeout`` seconds ends it (``idle_timeout``).
- :meth:`Relay.stop` ends it from outside (``drain`` at shutdown).

Byte counts are plain integers kept by the endpoints and read once at the end.

Where both legs are plain TCP, :class:`pyegress.splice.SpliceRelay` keeps these same
rules but moves the bytes inside the kernel (``os.splice``), falling back to this relay
where it cannot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pyegress.endpoint import Endpoint

TICK_PERIOD = 5.0


class Relay:
    __slots__ = (
        "_done",
        "_idle_handle",
        "_idle_last_change",
        "_idle_last_total",
        "_next_tick",
        "_start_down",
        "_start_up",
        "client",
        "client_eof",
        "idle_timeout",
        "on_tick",
        "reason",
        "upstream",
        "upstream_eof",
    )

    def __init__(self, client: Endpoint, upstream: Endpoint, idle_timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.client_eof = False
        self.upstream_eof = False
        self.reason: str | None = None
        self._done: asyncio.Future[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_last_total = 0
        self._idle_last_change = 0.0
        self._start_up = client.bytes_in
        self._start_down = upstream.bytes_in
        # Called from the idle check, at most every TICK_PERIOD seconds (the byte
        # metering of a long tunnel rides on the timer the tunnel has anyway).
        self.on_tick: Callable[[], None] | None = None
        self._next_tick = 0.0

    async def run(self) -> str:
        """Relay until the tunnel ends; return the close reason."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._begin()
        if self.reason is None and self.idle_timeout > 0:
            self._idle_last_change = time.monotonic()
            self._next_tick = self._idle_last_change + TICK_PERIOD
            self._idle_handle = loop.call_later(self._idle_period(), self._check_idle)
        try:
            if self.reason is None:
                await self._done
        except asyncio.CancelledError:
            self.finish("cancelled", reset=True)
            raise
        assert self.reason is not None
        return self.reason

    def _begin(self) -> None:
        """Link the endpoints: from here on each delivers to the other."""
        self.client.attach(self.upstream, self)
        if self.reason is None:
            self.upstream.attach(self.client, self)
        for side in (self.client, self.upstream):
            if self.reason is None and side.closed:
                self.on_lost(side, getattr(side, "error", None))

    @property
    def kind(self) -> str:
        """How the bytes move: ``plain`` (through the event loop's transports)."""
        return "plain"

    @property
    def bytes_up(self) -> int:
        """Bytes the client sent towards the upstream while relaying."""
        return self.client.bytes_in - self._start_up

    @property
    def bytes_down(self) -> int:
        """Bytes the upstream sent towards the client while relaying."""
        return self.upstream.bytes_in - self._start_down

    def _other(self, side: Endpoint) -> Endpoint:
        return self.upstream if side is self.client else self.client

    def on_eof(self, side: Endpoint) -> None:
        if self.reason is not None:
            return
        if side is self.client:
            self.client_eof = True
        else:
            self.upstream_eof = True
        if self.client_eof and self.upstream_eof:
            self.finish("eof")
            return
        other = self._other(side)
        if other.can_write_eof():
            other.write_eof()
        elif side is self.upstream:
            # The client's leg cannot carry a half-close (TLS): closing it is the only
            # way to tell the client the upstream is done.
            self.finish("eof")
        # A client FIN towards a leg that cannot half-close is held back: the upstream
        # may still be answering, and it ends the tunnel when it is done.

    def on_lost(self, side: Endpoint, exc: BaseException | None) -> None:
        if self.reason is not None:
            return
        if exc is not None:
            reason = getattr(exc, "close_reason", None)
            if not isinstance(reason, str):
                reason = "client_reset" if side is self.client else "upstream_reset"
            self.finish(reason, reset=True)
        else:
            # Closed without an error (a TLS close_notify, or a side we closed): nothing
            # more can be delivered to it, so the tunnel is over once the other side's
            # buffered bytes are flushed.
            self.finish("eof")

    def upgrade(self) -> None:
        """An endpoint crossed its ``upgrade_at`` mark: the plain relay has nothing to
        switch to (the zero-copy relay does)."""

    def stop(self, reason: str) -> None:
        """End the tunnel from outside (drain, shutdown)."""
        self.finish(reason)

    def finish(self, reason: str, *, reset: bool = False) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self._close_sides(reset)
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    def _close_sides(self, reset: bool) -> None:
        for side in (self.client, self.upstream):
            if reset:
                side.abort()
            else:
                side.close()

    def _idle_period(self) -> float:
        return max(0.05, min(self.idle_timeout / 4, 5.0))

    def _check_idle(self) -> None:
        self._idle_handle = None
        if self.reason is not None:
            return
        now = time.monotonic()
        if self.on_tick is not None and now >= self._next_tick:
            self._next_tick = now + TICK_PERIOD
            self.on_tick()
        total = self.bytes_up + self.bytes_down
        if total != self._idle_last_total:
            self._idle_last_total = total
            self._idle_last_change = now
        elif now - self._idle_last_change >= self.idle_timeout:
            self.finish("idle_timeout")
            return
        loop = asyncio.get_running_loop()
        self._idle_handle = loop.call_later(self._idle_period(), self._check_idle)
