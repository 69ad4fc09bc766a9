"""TLS ClientHello sniffing (pyegress.protocols.tls_hello)."""

from __future__ import annotations

import random
import ssl
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyegress.errors import LocalProtocolError
from pyegress.protocols.tls_hello import (
    EXT_ALPN,
    EXT_ENCRYPTED_CLIENT_HELLO,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    MAX_RECORD_LENGTH,
    ClientHello,
    looks_like_tls,
    parse_client_hello,
)

FUZZ = settings(max_examples=250, deadline=None)

EXT_PADDING = 21
TLS13 = 0x0304
TLS12 = 0x0303


# --------------------------------------------------------------------------- builders


def u8v(data: bytes) -> bytes:
    return bytes((len(data),)) + data


def u16v(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + u16v(data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(EXT_SERVER_NAME, u16v(b"".join(bytes((name_type,)) + u16v(n) for n in names)))


def alpn_ext(*names: bytes) -> bytes:
    return ext(EXT_ALPN, u16v(b"".join(u8v(n) for n in names)))


def versions_ext(*versions: int) -> bytes:
    return ext(EXT_SUPPORTED_VERSIONS, u8v(b"".join(v.to_bytes(2, "big") for v in versions)))


def hello_body(
    extensions: bytes | None = b"",
    *,
    legacy_version: int = TLS12,
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression: bytes = b"\x00",
) -> bytes:
    """ClientHello body; ``extensions`` None leaves the extensions block out."""
    body = (
        legacy_version.to_bytes(2, "big")
        + bytes(range(32))
        + u8v(session_id)
        + u16v(suites)
        + u8v(compression)
    )
    if extensions is not None:
        body += u16v(extensions)
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: Iterable[int] = (), version: bytes = b"\x03\x01") -> bytes:
    """Wrap ``message`` in handshake records of the given fragment sizes (the last size
    repeats; default: one record per 2^14 bytes)."""
    sizes = list(sizes) or [2**14]
    out = bytearray()
    at = 0
    index = 0
    while at < len(message):
        size = sizes[min(index, len(sizes) - 1)]
        chunk = message[at : at + size]
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        at += size
        index += 1
    return bytes(out)


def unwrap(stream: bytes) -> bytes:
    """The handshake bytes carried by a stream of handshake records."""
    out = bytearray()
    at = 0
    while at < len(stream):
        assert stream[at] == 0x16
        length = int.from_bytes(stream[at + 3 : at + 5], "big")
        out += stream[at + 5 : at + 5 + length]
        at += 5 + length
    return bytes(out)


def resplit(stream: bytes, rng: random.Random, largest: int) -> bytes:
    """The same handshake bytes in records of 1..``largest`` bytes each."""
    message = unwrap(stream)
    out = bytearray()
    at = 0
    while at < len(message):
        size = rng.randint(1, largest)
        out += records(message[at : at + size])
        at += size
    return bytes(out)


def add_extension(stream: bytes, ext_type: int, data: bytes) -> bytes:
    """The ClientHello carried by ``stream`` with extension ``ext_type`` (dropped
    where it was, if present) appended, lengths fixed up, in records of 2^14 bytes."""
    body = unwrap(stream)[4:]
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + int.from_bytes(body[at : at + 2], "big")
    at += 1 + body[at]
    kept = bytearray()
    pos = at + 2
    while pos < len(body):
        size = 4 + int.from_bytes(body[pos + 2 : pos + 4], "big")
        if int.from_bytes(body[pos : pos + 2], "big") != ext_type:
            kept += body[pos : pos + size]
        pos += size
    return records(handshake(body[:at] + u16v(bytes(kept) + ext(ext_type, data))))


def single_message(stream: bytes) -> bool:
    """True if ``stream`` is whole handshake records carrying exactly one message."""
    at = 0
    while at < len(stream):
        if stream[at] != 0x16 or len(stream) < at + 5:
            return False
        at += 5 + int.from_bytes(stream[at + 3 : at + 5], "big")
    if at != len(stream):
        return False
    message = unwrap(stream)
    return len(message) == 4 + int.from_bytes(message[1:4], "big")


def real_hello(
    server_hostname: str | None,
    alpn: Sequence[str] = ("h2", "http/1.1"),
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of Python's ssl module (OpenSSL), captured in memory."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    else:  # pragma: no cover - nobody answered, the handshake cannot complete
        raise AssertionError("handshake completed without a server")
    return outgoing.read()


REAL_HELLO = real_hello("example.com")


def parse(stream: bytes | bytearray, max_size: int = 65536) -> ClientHello:
    result = parse_client_hello(stream, max_size)
    assert result is not None
    return result


def assert_prefixes_incomplete(stream: bytes, max_size: int = 65536) -> None:
    for cut in range(len(stream)):
        assert parse_client_hello(stream[:cut], max_size) is None, cut


# --------------------------------------------------------------------------- looks_like_tls


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x16\x03\x01", True),
        (b"\x16", True),
        (b"", True),
        (b"\x16\x03", True),
        (b"\x16\x03\x04", True),
        (b"\x16\x03\x01\x02\x00\x01", True),
        (b"GET ", False),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", False),
        (b"\x05", False),
        (b"\x05\x01\x00", False),
        (b"\x04\x01\x01\xbb", False),
        (b"\x16\x02", False),
        (b"\x16\x03\x00", False),
        (b"\x16\x03\x05", False),
        (b"\x17\x03\x03", False),
        (b"\x80\x2e\x01\x03\x01", False),  # SSLv2-compatible ClientHello
        (b"\x16\x03\x01\x00\x00", False),  # empty record
        (b"\x16\x03\x01\xff\xff", False),  # record too long
    ],
)
def test_looks_like_tls(raw: bytes, expected: bool) -> None:
    assert looks_like_tls(raw) is expected
    assert looks_like_tls(bytearray(raw)) is expected


