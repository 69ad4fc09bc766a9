"""Concurrent-tunnel caps and new-tunnel rates, global and per identity.

A tunnel takes its slots before it is judged (``Limits.acquire``) and gives them back
when its record is written, on every close path. A refusal is :class:`LimitExceeded`:
HTTP 429 with ``Retry-After``, SOCKS5 reply 0x02, close reason ``limit_exceeded``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pyegress.errors import SOCKS5_NOT_ALLOWED, PyegressError


class LimitExceeded(PyegressError):
    http_status = 429
    socks5_reply = SOCKS5_NOT_ALLOWED
    close_reason = "limit_exceeded"

    def __init__(self, message: str, limit: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.limit = limit  # global_conns | identity_conns | rate
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """The ``limits:`` section of a policy; ``None`` means no limit."""

    max_tunnels: int | None = None
    max_tunnels_per_identity: int | None = None
    rate_per_identity: float | None = None  # new tunnels per second, burst = max(1, rate)
    max_lifetime: float | None = None  # seconds

    @property
    def empty(self) -> bool:
        return (
            self.max_tunnels is None
            and self.max_tunnels_per_identity is None
            and self.rate_per_identity is None
        )


class Slot:
    """One held unit of a counter; ``release`` is idempotent."""

    __slots__ = ("_counts", "_key")

    def __init__(self, counts: dict[str, int], key: str) -> None:
        self._counts = counts
        self._key = key
        counts[key] = counts.get(key, 0) + 1

    def release(self) -> None:
        counts = self._counts
        if counts is None:
            return
        left = counts.get(self._key, 0) - 1
        if left > 0:
            counts[self._key] = left
        else:
            counts.pop(self._key, None)
        self._counts = None  # type: ignore[assignment]


_GLOBAL = "\0global"
_ANONYMOUS = "\0anonymous"
_BUCKETS_MAX = 100_000


class Limits:
    """Counters that outlive a reload; the spec they are checked against may change."""

    def __init__(self, spec: LimitSpec) -> None:
        self.spec = spec
        self.active: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, stamp)

    def acquire(self, identity: str | None) -> list[Slot]:
        spec = self.spec
        key = identity if identity is not None else _ANONYMOUS
        if spec.max_tunnels is not None and self.active.get(_GLOBAL, 0) >= spec.max_tunnels:
            raise LimitExceeded(
                f"too many tunnels (limit {spec.max_tunnels})", "global_conns", retry_after=1
            )
        cap = spec.max_tunnels_per_identity
        if cap is not None and self.active.get(key, 0) >= cap:
            raise LimitExceeded(
                f"too many tunnels for this identity (limit {cap})", "identity_conns"
            )
        if spec.rate_per_identity is not None:
            self._take_token(key, spec.rate_per_identity)
        return [Slot(self.active, _GLOBAL), Slot(self.active, key)]

    def _take_token(self, key: str, rate: float) -> None:
        now = time.monotonic()
        burst = max(1.0, rate)
        tokens, stamp = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate)
        if tokens < 1.0:
            wait = (1.0 - tokens) / rate
            self._buckets[key] = (tokens, now)
            raise LimitExceeded(
                f"new tunnels over the rate limit ({rate:g}/s)", "rate", retry_after=int(wait) + 1
            )
        if len(self._buckets) >= _BUCKETS_MAX and key not in self._buckets:
            self._buckets.clear()  # bounded memory; a full bucket is the fresh state
        self._buckets[key] = (tokens - 1.0, now)
