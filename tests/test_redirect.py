"""Issue 5, parts 1, 2 and 5: the redirect listener, name recovery, the original
destination carried to the DMZ and checked there.

Unit tests (no root): the ``SO_ORIGINAL_DST`` structures, sniffing, node parsing, the
policy knob ``orig_dst_check`` and its judgement. Namespace tests (root): an app
namespace whose nat OUTPUT redirects to ``-L redirect://`` running beside the app, which
recovers the name from SNI/Host and dials directly or through a DMZ over the h2 tier
link; IPv4, IPv6, the service ``bypass=`` judged on the recovered name, and the source
article's initContainer rules applied by hand.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from pyegress.config.nodes import parse_node
from pyegress.errors import ConfigError
from pyegress.listeners.redirect import examine
from pyegress.policy.enforce import PolicyDenied, judge
from pyegress.policy.loader import parse_policy
from pyegress.transparent.origdst import (
    NotRedirected,
    original_dst,
    parse_sockaddr_in,
    parse_sockaddr_in6,
)
from tests.conftest import TierCerts
from tests.support import hellos
from tests.support.appns import (
    APP_GW,
    ARTICLE_RULES,
    ARTICLE_UNDO,
    AppNamespace,
    Sidecar,
    redirect_rules,
)
from tests.support.audit_schema import check_records
from tests.support.netns import FakeInternet, NetnsPyegress, get, unavailable

# -- unit: original destination ---------------------------------------------------------


def test_sockaddr_in_port_is_big_endian() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 443) + bytes([1, 1, 1, 1])
    found = parse_sockaddr_in(raw + b"\0" * 8)
    assert (str(found.address), found.port, str(found)) == ("1.1.1.1", 443, "1.1.1.1:443")


def test_sockaddr_in6_and_mapped() -> None:
    address = ipaddress.IPv6Address("2606:4700::1111")
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 8443, 0) + address.packed
    found = parse_sockaddr_in6(raw + b"\0" * 4)
    assert str(found) == "[2606:4700::1111]:8443"
    mapped = ipaddress.IPv6Address("::ffff:93.184.216.34").packed
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 80, 0) + mapped
    assert str(parse_sockaddr_in6(raw + b"\0" * 4)) == "93.184.216.34:80"


def test_a_connection_that_was_not_redirected_is_refused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        with pytest.raises(NotRedirected):
            original_dst(accepted)
        # TPROXY: the local address is the original destination.
        assert original_dst(accepted, tproxy=True).port == listener.getsockname()[1]
    finally:
        for sock in (accepted, client, listener):
            sock.close()


# -- unit: sniffing ---------------------------------------------------------------------


def test_sniff_sni_host_and_raw() -> None:
    hello = hellos.client_hello("allowed.example")
    seen = examine(hello)
    assert seen is not None
    assert (seen.kind, seen.name, seen.source) == (
        "tls",
        "allowed.example",
        "sni",
    )
    assert examine(hello[:20]) is None  # incomplete: wait
    seen = examine(b"GET / HTTP/1.1\r\nHost: allowed.example:8080\r\n\r\n")
    assert seen is not None
    assert (seen.name, seen.source) == ("allowed.example", "host")
    assert examine(b"GET / HTTP/1.1\r\nHost: allowed") is None
    assert examine(b"GE") is None
    seen = examine(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert seen is not None
    assert (seen.kind, seen.name) == ("other", None)
    # An IP literal names nothing new; a literal SNI neither.
    seen = examine(b"GET / HTTP/1.1\r\nHost: 1.1.1.1\r\n\r\n")
    assert seen is not None
    assert seen.name is None
    seen = examine(hellos.client_hello(None))
    assert seen is not None
    assert (seen.kind, seen.name) == ("tls", None)


# -- unit: nodes and policy -------------------------------------------------------------


def test_redirect_schemes_and_params() -> None:
    for scheme in ("redirect", "red", "redir"):
        node = parse_node(f"{scheme}://:15001?sniffing=false&tproxy=true", "listen")
        assert (node.kind, node.transport, node.port) == ("redirect", "redirect", 15001)
        assert node.flag("sniffing", True) is False
        assert node.flag("tproxy") is True
        assert not node.unknown_params
    node = parse_node("redirect://:15001?sniffing.timeout=300ms", "listen")
    assert node.duration("sniffing_timeout", 1.0) == pytest.approx(0.3)
    node = parse_node(
        "dns://127.0.0.1:5353?range=198.18.0.0/15&range6=fc00:ffff::/96"
        "&forward=10.96.0.10:53&suffix=cluster.local,svc.local&ttl=10s&keep=5m&size=100",
        "listen",
    )
    assert (node.kind, node.transport) == ("dns", "dns")
    assert node.param("upstream") == "10.96.0.10:53"
    assert not node.unknown_params


def test_udp_redirect_is_refused_with_a_reason() -> None:
    for url in ("redu://:15001", "redirect+udp://:15001"):
        with pytest.raises(ConfigError, match="UDP is not redirected"):
            parse_node(url, "listen")


def test_orig_dst_check_knob() -> None:
    base = "version: 1\nrules: []\n"
    assert parse_policy(base).orig_dst_check == "route_by_name"
    assert parse_policy(base + "orig_dst_check: strict\n").orig_dst_check == "strict"
    assert parse_policy(base + "transparent:\n  orig_dst_check: log\n").orig_dst_check == "log"
    with pytest.raises(ConfigError, match="orig_dst_check"):
        parse_policy(base + "orig_dst_check: loose\n")
    with pytest.raises(ConfigError, match="twice"):
        parse_policy(base + "orig_dst_check: log\ntransparent:\n  orig_dst_check: strict\n")


def _judge(mode: str, orig: str | None) -> tuple[dict[str, Any], Any]:
    policy = parse_policy(
        f"version: 1\nrules:\n  - id: web\n    allow: [cdn.example]\norig_dst_check: {mode}\n"
    )
    record: dict[str, Any] = {}
    answers = (ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("2606:4700::1111"))

    async def go() -> Any:
        return await judge(
            policy,
            record,
            None,
            "cdn.example",
            443,
            dns_timeout=1,
            self_endpoints=(),
            have_proxy=False,
            answers=answers,
            orig_dst=orig,
        )

    try:
        return record, asyncio.run(go())
    except PolicyDenied as exc:
        return record, exc


def test_judge_orig_dst_strict_log_and_route_by_name() -> None:
    record, route = _judge("strict", "1.1.1.1:443")
    assert route.host == "1.1.1.1"
    assert record["dns"]["orig_dst_match"] is True
    record, route = _judge("strict", "[::ffff:1.1.1.1]:443")  # mapped spelling matches
    assert record["dns"]["orig_dst_match"] is True
    record, denied = _judge("strict", "93.184.216.34:443")
    assert isinstance(denied, PolicyDenied)
    assert record["decision"]["reason"] == "orig_dst_mismatch"
    record, route = _judge("log", "93.184.216.34:443")
    assert route.host == "1.1.1.1"
    assert record["decision"]["action"] == "report"
    assert record["decision"]["would_deny"]
    assert record["decision"]["reason"] == "orig_dst_mismatch"
    record, route = _judge("route_by_name", "93.184.216.34:443")
    assert route.host == "1.1.1.1"
    assert record["decision"]["reason"] == "rule_match"
    assert record["dns"]["orig_dst_match"] is False
    record, route = _judge("strict", None)  # not a transparent tunnel: nothing to check
    assert "orig_dst_match" not in record["dns"]


# -- namespaces -------------------------------------------------------------------------

_WHY = unavailable()
root = [pytest.mark.root, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]

TIER_PORT = 8443
DMZ_SIDECAR = 15001  # the article's port
DIRECT_SIDECAR = 15002
BYPASS_SIDECAR = 15003
WORKERS_SIDECAR = 15004  # the direct sidecar with --workers 2 (SO_REUSEPORT)

POLICY = """\
version: 1
default: deny
rules:
  - id: web
    allow: [allowed.example, .ok.example]
    ports: [80, 443]
  - id: raw
    allow: ["1.1.1.1", "2606:4700::1111"]
    ports: [7000]
    protocol: tcp
