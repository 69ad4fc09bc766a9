"""Prometheus metrics of pyegress (egress-anchors section 5.2), on the default registry.

Every metric of the recommended set is defined here once, with its exact exposed name,
type and label names; the default ``REGISTRY`` also carries prometheus_client's
``process_*`` and ``python_gc_*`` collectors. The ``*_created`` companion series are
turned off: they double the series count and no dashboard reads them.

Label values never carry raw attacker text:

* enum labels (``mode``, ``decision``, ``reason``, ``close_reason``, ``kind``, ...) are
  checked against the frozensets below; anything else is counted as ``"other"``;
* ``rule`` and ``identity_class`` come from configuration but are still capped by
  :class:`BoundedLabel`: the first 200 distinct values pass, later ones become
  ``"_other"``. Worst case for ``pyegress_decisions_total`` is therefore bounded, and
  in practice combinations are sparse.

With ``--workers N`` each worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and the parent's
admin listener serves them merged (:func:`render_merged`): counters and histograms are
summed, and every gauge names how it combines (``multiprocess_mode``). The
``process_*``/``python_gc_*`` collectors are per process and not merged.

The helpers at the bottom are what the data path calls. Each keeps a dict from its
(already normalised) label tuple to the prometheus child, so a hot call costs a few
set/dict lookups instead of a ``.labels()`` call. Because keys are normalised first, the
caches are bounded by the same label budget as the series. The per-tunnel ones do not
touch the child either: they add to plain numbers (:class:`Pending`) that
:func:`publish` moves into the children, in one locked add per series. The admin
listener publishes before it renders (``render()`` does both), so a scrape sees every
count made before it; a ``--workers`` worker, scraped through its files, publishes
every :data:`PUBLISH_PERIOD` seconds and when it stops.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cryptography import x509
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pyegress import __version__
from pyegress.errors import ConfigError

disable_created_metrics()  # type: ignore[no-untyped-call]

# prometheus-client chose its value store when it was imported: with this variable set
# (a worker of ``--workers N``), values live in per-process files the parent merges.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

# The text format every Prometheus version reads; generate_latest writes exactly this
# format for our names (all legacy-valid), whatever version the library calls "latest".
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

OTHER = "other"
"""Label value for an enum value outside its documented set."""

OVERFLOW = "_other"
"""Label value for a bounded label once its distinct-value budget is spent."""

BOUNDED_LABEL_LIMIT = 200

# ---------------------------------------------------------------------------------------
# Documented label values. Anything outside these sets is exported as OTHER.

TIERS = frozenset({"sidecar", "dmz", "proxy"})
MODES = frozenset({"connect", "socks5", "socks4", "http", "forward", "sni", "h2", "transparent"})
DECISIONS = frozenset({"allow", "deny", "report"})
REASONS = frozenset(
    {
        "rule_match",
        "default_allow",
        "report_only",
        "not_in_allowlist",
        "global_deny",
        "port_not_allowed",
        "client_auth",
        "no_identity",
        "resolved_private",
        "resolved_loopback",
        "resolved_link_local",
        "resolved_metadata",
        "resolved_cgnat",
        "resolved_ipv6_embedded",
        "resolved_reserved",
        "resolved_multicast",
        "resolved_ula",
        "resolved_unspecified",
        "resolved_self",
        "self_connection",
        "sni_mismatch",
        "sni_missing",
        "ech_present",
        "host_mismatch",
        "orig_dst_mismatch",
        "protocol_not_allowed",
        "malformed_request",
        "dns_error",
        "dns_timeout",
        "limit_exceeded",
        "draining",
        "upstream_proxy_denied",
        "no_policy",
        "bypass",
    }
)
CLOSE_REASONS = frozenset(
    {
        "eof",
        "client_fin",
        "upstream_fin",
        "client_reset",
        "upstream_reset",
        "idle_timeout",
        "max_lifetime",
        "handshake_timeout",
        "connect_timeout",
        "connect_refused",
        "dial_failed",
        "dns_timeout",
        "resolve_failed",
        "denied",
        "malformed",
        "auth_failed",
        "unsupported",
        "host_unreachable",
        "network_unreachable",
        "hop_refused",
        "upstream_protocol_error",
        "tier_link_lost",
        "drain",
        "limit_exceeded",
        "sni_mismatch",
        "internal_error",
        "error",
        "client_closed",
    }
)
RELOAD_RESULTS = frozenset({"success", "error"})
RESOLVER_RESULTS = frozenset({"ok", "nxdomain", "servfail", "timeout", "error"})
ADDRESS_CLASSES = frozenset(
    {
        "private",
        "loopback",
        "link_local",
        "metadata",
        "cgnat",
        "ipv6_embedded",
        "reserved",
        "multicast",
        "ula",
        "unspecified",
        "self",
        "user",
    }
)

# Every other category of the special-purpose address table (policy/special.py): each is
# a ``resolved_<category>`` reason and a ``class`` label of its own.
_MORE_CLASSES = frozenset(
    {
        "broadcast",
        "documentation",
        "benchmarking",
        "site_local",
        "discard",
        "this_network",
        "protocol_assignments",
        "translation",
    }
)
ADDRESS_CLASSES = ADDRESS_CLASSES | _MORE_CLASSES
REASONS = REASONS | frozenset(f"resolved_{c}" for c in _MORE_CLASSES)
VIAS = frozenset({"direct", "proxy", "h2"})
"""Upstream dial kinds: straight to the origin, through an HTTP/SOCKS proxy, or over
an h2 tier link (sidecar to DMZ)."""
CONNECT_ERRORS = frozenset(
    {
        "timeout",
        "refused",
        "reset",
        "unreachable",
        "tls",
        "proxy_407",
        "proxy_denied",
        "proxy_error",
    }
)
DIRECTIONS = frozenset({"from_client", "to_client"})
TIMEOUT_KINDS = frozenset({"handshake", "dns", "connect", "idle", "max_lifetime", "drain"})
LIMITS = frozenset({"global_conns", "identity_conns", "rate", "fd"})
TLS_SIDES = frozenset({"client", "peer"})
TLS_RESULTS = frozenset({"ok", "bad_cert", "expired", "revoked", "no_cert", "version", "error"})
CERT_KINDS = frozenset({"server", "client", "ca"})
LINK_STATES = frozenset({"up", "connecting", "down"})
AUDIT_EVENTS = frozenset({"decision", "close", "lifecycle"})


def enum_label(value: object, allowed: frozenset[str]) -> str:
    """``value`` if it is one of ``allowed``, else :data:`OTHER`."""
    return value if isinstance(value, str) and value in allowed else OTHER


class BoundedLabel:
    """Passes at most ``limit`` distinct values of one label kind; later newcomers map
    to :data:`OVERFLOW`. ``None`` maps to the empty string (Prometheus reads an empty
    value as "label absent"). Values longer than ``max_length`` characters or holding
    non-printable characters also count as overflow: they are never configuration.

    A value once admitted stays admitted, so a call is one dict lookup when warm; the
    admission path is serialised by a lock so the budget holds across threads."""

    def __init__(self, kind: str, limit: int = BOUNDED_LABEL_LIMIT, max_length: int = 128):
        self.kind = kind
        self.limit = limit
        self.max_length = max_length
        self._admitted: dict[str, str] = {"": ""}
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return ""
        try:
            return self._admitted[value]
        except (KeyError, TypeError):
            return self._admit(value)

    def _admit(self, value: object) -> str:
        if not isinstance(value, str) or len(value) > self.max_length or not value.isprintable():
            return OVERFLOW
        with self._lock:
            if value in self._admitted:
                return self._admitted[value]
            if len(self._admitted) - 1 >= self.limit:  # the "" entry is free
                return OVERFLOW
            self._admitted[value] = value
            return value

    def __len__(self) -> int:
        """Distinct values admitted so far (not counting ``""``)."""
        return len(self._admitted) - 1


RULE_LABEL = BoundedLabel("rule")
IDENTITY_CLASS_LABEL = BoundedLabel("identity_class")

# ---------------------------------------------------------------------------------------
# Metric families. Counter names are given without "_total"; the library appends it.

# Every gauge says how worker processes combine (``--workers N``, prometheus-client's
# multiprocess mode; ignored in a single process). "live" modes forget a worker once it
# has exited: readiness is the least ready worker, counts of open things are summed.
BUILD_INFO = Gauge(
    "pyegress_build_info",
    "Build of this process (always 1).",
    ["version", "python"],
    multiprocess_mode="livemax",
)
READY = Gauge(
    "pyegress_ready",
    "1 when the tier serves traffic; 0 while loading or draining.",
    ["tier"],
    multiprocess_mode="livemin",
)
DRAINING = Gauge(
    "pyegress_draining",
    "1 while the tier drains for shutdown.",
    ["tier"],
    multiprocess_mode="livemax",
)
POLICY_INFO = Gauge(
    "pyegress_policy_info",
    "Loaded policy version (one series, always 1).",
    ["tier", "policy_version"],
    multiprocess_mode="livemax",
)
POLICY_RULES = Gauge(
    "pyegress_policy_rules", "Rules in the loaded policy.", ["tier"], multiprocess_mode="livemax"
)
CONFIG_RELOADS = Counter(
    "pyegress_config_reloads", "Configuration reloads by result.", ["tier", "result"]
)
CONFIG_LAST_RELOAD_SUCCESS = Gauge(
    "pyegress_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful configuration load.",
    ["tier"],
    multiprocess_mode="livemax",
)
CONNECTIONS_ACCEPTED = Counter(
    "pyegress_connections_accepted", "Client connections accepted.", ["tier", "mode"]
)
CONNECTIONS_ACTIVE = Gauge(
    "pyegress_connections_active",
    "Client connections open now.",
    ["tier", "mode"],
    multiprocess_mode="livesum",
)
DECISIONS_TOTAL = Counter(
    "pyegress_decisions",
    "Policy decisions; rule and identity_class are capped at 200 values each.",
    ["tier", "mode", "decision", "reason", "rule", "identity_class"],
)
RESOLVER_LOOKUPS = Counter("pyegress_resolver_lookups", "DNS lookups by result.", ["result"])
RESOLVER_DURATION = Histogram(
    "pyegress_resolver_duration_seconds",
    "DNS lookup time.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RESOLVED_ADDRESS_DENIED = Counter(
    "pyegress_resolved_address_denied", "Resolved addresses refused, by class.", ["class"]
)
UPSTREAM_CONNECT_DURATION = Histogram(
    "pyegress_upstream_connect_duration_seconds",
    "Time to establish the upstream connection.",
    ["via"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
UPSTREAM_CONNECT_ERRORS = Counter(
    "pyegress_upstream_connect_errors", "Failed upstream connects.", ["via", "error"]
)
TUNNEL_BYTES = Counter(
    "pyegress_tunnel_bytes",
    "Payload bytes relayed, counted while streaming.",
    ["tier", "direction"],
)
CONNECTION_DURATION = Histogram(
    "pyegress_connection_duration_seconds",
    "Client connection lifetime by close reason.",
    ["tier", "mode", "close_reason"],
    buckets=(0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0),
)
TIMEOUTS = Counter("pyegress_timeouts", "Timeouts that ended a stage.", ["tier", "kind"])
LIMITS_REJECTED = Counter(
    "pyegress_limits_rejected", "Connections refused by a limit.", ["tier", "limit"]
)
TLS_HANDSHAKES = Counter(
    "pyegress_tls_handshakes", "TLS handshakes by side and result.", ["tier", "side", "result"]
)
CERT_EXPIRY = Gauge(
    "pyegress_cert_expiry_timestamp_seconds",
    "Unix time the earliest certificate of a loaded file expires.",
    ["tier", "cert"],
    multiprocess_mode="livemin",
)
TIER_LINKS = Gauge(
    "pyegress_tier_links",
    "Sidecar to DMZ h2 sessions by state.",
    ["state"],
    multiprocess_mode="livesum",
)
TIER_STREAMS_ACTIVE = Gauge(
    "pyegress_tier_streams_active", "h2 streams in use on tier links.", multiprocess_mode="livesum"
)
TIER_FAILOVERS = Counter("pyegress_tier_failovers", "Moves from one DMZ link to another.")
AUDIT_EVENTS_TOTAL = Counter("pyegress_audit_events", "Audit records written.", ["event"])
AUDIT_DROPPED = Counter(
    "pyegress_audit_dropped", "Audit records dropped (queue full); must stay 0.", ["event"]
)

BUILD_INFO.labels(__version__, platform.python_version()).set(1)


def render() -> tuple[bytes, str]:
    """The exposition body of the default registry and its content type, every count
    made so far published first (call it on the thread that makes the counts)."""
    publish()
    return exposition()


def exposition() -> tuple[bytes, str]:
    """:func:`render` without publishing: for a thread other than the event loop's,
    after the loop's thread called :func:`publish`."""
    return _generate_latest(REGISTRY), CONTENT_TYPE


