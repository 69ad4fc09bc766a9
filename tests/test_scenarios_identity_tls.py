"""Identity, port, report-mode, TLS/SNI/Host and SOCKS5 scenarios (egress-anchors 2.6:
1, 2, 4, 5, 6, 7, 15-19, 25) on the fake internet, through the real two tiers.

One :class:`FakeInternet` per module. The DMZ namespace runs three pyegress DMZs:

* ``main``: the policy below with the default (strict) ``tls:`` settings; an mTLS h2
  tier listener, a plain HTTP listener (clients without identity) and ``-metrics``;
* ``lenient``: the same rules with ``tls: {sni: identity, missing_sni: allow, ech: allow}``;
* ``report``: ``default: report`` behind a plain HTTP listener, with ``-metrics``.

Sidecars run in the root namespace: ``A`` (identity A, HTTP and SOCKS5 listeners) and
``B`` (identity B) forward to ``main``; ``A-lenient`` forwards to ``lenient``. The
"internet" has the TLS/HTTP/TCP origins of ``tests.support.netorigins`` plus a
:class:`ByteRecorder` on ports 8443, 8080, 9001 and 7000 (private addresses), which
records every byte a tunnel delivered: the oracle for "closed before any upstream byte".

Every test checks what the client saw and the DMZ's ``decision`` and ``close`` records
(docs/audit.md) joined by ``conn_id``, and the metric where the scenario names one.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import random
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TierCerts
from tests.support import badcerts, hellos
from tests.support.clients import http_connect, recv_all, recv_exact, recv_until
from tests.support.netns import FakeInternet, NetnsPyegress, get, unavailable
from tests.support.pki import CertAuthority
from tests.support.ports import free_port, wait_port
from tests.support.procs import Pyegress
from tests.support.recorder import ByteRecorder, Received

_WHY = unavailable()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]

A = TierCerts.IDENTITY  # spiffe://cluster.local/ns/shop/sa/web
B = "spiffe://cluster.local/ns/pay/sa/api"

MAIN_H2, MAIN_HTTP, MAIN_METRICS = 8443, 8080, 9100
LENIENT_H2, LENIENT_HTTP = 8444, 8081
REPORT_HTTP, REPORT_METRICS = 8082, 9102
CRL_H2 = 8445

RECORDED = [
    ("1.1.1.1", 8443),
    ("93.184.216.34", 8443),
    ("1.1.1.1", 8080),
    ("1.1.1.1", 9001),
    ("2606:4700::1111", 9001),
    ("192.168.1.5", 7000),
    ("192.168.1.6", 7000),
    ("192.168.2.1", 7000),
    ("172.20.0.1", 7000),
]
# Private and CGNAT addresses policy rules may allow (private:) live in the "internet"
# namespace too, so a dial to one is answered (accepted, or refused with RST) instead of
# vanishing until the connect timeout.
EXTRA_INET_ADDRESSES = (
    "192.168.1.5", "192.168.1.6", "192.168.2.1", "172.20.0.1", "10.0.0.5", "100.64.0.1",
)  # fmt: skip

ZONE: dict[str, dict[str, Any]] = {
    "api.ok.test": {"A": ["1.1.1.1"]},
    "www.ok.test": {"A": ["1.1.1.1"]},
    "a.ok.test": {"A": ["1.1.1.1"]},
    "web.ok.test": {"A": ["1.1.1.1"]},
    "ssh.ok.test": {"A": ["1.1.1.1"]},
    "api.other.test": {"A": ["93.184.216.34"]},
    "evil.test": {"A": ["1.1.1.1"]},
    "lan5.lan.ok.test": {"A": ["192.168.1.5"]},
    "lan6.lan.ok.test": {"A": ["192.168.1.6"]},
    "unlisted.ok.test": {"A": ["1.1.1.1"]},
    "watch.ok.test": {"A": ["1.1.1.1"]},
    "blocked.ok.test": {"A": ["1.1.1.1"]},
    "trial.ok.test": {"A": ["1.1.1.1"]},
}

RULES = f"""\
groups:
  team-a: ["{A}"]
  team-b: ["{B}"]
rules:
  - id: a-api
    allow: [api.ok.test, www.ok.test]
    ports: [443, 8443]
    identities: [team-a]
  - id: a-literals
    allow: ["0.0.0.0/0", "::/0"]
    ports: [7001, 9001]
    identities: [team-a]
  - id: b-api
    allow: [api.other.test]
    ports: [443, 8443]
    identities: [team-b]
  - id: web
    allow: [a.ok.test, web.ok.test]
    ports: [80, 443, 8080]
  - id: ssh
    allow: [ssh.ok.test]
    ports: [8443]
    protocol: tcp
  - id: lan
    allow: ["192.168.0.0/16", "172.20.0.0/16", ".lan.ok.test"]
    ports: [7000]
    private: [private]
  - id: gen-a
    allow: [".gen-a.ok.test"]
    ports: [443, "7000-7003"]
    identities: [team-a]
    private: [private]
  - id: gen-b
    allow: [".gen-b.ok.test"]
    ports: [80, 443]
    identities: [team-b]
  - id: gen-any
    allow: [".gen.ok.test"]
    ports: [80, 443]
    private: [private, cgnat]
  - id: no-lan-host
    deny: ["192.168.1.5", "172.20.0.0/16"]
  - id: trial
    deny: [trial.ok.test]
    report: true
"""

MAIN_POLICY = (
    "version: 1\ndefault: deny\ntls:\n  sni: strict\n  require_tls_ports: [443, 8443]\n" + RULES
)
LENIENT_POLICY = (
    "version: 1\ndefault: deny\ntls:\n  sni: identity\n  missing_sni: allow\n  ech: allow\n"
    "  require_tls_ports: [443, 8443]\n" + RULES
)
REPORT_POLICY = """\
version: 1
default: report
rules:
  - id: listed
    allow: [api.ok.test]
    ports: [80, 443]
  - id: watch
    deny: [watch.ok.test]
    report: true
  - id: blocked
    deny: [blocked.ok.test]
