"""IP literals in every spelling a client, a URL parser or ``inet_aton`` accepts.

A destination host from CONNECT, SOCKS or a Host header is either an IP literal, which
is classified (``pyegress.policy.special``) and dialed as is, or a DNS name, which is
resolved first. The dangerous case is text that *some* stack reads as an address while
we would send it to DNS: ``2130706433``, ``0x7f.1`` and ``017700000001`` are all
``127.0.0.1`` to ``inet_aton``. :func:`parse_host_literal` therefore decides for every
host, with no middle ground: an address, a DNS name (``None``), or
:class:`~pyegress.errors.LocalProtocolError` (HTTP 400). A host that raises must never
be sent to DNS.

Grammar, applied in this order to ``host`` (a host without port):

1. Empty, or containing whitespace or a control character (C0, DEL, C1): error
   (glibc's ``inet_aton`` ignores anything after a space: ``"127.0.0.1 x"``).
2. Containing ``%``: error. This is an IPv6 zone id (``fe80::1%eth0``, or the URL form
   ``%25eth0``) or percent-encoding; neither is accepted, as a zone id would let the
   client pick the DMZ's interface and no DNS name contains ``%``.
3. Non-ASCII: folded with NFKC plus the IDNA dot separators (U+3002, U+FF0E, U+FF61).
   If the folded text is an IP literal by the rules below (fullwidth digits,
   ``127。0。0。1``) it is an error, as IDNA processing would turn it into the ASCII
   address; if the folded text is an error by those rules, so is the host; otherwise
   it is an internationalised name (``None``).
4. ``[...]``: the inside must be an IPv6 address (RFC 3986 ``IP-literal``), else error;
   ``[1.2.3.4]``, ``[]``, unbalanced or stray brackets are errors.
5. Containing ``:``: an unbracketed IPv6 address (hex digits, ``:`` and a final dotted
   quad only, as ``inet_pton`` reads it, e.g. ``::ffff:127.0.0.1``), else error. A DNS
   name never contains ``:``; a port must have been split off by the caller.
6. Otherwise one trailing dot is removed (``127.0.0.1.`` is ``127.0.0.1``) and the rest
   is split into labels at ``.``. A label is *numeric* if it is ``[0-9]+`` or
   ``0[xX][0-9a-fA-F]*`` (ASCII only). The host is **numeric-looking** when its last
   label is numeric (the WHATWG URL "ends in a number" rule, which covers every host
   whose labels are all numeric). A numeric-looking host must be a valid IPv4 address
   in ``inet_aton`` syntax, else it is an error: so ``0x1g.1``, ``1.2.3.4.5`` and
   ``example.123`` are errors, while ``1e100.net``, ``123.example`` and ``0x7f.example``
   are names. A host that is not numeric-looking is a DNS name (``None``), unless it
   has an empty label (``a..b``, ``.a``): that is an error, it is not a valid name.

IPv4 in ``inet_aton`` syntax: one to four parts separated by dots. A part is decimal,
octal when it starts with ``0`` (``0177`` = 127; ``08`` is an error) or hexadecimal
after ``0x``/``0X`` (case-insensitive, at least one digit: ``0x`` is an error). Leading
zeros are allowed in any base. Every part but the last is one byte (0-255); the last
fills the remaining bytes: ``a`` is 32 bits, ``a.b`` is 8+24, ``a.b.c`` is 8+8+16.
Examples: ``127.1``, ``2130706433``, ``0x7f000001``, ``017700000001`` and ``0177.0.0.1``
are all ``127.0.0.1``; ``01.02.03.04`` is ``1.2.3.4``; ``0`` is ``0.0.0.0``.

IPv6 addresses are returned as parsed (``::ffff:127.0.0.1`` stays an IPv6 address;
:func:`pyegress.policy.special.classify` looks at the IPv4 inside).
"""

from __future__ import annotations

import re
import unicodedata
from ipaddress import IPv4Address, IPv6Address

from pyegress.errors import LocalProtocolError

__all__ = ["canonical", "parse_host_literal"]

_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*", re.ASCII)
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
# The longest IPv6 text inet_pton accepts: six 4-digit groups and a dotted quad.
_IPV6_MAX_LEN = 45
# Dots IDNA (UTS 46) maps to U+002E; NFKC already maps U+FF0E and U+FF61 (to U+3002).
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# Significant digits (after leading zeros) that can still fit in 32 bits.
_MAX_DIGITS = {16: 8, 10: 10, 8: 11}


class _Malformed(Exception):
    """Internal: the reason a host is not acceptable."""