class _Merged:
    """Every worker's metrics from the multiprocess directory, summed (counters,
    histograms) or combined by each gauge's ``multiprocess_mode``; a previous policy
    version (value 0) is left out, so ``pyegress_policy_info`` has one series."""

    def __init__(self, path: str, extra: Callable[[], Iterable[Metric]]) -> None:
        self._collector = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        for family in self._collector.collect():  # type: ignore[no-untyped-call]
            if family.name == "pyegress_policy_info":
                family.samples = [s for s in family.samples if s.value != 0]
            yield family
        yield from self._extra()


def supervisor_families(configured: int, running: int, ready: int, restarts: int) -> list[Metric]:
    """The supervisor's own families (``--workers``): worker processes by state and the
    restarts after an unexpected exit."""
    workers = GaugeMetricFamily(
        "pyegress_workers", "Worker processes (--workers) by state.", labels=["state"]
    )
    workers.add_metric(["configured"], configured)
    workers.add_metric(["running"], running)
    workers.add_metric(["ready"], ready)
    restarted = CounterMetricFamily(
        "pyegress_worker_restarts", "Workers restarted after an unexpected exit."
    )
    restarted.add_metric([], restarts)
    return [workers, restarted]


def render_merged(
    path: str, extra: Callable[[], Iterable[Metric]] = lambda: ()
) -> tuple[bytes, str]:
    """The exposition body of all workers' metrics in the multiprocess directory
    ``path``, followed by ``extra()`` (the supervisor's own families)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(path, extra))
    return _generate_latest(registry), CONTENT_TYPE


# ---------------------------------------------------------------------------------------
# Counts not yet in the prometheus children.

PUBLISH_PERIOD = 0.1  # seconds between publishes of a --workers worker


class Pending:
    """Counter and gauge deltas and histogram observations made since the last
    :func:`publish`, as plain numbers: a hot call adds to a dict entry where a child
    update would take a lock per value (and a loop over the buckets per observation).
    Used from the event loop thread only."""

    __slots__ = ("adds", "buckets", "sums")

    def __init__(self) -> None:
        self.adds: dict[Counter | Gauge, float] = {}
        self.buckets: dict[tuple[Histogram, int], int] = {}
        self.sums: dict[Histogram, float] = {}

    def add(self, child: Counter | Gauge, amount: float = 1.0) -> None:
        adds = self.adds
        adds[child] = adds.get(child, 0.0) + amount

    def observe(self, child: Histogram, bounds: tuple[float, ...], amount: float) -> None:
        """``child.observe(amount)``: the bucket is the first bound >= ``amount``."""
        key = (child, bisect_left(bounds, amount))
        buckets = self.buckets
        buckets[key] = buckets.get(key, 0) + 1
        sums = self.sums
        sums[child] = sums.get(child, 0.0) + amount


_pending = Pending()


def publish() -> None:
    """Move the pending counts into the prometheus children (and so into a worker's
    multiprocess files). Call it from the event loop's thread, which makes the counts."""
    global _pending
    done, _pending = _pending, Pending()
    for child, amount in done.adds.items():
        if amount:
            child.inc(amount)
    # A histogram child's bucket and sum values, as its own observe() updates them.
    for (hist, index), count in done.buckets.items():
        hist._buckets[index].inc(count)
    for hist, total in done.sums.items():
        hist._sum.inc(total)