"""


# -- the stack -------------------------------------------------------------------------


@dataclass
class Stack:
    net: FakeInternet
    recorder: ByteRecorder
    certs: TierCerts
    cert_b: tuple[Path, Path]
    ca_pem: Path
    main: NetnsPyegress
    lenient: NetnsPyegress
    report: NetnsPyegress
    side_a: Pyegress
    side_b: Pyegress
    side_a_lenient: Pyegress
    policy: Path
    workdir: Path

    @property
    def dmz_ip(self) -> str:
        return self.net.dmz_ip

    def a_http(self) -> tuple[str, int]:
        return ("127.0.0.1", self.side_a.ports[0])

    def a_socks(self) -> tuple[str, int]:
        return ("127.0.0.1", self.side_a.ports[1])


def _sidecar(workdir: Path, forward: str, socks: bool = False) -> Pyegress:
    ports = [free_port() for _ in range(2 if socks else 1)]
    args = ["-L", f"http://127.0.0.1:{ports[0]}"]
    if socks:
        args += ["-L", f"socks5://127.0.0.1:{ports[1]}"]
    proc = Pyegress([*args, "-F", forward], workdir)
    proc.ports = ports
    return proc


def _wait_local(proc: Pyegress) -> None:
    for port in proc.ports:
        try:
            wait_port("127.0.0.1", port, 15)
        except TimeoutError:
            raise AssertionError(f"sidecar did not start:\n{proc.output()}") from None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("identity-tls")
    ca_pem = workdir / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    origin = ca.issue_cert("*.ok.test", "*.other.test", "evil.test", "*.lan.ok.test", "1.1.1.1")
    cert_path, key_path = workdir / "origin.pem", workdir / "origin.key"
    origin.cert_chain_pems[0].write_to_path(str(cert_path))
    origin.private_key_pem.write_to_path(str(key_path))
    tier_dir = workdir / "tier"
    tier_dir.mkdir()
    certs = TierCerts(tier_dir)
    issued_b = certs.authority.issue("identity-b", uris=(B,), client=True)

    policies = {}
    for name, text in (
        ("main", MAIN_POLICY),
        ("lenient", LENIENT_POLICY),
        ("report", REPORT_POLICY),
    ):
        policies[name] = workdir / f"{name}.yaml"
        policies[name].write_text(text)

    sidecars: list[Pyegress] = []
    with FakeInternet(workdir) as net, contextlib.ExitStack() as cleanup:
        for address in EXTRA_INET_ADDRESSES:
            net.inet.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        net.set_zone(ZONE)
        net.start_origins(cert_path, key_path)
        recorder = ByteRecorder(net.inet.listen(host, port) for host, port in RECORDED).start()
        cleanup.callback(recorder.stop)
        ip = net.dmz_ip
        main = net.start_dmz(
            [
                "-L",
                f"h2://{ip}:{MAIN_H2}?{certs.dmz_params()}",
                "-L",
                f"http://{ip}:{MAIN_HTTP}",
                "-C",
                str(policies["main"]),
                "-metrics",
                f"{ip}:{MAIN_METRICS}",
            ],
            wait=False,
        )
        main.ports = [MAIN_H2, MAIN_HTTP, MAIN_METRICS]
        lenient = net.start_dmz(
            [
                "-L",
                f"h2://{ip}:{LENIENT_H2}?{certs.dmz_params()}",
                "-L",
                f"http://{ip}:{LENIENT_HTTP}",
                "-C",
                str(policies["lenient"]),
            ],
            wait=False,
        )
        lenient.ports = [LENIENT_H2, LENIENT_HTTP]
        report = net.start_dmz(
            [
                "-L",
                f"http://{ip}:{REPORT_HTTP}",
                "-C",
                str(policies["report"]),
                "-metrics",
                f"{ip}:{REPORT_METRICS}",
            ],
            wait=False,
        )
        report.ports = [REPORT_HTTP, REPORT_METRICS]
        b_params = f"cert={issued_b.cert}&key={issued_b.key}&ca={certs.ca}&serverName=dmz.test"
        try:
            sidecars += [
                _sidecar(workdir, f"h2://{ip}:{MAIN_H2}?{certs.sidecar_params()}", socks=True),
                _sidecar(workdir, f"h2://{ip}:{MAIN_H2}?{b_params}"),
                _sidecar(workdir, f"h2://{ip}:{LENIENT_H2}?{certs.sidecar_params()}"),
            ]
            for dmz in (main, lenient, report):
                net.wait_dmz(dmz)
            for sidecar in sidecars:
                _wait_local(sidecar)
            yield Stack(
                net=net,
                recorder=recorder,
                certs=certs,
                cert_b=(issued_b.cert, issued_b.key),
                ca_pem=ca_pem,
                main=main,
                lenient=lenient,
                report=report,
                side_a=sidecars[0],
                side_b=sidecars[1],
                side_a_lenient=sidecars[2],
                policy=policies["main"],
                workdir=workdir,
            )
        finally:
            for sidecar in sidecars:
                sidecar.stop()


@pytest.fixture(autouse=True)
def _per_test(stack: Stack) -> Iterator[None]:
    stack.recorder.clear()
    dmzs = (stack.main, stack.lenient, stack.report)
    marks = [mark(dmz) for dmz in dmzs]
    yield
    # Whatever the test did, no DMZ died or logged a handler bug meanwhile.
    for dmz, since in zip(dmzs, marks, strict=True):
        assert dmz.proc.poll() is None, dmz.output()[-3000:]
        new = "\n".join(dmz.output().splitlines()[since:])
        assert "handler_bug" not in new, new[-3000:]
        assert "Traceback" not in new, new[-3000:]


# -- audit records -----------------------------------------------------------------------

DECISION_REASONS = {
    "rule_match", "default_allow", "report_only", "no_policy", "not_in_allowlist",
    "port_not_allowed", "global_deny", "bypass", "self_connection", "resolved_self",
    "no_identity", "orig_dst_mismatch", "upstream_proxy_denied", "dns_error", "dns_timeout",
    "sni_mismatch", "sni_missing", "ech_present", "host_mismatch", "protocol_not_allowed",
    "limit_exceeded", "client_auth", "malformed_request", "draining",
    # resolved_<class> (docs/audit.md)
    *(
        f"resolved_{c}"
        for c in (
            "private", "loopback", "link_local", "metadata", "cgnat", "multicast",
            "broadcast", "reserved", "ula", "site_local", "unspecified", "documentation",
            "benchmarking", "discard", "this_network", "protocol_assignments", "translation",
            "ipv6_embedded",
        )
    ),
}  # fmt: skip
CLOSE_REASONS = {
    "eof", "client_reset", "upstream_reset", "idle_timeout", "max_lifetime",
    "handshake_timeout", "connect_timeout", "connect_refused", "host_unreachable",
    "network_unreachable", "dial_failed", "dns_timeout", "resolve_failed", "hop_refused",
    "upstream_protocol_error", "tier_link_lost", "denied", "malformed", "auth_failed",
    "unsupported", "limit_exceeded", "sni_mismatch", "drain", "client_closed",
    "internal_error",
}  # fmt: skip


def mark(proc: Pyegress) -> int:
    return len(proc.output().splitlines())


def audit_since(proc: Pyegress, since: int) -> list[dict[str, Any]]:
    out = []
    for line in proc.output().splitlines()[since:]:
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("schema") == "pyegress.audit/v1":
                    out.append(record)
    return out


def check_pair(decision: dict[str, Any], close: dict[str, Any]) -> None:
    """The shape docs/audit.md promises of one tunnel's two records."""
    assert decision.get("event") == "decision", decision
    assert close.get("event") == "close", close
    assert close["conn_id"] == decision["conn_id"]
    assert get(decision, "decision.reason") in DECISION_REASONS, decision
    assert get(decision, "decision.action") in {"allow", "deny", "report"}, decision
    assert close["decision"] == decision["decision"], (decision, close)
    assert get(close, "result.close_reason") in CLOSE_REASONS, close
    for key in ("start_ts", "result", "bytes", "duration_ms"):
        assert key in close, close


