"""A tunnel's life record: who asked for what, how it ended, bytes each way.

Every tunnel a listener starts is a :class:`Tunnel`, opened with ``Service.tunnel()``.
Whatever path it ends by (relayed to EOF, refused, malformed, reset, drained), leaving
that context writes exactly one close record.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pyegress.protocols.addresses import join_host_port
from pyegress.relay import Relay

AUDIT_SCHEMA = "pyegress.audit/v1"


def new_conn_id() -> str:
    return secrets.token_hex(8)


@dataclass(slots=True, eq=False)
class Tunnel:
    service: str
    kind: str
    client: tuple[str, int]
    conn_id: str = field(default_factory=new_conn_id)
    started: float = field(default_factory=time.monotonic)
    host: str = ""
    port: int = 0
    user: str | None = None
    identity: str | None = None
    reason: str | None = None
    error: str | None = None
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    relay: Relay | None = None
    policy_version: str | None = None
    decision_logged: bool = False
    decision: str | None = None
    decision_reason: str | None = None
    dialed: str | None = None

    def decision_record(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The audit ``decision`` event (schema pyegress.audit/v1)."""
        record: dict[str, Any] = {
            "schema": AUDIT_SCHEMA,
            "conn_id": self.conn_id,
            "service": self.service,
            "kind": self.kind,
            "client": join_host_port(*self.client) if self.client[0] else "",
            "identity": self.identity,
            "requested": {"host": _cap(self.host, 253), "port": self.port},
        }
        record.update(fields)
        return record

    @property
    def target(self) -> str:
        return join_host_port(self.host, self.port) if self.host else ""

    def close_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "conn_id": self.conn_id,
            "service": self.service,
            "kind": self.kind,
            "client": join_host_port(*self.client) if self.client[0] else "",
            "target": self.target,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_s": round(time.monotonic() - self.started, 6),
            "reason": self.reason or "eof",
        }
        if self.user is not None:
            record["user"] = self.user
        if self.identity is not None:
            record["identity"] = self.identity
        if self.status is not None:
            record["status"] = self.status
        if self.error is not None:
            record["error"] = _cap(self.error, 512)
        if self.policy_version is not None:
            record["schema"] = AUDIT_SCHEMA
            record["policy_version"] = self.policy_version
            record["decision"] = self.decision
            if self.decision_reason:
                record["decision_reason"] = self.decision_reason
            if self.dialed:
                record["dialed"] = self.dialed
        return record


def _cap(text: str, limit: int) -> str:
    """Attacker-controlled text, capped; JSON encoding escapes control characters."""
    return text if len(text) <= limit else text[:limit] + "..."