def test_looks_like_tls_real_hello() -> None:
    for cut in range(len(REAL_HELLO) + 1):
        assert looks_like_tls(REAL_HELLO[:cut])


@FUZZ
@given(st.binary(max_size=5))
def test_looks_like_tls_agrees_with_parser(raw: bytes) -> None:
    # Up to one record header, the parser raises exactly when looks_like_tls says no.
    try:
        result = parse_client_hello(raw)
    except LocalProtocolError:
        assert not looks_like_tls(raw)
    else:
        assert result is None
        assert looks_like_tls(raw)


# --------------------------------------------------------------------------- real clients


def test_real_hello() -> None:
    hello = parse(REAL_HELLO)
    assert hello.sni == "example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert TLS13 in hello.supported_versions
    assert hello.legacy_version == TLS12
    assert hello.has_ech is False
    assert hello.length == len(REAL_HELLO)
    assert parse(bytearray(REAL_HELLO)) == hello


def test_real_hello_prefixes_incomplete() -> None:
    assert_prefixes_incomplete(REAL_HELLO)


def test_real_hello_surplus_left_alone() -> None:
    # Whatever follows the ClientHello (early data, a CCS record) is not looked at.
    for surplus in (b"\x17\x03\x03\x00\x05hello", b"\x14\x03\x03\x00\x01\x01", b"junk"):
        hello = parse(REAL_HELLO + surplus)
        assert hello.sni == "example.com"
        assert hello.length == len(REAL_HELLO)


@pytest.mark.parametrize("server_hostname", [None, "192.0.2.1", "2001:db8::1", "::1"])
def test_real_hello_without_sni(server_hostname: str | None) -> None:
    hello = parse(real_hello(server_hostname))
    assert hello.sni is None
    assert hello.alpn == ("h2", "http/1.1")


def test_real_hello_without_alpn() -> None:
    hello = parse(real_hello("api.internal.example", alpn=()))
    assert hello.sni == "api.internal.example"
    assert hello.alpn == ()