def _host_key(host: str) -> str:
    """A host as records may spell it: names lower case, addresses canonical."""
    host = host.strip("[]").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def pair(
    proc: Pyegress,
    since: int,
    host: str | None = None,
    port: int | None = None,
    identity: object = ...,
    timeout: float = 10.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The decision and close records of the one tunnel begun after ``since`` (to
    ``host``:``port`` with ``identity`` when given); exactly one such tunnel."""
    want = None if host is None else _host_key(host)
    deadline = time.monotonic() + timeout
    while True:
        records = audit_since(proc, since)
        decisions = [
            r
            for r in records
            if r.get("event") == "decision"
            and (want is None or _host_key(str(get(r, "requested.host") or "")) == want)
            and (port is None or get(r, "requested.port") == port)
            and (identity is ... or get(r, "client.identity") == identity)
        ]
        closes = [
            r
            for r in records
            if r.get("event") == "close" and decisions and r["conn_id"] == decisions[0]["conn_id"]
        ]
        if decisions and closes:
            assert len(decisions) == 1, decisions
            assert len(closes) == 1, closes
            check_pair(decisions[0], closes[0])
            return decisions[0], closes[0]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no decision+close for {host}:{port} ({identity}) after {timeout}s:\n"
                + "\n".join(proc.output().splitlines()[since:][-30:])
            )
        time.sleep(0.02)


def verdict(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    return (
        get(record, "decision.action"),
        get(record, "decision.reason"),
        get(record, "decision.rule_id"),
    )


def result(close: dict[str, Any]) -> tuple[Any, Any]:
    return get(close, "result.client_reply"), get(close, "result.close_reason")


def joined_on_sidecar(sidecar: Pyegress, since: int, conn_id: str) -> dict[str, Any]:
    """The sidecar's close record of the tunnel the DMZ knows as ``conn_id``."""
    deadline = time.monotonic() + 10
    while True:
        for record in audit_since(sidecar, since):
            if record.get("event") == "close" and record.get("conn_id") == conn_id:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"sidecar has no close record for {conn_id}")
        time.sleep(0.02)


# -- metrics -------------------------------------------------------------------------------


