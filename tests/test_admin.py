"""The admin listener, the metric set and ``pyegress healthcheck``, over real sockets.

The admin server runs in-process on an ephemeral loopback port; blocking clients
(``http.client``, raw sockets, ``healthcheck.main``) run in threads so the loop that
serves them stays free. Metrics live on the process-wide default registry, so tests
compare values before and after instead of assuming a fresh registry.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import platform
import random
import socket
import string
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

import pyegress
from pyegress import healthcheck
from pyegress.errors import ConfigError
from pyegress.observe import metrics
from pyegress.observe.admin import MAX_HEAD_BYTES, parse_admin_address, start_admin
from tests.support.ports import free_port

# Exposed family name -> type, exactly as egress-anchors 5.2 lists them.
FAMILIES = {
    "pyegress_build_info": "gauge",
    "pyegress_ready": "gauge",
    "pyegress_draining": "gauge",
    "pyegress_policy_info": "gauge",
    "pyegress_policy_rules": "gauge",
    "pyegress_config_reloads_total": "counter",
    "pyegress_config_last_reload_success_timestamp_seconds": "gauge",
    "pyegress_connections_accepted_total": "counter",
    "pyegress_connections_active": "gauge",
    "pyegress_decisions_total": "counter",
    "pyegress_resolver_lookups_total": "counter",
    "pyegress_resolver_duration_seconds": "histogram",
    "pyegress_resolved_address_denied_total": "counter",
    "pyegress_upstream_connect_duration_seconds": "histogram",
    "pyegress_upstream_connect_errors_total": "counter",
    "pyegress_tunnel_bytes_total": "counter",
    "pyegress_connection_duration_seconds": "histogram",
    "pyegress_timeouts_total": "counter",
    "pyegress_limits_rejected_total": "counter",
    "pyegress_tls_handshakes_total": "counter",
    "pyegress_cert_expiry_timestamp_seconds": "gauge",
    "pyegress_tier_links": "gauge",
    "pyegress_tier_streams_active": "gauge",
    "pyegress_tier_failovers_total": "counter",
    "pyegress_audit_events_total": "counter",
    "pyegress_audit_dropped_total": "counter",
}
LABELS = {
    "pyegress_build_info": {"version", "python"},
    "pyegress_policy_info": {"tier", "policy_version"},
    "pyegress_decisions_total": {"tier", "mode", "decision", "reason", "rule", "identity_class"},
    "pyegress_connection_duration_seconds": {"tier", "mode", "close_reason"},
    "pyegress_tunnel_bytes_total": {"tier", "direction"},
    "pyegress_tls_handshakes_total": {"tier", "side", "result"},
}


@dataclass
class Readiness:
    ready: bool = True
    reason: str = ""

    def __call__(self) -> tuple[bool, str]:
        return self.ready, self.reason


@dataclass
class Admin:
    port: int
    readiness: Readiness

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    readiness = Readiness()
    server = await start_admin("127.0.0.1", 0, readiness, request_timeout=0.5)
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield Admin(port, readiness)
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _get(port: int, path: str, method: str = "GET") -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return Reply(resp.status, headers, body)
    finally:
        conn.close()


def _raw(port: int, data: bytes, *, pause: float = 0.0) -> bytes:
    """Send ``data`` (optionally wait first), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if pause:
            time.sleep(pause)
        if data:
            sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def get(port: int, path: str, method: str = "GET") -> Reply:
    return await asyncio.to_thread(_get, port, path, method)


async def raw(port: int, data: bytes, *, pause: float = 0.0) -> bytes:
    return await asyncio.to_thread(_raw, port, data, pause=pause)


