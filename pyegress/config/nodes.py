"""gost node URLs (``-L`` and ``-F``) parsed into frozen node specs.

Grammar (gost-compat 1.2)::

    [scheme://][user:pass@]host:port[/forward-targets][?k=v&...]
    scheme := handler-or-connector ["+" listener-or-dialer]

The scheme is split into its two halves the way gost does (gost-compat 1.3): one name
stands for both halves, ``https`` means ``http+tls``, no scheme means ``auto``, and a
non-empty path on a ``-L`` node turns it into a port forwarder. Unlike gost, a scheme we
do not know is an error rather than a silent fallback: an egress proxy that quietly
serves a different protocol than the operator wrote is worse than one that refuses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote

from pyegress.errors import ConfigError

Role = Literal["listen", "forward"]

# Left half of a -L scheme -> handler; aliases folded.
_HANDLERS = {
    "auto": "auto",
    "http": "http",
    "http2": "http2",
    "socks": "socks5",
    "socks5": "socks5",
    "socks4": "socks4",
    "socks4a": "socks4a",
    "tcp": "tcp",
    "forward": "tcp",
    "red": "redirect",
    "redir": "redirect",
    "redirect": "redirect",
    "relay": "relay",
    "sni": "sni",
}
# Right half of a -L scheme -> listener.
_LISTENERS = {
    "tcp": "tcp",
    "tls": "tls",
    "mtls": "tls",
    "h2": "h2",
    "h2c": "h2c",
    "http2": "http2",
    "red": "redirect",
    "redir": "redirect",
    "redirect": "redirect",
}
# Left half of a -F scheme -> connector.
_CONNECTORS = {
    "auto": "http",
    "http": "http",
    "http2": "http2",
    "socks": "socks5",
    "socks5": "socks5",
    "socks4": "socks4",
    "socks4a": "socks4a",
    "relay": "relay",
    "forward": "forward",
    "direct": "direct",
}
# Right half of a -F scheme -> dialer.
_DIALERS = {"tcp": "tcp", "tls": "tls", "mtls": "tls", "h2": "h2", "h2c": "h2c", "http2": "http2"}

# Schemes whose single name means "auto handler over this transport" (gost-compat 1.3).
_TRANSPORT_ONLY = {"h2", "h2c", "tls", "mtls"}

# Parameters pyegress understands, lower-cased (v3 keys are case-insensitive). Any other
# key is warned about once. Aliases map to the canonical key.
_PARAM_ALIASES = {
    "timeout": "timeout",
    "dialtimeout": "timeout",
    "readtimeout": "handshake_timeout",
    "handshake_timeout": "handshake_timeout",
    "handshaketimeout": "handshake_timeout",
    "idletimeout": "idle_timeout",
    "idle_timeout": "idle_timeout",
    "retry": "retries",
    "retries": "retries",
    "proxyagent": "proxy_agent",
    "http.proxyagent": "proxy_agent",
    "auth": "auth",
    "authbasicrealm": "realm",
    "realm": "realm",
    "cert": "cert",
    "certfile": "cert",
    "tls.certfile": "cert",
    "key": "key",
    "keyfile": "key",
    "tls.keyfile": "key",
    "ca": "ca",
    "cafile": "ca",
    "tls.cafile": "ca",
    "secure": "secure",
    "tls.secure": "secure",
    "servername": "server_name",
    "tls.servername": "server_name",
    "host": "host",
    "path": "path",
    "ping": "ping",
    "ip": "ip",
    "strategy": "strategy",
    "max_fails": "max_fails",
    "maxfails": "max_fails",
    "fail_timeout": "fail_timeout",
    "failtimeout": "fail_timeout",
    "bypass": "bypass",
    "backlog": "backlog",
    "notls": "notls",
    "sniffing": "sniffing",
    "sniffing.timeout": "sniffing_timeout",
    "sniffing_timeout": "sniffing_timeout",
    "sniffingtimeout": "sniffing_timeout",
    "tproxy": "tproxy",
    "range": "range",
    "range6": "range6",
    "upstream": "upstream",
    "forward": "upstream",
    "suffix": "suffix",
    "suffixes": "suffix",
    "ttl": "ttl",
    "keep": "keep",
    "size": "size",
    "maxstreams": "max_streams",
    "dnstimeout": "dns_timeout",
    "dns_timeout": "dns_timeout",
    "max_streams": "max_streams",
    "max_lifetime": "max_lifetime",
    "crl": "crl",
    "tls.crl": "crl",
    "maxlifetime": "max_lifetime",
    "splice": "splice",
    "conns": "conns",
}
# Canonical parameters the engine acts on; any other parsed parameter is warned about
# once as ignored (cli.py), and a gost file may not set it (config/gostfile.py).
IMPLEMENTED_PARAMS = frozenset(
    {
        "timeout", "handshake_timeout", "idle_timeout", "retries", "proxy_agent", "auth",
        "realm", "cert", "key", "ca", "secure", "server_name", "host", "path", "ping", "ip",
        "strategy", "max_fails", "fail_timeout", "max_streams", "dns_timeout", "bypass",
        "max_lifetime", "splice", "crl", "conns",
        # the transparent listeners (redirect://, dns://)
        "sniffing", "sniffing_timeout", "tproxy", "range", "range6", "upstream", "suffix",
        "ttl", "keep", "size",
    }
)  # fmt: skip
_V3_PREFIXES = ("service.", "handler.", "listener.", "node.", "connector.", "dialer.", "hop.")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Node:
    """One ``-L`` or ``-F`` node.

    ``kind`` is the handler (on ``-L``) or connector (on ``-F``); ``transport`` the
    listener or dialer. ``host`` is empty for "all interfaces" on ``-L``.
    """

    role: Role
    scheme: str
    kind: str
    transport: str
    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    forward_targets: tuple[str, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    unknown_params: tuple[str, ...] = ()
    # Further addresses of a node group: v3's comma host list (``a:443,b:443``) and
    # ``ip=a,b:8443`` (a missing port inherits the node's). The first is host:port.
    group: tuple[tuple[str, int], ...] = ()

    @property
    def members(self) -> tuple[tuple[str, int], ...]:
        """Every address of this node (a group of one when no group is given)."""
        return ((self.host, self.port), *self.group)

    def with_address(self, host: str, port: int) -> Node:
        """This node, pointed at one member address."""
        from dataclasses import replace

        return replace(self, host=host, port=port, group=())

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def redacted(self) -> str:
        """The URL as a string safe to print: the password is never shown."""
        auth = ""
        if self.user is not None:
            auth = f"{self.user}:***@"
        path = "/" + ",".join(self.forward_targets) if self.forward_targets else ""
        query = "&".join(
            f"{k}={'***' if k == 'auth' else v}" for k, v in sorted(self.params.items())
        )
        return f"{self.scheme}://{auth}{self.address}{path}{'?' + query if query else ''}"

    def param(self, key: str) -> str | None:
        return self.params.get(key)

    def duration(self, key: str, default: float) -> float:
        value = self.params.get(key)
        if value is None or value == "":
            return default
        return parse_duration(value, f"{key}={value}")

    def integer(self, key: str, default: int) -> int:
        value = self.params.get(key)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"parameter {key}={value!r} is not an integer") from None

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.params.get(key)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("", "1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"parameter {key}={value!r} is not a boolean")


def join_host_port(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_duration(text: str, what: str) -> float:
    """gost durations: a Go duration string (``1m30s``, ``500ms``) or plain seconds."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos = 0
        seconds = 0.0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ConfigError(f"bad duration in {what!r}: use seconds or 1m30s style") from None
    if seconds < 0:
        raise ConfigError(f"bad duration in {what!r}: negative")
    return seconds


