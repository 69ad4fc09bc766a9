"""The policy engine: which identity may open a tunnel to which destination.

A :class:`Policy` is an ordered list of :class:`Rule` objects plus a default. It is
immutable once built, so a reload swaps the whole object and tunnels keep the one they
were judged by. :meth:`Policy.decide` answers for the requested name (or IP literal)
before anything is resolved; :meth:`Policy.deny_addresses` is asked again for each
address a name resolved to, so deny CIDRs hold after resolution too.

Decision order (``docs/policy.md``):

1. Only rules whose ``identities`` include the client apply (a rule without
   ``identities`` applies to everyone, including clients without an identity).
2. A pattern matches when its host part matches (names against name patterns, IP
   literals against IP patterns; a name is never resolved here) and the port is in the
   pattern's port suffix, else in the rule's ``ports``.
3. An enforcing deny rule that matches wins: ``deny``/``global_deny``.
4. Else a report-mode deny rule that matches a tunnel that steps 5-7 would let through
   (an allow rule matches, or the default is not ``deny``): ``report``/``report_only``
   (the tunnel passes, recorded as would-deny). Trying out a deny rule never opens a
   host the policy otherwise refuses.
5. Else an allow rule that matches: ``allow``/``rule_match``.
6. Else an allow rule matched the host but not the port: ``deny``/``port_not_allowed``
   (under ``default: allow`` this is ``default_allow``; under ``default: report`` it is
   ``report``/``report_only``).
7. Else the default: ``not_in_allowlist`` / ``default_allow`` / ``report_only``.

When several rules of one kind match, the earliest in the file names the decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Final, Literal

from pyegress.errors import LocalProtocolError
from pyegress.policy.literals import parse_host_literal
from pyegress.policy.patterns import (
    ANY_PORT,
    DEFAULT_PORTS,
    Pattern,
    PortSet,
    normalize_name,
    unmap,
)
from pyegress.policy.special import CGNAT, LINK_LOCAL, LOOPBACK, PRIVATE, SITE_LOCAL, ULA

if TYPE_CHECKING:
    from pyegress.limits import LimitSpec
    from pyegress.policy.inspect import TlsSettings

__all__ = [
    "PRIVATE_CATEGORIES",
    "REASONS",
    "Action",
    "Decision",
    "Default",
    "Policy",
    "Reason",
    "Request",
    "Route",
    "Rule",
]

Action = Literal["allow", "deny", "report"]
Default = Literal["deny", "allow", "report"]
Route = Literal["direct", "proxy"]
OrigDstCheck = Literal["strict", "route_by_name", "log"]
ORIG_DST_CHECKS: tuple[OrigDstCheck, ...] = ("strict", "route_by_name", "log")
Reason = Literal[
    "rule_match",
    "default_allow",
    "report_only",
    "not_in_allowlist",
    "global_deny",
    "port_not_allowed",
    "malformed_request",
]

#: Every reason :meth:`Policy.decide` can give (a subset of the audit reason codes).
REASONS: Final = (
    "rule_match",
    "default_allow",
    "report_only",
    "not_in_allowlist",
    "global_deny",
    "port_not_allowed",
    "malformed_request",
)

#: Address categories an allow rule's ``private:`` may name: resolved answers in these
#: categories are dialed for that rule. ``metadata`` is never among them.
PRIVATE_CATEGORIES: Final = (PRIVATE, LOOPBACK, LINK_LOCAL, CGNAT, ULA, SITE_LOCAL)

_NONE: frozenset[str] = frozenset()
_MAX_DETAIL_HOST = 253


@dataclass(frozen=True, slots=True)
class Request:
    """One tunnel to judge: who asks, and for which host and port."""

    identity: str | None
    host: str  # as requested: a name or an IP literal (already canonical text if a literal)
    port: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on a :class:`Request`.

    ``action`` ``report`` means: allowed, but the policy would have denied it.
    ``route`` and ``private`` come from the matched allow rule (``direct`` and empty for
    denials and defaults).
    """

    action: Action
    reason: Reason
    rule_id: str | None
    route: Route
    private: frozenset[str]
    detail: str


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. ``identities`` ``None`` means any identity (and none).

    ``ports`` applies to patterns without their own port suffix; ``None`` means 443 for
    an allow rule and every port for a deny rule. ``report`` only makes sense on deny
    rules; ``route`` and ``private`` only on allow rules (the loader enforces this).
    """

    id: str
    action: Literal["allow", "deny"]
    patterns: tuple[Pattern, ...]
    ports: PortSet | None = None
    identities: frozenset[str] | None = None
    report: bool = False
    route: Route = "direct"
    private: frozenset[str] = field(default=_NONE)

    @property
    def effective_ports(self) -> PortSet:
        if self.ports is not None:
            return self.ports
        return DEFAULT_PORTS if self.action == "allow" else ANY_PORT

    def applies_to(self, identity: str | None) -> bool:
        ids = self.identities
        return ids is None or (identity is not None and identity in ids)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One pattern of one rule, as stored in the indexes."""

    order: int
    rule: Rule
    pattern: Pattern
    ports: PortSet