def _bounds(histogram: Histogram) -> tuple[float, ...]:
    """The upper bounds of ``histogram``'s buckets, ``+Inf`` last."""
    return tuple(histogram._upper_bounds)


_DURATION_BOUNDS = _bounds(CONNECTION_DURATION)
_CONNECT_BOUNDS = _bounds(UPSTREAM_CONNECT_DURATION)
_RESOLVER_BOUNDS = _bounds(RESOLVER_DURATION)


# ---------------------------------------------------------------------------------------
# Hot-path helpers. Caches are keyed by normalised values only.

_opened: dict[tuple[str, str], tuple[Counter, Gauge]] = {}
_closed: dict[tuple[str, str, str], tuple[Gauge, Histogram]] = {}
_decisions: dict[tuple[str, str, str, str, str, str], Counter] = {}
_bytes: dict[str, tuple[Counter, Counter]] = {}
_timeouts: dict[tuple[str, str], Counter] = {}
_limits: dict[tuple[str, str], Counter] = {}
_lookups: dict[str, Counter] = {}
_denied: dict[str, Counter] = {}
_connect: dict[str, Histogram] = {}
_connect_errors: dict[tuple[str, str], Counter] = {}
_audit: dict[str, Counter] = {}
_audit_dropped: dict[str, Counter] = {}
_handshakes: dict[tuple[str, str, str], Counter] = {}


