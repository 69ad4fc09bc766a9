"""TLS ClientHello sniffing: record reassembly and the fields a proxy routes on.

Reads the first flight of a TLS client without terminating TLS: the record layer of
RFC 8446 section 5.1 (a handshake message may be split over several handshake records,
and records over arbitrary reads), the ClientHello of RFC 8446 section 4.1.2 (same
layout as RFC 5246 section 7.4.1.2, where the extensions block is optional), and the
extensions server_name (RFC 6066 section 3), application_layer_protocol_negotiation
(RFC 7301 section 3.1), supported_versions (RFC 8446 section 4.2.1) and
encrypted_client_hello (its presence only). Every other extension is skipped unread.

:func:`parse_client_hello` takes the bytes received so far and returns None until the
whole ClientHello is there; malformed bytes raise :class:`LocalProtocolError`. The
bytes are never consumed: the caller forwards them unchanged to the chosen upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyegress.errors import LocalProtocolError

__all__ = [
    "CONTENT_TYPE_HANDSHAKE",
    "EXT_ALPN",
    "EXT_ENCRYPTED_CLIENT_HELLO",
    "EXT_SERVER_NAME",
    "EXT_SUPPORTED_VERSIONS",
    "HANDSHAKE_CLIENT_HELLO",
    "MAX_RECORD_LENGTH",
    "RECORD_HEADER_LENGTH",
    "ClientHello",
    "looks_like_tls",
    "parse_client_hello",
]

CONTENT_TYPE_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 1
RECORD_HEADER_LENGTH = 5

# RFC 8446 section 5.1 caps a plaintext record at 2^14 bytes; we tolerate the
# ciphertext bound of RFC 5246 section 6.2.3 (2^14 + 2048) from lax clients.
MAX_RECORD_LENGTH = 2**14 + 2048

# Extension types (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D

_NAME_TYPE_HOST_NAME = 0

# Bytes allowed in a server name: printable ASCII without space and without characters
# that would change the meaning of a host in a URL or a host:port pair.
_SNI_ALLOWED = bytes(b for b in range(0x21, 0x7F) if b not in b"/\\@[]?#:")

_HANDSHAKE_HEADER_LENGTH = 4


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a proxy needs from a ClientHello.

    ``sni`` is the first host_name of the server_name extension (lower-case, one
    trailing dot removed) or None; ``alpn`` the offered protocol names in order
    (decoded as latin-1, so ``name.encode("latin-1")`` gives the bytes back);
    ``supported_versions`` the versions of that extension as sent (GREASE values
    included), empty without it; ``length`` the number of bytes of the TLS records
    that carried the ClientHello, the prefix of the stream it was parsed from.
    """

    sni: str | None
    alpn: tuple[str, ...]
    has_ech: bool
    legacy_version: int
    supported_versions: tuple[int, ...]
    length: int


def _version_ok(major: int, minor: int | None) -> bool:
    return major == 3 and (minor is None or 1 <= minor <= 4)


def looks_like_tls(buf: bytes | bytearray) -> bool:
    """True unless the bytes present rule out the start of a TLS handshake record.

    Checks the content type (0x16), the record version (0x0301 to 0x0304) and the
    record length (1 to :data:`MAX_RECORD_LENGTH`) as far as ``buf`` reaches, so a
    single 0x16 byte (or no byte at all) is a "maybe" and answers True. Whenever this
    returns False, :func:`parse_client_hello` raises on the same bytes.
    """
    if len(buf) >= 1 and buf[0] != CONTENT_TYPE_HANDSHAKE:
        return False
    if len(buf) >= 2 and not _version_ok(buf[1], buf[2] if len(buf) >= 3 else None):
        return False
    if len(buf) >= RECORD_HEADER_LENGTH:
        return 1 <= int.from_bytes(buf[3:5], "big") <= MAX_RECORD_LENGTH
    return True