class _IpIndex:
    """One IP version: per prefix length a dict from network to entries (an address is
    a network of full length), plus a list of ranges. A lookup is one dict probe per
    distinct prefix length in use."""

    __slots__ = ("bits", "by_length", "ranges")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_length: dict[int, dict[int, list[_Entry]]] = {}  # mask -> network -> entries
        self.ranges: list[_Entry] = []

    def add(self, entry: _Entry) -> None:
        pattern = entry.pattern
        if pattern.kind == "range":
            self.ranges.append(entry)
            return
        mask = ((1 << self.bits) - 1) ^ ((1 << (self.bits - pattern.prefixlen)) - 1)
        self.by_length.setdefault(mask, {}).setdefault(pattern.first, []).append(entry)

    def lookup(self, value: int, out: list[_Entry]) -> None:
        for mask, slot in self.by_length.items():
            hit = slot.get(value & mask)
            if hit is not None:
                out.extend(hit)
        if self.ranges:
            out.extend(e for e in self.ranges if e.pattern.first <= value <= e.pattern.last)


def _show(host: str) -> str:
    if len(host) > _MAX_DETAIL_HOST:
        return host[:_MAX_DETAIL_HOST] + "..."
    return host


class Policy:
    """An immutable rule set. Build it with :func:`pyegress.policy.loader.load_policy`,
    :func:`~pyegress.policy.loader.parse_policy` or
    :func:`~pyegress.policy.loader.from_gost_bypass`, or directly from :class:`Rule`
    objects (tests).

    ``version`` identifies the source ("sha256:<hex>" of the policy file).
    ``default_route`` is the route of default decisions; only gost hop-level bypass
    mapping sets it to ``proxy``.
    """

    __slots__ = (
        "_exact",
        "_ip4",
        "_ip6",
        "_sub",
        "_suffix",
        "default",
        "default_route",
        "groups",
        "limits",
        "orig_dst_check",
        "rules",
        "tcp_rules",
        "tls",
        "version",
    )

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        default: Default = "deny",
        version: str = "",
        default_route: Route = "direct",
        tls: TlsSettings | None = None,
        limits: LimitSpec | None = None,
        tcp_rules: frozenset[str] = frozenset(),
        groups: dict[str, frozenset[str]] | None = None,
        orig_dst_check: OrigDstCheck = "route_by_name",
    ) -> None:
        from pyegress.limits import LimitSpec
        from pyegress.policy.inspect import TlsSettings

        self.rules: tuple[Rule, ...] = tuple(rules)
        self.tls: TlsSettings = tls if tls is not None else TlsSettings()
        self.limits: LimitSpec = limits if limits is not None else LimitSpec()
        self.tcp_rules = tcp_rules  # rules marked "protocol: tcp" (no TLS required)
        self.groups: dict[str, frozenset[str]] = dict(groups or {})
        self.default: Default = default
        self.version = version
        self.default_route: Route = default_route
        # Transparent tunnels: is the original destination among the name's answers?
        # strict: deny orig_dst_mismatch; log: allow, reported (would_deny);
        # route_by_name: recorded only (CDNs answer differently per resolver).
        if orig_dst_check not in ORIG_DST_CHECKS:
            raise ValueError(f"unknown orig_dst_check {orig_dst_check!r}")
        self.orig_dst_check: OrigDstCheck = orig_dst_check
        if default not in ("deny", "allow", "report"):
            raise ValueError(f"unknown default {default!r}")
        seen: set[str] = set()
        self._exact: dict[str, list[_Entry]] = {}
        self._suffix: dict[str, list[_Entry]] = {}
        self._sub: dict[str, list[_Entry]] = {}
        self._ip4 = _IpIndex(32)
        self._ip6 = _IpIndex(128)
        for order, rule in enumerate(self.rules):
            if rule.id in seen:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            seen.add(rule.id)
            for pattern in rule.patterns:
                entry = _Entry(order, rule, pattern, pattern.ports or rule.effective_ports)
                if pattern.kind == "exact":
                    self._exact.setdefault(pattern.name, []).append(entry)
                elif pattern.kind == "suffix":
                    self._suffix.setdefault(pattern.name, []).append(entry)
                elif pattern.kind == "subdomains":
                    self._sub.setdefault(pattern.name, []).append(entry)
                elif pattern.version == 4:
                    self._ip4.add(entry)
                else:
                    self._ip6.add(entry)

    def group_of(self, identity: str) -> str | None:
        """The first group (in file order) that lists ``identity``."""
        for name, members in self.groups.items():
            if identity in members:
                return name
        return None

    def tcp_allowed(self, rule_id: str | None) -> bool:
        """May a tunnel judged by ``rule_id`` carry something other than TLS on a port
        that requires TLS?"""
        return rule_id is not None and rule_id in self.tcp_rules

    def __repr__(self) -> str:
        return f"<Policy {self.version or '(unversioned)'} rules={len(self.rules)}>"

    # ----------------------------------------------------------------------------------

    def _name_entries(self, name: str) -> list[_Entry]:
        out: list[_Entry] = []
        hit = self._exact.get(name)
        if hit is not None:
            out.extend(hit)
        suffix, sub = self._suffix, self._sub
        if suffix:
            hit = suffix.get(name)
            if hit is not None:
                out.extend(hit)
        if suffix or sub:
            dot = name.find(".")
            while dot >= 0:
                tail = name[dot + 1 :]
                hit = suffix.get(tail)
                if hit is not None:
                    out.extend(hit)
                hit = sub.get(tail)
                if hit is not None:
                    out.extend(hit)
                dot = name.find(".", dot + 1)
        return out

    def _address_entries(self, address: IPv4Address | IPv6Address) -> list[_Entry]:
        address = unmap(address)
        out: list[_Entry] = []
        index = self._ip4 if address.version == 4 else self._ip6
        index.lookup(int(address), out)
        return out

    def _malformed(self, detail: str) -> Decision:
        return Decision("deny", "malformed_request", None, "direct", _NONE, detail)

    def decide(self, request: Request) -> Decision:
        """The verdict for ``request``. Never raises.

        A host that is neither a valid name nor an IP literal, or a port outside
        0-65535, is denied with ``malformed_request`` whatever the rules say; port 0
        is denied with ``port_not_allowed`` (no rule can list it).
        """
        port = request.port
        if not 1 <= port <= 65535:
            if port == 0:
                return Decision(
                    "deny", "port_not_allowed", None, "direct", _NONE, "port 0 is never allowed"
                )
            return self._malformed(f"port {port} out of range")
        host = request.host
        try:
            literal = parse_host_literal(host)
        except LocalProtocolError:
            return self._malformed(f"invalid host {_show(host)!r}")
        if literal is not None:
            entries = self._address_entries(literal)
        else:
            name = normalize_name(host)
            if name is None:
                return self._malformed(f"invalid host {_show(host)!r}")
            entries = self._name_entries(name)

        identity = request.identity
        deny: _Entry | None = None
        report: _Entry | None = None
        allow: _Entry | None = None
        host_only: _Entry | None = None
        for entry in entries:
            rule = entry.rule
            ids = rule.identities
            if ids is not None and (identity is None or identity not in ids):
                continue
            if port in entry.ports:
                if rule.action == "allow":
                    if allow is None or entry.order < allow.order:
                        allow = entry
                elif rule.report:
                    if report is None or entry.order < report.order:
                        report = entry
                elif deny is None or entry.order < deny.order:
                    deny = entry
            elif rule.action == "allow" and (host_only is None or entry.order < host_only.order):
                host_only = entry

        if deny is not None:
            return Decision(
                "deny",
                "global_deny",
                deny.rule.id,
                "direct",
                _NONE,
                f"matched {deny.pattern.text}",
            )
        if report is not None and (allow is not None or self.default != "deny"):
            # A report-mode deny rule marks a tunnel the policy would otherwise let
            # through; it never opens one that the policy refuses anyway.
            route, private = (
                (allow.rule.route, allow.rule.private)
                if allow is not None
                else (self.default_route, _NONE)
            )
            return Decision(
                "report",
                "report_only",
                report.rule.id,
                route,
                private,
                f"would deny: matched {report.pattern.text}",
            )
        if allow is not None:
            rule = allow.rule
            return Decision(
                "allow",
                "rule_match",
                rule.id,
                rule.route,
                rule.private,
                f"matched {allow.pattern.text}",
            )
        default = self.default
        if host_only is not None:
            text = f"matched {host_only.pattern.text} but not port {port}"
            if default == "deny":
                return Decision(
                    "deny", "port_not_allowed", host_only.rule.id, "direct", _NONE, text
                )
            if default == "report":
                return Decision(
                    "report",
                    "report_only",
                    host_only.rule.id,
                    self.default_route,
                    _NONE,
                    f"would deny: {text}",
                )
        if default == "deny":
            return Decision(
                "deny", "not_in_allowlist", None, "direct", _NONE, "no allow rule matches"
            )
        if default == "allow":
            return Decision(
                "allow",
                "default_allow",
                None,
                self.default_route,
                _NONE,
                "no rule matches; default allow",
            )
        return Decision(
            "report",
            "report_only",
            None,
            self.default_route,
            _NONE,
            "would deny: no allow rule matches",
        )

    def deny_addresses(
        self, identity: str | None, address: IPv4Address | IPv6Address, port: int
    ) -> str | None:
        """The id of the first enforcing deny rule whose IP, CIDR or range patterns
        match a resolved ``address`` on ``port`` for ``identity``, else ``None``.

        Report-mode deny rules never block, so they are not considered here.
        """
        best: _Entry | None = None
        for entry in self._address_entries(address):
            rule = entry.rule
            if (
                rule.action == "deny"
                and not rule.report
                and rule.applies_to(identity)
                and port in entry.ports
                and (best is None or entry.order < best.order)
            ):
                best = entry
        return best.rule.id if best is not None else None
