"""The DNS stub the network scenarios use, checked in-process over loopback with raw
sockets and a hand-written client (independent of the stub's own encoder)."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.dnsstub import DnsStub, read_log, write_zone

A, CNAME, AAAA, MX = 1, 5, 28, 15
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP = 0, 1, 2, 3, 4


@dataclass
class Answer:
    ident: int
    flags: int
    rcode: int
    question: tuple[str, int]
    records: list[tuple[str, int, int, str]]  # owner, type, ttl, value

    @property
    def tc(self) -> bool:
        return bool(self.flags & 0x0200)

    def values(self, rtype: int) -> list[str]:
        return [value for _, t, _, value in self.records if t == rtype]


def query_bytes(name: str, qtype: int, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def _name(msg: bytes, off: int) -> tuple[str, int]:
    labels: list[str] = []
    end = -1
    while True:
        n = msg[off]
        if n >= 0xC0:
            if end < 0:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            continue
        off += 1
        if n == 0:
            return ".".join(labels), end if end >= 0 else off
        labels.append(msg[off : off + n].decode())
        off += n


def parse(msg: bytes) -> Answer:
    ident, flags, qd, an, _, _ = struct.unpack("!HHHHHH", msg[:12])
    assert flags & 0x8000, "not a response"
    off = 12
    question = ("", 0)
    for _ in range(qd):
        qname, off = _name(msg, off)
        question = (qname, struct.unpack("!H", msg[off : off + 2])[0])
        off += 4
    records = []
    for _ in range(an):
        owner, off = _name(msg, off)
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", msg[off : off + 10])
        off += 10
        rdata = msg[off : off + rdlen]
        if rtype == A:
            value = str(ipaddress.IPv4Address(rdata))
        elif rtype == AAAA:
            value = str(ipaddress.IPv6Address(rdata))
        elif rtype == CNAME:
            value, _ = _name(msg, off)
        else:
            value = rdata.hex()
        off += rdlen
        records.append((owner, rtype, ttl, value))
    return Answer(ident, flags, flags & 0xF, question, records)


def udp(port: int, name: str, qtype: int, timeout: float = 2.0) -> Answer:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(query_bytes(name, qtype), ("127.0.0.1", port))
        return parse(sock.recv(65535))


def tcp_many(port: int, queries: list[tuple[str, int]]) -> list[Answer]:
    """Several queries on one TCP connection (length-prefixed, RFC 1035 4.2.2)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        for ident, (name, qtype) in enumerate(queries):
            q = query_bytes(name, qtype, ident)
            sock.sendall(struct.pack("!H", len(q)) + q)
            size = struct.unpack("!H", _exact(sock, 2))[0]
            out.append(parse(_exact(sock, size)))
    return out


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "EOF"
        buf += chunk
    return buf


ZONE: dict[str, dict[str, Any]] = {
    "api.ok.test": {"A": ["1.1.1.1"], "AAAA": ["2606:4700::1111"]},
    "multi.test": {"A": ["10.0.0.5", "1.1.1.1"]},
    "rebind.test": {"A": [["1.1.1.1"], ["127.0.0.1"]]},
    "cname.test": {"CNAME": "api.ok.test"},
    "chain.test": {"CNAME": "cname.test"},
    "dangling.test": {"CNAME": "elsewhere.example"},
    "loop-a.test": {"CNAME": "loop-b.test"},
    "loop-b.test": {"CNAME": "loop-a.test"},
    "fail.test": {"rcode": "SERVFAIL"},
    "refused.test": {"rcode": 5},
    "slow.test": {"drop": True},
    "empty.test": {},
    "ttl.test": {"A": ["1.1.1.1"], "ttl": 30},
    "big.test": {"A": [f"1.1.{i // 250}.{i % 250}" for i in range(60)]},
}


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[DnsStub]:
    zone = tmp_path / "zone.json"
    write_zone(zone, ZONE)
    server = DnsStub("127.0.0.1", 0, zone, tmp_path / "queries.jsonl").start()
    yield server
    server.stop()


def test_a_and_aaaa(stub: DnsStub) -> None:
    a = udp(stub.port, "api.ok.test", A)
    assert (a.rcode, a.values(A), a.question) == (NOERROR, ["1.1.1.1"], ("api.ok.test", A))
    assert a.flags & 0x0400, "authoritative"
    assert a.flags & 0x0100, "RD echoed"
    assert a.records[0][2] == 0, "TTL 0"
    aaaa = udp(stub.port, "api.ok.test", AAAA)
    assert aaaa.values(AAAA) == ["2606:4700::1111"]


def test_name_matching_ignores_case_and_keeps_the_question(stub: DnsStub) -> None:
    ans = udp(stub.port, "API.Ok.TEST", A)
    assert ans.values(A) == ["1.1.1.1"]
    assert ans.question == ("API.Ok.TEST", A), "the question is echoed as sent"


def test_multi_answer_in_order(stub: DnsStub) -> None:
    assert udp(stub.port, "multi.test", A).values(A) == ["10.0.0.5", "1.1.1.1"]