def tunnel_opened(tier: str, mode: str) -> None:
    """A client connection was accepted (pair with exactly one :func:`tunnel_closed`)."""
    key = (enum_label(tier, TIERS), enum_label(mode, MODES))
    children = _opened.get(key)
    if children is None:
        children = _opened[key] = (
            CONNECTIONS_ACCEPTED.labels(*key),
            CONNECTIONS_ACTIVE.labels(*key),
        )
    pending = _pending
    pending.add(children[0])
    pending.add(children[1])


def tunnel_closed(tier: str, mode: str, close_reason: str, duration_s: float) -> None:
    """A client connection ended after ``duration_s`` seconds."""
    t, m = enum_label(tier, TIERS), enum_label(mode, MODES)
    key = (t, m, enum_label(close_reason, CLOSE_REASONS))
    children = _closed.get(key)
    if children is None:
        children = _closed[key] = (
            CONNECTIONS_ACTIVE.labels(t, m),
            CONNECTION_DURATION.labels(*key),
        )
    pending = _pending
    pending.add(children[0], -1.0)
    pending.observe(children[1], _DURATION_BOUNDS, duration_s)


def decision(
    tier: str, mode: str, action: str, reason: str, rule: str | None, identity_class: str | None
) -> None:
    """Count one policy verdict (``action`` is allow, deny or report)."""
    key = (
        enum_label(tier, TIERS),
        enum_label(mode, MODES),
        enum_label(action, DECISIONS),
        enum_label(reason, REASONS),
        RULE_LABEL(rule),
        IDENTITY_CLASS_LABEL(identity_class),
    )
    child = _decisions.get(key)
    if child is None:
        child = _decisions[key] = DECISIONS_TOTAL.labels(*key)
    _pending.add(child)


