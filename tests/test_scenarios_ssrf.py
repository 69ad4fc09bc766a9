"""Issue 4, "What must be shown": SSRF, DNS, corporate proxy and fault scenarios
(egress-anchors 2.6, scenarios 8, 10-14, 26-29) on a fake internet built from real parts.

One :class:`FakeInternet` per module: a DMZ namespace running pyegress with a policy,
an "internet" namespace with public-looking addresses, HTTP/TLS/TCP origins, a DNS stub
whose answers each test sets, and squid as the corporate proxy at 10.99.0.1:3128. The
test client sits in the root namespace and talks to the DMZ over a veth pair. Every test
checks what the client saw and the DMZ's ``decision`` and ``close`` audit records
(docs/audit.md).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import PyegressFactory, TierCerts
from tests.support import curl
from tests.support.audit_schema import CLOSE_REASONS, DECISION_REASONS
from tests.support.clients import http_connect, recv_all
from tests.support.netns import FakeInternet, NetnsPyegress, Squid, get, unavailable

_WHY = unavailable()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]

DMZ_PORT = 8080  # the DMZ namespace is ours: fixed ports cannot clash
DEAD_PROXY_DMZ_PORT = 8081
TIER_PORT = 8443
PROXY_USER = "corp"
PROXY_PASSWORD = "s3cret-" + secrets.token_hex(6)
CONNECT_TIMEOUT = 2.0  # timeout= on the DMZ's -L node
DNS_TIMEOUT = 0.5  # dns_timeout= on the DMZ's -L node (the stub's resolv.conf waits 1 s)

POLICY = """\
version: 1
default: deny
rules:
  - id: literals
    allow: ["0.0.0.0/0", "::/0"]
    ports: [80, 443, 3128, 8080, "7000-7999"]
  - id: names
    allow: [".ok.test"]
    ports: [80, 443, 3128, 8080, "7000-7999"]
  - id: corp-direct
    allow: [".internal.corp"]
    ports: [80, 443, "7000-7999"]
  - id: via-proxy
    allow: [".proxied.test"]
    route: proxy
    ports: [80, 443, "7000-7999"]
"""

# docs/audit.md: the closed enums (one copy, in tests/support/audit_schema.py).


def uniq(prefix: str, domain: str = "ok.test") -> str:
    """A fresh name per test: the stub's answer counters are per name."""
    return f"{prefix}-{secrets.token_hex(3)}.{domain}"


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fakenet")


@pytest.fixture(scope="module")
def ca_pem(ca: trustme.CA, workdir: Path) -> Path:
    path = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def net(ca: trustme.CA, workdir: Path) -> Iterator[FakeInternet]:
    cert = ca.issue_cert("*.ok.test", "*.proxied.test", "*.internal.corp", "1.1.1.1")
    cert_path, key_path = workdir / "origin.pem", workdir / "origin.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    with FakeInternet(workdir) as fake:
        fake.start_origins(cert_path, key_path)
        yield fake


@pytest.fixture(scope="module")
def squid(net: FakeInternet) -> Squid:
    for program in ("squid", "openssl"):  # openssl hashes the Basic password file
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")
    return net.start_squid(
        auth=(PROXY_USER, PROXY_PASSWORD), deny_domains=[".blocked.proxied.test"]
    )


@pytest.fixture(scope="module")
def policy_file(workdir: Path) -> Path:
    path = workdir / "policy.yaml"
    path.write_text(POLICY)
    return path


def dmz_args(net: FakeInternet, port: int, policy: Path, proxy_port: int) -> list[str]:
    params = f"timeout={CONNECT_TIMEOUT:g}s&dns_timeout={int(DNS_TIMEOUT * 1000)}ms"
    hop = f"http://{PROXY_USER}:{PROXY_PASSWORD}@{net.PROXY_IP}:{proxy_port}"
    return ["-L", f"http://{net.dmz_ip}:{port}?{params}", "-F", hop, "-C", str(policy)]


@pytest.fixture(scope="module")
def dmz(net: FakeInternet, policy_file: Path) -> NetnsPyegress:
    """The DMZ: HTTP CONNECT on dmz_ip:8080, policy, squid as the corporate proxy."""
    return net.start_dmz(dmz_args(net, DMZ_PORT, policy_file, net.PROXY_PORT), DMZ_PORT)