def _split_scheme(scheme: str, role: Role, url: str) -> tuple[str, str]:
    if scheme == "https":
        scheme = "http+tls"
    left, plus, right = scheme.partition("+")
    if not plus:
        if left in _TRANSPORT_ONLY:
            left, right = "auto", left
        elif left in ("red", "redir", "redirect", "http2", "dns"):
            right = left
        else:
            right = "tcp"
    if role == "listen" and left == "dns" and right in ("dns", "tcp", "udp"):
        return "dns", "dns"  # pyegress's DNS listener (UDP and TCP), not gost's DNS proxy
    if role == "listen" and (left == "redu" or right in ("udp", "redu")):
        raise ConfigError(
            f"-L {url!r}: UDP is not redirected (only DNS, with -L dns://); see docs/transparent.md"
        )
    first, second, flag = (
        (_HANDLERS, _LISTENERS, "-L") if role == "listen" else (_CONNECTORS, _DIALERS, "-F")
    )
    kind, transport = first.get(left), second.get(right)
    if kind is None or transport is None:
        bad = left if kind is None else right
        raise ConfigError(f"unknown scheme {bad!r} in {flag} {url!r}")
    return kind, transport


def _parse_port(text: str, url: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port {text!r} in {url!r}")
    return int(text)


def _split_authority(hostport: str, url: str, role: Role) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ConfigError(f"unclosed '[' in {url!r}")
        host = hostport[1:end]
        rest = hostport[end + 1 :]
        if not rest.startswith(":"):
            raise ConfigError(f"missing port in {url!r}")
        return host, _parse_port(rest[1:], url)
    host, colon, port = hostport.rpartition(":")
    if not colon:
        raise ConfigError(f"missing port in {url!r}")
    if ":" in host:
        raise ConfigError(f"IPv6 address must be in brackets in {url!r}")
    if role == "forward" and not host:
        host = "127.0.0.1"
    if any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(f"bad host {host!r} in {url!r}")
    return host, _parse_port(port, url)


def _canonical_params(query: str, url: str) -> tuple[dict[str, str], tuple[str, ...]]:
    params: dict[str, str] = {}
    unknown: list[str] = []
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise ConfigError(f"bad query string in {url!r}: {exc}") from None
    for raw_key, value in pairs:
        key = raw_key.lower()
        for prefix in _V3_PREFIXES:
            if key.startswith(prefix) and key[len(prefix) :] in _PARAM_ALIASES:
                key = key[len(prefix) :]
                break
        canonical = _PARAM_ALIASES.get(key)
        if canonical is None:
            unknown.append(raw_key)
            continue
        params[canonical] = value
    return params, tuple(unknown)


def parse_node(url: str, role: Role) -> Node:
    """Parse one node URL; raise :class:`ConfigError` naming the bad part."""
    text = url.strip()
    if not text:
        raise ConfigError("empty node URL")
    if "://" in text:
        scheme, _, rest = text.partition("://")
        scheme = scheme.lower()
        if not scheme or not re.fullmatch(r"[a-z0-9+]+", scheme):
            raise ConfigError(f"bad scheme {scheme!r} in {url!r}")
    else:
        scheme, rest = "auto", text
    rest, _, query = rest.partition("?")
    rest, _, _fragment = rest.partition("#")
    slash = rest.find("/", rest.rfind("@") + 1)
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    user: str | None = None
    password: str | None = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        raw_user, colon, raw_pass = userinfo.partition(":")
        user = unquote(raw_user)
        password = unquote(raw_pass) if colon else ""
    kind, transport = _split_scheme(scheme, role, url)
    group: list[tuple[str, int]] = []
    if role == "forward" and "," in authority:
        first, *more = authority.split(",")
        host, port = _split_authority(first, url, role)
        group = [_split_authority(a, url, role) for a in more if a]
    else:
        host, port = _split_authority(authority, url, role)
    targets = tuple(t for t in path.strip("/").split(",") if t)
    params, unknown = _canonical_params(query, url)
    if "auth" in params and user is None:
        user, password = _decode_auth_param(params["auth"], url)
    if role == "forward" and params.get("ip"):
        # gost v2: the ip= list is the group; the URL's own host only gives the port.
        listed: list[tuple[str, int]] = []
        for item in params["ip"].split(","):
            item = item.strip()
            if not item:
                continue
            if item.startswith("[") or item.count(":") == 1:
                listed.append(_split_authority(item, url, role))
            else:
                listed.append((item, port))
        if listed:
            (host, port), group = listed[0], listed[1:]
    if role == "listen" and targets:
        if kind == "auto" or transport in ("tcp", "tls"):
            kind = "tcp"
        for target in targets:
            _split_authority(target, url, "forward")
    elif targets:
        raise ConfigError(f"a -F node takes no path: {url!r}")
    return Node(
        role=role,
        scheme=scheme,
        kind=kind,
        transport=transport,
        host=host,
        port=port,
        user=user,
        password=password,
        forward_targets=targets,
        params=params,
        unknown_params=unknown,
        group=tuple(a for a in group if a != (host, port)),
    )


def _decode_auth_param(value: str, url: str) -> tuple[str, str]:
    import base64
    import binascii

    padded = value + "=" * (-len(value) % 4)
    for decoder in (base64.urlsafe_b64decode, base64.b64decode):
        try:
            raw = decoder(padded).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        user, _, password = raw.partition(":")
        return user, password
    raise ConfigError(f"parameter auth is not base64 of user:pass in {url!r}")
