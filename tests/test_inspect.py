"""SNI and Host consistency inside a tunnel (pyegress.policy.inspect).

ClientHellos come from the stdlib ``ssl`` module (a client SSLObject over MemoryBIOs),
so the bytes are what OpenSSL really sends; crafted variants (ECH, two server names,
IP-literal SNI) are made by rewriting the extensions of a real one.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyegress.endpoint import Endpoint, TcpEndpoint
from pyegress.policy import inspect as inspect_module
from pyegress.policy.inspect import (
    MAX_HELLO_RECORDS,
    MAX_INSPECT_BYTES,
    REASONS,
    Inspection,
    TlsSettings,
    examine,
    inspect,
)
from tests.support.hellos import client_hello as real_hello
from tests.support.hellos import handshake_payload as handshake_bytes

FUZZ = settings(max_examples=200, deadline=None)

EXT_SERVER_NAME = 0x0000
EXT_PADDING = 0x0015
EXT_ECH = 0xFE0D

STRICT = TlsSettings()


# --------------------------------------------------------------------------- builders


def frame(message: bytes, sizes: Iterable[int] = (2**14,)) -> bytes:
    """``message`` in handshake records whose fragment sizes cycle through ``sizes``."""
    cycle = list(sizes)
    out = bytearray()
    at = 0
    index = 0
    while at < len(message):
        piece = message[at : at + cycle[index % len(cycle)]]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
        at += len(piece)
        index += 1
    return bytes(out)


def extension(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def server_name_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes((name_type,)) + len(n).to_bytes(2, "big") + n for n in names)
    return extension(EXT_SERVER_NAME, len(entries).to_bytes(2, "big") + entries)


def rewrite(stream: bytes, drop: Iterable[int] = (), add: Iterable[bytes] = ()) -> bytes:
    """The ClientHello of ``stream`` with the extensions of the types in ``drop``
    removed and the encoded extensions ``add`` appended, lengths fixed up."""
    dropped = set(drop)
    message = handshake_bytes(stream)
    body = message[4:]
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + int.from_bytes(body[at : at + 2], "big")
    at += 1 + body[at]
    kept = bytearray()
    pos = at + 2
    while pos < len(body):
        size = 4 + int.from_bytes(body[pos + 2 : pos + 4], "big")
        if int.from_bytes(body[pos : pos + 2], "big") not in dropped:
            kept += body[pos : pos + size]
        pos += size
    kept += b"".join(add)
    new_body = body[:at] + len(kept).to_bytes(2, "big") + bytes(kept)
    return frame(b"\x01" + len(new_body).to_bytes(3, "big") + new_body)


def with_sni(*names: bytes, base: bytes | None = None) -> bytes:
    stream = base if base is not None else real_hello("placeholder.test")
    return rewrite(stream, drop=[EXT_SERVER_NAME], add=[server_name_ext(*names)])


def check(
    data: bytes,
    host: str = "api.ok.test",
    port: int = 443,
    tls: TlsSettings = STRICT,
    *,
    eof: bool = False,
    tcp_allowed: bool = False,
    name_allowed: Callable[[str], bool] | None = None,
) -> Inspection | None:
    return examine(data, eof, host, port, tls, tcp_allowed=tcp_allowed, name_allowed=name_allowed)


def decided(
    data: bytes,
    host: str = "api.ok.test",
    port: int = 443,
    tls: TlsSettings = STRICT,
    *,
    eof: bool = False,
    tcp_allowed: bool = False,
    name_allowed: Callable[[str], bool] | None = None,
) -> Inspection:
    """:func:`check` that must decide, with the invariants of every answer."""
    result = check(
        data, host, port, tls, eof=eof, tcp_allowed=tcp_allowed, name_allowed=name_allowed
    )
    assert result is not None
    assert result.reason is None or result.reason in REASONS
    assert result.would_deny is False or result.reason is not None
    assert len(result.detail) <= 512 + 3
    return result


def allowed_names(*names: str) -> Callable[[str], bool]:
    return set(names).__contains__


HELLO = real_hello("api.ok.test", alpn=["h2", "http/1.1"])


# --------------------------------------------------------------------------- TLS


def test_matching_sni_passes_and_records_the_hello() -> None:
    result = decided(HELLO)
    assert result.kind == "tls"
    assert result.reason is None
    assert not result.refused
    assert result.sni == "api.ok.test"
    assert result.sni_match is True
    assert result.alpn == ("h2", "http/1.1")
    assert result.ech is False
    assert result.audit_fields() == {
        "tls": {"sni": "api.ok.test", "sni_match": True, "ech": False, "alpn": ["h2", "http/1.1"]}
    }


@pytest.mark.parametrize(
    ("sni", "host"),
    [
        ("API.Ok.Test", "api.ok.test"),
        ("api.ok.test.", "api.ok.test"),
        ("api.ok.test", "API.OK.TEST."),
        ("bücher.test", "xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "bücher.test"),
    ],
)
def test_names_compare_normalised(sni: str, host: str) -> None:
    result = decided(real_hello(sni), host)
    assert result.reason is None, result.detail
    assert result.sni_match is True


def test_mismatching_sni_is_refused() -> None:
    result = decided(real_hello("evil.test"))
    assert result.reason == "sni_mismatch"
    assert result.refused
    assert result.sni == "evil.test"
    assert result.sni_match is False
    assert "evil.test" in result.detail
    assert "api.ok.test" in result.detail


def test_other_allowed_host_strict_denies_identity_allows() -> None:
    hello = real_hello("other.ok.test")
    may = allowed_names("api.ok.test", "other.ok.test")
    assert decided(hello, name_allowed=may).reason == "sni_mismatch"
    identity = TlsSettings(sni="identity")
    result = decided(hello, tls=identity, name_allowed=may)
    assert result.reason is None
    assert result.sni_match is False
    assert "identity" in result.detail
    assert decided(hello, tls=identity, name_allowed=allowed_names()).reason == "sni_mismatch"
    assert decided(hello, tls=identity).reason == "sni_mismatch"


def test_identity_callback_gets_the_normalised_name() -> None:
    seen: list[str] = []

    def may(name: str) -> bool:
        seen.append(name)
        return True

    hello = with_sni(b"Other.Ok.Test.")
    assert decided(hello, tls=TlsSettings(sni="identity"), name_allowed=may).reason is None
    assert seen == ["other.ok.test"]


def test_log_mode_records_but_passes() -> None:
    result = decided(real_hello("evil.test"), tls=TlsSettings(sni="log"))
    assert result.reason == "sni_mismatch"
    assert result.would_deny
    assert not result.refused
    assert "log" in result.detail


def test_off_mode_inspects_nothing() -> None:
    off = TlsSettings(sni="off")
    for data in (real_hello("evil.test"), b"SSH-2.0-x\r\n", b""):
        result = decided(data, tls=off)
        assert result.kind == "none"
        assert result.reason is None


def test_missing_sni_for_a_name() -> None:
    hello = rewrite(HELLO, drop=[EXT_SERVER_NAME])
    result = decided(hello)
    assert result.reason == "sni_missing"
    assert result.sni is None
    assert result.sni_match is None
    result = decided(hello, tls=TlsSettings(missing_sni="allow"))
    assert result.reason is None
    log = decided(hello, tls=TlsSettings(sni="log"))
    assert (log.reason, log.would_deny) == ("sni_missing", True)


@pytest.mark.parametrize("address", ["1.1.1.1", "2606:4700::1111"])
def test_no_sni_to_an_ip_literal_passes(address: str) -> None:
    hello = real_hello(address)  # OpenSSL sends no SNI for an address
    result = decided(hello, address)
    assert result.kind == "tls"
    assert result.sni is None
    assert result.reason is None


def test_sni_name_when_the_client_dialed_an_ip() -> None:
    hello = real_hello("api.ok.test")
    assert decided(hello, "1.1.1.1").reason == "sni_mismatch"
    assert decided(hello, "1.1.1.1", name_allowed=allowed_names()).reason == "sni_mismatch"
    result = decided(hello, "1.1.1.1", name_allowed=allowed_names("api.ok.test"))
    assert result.reason is None
    assert result.sni_match is False
    identity = TlsSettings(sni="identity")
    denied = decided(hello, "1.1.1.1", tls=identity, name_allowed=allowed_names())
    assert denied.reason == "sni_mismatch"
    may = allowed_names("api.ok.test")
    assert decided(hello, "1.1.1.1", tls=identity, name_allowed=may).reason is None


def test_ip_literal_sni() -> None:
    hello = with_sni(b"1.1.1.1")
    same = decided(hello, "1.1.1.1")
    assert same.reason is None
    assert same.sni_match is True
    assert "RFC 6066" in same.detail
    assert decided(with_sni(b"1.1.1.1"), "::ffff:1.1.1.1").reason is None
    other = decided(hello, "8.8.8.8")
    assert other.reason == "sni_mismatch"
    assert "RFC 6066" in other.detail
    assert decided(hello, "api.ok.test").reason == "sni_mismatch"
    # identity mode never turns an address into a name it may reach
    identity = TlsSettings(sni="identity")
    assert decided(hello, tls=identity, name_allowed=lambda _: True).reason == "sni_mismatch"


def test_sni_that_is_neither_name_nor_address() -> None:
    result = decided(with_sni(b"example.123"), name_allowed=lambda _: True)
    assert result.reason == "sni_mismatch"


@pytest.mark.parametrize(
    "names",
    [
        (b"api.ok.test", b"evil.test"),
        (b"evil.test", b"api.ok.test"),
        (b"api.ok.test", b"api.ok.test"),
    ],
)
def test_two_host_names_are_malformed(names: tuple[bytes, bytes]) -> None:
    result = decided(with_sni(*names))
    assert result.kind == "tls"
    assert result.reason == "malformed_request"
    assert "RFC 6066" in result.detail
    # not something "log" mode lets through
    assert decided(with_sni(*names), tls=TlsSettings(sni="log")).refused


def test_ech_extension() -> None:
    hello = rewrite(HELLO, add=[extension(EXT_ECH, bytes(range(40)))])
    result = decided(hello)
    assert result.reason == "ech_present"
    assert result.ech is True
    assert "public name" in result.detail
    assert "'api.ok.test'" in result.detail
    allow = TlsSettings(ech="allow")
    passed = decided(hello, tls=allow)
    assert passed.reason is None
    assert passed.ech is True
    outer_other = rewrite(real_hello("public.cdn.test"), add=[extension(EXT_ECH, b"\x00" * 8)])
    assert decided(outer_other, tls=allow).reason == "sni_mismatch"
    log = decided(hello, tls=TlsSettings(sni="log"))
    assert (log.reason, log.would_deny) == ("ech_present", True)


def test_hello_split_byte_by_byte() -> None:
    for end in range(len(HELLO)):
        assert check(HELLO[:end]) is None, end
    assert decided(HELLO).reason is None
    assert decided(real_hello("evil.test")).reason == "sni_mismatch"


def test_hello_split_over_records() -> None:
    message = handshake_bytes(real_hello("evil.test"))
    for sizes in ([1, 2, 3, 4], [7], [100], [4, 300]):
        stream = frame(message, sizes)
        for end in range(len(stream)):
            assert check(stream[:end]) is None
        assert decided(stream).reason == "sni_mismatch", sizes


def test_too_many_records_is_malformed() -> None:
    stream = frame(handshake_bytes(HELLO), [1])
    assert len(handshake_bytes(HELLO)) > MAX_HELLO_RECORDS
    result = decided(stream)
    assert result.reason == "malformed_request"
    assert str(MAX_HELLO_RECORDS) in result.detail


@FUZZ
@given(st.data())
def test_random_splits_and_records(data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(["api.ok.test", "evil.test"]))
    hello = real_hello(target, alpn=["h2"]) if target == "evil.test" else HELLO
    message = handshake_bytes(hello)
    sizes = data.draw(st.lists(st.integers(8, 700), min_size=1, max_size=5))
    stream = frame(message, sizes) + b"\x14\x03\x03\x00\x01\x01"  # then a CCS record
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buf = b""
    result = None
    for cut in [*cuts, len(stream)]:
        buf = stream[: max(cut, len(buf))]
        result = check(buf)
        if result is not None:
            break
    assert result is not None
    expected = None if target == "api.ok.test" else "sni_mismatch"
    assert result.reason == expected


def test_large_post_quantum_sized_hello_passes() -> None:
    hello = rewrite(HELLO, drop=[EXT_PADDING], add=[extension(EXT_PADDING, bytes(20000))])
    assert len(hello) > 2**14 + 5  # two records
    result = decided(hello)
    assert result.reason is None
    assert result.sni == "api.ok.test"


def test_hello_over_the_cap_is_malformed() -> None:
    base = rewrite(HELLO, drop=[EXT_PADDING])
    used = len(handshake_bytes(base)) - (
        len(handshake_bytes(rewrite(base, drop=list(range(65536)))))
    )
    filler = 65535 - used - 2 * 4
    hello = rewrite(
        base,
        add=[extension(0x7A7A, bytes(filler // 2)), extension(0x7B7B, bytes(filler - filler // 2))],
    )
    assert len(hello) > MAX_INSPECT_BYTES
    result = decided(hello[: MAX_INSPECT_BYTES + 100])
    assert result.reason == "malformed_request"
    assert "65536" in result.detail
    claimed = b"\x01" + (70000).to_bytes(3, "big") + handshake_bytes(HELLO)[4:]
    assert decided(frame(claimed)).reason == "malformed_request"


@pytest.mark.parametrize("port", [443, 8443])
def test_malformed_hello_on_any_port(port: int) -> None:
    message = bytearray(handshake_bytes(HELLO))
    message[4 + 2 + 32] = 200  # session id length past the message
    result = decided(frame(bytes(message)), port=port)
    assert result.kind == "tls"
    assert result.reason == "malformed_request"
    assert "malformed TLS ClientHello" in result.detail


def test_incomplete_hello_at_eof_is_malformed() -> None:
    result = decided(HELLO[:100], eof=True)
    assert result.reason == "malformed_request"
    assert "incomplete" in result.detail
    assert decided(HELLO[:1], port=8443, eof=True).reason == "malformed_request"


def test_non_handshake_record_after_a_partial_hello() -> None:
    message = handshake_bytes(HELLO)
    stream = frame(message[:50]) + b"\x17\x03\x03\x00\x05hello"
    assert decided(stream).reason == "malformed_request"


# --------------------------------------------------------------------------- not TLS


def test_non_tls_on_a_tls_port() -> None:
    ssh = b"SSH-2.0-OpenSSH_9.6\r\n"
    result = decided(ssh[:1])
    assert result.reason == "protocol_not_allowed"
    assert result.kind == "other"
    assert "SSH" not in result.detail  # payload bytes are never logged
    http = decided(b"GET / HTTP/1.1\r\nHost: api.ok.test\r\n\r\n")
    assert (http.kind, http.reason) == ("http", "protocol_not_allowed")
    tcp = decided(ssh, tcp_allowed=True)
    assert (tcp.kind, tcp.reason) == ("other", None)
    assert decided(ssh, port=22).reason is None
    assert decided(ssh, tls=TlsSettings(require_tls_ports=frozenset({22})), port=22).refused


def test_a_0x16_byte_that_is_no_tls_record() -> None:
    assert decided(b"\x16\x09\x09abc", port=9000).kind == "other"
    assert decided(b"\x16\x09\x09abc").reason == "protocol_not_allowed"


def test_nothing_sent() -> None:
    assert check(b"") is None
    result = decided(b"", eof=True)
    assert (result.kind, result.reason) == ("none", None)


@pytest.mark.parametrize(
    "data",
    [b"\x00\x01\x02binary", b"HELLO\r\n", b"USER anonymous\r\n", b"(x"],
)
def test_other_protocols_pass_at_once(data: bytes) -> None:
    result = decided(data, port=9000)
    assert (result.kind, result.reason) == ("other", None)


# --------------------------------------------------------------------------- HTTP


def http(
    host: str = "a.ok.test", port: int = 8080, tls: TlsSettings = STRICT
) -> Callable[..., Inspection]:
    def run(data: bytes, eof: bool = False) -> Inspection:
        return decided(data, host, port, tls, eof=eof)

    return run


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: A.OK.TEST.:8080\r\nAccept: */*\r\n\r\n",
        b"GET http://a.ok.test:8080/x HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
        b"GET http://a.ok.test:8080/x HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"\r\nPOST /p HTTP/1.1\r\nHost: a.ok.test:8080\r\nContent-Length: 2\r\n\r\nhi",
        b"OPTIONS * HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
        b"CONNECT a.ok.test:8080 HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
    ],
)
def test_http_host_matches(head: bytes) -> None:
    result = http()(head)
    assert result.kind == "http"
    assert result.reason is None, result.detail


def test_http_host_default_port_and_literals() -> None:
    assert http(port=80)(b"GET / HTTP/1.1\r\nHost: a.ok.test\r\n\r\n").reason is None
    assert http()(b"GET / HTTP/1.1\r\nHost: a.ok.test\r\n\r\n").reason == "host_mismatch"
    six = http("::1", 8080)(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert six.reason is None
    assert six.audit_fields() == {"http": {"host": "[::1]:8080"}}
    four = http("127.0.0.1", 8080)
    assert four(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n").reason is None
    assert four(b"GET / HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n").reason == "host_mismatch"
    assert four(b"GET / HTTP/1.1\r\nHost: 127.1:8080\r\n\r\n").reason is None


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: evil.test:8080\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.ok.test:8081\r\n\r\n",
        b"GET http://evil.test:8080/ HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
        b"GET http://a.ok.test:8080/ HTTP/1.1\r\nHost: evil.test:8080\r\n\r\n",
        b"GET http://a.ok.test/ HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
        b"GET http://a.ok.test:9999/ HTTP/1.0\r\n\r\n",
        b"CONNECT evil.test:443 HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
    ],
)
def test_http_host_mismatch(head: bytes) -> None:
    result = http()(head)
    assert result.kind == "http"
    assert result.reason == "host_mismatch", result.detail
    assert result.refused


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.ok.test:8080\r\nHost: a.ok.test:8080\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.ok.test:8080\r\nhost: evil.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.1\nHost: evil.test\n\n",
        b"GET / HTTP/1.1\r\nHost: evil.test\r\n  folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 0x7f.1.2.3.4:8080\r\n\r\n",
        b"GET ftp://a.ok.test/ HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n",
        b"GET / HTTP/3.0\r\nHost: a.ok.test:8080\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        b"\r\n" * 9 + b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    ],
)
def test_http_malformed(head: bytes) -> None:
    result = http()(head)
    assert result.reason == "malformed_request", result.detail
    assert result.refused


def test_http_leading_crlf_flood() -> None:
    result = http()(b"\r\n" * 20 + b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert result.reason == "malformed_request"


def test_http2_prior_knowledge() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert http()(preface).reason == "protocol_not_allowed"
    assert http(tls=TlsSettings(host_check=False))(preface).reason is None


def test_host_check_off_records_only() -> None:
    run = http(tls=TlsSettings(host_check=False))
    result = run(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert (result.kind, result.reason, result.host_header) == ("http", None, "evil.test")
    assert run(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n").reason is None
    assert run(b"GET / HTTP/1.1\r\n").reason is None


def test_http_split_byte_by_byte() -> None:
    head = b"GET http://a.ok.test:8080/ HTTP/1.1\r\nHost: evil.test:8080\r\n\r\n"
    for end in range(1, len(head)):
        assert check(head[:end], "a.ok.test", 8080) is None, end
    assert http()(head).reason == "host_mismatch"


def test_http_incomplete_at_eof() -> None:
    assert http()(b"GET / HTTP/1.1\r\nHost: a.ok", eof=True).reason == "malformed_request"
    assert http()(b"GET /inde", eof=True).reason == "malformed_request"
    assert http()(b"QUIT", eof=True).reason is None


def test_long_request_line_is_not_waved_through() -> None:
    line = b"GET /" + b"a" * 9000
    result = check(line, "a.ok.test", 8080)
    assert result is None  # committed to HTTP: waiting for the head
    final = http()(line + b" HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert final.reason == "malformed_request"


def test_over_the_cap_is_malformed() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_INSPECT_BYTES
    result = http()(head)
    assert result.reason == "malformed_request"
    assert http()(b"GET /" + b"a" * (MAX_INSPECT_BYTES + 10)).reason == "malformed_request"


def test_long_detail_and_names_are_capped() -> None:
    name = ("a" * 60 + ".") * 6 + "test"
    result = decided(with_sni(name.encode()))
    assert result.reason == "sni_mismatch"
    assert result.sni is not None
    assert len(result.sni) == 256
    assert result.sni.endswith("...")
    long_host = b"GET / HTTP/1.1\r\nHost: " + b"b" * 3000 + b"\r\n\r\n"
    http_result = http()(long_host)
    assert http_result.host_header is not None
    assert len(http_result.host_header) == 256
    assert len(http_result.detail) <= 515


# --------------------------------------------------------------------------- robustness


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([443, 80, 8080]), st.booleans())
def test_random_bytes_never_raise(data: bytes, port: int, tcp: bool) -> None:
    for eof in (False, True):
        result = check(data, "a.ok.test", port, eof=eof, tcp_allowed=tcp)
        if eof:
            assert result is not None
        if result is not None:
            assert result.reason is None or result.reason in REASONS


@FUZZ
@given(st.data())
def test_mutated_hellos_never_raise(data: st.DataObject) -> None:
    base = bytearray(data.draw(st.sampled_from([HELLO, with_sni(b"a.test", b"b.test")])))
    for _ in range(data.draw(st.integers(1, 6))):
        base[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    for eof in (False, True):
        result = check(bytes(base[:cut]), eof=eof, name_allowed=lambda _: False)
        if eof:
            assert result is not None
        if result is not None:
            assert result.reason is None or result.reason in REASONS


@FUZZ
@given(st.data())
def test_mutated_http_never_raises(data: st.DataObject) -> None:
    base = bytearray(b"GET http://a.ok.test:8080/ HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n")
    for _ in range(data.draw(st.integers(1, 4))):
        base[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    result = check(bytes(base), "a.ok.test", 8080, eof=True)
    assert result is not None


# --------------------------------------------------------------------------- inspect()


async def socket_endpoint() -> tuple[TcpEndpoint, socket.socket]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    _, endpoint = await loop.create_connection(TcpEndpoint, sock=ours)
    return endpoint, theirs


async def send_slowly(sock: socket.socket, pieces: Sequence[bytes], delay: float = 0.01) -> None:
    for piece in pieces:
        await asyncio.sleep(delay)
        sock.sendall(piece)


def pieces_of(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a]


async def run_inspect(
    endpoint: Endpoint,
    host: str = "api.ok.test",
    port: int = 443,
    tls: TlsSettings = STRICT,
    *,
    tcp_allowed: bool = False,
    handshake_timeout: float = 5.0,
) -> Inspection:
    return await inspect(
        endpoint,
        host,
        port,
        tls,
        tcp_allowed=tcp_allowed,
        name_allowed=None,
        handshake_timeout=handshake_timeout,
    )


async def read_exactly(endpoint: Endpoint, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = await asyncio.wait_for(endpoint.read(), 5)
        assert chunk
        out += chunk
    return out


@pytest.mark.parametrize(("sni", "reason"), [("api.ok.test", None), ("evil.test", "sni_mismatch")])
async def test_inspect_reads_a_split_hello_and_puts_it_back(sni: str, reason: str | None) -> None:
    endpoint, theirs = await socket_endpoint()
    hello = frame(handshake_bytes(real_hello(sni)), [40, 200])
    writer = asyncio.ensure_future(send_slowly(theirs, pieces_of(hello, 1, 3, 7, 60, 61, 300)))
    result = await run_inspect(endpoint)
    await writer
    assert result.kind == "tls"
    assert result.reason == reason
    assert endpoint.bytes_in == 0
    assert await read_exactly(endpoint, len(hello)) == hello
    endpoint.close()
    theirs.close()


async def test_inspect_http_then_original_bytes() -> None:
    endpoint, theirs = await socket_endpoint()
    head = b"GET / HTTP/1.1\r\nHost: evil.test:8080\r\n\r\n"
    writer = asyncio.ensure_future(send_slowly(theirs, pieces_of(head, 2, 5, 20, 35)))
    result = await run_inspect(endpoint, "a.ok.test", 8080)
    await writer
    assert (result.kind, result.reason) == ("http", "host_mismatch")
    assert await read_exactly(endpoint, len(head)) == head
    endpoint.close()
    theirs.close()


async def test_inspect_sniff_timeout_without_client_bytes() -> None:
    endpoint, theirs = await socket_endpoint()
    tls = TlsSettings(sniff_timeout=0.2)
    started = time.monotonic()
    result = await run_inspect(endpoint, "db.ok.test", 5432, tls)
    elapsed = time.monotonic() - started
    assert (result.kind, result.reason) == ("none", None)
    assert 0.18 <= elapsed < 1.0
    theirs.sendall(b"late")  # the tunnel still works afterwards
    assert await read_exactly(endpoint, 4) == b"late"
    endpoint.close()
    theirs.close()


async def test_inspect_tls_port_without_client_bytes() -> None:
    endpoint, theirs = await socket_endpoint()
    started = time.monotonic()
    result = await run_inspect(endpoint, handshake_timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert (result.kind, result.reason) == ("none", "protocol_not_allowed")
    result = await run_inspect(endpoint, handshake_timeout=0.2, tcp_allowed=True)
    assert (result.kind, result.reason) == ("none", None)
    endpoint.close()
    theirs.close()


async def test_inspect_stalled_hello_is_malformed_and_kept() -> None:
    endpoint, theirs = await socket_endpoint()
    theirs.sendall(HELLO[:90])
    result = await run_inspect(endpoint, handshake_timeout=0.3)
    assert result.reason == "malformed_request"
    assert "0.3s" in result.detail
    assert await read_exactly(endpoint, 90) == HELLO[:90]
    endpoint.close()
    theirs.close()


async def test_inspect_eof_inside_hello() -> None:
    endpoint, theirs = await socket_endpoint()
    theirs.sendall(HELLO[:90])
    theirs.shutdown(socket.SHUT_WR)
    result = await run_inspect(endpoint)
    assert result.reason == "malformed_request"
    assert "stopped sending" in result.detail
    assert await read_exactly(endpoint, 90) == HELLO[:90]
    assert await endpoint.read() == b""
    endpoint.close()
    theirs.close()


async def test_inspect_server_speaks_first_then_client_data_on_tls_port() -> None:
    endpoint, theirs = await socket_endpoint()
    writer = asyncio.ensure_future(send_slowly(theirs, [b"SSH-2.0-x\r\n"], delay=0.05))
    result = await run_inspect(endpoint)
    await writer
    assert (result.kind, result.reason) == ("other", "protocol_not_allowed")
    endpoint.close()
    theirs.close()


async def test_inspect_off_reads_nothing() -> None:
    endpoint, theirs = await socket_endpoint()
    theirs.sendall(b"abc")
    result = await run_inspect(endpoint, tls=TlsSettings(sni="off"))
    assert result.kind == "none"
    assert await read_exactly(endpoint, 3) == b"abc"
    endpoint.close()
    theirs.close()


class ChunkEndpoint(Endpoint):
    """An in-memory endpoint that hands out ``chunks`` one per read, then EOF."""

    __slots__ = ("_chunks", "bytes_in", "bytes_out")

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = list(chunks)
        self.bytes_in = 0
        self.bytes_out = 0

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        data = self._chunks.pop(0) if self._chunks else b""
        self.bytes_in += len(data)
        return data

    def unread(self, data: bytes | bytearray) -> None:
        if data:
            self.bytes_in -= len(data)
            self._chunks.insert(0, bytes(data))


async def test_trickled_bytes_are_not_reparsed_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = inspect_module._decide

    def counting(*args: object) -> object:
        nonlocal calls
        calls += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(inspect_module, "_decide", counting)
    big = rewrite(HELLO, drop=[EXT_PADDING], add=[extension(EXT_PADDING, bytes(20000))])
    endpoint = ChunkEndpoint(big[i : i + 1] for i in range(len(big)))
    result = await run_inspect(endpoint)
    assert result.reason is None
    assert calls <= 10
    calls = 0
    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: 0123456789\r\n" * 300 + b"Host: a.ok.test:8080\r\n\r\n"
    endpoint = ChunkEndpoint(head[i : i + 1] for i in range(len(head)))
    result = await run_inspect(endpoint, "a.ok.test", 8080)
    assert result.reason is None
    assert calls <= 40
    assert await endpoint.read() == head
    calls = 0
    line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a.ok.test:8080\r\n\r\n"
    endpoint = ChunkEndpoint(line[i : i + 1] for i in range(len(line)))
    result = await run_inspect(endpoint, "a.ok.test", 8080)
    assert result.reason == "malformed_request"  # a target over 8192 bytes
    assert calls <= 10


def test_random_record_layouts_match_single_record() -> None:
    rng = random.Random(7)
    message = handshake_bytes(real_hello("evil.test"))
    for _ in range(20):
        sizes = [rng.randint(20, 400) for _ in range(rng.randint(1, 4))]
        assert decided(frame(message, sizes)).reason == "sni_mismatch"