def test_real_hello_idn_as_punycode() -> None:
    assert parse(real_hello("b\u00fccher.example")).sni == "xn--bcher-kva.example"


def test_real_hello_tls12_only() -> None:
    hello = parse(real_hello("legacy.example", maximum_version=ssl.TLSVersion.TLSv1_2))
    assert hello.sni == "legacy.example"
    assert TLS13 not in hello.supported_versions


@pytest.mark.parametrize("largest", [1, 2, 3, 7, 64])
def test_resplit_records_byte_by_byte(largest: int) -> None:
    expected = parse(REAL_HELLO)
    stream = resplit(REAL_HELLO, random.Random(largest), largest)
    assert stream != REAL_HELLO
    assert_prefixes_incomplete(stream)
    hello = parse(stream)
    assert hello.length == len(stream)
    assert hello == ClientHello(
        sni=expected.sni,
        alpn=expected.alpn,
        has_ech=expected.has_ech,
        legacy_version=expected.legacy_version,
        supported_versions=expected.supported_versions,
        length=len(stream),
    )
    # Surplus after the records changes nothing.
    assert parse(stream + b"\x17\x03\x03\x00\x01x") == hello


def test_large_hello_with_padding() -> None:
    stream = add_extension(REAL_HELLO, EXT_PADDING, bytes(3000))
    assert len(unwrap(stream)) > 3200
    expected = parse(stream)
    assert expected.sni == "example.com"
    assert expected.alpn == ("h2", "http/1.1")
    for sizes in ([1024], [1500, 7, 1], [512, 1]):
        split = records(unwrap(stream), sizes)
        assert split.count(b"\x16\x03\x01") >= 4
        assert parse(split).sni == "example.com"
        assert parse(split).length == len(split)
        for cut in range(0, len(split), 97):
            assert parse_client_hello(split[:cut]) is None
    # Past 2^14 bytes the ClientHello needs several records by necessity.
    huge = add_extension(REAL_HELLO, EXT_PADDING, bytes(20000))
    assert len(huge) > 2**14 + 10
    assert huge.count(b"\x16\x03\x01") >= 2
    hello = parse(huge)
    assert (hello.sni, hello.length) == ("example.com", len(huge))
    assert parse_client_hello(huge[:-1]) is None


def test_max_size() -> None:
    assert parse(REAL_HELLO, max_size=len(REAL_HELLO)).sni == "example.com"
    with pytest.raises(LocalProtocolError, match=f"within {len(REAL_HELLO) - 1} bytes"):
        parse_client_hello(REAL_HELLO, max_size=len(REAL_HELLO) - 1)
    # Declared message length alone can rule it out, before the bytes arrive.
    with pytest.raises(LocalProtocolError, match="exceeds the limit"):
        parse_client_hello(records(unwrap(REAL_HELLO), [4])[:9], max_size=100)
    # Many small records: the record overhead counts against the limit.
    stream = resplit(REAL_HELLO, random.Random(1), 8)
    with pytest.raises(LocalProtocolError, match="not complete within"):
        parse_client_hello(stream, max_size=len(stream) - 1)
    for cut in range(len(stream)):
        assert parse_client_hello(stream[:cut], max_size=len(stream)) is None


# --------------------------------------------------------------------------- synthetic


def test_synthetic_hello_fields() -> None:
    extensions = (
        sni_ext(b"Example.COM.")
        + alpn_ext(b"h2", b"http/1.1", b"\xff\x00")
        + versions_ext(0x0A0A, TLS13, TLS12)
        + ext(EXT_ENCRYPTED_CLIENT_HELLO, b"\x00\x01\x02")
        + ext(0x0A0A, b"")  # GREASE extension, empty
    )
    stream = records(handshake(hello_body(extensions, legacy_version=0x0301)))
    assert parse(stream) == ClientHello(
        sni="example.com",
        alpn=("h2", "http/1.1", "\xff\x00"),
        has_ech=True,
        legacy_version=0x0301,
        supported_versions=(0x0A0A, TLS13, TLS12),
        length=len(stream),
    )
    assert parse(stream).alpn[2].encode("latin-1") == b"\xff\x00"


