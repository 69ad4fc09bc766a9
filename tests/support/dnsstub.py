"""A small authoritative DNS server whose answers the test controls.

Run it as its own process (so it can live inside a network namespace)::

    python -m tests.support.dnsstub --listen 8.8.8.8:53 --zone zone.json --log queries.jsonl

or in-process with :class:`DnsStub` (the unit tests do). It serves UDP and TCP on the
same address and port and prints ``ready`` on stdout once both sockets are bound.

The zone is a JSON file the test may rewrite at any time; it is read again for every
query (write it with :func:`write_zone`, which replaces the file atomically)::

    {
      "api.ok.test": {"A": ["1.1.1.1"], "AAAA": ["2606:4700::1111"]},
      "rebind.test": {"A": [["1.1.1.1"], ["127.0.0.1"]]},
      "cname.test": {"CNAME": "api.ok.test"},
      "fail.test": {"rcode": "SERVFAIL"},
      "slow.test": {"drop": true},
      "empty.test": {}
    }

* A list of addresses is the answer to every query. A list of *lists* is a sequence:
  the i-th query for that name and type gets the i-th list, and the last list is
  repeated forever after (a counter per name and type, for the stub's lifetime).
* ``CNAME`` answers every type with the alias, followed by the target's records when
  the target is in the zone (chains are followed up to 8 links).
* ``rcode`` (``NOERROR``, ``FORMERR``, ``SERVFAIL``, ``NXDOMAIN``, ``NOTIMP``,
  ``REFUSED`` or a number) answers every query for the name with that code and no
  records; ``drop: true`` sends no reply at all (the client times out).
* A name with no records of the asked type answers NOERROR with no records (NODATA);
  a name that is not in the zone answers NXDOMAIN.
* Every record has TTL 0 unless the entry has ``"ttl": N``.

Each query is appended to the log file (if given) as one JSON line
``{"name": ..., "type": "A", "proto": "udp", "client": "10.0.0.2"}``, so a test can count lookups.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}
CLASS_IN = 1
MAX_CNAME_CHAIN = 8
UDP_LIMIT = 512


class FormatError(ValueError):
    """A query that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    raw_name: bytes  # the name in wire format, as the client spelled it


@dataclass(frozen=True, slots=True)
class Query:
    ident: int
    flags: int
    question: Question | None


def type_name(qtype: int) -> str:
    return TYPE_NAMES.get(qtype, str(qtype))


def encode_name(name: str) -> bytes:
    """``a.b.test`` -> wire format labels; the root is ``""`` or ``"."``."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if not label:
            continue
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError(f"label over 63 octets in {name!r}")
        out += bytes([len(raw)]) + raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"name over 255 octets: {name!r}")
    return bytes(out)


def decode_name(message: bytes, offset: int) -> tuple[str, int]:
    """Read a (possibly compressed) name at ``offset``; returns it and the offset after it."""
    labels: list[str] = []
    end: int | None = None
    jumps = 0
    while True:
        if offset >= len(message):
            raise FormatError("name runs past the message")
        length = message[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(message):
                raise FormatError("truncated compression pointer")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | message[offset + 1]
            jumps += 1
            if jumps > 32:
                raise FormatError("compression loop")
            continue
        if length & 0xC0:
            raise FormatError(f"bad label length byte {length:#x}")
        offset += 1
        if length == 0:
            break
        label = message[offset : offset + length]
        if len(label) != length:
            raise FormatError("label runs past the message")
        labels.append(label.decode("ascii", errors="replace"))
        offset += length
    return ".".join(labels), end if end is not None else offset


def parse_query(message: bytes) -> Query:
    if len(message) < 12:
        raise FormatError("shorter than a DNS header")
    ident, flags, qdcount = struct.unpack("!HHH", message[:6])
    if qdcount != 1:
        return Query(ident, flags, None)
    name, offset = decode_name(message, 12)
    if offset + 4 > len(message):
        raise FormatError("truncated question")
    qtype, qclass = struct.unpack("!HH", message[offset : offset + 4])
    return Query(ident, flags, Question(name.lower(), qtype, qclass, message[12:offset]))


def _rcode(value: object) -> int:
    if isinstance(value, int):
        return value & 0xF
    return RCODES[str(value).upper()]


def _rdata(rtype: int, value: str) -> bytes:
    if rtype == TYPES["A"]:
        return ipaddress.IPv4Address(value).packed
    if rtype == TYPES["AAAA"]:
        return ipaddress.IPv6Address(value).packed
    if rtype == TYPES["CNAME"]:
        return encode_name(value)
    raise ValueError(f"cannot encode type {rtype}")


def _record(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata


@dataclass
class Reply:
    rcode: int = 0
    records: list[bytes] = field(default_factory=list)
    drop: bool = False


class Zone:
    """Answers from a JSON zone file, with the per-(name, type) query counters."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._counters: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k).lower().rstrip("."): v for k, v in data.items() if isinstance(v, dict)}

    def _next(self, name: str, kind: str, values: Sequence[Any]) -> list[str]:
        """The answer list for this query: fixed, or the counter's step of a sequence."""
        if not values or not all(isinstance(v, list) for v in values):
            return [str(v) for v in values]
        with self._lock:
            index = self._counters.get((name, kind), 0)
            self._counters[(name, kind)] = index + 1
        step = values[min(index, len(values) - 1)]
        return [str(v) for v in step]

    def answer(self, question: Question) -> Reply:
        zone = self.load()
        entry = zone.get(question.name)
        if entry is None:
            return Reply(rcode=RCODES["NXDOMAIN"])
        if entry.get("drop"):
            return Reply(drop=True)
        if "rcode" in entry:
            return Reply(rcode=_rcode(entry["rcode"]))
        reply = Reply()
        owner = b"\xc0\x0c"  # the question's name
        name = question.name
        kind = type_name(question.qtype)
        for _ in range(MAX_CNAME_CHAIN + 1):
            ttl = int(entry.get("ttl", 0))
            alias = entry.get("CNAME")
            if alias is not None and kind != "CNAME":
                target = str(alias).lower().rstrip(".")
                reply.records.append(_record(owner, TYPES["CNAME"], ttl, encode_name(target)))
                next_entry = zone.get(target)
                if next_entry is None or next_entry.get("drop") or "rcode" in next_entry:
                    return reply
                owner, name, entry = encode_name(target), target, next_entry
                continue
            if alias is not None:  # a CNAME query: the alias itself
                reply.records.append(_record(owner, TYPES["CNAME"], ttl, encode_name(str(alias))))
                return reply
            if kind in ("A", "AAAA"):
                for value in self._next(name, kind, entry.get(kind, [])):
                    reply.records.append(
                        _record(owner, question.qtype, ttl, _rdata(question.qtype, value))
                    )
            return reply
        reply.rcode = RCODES["SERVFAIL"]  # a CNAME loop
        reply.records.clear()
        return reply