def _check_record_header(buf: bytes | bytearray, at: int) -> int | None:
    """Check the part of the record header at ``at`` that is present; the fragment
    length once the header is complete, else None."""
    present = len(buf) - at
    if present >= 1 and buf[at] != CONTENT_TYPE_HANDSHAKE:
        raise LocalProtocolError(
            f"not a TLS handshake record: content type 0x{buf[at]:02x} at byte {at} (expected 0x16)"
        )
    if present >= 2:
        minor = buf[at + 2] if present >= 3 else None
        if not _version_ok(buf[at + 1], minor):
            shown = f"0x{buf[at + 1]:02x}" + ("??" if minor is None else f"{minor:02x}")
            raise LocalProtocolError(
                f"TLS record at byte {at} has version {shown} (expected 0x0301-0x0304)"
            )
    if present < RECORD_HEADER_LENGTH:
        return None
    length = int.from_bytes(buf[at + 3 : at + 5], "big")
    if length == 0:
        raise LocalProtocolError(f"empty TLS handshake record at byte {at}")
    if length > MAX_RECORD_LENGTH:
        raise LocalProtocolError(
            f"TLS record at byte {at} of {length} bytes exceeds {MAX_RECORD_LENGTH}"
        )
    return length


def parse_client_hello(buf: bytes | bytearray, max_size: int = 65536) -> ClientHello | None:
    """Reassemble and parse the ClientHello at the start of ``buf``.

    Returns None while more bytes are needed. Raises :class:`LocalProtocolError` naming
    the problem for: a record that is not a handshake record (also one interleaved
    before the ClientHello is complete), a record version other than 0x0301-0x0304, an
    empty or oversized record, a handshake message other than client_hello, records
    reaching past ``max_size`` bytes before the ClientHello is complete, further data
    in the record that ends the ClientHello, and any malformed field (see
    :func:`_parse_body`). Bytes after the last record are left alone.
    """
    message = bytearray()
    total: int | None = None  # handshake header + body, known once 4 bytes are in
    at = 0
    while True:
        fragment_length = _check_record_header(buf, at)
        if fragment_length is None:
            break
        start = at + RECORD_HEADER_LENGTH
        end = start + fragment_length
        if end > max_size:
            raise LocalProtocolError(
                f"TLS ClientHello not complete within {max_size} bytes"
                f" (record at byte {at} ends at byte {end})"
            )
        message += buf[start : min(end, len(buf))]
        if total is None:
            total = _message_total(message, at, max_size)
        if total is not None and len(message) >= total:
            if len(message) > total:
                raise LocalProtocolError(
                    f"{len(message) - total} bytes follow the ClientHello in its last"
                    " TLS record (no handshake message may follow a first ClientHello)"
                )
            if end > len(buf):
                return None
            return _parse_body(bytes(message[_HANDSHAKE_HEADER_LENGTH:]), end)
        if end >= len(buf):
            break
        at = end
    if len(buf) > max_size:
        raise LocalProtocolError(f"TLS ClientHello not complete within {max_size} bytes")
    return None


def _message_total(message: bytearray, at: int, max_size: int) -> int | None:
    """Length of the handshake message (header included) once its header is in."""
    if message and message[0] != HANDSHAKE_CLIENT_HELLO:
        raise LocalProtocolError(f"TLS handshake message type {message[0]} is not client_hello (1)")
    if len(message) < _HANDSHAKE_HEADER_LENGTH:
        return None
    total = _HANDSHAKE_HEADER_LENGTH + int.from_bytes(message[1:4], "big")
    if RECORD_HEADER_LENGTH + total > max_size:
        raise LocalProtocolError(
            f"TLS ClientHello of {total - _HANDSHAKE_HEADER_LENGTH} bytes exceeds the"
            f" limit of {max_size} bytes (record at byte {at})"
        )
    return total


class _Reader:
    """Cursor over one length-delimited part of the ClientHello; every read past its
    end raises :class:`LocalProtocolError` naming the field."""

    __slots__ = ("_data", "_end", "_pos", "_what")

    def __init__(self, data: bytes, what: str, pos: int = 0, end: int | None = None) -> None:
        self._data = data
        self._what = what
        self._pos = pos
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.remaining:
            raise LocalProtocolError(
                f"TLS ClientHello {what} needs {count} bytes but {self._what} has only"
                f" {self.remaining} left"
            )
        start = self._pos
        self._pos += count
        return self._data[start : self._pos]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str, minimum: int = 0) -> _Reader:
        """A sub-reader over a vector with a ``length_size``-byte length prefix."""
        length = self.uint(length_size, f"{what} length")
        if length < minimum:
            raise LocalProtocolError(
                f"TLS ClientHello {what} of {length} bytes is shorter than {minimum}"
            )
        if length > self.remaining:
            raise LocalProtocolError(
                f"TLS ClientHello {what} length {length} overflows {self._what}"
                f" ({self.remaining} bytes left)"
            )
        start = self._pos
        self._pos += length
        return _Reader(self._data, what, start, self._pos)

    def rest(self) -> bytes:
        return self.take(self.remaining, "rest")

    def expect_end(self) -> None:
        if self.remaining:
            raise LocalProtocolError(
                f"{self.remaining} unexpected bytes at the end of TLS ClientHello {self._what}"
            )


