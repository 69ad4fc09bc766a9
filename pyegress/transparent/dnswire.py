"""DNS messages on the wire (RFC 1035), just what the sidecar's DNS listener needs.

Queries are parsed (header and the one question, compression pointers followed with a
loop guard); answers are built from the query's own question bytes. Anything this
module cannot parse raises :class:`DnsFormatError`, which the listener answers with
FORMERR when it can read the header, and otherwise drops (and logs).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
HEADER_LENGTH = 12

TYPE_A = 1
TYPE_CNAME = 5
TYPE_PTR = 12
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1

OPCODE_QUERY = 0

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080

MAX_UDP_PAYLOAD = 512  # without EDNS
MAX_NAME_LENGTH = 255
MAX_POINTERS = 32


class DnsFormatError(ValueError):
    """A message that is not a well-formed DNS message."""


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower case, no trailing dot ("" for the root)
    qtype: int
    qclass: int
    wire: bytes  # the question section as the client sent it (name, type, class)


@dataclass(frozen=True, slots=True)
class Message:
    ident: int
    flags: int
    question: Question | None
    counts: tuple[int, int, int, int]

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` and the offset just past it (past the first pointer when
    compressed). Labels are decoded as latin-1 and lower-cased; a dot inside a label is
    refused (it could not be told from a separator)."""
    labels: list[str] = []
    end: int | None = None
    pointers = 0
    length = 0
    pos = offset
    while True:
        if pos >= len(data):
            raise DnsFormatError("name runs past the end of the message")
        size = data[pos]
        if size & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError("truncated compression pointer")
            pointers += 1
            if pointers > MAX_POINTERS:
                raise DnsFormatError("compression pointer loop")
            if end is None:
                end = pos + 2
            pos = ((size & 0x3F) << 8) | data[pos + 1]
            continue
        if size & 0xC0:
            raise DnsFormatError(f"unknown label type 0x{size & 0xC0:02x}")
        pos += 1
        if size == 0:
            break
        if pos + size > len(data):
            raise DnsFormatError("label runs past the end of the message")
        label = data[pos : pos + size]
        if b"." in label:
            raise DnsFormatError("a label contains a dot")
        labels.append(label.decode("latin-1").lower())
        length += size + 1
        if length > MAX_NAME_LENGTH:
            raise DnsFormatError("name longer than 255 octets")
        pos += size
    return ".".join(labels), (end if end is not None else pos)


def encode_name(name: str) -> bytes:
    """A name in wire format, uncompressed."""
    out = bytearray()
    for label in name.strip(".").split("."):
        if not label:
            continue
        raw = label.encode("latin-1")
        if len(raw) > 63:
            raise ValueError(f"label longer than 63 octets in {name!r}")
        out += bytes([len(raw)]) + raw
    out += b"\x00"
    if len(out) > MAX_NAME_LENGTH:
        raise ValueError(f"name longer than 255 octets: {name!r}")
    return bytes(out)


def parse_message(data: bytes) -> Message:
    """Header and first question of a message (further sections are not parsed)."""
    if len(data) < HEADER_LENGTH:
        raise DnsFormatError(f"message of {len(data)} bytes is shorter than a header")
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    question = None
    if qd >= 1:
        name, pos = read_name(data, HEADER_LENGTH)
        if pos + 4 > len(data):
            raise DnsFormatError("question runs past the end of the message")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        question = Question(name, qtype, qclass, data[HEADER_LENGTH : pos + 4])
    return Message(ident, flags, question, (qd, an, ns, ar))


def header_ident(data: bytes) -> int | None:
    """The message id, or None when not even a header is there."""
    if len(data) < 2:
        return None
    return int.from_bytes(data[:2], "big")


def with_ident(data: bytes, ident: int) -> bytes:
    """The message with its id replaced."""
    return ident.to_bytes(2, "big") + data[2:]


def build_query(ident: int, name: str, qtype: int, recursion: bool = True) -> bytes:
    """A standard query for one name and type (class IN)."""
    flags = FLAG_RD if recursion else 0
    question = encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    return HEADER.pack(ident, flags, 1, 0, 0, 0) + question


@dataclass(frozen=True, slots=True)
class Record:
    rtype: int
    ttl: int
    rdata: bytes


def address_record(address: ipaddress.IPv4Address | ipaddress.IPv6Address, ttl: int) -> Record:
    rtype = TYPE_A if address.version == 4 else TYPE_AAAA
    return Record(rtype, ttl, address.packed)


def ptr_record(name: str, ttl: int) -> Record:
    return Record(TYPE_PTR, ttl, encode_name(name))


def build_response(query: Message, rcode: int, answers: tuple[Record, ...] = ()) -> bytes:
    """A response to ``query``: its id, opcode, RD bit and question, RA set, the given
    rcode and answers (owner: the question's name, by a pointer to it)."""
    flags = FLAG_QR | FLAG_RA | (query.flags & (0x7800 | FLAG_RD)) | (rcode & 0xF)
    question = query.question
    qd = 1 if question is not None else 0
    body = bytearray(question.wire if question is not None else b"")
    for record in answers:
        body += b"\xc0\x0c"  # the question's name, at offset 12
        body += struct.pack("!HHIH", record.rtype, CLASS_IN, record.ttl, len(record.rdata))
        body += record.rdata
    return HEADER.pack(query.ident, flags, qd, len(answers), 0, 0) + bytes(body)


def error_response(data: bytes, rcode: int) -> bytes | None:
    """An answer with ``rcode`` and no question for a message that could not be
    parsed, or None when there is no header to answer."""
    if len(data) < HEADER_LENGTH:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    flags = FLAG_QR | FLAG_RA | (flags & (0x7800 | FLAG_RD)) | (rcode & 0xF)
    return HEADER.pack(ident, flags, 0, 0, 0, 0)


def parse_answers(data: bytes) -> list[tuple[str, int, bytes]]:
    """Every answer record of a response: (owner, type, rdata). For tests and logs."""
    message = parse_message(data)
    pos = HEADER_LENGTH
    if message.question is not None:
        pos += len(message.question.wire)
    out: list[tuple[str, int, bytes]] = []
    for _ in range(message.counts[1]):
        owner, pos = read_name(data, pos)
        if pos + 10 > len(data):
            raise DnsFormatError("record runs past the end of the message")
        rtype, _rclass, _ttl, size = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if pos + size > len(data):
            raise DnsFormatError("rdata runs past the end of the message")
        out.append((owner, rtype, data[pos : pos + size]))
        pos += size
    return out


def reverse_name_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a PTR name (``d.c.b.a.in-addr.arpa``, nibbles ``.ip6.arpa``) stands
    for, or None when the name is not a complete reverse name."""
    if name.endswith(".in-addr.arpa"):
        parts = name[: -len(".in-addr.arpa")].split(".")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
            return None
        try:
            return ipaddress.IPv4Address(".".join(reversed(parts)))
        except ValueError:
            return None
    if name.endswith(".ip6.arpa"):
        nibbles = name[: -len(".ip6.arpa")].split(".")
        if len(nibbles) != 32 or not all(len(n) == 1 for n in nibbles):
            return None
        try:
            return ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
        except ValueError:
            return None
    return None