def build_response(query: Query, reply: Reply, limit: int | None) -> bytes:
    """The response message for ``query``; with ``limit`` (UDP), records that do not fit
    are left out and the TC bit is set."""
    opcode = (query.flags >> 11) & 0xF
    rd = query.flags & 0x0100
    flags = 0x8000 | (opcode << 11) | 0x0400 | rd | (reply.rcode & 0xF)  # QR, AA
    question = b""
    qdcount = 0
    if query.question is not None:
        q = query.question
        question = q.raw_name + struct.pack("!HH", q.qtype, q.qclass)
        qdcount = 1
    records = list(reply.records)
    while True:
        header = struct.pack("!HHHHHH", query.ident, flags, qdcount, len(records), 0, 0)
        message = header + question + b"".join(records)
        if limit is None or len(message) <= limit or not records:
            return message
        records = records[: len(records) // 2]
        flags |= 0x0200  # TC


def respond(
    zone: Zone, message: bytes, proto: str, log: Path | None, client: str = ""
) -> bytes | None:
    """The answer to one query message, or ``None`` to send nothing."""
    try:
        query = parse_query(message)
    except FormatError:
        if len(message) < 12:
            return None
        ident, flags = struct.unpack("!HH", message[:4])
        return build_response(Query(ident, flags, None), Reply(rcode=RCODES["FORMERR"]), None)
    if query.question is None:
        return build_response(query, Reply(rcode=RCODES["FORMERR"]), None)
    if log is not None:
        entry = {"name": query.question.name, "type": type_name(query.question.qtype)}
        entry["proto"] = proto
        entry["client"] = client
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
    if (query.flags >> 11) & 0xF != 0 or query.flags & 0x8000:
        return build_response(query, Reply(rcode=RCODES["NOTIMP"]), None)
    if query.question.qclass != CLASS_IN:
        return build_response(query, Reply(rcode=RCODES["REFUSED"]), None)
    reply = zone.answer(query.question)
    if reply.drop:
        return None
    return build_response(query, reply, UDP_LIMIT if proto == "udp" else None)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class DnsStub:
    """The server: one UDP socket and one TCP listener on ``host:port`` (port 0 picks a
    free port, the same for both), each served by a daemon thread."""

    def __init__(self, host: str, port: int, zone: Path, log: Path | None = None) -> None:
        self.zone = Zone(zone)
        self.log = log
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.tcp = socket.socket(family, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, port))
        self.host = host
        self.port = int(self.tcp.getsockname()[1])
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.bind((host, self.port))
        self.tcp.listen(64)
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]

    def start(self) -> DnsStub:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                message, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            if peer is None:  # the socket was shut down by stop()
                return
            answer = respond(self.zone, message, "udp", self.log, str(peer[0]))
            if answer is not None:
                with contextlib.suppress(OSError):
                    self.udp.sendto(answer, peer)

    def _serve_tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        client = str(conn.getpeername()[0])
        with conn:
            conn.settimeout(30)
            try:
                while True:
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    message = _recv_exact(conn, struct.unpack("!H", head)[0])
                    if message is None:
                        return
                    answer = respond(self.zone, message, "tcp", self.log, client)
                    if answer is not None:
                        conn.sendall(struct.pack("!H", len(answer)) + answer)
            except OSError:
                return


def write_zone(path: Path, zone: dict[str, dict[str, Any]]) -> None:
    """Replace the zone file atomically (the stub never reads half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(zone, indent=1))
    os.replace(tmp, path)


def read_log(path: Path) -> list[dict[str, str]]:
    """The queries logged so far, oldest first."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.dnsstub")
    parser.add_argument("--listen", required=True, help="IP:PORT ([v6]:PORT for IPv6)")
    parser.add_argument("--zone", required=True, type=Path)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args(argv)
    host, _, port = str(args.listen).rpartition(":")
    stub = DnsStub(host.strip("[]"), int(port), args.zone, args.log).start()
    print(f"ready {stub.host} {stub.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    stub.stop()
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
