"""``pyegress policy lint``: rules that can never decide, overlaps, duplicate identities.

The policy is loaded with the real loader first (a load error is the loader's one-line
error); the YAML is then composed again here only for line numbers, which the built
:class:`~pyegress.policy.rules.Policy` does not keep. Rules are matched to their YAML by
id. Every warning is one line ``file:line: Wnnn text``; the codes are stable:

W001  an allow rule every destination of which an enforcing deny rule also matches
      (deny beats allow whatever the order, so the rule never allows anything)
W002  an allow rule every destination of which is matched first by earlier allow rules
      (or denied): it never names a decision, its ``route``/``private`` never apply
W003  two allow rules overlap (some identity, host and port match both) but differ in
      ``route`` or ``private``: the earlier one decides the overlap
W004  an identity listed twice in a group
W005  an identity listed twice in a rule (directly, or directly and through a group)
W006  a group member that no rule refers to
W007  a name pattern inside a broader wildcard of the same rule, or of an earlier rule of
      the same kind (allow; deny; report-mode deny) covering its ports and identities
W008  an allow pattern some of whose ports an enforcing deny rule closes for the same
      names and identities

Coverage is exact for the grammar of ``docs/policy.md``: a name pattern is the apex
(``example.com``), the names below it (``*.example.com``) or both (``.example.com``); IP
patterns are integer intervals; ports are interval sets; a rule without ``identities``
covers a rule with them, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pyegress.errors import ConfigError
from pyegress.policy.loader import load_policy
from pyegress.policy.patterns import Pattern, PortSet, port_set
from pyegress.policy.rules import Policy, Rule

__all__ = ["CODES", "LintWarning", "lint", "lint_policy"]

CODES = ("W001", "W002", "W003", "W004", "W005", "W006", "W007", "W008")

_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class LintWarning:
    line: int
    code: str
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.code} {self.message}"


# --------------------------------------------------------------------------------------
# Line marks


@dataclass(slots=True)
class _RuleMarks:
    line: int
    patterns: list[int] = field(default_factory=list)
    identities: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Layout:
    groups: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    rules: dict[str, _RuleMarks] = field(default_factory=dict)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _mapping(node: Node | None) -> dict[str, Node]:
    if not isinstance(node, MappingNode):
        return {}
    return {k.value: v for k, v in node.value if isinstance(k, ScalarNode)}


def _items(node: Node | None) -> list[Node]:
    return list(node.value) if isinstance(node, SequenceNode) else []


def _scalars(node: Node | None) -> list[tuple[str, int]]:
    return [(str(n.value), _line(n)) for n in _items(node) if isinstance(n, ScalarNode)]


def _layout(text: str) -> _Layout:
    layout = _Layout()
    top = _mapping(yaml.compose(text, Loader=_YAML_LOADER))
    for name, members in _mapping(top.get("groups")).items():
        layout.groups[name] = _scalars(members)
    for item in _items(top.get("rules")):
        fields = _mapping(item)
        id_node = fields.get("id")
        if not isinstance(id_node, ScalarNode):
            continue
        marks = _RuleMarks(_line(item))
        action = fields.get("allow", fields.get("deny"))
        marks.patterns = [line for _, line in _scalars(action)]
        marks.identities = _scalars(fields.get("identities"))
        layout.rules[str(id_node.value)] = marks
    return layout


# --------------------------------------------------------------------------------------
# Sets of destinations

AtomKind = Literal["name", "sub", "ip"]


@dataclass(frozen=True, slots=True)
class _Atom:
    """An indivisible host set: one name, the names strictly below one, or an interval."""

    kind: AtomKind
    name: str = ""
    version: int = 0
    first: int = 0
    last: int = 0


@cache
def _atoms(pattern: Pattern) -> tuple[_Atom, ...]:
    if pattern.kind == "exact":
        return (_Atom("name", pattern.name),)
    if pattern.kind == "subdomains":
        return (_Atom("sub", pattern.name),)
    if pattern.kind == "suffix":
        return (_Atom("name", pattern.name), _Atom("sub", pattern.name))
    return (_Atom("ip", version=pattern.version, first=pattern.first, last=pattern.last),)


def _below(name: str, base: str) -> bool:
    return name.endswith("." + base)


def _covers(q: Pattern, atom: _Atom) -> bool:
    """Does ``q`` match every host of ``atom`` (IP atoms: the whole interval)?"""
    if atom.kind == "ip":
        return (
            not q.is_name
            and q.version == atom.version
            and q.first <= atom.first
            and atom.last <= q.last
        )
    if not q.is_name:
        return False
    if q.kind == "exact":
        return atom.kind == "name" and q.name == atom.name
    if q.kind == "subdomains":
        return _below(atom.name, q.name) or (atom.kind == "sub" and atom.name == q.name)
    return atom.name == q.name or _below(atom.name, q.name)


def _meets(q: Pattern, atom: _Atom) -> bool:
    """Does ``q`` match some host of ``atom``?"""
    if atom.kind == "ip":
        return (
            not q.is_name
            and q.version == atom.version
            and q.first <= atom.last
            and atom.first <= q.last
        )
    if not q.is_name:
        return False
    if atom.kind == "name":
        return _covers(q, atom)
    if q.kind == "exact":
        return _below(q.name, atom.name)
    return q.name == atom.name or _below(q.name, atom.name) or _below(atom.name, q.name)


def _patterns_meet(a: Pattern, b: Pattern) -> bool:
    return any(_meets(a, atom) for atom in _atoms(b))


def _pattern_covers(q: Pattern, p: Pattern) -> bool:
    return all(_covers(q, atom) for atom in _atoms(p))


def _union(sets: Iterable[PortSet]) -> PortSet:
    return port_set([r for s in sets for r in s.ranges])


def _within(inner: PortSet, outer: PortSet) -> bool:
    return all(any(lo <= a and b <= hi for lo, hi in outer.ranges) for a, b in inner.ranges)


def _ports_meet(a: PortSet, b: PortSet) -> bool:
    return any(lo <= hi2 and lo2 <= hi for lo, hi in a.ranges for lo2, hi2 in b.ranges)


def _intersect(a: PortSet, b: PortSet) -> PortSet:
    out = [
        (max(lo, lo2), min(hi, hi2))
        for lo, hi in a.ranges
        for lo2, hi2 in b.ranges
        if max(lo, lo2) <= min(hi, hi2)
    ]
    return port_set(out)


def _ids_within(inner: frozenset[str] | None, outer: frozenset[str] | None) -> bool:
    return outer is None or (inner is not None and inner <= outer)


def _ids_meet(a: frozenset[str] | None, b: frozenset[str] | None) -> bool:
    return a is None or b is None or not a.isdisjoint(b)


@dataclass(frozen=True, slots=True)
class _Entry:
    order: int
    index: int
    rule: Rule
    pattern: Pattern
    ports: PortSet


def _entries(rules: Sequence[Rule]) -> list[_Entry]:
    return [
        _Entry(order, index, rule, pattern, pattern.ports or rule.effective_ports)
        for order, rule in enumerate(rules)
        for index, pattern in enumerate(rule.patterns)
    ]


def _ancestors(name: str) -> Iterator[str]:
    dot = name.find(".")
    while dot >= 0:
        yield name[dot + 1 :]
        dot = name.find(".", dot + 1)


class _Index:
    """Which entries can share a host with a pattern: names on one label chain, IP
    patterns of one version. Everything else is never compared."""

    def __init__(self, entries: list[_Entry]) -> None:
        self.by_base: dict[str, list[_Entry]] = {}
        self.below: dict[str, list[_Entry]] = {}  # ancestor -> entries under it
        self.ip: dict[int, list[_Entry]] = {}
        for entry in entries:
            pattern = entry.pattern
            if not pattern.is_name:
                self.ip.setdefault(pattern.version, []).append(entry)
                continue
            self.by_base.setdefault(pattern.name, []).append(entry)
            for ancestor in _ancestors(pattern.name):
                self.below.setdefault(ancestor, []).append(entry)
        self._cache: dict[str, list[_Entry]] = {}

    def related(self, pattern: Pattern) -> list[_Entry]:
        """Entries that may meet ``pattern``, in file order."""
        if not pattern.is_name:
            return self.ip.get(pattern.version, [])
        hit = self._cache.get(pattern.name)
        if hit is None:
            found = list(self.by_base.get(pattern.name, ()))
            found += self.below.get(pattern.name, ())
            for ancestor in _ancestors(pattern.name):
                found += self.by_base.get(ancestor, ())
            hit = sorted(found, key=lambda e: (e.order, e.index))
            self._cache[pattern.name] = hit
        return hit


def _bucket_covered(atom: _Atom, ports: PortSet, entries: list[_Entry]) -> bool:
    """Is ``atom`` x ``ports`` inside the union of ``entries`` (all apply)?"""
    if atom.kind != "ip":
        return _within(ports, _union(e.ports for e in entries if _covers(e.pattern, atom)))
    hits = [e for e in entries if _meets(e.pattern, atom)]
    cuts = {atom.first, atom.last + 1}
    for e in hits:
        if atom.first < e.pattern.first <= atom.last:
            cuts.add(e.pattern.first)
        if atom.first <= e.pattern.last < atom.last:
            cuts.add(e.pattern.last + 1)
    edges = sorted(cuts)
    for start in edges[:-1]:
        here = (e.ports for e in hits if e.pattern.first <= start <= e.pattern.last)
        if not _within(ports, _union(here)):
            return False
    return True


def _covered(
    rule: Rule, ports_of: list[_Entry], index: _Index, by: Callable[[Rule], bool]
) -> set[str] | None:
    """The ids of the rules for which ``by`` holds that together match every destination
    of every entry of ``rule`` (``ports_of``), or ``None`` when some destination escapes
    them."""
    used: set[str] = set()
    ids = rule.identities
    buckets: Sequence[str | None] = (None,) if ids is None else sorted(ids)
    for own in ports_of:
        candidates = [e for e in index.related(own.pattern) if by(e.rule)]
        for atom in _atoms(own.pattern):
            for identity in buckets:
                applying = [
                    e
                    for e in candidates
                    if e.rule.identities is None
                    or (identity is not None and identity in e.rule.identities)
                ]
                if not _bucket_covered(atom, own.ports, applying):
                    return None
                used.update(
                    e.rule.id
                    for e in applying
                    if _meets(e.pattern, atom) and _ports_meet(e.ports, own.ports)
                )
    return used


def _quote(ids: Iterable[str], order: dict[str, int]) -> str:
    return ", ".join(f"'{i}'" for i in sorted(ids, key=order.__getitem__))


def _enforcing(rule: Rule) -> bool:
    return rule.action == "deny" and not rule.report


def _kind(rule: Rule) -> str:
    return "report" if rule.report else rule.action


# --------------------------------------------------------------------------------------


def lint(policy: Policy, text: str, source: str) -> list[LintWarning]:
    """The warnings for ``policy``, whose YAML source is ``text`` (named ``source``)."""
    layout = _layout(text)
    rules = policy.rules
    order = {rule.id: n for n, rule in enumerate(rules)}
    entries = _entries(rules)
    by_rule: dict[str, list[_Entry]] = {}
    for entry in entries:
        by_rule.setdefault(entry.rule.id, []).append(entry)
    index = _Index(entries)
    out: list[LintWarning] = []

    def rule_line(rule: Rule) -> int:
        marks = layout.rules.get(rule.id)
        return marks.line if marks is not None else 1

    def pattern_line(entry: _Entry) -> int:
        marks = layout.rules.get(entry.rule.id)
        if marks is None:
            return 1
        if entry.index < len(marks.patterns):
            return marks.patterns[entry.index]
        return marks.line

    def warn(line: int, code: str, message: str) -> None:
        out.append(LintWarning(line, code, message, source))

    # W001 / W002: allow rules that never decide.
    dead: set[str] = set()
    for rule in rules:
        if rule.action != "allow":
            continue
        own = by_rule[rule.id]
        by_deny = _covered(rule, own, index, _enforcing)
        if by_deny:
            dead.add(rule.id)
            noun = "deny rule" if len(by_deny) == 1 else "deny rules"
            warn(
                rule_line(rule),
                "W001",
                f"rule '{rule.id}' is shadowed by {noun} {_quote(by_deny, order)} "
                "(every destination it allows is denied)",
            )
            continue
        here = order[rule.id]

        def earlier_or_deny(other: Rule, here: int = here) -> bool:
            return _enforcing(other) or (other.action == "allow" and order[other.id] < here)

        by_both = _covered(rule, own, index, earlier_or_deny)
        if by_both:
            dead.add(rule.id)
            noun = "rule" if len(by_both) == 1 else "rules"
            warn(
                rule_line(rule),
                "W002",
                f"rule '{rule.id}' is shadowed by {noun} {_quote(by_both, order)} "
                "(every destination it allows is matched by an earlier allow rule or denied)",
            )

    # W003: overlapping allow rules with different settings.
    for later in rules:
        if later.action != "allow" or later.id in dead:
            continue
        pairs: dict[str, tuple[_Entry, _Entry]] = {}  # earlier rule -> first overlap
        for b in by_rule[later.id]:
            for a in index.related(b.pattern):
                first = a.rule
                if (
                    first.action != "allow"
                    or a.order >= b.order
                    or first.id in pairs
                    or (first.route, first.private) == (later.route, later.private)
                    or not _ids_meet(first.identities, later.identities)
                    or not _ports_meet(a.ports, b.ports)
                    or not _patterns_meet(a.pattern, b.pattern)
                ):
                    continue
                pairs[first.id] = (a, b)
        for first_id in sorted(pairs, key=order.__getitem__):
            a, b = pairs[first_id]
            first = a.rule
            what: list[str] = []
            if first.route != later.route:
                what.append(f"route ({first.route} vs {later.route})")
            if first.private != later.private:
                shown = [",".join(sorted(r.private)) or "none" for r in (first, later)]
                what.append(f"private ({shown[0]} vs {shown[1]})")
            warn(
                rule_line(later),
                "W003",
                f"rule '{later.id}' overlaps earlier rule '{first.id}' "
                f"('{b.pattern.text}' and '{a.pattern.text}') with a different "
                f"{' and '.join(what)}; '{first.id}' decides the overlap",
            )

    # W004: duplicates in a group; W006: group members no rule refers to.
    referenced: set[str] = set()
    for rule in rules:
        if rule.identities is not None:
            referenced |= rule.identities
    for group, members in layout.groups.items():
        seen: dict[str, int] = {}
        for identity, line in members:
            if identity in seen:
                warn(
                    line,
                    "W004",
                    f"identity '{identity}' is listed twice in group '{group}' "
                    f"(first on line {seen[identity]})",
                )
                continue
            seen[identity] = line
            if identity not in referenced:
                warn(line, "W006", f"identity '{identity}' in group '{group}' is used by no rule")

    # W005: duplicates in a rule.
    groups = {name: {value for value, _ in members} for name, members in layout.groups.items()}
    for rule in rules:
        marks = layout.rules.get(rule.id)
        if marks is None:
            continue
        named: dict[str, int] = {}
        listed_groups = [value for value, _ in marks.identities if value in groups]
        for value, line in marks.identities:
            if value in named:
                noun = "group" if value in groups else "identity"
                warn(
                    line,
                    "W005",
                    f"{noun} '{value}' is listed twice in rule '{rule.id}' "
                    f"(first on line {named[value]})",
                )
                continue
            named[value] = line
            if value in groups:
                continue
            home = next((g for g in listed_groups if value in groups[g]), None)
            if home is not None:
                warn(
                    line,
                    "W005",
                    f"identity '{value}' in rule '{rule.id}' is already in group '{home}'",
                )

    # W007: name patterns inside a broader wildcard of the same kind.
    for entry in entries:
        rule, pattern = entry.rule, entry.pattern
        if rule.id in dead or not pattern.is_name:
            continue
        for other in index.related(pattern):
            q = other.pattern
            if other is entry or q.kind == "exact" or _kind(other.rule) != _kind(rule):
                continue
            same_rule = other.rule is rule
            if not same_rule and other.order > entry.order:
                break
            if not (
                _pattern_covers(q, pattern)
                and _within(entry.ports, other.ports)
                and _ids_within(rule.identities, other.rule.identities)
            ):
                continue
            if (
                same_rule
                and _pattern_covers(pattern, q)
                and _within(other.ports, entry.ports)
                and other.index > entry.index
            ):
                continue  # the same set twice: the second one is reported
            where = "the same rule" if same_rule else f"rule '{other.rule.id}'"
            warn(
                pattern_line(entry),
                "W007",
                f"pattern '{pattern.text}' in rule '{rule.id}' is shadowed by the broader "
                f"'{q.text}' in {where}",
            )
            break

    # W008: allow ports a deny rule closes for the same names.
    for entry in entries:
        rule = entry.rule
        if rule.action != "allow" or rule.id in dead:
            continue
        closing = [
            d
            for d in index.related(entry.pattern)
            if _enforcing(d.rule)
            and _pattern_covers(d.pattern, entry.pattern)
            and _ids_within(rule.identities, d.rule.identities)
            and _ports_meet(d.ports, entry.ports)
        ]
        if not closing:
            continue
        closed = _union(_intersect(d.ports, entry.ports) for d in closing)
        names = {d.rule.id for d in closing}
        noun = "deny rule" if len(names) == 1 else "deny rules"
        verb = "closes" if len(names) == 1 else "close"
        warn(
            pattern_line(entry),
            "W008",
            f"rule '{rule.id}' allows '{entry.pattern.text}' on ports {entry.ports} but "
            f"{noun} {_quote(names, order)} {verb} {closed} there",
        )

    return sorted(out, key=lambda w: (w.line, w.code))


def lint_policy(path: str | Path) -> list[LintWarning]:
    """Load and lint a policy file. Raises :class:`ConfigError` as the loader does."""
    policy = load_policy(path)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read policy: {exc}") from None
    return lint(policy, text, source)
