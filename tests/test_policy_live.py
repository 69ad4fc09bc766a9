"""The DMZ's judgement on live traffic: sidecar -> mTLS h2 -> DMZ with a policy file.

Origins here listen on loopback, so rules that reach them say ``private: [loopback]``;
the refusals of private and metadata addresses are checked with literals and with
``localhost`` (a name whose answers are loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PyegressFactory, TierCerts
from tests.support.clients import http_connect, recv_exact, socks5_connect
from tests.support.origins import TcpOrigin
from tests.support.procs import Pyegress

OTHER = "spiffe://cluster.local/ns/ci/sa/runner"


def _policy(tmp_path: Path, origin_port: int) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"""\
version: 1
default: deny
groups:
  shop: ["{TierCerts.IDENTITY}"]
rules:
  - id: shop-origin
    allow: ["localhost:{origin_port}"]
    identities: [shop]
    private: [loopback]
  - id: ci-elsewhere
    allow: ["ci.example:{origin_port}"]
    identities: ["{OTHER}"]
  - id: no-metadata
    deny: ["169.254.0.0/16"]
"""
    )
    return path


@pytest.fixture
def dmz_with_policy(
    pyegress: PyegressFactory, tier_certs: TierCerts, tcp_origin: TcpOrigin, tmp_path: Path
) -> tuple[Pyegress, Pyegress, Path]:
    policy = _policy(tmp_path, tcp_origin.port)
    dmz = pyegress(["-L", "h2://127.0.0.1:{0}?" + tier_certs.dmz_params(), "-C", str(policy)])
    sidecar = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-L",
            "socks5://127.0.0.1:{1}",
            "-F",
            f"h2://127.0.0.1:{dmz.ports[0]}?{tier_certs.sidecar_params()}",
        ]
    )
    return dmz, sidecar, policy


def test_allowed_identity_reaches_its_origin_and_records_join(
    dmz_with_policy: tuple[Pyegress, Pyegress, Path], tcp_origin: TcpOrigin
) -> None:
    dmz, sidecar, _ = dmz_with_policy
    sock, head = http_connect(("127.0.0.1", sidecar.ports[0]), f"localhost:{tcp_origin.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.sendall(b"ECHO\nallowed")
    assert recv_exact(sock, 7) == b"allowed"
    sock.close()
    close = dmz.record(target=f"localhost:{tcp_origin.port}")
    decision = dmz.matching(1, 10.0, "decision", conn_id=close["conn_id"])[0]
    assert decision["schema"] == "pyegress.audit/v1"
    assert decision["decision"]["action"] == "allow"
    assert decision["decision"]["rule_id"] == "shop-origin"
    assert decision["decision"]["policy_version"].startswith("sha256:")
    assert decision["client"]["identity"] == TierCerts.IDENTITY
    assert decision["upstream"]["dialed"].endswith(f":{tcp_origin.port}")
    assert close["policy_version"] == decision["decision"]["policy_version"]
    # The sidecar minted the conn_id; the DMZ's records carry the same one.
    assert sidecar.record(conn_id=close["conn_id"])["kind"] == "http-connect"


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("other.example:443", "not_in_allowlist"),
        ("ci.example:{port}", "not_in_allowlist"),  # another identity's rule
        ("localhost:22", "port_not_allowed"),
        ("127.0.0.1:{port}", "not_in_allowlist"),
        ("169.254.169.254:80", "global_deny"),
    ],
)
def test_refusals_are_403_with_one_decision_and_one_close_record(
    dmz_with_policy: tuple[Pyegress, Pyegress, Path],
    tcp_origin: TcpOrigin,
    target: str,
    reason: str,
) -> None:
    dmz, sidecar, _ = dmz_with_policy
    target = target.format(port=tcp_origin.port)
    sock, head = http_connect(("127.0.0.1", sidecar.ports[0]), target)
    sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    close = dmz.record(target=target)
    assert close["reason"] == "denied"
    decisions = dmz.matching(1, 10.0, "decision", conn_id=close["conn_id"])
    assert len(decisions) == 1
    assert decisions[0]["decision"]["action"] == "deny"
    assert decisions[0]["decision"]["reason"] == reason
    assert not tcp_origin.events  # nothing was dialed


def test_socks5_client_is_judged_the_same(
    dmz_with_policy: tuple[Pyegress, Pyegress, Path], tcp_origin: TcpOrigin
) -> None:
    dmz, sidecar, _ = dmz_with_policy
    sock, rep = socks5_connect(("127.0.0.1", sidecar.ports[1]), "other.example", 443)
    sock.close()
    assert rep == 2  # not allowed by ruleset
    close = dmz.record(target="other.example:443")
    decision = dmz.matching(1, 10.0, "decision", conn_id=close["conn_id"])[0]
    assert decision["decision"]["reason"] == "not_in_allowlist"
    sock, rep = socks5_connect(("127.0.0.1", sidecar.ports[1]), "localhost", tcp_origin.port)
    assert rep == 0
    sock.close()


def _check(policy: Path, identity: str | None, dest: str, resolve: bool) -> dict[str, object]:
    argv = [sys.executable, "-m", "pyegress", "policy", "check", "-C", str(policy), "--dest", dest]
    if identity is not None:
        argv += ["--identity", identity]
    if resolve:
        argv.append("--resolve")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode in (0, 1), out.stderr
    record: dict[str, object] = json.loads(out.stdout)
    decision = record["decision"]
    assert isinstance(decision, dict)
    assert out.returncode == (1 if decision["action"] == "deny" else 0)
    return decision


def test_policy_check_agrees_with_live_traffic(
    dmz_with_policy: tuple[Pyegress, Pyegress, Path], tcp_origin: TcpOrigin
) -> None:
    dmz, sidecar, policy = dmz_with_policy
    port = tcp_origin.port
    for target in (f"localhost:{port}", "other.example:443", "169.254.169.254:80", f"127.1:{port}"):
        offline = _check(policy, TierCerts.IDENTITY, target, resolve=True)
        sock, head = http_connect(("127.0.0.1", sidecar.ports[0]), target)
        sock.close()
        close = dmz.record(target=target)
        live = dmz.matching(1, 10.0, "decision", conn_id=close["conn_id"])[0]["decision"]
        assert (offline["action"], offline["reason"], offline["rule_id"]) == (
            live["action"],
            live["reason"],
            live["rule_id"],
        ), target
        assert head.startswith(b"HTTP/1.1 200" if live["action"] == "allow" else b"HTTP/1.1 403")


def test_a_name_resolving_to_the_dmz_itself_is_refused(
    pyegress: PyegressFactory, tier_certs: TierCerts, tmp_path: Path
) -> None:
    from tests.support.ports import free_port

    port = free_port()
    policy = tmp_path / "self.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - id: loop\n"
        f'    allow: ["localhost:{port}"]\n    private: [loopback]\n'
    )
    dmz = pyegress(
        ["-L", f"h2://127.0.0.1:{port}?" + tier_certs.dmz_params(), "-C", str(policy)], nports=0
    )
    dmz.ports = [port]
    from tests.support.ports import wait_port

    wait_port("127.0.0.1", port)
    sidecar = pyegress(
        ["-L", "http://127.0.0.1:{0}", "-F", f"h2://127.0.0.1:{port}?{tier_certs.sidecar_params()}"]
    )
    sock, head = http_connect(("127.0.0.1", sidecar.ports[0]), f"localhost:{port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    close = dmz.record(target=f"localhost:{port}")
    decision = dmz.matching(1, 10.0, "decision", conn_id=close["conn_id"])[0]
    assert decision["decision"]["reason"] == "self_connection"
