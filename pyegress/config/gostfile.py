"""gost configuration files given to ``-C``: v2 JSON and the v3 YAML/JSON subset.

gost v2 (gost-compat 4.3) reads a JSON object whose ``ServeNodes`` and ``ChainNodes``
are ``-L`` and ``-F`` URLs. gost v3 (gost-compat 4.1) reads ``services``, ``chains``,
``hops`` and ``bypasses``. Both end up as the same :class:`~pyegress.config.nodes.Node`
values the command line gives: every v3 object is written back as a node URL and parsed
by :func:`~pyegress.config.nodes.parse_node`, so the file and the command line share one
set of checks.

pyegress runs one chain for every service, so a file is refused when it needs more (two
v2 routes, services naming different chains). Everything else the engine cannot do
(a section, a key, a handler type, a selector strategy) is refused by name::

    gost.yaml: services[0].handler.limiter: not supported

Keys are matched case-insensitively, as gost does. A file that has none of gost's
top-level keys is not a gost file: :func:`load_gost_file` returns ``None`` and ``-C``
reads it as a pyegress policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import quote

import yaml
from yaml.nodes import MappingNode

from pyegress.config.files import read_config
from pyegress.config.nodes import (
    _CONNECTORS,
    _DIALERS,
    _HANDLERS,
    _LISTENERS,
    _PARAM_ALIASES,
    _V3_PREFIXES,
    IMPLEMENTED_PARAMS,
    Node,
    Role,
    _split_scheme,
    parse_node,
)
from pyegress.errors import ConfigError

__all__ = ["GostFile", "load_gost_file", "parse_gost_config"]

Version = Literal["v2", "v3"]

# Node parameters a config file may set: those the engine acts on, except the ones of
# pyegress's own listeners that gost files have no way to name (CRLs, the transparent
# listeners). Parsed-but-unbuilt ones (backlog, ...) are refused in a file unless their
# value is empty or false.
_SUPPORTED = IMPLEMENTED_PARAMS - {
    "crl", "sniffing", "sniffing_timeout", "tproxy", "range", "range6", "upstream", "suffix",
    "ttl", "keep", "size",
}  # fmt: skip
_CANONICAL = frozenset(_PARAM_ALIASES.values())
# canonical parameter -> a query key parse_node maps back onto it
_URL_KEY: dict[str, str] = {}
for _alias, _canonical in _PARAM_ALIASES.items():
    if _alias == _canonical or _canonical not in _URL_KEY:
        _URL_KEY[_canonical] = _alias

_STRATEGIES = ("round", "rr", "random", "rand", "fifo", "ha")
_REDACTED = "***"  # what ``-O`` prints instead of a password

_V2_KEYS = {
    "servenodes": "ServeNodes",
    "chainnodes": "ChainNodes",
    "retries": "Retries",
    "debug": "Debug",
    "routes": "Routes",
    "mark": "Mark",
    "interface": "Interface",
}
_V2_ROUTE_KEYS = ("servenodes", "chainnodes", "retries", "mark", "interface")

_V3_READ = ("services", "chains", "hops", "bypasses")
# gost v3 sections pyegress does not implement; an empty one is accepted.
_V3_UNSUPPORTED: dict[str, str] = {
    "admissions": "",
    "authers": "use handler.auth",
    "resolvers": "",
    "hosts": "",
    "ingresses": "",
    "routers": "",
    "sds": "",
    "observers": "",
    "recorders": "pyegress writes its own audit records",
    "limiters": "",
    "climiters": "",
    "rlimiters": "",
    "loggers": "",
    "log": "use -D for debug logging",
    "api": "",
    "metrics": "use the -metrics flag",
    "tls": "set listener.tls on the service",
    "profiling": "",
    "rewriters": "",
    "caches": "",
    "quotas": "",
    "plugins": "",
}

# Per object: the keys read, and the known gost keys refused (with an optional hint).
_SERVICE_KEYS = (
    "name",
    "addr",
    "handler",
    "listener",
    "forwarder",
    "bypass",
    "bypasses",
    "metadata",
)
_SERVICE_UNSUPPORTED = dict.fromkeys(
    (
        "interface",
        "sockopts",
        "admission",
        "admissions",
        "resolver",
        "hosts",
        "limiter",
        "climiter",
        "rlimiter",
        "logger",
        "loggers",
        "recorders",
        "observer",
        "status",
        "netns",
    ),
    "",
)
_HANDLER_KEYS = ("type", "chain", "retries", "auth", "metadata")
_HANDLER_UNSUPPORTED = {
    "chaingroup": "use chain",
    "auther": "use handler.auth",
    "authers": "use handler.auth",
    "limiter": "",
    "observer": "",
    "tls": "use listener.tls",
}
_LISTENER_KEYS = ("type", "tls", "metadata")
_LISTENER_UNSUPPORTED = {
    "chain": "use handler.chain",
    "chaingroup": "use handler.chain",
    "auther": "use handler.auth",
    "authers": "use handler.auth",
    "auth": "use handler.auth",
}
_FORWARDER_KEYS = ("nodes", "selector")
_TARGET_KEYS = ("name", "addr")
_CHAIN_KEYS = ("name", "hops")
_CHAIN_UNSUPPORTED = {"selector": "", "metadata": ""}
_HOP_KEYS = ("name", "nodes", "selector", "bypass", "bypasses")
_HOP_UNSUPPORTED = dict.fromkeys(
    ("interface", "sockopts", "resolver", "hosts", "reload", "file", "redis", "http"), ""
) | {"plugin": "", "metadata": ""}
_NODE_KEYS = ("name", "addr", "connector", "dialer", "bypass", "bypasses", "metadata")
_NODE_UNSUPPORTED = {
    "network": "",
    "resolver": "",
    "hosts": "",
    "interface": "",
    "netns": "",
    "sockopts": "",
    "filter": "",
    "matcher": "",
    "matchers": "",
    "http": "",
    "tls": "use dialer.tls",
    "auth": "use connector.auth",
}
_CONNECTOR_KEYS = ("type", "auth", "metadata")
_CONNECTOR_UNSUPPORTED = {"tls": "use dialer.tls"}
_DIALER_KEYS = ("type", "tls", "metadata")
_DIALER_UNSUPPORTED = {"auth": "use connector.auth"}
_AUTH_KEYS = ("username", "password")
_LISTENER_TLS = {"certfile": "cert", "keyfile": "key", "cafile": "ca"}
_DIALER_TLS = {**_LISTENER_TLS, "secure": "secure", "servername": "server_name"}
_SELECTOR_KEYS = {"strategy": "strategy", "maxfails": "max_fails", "failtimeout": "fail_timeout"}
_BYPASS_KEYS = ("name", "whitelist", "reverse", "matchers")
_BYPASS_UNSUPPORTED = dict.fromkeys(
    ("network", "reload", "file", "redis", "http", "plugin", "metadata"), ""
)


@dataclass(frozen=True, slots=True)
class GostFile:
    """The nodes a gost file describes: ``listen`` as if given with ``-L``, ``forward``
    (one chain, hops in order) as if given with ``-F``."""

    listen: list[Node]
    forward: list[Node]
    source: Version
    debug: bool = False


# --------------------------------------------------------------------------------------
# reading the file


class _Pairs(list[tuple[Any, Any, int | None]]):
    """A mapping as written: ``(key, value, line)`` in order, duplicates kept, so keys
    can be compared case-insensitively and a duplicate reported with its line."""


_YAML_BASE: type[yaml.BaseLoader] = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


class _YamlLoader(_YAML_BASE):  # type: ignore[misc,valid-type]
    """Every scalar stays a string (as gost's metadata getters see it); mappings keep
    their pairs and lines."""


def _yaml_pairs(loader: yaml.BaseLoader, node: MappingNode) -> _Pairs:
    pairs = _Pairs()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        value = loader.construct_object(value_node, deep=True)
        pairs.append((key, value, key_node.start_mark.line + 1))
    return pairs


_YamlLoader.add_constructor("tag:yaml.org,2002:map", _yaml_pairs)


def _json_pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    return _Pairs((key, value, None) for key, value in pairs)


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{source}:1: invalid JSON: nested too deeply") from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # strings, lists and _Pairs only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{source}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        first = (str(exc).splitlines() or ["syntax error"])[0]
        raise ConfigError(f"{source}:1: invalid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(f"{source}:1: invalid YAML: nested too deeply") from None


def _parse(text: str, source: str) -> Any:
    if source.lower().endswith(".json"):
        return _parse_json(text, source)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except (ValueError, RecursionError):
            pass  # a YAML flow mapping, or broken: YAML says which line
    return _parse_yaml(text, source)


def load_gost_file(path: str | Path) -> GostFile | None:
    """Read a ``-C`` file; ``None`` when it is not a gost configuration.

    A mapping with any of gost v2's keys (``ServeNodes``, ``ChainNodes``, ``Retries``,
    ``Debug``, ``Routes``, ``Mark``, ``Interface``) or gost v3's top-level sections
    (``services``, ``chains``, ...) is a gost file. Raises :class:`ConfigError` with one
    line naming the file and the key (or the line of a syntax error).
    """
    _, text = read_config(path)
    return parse_gost_config(text, str(path))


def parse_gost_config(text: str, source: str = "<string>") -> GostFile | None:
    """:func:`load_gost_file` for text already read; ``source`` names it in errors."""
    root = _parse(text, source)
    if not isinstance(root, _Pairs):
        return None
    keys = {k.lower(): k for k, _, _ in root if isinstance(k, str)}
    if "rules" in keys or "version" in keys:
        return None  # a pyegress policy (its `tls:`/`limits:` keys are its own)
    v2 = [k for k in keys if k in _V2_KEYS]
    v3 = [k for k in keys if k in _V3_READ or k in _V3_UNSUPPORTED]
    if not v2 and not v3:
        return None
    reader = _Reader(source)
    if v2 and v3:
        reader.fail(keys[v3[0]], f"a gost v3 section in a gost v2 file (it has {keys[v2[0]]})")
    if v2:
        return reader.v2(root)
    return reader.v3(root)


# --------------------------------------------------------------------------------------
# typed access


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _empty(value: Any) -> bool:
    """Unset, or a value that asks for nothing (``0``, ``false``, empty)."""
    if value is None or value is False or value == 0:
        return True
    if isinstance(value, str):
        return value.strip().lower() in ("", "0", "false", "null", "~")
    return isinstance(value, list | dict) and not value


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass
class _Params:
    """Node parameters collected from several places, with where each came from."""

    values: dict[str, tuple[str, str]] = field(default_factory=dict)

    def set(self, reader: _Reader, key: str, value: str, path: str) -> None:
        old = self.values.get(key)
        if old is not None and old[0] != value:
            reader.fail(path, f"{_show(value)} contradicts {old[1]}: {_show(old[0])}")
        self.values.setdefault(key, (value, path))

    def query(self) -> str:
        return "&".join(
            f"{_URL_KEY[k]}={quote(v, safe='')}" for k, (v, _) in sorted(self.values.items())
        )

    def plain(self) -> dict[str, str]:
        return {k: v for k, (v, _) in self.values.items()}


@dataclass
class _Bypass:
    whitelist: bool
    matchers: list[str]
    path: str
    used: bool = False


@dataclass
class _NamedHop:
    value: Any
    path: str
    used: bool = False


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, reason: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {path}: {reason}")

    # ---------------------------------------------------------------- shapes

    def mapping(
        self,
        value: Any,
        path: str,
        allowed: Iterable[str],
        unsupported: Mapping[str, str] | None = None,
    ) -> dict[str, tuple[str, Any]]:
        """``{lower-case key: (path of the key, value)}`` of the keys read; a known gost
        key we do not implement is refused unless empty, any other key is refused."""
        if value is None or value == "":
            return {}
        if not isinstance(value, _Pairs):
            self.fail(path, f"must be a mapping, got {_show(value)}")
        allowed = tuple(allowed)
        out: dict[str, tuple[str, Any]] = {}
        lines: dict[str, int | None] = {}
        for key, item, line in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {_show(key)}")
            lower = key.lower()
            where = _child(path, key)
            if lower in lines:
                self._duplicate(where, lines[lower])
            lines[lower] = line
            if lower in allowed:
                out[lower] = (where, item)
            elif unsupported is not None and lower in unsupported:
                if not _empty(item):
                    hint = unsupported[lower]
                    self.fail(where, "not supported" + (f"; {hint}" if hint else ""))
            else:
                self.fail(where, "unknown key")
        return out

    def _duplicate(self, path: str, first: int | None) -> NoReturn:
        at = f" (first on line {first})" if first is not None else ""
        self.fail(path, f"duplicate key{at}; keys are case-insensitive")

    def sequence(self, value: Any, path: str) -> list[tuple[str, Any]]:
        if value is None or value == "":
            return []
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {_show(value)}")
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]

    def items(
        self, entry: Mapping[str, tuple[str, Any]], key: str, parent: str
    ) -> list[tuple[str, Any]]:
        """The list under ``entry[key]`` as ``(path, item)`` pairs; empty when absent."""
        path, value = entry.get(key, (_child(parent, key), None))
        return self.sequence(value, path)

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {_show(value)}")
        return value

    def scalar(self, value: Any, path: str) -> str:
        """A metadata value as gost's getters read it."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        if not isinstance(value, str):
            self.fail(path, f"must be a single value, got {_show(value)}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if not (isinstance(value, str) and value.lower() in ("true", "false")):
            self.fail(path, f"must be true or false, got {_show(value)}")
        return value.lower() == "true"

    def integer(self, value: Any, path: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and value.strip().isdigit():
            number = int(value)
        else:
            self.fail(path, f"must be a whole number, got {_show(value)}")
        if number < 0:
            self.fail(path, f"must not be negative, got {number}")
        return number

    def address(self, value: Any, path: str) -> str:
        text = self.string(value, path).strip()
        if not text or any(c.isspace() or c in "/?#@," for c in text):
            self.fail(path, f"bad address {_show(text)} (host:port or :port)")
        return text

    def node(self, url: str, role: Role, path: str) -> Node:
        try:
            return parse_node(url, role)
        except ConfigError as exc:
            self.fail(path, str(exc))

    # ---------------------------------------------------------------- gost v2

    def v2(self, root: _Pairs) -> GostFile:
        top = self.mapping(root, "", _V2_KEYS)
        debug = self.boolean(top["debug"][1], top["debug"][0]) if "debug" in top else False
        routes = self.items(top, "routes", "")
        if routes:
            routes_path = top["routes"][0]
            if len(routes) > 1:
                self.fail(
                    routes_path,
                    f"{len(routes)} routes: pyegress runs one route (one chain for every "
                    "service); run one pyegress per route",
                )
            for key in ("servenodes", "chainnodes", "retries"):
                if key in top and not _empty(top[key][1]):
                    self.fail(
                        top[key][0],
                        f"with Routes this is a second route: pyegress runs one; "
                        f"move it into {routes_path}[0]",
                    )
            path, value = routes[0]
            route = self.mapping(value, path, _V2_ROUTE_KEYS)
        else:
            route = top
        for key in ("mark", "interface"):
            if key in route and not _empty(route[key][1]):
                self.fail(route[key][0], "not supported")
        listen = [
            self.node(self.string(url, p), "listen", p)
            for p, url in self.items(route, "servenodes", "")
        ]
        forward = [
            self.node(self.string(url, p), "forward", p)
            for p, url in self.items(route, "chainnodes", "")
        ]
        if "retries" in route:
            retries = self.integer(route["retries"][1], route["retries"][0])
            if retries > 0:
                # A node's own ?retry= wins over the file's Retries, as in gost v2.
                listen = [
                    n
                    if "retries" in n.params
                    else replace(n, params={**n.params, "retries": str(retries)})
                    for n in listen
                ]
        return GostFile(listen=listen, forward=forward, source="v2", debug=debug)

    # ---------------------------------------------------------------- gost v3

    def v3(self, root: _Pairs) -> GostFile:
        top = self.mapping(root, "", _V3_READ, _V3_UNSUPPORTED)
        bypasses = self._bypasses(self.items(top, "bypasses", ""))
        hops = self._named(self.items(top, "hops", ""), "hop")
        chains = self._named(self.items(top, "chains", ""), "chain")
        listen: list[Node] = []
        chain_refs: list[tuple[str | None, str]] = []  # (chain name, path of the service)
        for path, value in self.items(top, "services", ""):
            node, chain = self._service(value, path, bypasses)
            listen.append(node)
            chain_refs.append((chain, path))
        chain_name = self._one_chain(chain_refs, chains)
        forward: list[Node] = []
        if chain_name is not None:
            named = chains[chain_name]
            named.used = True
            forward = self._chain(named.value, named.path, hops, bypasses)
        for kind, table in (("chain", chains), ("hop", hops)):
            for name, item in table.items():
                if not item.used:
                    self.fail(item.path, f"{kind} {name!r} is not used")
        for name, bypass in bypasses.items():
            if not bypass.used:
                self.fail(bypass.path, f"bypass {name!r} is not used")
        return GostFile(listen=listen, forward=forward, source="v3")

    def _one_chain(
        self, refs: list[tuple[str | None, str]], chains: Mapping[str, _NamedHop]
    ) -> str | None:
        named = [(name, path) for name, path in refs if name is not None]
        if not refs:
            # No services: the file's one chain serves the -L nodes of the command line.
            if len(chains) > 1:
                path = list(chains.values())[1].path
                self.fail(path, "a second chain: pyegress runs one chain for every service")
            return next(iter(chains), None)
        if not named:
            return None
        first, first_path = named[0]
        for name, path in refs:
            if name is None:
                self.fail(
                    _child(path, "handler.chain"),
                    f"missing: pyegress runs one chain for every service "
                    f"({first_path} uses {first!r})",
                )
            if name != first:
                self.fail(
                    _child(path, "handler.chain"),
                    f"{name!r} differs from {first!r} ({first_path}): pyegress runs one "
                    "chain for every service",
                )
        if first not in chains:
            self.fail(_child(first_path, "handler.chain"), f"no chain named {first!r}")
        return first

    def _named(self, items: list[tuple[str, Any]], kind: str) -> dict[str, _NamedHop]:
        out: dict[str, _NamedHop] = {}
        for path, item in items:
            name = self._name_of(item, path)
            if name in out:
                self.fail(_child(path, "name"), f"{kind} {name!r} is defined twice")
            out[name] = _NamedHop(item, path)
        return out

    def _name_of(self, item: Any, path: str) -> str:
        if not isinstance(item, _Pairs):
            self.fail(path, f"must be a mapping, got {_show(item)}")
        name = ""
        for key, value, _ in item:
            if isinstance(key, str) and key.lower() == "name":
                name = self.string(value, _child(path, key))
        if not name:
            self.fail(_child(path, "name"), "missing")
        return name

    # ---------------------------------------------------------------- bypasses

    def _bypasses(self, items: list[tuple[str, Any]]) -> dict[str, _Bypass]:
        out: dict[str, _Bypass] = {}
        for path, item in items:
            entry = self.mapping(item, path, _BYPASS_KEYS, _BYPASS_UNSUPPORTED)
            if "name" not in entry:
                self.fail(_child(path, "name"), "missing")
            name = self.string(entry["name"][1], entry["name"][0])
            if name in out:
                self.fail(entry["name"][0], f"bypass {name!r} is defined twice")
            whitelist = False
            for key in ("whitelist", "reverse"):
                if key in entry:
                    whitelist = whitelist or self.boolean(entry[key][1], entry[key][0])
            matchers: list[str] = []
            for mpath, matcher in self.items(entry, "matchers", path):
                text = self.string(matcher, mpath).strip()
                if "," in text or not text:
                    self.fail(mpath, f"bad matcher {_show(text)}")
                matchers.append(text)
            out[name] = _Bypass(whitelist, matchers, path)
        return out

    def _bypass_param(
        self,
        entry: Mapping[str, tuple[str, Any]],
        bypasses: Mapping[str, _Bypass],
        params: _Params,
    ) -> None:
        refs: list[tuple[str, str]] = []
        if "bypass" in entry:
            path, value = entry["bypass"]
            if not _empty(value):
                refs.append((path, self.string(value, path)))
        for path, value in self.items(entry, "bypasses", ""):
            refs.append((path, self.string(value, path)))
        if not refs:
            return
        found: list[_Bypass] = []
        for path, name in refs:
            bypass = bypasses.get(name)
            if bypass is None:
                self.fail(path, f"no bypass named {name!r} in bypasses")
            bypass.used = True
            found.append(bypass)
        if len({b.whitelist for b in found}) > 1:
            self.fail(
                refs[1][0],
                "mixes whitelist and blacklist bypasses; pyegress takes one kind per object",
            )
        matchers = [m for b in found for m in b.matchers]
        text = ("~" if found[0].whitelist else "") + ",".join(matchers)
        params.set(self, "bypass", text, refs[0][0])

    # ---------------------------------------------------------------- parts

    def _type(
        self,
        entry: Mapping[str, tuple[str, Any]],
        table: Mapping[str, str],
        default: str,
        what: str,
    ) -> str:
        if "type" not in entry or _empty(entry["type"][1]):
            return default
        tpath, value = entry["type"]
        name = self.string(value, tpath).strip().lower()
        if name not in table:
            known = ", ".join(sorted(set(table)))
            self.fail(tpath, f"{what} {name!r} not supported ({known})")
        return name

    def _auth(self, value: Any, path: str) -> str:
        entry = self.mapping(value, path, _AUTH_KEYS)
        if not entry:
            return ""
        if "username" not in entry:
            self.fail(_child(path, "username"), "missing")
        user = self.string(entry["username"][1], entry["username"][0])
        password = ""
        if "password" in entry:
            password = self.scalar(entry["password"][1], entry["password"][0])
            if password == _REDACTED:
                self.fail(
                    entry["password"][0],
                    "is the '***' that -O prints instead of a password; write the password",
                )
        return f"{quote(user, safe='')}:{quote(password, safe='')}@"

    def _metadata(self, value: Any, path: str, params: _Params) -> None:
        if value is None or value == "":
            return
        if not isinstance(value, _Pairs):
            self.fail(path, f"must be a mapping, got {_show(value)}")
        lines: dict[str, int | None] = {}
        for key, item, line in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {_show(key)}")
            where = _child(path, key)
            lower = key.lower()
            if lower in lines:
                self._duplicate(where, lines[lower])
            lines[lower] = line
            canonical = _canonical_param(lower)
            if canonical is None or (canonical not in _SUPPORTED and not _empty(item)):
                self.fail(where, "not supported")
            if canonical not in _SUPPORTED:
                continue
            text = self.scalar(item, where)
            if canonical == "auth" and text == _REDACTED:
                self.fail(where, "is the '***' that -O prints; write base64(user:pass)")
            params.set(self, canonical, text, where)

    def _tls(self, value: Any, path: str, table: Mapping[str, str], params: _Params) -> None:
        unsupported = dict.fromkeys(("secure", "servername", "options", "validate"), "")
        entry = self.mapping(value, path, table, unsupported)
        for key, (where, item) in entry.items():
            if table[key] == "secure":
                text = "true" if self.boolean(item, where) else "false"
            else:
                text = self.string(item, where)
                if not text:
                    continue
            params.set(self, table[key], text, where)

    # ---------------------------------------------------------------- services

    def _service(
        self, value: Any, path: str, bypasses: Mapping[str, _Bypass]
    ) -> tuple[Node, str | None]:
        entry = self.mapping(value, path, _SERVICE_KEYS, _SERVICE_UNSUPPORTED)
        if "addr" not in entry:
            self.fail(_child(path, "addr"), "missing")
        addr = self.address(entry["addr"][1], entry["addr"][0])
        params = _Params()
        handler_path, handler_value = entry.get("handler", (_child(path, "handler"), None))
        handler = self.mapping(handler_value, handler_path, _HANDLER_KEYS, _HANDLER_UNSUPPORTED)
        listener_path, listener_value = entry.get("listener", (_child(path, "listener"), None))
        listener = self.mapping(
            listener_value, listener_path, _LISTENER_KEYS, _LISTENER_UNSUPPORTED
        )
        kind = self._type(handler, _HANDLERS, "auto", "handler")
        transport = self._type(listener, _LISTENERS, "tcp", "listener")
        chain: str | None = None
        if "chain" in handler and not _empty(handler["chain"][1]):
            chain = self.string(handler["chain"][1], handler["chain"][0])
        if "retries" in handler:
            retries = self.integer(handler["retries"][1], handler["retries"][0])
            if retries > 0:
                params.set(self, "retries", str(retries), handler["retries"][0])
        userinfo = self._auth(handler["auth"][1], handler["auth"][0]) if "auth" in handler else ""
        if "tls" in listener:
            self._tls(listener["tls"][1], listener["tls"][0], _LISTENER_TLS, params)
        for part in (handler, listener):
            if "metadata" in part:
                self._metadata(part["metadata"][1], part["metadata"][0], params)
        if "metadata" in entry:
            self._metadata(entry["metadata"][1], entry["metadata"][0], params)
        self._bypass_param(entry, bypasses, params)
        targets = ""
        if "forwarder" in entry:
            targets = self._forwarder(entry["forwarder"][1], entry["forwarder"][0], kind)
        if userinfo and "auth" in params.values:
            self.fail(params.values["auth"][1], "contradicts handler.auth; give one of them")
        scheme = _scheme(_HANDLERS[kind], _LISTENERS[transport], "listen")
        query = params.query()
        url = f"{scheme}://{userinfo}{addr}{targets}{'?' + query if query else ''}"
        return self.node(url, "listen", path), chain

    def _forwarder(self, value: Any, path: str, kind: str) -> str:
        entry = self.mapping(value, path, _FORWARDER_KEYS)
        if not entry:
            return ""
        if _HANDLERS[kind] not in ("tcp", "relay"):
            self.fail(path, f"not supported with handler {kind!r} (only tcp, forward, relay)")
        if "selector" in entry:
            spath, svalue = entry["selector"]
            selector = self.mapping(
                svalue, spath, ("strategy",), {"maxfails": "", "failtimeout": ""}
            )
            if "strategy" in selector:
                where, strategy = selector["strategy"]
                if self.string(strategy, where).lower() not in ("round", "rr"):
                    self.fail(where, f"{strategy!r} not supported (targets are used round-robin)")
        targets: list[str] = []
        if "nodes" in entry:
            for npath, node in self.sequence(entry["nodes"][1], entry["nodes"][0]):
                target = self.mapping(node, npath, _TARGET_KEYS, _NODE_UNSUPPORTED)
                if "addr" not in target:
                    self.fail(_child(npath, "addr"), "missing")
                targets.append(self.address(target["addr"][1], target["addr"][0]))
        if not targets:
            self.fail(_child(path, "nodes"), "missing: name the forward targets")
        return "/" + ",".join(targets)

    # ---------------------------------------------------------------- chains

    def _chain(
        self,
        value: Any,
        path: str,
        hops: Mapping[str, _NamedHop],
        bypasses: Mapping[str, _Bypass],
    ) -> list[Node]:
        entry = self.mapping(value, path, _CHAIN_KEYS, _CHAIN_UNSUPPORTED)
        forward: list[Node] = []
        for hpath, hop in self.items(entry, "hops", path):
            hop_entry = self.mapping(hop, hpath, _HOP_KEYS, _HOP_UNSUPPORTED)
            if set(hop_entry) == {"name"}:
                # A reference to a named hop from the top-level hops section.
                name = self.string(hop_entry["name"][1], hop_entry["name"][0])
                named = hops.get(name)
                if named is None:
                    self.fail(hop_entry["name"][0], f"no nodes and no hop named {name!r} in hops")
                named.used = True
                hpath, hop_entry = (
                    named.path,
                    self.mapping(named.value, named.path, _HOP_KEYS, _HOP_UNSUPPORTED),
                )
            forward.append(self._hop(hop_entry, hpath, bypasses))
        if not forward:
            self.fail(_child(path, "hops"), "missing: a chain needs at least one hop")
        return forward

    def _hop(
        self,
        hop: Mapping[str, tuple[str, Any]],
        path: str,
        bypasses: Mapping[str, _Bypass],
    ) -> Node:
        hop_params = _Params()
        if "selector" in hop:
            spath, svalue = hop["selector"]
            selector = self.mapping(svalue, spath, _SELECTOR_KEYS, {"maxlatency": ""})
            for key, (where, item) in selector.items():
                text = self.scalar(item, where).strip()
                if key == "strategy" and text.lower() not in _STRATEGIES:
                    self.fail(where, f"{text!r} not supported (round, random or fifo)")
                hop_params.set(self, _SELECTOR_KEYS[key], text, where)
        self._bypass_param(hop, bypasses, hop_params)
        nodes = self.items(hop, "nodes", path)
        if not nodes:
            self.fail(_child(path, "nodes"), "missing: a hop needs at least one node")
        first: tuple[str, str, dict[str, str], str] | None = None
        addrs: list[str] = []
        for npath, value in nodes:
            params = _Params(dict(hop_params.values))
            addr, scheme, userinfo = self._chain_node(value, npath, bypasses, params, len(nodes))
            shape = (scheme, userinfo, params.plain(), params.query())
            if first is None:
                first = shape
            elif shape[:3] != first[:3]:
                what = ("connector/dialer type", "connector.auth", "parameters")
                diff = next(w for w, a, b in zip(what, shape[:3], first[:3], strict=True) if a != b)
                self.fail(
                    npath,
                    f"differs from {nodes[0][0]} in {diff}: the nodes of a hop share "
                    "everything but addr in pyegress",
                )
            addrs.append(addr)
        assert first is not None
        scheme, userinfo, _, query = first
        url = f"{scheme}://{userinfo}{','.join(addrs)}{'?' + query if query else ''}"
        return self.node(url, "forward", path)

    def _chain_node(
        self,
        value: Any,
        path: str,
        bypasses: Mapping[str, _Bypass],
        params: _Params,
        group_size: int,
    ) -> tuple[str, str, str]:
        entry = self.mapping(value, path, _NODE_KEYS, _NODE_UNSUPPORTED)
        if "addr" not in entry:
            self.fail(_child(path, "addr"), "missing")
        addr = self.address(entry["addr"][1], entry["addr"][0])
        cpath, cvalue = entry.get("connector", (_child(path, "connector"), None))
        connector = self.mapping(cvalue, cpath, _CONNECTOR_KEYS, _CONNECTOR_UNSUPPORTED)
        dpath, dvalue = entry.get("dialer", (_child(path, "dialer"), None))
        dialer = self.mapping(dvalue, dpath, _DIALER_KEYS, _DIALER_UNSUPPORTED)
        kind = self._type(connector, _CONNECTORS, "http", "connector")
        transport = self._type(dialer, _DIALERS, "tcp", "dialer")
        userinfo = (
            self._auth(connector["auth"][1], connector["auth"][0]) if "auth" in connector else ""
        )
        if "tls" in dialer:
            self._tls(dialer["tls"][1], dialer["tls"][0], _DIALER_TLS, params)
        for part in (connector, dialer, entry):
            if "metadata" in part:
                self._metadata(part["metadata"][1], part["metadata"][0], params)
        own = _Params()
        self._bypass_param(entry, bypasses, own)
        if "bypass" in own.values:
            value, where = own.values["bypass"]
            if group_size > 1:
                self.fail(where, "not supported on one node of several; set it on the hop")
            if "bypass" in params.values:
                self.fail(where, f"the hop has a bypass already ({params.values['bypass'][1]})")
            params.set(self, "bypass", value, where)
        if userinfo and "auth" in params.values:
            self.fail(params.values["auth"][1], "contradicts connector.auth; give one of them")
        scheme = _scheme(_CONNECTORS[kind], _DIALERS[transport], "forward")
        return addr, scheme, userinfo


def _canonical_param(key: str) -> str | None:
    if key in _PARAM_ALIASES:
        return _PARAM_ALIASES[key]
    if key in _CANONICAL:
        return key
    for prefix in _V3_PREFIXES:
        if key.startswith(prefix):
            return _canonical_param(key[len(prefix) :])
    return None


def _scheme(kind: str, transport: str, role: Role) -> str:
    """The shortest scheme that parse_node splits into ``kind`` and ``transport``."""
    for candidate in (kind, transport):
        try:
            if _split_scheme(candidate, role, candidate) == (kind, transport):
                return candidate
        except ConfigError:
            continue
    return f"{kind}+{transport}"