def scrape(address: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


# -- clients ---------------------------------------------------------------------------------


def target_of(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(proxy: tuple[str, int], host: str, port: int | str) -> tuple[int, socket.socket]:
    sock, head = http_connect(proxy, target_of(host, port))
    return int(head.split()[1]), sock


def refused_connect(proxy: tuple[str, int], target: str) -> int:
    sock, head = http_connect(proxy, target)
    sock.close()
    return int(head.split()[1])


def cut_off(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the peer closes (FIN or RST) without sending a single byte."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return True
    finally:
        sock.close()
    return data == b""


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read everything the echo sends back."""
    with sock:
        sock.settimeout(10)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def only_connection(stack: Stack, local: str) -> Received:
    (conn,) = stack.recorder.wait_ended(1)
    assert conn.local == local, conn
    return conn


def nothing_reached(stack: Stack, local: str) -> None:
    """The DMZ may have dialed ``local`` (it dials before it peeks), but no byte of the
    client's arrived there."""
    for conn in stack.recorder.wait_ended(0):
        if conn.local == local:
            assert conn.data == b"", conn


def origin_accepts(stack: Stack) -> list[dict[str, Any]]:
    assert stack.net.origins is not None
    return stack.net.origins.accepts()


# -- 1: per-identity allowlists ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "allowed", "denied", "rule"),
    [
        ("A", "api.ok.test", "api.other.test", "a-api"),
        ("B", "api.other.test", "api.ok.test", "b-api"),
    ],
)
def test_01_identity_gets_its_own_allowlist(
    stack: Stack, who: str, allowed: str, denied: str, rule: str
) -> None:
    sidecar, identity = (stack.side_a, A) if who == "A" else (stack.side_b, B)
    proxy = ("127.0.0.1", sidecar.ports[0])
    at, side_at = mark(stack.main), mark(sidecar)

    status, sock = connect(proxy, allowed, 443)
    assert status == 200
    with sock:
        echo = hellos.TlsSession(sock, allowed, stack.ca_pem).handshake().get(allowed)
    ip = ZONE[allowed]["A"][0]
    assert (echo["sni"], echo["host"], echo["local"]) == (allowed, allowed, f"{ip}:443")
    decision, close = pair(stack.main, at, allowed, 443)
    assert verdict(decision) == ("allow", "rule_match", rule)
    assert get(decision, "client.identity") == identity
    assert get(decision, "tls.sni") == allowed
    assert get(decision, "tls.sni_match") is True
    assert get(close, "upstream.dialed") == f"{ip}:443"
    assert result(close) == (200, "eof")
    assert get(close, "bytes.to_client") > 0
    assert joined_on_sidecar(sidecar, side_at, close["conn_id"])["tier"] == "sidecar"

    before = len(origin_accepts(stack))
    at = mark(stack.main)
    assert refused_connect(proxy, f"{denied}:443") == 403
    decision, close = pair(stack.main, at, denied, 443)
    assert verdict(decision) == ("deny", "not_in_allowlist", None)
    assert get(decision, "client.identity") == identity
    assert result(close) == (403, "denied")
    assert get(close, "upstream") is None or get(close, "upstream.dialed") is None
    assert len(origin_accepts(stack)) == before  # nothing was dialed
    sidecar_close = joined_on_sidecar(sidecar, side_at, close["conn_id"])
    assert get(sidecar_close, "result.client_reply") == 403


# -- 2: refused client certificates -------------------------------------------------------------


def _bad_params(stack: Stack, problem: str) -> str:
    certs = stack.certs
    if problem == "no-client-cert":
        return f"ca={certs.ca}&serverName=dmz.test"
    if problem == "cert-from-another-ca":
        other_dir = stack.workdir / f"other-ca-{secrets.token_hex(3)}"
        other_dir.mkdir()
        issued = CertAuthority(other_dir, "another CA").issue("web", uris=(A,), client=True)
    else:
        issued = badcerts.expired_client(certs.authority, f"expired-{secrets.token_hex(3)}", A)
    return f"cert={issued.cert}&key={issued.key}&ca={certs.ca}&serverName=dmz.test"


@pytest.mark.parametrize(
    ("problem", "handshake_result"),
    [
        ("no-client-cert", "no_cert"),
        ("cert-from-another-ca", "bad_cert"),
        ("expired-cert", "expired"),
    ],
)
def test_02_refused_client_certificate(stack: Stack, problem: str, handshake_result: str) -> None:
    metrics_at = f"{stack.dmz_ip}:{MAIN_METRICS}"
    labels = {"tier": "dmz", "side": "peer", "result": handshake_result}
    handshakes_before = metric(scrape(metrics_at), "pyegress_tls_handshakes_total", **labels)
    at = mark(stack.main)
    forward = f"h2://{stack.dmz_ip}:{MAIN_H2}?timeout=3s&{_bad_params(stack, problem)}"
    bad = _sidecar(stack.workdir, forward)
    try:
        _wait_local(bad)
        status = refused_connect(("127.0.0.1", bad.ports[0]), "api.ok.test:443")
        assert status == 502, bad.output()[-2000:]
        sidecar_close = bad.matching(1, 10.0, "close")[0]
        assert get(sidecar_close, "result.client_reply") == 502
    finally:
        bad.stop()

    # Each refused handshake is one refused tunnel: decision client_auth, close auth_failed.
    deadline = time.monotonic() + 10
    while True:
        records = audit_since(stack.main, at)
        decisions = [r for r in records if r.get("event") == "decision"]
        closes = {r["conn_id"]: r for r in records if r.get("event") == "close"}
        complete = all(d["conn_id"] in closes for d in decisions)
        if (decisions and complete) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert decisions, stack.main.output()[-3000:]
    for decision in decisions:
        assert verdict(decision) == ("deny", "client_auth", None), decision
        assert get(decision, "client.identity") is None
        close = closes[decision["conn_id"]]
        check_pair(decision, close)
        assert get(close, "result.close_reason") == "auth_failed", close
        assert get(close, "bytes.from_client") == 0
    handshakes_after = metric(scrape(metrics_at), "pyegress_tls_handshakes_total", **labels)
    assert handshakes_after >= handshakes_before + 1


def test_02_revoked_client_certificate_is_refused(stack: Stack) -> None:
    now = datetime.datetime.now(datetime.UTC)
    issued, serial = badcerts.issue_client(
        stack.certs.authority,
        f"revoked-{secrets.token_hex(3)}",
        A,
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(days=1),
    )
    crl = badcerts.write_crl(stack.certs.authority, stack.workdir / "revoked.crl", [serial])
    net = stack.net
    dmz = net.start_dmz(
        [
            "-L",
            f"h2://{net.dmz_ip}:{CRL_H2}?{stack.certs.dmz_params()}&crl={crl}",
            "-C",
            str(stack.policy),
        ],
        CRL_H2,
    )
    params = f"cert={issued.cert}&key={issued.key}&ca={stack.certs.ca}&serverName=dmz.test"
    bad = _sidecar(stack.workdir, f"h2://{net.dmz_ip}:{CRL_H2}?timeout=3s&{params}")
    try:
        _wait_local(bad)
        status = refused_connect(("127.0.0.1", bad.ports[0]), "api.ok.test:443")
        assert status == 502
        # The DMZ writes its records a moment after the sidecar has answered.
        deadline = time.monotonic() + 10
        decisions: list[dict[str, Any]] = []
        while not decisions and time.monotonic() < deadline:
            time.sleep(0.05)
            decisions = [r for r in audit_since(dmz, 0) if r.get("event") == "decision"]
        assert decisions, dmz.output()[-3000:]
        assert {get(d, "decision.reason") for d in decisions} == {"client_auth"}
    finally:
        bad.stop()
        net.forget(dmz)


# -- 4: ports ----------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["dmz", "sidecar"])
@pytest.mark.parametrize("port", [22, 25])
def test_04_allowed_host_on_an_unlisted_port(stack: Stack, via: str, port: int) -> None:
    proxy = (stack.dmz_ip, MAIN_HTTP) if via == "dmz" else stack.a_http()
    at = mark(stack.main)
    assert refused_connect(proxy, f"web.ok.test:{port}") == 403
    decision, close = pair(stack.main, at, "web.ok.test", port)
    assert verdict(decision) == ("deny", "port_not_allowed", "web")
    assert get(decision, "client.identity") == (None if via == "dmz" else A)
    assert result(close) == (403, "denied")
    assert get(close, "upstream.dialed") is None


@pytest.mark.parametrize("via", ["dmz", "sidecar"])
@pytest.mark.parametrize("port", ["0", "65536", "-1", "abc", "99999999999", ""])
def test_04_impossible_ports_are_400(stack: Stack, via: str, port: str) -> None:
    """Answered by the listener that parses the CONNECT line: the DMZ's own, or the
    sidecar's (the DMZ then never hears of it)."""
    proc = stack.main if via == "dmz" else stack.side_a
    proxy = (stack.dmz_ip, MAIN_HTTP) if via == "dmz" else stack.a_http()
    at, dmz_at = mark(proc), mark(stack.main)
    assert refused_connect(proxy, f"web.ok.test:{port}") == 400
    decision, close = pair(proc, at)
    assert verdict(decision) == ("deny", "malformed_request", None)
    assert result(close) == (400, "malformed")
    assert get(close, "upstream.dialed") is None
    if via == "sidecar":
        assert decision["tier"] == "sidecar"
        assert not audit_since(stack.main, dmz_at)


# -- 5: deny beats allow --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "answer", "expected"),
    [
        ("192.168.1.6", None, "allow"),
        ("192.168.1.5", None, "global_deny"),  # allow 192.168/16, deny 192.168.1.5
        ("172.20.0.1", None, "global_deny"),  # the same CIDR in allow and deny
        ("lan6.lan.ok.test", "192.168.1.6", "allow"),
        ("lan5.lan.ok.test", "192.168.1.5", "global_deny"),  # denied after resolution
    ],
)
def test_05_deny_beats_allow(stack: Stack, host: str, answer: str | None, expected: str) -> None:
    address = answer or host
    local = f"{address}:7000"
    at = mark(stack.main)
    status, sock = connect((stack.dmz_ip, MAIN_HTTP), host, 7000)
    if expected == "allow":
        assert status == 200
        assert round_trip(sock, b"ping\n") == b"ping\n"
        assert only_connection(stack, local).data == b"ping\n"
        decision, close = pair(stack.main, at, host, 7000)
        assert verdict(decision) == ("allow", "rule_match", "lan")
        assert get(close, "upstream.dialed") == local
        assert result(close) == (200, "eof")
    else:
        sock.close()
        assert status == 403
        decision, close = pair(stack.main, at, host, 7000)
        assert verdict(decision) == ("deny", "global_deny", "no-lan-host")
        assert result(close) == (403, "denied")
        assert get(close, "upstream.dialed") is None
        assert not stack.recorder.seen(local)
    if answer is not None:
        assert get(decision, "dns.answers") == [answer]


# -- 6: report mode ---------------------------------------------------------------------------


def _get_over(sock: socket.socket, host: str) -> dict[str, Any]:
    with sock:
        sock.settimeout(10)
        sock.sendall(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = recv_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:200]
    echo: dict[str, Any] = json.loads(body)
    return echo


def test_06_report_mode_passes_and_counts(stack: Stack) -> None:
    metrics_at = f"{stack.dmz_ip}:{REPORT_METRICS}"
    name = "pyegress_decisions_total"
    base = {"tier": "dmz", "mode": "connect"}
    before = scrape(metrics_at)
    proxy = (stack.dmz_ip, REPORT_HTTP)
    expected = {
        "unlisted.ok.test": ("report", "report_only", None),
        "watch.ok.test": ("report", "report_only", "watch"),
        "api.ok.test": ("allow", "rule_match", "listed"),
    }
    for host, want in expected.items():
        at = mark(stack.report)
        status, sock = connect(proxy, host, 80)
        assert status == 200, host
        assert _get_over(sock, host)["host"] == host
        decision, close = pair(stack.report, at, host, 80)
        assert verdict(decision) == want
        assert get(decision, "decision.would_deny") is (want[0] == "report")
        assert get(close, "upstream.dialed") == "1.1.1.1:80"
        assert result(close) == (200, "eof")
    # A deny rule still denies under default: report.
    at = mark(stack.report)
    assert refused_connect(proxy, "blocked.ok.test:80") == 403
    decision, close = pair(stack.report, at, "blocked.ok.test", 80)
    assert verdict(decision) == ("deny", "global_deny", "blocked")
    assert get(decision, "decision.would_deny") is False

    after = scrape(metrics_at)
    for rule, delta in (("", 1), ("watch", 1), ("listed", 0)):
        labels = {**base, "decision": "report", "reason": "report_only", "rule": rule}
        assert metric(after, name, **labels) - metric(before, name, **labels) == delta, rule
    labels = {**base, "decision": "allow", "reason": "rule_match", "rule": "listed"}
    assert metric(after, name, **labels) - metric(before, name, **labels) == 1
    labels = {**base, "decision": "deny", "reason": "global_deny", "rule": "blocked"}
    assert metric(after, name, **labels) - metric(before, name, **labels) == 1


def test_06_report_mode_deny_rule_does_not_open_a_host_default_deny_refuses(
    stack: Stack,
) -> None:
    """``report: true`` tries out one new deny rule: it must never make a destination
    reachable that the allowlist refuses. Under ``default: deny`` trial.ok.test has no
    allow rule, so adding ``deny: [trial.ok.test], report: true`` must leave it denied
    (``not_in_allowlist``), not pass it as ``report``."""
    at = mark(stack.main)
    status = refused_connect((stack.dmz_ip, MAIN_HTTP), "trial.ok.test:80")
    decision, close = pair(stack.main, at, "trial.ok.test", 80)
    assert status == 403, json.dumps(decision)
    assert verdict(decision) == ("deny", "not_in_allowlist", None)
    assert result(close) == (403, "denied")


# -- 7: policy check agrees with live traffic ------------------------------------------------

GEN_PORTS = (443, 80, 22, 7000, 7001, 9001)
GEN_ANSWERS: list[dict[str, Any] | None] = [
    {"A": ["1.1.1.1"]},
    {"A": ["93.184.216.34"]},
    {"A": ["10.0.0.5"]},
    {"A": ["127.0.0.1"]},
    {"A": ["169.254.169.254"]},
    {"A": ["192.168.1.5"]},
    {"A": ["192.168.1.6"]},
    {"A": ["100.64.0.1"]},
    {"A": ["10.0.0.5", "1.1.1.1"]},
    {"AAAA": ["2606:4700::1111"]},
    {"AAAA": ["::1"]},
    {"A": ["0.0.0.0"]},
    None,  # NXDOMAIN
]
GEN_LITERALS = (
    "1.1.1.1", "93.184.216.34", "10.0.0.5", "127.0.0.1", "169.254.169.254", "192.168.1.5",
    "192.168.1.6", "100.64.0.1", "2606:4700::1111", "::1", "fe80::1", "::ffff:10.0.0.1",
)  # fmt: skip
GEN_DOMAINS = ("gen-a.ok.test", "gen-b.ok.test", "gen.ok.test", "gen.other.test")
GEN_COUNT = 200


@dataclass(frozen=True)
class Case:
    identity: str | None
    host: str
    port: int
    answer: dict[str, Any] | None  # the zone entry; None for literals and NXDOMAIN


# Where each identity's rules are (domain or literal, ports), so that about half the
# tuples aim at a rule and the verdicts spread over allow, the address classes and the
# port and allowlist refusals.
GEN_AIMS: dict[str | None, list[tuple[str, tuple[int, ...]]]] = {
    A: [("gen-a.ok.test", (443, 7000, 7001)), ("literal", (7001, 9001))],
    B: [("gen-b.ok.test", (80, 443))],
    None: [("gen.ok.test", (80, 443))],
}


def _cases(seed: int) -> list[Case]:
    rng = random.Random(seed)
    out: list[Case] = []
    seen: set[tuple[str | None, str, int]] = set()
    suffix = secrets.token_hex(2)
    while len(out) < GEN_COUNT:
        identity = rng.choice([A, B, None])
        if rng.random() < 0.5:
            domain, ports = rng.choice(GEN_AIMS[identity])
            port = rng.choice(ports)
        else:
            domain = rng.choice([*GEN_DOMAINS, "literal"])
            port = rng.choice(GEN_PORTS)
        if domain == "literal":
            host, answer = rng.choice(GEN_LITERALS), None
        else:
            host = f"h{len(out)}-{suffix}.{domain}"
            answer = rng.choice(GEN_ANSWERS)
        if (identity, host, port) in seen:
            continue
        seen.add((identity, host, port))
        out.append(Case(identity, host, port, answer))
    return out


def _live(stack: Stack, case: Case) -> None:
    """One live tunnel; an allowed one gets a ClientHello naming its host."""
    if case.identity is None:
        proxy = (stack.dmz_ip, MAIN_HTTP)
    elif case.identity == A:
        proxy = stack.a_http()
    else:
        proxy = ("127.0.0.1", stack.side_b.ports[0])
    status, sock = connect(proxy, case.host, case.port)
    with sock:
        if status == 200:
            literal = not any(c.isalpha() for c in case.host.replace("ffff", ""))
            sock.sendall(hellos.client_hello(None if literal else case.host))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                recv_all(sock)


def _check(stack: Stack, case: Case) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pyegress", "policy", "check", "-C", str(stack.policy)]
    argv += ["--dest", target_of(case.host, case.port), "--resolve"]
    if case.identity is not None:
        argv += ["--identity", case.identity]
    out = subprocess.run(stack.net.dmz.argv(argv), capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), (case, out.stderr)
    record: dict[str, Any] = json.loads(out.stdout)
    action = get(record, "decision.action")
    assert out.returncode == (1 if action == "deny" else 0), (case, record)
    return record


def test_07_policy_check_agrees_with_live_traffic(stack: Stack) -> None:
    cases = _cases(seed=7)
    for case in cases:
        if case.answer is not None:
            stack.net.add_name(case.host, case.answer)
    at = mark(stack.main)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: _live(stack, c), cases))
    with ThreadPoolExecutor(16) as pool:
        offline = list(pool.map(lambda c: _check(stack, c), cases))

    deadline = time.monotonic() + 10
    while True:
        records = audit_since(stack.main, at)
        live: dict[tuple[Any, str, int], dict[str, Any]] = {}
        for record in records:
            if record.get("event") == "decision":
                key = (
                    get(record, "client.identity"),
                    str(get(record, "requested.host")),
                    int(get(record, "requested.port")),
                )
                assert key not in live, record
                live[key] = record
        if len(live) >= len(cases) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    mismatches = []
    reasons: set[str] = set()
    for case, checked in zip(cases, offline, strict=True):
        seen = live.get((case.identity, case.host.strip("[]"), case.port))
        assert seen is not None, case
        reasons.add(str(get(seen, "decision.reason")))
        if verdict(seen) != verdict(checked):
            mismatches.append((case, verdict(seen), verdict(checked)))
    assert not mismatches, "\n".join(map(str, mismatches))
    # The generator really covered the interesting verdicts.
    for reason in (
        "rule_match",
        "not_in_allowlist",
        "port_not_allowed",
        "global_deny",
        "resolved_private",
        "resolved_loopback",
        "dns_error",
    ):
        assert reason in reasons, reasons
    # The same decisions replayed (recorded DNS answers instead of a lookup) under the
    # same policy change nothing.
    audit = stack.workdir / f"live-{secrets.token_hex(3)}.jsonl"
    audit.write_text("".join(json.dumps(r) + "\n" for r in live.values()))
    argv = [sys.executable, "-m", "pyegress", "policy", "check", "-C", str(stack.policy)]
    replay = subprocess.run(
        [*argv, "--replay", str(audit)], capture_output=True, text=True, timeout=60
    )
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-2000:]
    assert f"{len(live)} decisions replayed, 0 would change" in replay.stdout, replay.stdout