@pytest.fixture
def dead_proxy_dmz(net: FakeInternet, policy_file: Path) -> Iterator[NetnsPyegress]:
    """A second DMZ whose corporate proxy does not listen (10.99.0.1:3999)."""
    proc = net.start_dmz(dmz_args(net, DEAD_PROXY_DMZ_PORT, policy_file, 3999), DEAD_PROXY_DMZ_PORT)
    yield proc
    net.forget(proc)


# -- client side -----------------------------------------------------------------------


def target_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(
    net: FakeInternet, host: str, port: int, dmz_port: int = DMZ_PORT, timeout: float = 10
) -> tuple[int, socket.socket]:
    """CONNECT through the DMZ's HTTP listener; the status and the socket."""
    sock, head = http_connect((net.dmz_ip, dmz_port), target_of(host, port), timeout=timeout)
    return int(head.split()[1]), sock


def get_over(sock: socket.socket, host: str) -> dict[str, Any]:
    """A GET over an established tunnel to an HTTP origin; its JSON echo."""
    with sock:
        sock.sendall(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = recv_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:200]
    echo: dict[str, Any] = json.loads(body)
    return echo


def fetch(workdir: Path, url: str, proxy: str, ca_pem: Path) -> curl.CurlRun:
    """The real curl through ``proxy`` (CONNECT for https URLs), trusting the test CA."""
    if not curl.available():
        pytest.skip("curl is not installed")
    return curl.curl(workdir, [url], "-x", proxy, "--cacert", str(ca_pem), timeout=10)


def refused(net: FakeInternet, host: str, port: int, dmz_port: int = DMZ_PORT) -> int:
    status, sock = connect(net, host, port, dmz_port)
    sock.close()
    return status


# -- record checks -------------------------------------------------------------------