@pytest.mark.parametrize("extensions", [None, b""])
def test_hello_without_extensions(extensions: bytes | None) -> None:
    stream = records(handshake(hello_body(extensions, session_id=b"")))
    assert parse(stream) == ClientHello(
        sni=None,
        alpn=(),
        has_ech=False,
        legacy_version=TLS12,
        supported_versions=(),
        length=len(stream),
    )
    assert_prefixes_incomplete(stream)


@pytest.mark.parametrize(
    ("extension", "sni"),
    [
        (sni_ext(b"example.com"), "example.com"),
        (sni_ext(b"EXAMPLE.com"), "example.com"),
        (sni_ext(b"example.com."), "example.com"),
        (sni_ext(b"xn--bcher-kva.example"), "xn--bcher-kva.example"),
        (sni_ext(b"_acme.example-1.test"), "_acme.example-1.test"),
        (sni_ext(b"first.example", b"second.example"), "first.example"),
        # Entries of unknown name types are skipped; no host_name at all gives None.
        (
            ext(EXT_SERVER_NAME, u16v(b"\x07" + u16v(b"x") + b"\x00" + u16v(b"b.example"))),
            "b.example",
        ),
        (sni_ext(b"other", name_type=7), None),
    ],
)
def test_server_name(extension: bytes, sni: str | None) -> None:
    assert parse(records(handshake(hello_body(extension)))).sni == sni