# -- 15-17: SNI ---------------------------------------------------------------------------------


def _tls_tunnel(
    stack: Stack,
    proxy: tuple[str, int],
    dmz: NetnsPyegress,
    hello: bytes,
    host: str = "api.ok.test",
    port: int = 8443,
    pieces: int = 1,
) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    """CONNECT ``host:port``, send ``hello``; (passed, decision, close). A tunnel that
    passed echoes the hello back (the recorder) and the recorder got exactly it; one
    refused got not a byte back and the recorder got nothing."""
    at = mark(dmz)
    status, sock = connect(proxy, host, port)
    assert status == 200
    sock.settimeout(10)
    hellos.send_in_pieces(sock, hello, pieces, 0.05)
    try:
        first = sock.recv(65536)
    except ConnectionResetError:
        first = b""
    passed = first != b""
    if passed:
        with sock:
            sock.shutdown(socket.SHUT_WR)
            echoed = first + recv_all(sock)
        assert echoed == hello
    else:
        sock.close()
    decision, close = pair(dmz, at, host, port)
    ip = "1.1.1.1" if host != "api.other.test" else "93.184.216.34"
    local = target_of(host if host[0].isdigit() or ":" in host else ip, port)
    if passed:
        assert only_connection(stack, local).data == hello
        assert result(close) == (200, "eof")
    else:
        nothing_reached(stack, local)
        assert get(close, "bytes.to_client") == 0
        assert get(close, "result.client_reply") == 200
    return passed, decision, close