def test_nodata_nxdomain_and_rcodes(stub: DnsStub) -> None:
    nodata = udp(stub.port, "multi.test", AAAA)
    assert (nodata.rcode, nodata.records) == (NOERROR, [])
    empty = udp(stub.port, "empty.test", A)
    assert (empty.rcode, empty.records) == (NOERROR, [])
    assert udp(stub.port, "nowhere.test", A).rcode == NXDOMAIN
    assert udp(stub.port, "fail.test", A).rcode == SERVFAIL
    assert udp(stub.port, "fail.test", AAAA).rcode == SERVFAIL
    assert udp(stub.port, "refused.test", A).rcode == 5
    assert udp(stub.port, "api.ok.test", MX).records == []


def test_cname_chain_followed_inside_the_zone(stub: DnsStub) -> None:
    ans = udp(stub.port, "chain.test", A)
    assert ans.rcode == NOERROR
    assert [(o, t, v) for o, t, _, v in ans.records] == [
        ("chain.test", CNAME, "cname.test"),
        ("cname.test", CNAME, "api.ok.test"),
        ("api.ok.test", A, "1.1.1.1"),
    ]
    direct = udp(stub.port, "cname.test", CNAME)
    assert direct.values(CNAME) == ["api.ok.test"]


def test_cname_out_of_zone_and_loops(stub: DnsStub) -> None:
    dangling = udp(stub.port, "dangling.test", A)
    assert (dangling.rcode, dangling.values(CNAME), dangling.values(A)) == (
        NOERROR,
        ["elsewhere.example"],
        [],
    )
    assert udp(stub.port, "loop-a.test", A).rcode == SERVFAIL


def test_drop_sends_nothing(stub: DnsStub) -> None:
    with pytest.raises(TimeoutError):
        udp(stub.port, "slow.test", A, timeout=0.3)


def test_flipping_answers_count_per_name_and_type(stub: DnsStub) -> None:
    assert udp(stub.port, "rebind.test", A).values(A) == ["1.1.1.1"]
    # Another type does not advance the A counter.
    assert udp(stub.port, "rebind.test", AAAA).records == []
    assert udp(stub.port, "rebind.test", A).values(A) == ["127.0.0.1"]
    assert udp(stub.port, "rebind.test", A).values(A) == ["127.0.0.1"], "last list forever"
    log = read_log(stub.log or Path())
    assert [(e["name"], e["type"]) for e in log].count(("rebind.test", "A")) == 3


def test_zone_rewrites_take_effect_at_once(stub: DnsStub) -> None:
    assert udp(stub.port, "new.test", A).rcode == NXDOMAIN
    write_zone(stub.zone.path, {**ZONE, "new.test": {"A": ["8.8.4.4"]}})
    assert udp(stub.port, "new.test", A).values(A) == ["8.8.4.4"]


def test_ttl_override(stub: DnsStub) -> None:
    assert udp(stub.port, "ttl.test", A).records[0][2] == 30


def test_tcp_several_queries_on_one_connection(stub: DnsStub) -> None:
    answers = tcp_many(stub.port, [("api.ok.test", A), ("chain.test", AAAA), ("nx.test", A)])
    assert [a.ident for a in answers] == [0, 1, 2]
    assert answers[0].values(A) == ["1.1.1.1"]
    assert answers[1].values(AAAA) == ["2606:4700::1111"]
    assert answers[2].rcode == NXDOMAIN
    assert read_log(stub.log or Path())[-1] == {
        "name": "nx.test",
        "type": "A",
        "proto": "tcp",
        "client": "127.0.0.1",
    }


def test_udp_truncates_and_tcp_carries_everything(stub: DnsStub) -> None:
    small = udp(stub.port, "big.test", A)
    assert small.tc
    assert 0 < len(small.values(A)) < 60
    (full,) = tcp_many(stub.port, [("big.test", A)])
    assert not full.tc
    assert len(full.values(A)) == 60


def test_garbage_gets_formerr_or_silence(stub: DnsStub) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        # A header with two questions.
        sock.sendto(struct.pack("!HHHHHH", 7, 0x0100, 2, 0, 0, 0), ("127.0.0.1", stub.port))
        ans = parse(sock.recv(512))
        assert (ans.ident, ans.rcode) == (7, FORMERR)
        # A question whose label runs past the end.
        sock.sendto(struct.pack("!HHHHHH", 8, 0, 1, 0, 0, 0) + b"\x3fab", ("127.0.0.1", stub.port))
        assert parse(sock.recv(512)).rcode == FORMERR
        # A non-query opcode (NOTIFY).
        q = bytearray(query_bytes("api.ok.test", A, 9))
        q[2] = 4 << 3
        sock.sendto(bytes(q), ("127.0.0.1", stub.port))
        assert parse(sock.recv(512)).rcode == NOTIMP
        # Too short for a header: ignored, and the server still answers afterwards.
        sock.sendto(b"\x00\x01", ("127.0.0.1", stub.port))
    assert udp(stub.port, "api.ok.test", A).values(A) == ["1.1.1.1"]


def test_runs_as_a_process(tmp_path: Path) -> None:
    zone = tmp_path / "zone.json"
    write_zone(zone, {"p.test": {"A": ["9.9.9.9"]}})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.dnsstub",
            "--listen",
            f"127.0.0.1:{port}",
            "--zone",
            str(zone),
            "--log",
            str(tmp_path / "q.jsonl"),
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"ready")
        assert udp(port, "p.test", A).values(A) == ["9.9.9.9"]
        assert json.loads((tmp_path / "q.jsonl").read_text()) == {
            "name": "p.test",
            "type": "A",
            "proto": "udp",
            "client": "127.0.0.1",
        }
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
