"""A tunnel's life record: who asked for what, what was decided, how it ended.

Every tunnel a listener starts is a :class:`Tunnel`, opened with ``Service.tunnel()``.
Whatever path it ends by (relayed to EOF, refused, malformed, reset, drained), leaving
that context writes exactly one ``decision`` and one ``close`` audit record (schema
``pyegress.audit/v1``, docs/audit.md).
"""

from __future__ import annotations

import os
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pyegress.observe import metrics
from pyegress.observe.audit import cap, iso_time
from pyegress.relay import Relay

AUDIT_SCHEMA = "pyegress.audit/v1"

HOST_CAP = 253
DETAIL_CAP = 512

# Listener kinds as audit modes (docs/audit.md).
_MODES = {
    "http-connect": "connect",
    "http": "connect",
    "h2": "connect",
    "http2": "connect",
    "http-forward": "http",
    "socks5": "socks5",
    "socks4": "socks4",
    "socks4a": "socks4",
    "tcp": "forward",
    "tls-sni": "sni",
    "auto": "connect",
    "redirect": "transparent",
}


# conn_ids join records, they guard nothing: 64 random bits from a generator seeded
# from the system's, without a system call per tunnel (reseeded in a forked child).
_ids = random.Random(secrets.randbits(128))
os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.randbits(128)))


def new_conn_id() -> str:
    return f"{_ids.getrandbits(64):016x}"


def mode_of(kind: str) -> str:
    return _MODES.get(kind, "connect")


@dataclass(slots=True, eq=False)
class Tunnel:
    service: str
    kind: str
    client: tuple[str, int]
    tier: str = "proxy"
    instance: str = ""
    worker: int | None = None  # which of several --workers processes (None: just one)
    conn_id: str = field(default_factory=new_conn_id)
    started: float = field(default_factory=time.monotonic)
    host: str = ""
    port: int = 0
    name_source: str | None = None
    user: str | None = None
    identity: str | None = None
    reason: str | None = None
    error: str | None = None
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    relay: Relay | None = None
    relay_kind: str | None = None  # how the bytes moved: "plain" or "splice"
    policy_version: str | None = None
    decision_logged: bool = False
    # The verdict: filled by the judge (or a fallback), written once.
    decision: dict[str, Any] | None = None
    dns: dict[str, Any] | None = None
    upstream: dict[str, Any] | None = None
    tls: dict[str, Any] | None = None
    http: dict[str, Any] | None = None
    orig_dst: str | None = None
    dialed: str | None = None
    slots: list[Any] = field(default_factory=list)
    state: Any = None  # the engine state (policy, limits) the tunnel was opened under
    metered_up: int = 0  # bytes already added to the byte counters
    metered_down: int = 0

    def unmetered(self) -> tuple[int, int]:
        """Bytes each way not yet counted in the metrics; marks them counted."""
        up, down = self.bytes_up, self.bytes_down
        if self.relay is not None:
            up += self.relay.bytes_up
            down += self.relay.bytes_down
        delta = (up - self.metered_up, down - self.metered_down)
        self.metered_up, self.metered_down = up, down
        return delta

    def meter(self) -> None:
        """Add what the tunnel moved since the last call to the byte counters."""
        metrics.add_bytes(self.tier, *self.unmetered())

    @property
    def mode(self) -> str:
        return mode_of(self.kind)

    @property
    def action(self) -> str | None:
        return None if self.decision is None else self.decision.get("action")

    @property
    def target(self) -> str:
        if not self.host:
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _common(self, event: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "schema": AUDIT_SCHEMA,
            "event": event,
            "ts": iso_time(),
            "conn_id": self.conn_id,
            "tier": self.tier,
            "instance": self.instance,
            "service": self.service,
            "mode": self.mode,
            "kind": self.kind,
            "client": {
                "addr": self.client[0] or None,
                "port": self.client[1] if self.client[0] else None,
                "identity": cap(self.identity, DETAIL_CAP),
                "user": cap(self.user, HOST_CAP),
            },
            "requested": {
                "host": cap(self.host, HOST_CAP) or None,
                "port": self.port or None,
                "name_source": self.name_source,
            },
        }
        if self.worker is not None:
            record["worker"] = self.worker
        if self.orig_dst is not None:
            record["orig_dst"] = self.orig_dst
        for key in ("tls", "http", "dns", "decision", "upstream"):
            value = getattr(self, key)
            if value is not None:
                record[key] = value
        return record

    def decision_record(self) -> dict[str, Any]:
        """The audit ``decision`` event."""
        return self._common("decision")

    def close_record(self) -> dict[str, Any]:
        """The audit ``close`` event."""
        record = self._common("close")
        record["start_ts"] = iso_time(self.started)
        record["result"] = {
            "client_reply": self.status,
            "close_reason": self.reason or "eof",
            "error": cap(self.error, DETAIL_CAP),
        }
        if self.relay_kind is not None:
            record["result"]["relay"] = self.relay_kind
        record["bytes"] = {"from_client": self.bytes_up, "to_client": self.bytes_down}
        record["duration_ms"] = round((time.monotonic() - self.started) * 1000, 3)
        return record


def decision_fields(
    action: str,
    reason: str,
    rule_id: str | None = None,
    policy_version: str | None = None,
    detail: str = "",
) -> dict[str, Any]:
    """A ``decision`` object (docs/audit.md)."""
    return {
        "action": action,
        "would_deny": action == "report",
        "reason": reason,
        "rule_id": rule_id,
        "policy_version": policy_version,
        "detail": cap(detail, DETAIL_CAP),
    }
