"""``pyegress policy replay``: which past tunnels a candidate policy would judge differently.

The input is the audit stream (JSON Lines, ``docs/audit.md``). Every ``decision`` record
of schema ``pyegress.audit/v1`` is judged again by :func:`pyegress.policy.enforce.judge`
(the code live traffic goes through), with the DNS answers the record kept in place of a
lookup, so a replay never touches DNS.

What a record can and cannot tell:

* ``dns`` present: the name was resolved (or the host was a literal); the recorded
  answers are classified, pinned and checked against deny ranges exactly as live.
* ``dns`` absent: the tunnel went through the corporate proxy, or was refused before
  resolution, or resolution failed. It is judged with no answers (``answers=()``). When
  the candidate policy refuses it by rules, or sends it through the proxy, the answers
  are never consulted and the verdict is exact. When the candidate policy would dial it
  directly, the missing answers *would* change the result (an empty answer set reads as
  ``dns_error``), so that verdict is taken from the rules alone (the decision ``judge``
  starts from) and marked ``rules_only``.
* A record whose lookup failed (``dns_error``/``dns_timeout``, with or without an empty
  ``dns``) keeps that failure whenever the candidate policy would resolve the name.
* Verdicts that did not come from the policy (SNI and Host checks, limits, client
  authentication, draining, malformed requests, ``bypass=``, self-connections, protocol
  checks, processes without a policy) are counted as not replayable.

Compared are ``action``, ``reason`` and ``rule_id``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final, Literal

from pyegress.errors import PyegressError
from pyegress.policy.enforce import judge
from pyegress.policy.literals import parse_host_literal
from pyegress.policy.patterns import normalize_name
from pyegress.policy.resolve import Address
from pyegress.policy.rules import Policy, Request

__all__ = [
    "NOT_REPLAYABLE",
    "SCHEMA",
    "Counts",
    "Malformed",
    "Outcome",
    "Past",
    "RecordError",
    "Replayer",
    "Verdict",
    "format_outcome",
    "parse_record",
    "replay_lines",
]

SCHEMA: Final = "pyegress.audit/v1"

#: Decision reasons that were not the policy's to give: a replay cannot reproduce them.
NOT_REPLAYABLE: Final = frozenset(
    {
        "sni_mismatch",
        "sni_missing",
        "ech_present",
        "host_mismatch",
        "limit_exceeded",
        "draining",
        "malformed_request",
        "client_auth",
        "self_connection",
        "protocol_not_allowed",
        "bypass",
        "no_policy",
    }
)

_DNS_FAILURES: Final = frozenset({"dns_error", "dns_timeout"})
_ACTIONS: Final = ("allow", "deny", "report")

Change = Literal["newly_denied", "newly_allowed", "changed", "unchanged"]


class RecordError(ValueError):
    """A decision record that cannot be read; the message names the field."""


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str
    reason: str
    rule_id: str | None

    def __str__(self) -> str:
        if self.rule_id is None:
            return f"{self.action}({self.reason})"
        return f"{self.action}({self.reason}, {self.rule_id})"

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "rule_id": self.rule_id}


@dataclass(frozen=True, slots=True)
class Past:
    """What one decision record says about its tunnel."""

    line: int
    conn_id: str
    ts: str
    identity: str | None
    host: str
    port: int
    answers: tuple[Address, ...] | None  # None: the record has no ``dns``
    via_proxy: bool
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Outcome:
    past: Past
    verdict: Verdict
    rules_only: bool

    @property
    def change(self) -> Change:
        was, now = self.past.verdict, self.verdict
        if was == now:
            return "unchanged"
        if was.action != "deny" and now.action == "deny":
            return "newly_denied"
        if was.action == "deny" and now.action != "deny":
            return "newly_allowed"
        return "changed"

    def as_json(self) -> dict[str, Any]:
        past = self.past
        return {
            "line": past.line,
            "conn_id": past.conn_id,
            "ts": past.ts,
            "identity": past.identity,
            "host": past.host,
            "port": past.port,
            "was": past.verdict.as_json(),
            "now": self.verdict.as_json(),
            "change": self.change,
            "rules_only": self.rules_only,
        }


@dataclass(frozen=True, slots=True)
class Malformed:
    line: int
    problem: str


@dataclass(slots=True)
class Counts:
    replayed: int = 0
    changed: int = 0
    newly_denied: int = 0
    newly_allowed: int = 0
    skipped: int = 0
    not_replayable: int = 0
    malformed: int = 0

    def add(self, outcome: Outcome) -> None:
        self.replayed += 1
        change = outcome.change
        if change != "unchanged":
            self.changed += 1
        if change == "newly_denied":
            self.newly_denied += 1
        elif change == "newly_allowed":
            self.newly_allowed += 1

    def summary(self) -> str:
        return (
            f"{self.replayed} decisions replayed, {self.changed} would change "
            f"({self.newly_denied} newly denied, {self.newly_allowed} newly allowed), "
            f"{self.skipped} lines skipped, {self.not_replayable} not replayable, "
            f"{self.malformed} malformed"
        )

    def as_json(self) -> dict[str, int]:
        return {
            "replayed": self.replayed,
            "changed": self.changed,
            "newly_denied": self.newly_denied,
            "newly_allowed": self.newly_allowed,
            "skipped": self.skipped,
            "not_replayable": self.not_replayable,
            "malformed": self.malformed,
        }


# --------------------------------------------------------------------------------------
# Reading records


def _object(record: dict[str, Any], key: str, *, required: bool) -> dict[str, Any]:
    value = record.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"{key} must be an object")
    return value


def _text(obj: dict[str, Any], key: str, where: str, *, nullable: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise RecordError(f"{where}{key} must be a string")
    return value


def _verdict(record: dict[str, Any]) -> Verdict:
    decision = _object(record, "decision", required=True)
    action = decision.get("action")
    if action not in _ACTIONS:
        raise RecordError("decision.action must be allow, deny or report")
    reason = _text(decision, "reason", "decision.")
    rule_id = _text(decision, "rule_id", "decision.", nullable=True)
    assert reason is not None
    return Verdict(str(action), reason, rule_id)


def parse_record(record: dict[str, Any], line: int) -> Past:
    """The tunnel a decision record describes. Raises :class:`RecordError`."""
    verdict = _verdict(record)
    conn_id = _text(record, "conn_id", "")
    ts = _text(record, "ts", "")
    client = _object(record, "client", required=False)
    identity = _text(client, "identity", "client.", nullable=True)
    requested = _object(record, "requested", required=True)
    host = _text(requested, "host", "requested.")
    port = requested.get("port")
    if not isinstance(port, int) or isinstance(port, bool):
        raise RecordError("requested.port must be an integer")
    answers: tuple[Address, ...] | None = None
    if record.get("dns") is not None:
        raw = _object(record, "dns", required=True).get("answers")
        if not isinstance(raw, list):
            raise RecordError("dns.answers must be a list")
        found: list[Address] = []
        for item in raw:
            try:
                found.append(ipaddress.ip_address(item))
            except ValueError:
                raise RecordError(f"dns.answers: {str(item)[:64]!r} is not an IP address") from None
        answers = tuple(found)
    via_proxy = _object(record, "upstream", required=False).get("via") == "proxy"
    assert conn_id is not None
    assert ts is not None
    assert host is not None
    return Past(line, conn_id, ts, identity, host, port, answers, via_proxy, verdict)


# --------------------------------------------------------------------------------------
# Judging


class Replayer:
    """Judges :class:`Past` tunnels under one policy on one private event loop.

    ``have_proxy`` says a corporate proxy is configured for every tunnel (as the DMZ's
    ``-F``); without it, a record whose upstream was the proxy still counts as having one.
    """

    def __init__(self, policy: Policy, *, have_proxy: bool = False) -> None:
        self.policy = policy
        self.have_proxy = have_proxy
        self._runner = asyncio.Runner()

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.close()

    def judge(self, past: Past) -> Outcome:
        record: dict[str, Any] = {}
        answers = past.answers if past.answers is not None else ()
        with suppress(PyegressError):  # a refusal: the record holds the verdict
            self._runner.run(
                judge(
                    self.policy,
                    record,
                    past.identity,
                    past.host,
                    past.port,
                    dns_timeout=0.0,
                    self_endpoints=(),
                    have_proxy=self.have_proxy or past.via_proxy,
                    answers=answers,
                )
            )
        decision = record["decision"]
        verdict = Verdict(decision["action"], decision["reason"], decision["rule_id"])
        consulted = "dns" in record and parse_host_literal(past.host) is None
        if consulted and past.verdict.reason in _DNS_FAILURES:
            # The lookup failed at the time; it is the lookup this policy would make too.
            # (judge names the decision's rule on every refusal after the decision.)
            return Outcome(past, Verdict("deny", past.verdict.reason, verdict.rule_id), False)
        if consulted and past.answers is None:
            # The answers were consulted but the record kept none: judge by the rules.
            name = normalize_name(past.host)
            assert name is not None  # judge got past its own check of the name
            rules = self.policy.decide(Request(past.identity, name, past.port))
            return Outcome(past, Verdict(rules.action, rules.reason, rules.rule_id), True)
        return Outcome(past, verdict, rules_only=False)


def replay_lines(
    replayer: Replayer, lines: Iterable[str], counts: Counts
) -> Iterator[Outcome | Malformed]:
    """Judge every replayable decision record among ``lines`` (numbered from 1),
    updating ``counts``; yields each outcome and each malformed decision record."""
    for number, text in enumerate(lines, 1):
        try:
            record = json.loads(text)
        except ValueError:
            counts.skipped += 1
            continue
        if (
            not isinstance(record, dict)
            or record.get("schema") != SCHEMA
            or record.get("event") != "decision"
        ):
            counts.skipped += 1
            continue
        try:
            reason = _verdict(record).reason
            if reason in NOT_REPLAYABLE:
                counts.not_replayable += 1
                continue
            past = parse_record(record, number)
        except RecordError as exc:
            counts.malformed += 1
            yield Malformed(number, str(exc))
            continue
        outcome = replayer.judge(past)
        counts.add(outcome)
        yield outcome


def _safe(text: str) -> str:
    """Client-controlled text made safe for a terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_outcome(outcome: Outcome) -> str:
    past = outcome.past
    host = f"[{past.host}]" if ":" in past.host else past.host
    head = (
        f"{_safe(past.conn_id)} {_safe(past.ts)} {_safe(past.identity or '-')} "
        f"{_safe(host)}:{past.port}: "
    )
    if outcome.change == "unchanged":
        text = f"{head}{past.verdict} (unchanged)"
    else:
        text = f"{head}{past.verdict} -> {outcome.verdict}"
    if outcome.rules_only:
        text += " [rules only: no DNS answers recorded]"
    return text