def check_pair(
    net: FakeInternet, decision: dict[str, Any], close: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The common shape of a decision and close record (docs/audit.md); returns the
    ``decision`` and ``result`` objects."""
    for record, event in ((decision, "decision"), (close, "close")):
        assert record.get("schema") == "pyegress.audit/v1", record
        assert record.get("event") == event, record
        assert record.get("tier") == "dmz", record
        assert record.get("mode") == "connect", record
        assert get(record, "client.addr") == net.client_ip, record
        assert get(record, "decision.reason") in DECISION_REASONS, record
        assert isinstance(get(record, "decision.policy_version"), str), record
        assert str(get(record, "decision.policy_version")).startswith("sha256:"), record
    assert close["conn_id"] == decision["conn_id"]
    assert close["decision"] == decision["decision"], (decision, close)
    for key in ("start_ts", "result", "bytes", "duration_ms"):
        assert key in close, close
    assert get(close, "result.close_reason") in CLOSE_REASONS, close
    return decision["decision"], close["result"]


def same_ip(a: object, b: str) -> bool:
    def plain(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        ip = ipaddress.ip_address(text)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip

    return plain(str(a)) == plain(b)


def expect_denied(
    net: FakeInternet, dmz: NetnsPyegress, host: str, port: int, reason: str, status: int = 403
) -> tuple[dict[str, Any], dict[str, Any]]:
    mark = dmz.mark()
    seen = refused(net, host, port)
    decision_rec, close_rec = dmz.audit(mark, host, port)
    decision, result = check_pair(net, decision_rec, close_rec)
    assert seen == status, close_rec
    assert (decision["action"], decision["reason"]) == ("deny", reason), decision_rec
    assert result["client_reply"] == status, close_rec
    assert get(close_rec, "bytes.from_client") == 0
    assert get(close_rec, "bytes.to_client") == 0
    return decision_rec, close_rec


# -- 8: address classes ----------------------------------------------------------------

CLASSES = [
    ("127.0.0.1", "resolved_loopback"),
    ("127.255.255.254", "resolved_loopback"),
    ("0.0.0.0", "resolved_unspecified"),
    ("10.0.0.1", "resolved_private"),
    ("172.16.0.1", "resolved_private"),
    ("172.31.255.254", "resolved_private"),
    ("192.168.1.1", "resolved_private"),
    ("169.254.169.254", "resolved_metadata"),
    ("169.254.1.1", "resolved_link_local"),
    ("100.64.0.1", "resolved_cgnat"),
    ("100.127.255.254", "resolved_cgnat"),
    ("224.0.0.1", "resolved_multicast"),
    ("240.0.0.1", "resolved_reserved"),
    ("255.255.255.255", "resolved_broadcast"),
    ("::1", "resolved_loopback"),
    ("::", "resolved_unspecified"),
    ("fe80::1", "resolved_link_local"),
    ("fc00::1", "resolved_ula"),
    ("fd12:3456::1", "resolved_ula"),
    ("ff02::1", "resolved_multicast"),
    ("::ffff:10.0.0.1", "resolved_ipv6_embedded"),
    ("::ffff:127.0.0.1", "resolved_loopback"),
    ("64:ff9b::a00:1", "resolved_ipv6_embedded"),
    ("2002:a00:1::1", "resolved_ipv6_embedded"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "resolved_ipv6_embedded"),  # Teredo
]


@pytest.mark.parametrize(("address", "reason"), CLASSES, ids=[a for a, _ in CLASSES])
def test_08_refused_address_class_as_literal(
    net: FakeInternet, dmz: NetnsPyegress, address: str, reason: str
) -> None:
    decision, _ = expect_denied(net, dmz, address, 80, reason)
    rejected = get(decision, "dns.rejected") or []
    assert any(same_ip(r.get("ip"), address) for r in rejected), decision
    assert get(decision, "upstream.dialed") is None, decision


@pytest.mark.parametrize(("address", "reason"), CLASSES, ids=[a for a, _ in CLASSES])
def test_08_refused_address_class_by_name(
    net: FakeInternet, dmz: NetnsPyegress, address: str, reason: str
) -> None:
    name = uniq("class")
    net.add_name(name, {"AAAA" if ":" in address else "A": [address]})
    decision, _ = expect_denied(net, dmz, name, 80, reason)
    assert [same_ip(a, address) for a in get(decision, "dns.answers")] == [True], decision
    (rejected,) = get(decision, "dns.rejected")
    assert same_ip(rejected["ip"], address), decision
    assert get(decision, "upstream.dialed") is None, decision


@pytest.mark.parametrize("address", ["100.63.255.254", "100.128.0.1"])
@pytest.mark.parametrize("spelling", ["literal", "name"])
def test_08_edges_of_cgnat_are_dialed(
    net: FakeInternet, dmz: NetnsPyegress, address: str, spelling: str
) -> None:
    host = address
    if spelling == "name":
        host = uniq("edge")
        net.add_name(host, {"A": [address]})
    mark = dmz.mark()
    status, sock = connect(net, host, 80)
    assert status == 200
    echo = get_over(sock, host)
    assert echo["local"] == f"{address}:80"
    decision_rec, close_rec = dmz.audit(mark, host, 80)
    decision, result = check_pair(net, decision_rec, close_rec)
    assert (decision["action"], decision["reason"]) == ("allow", "rule_match")
    assert get(close_rec, "upstream.via") == "direct"
    assert get(close_rec, "upstream.dialed") == f"{address}:80"
    assert (result["client_reply"], result["close_reason"]) == (200, "eof"), close_rec
    assert get(close_rec, "bytes.to_client") > 0


def test_08_ipv6_public_answer_is_dialed(net: FakeInternet, dmz: NetnsPyegress) -> None:
    name = uniq("v6")
    net.add_name(name, {"AAAA": ["2606:4700::1111"]})
    mark = dmz.mark()
    status, sock = connect(net, name, 80)
    assert status == 200
    assert get_over(sock, name)["local"] == "[2606:4700::1111]:80"
    _, close_rec = dmz.audit(mark, name, 80)
    assert get(close_rec, "upstream.dialed") == "[2606:4700::1111]:80"


# -- 10: several answers -----------------------------------------------------------------


def test_10_multi_answer_dials_only_the_public_one(net: FakeInternet, dmz: NetnsPyegress) -> None:
    name = uniq("multi")
    net.add_name(name, {"A": ["10.0.0.5", "1.1.1.1"]})
    mark = dmz.mark()
    status, sock = connect(net, name, 80)
    assert status == 200
    assert get_over(sock, name)["local"] == "1.1.1.1:80"
    decision_rec, close_rec = dmz.audit(mark, name, 80)
    decision, result = check_pair(net, decision_rec, close_rec)
    assert decision["action"] == "allow"
    assert sorted(get(decision_rec, "dns.answers")) == ["1.1.1.1", "10.0.0.5"]
    # The private answer is reported when it was considered (the resolver's order).
    for rejected in get(decision_rec, "dns.rejected") or []:
        assert rejected == {"ip": "10.0.0.5", "class": "private"}
    assert get(close_rec, "upstream.dialed") == "1.1.1.1:80"
    assert result["close_reason"] == "eof"


def test_10_only_private_answer_is_refused_with_the_ip(
    net: FakeInternet, dmz: NetnsPyegress
) -> None:
    name = uniq("private")
    net.add_name(name, {"A": ["10.0.0.5"]})
    decision, _ = expect_denied(net, dmz, name, 80, "resolved_private")
    assert get(decision, "dns.rejected") == [{"ip": "10.0.0.5", "class": "private"}]
    assert "10.0.0.5" in json.dumps(decision)


# -- 11: DNS rebinding -------------------------------------------------------------------


def test_11_rebinding_answer_is_never_dialed(
    net: FakeInternet, dmz: NetnsPyegress, ca_pem: Path, tmp_path: Path
) -> None:
    """First answer 1.1.1.1, every later one 127.0.0.1 (TTL 0): the tunnel goes to
    1.1.1.1, the name is looked up once, and nothing connects to the DMZ's loopback."""
    name = uniq("rebind")
    net.add_name(name, {"A": [["1.1.1.1"], ["127.0.0.1"]]})
    trap = net.dmz.listen("127.0.0.1", 443)
    try:
        mark = dmz.mark()
        run = fetch(tmp_path, f"https://{name}/echo", f"http://{net.dmz_ip}:{DMZ_PORT}", ca_pem)
        assert run.only.http_code == 200, run.describe()
        echo = json.loads(run.body)
        assert (echo["local"], echo["sni"], echo["host"]) == ("1.1.1.1:443", name, name)
        decision_rec, close_rec = dmz.audit(mark, name, 443)
        check_pair(net, decision_rec, close_rec)
        assert get(decision_rec, "dns.answers") == ["1.1.1.1"]
        assert get(close_rec, "upstream.dialed") == "1.1.1.1:443"
        assert len(net.queries(name, "A", client=net.LINK_DMZ)) == 1, net.queries(name)
        # The stub really would have rebound: a second tunnel is refused as loopback.
        expect_denied(net, dmz, name, 443, "resolved_loopback")
        assert len(net.queries(name, "A", client=net.LINK_DMZ)) == 2
        trap.setblocking(False)
        with pytest.raises(BlockingIOError):
            trap.accept()  # no connection ever reached 127.0.0.1:443 in the DMZ
    finally:
        trap.close()


# -- 12: self-connection ---------------------------------------------------------------


def test_12_name_resolving_to_the_dmz_listener_is_refused(
    net: FakeInternet, dmz: NetnsPyegress
) -> None:
    name = uniq("self")
    net.add_name(name, {"A": [net.dmz_ip]})
    decision, _ = expect_denied(net, dmz, name, DMZ_PORT, "self_connection")
    assert [r["ip"] for r in get(decision, "dns.rejected")] == [net.dmz_ip]


def test_12_literal_dmz_listener_is_refused(net: FakeInternet, dmz: NetnsPyegress) -> None:
    expect_denied(net, dmz, net.dmz_ip, DMZ_PORT, "self_connection")


# -- 13: CNAME and DNS failures ---------------------------------------------------------


def test_13_cname_chain_is_followed(net: FakeInternet, dmz: NetnsPyegress) -> None:
    name, middle, target = uniq("alias"), uniq("middle"), uniq("target")
    net.add_name(name, {"CNAME": middle})
    net.add_name(middle, {"CNAME": target})
    net.add_name(target, {"A": ["93.184.216.34"]})
    mark = dmz.mark()
    status, sock = connect(net, name, 80)
    assert status == 200
    echo = get_over(sock, name)
    assert (echo["local"], echo["host"]) == ("93.184.216.34:80", name)
    decision_rec, close_rec = dmz.audit(mark, name, 80)
    check_pair(net, decision_rec, close_rec)
    assert get(decision_rec, "requested.host") == name
    assert get(decision_rec, "dns.answers") == ["93.184.216.34"]
    assert get(close_rec, "result.close_reason") == "eof"


def test_13_cname_to_a_private_name_is_refused(net: FakeInternet, dmz: NetnsPyegress) -> None:
    name, target = uniq("alias"), uniq("inside")
    net.add_name(name, {"CNAME": target})
    net.add_name(target, {"A": ["192.168.7.7"]})
    expect_denied(net, dmz, name, 80, "resolved_private")


DNS_FAILURES: list[tuple[str, dict[str, Any] | None, str, int, str]] = [
    ("timeout", {"drop": True}, "dns_timeout", 504, "dns_timeout"),
    ("servfail", {"rcode": "SERVFAIL"}, "dns_error", 502, "resolve_failed"),
    ("nxdomain", None, "dns_error", 502, "resolve_failed"),
    ("nodata", {}, "dns_error", 502, "resolve_failed"),
]


def test_13_dns_failures_are_told_apart(net: FakeInternet, dmz: NetnsPyegress) -> None:
    seen: dict[tuple[str, str], str] = {}
    for label, entry, reason, status, close_reason in DNS_FAILURES:
        name = uniq(label)
        if entry is not None:
            net.add_name(name, entry)
        mark = dmz.mark()
        started = time.monotonic()
        got = refused(net, name, 80)
        elapsed = time.monotonic() - started
        decision_rec, close_rec = dmz.audit(mark, name, 80)
        decision, result = check_pair(net, decision_rec, close_rec)
        assert (got, decision["action"], decision["reason"]) == (status, "deny", reason), (
            label,
            close_rec,
        )
        assert (result["client_reply"], result["close_reason"]) == (status, close_reason), (
            label,
            close_rec,
        )
        assert get(close_rec, "upstream.dialed") is None
        if label == "timeout":
            # dns_timeout (0.5 s) fired, not the resolver's own 1 s (that would be
            # dns_error above); the bounds only catch a bound that is not applied at all.
            assert DNS_TIMEOUT * 0.8 <= elapsed < DNS_TIMEOUT + 1.5, elapsed
        else:
            assert elapsed < DNS_TIMEOUT * 2, (label, elapsed)
        key = (decision["reason"], decision["detail"].replace(name, "NAME"))
        assert key not in seen, f"{label} looks like {seen.get(key)}: {key}"
        seen[key] = label
        assert net.queries(name, "A", client=net.LINK_DMZ), label


# -- 14: the corporate proxy in 10/8 ------------------------------------------------------


@pytest.mark.external
def test_14_corporate_proxy_in_10_8_is_reachable_but_not_a_destination(
    net: FakeInternet, dmz: NetnsPyegress, squid: Squid
) -> None:
    name = uniq("api", "proxied.test")
    net.add_name(name, {"A": ["1.1.1.1"]})
    mark = dmz.mark()
    status, sock = connect(net, name, 80)
    assert status == 200
    assert get_over(sock, name)["local"] == "1.1.1.1:80"
    decision_rec, close_rec = dmz.audit(mark, name, 80)
    check_pair(net, decision_rec, close_rec)
    assert get(close_rec, "upstream.via") == "proxy"
    # The proxy address itself, as a literal and by name, is refused as private.
    expect_denied(net, dmz, net.PROXY_IP, net.PROXY_PORT, "resolved_private")
    alias = uniq("corp-proxy")
    net.add_name(alias, {"A": [net.PROXY_IP]})
    expect_denied(net, dmz, alias, net.PROXY_PORT, "resolved_private")


# -- 26: route: proxy --------------------------------------------------------------------


@pytest.mark.external
def test_26_proxy_gets_the_name_and_credentials_stay_out_of_logs(
    net: FakeInternet, dmz: NetnsPyegress, squid: Squid, ca_pem: Path, tmp_path: Path
) -> None:
    name = uniq("api", "proxied.test")
    net.add_name(name, {"A": ["93.184.216.34"]})
    mark = dmz.mark()
    run = fetch(tmp_path, f"https://{name}/echo", f"http://{net.dmz_ip}:{DMZ_PORT}", ca_pem)
    assert run.only.http_code == 200, run.describe()
    assert json.loads(run.body)["local"] == "93.184.216.34:443"
    decision_rec, close_rec = dmz.audit(mark, name, 443)
    check_pair(net, decision_rec, close_rec)
    assert get(decision_rec, "decision.rule_id") == "via-proxy"
    assert get(close_rec, "upstream.via") == "proxy"
    # curl may end its TLS session with unread bytes in flight (an RST): its choice.
    assert get(close_rec, "result.close_reason") in ("eof", "client_reset")
    # squid saw the name (not an address) and the DMZ's credentials.
    line = squid.wait_access(f"CONNECT {name}:443")
    assert f" {PROXY_USER} " in line, line
    # The DMZ did not resolve the name: squid did.
    assert not net.queries(name, client=net.LINK_DMZ)
    # Credentials never reach the DMZ's output, in clear or encoded.
    output = dmz.output()
    encoded = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    assert PROXY_PASSWORD not in output
    assert encoded not in output


@pytest.mark.external
def test_26_proxy_refusal_and_dead_proxy_have_distinct_reasons(
    net: FakeInternet, dmz: NetnsPyegress, squid: Squid, dead_proxy_dmz: NetnsPyegress
) -> None:
    blocked = uniq("x", "blocked.proxied.test")
    net.add_name(blocked, {"A": ["1.1.1.1"]})
    mark = dmz.mark()
    assert refused(net, blocked, 443) == 403
    decision_rec, close_rec = dmz.audit(mark, blocked, 443)
    decision, result = check_pair(net, decision_rec, close_rec)
    assert decision["action"] == "allow", "the policy allowed it; the proxy refused"
    assert (result["client_reply"], result["close_reason"]) == (403, "hop_refused"), close_rec
    squid.wait_access(f"CONNECT {blocked}:443")

    name = uniq("api", "proxied.test")
    net.add_name(name, {"A": ["1.1.1.1"]})
    mark = dead_proxy_dmz.mark()
    assert refused(net, name, 443, DEAD_PROXY_DMZ_PORT) == 502
    decision_rec, close_rec = dead_proxy_dmz.audit(mark, name, 443)
    _, dead = check_pair(net, decision_rec, close_rec)
    assert get(close_rec, "upstream.via") == "proxy"
    assert dead["client_reply"] == 502
    assert dead["close_reason"] in {"connect_refused", "dial_failed"}, close_rec
    assert dead["close_reason"] != result["close_reason"]
    output = dead_proxy_dmz.output()
    assert PROXY_PASSWORD not in output


@pytest.mark.external
def test_26_proxy_asking_for_credentials_and_hung_proxy(
    net: FakeInternet, policy_file: Path, squid: Squid
) -> None:
    """Wrong credentials (squid answers 407) and a proxy that accepts but never answers
    each end the tunnel with their own close reason; neither password is logged."""
    wrong = "wrong-" + secrets.token_hex(6)
    hung = net.inet.listen(net.PROXY_IP, 3998)  # never accepted: the handshake completes
    timeout = f"timeout={CONNECT_TIMEOUT:g}s"  # on -F: the hop's dial and CONNECT bound
    rest = ["-C", str(policy_file)]
    bad_auth = net.start_dmz(
        [
            "-L",
            f"http://{net.dmz_ip}:8082",
            *rest,
            "-F",
            f"http://{PROXY_USER}:{wrong}@{net.PROXY_IP}:{net.PROXY_PORT}?{timeout}",
        ],
        8082,
        wait=False,
    )
    stuck = net.start_dmz(
        ["-L", f"http://{net.dmz_ip}:8083", *rest, "-F", f"http://{net.PROXY_IP}:3998?{timeout}"],
        8083,
        wait=False,
    )
    try:
        net.wait_dmz(bad_auth)
        net.wait_dmz(stuck)
        name = uniq("api", "proxied.test")
        net.add_name(name, {"A": ["1.1.1.1"]})

        mark = bad_auth.mark()
        status = refused(net, name, 443, 8082)
        decision_rec, close_rec = bad_auth.audit(mark, name, 443)
        _, denied_auth = check_pair(net, decision_rec, close_rec)
        assert status == 502
        assert (denied_auth["client_reply"], denied_auth["close_reason"]) == (502, "hop_refused")
        assert "407" in str(denied_auth.get("error")), close_rec
        assert wrong not in bad_auth.output()

        mark = stuck.mark()
        started = time.monotonic()
        status = refused(net, name, 443, 8083)
        elapsed = time.monotonic() - started
        decision_rec, close_rec = stuck.audit(mark, name, 443)
        _, timed_out = check_pair(net, decision_rec, close_rec)
        assert status == 504
        assert (timed_out["client_reply"], timed_out["close_reason"]) == (504, "connect_timeout")
        assert get(close_rec, "upstream.via") == "proxy"
        assert CONNECT_TIMEOUT * 0.9 <= elapsed < CONNECT_TIMEOUT + 2.0, elapsed
    finally:
        hung.close()
        net.forget(bad_auth)
        net.forget(stuck)


# -- 27: per-rule routing ----------------------------------------------------------------


@pytest.mark.external
def test_27_one_rule_direct_another_via_proxy(
    net: FakeInternet, dmz: NetnsPyegress, squid: Squid
) -> None:
    inside, outside = uniq("git", "internal.corp"), uniq("api", "proxied.test")
    net.add_name(inside, {"A": ["93.184.216.34"]})
    net.add_name(outside, {"A": ["1.1.1.1"]})
    mark = dmz.mark()
    for host in (inside, outside):
        status, sock = connect(net, host, 80)
        assert status == 200, host
        get_over(sock, host)
    direct_decision, direct_close = dmz.audit(mark, inside, 80)
    proxy_decision, proxy_close = dmz.audit(mark, outside, 80)
    check_pair(net, direct_decision, direct_close)
    check_pair(net, proxy_decision, proxy_close)
    assert get(direct_decision, "decision.rule_id") == "corp-direct"
    assert get(direct_close, "upstream.via") == "direct"
    assert get(direct_close, "upstream.dialed") == "93.184.216.34:80"
    assert get(proxy_decision, "decision.rule_id") == "via-proxy"
    assert get(proxy_close, "upstream.via") == "proxy"
    squid.wait_access(f"CONNECT {outside}:80")
    assert not [line for line in squid.access_lines() if inside in line]


@pytest.mark.external
def test_27_proxy_down_does_not_fall_back_to_direct(
    net: FakeInternet, dead_proxy_dmz: NetnsPyegress
) -> None:
    assert net.origins is not None
    port = net.TCP_PORTS[3]
    outside, inside = uniq("api", "proxied.test"), uniq("git", "internal.corp")
    net.add_name(outside, {"A": ["1.1.1.1"]})
    net.add_name(inside, {"A": ["1.1.1.1"]})
    before = len([a for a in net.origins.accepts() if a["local"].endswith(f":{port}")])
    mark = dead_proxy_dmz.mark()
    assert refused(net, outside, port, DEAD_PROXY_DMZ_PORT) == 502
    _, close_rec = dead_proxy_dmz.audit(mark, outside, port)
    assert get(close_rec, "upstream.via") == "proxy"
    assert get(close_rec, "upstream.dialed") != f"1.1.1.1:{port}"
    # The direct rule still works through the same DMZ...
    status, sock = connect(net, inside, port, DEAD_PROXY_DMZ_PORT)
    assert status == 200
    with sock:
        sock.sendall(b"SOURCE 10\n")
        assert len(recv_all(sock)) == 10
    # ...and exactly that one connection reached the origin port: no fallback.
    after = [a for a in net.origins.accepts() if a["local"].endswith(f":{port}")]
    assert len(after) == before + 1, after
    assert after[-1]["peer"].startswith(net.LINK_DMZ + ":")


# -- 28, 29: connect timeout, refusal, reset --------------------------------------------


def test_28_blackholed_origin_times_out_with_504(net: FakeInternet, dmz: NetnsPyegress) -> None:
    port = net.TCP_PORTS[1]
    name = uniq("blackhole")
    net.add_name(name, {"A": ["93.184.216.34"]})
    rule = ["-p", "tcp", "-d", "93.184.216.34", "--dport", str(port), "-j", "DROP"]
    with net.iptables(net.inet, rule):
        mark = dmz.mark()
        started = time.monotonic()
        status = refused(net, name, port)
        elapsed = time.monotonic() - started
    decision_rec, close_rec = dmz.audit(mark, name, port)
    decision, result = check_pair(net, decision_rec, close_rec)
    assert decision["action"] == "allow"
    assert status == 504
    assert (result["client_reply"], result["close_reason"]) == (504, "connect_timeout"), close_rec
    assert CONNECT_TIMEOUT * 0.9 <= elapsed < CONNECT_TIMEOUT + 2.0, elapsed


def test_29_rejected_origin_is_502_connect_refused(net: FakeInternet, dmz: NetnsPyegress) -> None:
    port = net.TCP_PORTS[2]
    name = uniq("refused")
    net.add_name(name, {"A": ["93.184.216.34"]})
    rule = ["-p", "tcp", "-d", "93.184.216.34", "--dport", str(port)]
    rule += ["-j", "REJECT", "--reject-with", "tcp-reset"]
    with net.iptables(net.inet, rule):
        mark = dmz.mark()
        status = refused(net, name, port)
    decision_rec, close_rec = dmz.audit(mark, name, port)
    _, result = check_pair(net, decision_rec, close_rec)
    assert status == 502
    assert (result["client_reply"], result["close_reason"]) == (502, "connect_refused"), close_rec


def test_29_origin_reset_mid_stream_tears_the_tunnel_down(
    net: FakeInternet, dmz: NetnsPyegress
) -> None:
    port = net.TCP_PORTS[0]
    name = uniq("reset")
    net.add_name(name, {"A": ["1.1.1.1"]})
    mark = dmz.mark()
    status, sock = connect(net, name, port)
    assert status == 200
    received = bytearray()
    with sock:
        sock.sendall(b"RESET 5000\n")
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert len(received) == 5000
    decision_rec, close_rec = dmz.audit(mark, name, port)
    _, result = check_pair(net, decision_rec, close_rec)
    assert (result["client_reply"], result["close_reason"]) == (200, "upstream_reset"), close_rec
    assert get(close_rec, "bytes.to_client") == 5000
    assert get(close_rec, "bytes.from_client") == len(b"RESET 5000\n")


# -- two tiers: the same judgement behind the sidecar -----------------------------------


def test_two_tier_rebinding_and_identity(
    net: FakeInternet,
    policy_file: Path,
    tier_certs: TierCerts,
    pyegress: PyegressFactory,
    ca_pem: Path,
    tmp_path: Path,
) -> None:
    """Sidecar in the root namespace, DMZ behind an mTLS h2 link in its namespace: the
    DMZ judges with the sidecar client's identity and pins the first DNS answer."""
    listen = f"h2://{net.dmz_ip}:{TIER_PORT}?{tier_certs.dmz_params()}"
    listen += f"&dns_timeout={int(DNS_TIMEOUT * 1000)}ms"
    tier = net.start_dmz(["-L", listen, "-C", str(policy_file)], TIER_PORT)
    try:
        sidecar = pyegress(
            [
                "-L",
                "http://127.0.0.1:{0}",
                "-F",
                f"h2://{net.dmz_ip}:{TIER_PORT}?{tier_certs.sidecar_params()}",
            ]
        )
        name = uniq("rebind2")
        net.add_name(name, {"A": [["1.1.1.1"], ["127.0.0.1"]]})
        mark = tier.mark()
        run = fetch(
            tmp_path, f"https://{name}/echo", f"http://127.0.0.1:{sidecar.ports[0]}", ca_pem
        )
        assert run.only.http_code == 200, run.describe()
        assert json.loads(run.body)["local"] == "1.1.1.1:443"
        decision_rec, close_rec = tier.audit(mark, name, 443)
        assert get(decision_rec, "client.identity") == TierCerts.IDENTITY
        assert get(decision_rec, "decision.reason") == "rule_match"
        assert get(close_rec, "upstream.dialed") == "1.1.1.1:443"
        assert len(net.queries(name, "A", client=net.LINK_DMZ)) == 1
        # The sidecar's record joins the DMZ's by conn_id.
        sidecar_closes = sidecar.wait_records("close", 1)
        assert close_rec["conn_id"] in {r.get("conn_id") for r in sidecar_closes}, sidecar_closes
        # The second lookup would rebind: refused, and the sidecar's client sees 403.
        sock, head = http_connect(("127.0.0.1", sidecar.ports[0]), f"{name}:443")
        sock.close()
        assert int(head.split()[1]) == 403, head
    finally:
        net.forget(tier)
