"""Issue 5, part 4: the sidecar's DNS listener for closed networks.

Unit tests (no root): the DNS wire code, the synthetic-address table (bounded, LRU,
expiring), and the listener over real UDP and TCP sockets against a stub upstream
(``tests/support/dnsstub.py``). Namespace test (root): curl in an app namespace whose
resolver is the sidecar's DNS listener reaches an origin by name through the redirect
listener and the DMZ, while cluster names are answered by the cluster DNS stub.
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

from pyegress.transparent import dnswire as wire
from pyegress.transparent.dns import Resolver, _serve_tcp, _UdpServer
from pyegress.transparent.fakeip import FakeNames, lookup, register, unregister
from tests.conftest import TierCerts
from tests.support.appns import APP_GW, CLUSTER_DNS, AppNamespace, Sidecar, redirect_rules
from tests.support.audit_schema import check_records
from tests.support.dnsstub import DnsStub, write_zone
from tests.support.netns import FakeInternet, NetnsPyegress, get, unavailable

# -- wire -------------------------------------------------------------------------------


def test_query_roundtrip_and_response() -> None:
    query = wire.build_query(0x1234, "Allowed.Example", wire.TYPE_A)
    message = wire.parse_message(query)
    assert message.ident == 0x1234
    assert message.question is not None
    assert (message.question.name, message.question.qtype) == ("allowed.example", wire.TYPE_A)
    record = wire.address_record(ipaddress.ip_address("198.18.0.1"), 30)
    reply = wire.build_response(message, wire.NOERROR, (record,))
    parsed = wire.parse_message(reply)
    assert parsed.is_response
    assert parsed.rcode == 0
    assert parsed.ident == 0x1234
    assert wire.parse_answers(reply) == [("allowed.example", wire.TYPE_A, bytes([198, 18, 0, 1]))]


def test_malformed_messages() -> None:
    with pytest.raises(wire.DnsFormatError):
        wire.parse_message(b"\x00\x01")
    looping = wire.HEADER.pack(1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    with pytest.raises(wire.DnsFormatError, match="loop"):
        wire.parse_message(looping)
    assert wire.error_response(b"\x00", wire.FORMERR) is None
    answer = wire.error_response(wire.HEADER.pack(7, 0x0100, 1, 0, 0, 0) + b"\x05", wire.FORMERR)
    assert answer is not None
    assert wire.parse_message(answer).rcode == wire.FORMERR


def test_reverse_names() -> None:
    assert wire.reverse_name_address("1.0.18.198.in-addr.arpa") == ipaddress.ip_address(
        "198.18.0.1"
    )
    v6 = ipaddress.ip_address("fc00:ffff::5")
    name = ".".join(reversed(f"{int(v6):032x}")) + ".ip6.arpa"
    assert wire.reverse_name_address(name) == v6
    assert wire.reverse_name_address("18.198.in-addr.arpa") is None


# -- the table --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_table_is_stable_bounded_lru_and_expires() -> None:
    clock = Clock()
    table = FakeNames(
        ipaddress.ip_network("198.18.0.0/29"),
        ipaddress.ip_network("fc00:ffff::/125"),
        size=3,
        keep=60,
        clock=clock,
    )
    a = table.address_for("a.example", 4)
    assert a == ipaddress.ip_address("198.18.0.1")  # the all-zeros address is skipped
    assert table.address_for("a.example", 4) == a
    assert table.name_for(a) == "a.example"
    b = table.address_for("b.example", 4)
    c = table.address_for("c.example", 4)
    assert a is not None
    assert b is not None
    assert c is not None
    assert len({a, b, c}) == 3
    table.name_for(a)  # a used again: b is now the least recently used
    d = table.address_for("d.example", 4)  # full: b goes
    assert table.name_for(b) is None
    assert table.name_for(a) == "a.example"
    assert d not in (a, c)
    clock.now = 61  # everything expires a minute after its last use
    assert table.name_for(a) is None
    assert table.covers(a)
    assert not table.covers(ipaddress.ip_address("1.1.1.1"))
    v6 = table.address_for("a.example", 6)
    assert v6 is not None
    assert v6 in ipaddress.ip_network("fc00:ffff::/125")
    owner = Clock()  # any object that takes a weak reference (the engine, normally)
    register(owner, table)
    assert lookup(owner, v6) == (True, "a.example")
    assert lookup(owner, ipaddress.ip_address("1.1.1.1")) == (False, None)
    unregister(owner, table)
    assert lookup(owner, v6) == (False, None)


# -- the listener against a stub upstream ----------------------------------------------


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DnsStub]:
    zone = tmp_path / "zone.json"
    write_zone(zone, {"web.default.svc.cluster.local": {"A": ["10.96.1.2"]}})
    stub = DnsStub("127.0.0.1", 0, zone, tmp_path / "log.jsonl").start()
    yield stub
    stub.stop()


def _resolver(upstream: DnsStub | None) -> Resolver:
    table = FakeNames(ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fc00:ffff::/96"))
    ups = [(upstream.host, upstream.port)] if upstream is not None else []
    return Resolver(table, ups, ("cluster.local",), ttl=30, timeout=1.0)


async def _ask(resolver: Resolver, name: str, qtype: int, tcp: bool) -> bytes:
    loop = asyncio.get_running_loop()
    query = wire.build_query(0x4242, name, qtype)
    if tcp:
        server = await asyncio.start_server(lambda r, w: _serve_tcp(resolver, r, w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        reply = await reader.readexactly(size)
        writer.close()
        server.close()
        return reply
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpServer(resolver), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, ("127.0.0.1", port))
        await loop.sock_sendall(client, query)
        return await asyncio.wait_for(loop.sock_recv(client, 4096), 5)
    finally:
        client.close()
        transport.close()


@pytest.mark.parametrize("tcp", [False, True])
async def test_outside_names_get_synthetic_addresses(upstream: DnsStub, tcp: bool) -> None:
    resolver = _resolver(upstream)
    reply = await _ask(resolver, "Allowed.Example", wire.TYPE_A, tcp)
    ((owner, rtype, rdata),) = wire.parse_answers(reply)
    address = ipaddress.ip_address(rdata)
    assert (owner, rtype) == ("allowed.example", wire.TYPE_A)
    assert address in ipaddress.ip_network("198.18.0.0/15")
    assert resolver.table.name_for(address) == "allowed.example"
    reply = await _ask(resolver, "allowed.example", wire.TYPE_AAAA, tcp)
    ((_, rtype, rdata),) = wire.parse_answers(reply)
    assert ipaddress.ip_address(rdata) in ipaddress.ip_network("fc00:ffff::/96")
    reply = await _ask(resolver, "allowed.example", 16, tcp)  # TXT: NODATA
    assert wire.parse_message(reply).rcode == wire.NOERROR
    assert not wire.parse_answers(reply)
    octets = str(address).split(".")
    reply = await _ask(resolver, ".".join(reversed(octets)) + ".in-addr.arpa", wire.TYPE_PTR, tcp)
    ((_, rtype, rdata),) = wire.parse_answers(reply)
    assert rtype == wire.TYPE_PTR
    assert rdata == wire.encode_name("allowed.example")
    # Nothing about outside names goes upstream.
    assert not any(q["name"] == "allowed.example" for q in _queries(upstream))


def _queries(stub: DnsStub) -> list[dict[str, Any]]:
    from tests.support.dnsstub import read_log

    return read_log(stub.log) if stub.log is not None else []


@pytest.mark.parametrize("tcp", [False, True])
async def test_cluster_names_are_forwarded(upstream: DnsStub, tcp: bool) -> None:
    resolver = _resolver(upstream)
    reply = await _ask(resolver, "web.default.svc.cluster.local", wire.TYPE_A, tcp)
    assert wire.parse_message(reply).ident == 0x4242
    ((_, _, rdata),) = wire.parse_answers(reply)
    assert ipaddress.ip_address(rdata) == ipaddress.ip_address("10.96.1.2")
    reply = await _ask(resolver, "nope.svc.cluster.local", wire.TYPE_A, tcp)
    assert wire.parse_message(reply).rcode == wire.NXDOMAIN
    seen = _queries(upstream)
    assert {q["proto"] for q in seen} == {"tcp" if tcp else "udp"}


async def test_no_upstream_answers_servfail() -> None:
    resolver = _resolver(None)
    reply = await _ask(resolver, "web.cluster.local", wire.TYPE_A, False)
    assert wire.parse_message(reply).rcode == wire.SERVFAIL


async def test_dead_upstream_times_out_to_servfail() -> None:
    resolver = _resolver(None)
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        resolver.upstreams = [("127.0.0.1", dead.getsockname()[1])]
        resolver.timeout = 0.3
        reply = await _ask(resolver, "web.cluster.local", wire.TYPE_A, False)
        assert wire.parse_message(reply).rcode == wire.SERVFAIL
    finally:
        dead.close()


# -- namespaces -------------------------------------------------------------------------

_WHY = unavailable()
TIER_PORT = 8443
REDIRECT_PORT = 15001
POLICY = """\
version: 1
default: deny
rules:
  - id: web
    allow: [allowed.example]
    ports: [443]
