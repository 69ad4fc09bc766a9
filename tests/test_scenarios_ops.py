"""Operational scenarios of egress-anchors section 2.6: slowloris, idle and lifetime
timers, half-close, fd exhaustion, limits, reload, certificate rotation, drain,
readiness, the audit contract, metric cardinality, the audit file sink and a small leak
check.

Every scenario runs real processes: a DMZ (``-L h2://`` with mutual TLS and a policy
``-C``) and a sidecar (``-L http://`` ``-F h2://``), each with an admin listener
(``-metrics``), and origins on loopback. Each test checks what the client saw, the audit
records (tests/support/audit_schema.py is the record contract) and the metrics named
by the scenario.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import PyegressFactory, TierCerts
from tests.support import audit_schema
from tests.support.clients import recv_exact, recv_until
from tests.support.ops import (
    PairOrigin,
    connect_status,
    fd_count,
    header,
    http_get,
    read_until_closed,
    reset,
    rss_bytes,
    scrape,
    series,
    value,
    wait_for,
)
from tests.support.origins import TcpOrigin, pattern
from tests.support.ports import free_port, wait_port
from tests.support.procs import Process, Pyegress

OTHER_IDENTITY = "spiffe://cluster.local/ns/ci/sa/runner"
REFUSALS = {429, 502, 503}

# -- policy and processes ---------------------------------------------------------------


def policy_text(
    ports: Sequence[int],
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    limits: str = "",
    extra: str = "",
) -> str:
    """A policy allowing ``hosts`` on ``ports`` (loopback answers allowed), denying the
    rest; ``limits`` is the body of a ``limits:`` mapping (flow style)."""
    text = f"""\
version: 1
default: deny
groups:
  shop: ["{TierCerts.IDENTITY}"]
