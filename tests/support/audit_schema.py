"""The audit record contract of docs/audit.md as plain Python checks.

:func:`problems` returns what is wrong with one parsed record (an empty list when it
conforms); :func:`check_records` adds the pairing rule (every ``conn_id`` has exactly
one ``decision`` and one ``close`` record); :func:`raw_line_problems` checks the raw
text: audit lines are ASCII with control characters escaped by the JSON encoder (so a
decoded value may hold them). The enums below are copied from the documentation
(docs/audit.md), not from the implementation, so a value the code invents and the docs
do not list is a finding.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any, TypeGuard

SCHEMA = "pyegress.audit/v1"
HOST_CAP = 253
DETAIL_CAP = 512
ELLIPSIS = "..."

TIERS = frozenset({"dmz", "sidecar", "proxy"})
MODES = frozenset({"connect", "http", "socks5", "socks4", "forward", "sni", "transparent"})
ACTIONS = frozenset({"allow", "deny", "report"})
NAME_SOURCES = frozenset({"connect", "socks", "sni", "host", "orig_dst", "dns"})

# docs/audit.md "Decision reasons" (resolved_<class> expanded from its list).
ADDRESS_CLASSES = frozenset(
    {
        "private",
        "loopback",
        "link_local",
        "metadata",
        "cgnat",
        "multicast",
        "broadcast",
        "reserved",
        "ula",
        "site_local",
        "unspecified",
        "documentation",
        "benchmarking",
        "discard",
        "this_network",
        "protocol_assignments",
        "translation",
    }
)
DECISION_REASONS = frozenset(
    {
        "rule_match",
        "default_allow",
        "report_only",
        "no_policy",
        "not_in_allowlist",
        "port_not_allowed",
        "global_deny",
        "bypass",
        "resolved_ipv6_embedded",
        "self_connection",
        "resolved_self",
        "no_identity",
        "orig_dst_mismatch",
        "upstream_proxy_denied",
        "dns_error",
        "dns_timeout",
        "sni_mismatch",
        "sni_missing",
        "ech_present",
        "host_mismatch",
        "protocol_not_allowed",
        "limit_exceeded",
        "client_auth",
        "malformed_request",
        "draining",
    }
    | {f"resolved_{c}" for c in ADDRESS_CLASSES}
)

# docs/audit.md "Close reasons".
CLOSE_REASONS = frozenset(
    {
        "eof",
        "client_reset",
        "upstream_reset",
        "idle_timeout",
        "max_lifetime",
        "handshake_timeout",
        "connect_timeout",
        "connect_refused",
        "host_unreachable",
        "network_unreachable",
        "dial_failed",
        "dns_timeout",
        "resolve_failed",
        "hop_refused",
        "upstream_protocol_error",
        "tier_link_lost",
        "denied",
        "malformed",
        "auth_failed",
        "unsupported",
        "limit_exceeded",
        "sni_mismatch",
        "drain",
        "client_closed",
        "internal_error",
    }
)

_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _capped(value: object, limit: int) -> bool:
    """A client-controlled string within its cap (``...`` appended when cut)."""
    if not isinstance(value, str):
        return False
    if len(value) <= limit:
        return True
    return len(value) == limit + len(ELLIPSIS) and value.endswith(ELLIPSIS)


class _Checker:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.out: list[str] = []

    def fail(self, text: str) -> None:
        self.out.append(text)

    def obj(self, key: str, required: bool) -> dict[str, Any] | None:
        value = self.record.get(key)
        if value is None:
            if required:
                self.fail(f"{key}: missing")
            return None
        if not isinstance(value, dict):
            self.fail(f"{key}: not an object: {value!r}")
            return None
        return value

    def text(
        self,
        where: str,
        value: object,
        *,
        nullable: bool = True,
        cap: int | None = None,
        enum: frozenset[str] | None = None,
    ) -> None:
        if value is None:
            if not nullable:
                self.fail(f"{where}: null")
            return
        if not isinstance(value, str):
            self.fail(f"{where}: not a string: {value!r}")
            return
        if cap is not None and not _capped(value, cap):
            self.fail(f"{where}: {len(value)} characters, cap {cap}")
        if enum is not None and value not in enum:
            self.fail(f"{where}: {value!r} is not one of the documented values")


def problems(record: dict[str, Any]) -> list[str]:
    """What is wrong with one audit record (``decision`` or ``close``)."""
    c = _Checker(record)
    if record.get("schema") != SCHEMA:
        c.fail(f"schema: {record.get('schema')!r}")
    event = record.get("event")
    if event not in ("decision", "close"):
        c.fail(f"event: {event!r}")
    for key in ("ts", *(("start_ts",) if event == "close" else ())):
        value = record.get(key)
        if not (isinstance(value, str) and _TS.fullmatch(value)):
            c.fail(f"{key}: not a UTC microsecond timestamp: {value!r}")
    conn_id = record.get("conn_id")
    if not (isinstance(conn_id, str) and re.fullmatch(r"[0-9A-Za-z_-]{8,64}", conn_id)):
        c.fail(f"conn_id: {conn_id!r}")
    c.text("tier", record.get("tier"), nullable=False, enum=TIERS)
    c.text("instance", record.get("instance"), cap=HOST_CAP)
    c.text("service", record.get("service"), cap=HOST_CAP)
    c.text("mode", record.get("mode"), nullable=False, enum=MODES)

    client = c.obj("client", True)
    if client is not None:
        c.text("client.addr", client.get("addr"), cap=64)
        port = client.get("port")
        if port is not None and not (_is_int(port) and 0 <= port <= 65535):
            c.fail(f"client.port: {port!r}")
        c.text("client.identity", client.get("identity"), cap=DETAIL_CAP)
        c.text("client.user", client.get("user"), cap=HOST_CAP)
    requested = c.obj("requested", True)
    if requested is not None:
        c.text("requested.host", requested.get("host"), cap=HOST_CAP)
        port = requested.get("port")
        if port is not None and not (_is_int(port) and 0 <= port <= 65535):
            c.fail(f"requested.port: {port!r}")
        c.text("requested.name_source", requested.get("name_source"), enum=NAME_SOURCES)
    tls = c.obj("tls", False)
    if tls is not None:
        c.text("tls.sni", tls.get("sni"), cap=HOST_CAP)
    http = c.obj("http", False)
    if http is not None:
        c.text("http.host", http.get("host"), cap=HOST_CAP)
    decision = c.obj("decision", True)  # both events carry the verdict
    if decision is not None:
        c.text("decision.action", decision.get("action"), nullable=False, enum=ACTIONS)
        c.text("decision.reason", decision.get("reason"), nullable=False, enum=DECISION_REASONS)
        if not isinstance(decision.get("would_deny"), bool):
            c.fail(f"decision.would_deny: {decision.get('would_deny')!r}")
        c.text("decision.rule_id", decision.get("rule_id"), cap=HOST_CAP)
        version = decision.get("policy_version")
        if version is not None and not (
            isinstance(version, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", version)
        ):
            c.fail(f"decision.policy_version: {version!r}")
        c.text("decision.detail", decision.get("detail"), cap=DETAIL_CAP)
    if event == "close":
        result = c.obj("result", True)
        if result is not None:
            reply = result.get("client_reply")
            # An HTTP status, or a SOCKS reply code for SOCKS modes (docs/audit.md does
            # not say which; both are small non-negative integers).
            if reply is not None and not (_is_int(reply) and 0 <= reply <= 599):
                c.fail(f"result.client_reply: {reply!r}")
            c.text(
                "result.close_reason",
                result.get("close_reason"),
                nullable=False,
                enum=CLOSE_REASONS,
            )
            c.text("result.error", result.get("error"), cap=DETAIL_CAP)
        counts = c.obj("bytes", True)
        if counts is not None:
            for key in ("from_client", "to_client"):
                value = counts.get(key)
                if not (_is_int(value) and value >= 0):
                    c.fail(f"bytes.{key}: {value!r}")
        duration = record.get("duration_ms")
        if not (isinstance(duration, int | float) and duration >= 0):
            c.fail(f"duration_ms: {duration!r}")
    return c.out


def is_audit(record: dict[str, Any]) -> bool:
    return "schema" in record and record.get("event") in ("decision", "close")


def parse_lines(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every JSON object line of ``text`` and the lines that look like JSON but do not
    parse (a line starting with ``{``). Lines of other programs are ignored."""
    records: list[dict[str, Any]] = []
    broken: list[str] = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            broken.append(line[:200])
            continue
        if isinstance(value, dict):
            records.append(value)
        else:
            broken.append(line[:200])
    return records, broken


def check_records(records: Iterable[dict[str, Any]]) -> list[str]:
    """Schema problems plus the pairing rule: one decision and one close per conn_id."""
    out: list[str] = []
    decisions: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    for record in records:
        if not is_audit(record):
            continue
        for problem in problems(record):
            out.append(f"{record.get('event')} {record.get('conn_id')}: {problem}")
        conn_id = str(record.get("conn_id"))
        (decisions if record["event"] == "decision" else closes)[conn_id] += 1
    for conn_id in sorted(set(decisions) | set(closes)):
        if decisions[conn_id] != 1 or closes[conn_id] != 1:
            out.append(
                f"conn_id {conn_id}: {decisions[conn_id]} decision and "
                f"{closes[conn_id]} close records"
            )
    return out


def raw_line_problems(text: str) -> list[str]:
    """Audit lines must be ASCII JSON (control characters escaped by the encoder)."""
    out = []
    for line in text.splitlines():
        if '"schema"' not in line:
            continue
        if not line.isascii():
            out.append(f"non-ASCII audit line: {line[:120]!r}")
        if _CONTROL.search(line):
            out.append(f"raw control character in audit line: {line[:120]!r}")
    return out