def _show(text: str, limit: int = 80) -> str:
    """``repr`` of untrusted text, shortened for error messages."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _is_control_or_space(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code < 0xA0 or ch.isspace()


def _ends_in_number(text: str) -> bool:
    """True if the last label (one trailing dot removed) is a numeric label."""
    body = text[:-1] if text.endswith(".") else text
    return _NUMERIC_LABEL.fullmatch(body.rpartition(".")[2]) is not None


def _part_value(part: str) -> int:
    if not _NUMERIC_LABEL.fullmatch(part):
        raise _Malformed(f"{_show(part)} is not a number")
    if part[:2] in ("0x", "0X"):
        base, digits = 16, part[2:]
        if not digits:
            raise _Malformed(f"{_show(part)} has no hex digits")
    elif len(part) > 1 and part[0] == "0":
        base, digits = 8, part[1:]
        if "8" in digits or "9" in digits:
            raise _Malformed(f"{_show(part)} is not octal (a leading 0 means octal)")
    else:
        base, digits = 10, part
    digits = digits.lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS[base]:
        raise _Malformed(f"{_show(part)} is out of range")
    return int(digits, base)


def _parse_ipv4(body: str) -> IPv4Address:
    """``inet_aton`` syntax (trailing dot already removed)."""
    parts = body.split(".")
    if len(parts) > 4:
        raise _Malformed(f"{len(parts)} parts, an IPv4 address has at most 4")
    values = [_part_value(part) for part in parts]
    *head, last = values
    value = 0
    for byte in head:
        if byte > 0xFF:
            raise _Malformed(f"part {byte} is larger than 255")
        value = value << 8 | byte
    tail_bits = 8 * (4 - len(head))
    if last >= 1 << tail_bits:
        raise _Malformed(f"last part {last} does not fit in {tail_bits} bits")
    return IPv4Address(value << tail_bits | last)


def _parse_ipv6(text: str) -> IPv6Address:
    if ":" not in text:
        raise _Malformed("not an IPv6 address")
    if len(text) > _IPV6_MAX_LEN or not set(text) <= _IPV6_CHARS:
        raise _Malformed("invalid IPv6 address")
    try:
        return IPv6Address(text)
    except ValueError:
        raise _Malformed("invalid IPv6 address") from None


def _parse(text: str) -> IPv4Address | IPv6Address | None:
    """Steps 4-6 of the grammar on ASCII (or folded) text."""
    if "[" in text or "]" in text:
        if not (text.startswith("[") and text.endswith("]")):
            raise _Malformed("unbalanced or stray brackets")
        inner = text[1:-1]
        if "[" in inner or "]" in inner:
            raise _Malformed("unbalanced or stray brackets")
        if ":" not in inner:
            raise _Malformed("brackets may only enclose an IPv6 address")
        return _parse_ipv6(inner)
    if ":" in text:
        return _parse_ipv6(text)
    body = text[:-1] if text.endswith(".") else text
    if _ends_in_number(text):
        try:
            return _parse_ipv4(body)
        except _Malformed as exc:
            raise _Malformed(f"numeric but not an IPv4 address ({exc})") from None
    if "" in body.split("."):
        raise _Malformed("empty label")
    return None


def parse_host_literal(host: str) -> IPv4Address | IPv6Address | None:
    """The address ``host`` spells, ``None`` if it is a DNS name (see the module docstring).

    Raises :class:`~pyegress.errors.LocalProtocolError` (HTTP 400) naming the host if it
    is neither: a malformed numeric host, an IPv6 zone id, brackets around anything but
    IPv6, whitespace or control characters, an empty label, or a non-ASCII spelling of
    an address. Such a host must never be sent to DNS. Raises nothing else.
    """
    try:
        if not host:
            raise _Malformed("empty host")
        for ch in host:
            if _is_control_or_space(ch):
                raise _Malformed(f"whitespace or control character {ch!r}")
        if "%" in host:
            if ":" in host:
                raise _Malformed("IPv6 zone identifiers are not accepted")
            raise _Malformed("'%' is not allowed in a host")
        if host.isascii():
            return _parse(host)
        folded = unicodedata.normalize("NFKC", host).translate(_IDNA_DOTS)
        try:
            address = _parse(folded)
        except _Malformed as exc:
            raise _Malformed(f"{exc} (after Unicode folding to {_show(folded)})") from None
        if address is not None:
            raise _Malformed(f"non-ASCII spelling of IP address {canonical(address)}")
        return None  # an internationalised name; IDNA checks happen elsewhere
    except _Malformed as exc:
        raise LocalProtocolError(f"invalid host {_show(host)}: {exc}") from None


def canonical(address: IPv4Address | IPv6Address) -> str:
    """The address as text for logs: IPv4 dotted decimal; IPv6 compressed (RFC 5952).

    IPv6 is lower-case, without leading zeros, the longest run of two or more zero
    groups (the first one on a tie) written ``::``; IPv4-mapped addresses keep the IPv4
    part dotted (``::ffff:127.0.0.1``, RFC 5952 section 5). A zone id is dropped. The
    same on every Python version (``str()`` of mapped addresses changed in 3.13).
    """
    if isinstance(address, IPv4Address):
        return str(address)
    value = int(address)
    if value >> 32 == 0xFFFF:
        return f"::ffff:{IPv4Address(value & 0xFFFF_FFFF)}"
    groups = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best_start, best_len = -1, 1
    i = 0
    while i < 8:
        if groups[i]:
            i += 1
            continue
        j = i
        while j < 8 and not groups[j]:
            j += 1
        if j - i > best_len:
            best_start, best_len = i, j - i
        i = j
    text = [f"{g:x}" for g in groups]
    if best_start < 0:
        return ":".join(text)
    head = ":".join(text[:best_start])
    tail = ":".join(text[best_start + best_len :])
    return f"{head}::{tail}"