"""
ZONE = {
    "allowed.example": {"A": ["1.1.1.1"], "AAAA": ["2606:4700::1111"]},
    "denied.example": {"A": ["1.1.1.1"]},
    "other.example": {"A": ["1.1.1.1"]},
    "www.ok.example": {"A": ["93.184.216.34"]},
}


class World:
    def __init__(
        self,
        net: FakeInternet,
        app: AppNamespace,
        ca: Path,
        dmz: NetnsPyegress,
        via_dmz: Sidecar,
        direct: Sidecar,
        bypass: Sidecar,
        workers: Sidecar,
    ) -> None:
        self.net, self.app, self.ca, self.dmz = net, app, ca, dmz
        self.via_dmz, self.direct, self.bypass = via_dmz, direct, bypass
        self.workers = workers

    def curl(self, url: str, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
        """curl in the app namespace, no proxy: (exit code, JSON body, stderr)."""
        done = self.app.exec(
            "curl", "-q", "-sS", "-m", "10", "--cacert", str(self.ca), *extra, url, timeout=30
        )
        body = None
        if done.returncode == 0:
            try:
                body = json.loads(done.stdout)
            except ValueError:
                body = None
        return done.returncode, body, done.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[World]:
    if _WHY is not None:
        pytest.skip(_WHY)
    workdir = tmp_path_factory.mktemp("redirect")
    cert = ca.issue_cert("allowed.example", "denied.example", "other.example", "*.ok.example")
    cert_path, key_path, ca_path = workdir / "o.pem", workdir / "o.key", workdir / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    certs_dir = workdir / "certs"
    certs_dir.mkdir()
    tier = TierCerts(certs_dir)
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    with FakeInternet(workdir) as net:
        net.set_zone(ZONE)
        net.start_origins(cert_path, key_path)
        dmz = net.start_dmz(
            ["-L", f"h2://:{TIER_PORT}?{tier.dmz_params()}", "-C", str(policy)], TIER_PORT
        )
        with AppNamespace(net, workdir) as app:
            hop = f"h2://{APP_GW}:{TIER_PORT}?{tier.sidecar_params()}"
            via_dmz = app.sidecar(["-L", f"redirect://:{DMZ_SIDECAR}", "-F", hop])
            direct = app.sidecar(["-L", f"redirect://:{DIRECT_SIDECAR}"])
            bypass = app.sidecar(
                ["-L", f"redirect://:{BYPASS_SIDECAR}?bypass=~allowed.example,.ok.example"]
            )
            workers = app.sidecar(["-L", f"redirect://:{WORKERS_SIDECAR}", "--workers", "2"])
            yield World(net, app, ca_path, dmz, via_dmz, direct, bypass, workers)


def _schema_ok(*procs: NetnsPyegress) -> None:
    for proc in procs:
        records = [r for r in proc.records_since(0) if r.get("schema")]
        assert check_records(records) == []


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.root
def test_direct_sni_and_host_recovered(world: World, family: str, workers: int) -> None:
    port = DIRECT_SIDECAR if workers == 1 else WORKERS_SIDECAR
    rules, undo = redirect_rules(port, [80, 443], family)
    flag = "-4" if family == "ipv4" else "-6"
    orig_ip = "1.1.1.1" if family == "ipv4" else "[2606:4700::1111]"
    side = world.direct if workers == 1 else world.workers
    with world.app.rules(rules, undo):
        mark = side.mark()
        code, body, err = world.curl("https://allowed.example/", flag)
        assert code == 0, err
        assert body is not None
        assert body["sni"] == "allowed.example"
        decision, close = side.audit(mark, "allowed.example", 443)
        assert get(decision, "orig_dst") == f"{orig_ip}:443"
        assert get(decision, "mode") == "transparent"
        assert get(decision, "requested.name_source") == "sni"
        assert get(decision, "tls.sni") == "allowed.example"
        assert get(close, "result.close_reason") in ("eof", "client_reset")  # curl's choice
        assert get(close, "bytes.to_client") > 0
        mark = side.mark()
        code, body, err = world.curl("http://allowed.example/x", flag)
        assert code == 0, err
        assert body is not None
        assert body["host"] == "allowed.example"
        decision, _ = side.audit(mark, "allowed.example", 80)
        assert get(decision, "requested.name_source") == "host"
        assert get(decision, "orig_dst") == f"{orig_ip}:80"
    _schema_ok(side)


@pytest.mark.root
def test_bypass_is_judged_on_the_recovered_name(world: World) -> None:
    """gost's regression: an allowlist checked on the IP before sniffing. Here the
    name behind 1.1.1.1 decides: allowed.example passes, other.example does not."""
    rules, undo = redirect_rules(BYPASS_SIDECAR, [443])
    side = world.bypass
    with world.app.rules(rules, undo):
        mark = side.mark()
        code, _body, err = world.curl("https://allowed.example/")
        assert code == 0, err
        decision, _ = side.audit(mark, "allowed.example", 443)
        assert get(decision, "decision.action") == "allow"
        mark = side.mark()
        code, _, _ = world.curl("https://other.example/")
        assert code != 0
        decision, close = side.audit(mark, "other.example", 443)
        assert get(decision, "decision.reason") == "bypass"
        assert get(decision, "orig_dst") == "1.1.1.1:443"
        assert get(close, "result.close_reason") == "denied"


def _via_dmz_checks(world: World, family: str = "ipv4") -> None:
    side, dmz = world.via_dmz, world.dmz
    flag = "-4" if family == "ipv4" else "-6"
    orig_ip = "1.1.1.1" if family == "ipv4" else "[2606:4700::1111]"
    mark, dmark = side.mark(), dmz.mark()
    code, body, err = world.curl("https://allowed.example/", flag)
    assert code == 0, err
    assert body is not None
    assert body["sni"] == "allowed.example"
    decision, _ = side.audit(mark, "allowed.example", 443)
    ddecision, dclose = dmz.audit(dmark, "allowed.example", 443)
    assert get(decision, "conn_id") == get(ddecision, "conn_id")
    for record in (decision, ddecision):
        assert get(record, "orig_dst") == f"{orig_ip}:443"
        assert get(record, "requested.name_source") == "sni"
    assert get(decision, "tier") == "sidecar"
    assert get(ddecision, "tier") == "dmz"
    assert get(ddecision, "decision.reason") == "rule_match"
    assert get(ddecision, "dns.orig_dst_match") is True
    assert get(dclose, "result.close_reason") in ("eof", "client_reset")
    # Plain HTTP: the Host header names it.
    mark, dmark = side.mark(), dmz.mark()
    code, body, err = world.curl("http://www.ok.example/", flag if family == "ipv4" else "-4")
    assert code == 0, err
    ddecision, _ = dmz.audit(dmark, "www.ok.example", 80)
    assert get(ddecision, "requested.name_source") == "host"
    assert get(ddecision, "orig_dst") == "93.184.216.34:80"
    # Denied by name: the client fails, both tiers record host, orig_dst and reason.
    mark, dmark = side.mark(), dmz.mark()
    code, _, _ = world.curl("https://denied.example/", "-4")
    assert code != 0
    ddecision, dclose = dmz.audit(dmark, "denied.example", 443)
    assert get(ddecision, "decision.reason") == "not_in_allowlist"
    assert get(ddecision, "orig_dst") == "1.1.1.1:443"
    decision, close = side.audit(mark, "denied.example", 443)
    assert get(close, "result.close_reason") == "hop_refused"
    assert get(decision, "orig_dst") == "1.1.1.1:443"


@pytest.mark.root
def test_via_dmz_names_are_judged_at_the_dmz(world: World) -> None:
    rules, undo = redirect_rules(DMZ_SIDECAR, [80, 443, 7000, 7001])
    with world.app.rules(rules, undo):
        _via_dmz_checks(world)
        # Raw TCP: no name, judged by IP and port.
        dmark = world.dmz.mark()
        done = world.app.exec(
            "python3", "-c",
            "import socket;s=socket.create_connection(('1.1.1.1',7000),5);"
            "s.sendall(b'hello raw\\n');print(s.recv(100).decode().strip())",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "hello raw"
        ddecision, _ = world.dmz.audit(dmark, "1.1.1.1", 7000)
        assert get(ddecision, "requested.name_source") == "orig_dst"
        assert get(ddecision, "decision.rule_id") == "raw"
        dmark = world.dmz.mark()
        done = world.app.exec(
            "python3", "-c",
            "import socket;s=socket.create_connection(('1.1.1.1',7001),5);"
            "s.sendall(b'SSH-2.0-test\\r\\n');print(repr(s.recv(100)))",
        )  # fmt: skip
        assert "hello" not in done.stdout
        ddecision, _ = world.dmz.audit(dmark, "1.1.1.1", 7001)
        assert get(ddecision, "decision.reason") == "port_not_allowed"
    _schema_ok(world.via_dmz, world.dmz)


@pytest.mark.root
def test_ipv6_via_dmz(world: World) -> None:
    rules, undo = redirect_rules(DMZ_SIDECAR, [80, 443])
    rules6, undo6 = redirect_rules(DMZ_SIDECAR, [443], "ipv6")
    with world.app.rules(rules + rules6, undo6 + undo):
        _via_dmz_checks(world, "ipv6")


@pytest.mark.root
def test_the_articles_init_container_rules(world: World) -> None:
    """The source article's iptables example, applied by hand, with -L redirect://:15001
    and -F h2://<dmz> (the sidecar's link to 10.x is excluded by its 10/8 RETURN)."""
    with world.app.rules(ARTICLE_RULES, ARTICLE_UNDO):
        _via_dmz_checks(world)