def malformed_cases() -> list[tuple[bytes, str]]:
    good = hello_body(sni_ext(b"example.com"))
    return [
        (b"\x17\x03\x03\x00\x05hello", "content type 0x17"),
        (b"\x15\x03\x01\x00\x02\x02\x28", "content type 0x15"),
        (b"\x16\x02\x00", "version 0x0200"),
        (b"\x16\x03\x00", "version 0x0300"),
        (b"\x16\x04", "version 0x04??"),
        (b"\x16\x03\x01\x00\x00", "empty"),
        (b"\x16\x03\x01\x48\x01", "exceeds"),
        (records(handshake(good, msg_type=2)), "type 2"),
        (records(handshake(good, msg_type=0))[:6], "type 0"),
        # A record of another type interleaved before the ClientHello is complete.
        (records(handshake(good), [10])[:15] + b"\x15\x03\x03\x00\x02\x02\x28", "0x15"),
        # The last record carries more than the ClientHello.
        (records(handshake(good) + b"\x0b\x00\x00\x00"), "follow the ClientHello"),
        (records(handshake(good)[:-3] + b"\x00\x00\x00\x00"), "follow the ClientHello"),
        # Handshake message too short for its fields.
        (records(handshake(b"\x03\x03")), "random"),
        (records(handshake(good[:40])), "legacy_session_id"),
        (records(handshake(b"")), "legacy_version"),
        (records(handshake(hello_body(session_id=bytes(33)))), "session id"),
        (records(handshake(hello_body(suites=b""))), "cipher_suites"),
        (records(handshake(hello_body(suites=b"\x13\x01\x13"))), "odd"),
        (records(handshake(hello_body(compression=b""))), "compression"),
        # Vector lengths overflowing what encloses them.
        (records(handshake(hello_body(None) + b"\x00\x10" + ext(EXT_PADDING, b""))), "overflows"),
        (records(handshake(hello_body(None) + b"\x00")), "extensions length"),
        (records(handshake(hello_body(b"\x00\x15\x00\x09abc"))), "overflows"),
        (records(handshake(hello_body(b"\x00\x15"))), "extension 0x0015 length"),
        (records(handshake(hello_body(b"\x00"))), "extension type"),
        (records(handshake(hello_body(b"") + b"\x00")), "unexpected bytes"),
        (records(handshake(hello_body(None, session_id=b"") + b"x")), "extensions length"),
        (records(handshake(hello_body(session_id=b"") + b"x")), "end of TLS ClientHello message"),
        # Duplicate extensions, known and unknown.
        (records(handshake(hello_body(sni_ext(b"a.example") + sni_ext(b"b.example")))), "dup"),
        (records(handshake(hello_body(ext(EXT_PADDING, b"") * 2))), "duplicate"),
        # server_name
        (records(handshake(hello_body(sni_ext(b"")))), "empty"),
        (records(handshake(hello_body(sni_ext(b".")))), "empty"),
        (records(handshake(hello_body(sni_ext(b"exa mple.com")))), "0x20"),
        (records(handshake(hello_body(sni_ext(b"example.com\x00.evil")))), "0x00"),
        (records(handshake(hello_body(sni_ext(b"evil.example/path")))), "0x2f"),
        (records(handshake(hello_body(sni_ext(b"user@evil.example")))), "0x40"),
        (records(handshake(hello_body(sni_ext(b"evil.example:443")))), "0x3a"),
        (records(handshake(hello_body(sni_ext("b\u00fccher".encode())))), "punycode"),
        (records(handshake(hello_body(ext(EXT_SERVER_NAME, b"")))), "server_name list length"),
        (records(handshake(hello_body(ext(EXT_SERVER_NAME, b"\x00\x00")))), "shorter"),
        (records(handshake(hello_body(ext(EXT_SERVER_NAME, b"\x00\x05\x00\x00\x05ab")))), "over"),
        (
            records(handshake(hello_body(ext(EXT_SERVER_NAME, u16v(b"\x00" + u16v(b"a")) + b"x")))),
            "unexpected",
        ),
        # ALPN
        (records(handshake(hello_body(alpn_ext(b"h2", b"")))), "shorter"),
        (records(handshake(hello_body(alpn_ext()))), "shorter"),
        (records(handshake(hello_body(ext(EXT_ALPN, b"\x00\x03\x05h2")))), "overflows"),
        # supported_versions
        (records(handshake(hello_body(versions_ext()))), "shorter"),
        (records(handshake(hello_body(ext(EXT_SUPPORTED_VERSIONS, b"\x03\x03\x04\x03")))), "odd"),
        (records(handshake(hello_body(ext(EXT_SUPPORTED_VERSIONS, b"\x04\x03\x04")))), "overflows"),
        (
            records(handshake(hello_body(ext(EXT_SUPPORTED_VERSIONS, b"\x02\x03\x04\x00")))),
            "unexpected",
        ),
    ]


