"""``make run``'s job works: the demo's sidecar, DMZ and origin answer through both tiers."""

from __future__ import annotations

import random
import socket
import subprocess
import sys


def _free_block(size: int = 12) -> int:
    # Below the ephemeral range: there, client sockets in TIME_WAIT (a benchmark's
    # leftovers) block bind() even with SO_REUSEADDR.
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - size)
        if all(_is_free(base + i) for i in range(size)):
            return base
    raise AssertionError("no free block of ports")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        # Like the demo's servers: a port with connections in TIME_WAIT is usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_check_goes_through_both_tiers_and_shows_a_refusal() -> None:
    base = _free_block()
    out = subprocess.run(
        [sys.executable, "-m", "pyegress.demo", "--check", "--base-port", str(base)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for what in ("HTTP absolute-URI", "HTTP CONNECT + TLS", "SOCKS5", "policy refusal"):
        assert f"demo check: {what}: ok" in out.stdout
    # Both tiers recorded the tunnels, and the DMZ saw the sidecar's certificate identity.
    dmz_lines = [line for line in out.stdout.splitlines() if line.startswith("[dmz]")]
    closes = [line for line in dmz_lines if '"event":"close"' in line]
    decisions = [line for line in dmz_lines if '"event":"decision"' in line]
    assert len(closes) == 4
    assert len(decisions) == 4
    assert all("spiffe://demo.local/ns/default/sa/app" in line for line in closes)
    assert sum('"action":"deny"' in line for line in decisions) == 1
    assert sum('"action":"allow"' in line for line in decisions) == 3
    assert "Traceback" not in out.stdout + out.stderr