def parse_raw(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def sample(body: bytes, name: str, **labels: str) -> float:
    """The value of one exposed sample, 0 when absent."""
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def label_values(body: bytes, name: str, label: str) -> set[str]:
    values = set()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name:
                values.add(s.labels[label])
    return values


# --- routes -----------------------------------------------------------------------------


async def test_livez(admin: Admin) -> None:
    reply = await get(admin.port, "/livez")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert reply.headers["content-length"] == "3"
    assert reply.headers["connection"] == "close"


async def test_metrics_exposes_the_whole_set(admin: Admin) -> None:
    reply = await get(admin.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(reply.headers["content-length"]) == len(reply.body)
    text = reply.body.decode()
    for name, kind in FAMILIES.items():
        assert f"# TYPE {name} {kind}\n" in text
    assert "process_cpu_seconds_total" in text
    assert "python_gc_objects_collected_total" in text
    assert "_created" not in text
    build = {"version": pyegress.__version__, "python": platform.python_version()}
    assert sample(reply.body, "pyegress_build_info", **build) == 1.0


def test_metric_label_names() -> None:
    metrics.decision("dmz", "connect", "allow", "rule_match", "r", "c")
    metrics.tunnel_opened("dmz", "connect")
    metrics.tunnel_closed("dmz", "connect", "client_fin", 1.0)
    metrics.add_bytes("dmz", 1, 1)
    metrics.tls_handshake("dmz", "peer", "ok")
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        expected = LABELS.get(family.name) or LABELS.get(family.name + "_total")
        if expected is None:
            continue
        for s in family.samples:
            assert set(s.labels) - {"le"} == expected, s


async def test_head_metrics_has_length_and_no_body(admin: Admin) -> None:
    response = await raw(admin.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse_raw(response)
    assert status == 200
    assert int(headers["content-length"]) > 1000
    assert body == b""


async def test_metrics_move_with_the_helpers(admin: Admin) -> None:
    decision = {
        "tier": "dmz",
        "mode": "connect",
        "decision": "deny",
        "reason": "global_deny",
        "rule": metrics.RULE_LABEL("deny-metadata"),
        "identity_class": metrics.IDENTITY_CLASS_LABEL("ns-pay"),
    }
    before = (await get(admin.port, "/metrics")).body
    metrics.decision("dmz", "connect", "deny", "global_deny", "deny-metadata", "ns-pay")
    metrics.decision("dmz", "connect", "deny", "global_deny", "deny-metadata", "ns-pay")
    metrics.tunnel_opened("sidecar", "socks5")
    metrics.add_bytes("sidecar", 100, 2000)
    metrics.resolver_lookup("nxdomain", 0.02)
    metrics.address_denied("metadata")
    metrics.upstream_connect("direct", 0.01)
    metrics.upstream_error("proxy", "proxy_407")
    metrics.timeout("dmz", "idle")
    metrics.limit_rejected("dmz", "rate")
    metrics.audit_event("close")
    metrics.audit_dropped("close")
    metrics.failover()
    metrics.stream_opened()
    metrics.set_tier_links(2, 1, 0)
    after = (await get(admin.port, "/metrics")).body

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("pyegress_decisions_total", **decision) == 2
    assert delta("pyegress_connections_accepted_total", tier="sidecar", mode="socks5") == 1
    assert delta("pyegress_connections_active", tier="sidecar", mode="socks5") == 1
    assert delta("pyegress_tunnel_bytes_total", tier="sidecar", direction="from_client") == 100
    assert delta("pyegress_tunnel_bytes_total", tier="sidecar", direction="to_client") == 2000
    assert delta("pyegress_resolver_lookups_total", result="nxdomain") == 1
    assert delta("pyegress_resolver_duration_seconds_count") == 1
    assert delta("pyegress_resolved_address_denied_total", **{"class": "metadata"}) == 1
    assert delta("pyegress_upstream_connect_duration_seconds_count", via="direct") == 1
    assert delta("pyegress_upstream_connect_errors_total", via="proxy", error="proxy_407") == 1
    assert delta("pyegress_timeouts_total", tier="dmz", kind="idle") == 1
    assert delta("pyegress_limits_rejected_total", tier="dmz", limit="rate") == 1
    assert delta("pyegress_audit_events_total", event="close") == 1
    assert delta("pyegress_audit_dropped_total", event="close") == 1
    assert delta("pyegress_tier_failovers_total") == 1
    assert delta("pyegress_tier_streams_active") == 1
    assert sample(after, "pyegress_tier_links", state="up") == 2

    metrics.tunnel_closed("sidecar", "socks5", "client_fin", 3.0)
    metrics.stream_closed()
    closed = (await get(admin.port, "/metrics")).body
    assert sample(closed, "pyegress_connections_active", tier="sidecar", mode="socks5") == sample(
        before, "pyegress_connections_active", tier="sidecar", mode="socks5"
    )
    labels = {"tier": "sidecar", "mode": "socks5", "close_reason": "client_fin"}
    assert (
        sample(closed, "pyegress_connection_duration_seconds_count", **labels)
        - sample(before, "pyegress_connection_duration_seconds_count", **labels)
        == 1
    )


async def test_lifecycle_setters() -> None:
    metrics.init("proxy")
    body, _ = metrics.render()
    assert sample(body, "pyegress_ready", tier="proxy") == 0
    assert 'pyegress_audit_dropped_total{event="decision"} 0.0' in body.decode()
    assert 'pyegress_config_reloads_total{result="error",tier="proxy"} 0.0' in body.decode()

    metrics.set_ready("proxy", True)
    metrics.set_draining("proxy", True)
    metrics.set_policy("proxy", "sha256:aaa", rules=7)
    metrics.set_policy("proxy", "sha256:bbb", rules=9)
    before = time.time()
    metrics.config_reload("proxy", ok=True)
    metrics.config_reload("proxy", ok=False)
    body, _ = metrics.render()
    assert sample(body, "pyegress_ready", tier="proxy") == 1
    assert sample(body, "pyegress_draining", tier="proxy") == 1
    assert sample(body, "pyegress_policy_rules", tier="proxy") == 9
    versions = {
        s.labels["policy_version"]
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if s.name == "pyegress_policy_info" and s.labels["tier"] == "proxy"
    }
    assert versions == {"sha256:bbb"}
    stamp = sample(body, "pyegress_config_last_reload_success_timestamp_seconds", tier="proxy")
    assert before - 1 <= stamp <= time.time() + 1
    assert sample(body, "pyegress_config_reloads_total", tier="proxy", result="error") >= 1


async def test_decision_labels_are_capped() -> None:
    rng = random.Random(46)

    def word() -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=12))

    for _ in range(10_000):
        metrics.decision("sidecar", "http", "allow", "rule_match", word(), word())
    body, _ = metrics.render()
    name = "pyegress_decisions_total"
    rules = label_values(body, name, "rule")
    identities = label_values(body, name, "identity_class")
    assert len(rules) <= metrics.BOUNDED_LABEL_LIMIT + 1
    assert len(identities) <= metrics.BOUNDED_LABEL_LIMIT + 1
    assert metrics.OVERFLOW in rules
    assert metrics.OVERFLOW in identities
    assert len(metrics.RULE_LABEL) == metrics.BOUNDED_LABEL_LIMIT


def test_bounded_label() -> None:
    label = metrics.BoundedLabel("t", limit=2)
    assert [label("a"), label("b"), label("c"), label("a"), label(None)] == [
        "a",
        "b",
        "_other",
        "a",
        "",
    ]
    assert label("x" * 500) == "_other"
    assert label("tab\there") == "_other"
    assert len(label) == 2


async def test_unknown_enum_values_become_other() -> None:
    hostile = 'evil"} 1\n# injected'
    metrics.decision(hostile, hostile, hostile, hostile, "r-ok", "c-ok")
    metrics.tunnel_opened("dmz", hostile)
    metrics.tunnel_closed("dmz", hostile, hostile, 0.5)
    metrics.timeout("dmz", hostile)
    metrics.upstream_error(hostile, hostile)
    body, _ = metrics.render()
    assert b"evil" not in body
    assert b"injected" not in body
    other = metrics.OTHER
    assert (
        sample(
            body,
            "pyegress_decisions_total",
            tier=other,
            mode=other,
            decision=other,
            reason=other,
            rule=metrics.RULE_LABEL("r-ok"),
            identity_class=metrics.IDENTITY_CLASS_LABEL("c-ok"),
        )
        >= 1
    )
    assert (
        sample(
            body,
            "pyegress_connection_duration_seconds_count",
            tier="dmz",
            mode=other,
            close_reason=other,
        )
        >= 1
    )
    assert sample(body, "pyegress_timeouts_total", tier="dmz", kind=other) >= 1
    assert sample(body, "pyegress_upstream_connect_errors_total", via=other, error=other) >= 1


def test_enum_sets_are_documented() -> None:
    assert "rule_match" in metrics.REASONS
    assert "bypass" in metrics.REASONS
    assert len(metrics.REASONS) == 42  # 34 + one resolved_<class> per further table class
    assert len(metrics.CLOSE_REASONS) == 28
    assert {
        "connect",
        "socks5",
        "socks4",
        "http",
        "forward",
        "sni",
        "h2",
        "transparent",
    } == metrics.MODES
    assert {"sidecar", "dmz", "proxy"} == metrics.TIERS


def test_cert_expiry(ca: trustme.CA, tmp_path: Path) -> None:
    pem = ca.cert_pem.bytes()
    want = x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    path = tmp_path / "ca.pem"
    path.write_bytes(pem)
    assert metrics.cert_expiry("dmz", "ca", path) == want
    assert metrics.cert_expiry("dmz", "ca", str(path)) == want
    assert metrics.cert_expiry("dmz", "ca", pem.decode()) == want
    assert metrics.cert_expiry("dmz", "ca", pem) == want
    body, _ = metrics.render()
    assert sample(body, "pyegress_cert_expiry_timestamp_seconds", tier="dmz", cert="ca") == want

    leaf = ca.issue_cert("dmz.test")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    earliest = min(
        c.not_valid_after_utc.timestamp() for c in x509.load_pem_x509_certificates(chain)
    )
    assert metrics.cert_expiry("dmz", "server", chain) == earliest

    with pytest.raises(ConfigError, match=r"missing\.pem"):
        metrics.cert_expiry("dmz", "ca", tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        metrics.cert_expiry("dmz", "ca", tmp_path / "junk.pem")


async def test_readyz_follows_readiness(admin: Admin) -> None:
    reply = await get(admin.port, "/readyz")
    assert (reply.status, reply.body) == (200, b"ready\n")
    admin.readiness.ready, admin.readiness.reason = False, "draining"
    reply = await get(admin.port, "/readyz")
    assert (reply.status, reply.body) == (503, b"draining\n")
    admin.readiness.reason = "no tier link up"
    assert (await get(admin.port, "/readyz")).body == b"no tier link up\n"
    admin.readiness.reason = "two\nlines\r\n"
    assert (await get(admin.port, "/readyz")).body == b"two lines\n"
    admin.readiness.ready = True
    assert (await get(admin.port, "/readyz")).status == 200


async def test_readiness_that_raises_is_not_ready() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server = await start_admin("127.0.0.1", 0, broken)
    port = int(server.sockets[0].getsockname()[1])
    try:
        reply = await get(port, "/readyz")
        assert (reply.status, reply.body) == (503, b"readiness check failed\n")
    finally:
        server.close()
        await server.wait_closed()


async def test_unknown_path_is_404(admin: Admin) -> None:
    for path in ("/", "/metrics/", "/livez/x", "/READYZ", "/%2e%2e/metrics"):
        reply = await get(admin.port, path)
        assert reply.status == 404, path
        assert reply.headers["content-length"] == str(len(reply.body))
    assert (await get(admin.port, "/metrics?x=1")).status == 200


async def test_other_methods_are_405(admin: Admin) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        reply = await get(admin.port, "/metrics", method)
        assert reply.status == 405
        assert reply.headers["allow"] == "GET, HEAD"


async def test_never_proxies(admin: Admin) -> None:
    status, headers, _ = parse_raw(
        await raw(admin.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    )
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, _, _ = parse_raw(
        await raw(
            admin.port, b"GET http://example.com/metrics HTTP/1.1\r\nHost: example.com\r\n\r\n"
        )
    )
    assert status == 404


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET /livez\r\n\r\n",
        b"GET /livez HTTP/2.0\r\n\r\n",
        b"GET  /livez HTTP/1.1\r\n\r\n",
        b"GET /li\x00vez HTTP/1.1\r\n\r\n",
        b"G(T /livez HTTP/1.1\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /livez HTTP/1.1\r\n folded: x\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
    ],
)
async def test_bad_request_is_400(admin: Admin, request_bytes: bytes) -> None:
    status, headers, body = parse_raw(await raw(admin.port, request_bytes))
    assert status == 400
    assert headers["connection"] == "close"
    assert headers["content-length"] == str(len(body))


async def test_bare_lf_request_is_served(admin: Admin) -> None:
    status, _, body = parse_raw(await raw(admin.port, b"GET /livez HTTP/1.0\nHost: x\n\n"))
    assert (status, body) == (200, b"ok\n")


async def test_oversized_head_is_431(admin: Admin) -> None:
    big = b"GET /livez HTTP/1.1\r\nX-Filler: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    status, _, _ = parse_raw(await raw(admin.port, big))
    assert status == 431
    endless = b"GET /livez HTTP/1.1\r\n" + b"X: y\r\n" * 4000  # never ends its head
    status, _, _ = parse_raw(await raw(admin.port, endless))
    assert status == 431


async def test_slow_client_gets_408(admin: Admin) -> None:
    start = time.monotonic()
    status, _, _ = parse_raw(await raw(admin.port, b""))
    assert status == 408
    status, _, _ = parse_raw(await raw(admin.port, b"GET /livez HT"))
    assert status == 408
    assert time.monotonic() - start < 4  # request_timeout is 0.5 s in the fixture


async def test_eof_before_head_is_400(admin: Admin) -> None:
    def half_close() -> bytes:
        with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\n")
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(65536)

    response = await asyncio.to_thread(half_close)
    assert response.startswith(b"HTTP/1.1 400 ")


async def test_connection_cap() -> None:
    server = await start_admin("127.0.0.1", 0, Readiness(), max_connections=1)
    port = int(server.sockets[0].getsockname()[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            await asyncio.sleep(0.1)  # let the first connection's handler start
            try:
                response = await raw(port, b"GET /livez HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                response = b""  # closed unanswered; a reset if our bytes were unread
            assert response == b""
            idle.sendall(b"GET /livez HTTP/1.1\r\n\r\n")
            assert (await asyncio.to_thread(idle.recv, 65536)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.05)
        assert parse_raw(await raw(port, b"GET /livez HTTP/1.1\r\n\r\n"))[0] == 200
    finally:
        server.close()
        await server.wait_closed()


async def test_no_traceback_reaches_the_loop(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        for data in (b"\x00" * 100, b"GET / HTTP/1.1\r\n" + b"\r" * 9000, b"\r\n\r\n"):
            await raw(admin.port, data)
        with socket.create_connection(("127.0.0.1", admin.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
        await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await get(admin.port, "/livez")).status == 200


async def test_listens_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = await start_admin("::1", 0, Readiness())
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = int(server.sockets[0].getsockname()[1])
    try:

        def fetch() -> int:
            conn = http.client.HTTPConnection("::1", port, timeout=5)
            try:
                conn.request("GET", "/livez")
                return conn.getresponse().status
            finally:
                conn.close()

        assert await asyncio.to_thread(fetch) == 200
    finally:
        server.close()
        await server.wait_closed()


# --- address parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9000", (None, 9000)),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::]:0", ("::", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:9000", ("localhost", 9000)),
        ("admin.pod-1.svc:9100", ("admin.pod-1.svc", 9100)),
    ],
)
def test_parse_admin_address(text: str, expected: tuple[str | None, int]) -> None:
    assert parse_admin_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "9000",
        ":",
        ":http",
        ":-1",
        ":65536",
        ":\uff19\uff10\uff10\uff10",  # fullwidth digits
        "::1:9000",
        "[::1]",
        "[127.0.0.1]:9000",
        "[]:9000",
        "host name:9000",
        "-bad-:9000",
        ":9000\n",
        "evil\x1b[31m:9000",
    ],
)
def test_parse_admin_address_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_admin_address(text)
    message = str(info.value)
    assert repr(text) in message
    assert "\n" not in message


# --- healthcheck ------------------------------------------------------------------------


async def test_healthcheck_ok(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(healthcheck.main, ["--url", f"{admin.url}/readyz"])
    assert code == 0
    assert capsys.readouterr().err == ""


async def test_healthcheck_not_ready(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    admin.readiness.ready, admin.readiness.reason = False, "draining"
    url = f"{admin.url}/readyz"
    code = await asyncio.to_thread(healthcheck.main, ["--url", url, "--timeout", "2"])
    assert code == 1
    assert capsys.readouterr().err == f"pyegress healthcheck: {url}: 503 draining\n"


async def test_healthcheck_env_url(
    admin: Admin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(healthcheck.ENV_URL, f"{admin.url}/nope")
    assert await asyncio.to_thread(healthcheck.main, []) == 1
    assert capsys.readouterr().err.endswith("/nope: 404 not found\n")
    monkeypatch.setenv(healthcheck.ENV_URL, f"{admin.url}/livez")
    assert await asyncio.to_thread(healthcheck.main, []) == 0


def test_healthcheck_refused(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/readyz"
    assert healthcheck.main(["--url", url, "--timeout", "1"]) == 1
    assert capsys.readouterr().err == f"pyegress healthcheck: {url}: connection refused\n"


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def test_healthcheck_timeout(silent_listener: int, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{silent_listener}/readyz"
    start = time.monotonic()
    assert healthcheck.main(["--url", url, "--timeout", "0.3"]) == 1
    assert time.monotonic() - start < 3
    assert capsys.readouterr().err == f"pyegress healthcheck: {url}: timed out after 0.3s\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--url", "https://127.0.0.1:9000/readyz"],
        ["--url", "http://[::1/readyz"],
        ["--url", "http://127.0.0.1:99999/readyz"],
        ["--timeout", "0"],
        ["--timeout", "nan"],
        ["--bogus"],
    ],
)
def test_healthcheck_usage_errors_exit_1(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip()


async def test_published_durations_land_in_the_buckets_observe_picks(admin: Admin) -> None:
    """Per-tunnel counts wait as plain numbers until a scrape publishes them: the
    buckets, sum and count equal a prometheus Histogram fed the same values."""
    from prometheus_client import CollectorRegistry, Histogram

    bounds = metrics.CONNECTION_DURATION._upper_bounds[:-1]
    oracle = Histogram("oracle", "same buckets", buckets=bounds, registry=CollectorRegistry())
    labels = {"tier": "proxy", "mode": "forward", "close_reason": "idle_timeout"}
    before = (await get(admin.port, "/metrics")).body
    values = (0.0, 0.1, 0.1000001, 0.7, 5.0, 86400.0, 86400.5, 10**7)
    for seconds in values:
        metrics.tunnel_opened("proxy", "forward")
        metrics.tunnel_closed("proxy", "forward", "idle_timeout", seconds)
        oracle.observe(seconds)
    after = (await get(admin.port, "/metrics")).body

    def delta(name: str, **extra: str) -> float:
        return sample(after, name, **labels, **extra) - sample(before, name, **labels, **extra)

    (family,) = oracle.collect()
    expected = {s.labels.get("le"): s.value for s in family.samples}
    for bound in [*bounds, float("inf")]:
        le = "+Inf" if bound == float("inf") else str(float(bound))
        got = delta("pyegress_connection_duration_seconds_bucket", le=le)
        assert got == expected[le], le
    assert delta("pyegress_connection_duration_seconds_count") == len(values)
    assert delta("pyegress_connection_duration_seconds_sum") == pytest.approx(sum(values))
    active = {"tier": "proxy", "mode": "forward"}
    assert sample(after, "pyegress_connections_active", **active) == sample(
        before, "pyegress_connections_active", **active
    )