def _parse_body(body: bytes, length: int) -> ClientHello:
    """Parse the ClientHello body (handshake header stripped).

    Malformed: a session id over 32 bytes, cipher suites of odd or zero length, no
    compression method, a vector overflowing what encloses it, bytes after the
    extensions, a duplicate extension type (RFC 8446 section 4.2) and malformed
    server_name, ALPN or supported_versions extensions.
    """
    reader = _Reader(body, "message")
    legacy_version = reader.uint(2, "legacy_version")
    reader.take(32, "random")
    session_id = reader.vector(1, "legacy_session_id")
    if session_id.remaining > 32:
        raise LocalProtocolError(
            f"TLS ClientHello session id of {session_id.remaining} bytes (at most 32)"
        )
    suites = reader.vector(2, "cipher_suites", minimum=2)
    if suites.remaining % 2:
        raise LocalProtocolError(f"TLS ClientHello cipher_suites of odd length {suites.remaining}")
    reader.vector(1, "legacy_compression_methods", minimum=1)

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    has_ech = False
    if reader.remaining:  # RFC 5246 section 7.4.1.2: the extensions block may be absent
        extensions = reader.vector(2, "extensions")
        reader.expect_end()
        seen: set[int] = set()
        while extensions.remaining:
            ext_type = extensions.uint(2, "extension type")
            data = extensions.vector(2, f"extension 0x{ext_type:04x}")
            if ext_type in seen:
                raise LocalProtocolError(f"duplicate TLS extension 0x{ext_type:04x}")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                sni = _parse_server_name(data)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(data)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(data)
            elif ext_type == EXT_ENCRYPTED_CLIENT_HELLO:
                has_ech = True
    return ClientHello(
        sni=sni,
        alpn=alpn,
        has_ech=has_ech,
        legacy_version=legacy_version,
        supported_versions=versions,
        length=length,
    )


def _parse_server_name(data: _Reader) -> str | None:
    """RFC 6066 section 3 ServerNameList: the first host_name entry, checked and
    normalised; entries of other name types are skipped."""
    names = data.vector(2, "server_name list", minimum=1)
    data.expect_end()
    first: bytes | None = None
    while names.remaining:
        name_type = names.uint(1, "server name type")
        name = names.vector(2, "server name").rest()
        if name_type == _NAME_TYPE_HOST_NAME and first is None:
            first = name
    if first is None:
        return None
    return _decode_server_name(first)


def _decode_server_name(raw: bytes) -> str:
    shown = repr(raw[:80].decode("latin-1")) + ("..." if len(raw) > 80 else "")
    bad = raw.translate(None, _SNI_ALLOWED)
    if bad:
        if bad[0] >= 0x80:
            raise LocalProtocolError(
                f"TLS server name {shown} contains non-ASCII byte 0x{bad[0]:02x};"
                " internationalised names must be sent as punycode (xn--...)"
            )
        raise LocalProtocolError(f"TLS server name {shown} contains invalid byte 0x{bad[0]:02x}")
    name = raw.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise LocalProtocolError(f"empty TLS server name {shown}")
    return name


def _parse_alpn(data: _Reader) -> tuple[str, ...]:
    """RFC 7301 section 3.1 ProtocolNameList of non-empty names."""
    names = data.vector(2, "ALPN protocol list", minimum=2)
    data.expect_end()
    protocols: list[str] = []
    while names.remaining:
        protocols.append(names.vector(1, "ALPN protocol name", minimum=1).rest().decode("latin-1"))
    return tuple(protocols)


def _parse_supported_versions(data: _Reader) -> tuple[int, ...]:
    """RFC 8446 section 4.2.1, client form: ``ProtocolVersion versions<2..254>``."""
    versions = data.vector(1, "supported_versions list", minimum=2)
    data.expect_end()
    if versions.remaining % 2:
        raise LocalProtocolError(f"TLS supported_versions list of odd length {versions.remaining}")
    return tuple(versions.uint(2, "version") for _ in range(versions.remaining // 2))