def _refused_for(decision: dict[str, Any], close: dict[str, Any], reason: str) -> None:
    assert get(decision, "decision.action") == "deny", decision
    assert get(decision, "decision.reason") == reason, decision
    close_reason = "sni_mismatch" if reason == "sni_mismatch" else "denied"
    assert get(close, "result.close_reason") == close_reason, close


def test_15_domain_fronting_is_cut_before_any_upstream_byte(stack: Stack) -> None:
    passed, decision, close = _tls_tunnel(
        stack, stack.a_http(), stack.main, hellos.client_hello("evil.test")
    )
    assert not passed
    _refused_for(decision, close, "sni_mismatch")
    assert get(decision, "decision.rule_id") == "a-api"
    assert get(decision, "tls.sni") == "evil.test"
    assert get(decision, "tls.sni_match") is False
    assert get(decision, "client.identity") == A


def test_15_domain_fronting_to_a_real_tls_origin(stack: Stack) -> None:
    """The same on 443 against the real origin: it never sees a ClientHello (it logs an
    accept only after a handshake), and a curl-like real handshake never completes."""
    before = origin_accepts(stack)
    at = mark(stack.main)
    status, sock = connect(stack.a_http(), "api.ok.test", 443)
    assert status == 200
    sock.settimeout(10)
    session = hellos.TlsSession(sock, "evil.test", stack.ca_pem)
    with sock, pytest.raises((EOFError, ConnectionResetError, ssl.SSLError)):
        session.handshake()
    decision, close = pair(stack.main, at, "api.ok.test", 443)
    _refused_for(decision, close, "sni_mismatch")
    time.sleep(0.2)
    assert origin_accepts(stack) == before


@pytest.mark.parametrize(
    ("lenient", "sni", "outcome"),
    [
        (False, b"www.ok.test", "sni_mismatch"),  # strict: the requested host only
        (True, b"www.ok.test", "pass"),  # identity: any host A may reach
        (True, b"api.other.test", "sni_mismatch"),  # B's host, not A's
        (True, b"evil.test", "sni_mismatch"),
    ],
)
def test_16_sni_of_another_allowed_host(
    stack: Stack, lenient: bool, sni: bytes, outcome: str
) -> None:
    proxy = ("127.0.0.1", stack.side_a_lenient.ports[0]) if lenient else stack.a_http()
    dmz = stack.lenient if lenient else stack.main
    hello = hellos.with_sni(sni, base=hellos.client_hello("api.ok.test"))
    passed, decision, close = _tls_tunnel(stack, proxy, dmz, hello)
    assert get(decision, "tls.sni") == sni.decode()
    assert get(decision, "tls.sni_match") is False
    if outcome == "pass":
        assert passed
        assert verdict(decision) == ("allow", "rule_match", "a-api")
    else:
        assert not passed
        _refused_for(decision, close, outcome)


HELLO = hellos.client_hello("api.ok.test", alpn=["h2", "http/1.1"])
SPLIT = hellos.reframe(hellos.handshake_payload(HELLO), [7, 40, 100])

# (case, hello, requested host, requested port, strict outcome, lenient outcome)
HELLO_CASES: list[tuple[str, bytes, str, int, str, str]] = [
    ("no-sni", hellos.with_sni(base=HELLO), "api.ok.test", 8443, "sni_missing", "pass"),
    ("ip-sni", hellos.with_sni(b"1.1.1.1"), "api.ok.test", 8443, "sni_mismatch", "sni_mismatch"),
    ("ip-sni-for-ip", hellos.with_sni(b"1.1.1.1"), "1.1.1.1", 9001, "pass", "pass"),
    ("no-sni-for-ip", hellos.with_sni(), "1.1.1.1", 9001, "pass", "pass"),
    (
        "two-names",
        hellos.with_sni(b"api.ok.test", b"evil.test"),
        "api.ok.test",
        8443,
        "malformed_request",
        "malformed_request",
    ),
    (
        "ech",
        hellos.edit_hello(HELLO, add=[hellos.ech_outer()]),
        "api.ok.test",
        8443,
        "ech_present",
        "pass",
    ),
    (
        "ech-other-outer-name",
        hellos.with_sni(b"evil.test", base=hellos.edit_hello(HELLO, add=[hellos.ech_outer()])),
        "api.ok.test",
        8443,
        "ech_present",
        "sni_mismatch",
    ),
    ("split-records", SPLIT, "api.ok.test", 8443, "pass", "pass"),
    ("sni-case-and-dot", hellos.with_sni(b"API.Ok.Test."), "api.ok.test", 8443, "pass", "pass"),
    ("connect-upper-case", HELLO, "API.OK.Test", 8443, "pass", "pass"),
    (
        "sni-with-nul",
        hellos.with_sni(b"api.ok.test\x00.evil.test"),  # not a host name at all
        "api.ok.test",
        8443,
        "malformed_request",
        "malformed_request",
    ),
    (
        "name-sni-for-ip",
        hellos.with_sni(b"api.ok.test"),  # A may reach it, but not on 9001
        "1.1.1.1",
        9001,
        "sni_mismatch",
        "sni_mismatch",
    ),
    (
        "split-records-evil",
        hellos.reframe(hellos.handshake_payload(hellos.client_hello("evil.test")), [5, 64]),
        "api.ok.test",
        8443,
        "sni_mismatch",
        "sni_mismatch",
    ),
]


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
@pytest.mark.parametrize(
    ("case", "hello", "host", "port", "strict", "relaxed"),
    HELLO_CASES,
    ids=[c[0] for c in HELLO_CASES],
)
def test_17_odd_client_hellos_per_policy(
    stack: Stack,
    lenient: bool,
    case: str,
    hello: bytes,
    host: str,
    port: int,
    strict: str,
    relaxed: str,
) -> None:
    proxy = ("127.0.0.1", stack.side_a_lenient.ports[0]) if lenient else stack.a_http()
    dmz = stack.lenient if lenient else stack.main
    outcome = relaxed if lenient else strict
    # Split cases also arrive in several TCP segments.
    pieces = 6 if case.startswith("split") else 1
    passed, decision, close = _tls_tunnel(stack, proxy, dmz, hello, host, port, pieces)
    assert get(decision, "client.identity") == A
    if outcome == "pass":
        assert passed, decision
        assert get(decision, "decision.action") == "allow", decision
    else:
        assert not passed, decision
        _refused_for(decision, close, outcome)
    if case.startswith("ech"):
        assert get(decision, "tls.ech") is True
    if case == "split-records":
        assert get(decision, "tls.alpn") == ["h2", "http/1.1"]