def add_bytes(tier: str, from_client: int, to_client: int) -> None:
    """Add relayed payload bytes; call per chunk or per batch while streaming."""
    t = enum_label(tier, TIERS)
    children = _bytes.get(t)
    if children is None:
        children = _bytes[t] = (
            TUNNEL_BYTES.labels(t, "from_client"),
            TUNNEL_BYTES.labels(t, "to_client"),
        )
    if from_client > 0:
        _pending.add(children[0], from_client)
    if to_client > 0:
        _pending.add(children[1], to_client)


def timeout(tier: str, kind: str) -> None:
    key = (enum_label(tier, TIERS), enum_label(kind, TIMEOUT_KINDS))
    child = _timeouts.get(key)
    if child is None:
        child = _timeouts[key] = TIMEOUTS.labels(*key)
    _pending.add(child)


def limit_rejected(tier: str, limit: str) -> None:
    key = (enum_label(tier, TIERS), enum_label(limit, LIMITS))
    child = _limits.get(key)
    if child is None:
        child = _limits[key] = LIMITS_REJECTED.labels(*key)
    child.inc()


def resolver_lookup(result: str, seconds: float) -> None:
    """One DNS lookup finished with ``result`` after ``seconds``."""
    key = enum_label(result, RESOLVER_RESULTS)
    child = _lookups.get(key)
    if child is None:
        child = _lookups[key] = RESOLVER_LOOKUPS.labels(key)
    pending = _pending
    pending.add(child)
    pending.observe(RESOLVER_DURATION, _RESOLVER_BOUNDS, seconds)


