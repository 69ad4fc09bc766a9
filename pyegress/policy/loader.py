"""Loading a policy: the YAML policy file, and gost's ``bypass=`` syntax.

The YAML is read with :func:`yaml.compose` (node tree with line marks, no object
construction) and converted by hand with strict type checks, so every error names the
file, the line and the offending value in one line::

    policy.yaml:7: invalid pattern '*.com': a wildcard over a top-level domain would ...

Unknown keys are errors everywhere (a typo must not silently widen or narrow a policy).
``Policy.version`` is ``"sha256:"`` + the SHA-256 of the file bytes. The grammar is
documented in ``docs/policy.md``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pyegress.config.files import read_config
from pyegress.errors import ConfigError
from pyegress.limits import LimitSpec
from pyegress.policy.inspect import TlsSettings
from pyegress.policy.patterns import (
    ANY_PORT,
    Pattern,
    PatternError,
    PortSet,
    parse_pattern,
    parse_port_range,
    port_set,
)
from pyegress.policy.rules import (
    ORIG_DST_CHECKS,
    PRIVATE_CATEGORIES,
    Default,
    OrigDstCheck,
    Policy,
    Route,
    Rule,
)
from pyegress.policy.special import METADATA

__all__ = ["from_gost_bypass", "load_policy", "parse_policy"]

# libyaml's parser when PyYAML was built with it (ten times faster); same nodes and marks.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TAG_STR = "tag:yaml.org,2002:str"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")

_TOP_KEYS: tuple[str, ...] = ("version", "default", "groups", "rules", "tls", "limits")
_TOP_KEYS += ("orig_dst_check", "transparent")
_TRANSPARENT_KEYS = ("orig_dst_check",)
_RULE_KEYS = (
    "id", "allow", "deny", "ports", "identities", "report", "route", "private", "protocol",
)  # fmt: skip
_TLS_KEYS = ("sni", "missing_sni", "ech", "require_tls_ports", "host_check", "sniff_timeout")
_LIMIT_KEYS = ("max_tunnels", "max_tunnels_per_identity", "rate_per_identity", "max_lifetime")
_SNI_MODES = ("strict", "identity", "log", "off")
_PROTOCOLS = ("tls", "tcp")
_DEFAULTS: tuple[Default, ...] = ("deny", "allow", "report")
_ROUTES: tuple[Route, ...] = ("direct", "proxy")

_RULE_ID = re.compile(r"[A-Za-z0-9_.:/-]+", re.ASCII)
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_IDENTITY_MARKS = frozenset(":/.")
_SHOW_LIMIT = 80


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > _SHOW_LIMIT:
        return text[:_SHOW_LIMIT] + "..."
    return text


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    if tag == "null":
        return "empty (null)"
    return f"{tag} {_show(node.value)}"


class _Reader:
    """Typed access to the node tree; every failure is a ConfigError with a line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: Node | None, reason: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(f"{self.source}:{line}: {reason}")

    def mapping(
        self, node: Node, what: str, allowed: tuple[str, ...] | None
    ) -> dict[str, tuple[ScalarNode, Node]]:
        if not isinstance(node, MappingNode):
            self.fail(node, f"{what} must be a mapping, got {_kind(node)}")
        out: dict[str, tuple[ScalarNode, Node]] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag != _TAG_STR:
                self.fail(key, f"{what}: keys must be strings, got {_kind(key)}")
            name = key.value
            if allowed is not None and name not in allowed:
                self.fail(
                    key, f"unknown key {_show(name)} in {what} (allowed: {', '.join(allowed)})"
                )
            if name in out:
                first = out[name][0].start_mark.line + 1
                self.fail(key, f"duplicate key {_show(name)} in {what} (first on line {first})")
            out[name] = (key, value)
        return out

    def sequence(self, node: Node, what: str, example: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            self.fail(node, f"{what} must be a list, e.g. {example}; got {_kind(node)}")
        return list(node.value)

    def string(self, node: Node, what: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag != _TAG_STR:
            hint = ""
            if isinstance(node, ScalarNode) and node.value:
                hint = f" (quote it: {node.value!r})"
            self.fail(node, f"{what} must be a string, got {_kind(node)}{hint}")
        value: str = node.value
        return value

    def boolean(self, node: Node, what: str) -> bool:
        if not isinstance(node, ScalarNode) or node.tag != _TAG_BOOL:
            self.fail(node, f"{what} must be true or false, got {_kind(node)}")
        return str(node.value).lower() in ("true", "yes", "on", "y")


def _ports(reader: _Reader, node: Node) -> PortSet:
    items = reader.sequence(node, "ports", "[443] or [80, '8000-8999']")
    if not items:
        reader.fail(node, "ports is empty (omit it for the default, 443)")
    ranges: list[tuple[int, int]] = []
    for item in items:
        if not isinstance(item, ScalarNode) or item.tag not in (_TAG_INT, _TAG_STR):
            reader.fail(item, f"a port must be a number or 'lo-hi', got {_kind(item)}")
        value: int | str = item.value
        if item.tag == _TAG_INT:
            try:
                value = int(str(item.value).replace("_", ""), 0)
            except ValueError:
                reader.fail(item, f"invalid port {_show(item.value)}")
        try:
            ranges.append(parse_port_range(value))
        except PatternError as exc:
            reader.fail(item, f"invalid port {_show(item.value)}: {exc}")
    return port_set(ranges)


def _patterns(reader: _Reader, key: str, node: Node) -> tuple[Pattern, ...]:
    items = reader.sequence(node, key, "[example.com, '.example.org']")
    if not items:
        reader.fail(node, f"{key} is empty")
    out: list[Pattern] = []
    for item in items:
        text = reader.string(item, f"a {key} pattern")
        try:
            out.append(parse_pattern(text))
        except PatternError as exc:
            reader.fail(item, f"invalid pattern {_show(text)}: {exc}")
    return tuple(out)


def _groups(reader: _Reader, node: Node) -> dict[str, frozenset[str]]:
    groups: dict[str, frozenset[str]] = {}
    for name, (key, value) in reader.mapping(node, "groups", None).items():
        if not _GROUP_NAME.fullmatch(name):
            reader.fail(
                key,
                f"invalid group name {_show(name)}: letters, digits, '_' and '-' only "
                "(a name with ':', '/' or '.' would read as an identity)",
            )
        members = reader.sequence(value, f"group {name!r}", '["spiffe://cluster/ns/a/sa/b"]')
        if not members:
            reader.fail(value, f"group {name!r} is empty")
        identities: set[str] = set()
        for member in members:
            identity = reader.string(member, f"a member of group {name!r}")
            if not identity:
                reader.fail(member, f"empty identity in group {name!r}")
            identities.add(identity)
        groups[name] = frozenset(identities)
    return groups


def _identities(reader: _Reader, node: Node, groups: dict[str, frozenset[str]]) -> frozenset[str]:
    items = reader.sequence(node, "identities", "[shop, 'spiffe://cluster/ns/a/sa/b']")
    if not items:
        reader.fail(node, "identities is empty (omit it to match any identity)")
    out: set[str] = set()
    for item in items:
        value = reader.string(item, "an identity or group name")
        if value in groups:
            out |= groups[value]
        elif _IDENTITY_MARKS.intersection(value):
            out.add(value)
        else:
            reader.fail(
                item,
                f"unknown group {_show(value)} (an identity contains ':', '/' or '.'; "
                "put other identities in a group)",
            )
    return frozenset(out)


def _private(reader: _Reader, node: Node) -> frozenset[str]:
    out: set[str] = set()
    for item in reader.sequence(node, "private", "[loopback, private]"):
        value = reader.string(item, "an address category")
        if value == METADATA:
            reader.fail(item, "'metadata' can never be allowed")
        if value not in PRIVATE_CATEGORIES:
            reader.fail(
                item,
                f"unknown address category {_show(value)} "
                f"(one of: {', '.join(PRIVATE_CATEGORIES)})",
            )
        out.add(value)
    return frozenset(out)


def _rule(
    reader: _Reader,
    node: Node,
    groups: dict[str, frozenset[str]],
    seen_ids: dict[str, int],
    tcp_rules: set[str],
) -> Rule:
    fields = reader.mapping(node, "a rule", _RULE_KEYS)
    if "id" not in fields:
        reader.fail(node, "rule without 'id'")
    id_node = fields["id"][1]
    rule_id = reader.string(id_node, "id")
    if not _RULE_ID.fullmatch(rule_id):
        reader.fail(id_node, f"invalid rule id {_show(rule_id)}: use [A-Za-z0-9_.:/-]+")
    line = id_node.start_mark.line + 1
    if rule_id in seen_ids:
        first = seen_ids[rule_id]
        reader.fail(id_node, f"duplicate rule id {_show(rule_id)} (first on line {first})")
    seen_ids[rule_id] = line

    if "allow" in fields and "deny" in fields:
        second = max(fields["allow"][0], fields["deny"][0], key=lambda k: k.start_mark.index)
        reader.fail(second, f"rule {rule_id!r} has both 'allow' and 'deny' (one per rule)")
    action: Literal["allow", "deny"]
    if "allow" in fields:
        action = "allow"
    elif "deny" in fields:
        action = "deny"
    else:
        reader.fail(node, f"rule {rule_id!r} needs 'allow' or 'deny'")
    patterns = _patterns(reader, action, fields[action][1])

    ports = _ports(reader, fields["ports"][1]) if "ports" in fields else None
    identities = (
        _identities(reader, fields["identities"][1], groups) if "identities" in fields else None
    )
    report = False
    if "report" in fields:
        key, value = fields["report"]
        report = reader.boolean(value, "report")
        if report and action == "allow":
            reader.fail(value, "report applies to deny rules; use 'default: report'")
    route: Route = "direct"
    if "route" in fields:
        key, value = fields["route"]
        if action != "allow":
            reader.fail(key, "route applies to allow rules")
        text = reader.string(value, "route")
        if text not in _ROUTES:
            reader.fail(value, f"invalid route {_show(text)} (direct or proxy)")
        route = "proxy" if text == "proxy" else "direct"
    private: frozenset[str] = frozenset()
    if "private" in fields:
        key, value = fields["private"]
        if action != "allow":
            reader.fail(key, "private applies to allow rules")
        private = _private(reader, value)
    if "protocol" in fields:
        key, value = fields["protocol"]
        if action != "allow":
            reader.fail(key, "protocol applies to allow rules")
        text = reader.string(value, "protocol")
        if text not in _PROTOCOLS:
            reader.fail(value, f"invalid protocol {_show(text)} (tls or tcp)")
        if text == "tcp":
            tcp_rules.add(rule_id)
    return Rule(
        id=rule_id,
        action=action,
        patterns=patterns,
        ports=ports,
        identities=identities,
        report=report,
        route=route,
        private=private,
    )


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _build(text: str, source: str, version: str) -> Policy:
    reader = _Reader(source)
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{source}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}:1: invalid YAML: {str(exc).splitlines()[0]}") from None
    if root is None:
        reader.fail(None, "empty policy (needs 'version: 1' and 'rules:')")
    top = reader.mapping(root, "the policy", _TOP_KEYS)

    if "version" not in top:
        reader.fail(root, "missing 'version: 1'")
    version_node = top["version"][1]
    if not (
        isinstance(version_node, ScalarNode)
        and version_node.tag == _TAG_INT
        and version_node.value == "1"
    ):
        reader.fail(version_node, f"version must be 1, got {_kind(version_node)}")

    default: Default = "deny"
    if "default" in top:
        node = top["default"][1]
        text = reader.string(node, "default")
        if text not in _DEFAULTS:
            reader.fail(node, f"invalid default {_show(text)} (deny, allow or report)")
        default = _DEFAULTS[_DEFAULTS.index(text)]

    groups = _groups(reader, top["groups"][1]) if "groups" in top else {}

    if "rules" not in top:
        reader.fail(root, "missing 'rules:' (write 'rules: []' for none)")
    rules_node = top["rules"][1]
    seen_ids: dict[str, int] = {}
    tcp_rules: set[str] = set()
    rules = [
        _rule(reader, item, groups, seen_ids, tcp_rules)
        for item in reader.sequence(rules_node, "rules", "[{id: x, allow: [example.com]}]")
    ]
    tls = _tls(reader, top["tls"][1]) if "tls" in top else None
    limits = _limits(reader, top["limits"][1]) if "limits" in top else None
    return Policy(
        rules,
        default=default,
        version=version,
        tls=tls,
        limits=limits,
        tcp_rules=frozenset(tcp_rules),
        groups=groups,
        orig_dst_check=_orig_dst_check(reader, top),
    )


def _orig_dst_check(reader: _Reader, top: dict[str, tuple[ScalarNode, Node]]) -> OrigDstCheck:
    """``orig_dst_check:`` at the top level or under ``transparent:`` (not both)."""
    node: Node | None = None
    if "transparent" in top:
        section = reader.mapping(top["transparent"][1], "transparent", _TRANSPARENT_KEYS)
        if "orig_dst_check" in section:
            node = section["orig_dst_check"][1]
            if "orig_dst_check" in top:
                reader.fail(
                    top["orig_dst_check"][0],
                    "orig_dst_check is given twice (top level and under transparent:)",
                )
    if node is None and "orig_dst_check" in top:
        node = top["orig_dst_check"][1]
    if node is None:
        return "route_by_name"
    text = _choice(reader, node, "orig_dst_check", ORIG_DST_CHECKS)
    return ORIG_DST_CHECKS[ORIG_DST_CHECKS.index(text)]


def _choice(reader: _Reader, node: Node, what: str, choices: tuple[str, ...]) -> str:
    text = reader.string(node, what)
    if text not in choices:
        reader.fail(node, f"invalid {what} {_show(text)} ({' | '.join(choices)})")
    return text


def _number(reader: _Reader, node: Node, what: str, minimum: float) -> float:
    if not (isinstance(node, ScalarNode) and node.tag in (_TAG_INT, _TAG_FLOAT)):
        reader.fail(node, f"{what} must be a number, got {_kind(node)}")
    value = float(node.value)
    if not value >= minimum or value != value or value == float("inf"):
        reader.fail(node, f"{what} must be at least {minimum:g}, got {node.value}")
    return value


def _duration(reader: _Reader, node: Node, what: str) -> float:
    """Seconds as a number, or gost-style text: 30s, 5m, 2h, 1h30m."""
    if isinstance(node, ScalarNode) and node.tag == _TAG_STR:
        match = _DURATION.fullmatch(node.value.strip())
        if match is None or not any(match.groups()):
            reader.fail(node, f"invalid {what} {_show(node.value)} (e.g. 30s, 5m, 24h)")
        hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
        return hours * 3600 + minutes * 60 + seconds
    return _number(reader, node, what, 0)


def _tls(reader: _Reader, node: Node) -> TlsSettings:
    fields = reader.mapping(node, "tls", _TLS_KEYS)
    settings = TlsSettings()
    values: dict[str, object] = {}
    if "sni" in fields:
        values["sni"] = _choice(reader, fields["sni"][1], "sni", _SNI_MODES)
    for key in ("missing_sni", "ech"):
        if key in fields:
            values[key] = _choice(reader, fields[key][1], key, ("deny", "allow"))
    if "require_tls_ports" in fields:
        ports = _ports(reader, fields["require_tls_ports"][1])
        values["require_tls_ports"] = frozenset(
            p for lo, hi in ports.ranges for p in range(lo, hi + 1)
        )
    if "host_check" in fields:
        values["host_check"] = reader.boolean(fields["host_check"][1], "host_check")
    if "sniff_timeout" in fields:
        values["sniff_timeout"] = _duration(reader, fields["sniff_timeout"][1], "sniff_timeout")
    return replace(settings, **values)  # type: ignore[arg-type]


def _limits(reader: _Reader, node: Node) -> LimitSpec:
    fields = reader.mapping(node, "limits", _LIMIT_KEYS)
    values: dict[str, float | int | None] = {}
    for key in ("max_tunnels", "max_tunnels_per_identity"):
        if key in fields:
            values[key] = int(_number(reader, fields[key][1], key, 1))
    if "rate_per_identity" in fields:
        values["rate_per_identity"] = _number(
            reader, fields["rate_per_identity"][1], "rate_per_identity", 0.001
        )
    if "max_lifetime" in fields:
        values["max_lifetime"] = _duration(reader, fields["max_lifetime"][1], "max_lifetime")
    return LimitSpec(**values)  # type: ignore[arg-type]


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse policy YAML; ``source`` names it in error messages.

    Raises :class:`ConfigError` ``"<source>:<line>: <reason>"``.
    """
    return _build(text, source, _digest(text.encode("utf-8", "surrogatepass")))


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file; ``version`` is the SHA-256 of its bytes."""
    data, text = read_config(path, "policy")
    return _build(text, str(path), _digest(data))


# --------------------------------------------------------------------------------------
# gost bypass


def _bypass_items(body: str) -> Iterator[str]:
    for item in body.split(","):
        item = item.strip()
        if item:
            yield item


def from_gost_bypass(value: str, *, service_level: bool) -> Policy:
    """Map a gost v3 ``bypass=[~]m1,m2`` value onto the policy engine.

    ``service_level`` (``-L``): matching targets are rejected; with ``~`` (whitelist)
    only matching targets pass. ``~a,b`` becomes an allow rule and default deny;
    ``a,b`` a deny rule and default allow. An empty ``~`` list denies everything (gost
    would allow everything: pyegress fails closed).

    Hop level (``-F``): a bypassed target skips the hop (goes direct). ``a,b`` becomes
    an allow rule with route ``direct`` under a default route of ``proxy``; ``~a,b`` an
    allow rule with route ``proxy`` under a default route of ``direct``. An empty list
    is an error there.

    Patterns without a port match every port, as in gost. Raises :class:`ConfigError`.
    """
    text = value.strip()
    whitelist = text.startswith("~")
    body = text[1:] if whitelist else text
    patterns: list[Pattern] = []
    for item in _bypass_items(body):
        try:
            patterns.append(parse_pattern(item))
        except PatternError as exc:
            raise ConfigError(f"bypass: invalid pattern {_show(item)}: {exc}") from None
    level = "service" if service_level else "hop"
    version = _digest(f"gost-{level}-bypass={value}".encode("utf-8", "surrogatepass"))
    kind = "whitelist" if whitelist else "blacklist"
    rule_id = f"bypass-{kind}"
    if service_level:
        if whitelist:
            rules = [Rule(rule_id, "allow", tuple(patterns), ANY_PORT)] if patterns else []
            return Policy(rules, default="deny", version=version)
        rules = [Rule(rule_id, "deny", tuple(patterns), ANY_PORT)] if patterns else []
        return Policy(rules, default="allow", version=version)
    if not patterns:
        raise ConfigError(f"bypass: empty {kind} on a hop (name the targets to route)")
    if whitelist:
        rule = Rule(rule_id, "allow", tuple(patterns), ANY_PORT, route="proxy")
        return Policy([rule], default="allow", version=version, default_route="direct")
    rule = Rule(rule_id, "allow", tuple(patterns), ANY_PORT, route="direct")
    return Policy([rule], default="allow", version=version, default_route="proxy")
