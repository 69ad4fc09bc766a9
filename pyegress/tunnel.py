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
from pyegress.observe.audit import cap, encode_json, encode_string, iso_time
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

    def _head(self, event: str) -> str:
        """The JSON text every record of this tunnel starts with (no closing brace).

        Built as text rather than as a dict for the encoder: two records per tunnel
        are a large share of a short tunnel's cost. Attacker-reachable strings go
        through the encoder's string escaping (ASCII, control characters escaped)."""
        addr, client_port = self.client
        parts = [
            _PREFIXES[event],
            iso_time(),
            '","conn_id":"',
            self.conn_id,
            '",',
            _static(self.tier, self.instance, self.service, self.kind),
            ',"client":{"addr":',
            _text(addr or None),
            ',"port":',
            str(client_port) if addr else "null",
            ',"identity":',
            _text(cap(self.identity, DETAIL_CAP)),
            ',"user":',
            _text(cap(self.user, HOST_CAP)),
            '},"requested":{"host":',
            _text(cap(self.host, HOST_CAP) or None),
            ',"port":',
            str(self.port) if self.port else "null",
            ',"name_source":',
            _text(self.name_source),
            "}",
        ]
        if self.worker is not None:
            parts += [',"worker":', str(self.worker)]
        if self.orig_dst is not None:
            parts += [',"orig_dst":', _text(self.orig_dst)]
        for key, value in (
            ("tls", self.tls),
            ("http", self.http),
            ("dns", self.dns),
            ("decision", self.decision),
            ("upstream", self.upstream),
        ):
            if value is not None:
                parts += [',"', key, '":', encode_json(value)]
        return "".join(parts)

    def decision_line(self) -> str:
        """The audit ``decision`` event, as one JSON line."""
        return self._head("decision") + "}"

    def close_line(self) -> str:
        """The audit ``close`` event, as one JSON line."""
        relay = "" if self.relay_kind is None else f',"relay":{_text(self.relay_kind)}'
        return "".join(
            [
                self._head("close"),
                ',"start_ts":"',
                iso_time(self.started),
                '","result":{"client_reply":',
                "null" if self.status is None else str(self.status),
                ',"close_reason":',
                _text(self.close_reason),
                ',"error":',
                _text(cap(self.error, DETAIL_CAP)),
                relay,
                '},"bytes":{"from_client":',
                str(self.bytes_up),
                ',"to_client":',
                str(self.bytes_down),
                '},"duration_ms":',
                repr(self.duration_ms()),
                "}",
            ]
        )

    @property
    def close_reason(self) -> str:
        return self.reason or "eof"

    def duration_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)


_PREFIXES = {
    event: f'{{"schema":"{AUDIT_SCHEMA}","event":"{event}","ts":"'
    for event in ("decision", "close")
}


def _text(text: str | None) -> str:
    """A JSON string (ASCII, escaped), or ``null``."""
    return "null" if text is None else encode_string(text)


# The tier, instance, service, mode and kind of a tunnel, as JSON members: the same
# few combinations for the life of a process.
_statics: dict[tuple[str, str, str, str], str] = {}


def _static(tier: str, instance: str, service: str, kind: str) -> str:
    key = (tier, instance, service, kind)
    found = _statics.get(key)
    if found is None:
        found = ",".join(
            f"{_text(name)}:{_text(value)}"
            for name, value in (
                ("tier", tier),
                ("instance", instance),
                ("service", service),
                ("mode", mode_of(kind)),
                ("kind", kind),
            )
        )
        if len(_statics) < 1024:
            _statics[key] = found
    return found


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