def address_denied(cls: str) -> None:
    """A resolved address was refused for its class (``private``, ``metadata``, ...)."""
    key = enum_label(cls, ADDRESS_CLASSES)
    child = _denied.get(key)
    if child is None:
        child = _denied[key] = RESOLVED_ADDRESS_DENIED.labels(key)
    child.inc()


def upstream_connect(via: str, seconds: float) -> None:
    """An upstream connection was established after ``seconds``."""
    key = enum_label(via, VIAS)
    child = _connect.get(key)
    if child is None:
        child = _connect[key] = UPSTREAM_CONNECT_DURATION.labels(key)
    _pending.observe(child, _CONNECT_BOUNDS, seconds)


def upstream_error(via: str, error: str) -> None:
    key = (enum_label(via, VIAS), enum_label(error, CONNECT_ERRORS))
    child = _connect_errors.get(key)
    if child is None:
        child = _connect_errors[key] = UPSTREAM_CONNECT_ERRORS.labels(*key)
    child.inc()


def tls_handshake(tier: str, side: str, result: str) -> None:
    key = (enum_label(tier, TIERS), enum_label(side, TLS_SIDES), enum_label(result, TLS_RESULTS))
    child = _handshakes.get(key)
    if child is None:
        child = _handshakes[key] = TLS_HANDSHAKES.labels(*key)
    child.inc()


def audit_event(event: str, count: int = 1) -> None:
    key = enum_label(event, AUDIT_EVENTS)
    child = _audit.get(key)
    if child is None:
        child = _audit[key] = AUDIT_EVENTS_TOTAL.labels(key)
    child.inc(count)


def audit_dropped(event: str) -> None:
    key = enum_label(event, AUDIT_EVENTS)
    child = _audit_dropped.get(key)
    if child is None:
        child = _audit_dropped[key] = AUDIT_DROPPED.labels(key)
    child.inc()


def set_tier_streams(count: int) -> None:
    TIER_STREAMS_ACTIVE.set(count)


def stream_opened() -> None:
    TIER_STREAMS_ACTIVE.inc()


def stream_closed() -> None:
    TIER_STREAMS_ACTIVE.dec()


def failover() -> None:
    TIER_FAILOVERS.inc()


# ---------------------------------------------------------------------------------------
# State setters: called on lifecycle events, not per connection.