@pytest.mark.parametrize(("raw", "named"), malformed_cases())
def test_malformed(raw: bytes, named: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_client_hello(raw)
    assert named.lower() in str(info.value).lower()
    assert info.value.http_status == 400
    # The same handshake message split into small records fails the same way.
    if single_message(raw):
        with pytest.raises(LocalProtocolError) as info:
            parse_client_hello(resplit(raw, random.Random(0), 5))
        assert named.lower() in str(info.value).lower()


def test_malformed_record_in_later_record() -> None:
    message = handshake(hello_body(sni_ext(b"example.com")))
    stream = records(message, [20])
    with pytest.raises(LocalProtocolError, match="byte 25"):
        parse_client_hello(stream[:25] + b"\x17" + stream[26:])
    with pytest.raises(LocalProtocolError, match="version"):
        parse_client_hello(stream[:26] + b"\x02" + stream[27:])
    with pytest.raises(LocalProtocolError, match="empty"):
        parse_client_hello(stream[:25] + b"\x16\x03\x03\x00\x00")


def test_record_length_limit() -> None:
    base = len(handshake(hello_body(ext(EXT_PADDING, b""))))
    message = handshake(hello_body(ext(EXT_PADDING, bytes(MAX_RECORD_LENGTH - base))))
    stream = records(message, [MAX_RECORD_LENGTH])
    assert int.from_bytes(stream[3:5], "big") == MAX_RECORD_LENGTH
    assert parse(stream).length == len(stream)
    too_long = b"\x16\x03\x01" + (MAX_RECORD_LENGTH + 1).to_bytes(2, "big")
    with pytest.raises(LocalProtocolError, match="exceeds"):
        parse_client_hello(too_long)
    assert not looks_like_tls(too_long)


@pytest.mark.parametrize(
    ("prefix", "named"),
    [
        (b"\x17", "content type"),
        (b"\x16\x02", "version"),
        (b"\x16\x03\x01\x00\x40\x02", "type 2"),
        (b"\x16\x03\x01\x00\x01\x02", "type 2"),
        (b"\x16\x03\x01\x00\x01\x01\x16\x03\x01\x00\x03\x01\x00\x00", "exceeds the limit"),
    ],
)
def test_errors_raised_early(prefix: bytes, named: str) -> None:
    # Wrong bytes are reported as soon as they arrive, not when the hello is whole.
    with pytest.raises(LocalProtocolError, match=named):
        parse_client_hello(prefix, max_size=200)


# --------------------------------------------------------------------------- fuzzing


def check_any(raw: bytes | bytearray) -> None:
    """Any input gives None, a ClientHello within the input, or LocalProtocolError."""
    try:
        result = parse_client_hello(raw)
    except LocalProtocolError as exc:
        error: LocalProtocolError | None = exc
    else:
        error = None
    if error is not None:
        assert str(error)
        return
    assert result is None or (isinstance(result, ClientHello) and result.length <= len(raw))


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(raw: bytes) -> None:
    check_any(raw)


@FUZZ
@given(st.binary(max_size=600))
def test_random_body_in_valid_records(body: bytes) -> None:
    stream = records(handshake(body), [50])
    try:
        result = parse_client_hello(stream)
    except LocalProtocolError:
        return
    assert result is not None
    assert result.length == len(stream)


@FUZZ
@given(st.data())
def test_mutated_real_hello(data: st.DataObject) -> None:
    stream = bytearray(REAL_HELLO)
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(stream) - 1))
        stream[index] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(stream)))
    check_any(stream)
    check_any(stream[:cut])


@FUZZ
@given(st.data())
def test_mutated_split_hello(data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**32))
    stream = bytearray(resplit(REAL_HELLO, random.Random(seed), data.draw(st.integers(1, 300))))
    index = data.draw(st.integers(0, len(stream) - 1))
    stream[index] ^= data.draw(st.integers(1, 255))
    check_any(stream)


@FUZZ
@given(st.integers(0, 2**32), st.integers(1, 600), st.binary(max_size=20))
def test_random_resplit(seed: int, largest: int, surplus: bytes) -> None:
    stream = resplit(REAL_HELLO, random.Random(seed), largest)
    hello = parse(stream + surplus)
    assert (hello.sni, hello.alpn, hello.length) == (
        "example.com",
        ("h2", "http/1.1"),
        len(stream),
    )
    cut = random.Random(seed).randrange(len(stream))
    assert parse_client_hello(stream[:cut]) is None


@FUZZ
@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=4),
    st.lists(st.binary(min_size=1, max_size=20), max_size=4),
    st.binary(max_size=32),
)
def test_generated_hello(names: list[bytes], protocols: list[bytes], session_id: bytes) -> None:
    extensions = sni_ext(*names) + (alpn_ext(*protocols) if protocols else b"")
    stream = records(handshake(hello_body(extensions, session_id=session_id)), [33])
    first = names[0]
    invalid = not first.removesuffix(b".") or any(
        b <= 0x20 or b >= 0x7F or b in b"/\\@[]?#:" for b in first
    )
    if invalid:
        with pytest.raises(LocalProtocolError, match="server name"):
            parse_client_hello(stream)
        return
    hello = parse(stream)
    assert hello.sni == names[0].decode("ascii").lower().removesuffix(".")
    assert hello.alpn == tuple(p.decode("latin-1") for p in protocols)