"""


@pytest.fixture(scope="module")
def closed(
    tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA
) -> Iterator[tuple[FakeInternet, AppNamespace, NetnsPyegress, Sidecar, Path]]:
    if _WHY is not None:
        pytest.skip(_WHY)
    workdir = tmp_path_factory.mktemp("closeddns")
    cert = ca.issue_cert("allowed.example", "denied.example")
    cert_path, key_path, ca_path = workdir / "o.pem", workdir / "o.key", workdir / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    (workdir / "certs").mkdir()
    tier = TierCerts(workdir / "certs")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    cluster_zone = workdir / "cluster-zone.json"
    write_zone(cluster_zone, {"web.default.svc.cluster.local": {"A": ["10.96.1.2"]}})
    with FakeInternet(workdir) as net:
        net.set_zone({"allowed.example": {"A": ["1.1.1.1"]}, "denied.example": {"A": ["1.1.1.1"]}})
        net.start_origins(cert_path, key_path)
        dmz = net.start_dmz(
            ["-L", f"h2://:{TIER_PORT}?{tier.dmz_params()}", "-C", str(policy)], TIER_PORT
        )
        with AppNamespace(net, workdir) as app:
            app.start(
                ["python3", "-m", "tests.support.dnsstub", "--listen", f"{CLUSTER_DNS}:53",
                 "--zone", str(cluster_zone)],
                "clusterdns",
                ready="ready",
            )  # fmt: skip
            hop = f"h2://{APP_GW}:{TIER_PORT}?{tier.sidecar_params()}"
            dns = f"dns://127.0.0.1:53?upstream={CLUSTER_DNS}:53&suffix=cluster.local&ttl=5s"
            sidecar = app.sidecar(["-L", f"redirect://:{REDIRECT_PORT}", "-L", dns, "-F", hop])
            app.set_resolver("127.0.0.1")
            yield net, app, dmz, sidecar, ca_path


@pytest.mark.root
@pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
def test_closed_network_reaches_the_origin_by_name(
    closed: tuple[FakeInternet, AppNamespace, NetnsPyegress, Sidecar, Path],
) -> None:
    net, app, dmz, sidecar, ca = closed
    # Cluster names come from the cluster DNS, through the sidecar's listener.
    done = app.exec("getent", "ahostsv4", "web.default.svc.cluster.local")
    assert done.returncode == 0, done.stderr
    assert "10.96.1.2" in done.stdout
    # Outside names: synthetic addresses; the redirect rules cover the reserved range.
    rules, undo = redirect_rules(REDIRECT_PORT, [], extra_dst=["198.18.0.0/15"])
    with app.rules(rules, undo):
        mark, dmark = sidecar.mark(), dmz.mark()
        done = app.exec(
            "curl", "-q", "-4", "-sS", "-m", "10", "--cacert", str(ca),
            "https://allowed.example/",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["sni"] == "allowed.example"
        decision, _ = sidecar.audit(mark, "allowed.example", 443)
        ddecision, _ = dmz.audit(dmark, "allowed.example", 443)
        orig = str(get(decision, "orig_dst"))
        assert ipaddress.ip_address(orig.rsplit(":", 1)[0]) in ipaddress.ip_network("198.18.0.0/15")
        for record in (decision, ddecision):
            assert get(record, "requested.name_source") == "dns"
            assert get(record, "orig_dst") == orig
        assert get(ddecision, "decision.reason") == "rule_match"
        assert get(ddecision, "dns.orig_dst_match") is None  # synthetic: not compared
        mark, dmark = sidecar.mark(), dmz.mark()
        done = app.exec(
            "curl", "-q", "-4", "-sS", "-m", "10", "--cacert", str(ca), "https://denied.example/"
        )
        assert done.returncode != 0
        ddecision, _ = dmz.audit(dmark, "denied.example", 443)
        assert get(ddecision, "decision.reason") == "not_in_allowlist"
    # The app never asked the outside DNS: only the DMZ did.
    askers = {q.get("client") for q in net.queries("allowed.example")}
    assert askers == {net.LINK_DMZ}
    for proc in (sidecar, dmz):
        records = [r for r in proc.records_since(0) if r.get("schema")]
        assert check_records(records) == []