def init(tier: str) -> None:
    """Create the zero-valued series operators alert on, so ``rate()`` and
    ``== 0`` checks work before the first event: readiness, draining, reload results,
    audit events and drops, timeouts and limits for ``tier``."""
    t = enum_label(tier, TIERS)
    READY.labels(t).set(0)
    DRAINING.labels(t).set(0)
    for result in RELOAD_RESULTS:
        CONFIG_RELOADS.labels(t, result)
    for kind in TIMEOUT_KINDS:
        TIMEOUTS.labels(t, kind)
    for limit in LIMITS:
        LIMITS_REJECTED.labels(t, limit)
    for event in AUDIT_EVENTS:
        AUDIT_EVENTS_TOTAL.labels(event)
        AUDIT_DROPPED.labels(event)


def set_ready(tier: str, ready: bool) -> None:
    READY.labels(enum_label(tier, TIERS)).set(1 if ready else 0)


def set_draining(tier: str, draining: bool) -> None:
    DRAINING.labels(enum_label(tier, TIERS)).set(1 if draining else 0)


_policy_versions: dict[str, str] = {}
_policy_lock = threading.Lock()


def set_policy(tier: str, version: str, rules: int | None = None) -> None:
    """Publish the loaded policy's version (the previous series of ``tier`` is removed,
    so exactly one remains) and, if given, its rule count."""
    t = enum_label(tier, TIERS)
    v = version if version.isprintable() and len(version) <= 128 else OVERFLOW
    with _policy_lock:
        old = _policy_versions.get(t)
        if old is not None and old != v:
            if MULTIPROCESS:  # series cannot be removed there: 0 is dropped by render_merged
                POLICY_INFO.labels(t, old).set(0)
            else:
                POLICY_INFO.remove(t, old)
        POLICY_INFO.labels(t, v).set(1)
        _policy_versions[t] = v
    if rules is not None:
        POLICY_RULES.labels(t).set(rules)


def config_reload(tier: str, ok: bool) -> None:
    """Count one configuration load; a success also stamps the last-success time."""
    t = enum_label(tier, TIERS)
    CONFIG_RELOADS.labels(t, "success" if ok else "error").inc()
    if ok:
        CONFIG_LAST_RELOAD_SUCCESS.labels(t).set(time.time())


def set_tier_links(up: int, connecting: int, down: int) -> None:
    """Publish the sidecar's tier-link session counts by state."""
    TIER_LINKS.labels("up").set(up)
    TIER_LINKS.labels("connecting").set(connecting)
    TIER_LINKS.labels("down").set(down)


def cert_expiry(tier: str, cert: str, path_or_pem: str | bytes | os.PathLike[str]) -> float:
    """Set the expiry gauge of a certificate file and return its value.

    ``path_or_pem`` is a file path, or PEM text (``str`` starting with ``-----BEGIN`` or
    ``bytes``). When it holds several certificates (a chain or a CA bundle) the earliest
    ``not_valid_after`` is used: that is when something stops working. Raises
    :class:`ConfigError` when nothing can be read."""
    data = _pem_bytes(path_or_pem)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{_describe(path_or_pem)}: no PEM certificate ({exc})") from None
    expiry = min(c.not_valid_after_utc.timestamp() for c in certs)
    CERT_EXPIRY.labels(enum_label(tier, TIERS), enum_label(cert, CERT_KINDS)).set(expiry)
    return expiry


def _pem_bytes(path_or_pem: str | bytes | os.PathLike[str]) -> bytes:
    if isinstance(path_or_pem, bytes):
        return path_or_pem
    if isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith("-----BEGIN"):
        return path_or_pem.encode("ascii", "replace")
    try:
        return Path(path_or_pem).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"certificate file {_describe(path_or_pem)}: {exc.strerror or exc}"
        ) from None


def _describe(path_or_pem: str | bytes | os.PathLike[str]) -> str:
    if isinstance(path_or_pem, bytes) or str(path_or_pem).lstrip().startswith("-----BEGIN"):
        return "PEM data"
    return repr(os.fspath(path_or_pem))