def test_17_split_hello_completes_a_real_handshake(stack: Stack) -> None:
    """A ClientHello re-framed into 5-byte..100-byte records and written in 8 TCP
    segments still reaches the origin, which completes the handshake on it."""
    at = mark(stack.main)
    status, sock = connect(stack.a_http(), "api.ok.test", 443)
    assert status == 200
    sock.settimeout(10)
    with sock:
        session = hellos.TlsSession(sock, "api.ok.test", stack.ca_pem)
        session.handshake(
            first_flight=lambda f: hellos.reframe(hellos.handshake_payload(f), [5, 31, 100]),
            pieces=8,
            delay=0.03,
        )
        echo = session.get("api.ok.test")
    assert echo["sni"] == "api.ok.test"
    decision, close = pair(stack.main, at, "api.ok.test", 443)
    assert verdict(decision) == ("allow", "rule_match", "a-api")
    assert get(decision, "tls.sni_match") is True
    assert result(close) == (200, "eof")


def test_17_truncated_hello_then_eof(stack: Stack) -> None:
    at = mark(stack.main)
    status, sock = connect(stack.a_http(), "api.ok.test", 8443)
    assert status == 200
    sock.sendall(HELLO[: len(HELLO) // 2])
    sock.shutdown(socket.SHUT_WR)
    assert cut_off(sock)
    decision, close = pair(stack.main, at, "api.ok.test", 8443)
    _refused_for(decision, close, "malformed_request")
    nothing_reached(stack, "1.1.1.1:8443")


# -- 18: non-TLS payload on a TLS port ----------------------------------------------------------

SSH_BANNER = b"SSH-2.0-OpenSSH_9.6p1 Debian-3\r\n"


@pytest.mark.parametrize(
    ("host", "port", "passes"),
    [
        ("api.ok.test", 8443, False),
        ("api.ok.test", 443, False),
        ("ssh.ok.test", 8443, True),  # the rule says protocol: tcp
    ],
)
def test_18_ssh_after_connect_to_a_tls_port(
    stack: Stack, host: str, port: int, passes: bool
) -> None:
    at = mark(stack.main)
    status, sock = connect(stack.a_http(), host, port)
    assert status == 200
    decision: dict[str, Any]
    if passes:
        assert round_trip(sock, SSH_BANNER) == SSH_BANNER
        assert only_connection(stack, f"1.1.1.1:{port}").data == SSH_BANNER
        decision, close = pair(stack.main, at, host, port)
        assert verdict(decision) == ("allow", "rule_match", "ssh")
        assert result(close) == (200, "eof")
    else:
        sock.sendall(SSH_BANNER)
        assert cut_off(sock)
        decision, close = pair(stack.main, at, host, port)
        _refused_for(decision, close, "protocol_not_allowed")
        assert get(decision, "decision.rule_id") == "a-api"
        nothing_reached(stack, f"1.1.1.1:{port}")
    assert get(decision, "tls") is None


# -- 19: Host consistency -----------------------------------------------------------------------


def _forward(proxy: tuple[str, int], url: str, host: str) -> tuple[int, bytes]:
    """A plain forward-proxy request; the status and the whole response."""
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = recv_until(sock, b"\r\n\r\n")
        with contextlib.suppress(OSError):
            head += recv_all(sock)
    return int(head.split()[1]), head


@pytest.mark.parametrize("via", ["dmz", "sidecar"])
@pytest.mark.parametrize(
    ("url", "host_header", "ok"),
    [
        ("http://a.ok.test:8080/echo", "a.ok.test:8080", True),
        ("http://a.ok.test:8080/echo", "evil.test", False),
        ("http://a.ok.test:8080/echo", "evil.test:8080", False),
        ("http://a.ok.test:8080/echo", "a.ok.test:9999", False),  # port mismatch
        ("http://a.ok.test:8080/echo", "a.ok.test", False),  # Host means port 80
    ],
)
def test_19_forward_proxy_host_must_match_the_uri(
    stack: Stack, via: str, url: str, host_header: str, ok: bool
) -> None:
    """``GET http://a.ok.test:8080/`` with another Host is refused with 400/403 before
    any byte reaches a.ok.test. Through the sidecar either tier may refuse it (the
    sidecar itself, or the DMZ when it peeks at the request in the stream); the client
    must see 400/403 either way."""
    proxy = (stack.dmz_ip, MAIN_HTTP) if via == "dmz" else stack.a_http()
    at, side_at = mark(stack.main), mark(stack.side_a)
    status, response = _forward(proxy, url, host_header)
    if ok:
        decision, _ = pair(stack.main, at, "a.ok.test", 8080)
        # The recorder echoes the request back, which is no HTTP response (so no 200
        # here); what matters is that the request arrived with its Host.
        (conn,) = stack.recorder.wait_ended(1)
        assert f"Host: {host_header}".encode() in bytes(conn.data)
        assert verdict(decision) == ("allow", "rule_match", "web")
        return
    time.sleep(0.2)  # let both tiers write their records
    nothing_reached(stack, "1.1.1.1:8080")
    refusals = [
        (proc, r)
        for proc, since in ((stack.main, at), (stack.side_a, side_at))
        for r in audit_since(proc, since)
        if r.get("event") == "decision" and get(r, "decision.reason") == "host_mismatch"
    ]
    dmz_decisions = [r for r in audit_since(stack.main, at) if r.get("event") == "decision"]
    assert status in (400, 403), (response, json.dumps(dmz_decisions))
    assert refusals, json.dumps(dmz_decisions)
    proc, decision = refusals[0]
    if via == "dmz":
        assert proc is stack.main
    decision, close = pair(proc, side_at if proc is stack.side_a else at, "a.ok.test", 8080)
    assert get(decision, "decision.action") == "deny"
    assert get(decision, "http.host") == host_header
    assert get(close, "result.client_reply") == status


@pytest.mark.parametrize(
    ("host_header", "ok"),
    [("a.ok.test:8080", True), ("evil.test", False), ("a.ok.test", False)],
)
def test_19_host_header_inside_a_connect_tunnel(stack: Stack, host_header: str, ok: bool) -> None:
    at = mark(stack.main)
    status, sock = connect(stack.a_http(), "a.ok.test", 8080)
    assert status == 200
    request = f"GET / HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
    if ok:
        assert round_trip(sock, request) == request
    else:
        sock.sendall(request)
        assert cut_off(sock)
    decision, close = pair(stack.main, at, "a.ok.test", 8080)
    assert get(decision, "http.host") == host_header
    if ok:
        assert verdict(decision) == ("allow", "rule_match", "web")
        assert only_connection(stack, "1.1.1.1:8080").data == request
    else:
        _refused_for(decision, close, "host_mismatch")
        nothing_reached(stack, "1.1.1.1:8080")


def test_19_plain_http_through_port_80_reaches_the_named_host(stack: Stack) -> None:
    at = mark(stack.main)
    status, sock = connect(stack.a_http(), "a.ok.test", 80)
    assert status == 200
    echo = _get_over(sock, "a.ok.test")
    assert (echo["host"], echo["local"]) == ("a.ok.test", "1.1.1.1:80")
    decision, close = pair(stack.main, at, "a.ok.test", 80)
    assert verdict(decision) == ("allow", "rule_match", "web")
    assert get(decision, "http.host") == "a.ok.test"
    assert result(close) == (200, "eof")


# -- 25: SOCKS5 through the sidecar ------------------------------------------------------------

SOCKS_CONNECT, SOCKS_BIND, SOCKS_UDP = 1, 2, 3


def socks5(
    proxy: tuple[str, int], host: str, port: int, command: int = SOCKS_CONNECT
) -> tuple[int, socket.socket]:
    """A SOCKS5 request with ATYP chosen by ``host`` (IPv4, IPv6 or domain)."""
    sock = socket.create_connection(proxy, timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    try:
        address = b"\x01" + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            address = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            address = b"\x03" + bytes([len(host)]) + host.encode()
    sock.sendall(bytes([5, command, 0]) + address + struct.pack("!H", port))
    head = recv_exact(sock, 4)
    assert head[0] == 5, head
    size = {1: 4, 4: 16}.get(head[3])
    recv_exact(sock, size + 2 if size is not None else recv_exact(sock, 1)[0] + 2)
    return head[1], sock


SOCKS_REFUSED = [
    ("api.other.test", 443, "not_in_allowlist"),
    ("api.ok.test", 22, "port_not_allowed"),
    ("10.0.0.1", 9001, "resolved_private"),
    ("127.0.0.1", 9001, "resolved_loopback"),
    ("169.254.169.254", 9001, "resolved_metadata"),
    ("100.64.0.1", 9001, "resolved_cgnat"),
    ("0.0.0.0", 9001, "resolved_unspecified"),
    ("::1", 9001, "resolved_loopback"),
    ("fe80::1", 9001, "resolved_link_local"),
    ("fc00::1", 9001, "resolved_ula"),
    ("::ffff:10.0.0.1", 9001, "resolved_ipv6_embedded"),
    ("64:ff9b::a00:1", 9001, "resolved_ipv6_embedded"),
]


@pytest.mark.parametrize(
    ("host", "port", "reason"), SOCKS_REFUSED, ids=[c[0] for c in SOCKS_REFUSED]
)
def test_25_socks5_refusals_follow_the_policy(
    stack: Stack, host: str, port: int, reason: str
) -> None:
    at, side_at = mark(stack.main), mark(stack.side_a)
    rep, sock = socks5(stack.a_socks(), host, port)
    sock.close()
    assert rep == 2, rep  # connection not allowed by ruleset
    decision, close = pair(stack.main, at, host, port)
    assert get(decision, "decision.action") == "deny"
    assert get(decision, "decision.reason") == reason
    assert get(decision, "client.identity") == A
    assert get(close, "upstream.dialed") is None
    sidecar_close = joined_on_sidecar(stack.side_a, side_at, close["conn_id"])
    assert sidecar_close["mode"] == "socks5"
    assert get(sidecar_close, "result.client_reply") == 2


def test_25_socks5_port_0_is_malformed_like_connect(stack: Stack) -> None:
    """The SOCKS5 form of scenario 4's ``CONNECT host:0`` (400): general failure from
    the sidecar's parser; the DMZ never hears of it."""
    at, dmz_at = mark(stack.side_a), mark(stack.main)
    rep, sock = socks5(stack.a_socks(), "api.ok.test", 0)
    sock.close()
    assert rep == 1
    decision, close = pair(stack.side_a, at)
    assert verdict(decision) == ("deny", "malformed_request", None)
    assert result(close) == (1, "malformed")
    assert not audit_since(stack.main, dmz_at)


@pytest.mark.parametrize("host", ["1.1.1.1", "2606:4700::1111"])
def test_25_socks5_public_literals_are_dialed(stack: Stack, host: str) -> None:
    at, side_at = mark(stack.main), mark(stack.side_a)
    rep, sock = socks5(stack.a_socks(), host, 9001)
    assert rep == 0
    assert round_trip(sock, b"over socks\n") == b"over socks\n"
    assert only_connection(stack, target_of(host, 9001)).data == b"over socks\n"
    decision, close = pair(stack.main, at, host, 9001)
    assert verdict(decision) == ("allow", "rule_match", "a-literals")
    assert result(close) == (200, "eof")
    assert joined_on_sidecar(stack.side_a, side_at, close["conn_id"])["mode"] == "socks5"


def test_25_socks5_domain_reaches_the_tls_origin(stack: Stack) -> None:
    at = mark(stack.main)
    rep, sock = socks5(stack.a_socks(), "api.ok.test", 443)
    assert rep == 0
    with sock:
        echo = hellos.TlsSession(sock, "api.ok.test", stack.ca_pem).handshake().get("api.ok.test")
    assert (echo["sni"], echo["local"]) == ("api.ok.test", "1.1.1.1:443")
    decision, _ = pair(stack.main, at, "api.ok.test", 443)
    assert verdict(decision) == ("allow", "rule_match", "a-api")
    assert get(decision, "requested.name_source") in {"socks", "connect"}


@pytest.mark.parametrize("command", [SOCKS_BIND, SOCKS_UDP], ids=["bind", "udp-associate"])
def test_25_socks5_bind_and_udp_associate_are_0x07(stack: Stack, command: int) -> None:
    at, dmz_at = mark(stack.side_a), mark(stack.main)
    rep, sock = socks5(stack.a_socks(), "api.ok.test", 443, command)
    assert rep == 7
    assert cut_off(sock)
    decision, close = pair(stack.side_a, at)
    assert decision["mode"] == "socks5"
    assert verdict(decision) == ("deny", "protocol_not_allowed", None)
    assert result(close) == (7, "unsupported")
    assert not audit_since(stack.main, dmz_at)  # never reached the DMZ


GREETINGS = {
    "zero-methods": b"\x05\x00",
    "255-methods-no-auth-missing": b"\x05\xff" + bytes(range(1, 256)),
    "truncated": b"\x05\x02\x00",
    "socks4-on-socks5": b"\x04\x01\x00\x50\x01\x01\x01\x01u\x00",
}


@pytest.mark.parametrize("greeting", list(GREETINGS))
def test_25_socks5_malformed_greetings_close_cleanly(stack: Stack, greeting: str) -> None:
    at, dmz_at = mark(stack.side_a), mark(stack.main)
    sock = socket.create_connection(stack.a_socks(), timeout=10)
    sock.sendall(GREETINGS[greeting])
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sock.settimeout(10)
    try:
        answer = recv_all(sock)
    except ConnectionResetError:
        answer = b""
    finally:
        sock.close()
    # At most a method choice (0xFF: none acceptable) came back, then the close.
    assert answer in (b"", b"\x05\xff"), answer
    decision, close = pair(stack.side_a, at)
    assert decision["mode"] == "socks5"
    assert get(decision, "decision.action") == "deny"
    assert get(close, "upstream.dialed") is None
    assert stack.side_a.proc.poll() is None
    assert "handler_bug" not in "\n".join(stack.side_a.output().splitlines()[at:])
    assert not audit_since(stack.main, dmz_at)