rules:
  - id: loopback-origins
    allow: [{", ".join(f'"{h}"' for h in hosts)}]
    ports: [{", ".join(str(p) for p in ports)}]
    private: [loopback]
  - id: no-metadata
    deny: ["169.254.0.0/16"]
{extra}"""
    if limits:
        text += f"limits: {{{limits}}}\n"
    return text


def write_policy(path: Path, text: str) -> Path:
    """Replace ``path`` atomically (a reload never reads half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def version_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Stack:
    dmz: Pyegress
    sidecar: Pyegress
    policy: Path

    @property
    def proxy(self) -> int:
        return int(self.sidecar.ports[0])

    @property
    def dmz_port(self) -> int:
        return int(self.dmz.ports[0])

    @property
    def dmz_admin(self) -> int:
        return int(self.dmz.ports[1])

    @property
    def sidecar_admin(self) -> int:
        return int(self.sidecar.ports[1])


def start_dmz(
    pyegress: PyegressFactory,
    certs: TierCerts,
    policy: Path,
    params: str = "",
    extra: Sequence[str] = (),
) -> Pyegress:
    query = certs.dmz_params() + (f"&{params}" if params else "")
    return pyegress(
        [
            "-L",
            "h2://127.0.0.1:{0}?" + query,
            "-C",
            str(policy),
            "-metrics",
            "127.0.0.1:{1}",
            *extra,
        ]
    )


def start_sidecar(
    pyegress: PyegressFactory,
    certs: TierCerts,
    dmz_port: int,
    params: str = "",
    extra: Sequence[str] = (),
    client: tuple[Path, Path] | None = None,
) -> Pyegress:
    hop = certs.sidecar_params()
    if client is not None:
        hop = f"cert={client[0]}&key={client[1]}&ca={certs.ca}&serverName=dmz.test"
    listen = "http://127.0.0.1:{0}" + (f"?{params}" if params else "")
    return pyegress(
        [
            "-L",
            listen,
            "-metrics",
            "127.0.0.1:{1}",
            "-F",
            f"h2://127.0.0.1:{dmz_port}?{hop}",
            *extra,
        ]
    )


def start_stack(
    pyegress: PyegressFactory,
    certs: TierCerts,
    policy: Path,
    *,
    dmz_params: str = "",
    sidecar_params: str = "",
    dmz_extra: Sequence[str] = (),
) -> Stack:
    dmz = start_dmz(pyegress, certs, policy, dmz_params, dmz_extra)
    sidecar = start_sidecar(pyegress, certs, int(dmz.ports[0]), sidecar_params)
    return Stack(dmz, sidecar, policy)


def tail(*procs: Process) -> str:
    return "".join(f"\n--- {' '.join(p.argv[3:])[:200]}\n{p.output()[-3000:]}" for p in procs)


def echo_tunnel(port: int, target: str, *procs: Process) -> socket.socket:
    """An open CONNECT tunnel to a TcpOrigin in ECHO mode, proven by one round trip."""
    sock, status, head = connect_status(port, target)
    if status != 200:
        sock.close()
        raise AssertionError(f"CONNECT {target} answered {head!r}" + tail(*procs))
    sock.sendall(b"ECHO\nping")
    assert recv_exact(sock, 4) == b"ping"
    return sock


def finish(sock: socket.socket) -> None:
    """Half-close and read the echo's FIN: the tunnel ends with ``eof``."""
    sock.shutdown(socket.SHUT_WR)
    state, _ = read_until_closed(sock, 10)
    sock.close()
    assert state == "eof", state


def log_events(proc: Pyegress, event: str) -> list[dict[str, Any]]:
    """Operational log lines (no ``schema`` key) with this ``event``."""
    return [r for r in proc.records(event) if "schema" not in r]


def audit_of(proc: Pyegress, conn_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one decision and the one close record of ``conn_id`` (waiting for both)."""
    close = proc.record(10.0, conn_id=conn_id)
    decisions = proc.matching(1, 10.0, "decision", conn_id=conn_id)
    assert len(decisions) == 1, decisions
    assert len(proc.matching(1, 1.0, "tunnel_closed", conn_id=conn_id)) == 1
    return decisions[0], close


def assert_contract(*procs: Pyegress) -> None:
    """Every JSON line parses; every audit record conforms; conn_ids pair up."""
    for proc in procs:
        deadline = time.monotonic() + 5.0  # the last close records may still be queued
        while True:
            text = proc.output()
            records, broken = audit_schema.parse_lines(text)
            problems = audit_schema.check_records(records) + audit_schema.raw_line_problems(text)
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not broken, broken
        assert not problems, "\n".join(problems[:20]) + tail(proc)


@pytest.fixture
def origin() -> Iterator[TcpOrigin]:
    o = TcpOrigin().start()
    yield o
    o.stop()


@pytest.fixture
def pair_origin() -> Iterator[PairOrigin]:
    o = PairOrigin().start()
    yield o
    o.stop()


@pytest.fixture
def stack(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> Stack:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    return start_stack(pyegress, tier_certs, policy)


# -- 33: half-close ----------------------------------------------------------------------


def test_33_half_close_upload_then_10_mb_download_through_both_tiers(
    stack: Stack, origin: TcpOrigin
) -> None:
    size = 10 * 1024 * 1024
    upload = pattern(1 << 20, b"upload")
    before = scrape(stack.dmz_admin)
    sock, status, _ = connect_status(stack.proxy, f"localhost:{origin.port}")
    assert status == 200
    with sock:
        sock.sendall(f"UPLOAD {size}\n".encode() + upload)
        sock.shutdown(socket.SHUT_WR)  # FIN after the upload; the download goes on
        line = recv_until(sock, b"\n")
        state, body = read_until_closed(sock, 30)
    assert line == f"{hashlib.sha256(upload).hexdigest()} {len(upload)}\n".encode()
    assert state == "eof"
    assert len(body) == size
    assert body == pattern(size)

    sent = len(f"UPLOAD {size}\n") + len(upload)
    received = len(line) + size
    for proc in (stack.sidecar, stack.dmz):
        close = proc.record(10.0, target=f"localhost:{origin.port}")
        assert close["reason"] == "eof", close
        assert (close["bytes_up"], close["bytes_down"]) == (sent, received), close
    after = scrape(stack.dmz_admin)
    name = "pyegress_tunnel_bytes_total"
    grew = value(after, name, direction="to_client") - value(before, name, direction="to_client")
    assert grew >= received
    assert_contract(stack.sidecar, stack.dmz)


# -- 41 / 42: reload ---------------------------------------------------------------------


def reload_and_wait(proc: Pyegress, result: str, count: int) -> dict[str, Any]:
    """SIGHUP, then the ``count``-th ``config_reload`` log line; it must say ``result``."""
    proc.signal(signal.SIGHUP)
    lines = proc.matching(count, 10.0, "config_reload")
    line = lines[count - 1]
    assert "schema" not in line
    assert line.get("result") == result, line
    return line


def test_41_sighup_with_a_valid_policy_applies_to_new_tunnels_only(
    stack: Stack, origin: TcpOrigin
) -> None:
    # The first policy allows 127.0.0.1 only; "localhost" is denied.
    write_policy(stack.policy, policy_text([origin.port], hosts=("127.0.0.1",)))
    reload_and_wait(stack.dmz, "success", 1)
    old = version_of(stack.policy)
    sock, status, _ = connect_status(stack.proxy, f"localhost:{origin.port}")
    sock.close()
    assert status == 403
    before = scrape(stack.dmz_admin)
    assert series(before, "pyegress_policy_info") == [{"tier": "dmz", "policy_version": old}]

    open_socks = [echo_tunnel(stack.proxy, f"127.0.0.1:{origin.port}") for _ in range(20)]
    write_policy(stack.policy, policy_text([origin.port], hosts=("127.0.0.1", "localhost")))
    new = version_of(stack.policy)
    line = reload_and_wait(stack.dmz, "success", 2)
    assert (line["policy_version"], line["previous_version"]) == (new, old)

    sock = echo_tunnel(stack.proxy, f"localhost:{origin.port}", stack.dmz)  # denied before
    finish(sock)
    for s in open_socks:  # opened before the reload: still up
        s.sendall(b"still")
        assert recv_exact(s, 5) == b"still"
        finish(s)

    closes = stack.dmz.matching(20, 10.0, "tunnel_closed", target=f"127.0.0.1:{origin.port}")
    assert len(closes) == 20
    assert {c["policy_version"] for c in closes} == {old}
    assert {c["reason"] for c in closes} == {"eof"}
    fresh = stack.dmz.record(10.0, target=f"localhost:{origin.port}", reason="eof")
    assert fresh["policy_version"] == new
    decision, _ = audit_of(stack.dmz, fresh["conn_id"])
    assert decision["decision"]["policy_version"] == new

    after = scrape(stack.dmz_admin)
    name = "pyegress_config_reloads_total"
    assert value(after, name, result="success") == value(before, name, result="success") + 1
    assert value(after, name, result="error") == value(before, name, result="error")
    assert series(after, "pyegress_policy_info") == [{"tier": "dmz", "policy_version": new}]
    assert_contract(stack.sidecar, stack.dmz)


BAD_POLICIES = {
    "bad YAML": "version: 1\nrules: [\n  - id: x\n",
    "bad glob": 'version: 1\nrules:\n  - id: x\n    allow: ["*."]\n',
    "unknown key": "version: 1\ncolour: red\nrules: []\n",
}


def test_42_sighup_with_an_invalid_policy_keeps_the_old_one(
    stack: Stack, origin: TcpOrigin
) -> None:
    old = version_of(stack.policy)
    good = stack.policy.read_text()
    before = scrape(stack.dmz_admin)
    for count, (what, text) in enumerate(BAD_POLICIES.items(), start=1):
        write_policy(stack.policy, text)
        line = reload_and_wait(stack.dmz, "error", count)
        assert line["level"] == "error", line
        assert line["policy_version"] == old, line
        assert line.get("error"), (what, line)
        assert http_get(stack.dmz_admin, "/readyz") == (200, b"ready\n"), what
        # The old policy still judges: allowed stays allowed, denied stays denied.
        finish(echo_tunnel(stack.proxy, f"localhost:{origin.port}", stack.dmz))
        sock, status, _ = connect_status(stack.proxy, "other.example:443")
        sock.close()
        assert status == 403, what
        metrics = scrape(stack.dmz_admin)
        name = "pyegress_config_reloads_total"
        assert value(metrics, name, result="error") == value(before, name, result="error") + count
        assert value(metrics, name, result="success") == value(before, name, result="success")
        assert series(metrics, "pyegress_policy_info") == [{"tier": "dmz", "policy_version": old}]
    write_policy(stack.policy, good)
    for close in stack.dmz.records("tunnel_closed"):
        assert close["policy_version"] == old
    assert_contract(stack.sidecar, stack.dmz)


# -- certificate rotation ----------------------------------------------------------------


def served_certificate(port: int, certs: TierCerts) -> x509.Certificate:
    """The certificate a TLS client sees on the DMZ port (presenting the sidecar's)."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="dmz.test") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_cert_rotation_on_sighup(
    pyegress: PyegressFactory, tier_certs: TierCerts, stack: Stack, origin: TcpOrigin
) -> None:
    first = served_certificate(stack.dmz_port, tier_certs)
    gauge = "pyegress_cert_expiry_timestamp_seconds"
    before = value(scrape(stack.dmz_admin), gauge, tier="dmz", cert="server")
    assert before == first.not_valid_after_utc.timestamp()
    sock = echo_tunnel(stack.proxy, f"localhost:{origin.port}", stack.dmz)  # h2 link up

    issued = tier_certs.authority.issue(
        "dmz-rotated", dns=("dmz.test", "localhost"), ips=("127.0.0.1", "::1"), days=3
    )
    # In place, as a secret mount or certbot would: same paths, new bytes.
    tier_certs.server_key.write_bytes(issued.key.read_bytes())
    tier_certs.server_cert.write_bytes(issued.cert.read_bytes())
    rotated = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    reload_and_wait(stack.dmz, "success", 1)

    second = served_certificate(stack.dmz_port, tier_certs)
    assert second.serial_number == rotated.serial_number != first.serial_number
    sock.sendall(b"after rotation")  # the open h2 link keeps working
    assert recv_exact(sock, 14) == b"after rotation"
    finish(sock)
    # A new sidecar handshakes against the rotated certificate and is served.
    fresh = start_sidecar(pyegress, tier_certs, stack.dmz_port)
    finish(echo_tunnel(int(fresh.ports[0]), f"localhost:{origin.port}", fresh, stack.dmz))

    after = value(scrape(stack.dmz_admin), gauge, tier="dmz", cert="server")
    assert after == rotated.not_valid_after_utc.timestamp() != before
    closes = stack.dmz.matching(2, 10.0, "tunnel_closed", target=f"localhost:{origin.port}")
    assert [c["reason"] for c in closes] == ["eof", "eof"]
    assert_contract(stack.sidecar, fresh, stack.dmz)


# -- 43: SIGTERM drain -------------------------------------------------------------------


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_43_sigterm_drains_then_exits_0(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    stack = start_stack(pyegress, tier_certs, policy, dmz_extra=("--drain-timeout", "2"))
    target = f"localhost:{origin.port}"
    finishing = echo_tunnel(stack.proxy, target, stack.dmz)
    held = echo_tunnel(stack.proxy, target, stack.dmz)
    assert http_get(stack.dmz_admin, "/readyz") == (200, b"ready\n")

    started = time.monotonic()
    stack.dmz.signal(signal.SIGTERM)
    wait_for(lambda: http_get(stack.dmz_admin, "/readyz")[0] == 503, 0.5, "/readyz 503")
    assert http_get(stack.dmz_admin, "/readyz") == (503, b"draining\n")
    metrics = scrape(stack.dmz_admin)
    assert value(metrics, "pyegress_ready", tier="dmz") == 0
    assert value(metrics, "pyegress_draining", tier="dmz") == 1
    wait_for(lambda: refused(stack.dmz_port), 1.0, "the DMZ listener to close")

    # An open tunnel may still finish during the drain.
    finishing.sendall(b"during drain")
    assert recv_exact(finishing, 12) == b"during drain"
    finish(finishing)
    # The other one is cut at the drain deadline.
    state, _ = read_until_closed(held, 10)
    cut = time.monotonic() - started
    held.close()
    assert state in ("eof", "reset")
    assert 1.5 <= cut <= 6.0, cut
    assert stack.dmz.wait(10) == 0

    closes = stack.dmz.records("tunnel_closed")
    assert sorted(c["reason"] for c in closes) == ["drain", "eof"], closes
    assert [r["event"] for r in log_events(stack.dmz, "draining")] == ["draining"]
    assert_contract(stack.dmz)


# -- sidecar readiness -------------------------------------------------------------------


def healthcheck(port: int) -> int:
    url = f"http://127.0.0.1:{port}/readyz"
    argv = [sys.executable, "-m", "pyegress", "healthcheck", "--url", url]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def test_sidecar_is_ready_only_with_a_tier_link(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    dmz_port = free_port()
    sidecar = start_sidecar(pyegress, tier_certs, dmz_port)
    admin = int(sidecar.ports[1])
    assert http_get(admin, "/readyz") == (503, b"no tier link up\n")
    assert healthcheck(admin) == 1
    assert value(scrape(admin), "pyegress_tier_links", state="up") == 0
    sock, status, _ = connect_status(int(sidecar.ports[0]), f"localhost:{origin.port}")
    sock.close()
    assert status in (502, 503, 504)
    down = sidecar.record(10.0, target=f"localhost:{origin.port}")
    assert down["status"] == status

    query = tier_certs.dmz_params()
    dmz = pyegress(["-L", f"h2://127.0.0.1:{dmz_port}?{query}", "-C", str(policy)], nports=0)
    wait_port("127.0.0.1", dmz_port, 15)
    wait_for(lambda: http_get(admin, "/readyz")[0] == 200, 10, "sidecar /readyz 200")
    assert http_get(admin, "/readyz") == (200, b"ready\n")
    assert healthcheck(admin) == 0
    assert value(scrape(admin), "pyegress_tier_links", state="up") >= 1
    finish(echo_tunnel(int(sidecar.ports[0]), f"localhost:{origin.port}", sidecar, dmz))
    up = sidecar.record(10.0, target=f"localhost:{origin.port}", reason="eof")
    assert up["status"] == 200
    assert_contract(sidecar, dmz)


# -- 38: limits --------------------------------------------------------------------------

LIMITED = "pyegress_limits_rejected_total"


def limit_stack(
    pyegress: PyegressFactory,
    certs: TierCerts,
    origin: TcpOrigin,
    tmp_path: Path,
    limits: str,
    dmz_params: str = "",
    dmz_extra: Sequence[str] = (),
) -> tuple[Stack, int]:
    """A stack whose DMZ also serves plain CONNECT clients on ``-L http://`` (returned
    port) so a test can see the DMZ's own answer next to the sidecar's."""
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port], limits=limits))
    stack = start_stack(
        pyegress,
        certs,
        policy,
        dmz_params=dmz_params,
        dmz_extra=("-L", "http://127.0.0.1:{2}", *dmz_extra),
    )
    return stack, int(stack.dmz.ports[2])


def refused_tunnel(
    stack: Stack, port: int, target: str, limit: str, before: dict[Any, float]
) -> tuple[int, bytes]:
    """Open a tunnel the DMZ must refuse for ``limit``; check the DMZ's records and
    the counter, return what the client saw (status, head) for the caller to judge."""
    sock, status, head = connect_status(port, target)
    sock.close()
    refusals = stack.dmz.matching(1, 10.0, "tunnel_closed", reason="limit_exceeded")
    close = refusals[-1]
    decision, _ = audit_of(stack.dmz, close["conn_id"])
    assert decision["decision"]["action"] == "deny"
    assert decision["decision"]["reason"] == "limit_exceeded"
    after = scrape(stack.dmz_admin)
    assert value(after, LIMITED, tier="dmz", limit=limit) == (
        value(before, LIMITED, tier="dmz", limit=limit) + 1
    )
    decisions = "pyegress_decisions_total"
    assert value(after, decisions, reason="limit_exceeded") == (
        value(before, decisions, reason="limit_exceeded") + 1
    )
    return status, head


def assert_429_retry_after(status: int, head: bytes) -> None:
    assert status == 429, head
    retry = header(head, "Retry-After")
    assert retry is not None, head
    assert retry.isdigit(), head
    assert int(retry) >= 1, head


@pytest.mark.parametrize("via", ["dmz", "sidecar"])
def test_38_global_cap_is_429_with_retry_after(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    origin: TcpOrigin,
    tmp_path: Path,
    via: str,
) -> None:
    stack, direct = limit_stack(pyegress, tier_certs, origin, tmp_path, "max_tunnels: 2")
    port = direct if via == "dmz" else stack.proxy
    target = f"localhost:{origin.port}"
    held = [echo_tunnel(port, target, stack.dmz) for _ in range(2)]
    before = scrape(stack.dmz_admin)
    status, head = refused_tunnel(stack, port, target, "global_conns", before)
    finish(held.pop())
    finish(echo_tunnel(port, target, stack.dmz))  # a freed slot is usable again
    finish(held.pop())
    assert_contract(stack.sidecar, stack.dmz)
    assert_429_retry_after(status, head)


def test_38_per_identity_cap_counts_each_identity_alone(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    stack, _ = limit_stack(pyegress, tier_certs, origin, tmp_path, "max_tunnels_per_identity: 1")
    other = tier_certs.authority.issue("runner", uris=(OTHER_IDENTITY,), client=True)
    second = start_sidecar(pyegress, tier_certs, stack.dmz_port, client=(other.cert, other.key))
    target = f"localhost:{origin.port}"
    mine = echo_tunnel(stack.proxy, target, stack.dmz)
    before = scrape(stack.dmz_admin)
    status, head = refused_tunnel(stack, stack.proxy, target, "identity_conns", before)
    refusal = stack.dmz.record(10.0, reason="limit_exceeded")
    assert refusal["identity"] == TierCerts.IDENTITY
    theirs = echo_tunnel(int(second.ports[0]), target, second, stack.dmz)  # not counted
    finish(mine)
    finish(theirs)
    assert_contract(stack.sidecar, second, stack.dmz)
    assert_429_retry_after(status, head)


def test_38_rate_cap_is_429_with_retry_after(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    stack, _ = limit_stack(pyegress, tier_certs, origin, tmp_path, "rate_per_identity: 0.5")
    target = f"localhost:{origin.port}"
    finish(echo_tunnel(stack.proxy, target, stack.dmz))  # the burst of one
    before = scrape(stack.dmz_admin)
    status, head = refused_tunnel(stack, stack.proxy, target, "rate", before)
    assert_contract(stack.sidecar, stack.dmz)
    assert_429_retry_after(status, head)


def test_38_a_slot_is_released_on_every_close_path(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    stack, _ = limit_stack(
        pyegress,
        tier_certs,
        origin,
        tmp_path,
        "max_tunnels: 1",
        dmz_params="idle_timeout=1s",
        dmz_extra=("--drain-timeout", "1"),
    )
    target = f"localhost:{origin.port}"

    def occupy() -> socket.socket:
        sock = echo_tunnel(stack.proxy, target, stack.dmz)
        extra, status, _ = connect_status(stack.proxy, target)  # the cap holds
        extra.close()
        assert status in REFUSALS, status
        return sock

    def closed_with(reason: str, count: int = 1) -> None:
        stack.dmz.matching(count, 10.0, "tunnel_closed", target=target, reason=reason)

    finish(occupy())  # normal close
    closed_with("eof")
    sock = occupy()
    reset(sock)  # client reset
    closed_with("client_reset")
    sock = occupy()
    state, _ = read_until_closed(sock, 10)  # idle timeout at the DMZ
    sock.close()
    assert state in ("eof", "reset")
    closed_with("idle_timeout")
    sock = occupy()  # the slot came back after each path
    before = scrape(stack.dmz_admin)
    assert value(before, LIMITED, limit="global_conns") == 4
    assert value(before, "pyegress_connections_active", tier="dmz") == 1

    stack.dmz.signal(signal.SIGTERM)  # drain: the deadline cuts the last one
    state, _ = read_until_closed(sock, 10)
    sock.close()
    assert stack.dmz.wait(10) == 0
    closed_with("drain")
    closes = [c for c in stack.dmz.records("tunnel_closed") if c["status"] == 200]
    assert sorted(c["reason"] for c in closes) == [
        "client_reset",
        "drain",
        "eof",
        "idle_timeout",
    ]
    assert_contract(stack.dmz)


# -- 31: idle timeout --------------------------------------------------------------------


def pair_tunnel(port: int, origin: PairOrigin, target: str) -> tuple[socket.socket, socket.socket]:
    """A CONNECT tunnel to a PairOrigin: (client side, origin side)."""
    sock, status, head = connect_status(port, target)
    if status != 200:
        sock.close()
        raise AssertionError(head)
    return sock, origin.accepted()


def step(src: socket.socket, dst: socket.socket) -> None:
    src.sendall(b"k")
    assert recv_exact(dst, 1) == b"k"


@pytest.mark.parametrize("tier", ["sidecar", "dmz"])
def test_31_idle_timeout_counts_traffic_in_either_direction(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    pair_origin: PairOrigin,
    tmp_path: Path,
    tier: str,
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([pair_origin.port]))
    idle = "idle_timeout=2s"
    stack = start_stack(
        pyegress,
        tier_certs,
        policy,
        dmz_params=idle if tier == "dmz" else "",
        sidecar_params=idle if tier == "sidecar" else "",
    )
    timed = stack.dmz if tier == "dmz" else stack.sidecar
    admin = stack.dmz_admin if tier == "dmz" else stack.sidecar_admin
    before = scrape(admin)
    target = f"localhost:{pair_origin.port}"
    client, server = pair_tunnel(stack.proxy, pair_origin, target)
    quiet_client, quiet_server = pair_tunnel(stack.proxy, pair_origin, target)

    silent: dict[str, Any] = {}

    def watch_silent() -> None:
        started = time.monotonic()
        silent["state"] = read_until_closed(quiet_client, 10)[0]
        silent["after"] = time.monotonic() - started

    watcher = threading.Thread(target=watch_silent)
    watcher.start()
    started = time.monotonic()
    for i in range(4):  # alternating sides, every 0.5 s
        time.sleep(0.5)
        if i % 2 == 0:
            step(client, server)
        else:
            step(server, client)
    for _ in range(5):  # 2.5 s of client bytes only: the origin side is silent
        time.sleep(0.5)
        step(client, server)
    for _ in range(5):  # 2.5 s of origin bytes only
        time.sleep(0.5)
        step(server, client)
    assert time.monotonic() - started >= 6.0
    watcher.join(15)
    quiet_client.close()
    quiet_server.close()

    step(client, server)  # still up after 7 s
    step(server, client)
    client.shutdown(socket.SHUT_WR)
    assert server.recv(1) == b""
    server.close()
    state, _ = read_until_closed(client, 10)
    client.close()
    assert state == "eof"
    assert silent["state"] in ("eof", "reset")
    assert 1.5 <= silent["after"] <= 5.0, silent

    busy = timed.matching(1, 10.0, "tunnel_closed", reason="eof")[0]
    assert (busy["bytes_up"], busy["bytes_down"]) == (8, 8), busy
    timed.record(10.0, reason="idle_timeout")
    after = scrape(admin)
    name = "pyegress_timeouts_total"
    assert (
        value(after, name, tier=tier, kind="idle")
        == value(before, name, tier=tier, kind="idle") + 1
    )
    assert_contract(stack.sidecar, stack.dmz)


# -- 32: max_lifetime --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["policy", "listener"])
def test_32_max_lifetime_closes_a_busy_tunnel(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    origin: TcpOrigin,
    tmp_path: Path,
    where: str,
) -> None:
    limits = "max_lifetime: 2s" if where == "policy" else ""
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port], limits=limits))
    params = "max_lifetime=2s" if where == "listener" else ""
    stack = start_stack(pyegress, tier_certs, policy, dmz_params=params)
    before = scrape(stack.dmz_admin)
    sock = echo_tunnel(stack.proxy, f"localhost:{origin.port}", stack.dmz)
    started = time.monotonic()
    chunk = b"x" * 1000
    rounds = 0
    ended = ""
    sock.settimeout(5)
    try:
        while time.monotonic() - started < 8:
            sock.sendall(chunk)
            got = recv_exact(sock, len(chunk))
            assert got == chunk
            rounds += 1
            time.sleep(0.05)
    except (EOFError, ConnectionError) as exc:
        ended = type(exc).__name__
    lived = time.monotonic() - started
    sock.close()
    assert ended, "the tunnel outlived max_lifetime"
    assert 1.7 <= lived <= 4.0, lived
    assert rounds >= 10  # it was busy all along

    close = stack.dmz.record(10.0, reason="max_lifetime")
    assert close["bytes_up"] >= rounds * len(chunk)
    decision, _ = audit_of(stack.dmz, close["conn_id"])
    assert decision["decision"]["action"] == "allow"
    after = scrape(stack.dmz_admin)
    name = "pyegress_timeouts_total"
    assert value(after, name, tier="dmz", kind="max_lifetime") == (
        value(before, name, tier="dmz", kind="max_lifetime") + 1
    )
    assert_contract(stack.sidecar, stack.dmz)


# -- 30: slowloris -----------------------------------------------------------------------


def test_30_slowloris_clients_are_cut_and_do_not_block_others(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    stack = start_stack(pyegress, tier_certs, policy, sidecar_params="handshake_timeout=2s")
    before = scrape(stack.sidecar_admin)
    target = f"localhost:{origin.port}"
    line = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    count = 200
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", stack.proxy), timeout=5)
            s.setblocking(False)
            socks.append(s)
        opened = time.monotonic()
        ended: dict[int, float] = {}
        answers: dict[int, bytes] = {}
        served = 0
        sent = 0
        while len(ended) < count and time.monotonic() - opened < 10:
            for i, s in enumerate(socks):  # one more byte from every slow client
                if i not in ended:
                    try:
                        s.send(line[sent : sent + 1])
                    except OSError:
                        ended[i] = time.monotonic() - opened
            sent += 1
            # Well-behaved clients are served while the slow ones hang on.
            while served < 3:
                finish(echo_tunnel(stack.proxy, target, stack.sidecar, stack.dmz))
                served += 1
            pause = time.monotonic() + 1.0
            while time.monotonic() < pause:
                for i, s in enumerate(socks):
                    if i in ended:
                        continue
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    answers[i] = answers.get(i, b"") + data
                    if not data:
                        ended[i] = time.monotonic() - opened
                time.sleep(0.02)
    finally:
        for s in socks:
            s.close()
    assert served == 3
    assert len(ended) == count, f"{count - len(ended)} slow clients never cut"
    assert all(1.5 <= t <= 5.0 for t in ended.values()), sorted(ended.values())[::20]
    for data in answers.values():
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data

    cut = stack.sidecar.matching(count, 10.0, "tunnel_closed", reason="handshake_timeout")
    assert len(cut) == count
    assert {c["status"] for c in cut} <= {408}
    assert len(stack.sidecar.matching(3, 10.0, "tunnel_closed", reason="eof")) == 3
    assert_contract(stack.sidecar, stack.dmz)
    after = scrape(stack.sidecar_admin)
    name = "pyegress_timeouts_total"
    assert value(after, name, tier="sidecar", kind="handshake") >= (
        value(before, name, tier="sidecar", kind="handshake") + count
    )


def test_30_handshake_deadline_counts_from_accept(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    """A slow client that stays silent for most of the handshake timeout and then drips
    its request is still cut handshake_timeout after it connected, not later."""
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    stack = start_stack(pyegress, tier_certs, policy, sidecar_params="handshake_timeout=2s")
    line = f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", stack.proxy), timeout=5) as sock:
        connected = time.monotonic()
        time.sleep(1.5)
        sock.settimeout(0.25)
        answer = b""
        for byte in line:
            try:
                sock.send(bytes([byte]))
                answer = sock.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        lived = time.monotonic() - connected
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    close = stack.sidecar.record(10.0, reason="handshake_timeout")
    assert close["status"] == 408
    assert lived <= 2.0 + 0.75, f"cut {lived:.2f}s after connecting (handshake_timeout=2s)"


# -- 37: out of file descriptors ---------------------------------------------------------


class LimitedPyegress(Pyegress):
    """``python -m pyegress ARGS`` under ``prlimit --nofile=N`` (prlimit execs the
    command, so the PID is pyegress's own)."""

    def __init__(self, args: Sequence[str], workdir: Path, nofile: int) -> None:
        self.ports = []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        Process.__init__(
            self,
            ["prlimit", f"--nofile={nofile}", sys.executable, "-m", "pyegress", *args],
            workdir / f"pyegress-limited-{time.monotonic_ns()}.log",
            env,
        )


@pytest.fixture
def limited_dmz(
    tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> Iterator[LimitedPyegress]:
    if subprocess.run(["prlimit", "--version"], capture_output=True).returncode != 0:
        pytest.skip("prlimit is not installed")
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    ports = [free_port(), free_port()]
    args = [
        "-L",
        f"h2://127.0.0.1:{ports[0]}?{tier_certs.dmz_params()}",
        "-C",
        str(policy),
        "-metrics",
        f"127.0.0.1:{ports[1]}",
    ]
    proc = LimitedPyegress(args, tmp_path, nofile=256)
    proc.ports = ports
    try:
        for port in ports:
            try:
                wait_port("127.0.0.1", port, 15)
            except TimeoutError:
                raise AssertionError(f"DMZ did not start:\n{proc.output()}") from None
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and line.split()[3] == "256"
            for line in limits.splitlines()
        ), limits
        yield proc
    finally:
        proc.stop()


def test_37_out_of_fds_refuses_the_excess_and_recovers(
    pyegress: PyegressFactory,
    tier_certs: TierCerts,
    origin: TcpOrigin,
    limited_dmz: LimitedPyegress,
) -> None:
    dmz = limited_dmz
    sidecar = start_sidecar(pyegress, tier_certs, int(dmz.ports[0]))
    proxy = int(sidecar.ports[0])
    target = f"localhost:{origin.port}"
    statuses: list[int] = []
    held: list[socket.socket] = []
    try:
        for _ in range(400):
            sock, status, _ = connect_status(proxy, target, timeout=15)
            statuses.append(status)
            if status == 200:
                held.append(sock)
            else:
                sock.close()
        assert dmz.proc.poll() is None, "the DMZ died" + tail(dmz)
        for sock in held[:: max(1, len(held) // 10)]:  # the admitted ones work
            sock.sendall(b"ECHO\nok")
            assert recv_exact(sock, 2) == b"ok"
    finally:
        for sock in held:
            sock.close()
    ok = statuses.count(200)
    assert set(statuses) <= {200} | REFUSALS, sorted(set(statuses))
    assert 50 <= ok < 400, statuses
    # The process is back to serving once the clients are gone.
    wait_for(lambda: len(dmz.records("tunnel_closed")) >= 400, 20, "every DMZ close record")
    sock = echo_tunnel(proxy, target, sidecar, dmz)
    finish(sock)
    assert dmz.proc.poll() is None
    assert "Traceback" not in dmz.output()
    assert "handler_bug" not in dmz.output()
    closes = dmz.wait_records("close", 401, 10.0)
    assert len(closes) == 401
    refused_here = [c for c in closes if c.get("status") != 200]
    assert len(refused_here) == 400 - ok, [c["reason"] for c in refused_here][:5]
    metrics = scrape(int(dmz.ports[1]))
    assert value(metrics, "pyegress_connections_active", tier="dmz") == 0
    assert_contract(sidecar, dmz)


# -- 45: the audit contract over a mixed batch ------------------------------------------


def socks5_request(port: int, name: bytes, dest_port: int) -> tuple[socket.socket, int]:
    """SOCKS5 CONNECT with raw domain bytes (up to 255); the socket and REP."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + dest_port.to_bytes(2, "big"))
    reply = sock.recv(4)
    return sock, reply[1] if len(reply) >= 2 else -1


def raw_request(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data``; what comes back until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return read_until_closed(sock, wait)[1]


def test_45_every_connection_has_one_decision_and_one_close_record(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    dmz = start_dmz(pyegress, tier_certs, policy, extra=("--drain-timeout", "1"))
    sidecar = start_sidecar(
        pyegress,
        tier_certs,
        int(dmz.ports[0]),
        params="handshake_timeout=1s",
        extra=("-L", "socks5://127.0.0.1:{2}?handshake_timeout=1s"),
    )
    proxy, socks = int(sidecar.ports[0]), int(sidecar.ports[2])
    target = f"localhost:{origin.port}"

    finish(echo_tunnel(proxy, target, sidecar, dmz))  # allowed
    sock, status, _ = connect_status(proxy, "other.example:443")  # denied
    sock.close()
    assert status == 403
    assert raw_request(proxy, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")  # malformed
    assert raw_request(proxy, b"CONN").startswith(b"HTTP/1.1 408")  # timed out
    reset(echo_tunnel(proxy, target, sidecar, dmz))  # reset by the client
    # Hostile names: control characters, 1000 characters, 255 bytes over SOCKS5.
    hostile = "evil\x00\x01\x1b[31m\r\n\u2028.test"
    answer = raw_request(proxy, f"CONNECT {hostile}:443 HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")), answer
    long_host = ("a" * 60 + ".") * 16 + "test"  # 980 characters
    answer = raw_request(proxy, f"CONNECT {long_host}:443 HTTP/1.1\r\n\r\n".encode())
    # The DMZ answers 400; the sidecar passes on only a 403 as such (else 502).
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403", b"HTTP/1.1 502")), answer
    socks_names = [
        b"x" * 200 + b"\x1b[2J\x07\x00" + b"y" * 49,  # 255 bytes with control chars
        ((b"b" * 62 + b".") * 4 + b"test")[:255],  # the longest name SOCKS5 can carry
    ]
    for name in socks_names:
        sock, rep = socks5_request(socks, name, 443)
        sock.close()
        assert rep != 0, name
    # Drained: open when the DMZ is told to stop; cut at its drain deadline.
    drained = echo_tunnel(proxy, target, sidecar, dmz)
    dmz.signal(signal.SIGTERM)
    state, _ = read_until_closed(drained, 10)
    drained.close()
    assert dmz.wait(10) == 0

    assert_contract(sidecar, dmz)
    side = {r["conn_id"]: r for r in sidecar.records("tunnel_closed")}
    dmz_closes = dmz.records("tunnel_closed")
    assert {c["conn_id"] for c in dmz_closes} <= set(side)  # joined by conn_id
    # What reached the DMZ: allowed, denied, reset, two over-long names, drained.
    assert sorted(c["reason"] for c in dmz_closes) == [
        "client_reset",
        "denied",
        "drain",
        "eof",
        "malformed",
        "malformed",
    ], [c["reason"] for c in dmz_closes]
    # Everything, as the sidecar saw it: the ones the DMZ refused are hop_refused.
    assert sorted(r["reason"] for r in side.values()) == sorted(
        [
            "eof",
            "hop_refused",
            "malformed",
            "handshake_timeout",
            "client_reset",
            "malformed",
            "hop_refused",
            "malformed",
            "hop_refused",
            "upstream_reset",
        ]
    ), [r["reason"] for r in side.values()]
    assert state in ("eof", "reset")
    hosts = [
        str(r["requested"]["host"])
        for proc in (sidecar, dmz)
        for r in proc.records()
        if "schema" in r and r["requested"].get("host")
    ]
    assert all(len(h) <= audit_schema.HOST_CAP + len("...") for h in hosts)
    assert sum(len(h) > audit_schema.HOST_CAP for h in hosts) >= 4, "over-long hosts not capped"
    # The control characters were refused as malformed and written escaped.
    escaped = [r for r in side.values() if "invalid byte 0x1b" in str(r.get("error"))]
    assert len(escaped) == 1
    assert escaped[0]["status"] == 1
    assert any("evil\\x00\\x01\\x1b" in str(r.get("error")) for r in side.values())
    admin = int(sidecar.ports[1])
    wait_for(
        lambda: value(scrape(admin), "pyegress_audit_events_total", event="close") == len(side),
        5,
        "every close record counted",
    )
    metrics = scrape(admin)
    assert value(metrics, "pyegress_audit_dropped_total") == 0
    assert value(metrics, "pyegress_audit_events_total", event="decision") == len(side)


# -- 46: metric cardinality --------------------------------------------------------------

# Label values as documented (egress-anchors 5.2, docs/audit.md); "" is "no value".
DOCUMENTED_LABELS: dict[str, frozenset[str]] = {
    "tier": audit_schema.TIERS,
    "mode": audit_schema.MODES,
    "decision": audit_schema.ACTIONS,
    "reason": audit_schema.DECISION_REASONS,
    "close_reason": audit_schema.CLOSE_REASONS,
    "kind": frozenset({"handshake", "dns", "connect", "idle", "max_lifetime", "drain"}),
    "limit": frozenset({"global_conns", "identity_conns", "rate", "fd"}),
    "direction": frozenset({"from_client", "to_client"}),
    "via": frozenset({"direct", "proxy", "h2"}),
    "error": frozenset(
        {"timeout", "refused", "reset", "unreachable", "tls"}
        | {"proxy_407", "proxy_denied", "proxy_error"}
    ),
    "side": frozenset({"client", "peer"}),
    "cert": frozenset({"server", "client", "ca"}),
    "state": frozenset({"up", "connecting", "down"}),
    "event": frozenset({"decision", "close", "lifecycle"}),
    "class": audit_schema.ADDRESS_CLASSES | {"ipv6_embedded", "self", "user"},
    "identity_class": frozenset({"shop", "other", "none", ""}),
    "rule": frozenset({"loopback-origins", "no-metadata", ""}),
}
RESULT_LABELS = {
    "pyegress_config_reloads_total": frozenset({"success", "error"}),
    "pyegress_resolver_lookups_total": frozenset(
        {"ok", "nxdomain", "servfail", "timeout", "error"}
    ),
    "pyegress_tls_handshakes_total": frozenset(
        {"ok", "bad_cert", "expired", "revoked", "no_cert", "version", "error"}
    ),
}
FREE_LABELS = {"le", "version", "python", "policy_version"}  # bucket bounds, build, hash


def label_problems(metrics: dict[Any, float]) -> list[str]:
    out = []
    for name, labels in metrics:
        if not name.startswith("pyegress_"):
            continue
        for key, val in labels:
            if key in FREE_LABELS:
                continue
            allowed = RESULT_LABELS.get(name) if key == "result" else DOCUMENTED_LABELS.get(key)
            if allowed is None:
                out.append(f"{name}: undocumented label {key}={val!r}")
            elif val not in allowed:
                out.append(f"{name}: {key}={val!r} is not a documented value")
    return out


def random_names(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [
        "".join(rng.choice(letters) for _ in range(rng.randint(3, 20)))
        + rng.choice([".example", ".test.invalid", ".corp"])
        for _ in range(n)
    ]


def drive(stack: Stack, origin: TcpOrigin, names: Sequence[str], rng: random.Random) -> None:
    """Denied names from many client addresses (4 threads), plus an allowed tunnel,
    a malformed request and a refused port: the kinds of traffic the baseline has."""
    sources = [f"127.0.{rng.randint(0, 255)}.{rng.randint(2, 254)}" for _ in names]
    errors: list[str] = []

    def work(start: int) -> None:
        for i in range(start, len(names), 4):
            try:
                sock, status, _ = connect_status(stack.proxy, f"{names[i]}:443", source=sources[i])
                sock.close()
                if status != 403:
                    errors.append(f"{names[i]}: {status}")
            except OSError as exc:
                errors.append(f"{names[i]}: {exc}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:5]
    finish(echo_tunnel(stack.proxy, f"localhost:{origin.port}", stack.dmz))
    assert raw_request(stack.proxy, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    sock, status, _ = connect_status(stack.proxy, "localhost:22")
    sock.close()
    assert status == 403


def test_46_series_count_does_not_grow_with_hosts_or_clients(
    stack: Stack, origin: TcpOrigin
) -> None:
    rng = random.Random(46)
    drive(stack, origin, random_names(rng, 100), rng)  # warm: every kind once
    stack.dmz.matching(100, 10.0, "tunnel_closed", reason="denied")
    base = {p: set(scrape(p)) for p in (stack.sidecar_admin, stack.dmz_admin)}
    denied_before = value(
        scrape(stack.dmz_admin), "pyegress_decisions_total", reason="not_in_allowlist"
    )

    names = random_names(rng, 2000)
    drive(stack, origin, names, rng)
    stack.dmz.matching(2100, 30.0, "tunnel_closed", reason="denied")
    labels: list[str] = []
    for port, before in base.items():
        after = scrape(port)
        assert set(after) == before, sorted(set(after) ^ before)[:10]
        labels += label_problems(after)
        text = http_get(port, "/metrics")[1].decode()
        assert not any(n in text for n in names[:200]), "a host name became a label"
        assert "127.0." not in text, "a client address became a label"
    metrics = scrape(stack.dmz_admin)
    denied = value(metrics, "pyegress_decisions_total", reason="not_in_allowlist")
    assert denied == denied_before + 2000
    # The audit records do carry the names (that is where they belong).
    recorded = {c["target"] for c in stack.dmz.records("tunnel_closed")}
    assert {f"{n}:443" for n in names[:50]} <= recorded
    assert not labels, labels


# -- audit file sink ---------------------------------------------------------------------


def test_audit_file_rotates_and_stdout_carries_no_audit_records(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    audit = tmp_path / "audit.jsonl"
    limit = 8192
    sink = ("--audit-file", str(audit), "--audit-max-bytes", str(limit), "--audit-backups", "2")
    stack = start_stack(pyegress, tier_certs, policy, dmz_extra=sink)
    for i in range(30):
        sock, status, _ = connect_status(stack.proxy, f"denied-{i}.example:443")
        sock.close()
        assert status == 403
    finish(echo_tunnel(stack.proxy, f"localhost:{origin.port}", stack.dmz))
    files = [audit, audit.with_name("audit.jsonl.1"), audit.with_name("audit.jsonl.2")]

    def settled() -> bool:
        return '"close_reason":"eof"' in audit.read_text()

    wait_for(settled, 10, "the last close record in the audit file")
    assert all(f.exists() for f in files)
    assert not audit.with_name("audit.jsonl.3").exists()
    records: list[dict[str, Any]] = []
    for f in files:
        text = f.read_text()
        assert 0 < len(text.encode()) <= limit, (f, len(text))
        parsed, broken = audit_schema.parse_lines(text)
        assert not broken
        assert all(audit_schema.is_audit(r) for r in parsed)
        assert not audit_schema.raw_line_problems(text)
        records += parsed
    problems = [p for r in records for p in audit_schema.problems(r)]
    assert not problems, problems[:10]
    last = [r for r in records if r["event"] == "close" and r["result"]["close_reason"] == "eof"]
    assert len(last) == 1
    assert [r["event"] for r in records if r["conn_id"] == last[0]["conn_id"]] == [
        "decision",
        "close",
    ]
    # stdout keeps the log lines but no audit record.
    out = stack.dmz.output()
    assert '"schema"' not in out
    assert log_events(stack.dmz, "listening")
    # Counted once written (just after the line reached the file).
    wait_for(
        lambda: value(scrape(stack.dmz_admin), "pyegress_audit_events_total", event="close") == 31,
        5,
        "31 close records counted",
    )
    metrics = scrape(stack.dmz_admin)
    assert value(metrics, "pyegress_audit_events_total", event="decision") == 31
    assert value(metrics, "pyegress_audit_dropped_total") == 0


# -- 39-lite: no leak over 1,000 short tunnels -------------------------------------------


def test_39_lite_fds_and_rss_stay_flat_over_1000_short_tunnels(
    stack: Stack, origin: TcpOrigin
) -> None:
    target = f"localhost:{origin.port}"
    procs = (stack.sidecar, stack.dmz)
    admins = (stack.sidecar_admin, stack.dmz_admin)

    def quiet() -> bool:
        return all(value(scrape(p), "pyegress_connections_active") == 0 for p in admins)

    def short() -> None:
        sock = echo_tunnel(stack.proxy, target, *procs)
        finish(sock)

    for _ in range(100):
        short()
    wait_for(quiet, 10, "no active connections")
    time.sleep(0.2)
    fds = [fd_count(p.pid) for p in procs]
    rss = [rss_bytes(p.pid) for p in procs]
    for _ in range(900):
        short()
    wait_for(quiet, 10, "no active connections")
    time.sleep(0.2)
    for proc, fd0, rss0 in zip(procs, fds, rss, strict=True):
        fd1, rss1 = fd_count(proc.pid), rss_bytes(proc.pid)
        assert fd1 <= fd0 * 1.10, (proc.argv[3:5], fd0, fd1)
        assert rss1 <= rss0 + 5 * 1024 * 1024, (proc.argv[3:5], rss0, rss1)
    closes = stack.dmz.matching(1000, 20.0, "tunnel_closed", reason="eof")
    assert len(closes) == 1000
    metrics = scrape(stack.sidecar_admin)
    assert value(metrics, "pyegress_connections_accepted_total", tier="sidecar") == 1000
    assert_contract(*procs)
