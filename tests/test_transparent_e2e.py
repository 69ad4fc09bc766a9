"""Issue 5, "What must be shown": transparent mode end to end, built only with the
project's own commands.

    app-XXXXXX (rules from `pyegress redirect install`, run inside it)
      curl, python3 (root, no proxy variables)
      sidecar as UID 10001: -L redirect://:15001 -L dns://127.0.0.1:5353 -F h2://DMZ
          │  (only the sidecar's UID is exempt: the DMZ's address is *not* excluded)
    dmz-XXXXXX  pyegress -L h2://:8443 -C policy   (forwards nothing for the app: air gap)
      also a "cluster service" on 10.96.7.7 / fd00:96::7 (an excluded cluster CIDR)
    inet-XXXXXX  origins on public-looking addresses, the outside DNS 8.8.8.8

The app's resolver is the outside DNS (8.8.8.8), which it cannot reach: the installer's
``--dns-port`` sends its queries to the sidecar's DNS listener, which answers outside
names with fake addresses; the redirect listener turns them back into names and the DMZ
judges and resolves them. The source article's initContainer rules applied by hand are
covered by ``tests/test_redirect.py::test_the_articles_init_container_rules``; the
installer's own rules (ordering, idempotence, owner exemption) by
``tests/test_redirect_rules.py``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import TierCerts
from tests.support.appns import APP_GW, APP_GW6, APP_IP, APP_IP6, AppNamespace, Sidecar
from tests.support.audit_schema import check_records
from tests.support.netns import FakeInternet, NetnsPyegress, get, unavailable

_WHY = unavailable() or (None if shutil.which("nft") else "nft is not installed")
pytestmark = [pytest.mark.root, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]

SIDECAR_UID = 10001  # the installer's default --proxy-uid (the image's USER)
TIER_PORT = 8443
PROXY_PORT = 15001
DNS_PORT = 5353  # an unprivileged port: the installer's --dns-port sends 53 here
TPROXY_PORT = 15011
CLUSTER_V4, CLUSTER_V6 = "10.96.7.7", "fd00:96::7"
CLUSTER_PORT = 9090
FAKE_V4 = ipaddress.ip_network("198.18.0.0/15")
FAKE_V6 = ipaddress.ip_network("fc00:ffff::/96")
IP_ORIGIN = {"ipv4": "93.184.216.34", "ipv6": "2606:4700::1111"}
NAMED_ORIGIN = {"ipv4": "1.1.1.1", "ipv6": "2606:4700::1111"}

POLICY = """\
version: 1
default: deny
rules:
  - id: web
    allow: [allowed.example]
    ports: [80, 443]
  - id: by-ip
    allow: ["93.184.216.34", "2606:4700::1111"]
    ports: [443]
  - id: raw
    allow: ["1.1.1.1", "2606:4700::1111"]
    ports: [7000]
    protocol: tcp
"""
ZONE = {
    "allowed.example": {"A": ["1.1.1.1"], "AAAA": ["2606:4700::1111"]},
    "denied.example": {"A": ["1.1.1.1"], "AAAA": ["2606:4700::1111"]},
}
# The installer's options: the sidecar's UID is the only thing keeping its own tunnel to
# the DMZ (10.202.0.1) out of the capture, since neither --dmz nor 10.0.0.0/8 is given.
INSTALL = [
    "--dns-port", str(DNS_PORT), "--no-default-excludes",
    "--exclude-cidr", "10.96.0.0/12", "--exclude-cidr", "fd00:96::/64",
]  # fmt: skip


def _redirect(app: AppNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    """``pyegress redirect ARGS`` inside the app namespace (as root: NET_ADMIN)."""
    return app.exec(sys.executable, "-m", "pyegress", "redirect", *args, timeout=60)


def _redirect_ok(app: AppNamespace, *args: str) -> None:
    done = _redirect(app, *args)
    assert done.returncode == 0, done.stderr


@dataclass
class World:
    net: FakeInternet
    app: AppNamespace
    ca: Path
    dmz: NetnsPyegress
    sidecar: Sidecar
    hop: str

    def redirect(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _redirect(self.app, *args)

    def redirect_ok(self, *args: str) -> None:
        _redirect_ok(self.app, *args)

    def curl(self, url: str, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
        """curl in the app namespace, no proxy variables: (exit code, JSON body, stderr)."""
        # env -i: no http_proxy/https_proxy/all_proxy whatever the test runner has set
        args = ["-q", "-sS", "-m", "10", "--cacert", str(self.ca), *extra, url]
        done = self.app.exec("env", "-i", "PATH=/usr/bin:/bin", "curl", *args)
        body = None
        if done.returncode == 0:
            with contextlib.suppress(ValueError):
                body = json.loads(done.stdout)
        return done.returncode, body, done.stderr

    def ruleset(self) -> str:
        text = self.app.ns.run("nft", "list", "ruleset").stdout
        return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def _readable_dir() -> Path:
    """A directory outside pytest's 0700 tree that the sidecar's UID can read."""
    path = Path(tempfile.mkdtemp(prefix="pyegress-e2e-"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[World]:
    if _WHY is not None:
        pytest.skip(_WHY)
    workdir = tmp_path_factory.mktemp("e2e")
    cert = ca.issue_cert("allowed.example", "denied.example", *IP_ORIGIN.values())
    cert_path, key_path, ca_path = workdir / "o.pem", workdir / "o.key", workdir / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    shared = _readable_dir()
    try:
        tier = TierCerts(shared)
        for path in shared.iterdir():
            path.chmod(0o644)
        policy = workdir / "policy.yaml"
        policy.write_text(POLICY)
        with FakeInternet(workdir) as net:
            net.set_zone(ZONE)
            net.start_origins(cert_path, key_path)
            dmz = net.start_dmz(
                ["-L", f"h2://:{TIER_PORT}?{tier.dmz_params()}", "-C", str(policy)], TIER_PORT
            )
            with AppNamespace(net, workdir) as app, _cluster_and_air_gap(net, app):
                app.set_resolver(net.DNS_IP)  # the outside DNS, which the app cannot reach
                hop = f"h2://{APP_GW}:{TIER_PORT}?{tier.sidecar_params()}"
                sidecar = app.sidecar(
                    ["-L", f"redirect://:{PROXY_PORT}",
                     "-L", f"dns://127.0.0.1:{DNS_PORT}?ttl=5s", "-F", hop],
                    uid=SIDECAR_UID,
                )  # fmt: skip
                _redirect_ok(app, "install", *INSTALL)
                try:
                    yield World(net, app, ca_path, dmz, sidecar, hop)
                finally:
                    _redirect(app, "uninstall")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@contextlib.contextmanager
def _cluster_and_air_gap(net: FakeInternet, app: AppNamespace) -> Iterator[None]:
    """A "cluster service" address on the DMZ side, routed from the app; and the DMZ
    namespace forwards nothing from the app, so only the DMZ's proxy reaches out."""
    net.dmz.run("ip", "addr", "add", f"{CLUSTER_V4}/32", "dev", "lo")
    net.dmz.run("ip", "-6", "addr", "add", f"{CLUSTER_V6}/128", "dev", "lo")
    app.ns.run("ip", "route", "add", "10.96.0.0/12", "via", APP_GW)
    app.ns.run("ip", "-6", "route", "add", "fd00:96::/64", "via", APP_GW6)
    with (
        net.iptables(net.dmz, ["-s", "10.202.0.0/30", "-j", "DROP"], chain="FORWARD"),
        net.iptables(net.dmz, ["-s", "fd00:202::/64", "-j", "DROP"], chain="FORWARD"),
    ):
        yield


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _flag(family: str) -> str:
    return "-4" if family == "ipv4" else "-6"


def _schema_ok(*procs_: NetnsPyegress) -> None:
    for proc in procs_:
        records = [r for r in proc.records_since(0) if r.get("schema")]
        assert check_records(records) == []


def _fake(orig: str, family: str) -> bool:
    address = ipaddress.ip_address(orig.rsplit(":", 1)[0].strip("[]"))
    return address in (FAKE_V4 if family == "ipv4" else FAKE_V6)


# -- names through the sidecar's DNS ------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_allowed_and_denied_names_through_the_sidecars_dns(world: World, family: str) -> None:
    side, dmz = world.sidecar, world.dmz
    mark, dmark = side.mark(), dmz.mark()
    code, body, err = world.curl("https://allowed.example/", _flag(family))
    assert code == 0, err + side.output()[-2000:]
    assert body is not None
    assert body["sni"] == "allowed.example"
    decision, _ = side.audit(mark, "allowed.example", 443)
    ddecision, dclose = dmz.audit(dmark, "allowed.example", 443)
    orig = str(get(decision, "orig_dst"))
    assert _fake(orig, family), orig  # the sidecar's DNS answered, not the outside DNS
    assert get(decision, "conn_id") == get(ddecision, "conn_id")
    for record in (decision, ddecision):
        assert get(record, "orig_dst") == orig
        assert get(record, "requested.name_source") == "dns"
    assert get(decision, "mode") == "transparent"
    assert get(ddecision, "decision.action") == "allow"
    assert get(ddecision, "decision.reason") == "rule_match"
    assert get(ddecision, "decision.rule_id") == "web"
    assert get(dclose, "result.close_reason") in ("eof", "client_reset")

    mark, dmark = side.mark(), dmz.mark()
    code, _, _ = world.curl("https://denied.example/", _flag(family))
    assert code != 0
    decision, close = side.audit(mark, "denied.example", 443)
    ddecision, _ = dmz.audit(dmark, "denied.example", 443)
    assert _fake(str(get(decision, "orig_dst")), family)
    assert get(ddecision, "orig_dst") == get(decision, "orig_dst")
    assert get(ddecision, "decision.action") == "deny"
    assert get(ddecision, "decision.reason") == "not_in_allowlist"
    assert get(close, "result.close_reason") == "hop_refused"
    # The app's queries never left the pod: only the DMZ asked the outside DNS.
    assert {q.get("client") for q in world.net.queries("allowed.example")} == {world.net.LINK_DMZ}
    assert not world.net.queries("denied.example", client=APP_IP)
    _schema_ok(side, dmz)


# -- addresses the app found by itself ----------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_ip_literal_is_judged_by_ip_rules(world: World, family: str) -> None:
    ip = IP_ORIGIN[family]
    mark, dmark = world.sidecar.mark(), world.dmz.mark()
    code, body, err = world.curl(f"https://{_host(ip)}/")
    assert code == 0, err
    assert body is not None
    assert body["local"] == f"{_host(ip)}:443"
    decision, _ = world.sidecar.audit(mark, ip, 443)
    ddecision, _ = world.dmz.audit(dmark, ip, 443)
    for record in (decision, ddecision):
        assert get(record, "orig_dst") == f"{_host(ip)}:443"
        assert get(record, "requested.name_source") == "orig_dst"
    assert get(ddecision, "decision.rule_id") == "by-ip"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_plain_http_name_recovered_from_host(world: World, family: str) -> None:
    """The app resolved the name some other way (a hosts entry, --resolve): the redirect
    sees a real address, and the Host header names the destination."""
    ip = NAMED_ORIGIN[family]
    mark, dmark = world.sidecar.mark(), world.dmz.mark()
    code, body, err = world.curl(
        "http://allowed.example/x", "--resolve", f"allowed.example:80:{_host(ip)}"
    )
    assert code == 0, err
    assert body is not None
    assert body["host"] == "allowed.example"
    ddecision, _ = world.dmz.audit(dmark, "allowed.example", 80)
    decision, _ = world.sidecar.audit(mark, "allowed.example", 80)
    for record in (decision, ddecision):
        assert get(record, "requested.name_source") == "host"
        assert get(record, "orig_dst") == f"{_host(ip)}:80"
    assert get(ddecision, "decision.reason") == "rule_match"


RAW = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
s.sendall(b"SSH-2.0-OpenSSH_9.6\\r\\n")
s.settimeout(5)
try:
    print(repr(s.recv(100)))
except OSError as exc:
    print(type(exc).__name__)
"""


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_raw_tcp_to_a_port_not_allowed_is_refused(world: World, family: str) -> None:
    ip = NAMED_ORIGIN[family]
    origins = world.net.origins
    assert origins is not None
    accepted = len(origins.accepts())
    dmark = world.dmz.mark()
    done = world.app.exec("python3", "-c", RAW, ip, "7001")
    assert "SSH" not in done.stdout  # the origin echoes what it gets: nothing came back
    ddecision, _ = world.dmz.audit(dmark, ip, 7001)
    assert get(ddecision, "decision.reason") == "port_not_allowed"
    assert get(ddecision, "orig_dst") == f"{_host(ip)}:7001"
    assert not [a for a in origins.accepts()[accepted:] if a.get("local", "").endswith(":7001")]


# -- what the rules leave alone -----------------------------------------------------------


class _Accepting:
    """A listener in the DMZ namespace that records the peers it accepted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peers: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                self.peers.append(peer[0])
                conn.sendall(b"cluster\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_excluded_cluster_cidr_never_enters_the_proxy(world: World, family: str) -> None:
    address = CLUSTER_V4 if family == "ipv4" else CLUSTER_V6
    service = _Accepting(world.net.dmz.listen(address, CLUSTER_PORT))
    try:
        mark = world.sidecar.mark()
        with world.app.ns.connect(address, CLUSTER_PORT) as sock:
            sock.settimeout(5)
            assert sock.recv(64) == b"cluster\n"
        assert service.peers == [APP_IP if family == "ipv4" else APP_IP6]  # not the sidecar
        assert not [
            r for r in world.sidecar.records_since(mark) if get(r, "requested.port") == CLUSTER_PORT
        ]
    finally:
        service.close()


def test_the_sidecars_own_tunnel_to_the_dmz_is_not_captured(world: World) -> None:
    """The DMZ's address is not excluded (no --dmz, no 10.0.0.0/8): the app's own
    connection to it *is* redirected to the sidecar, while the sidecar's (UID 10001)
    reaches the DMZ, which is what every other test here relies on."""
    side = world.sidecar
    assert not [r for r in side.records_since(0) if get(r, "requested.port") == TIER_PORT]
    mark = side.mark()
    with contextlib.suppress(OSError), world.app.ns.connect(APP_GW, TIER_PORT) as sock:
        sock.settimeout(5)
        sock.sendall(b"\x16\x03\x01\x00\x05hello")  # not a ClientHello: no name
        with contextlib.suppress(OSError):
            sock.recv(64)
    decision, _ = side.audit(mark, APP_GW, TIER_PORT)
    assert get(decision, "orig_dst") == f"{APP_GW}:{TIER_PORT}"
    assert side.proc.poll() is None


def test_uninstall_leaves_the_ruleset_as_it_was(world: World) -> None:
    installed = world.ruleset()
    world.redirect_ok("uninstall")
    try:
        assert world.ruleset() == ""  # the namespace had no rules before the installer ran
        world.redirect_ok("uninstall")  # nothing left to remove: fine
        assert world.ruleset() == ""
    finally:
        world.redirect_ok("install", *INSTALL)
    world.redirect_ok("install", *INSTALL)  # idempotent
    assert world.ruleset() == installed


# -- TPROXY -------------------------------------------------------------------------------


def _tproxy_unsupported() -> str | None:
    targets = Path("/proc/net/ip_tables_targets")
    with contextlib.suppress(OSError):
        if "TPROXY" not in targets.read_text().split():
            return "the kernel has no TPROXY target (xt_TPROXY not loaded or not built)"
    return None


def test_tproxy_with_the_installer_and_the_redirect_listener(world: World) -> None:
    """``pyegress redirect install --mode tproxy`` and ``-L redirect://...?tproxy=true``:
    the listener (UID 10001 with CAP_NET_ADMIN only, for IP_TRANSPARENT) sees the
    original destination as its local address; names come from SNI."""
    why = _tproxy_unsupported()
    if why is not None:
        pytest.skip(why)
    world.redirect_ok("uninstall")
    tproxy: Sidecar | None = None
    try:
        done = world.redirect(
            "install", "--mode", "tproxy", "--proxy-port", str(TPROXY_PORT), *INSTALL
        )
        if done.returncode != 0 and "tproxy" in done.stderr.lower():
            pytest.skip(f"nft tproxy refused by this kernel: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr
        tproxy = world.app.sidecar(
            ["-L", f"redirect://:{TPROXY_PORT}?tproxy=true", "-F", world.hop],
            uid=SIDECAR_UID,
            caps=("net_admin",),
        )
        for family in ("ipv4", "ipv6"):
            ip = NAMED_ORIGIN[family]
            mark, dmark = tproxy.mark(), world.dmz.mark()
            code, body, err = world.curl(
                "https://allowed.example/", "--resolve", f"allowed.example:443:{_host(ip)}"
            )
            assert code == 0, err + tproxy.output()[-2000:]
            assert body is not None
            assert body["sni"] == "allowed.example"
            decision, _ = tproxy.audit(mark, "allowed.example", 443)
            ddecision, _ = world.dmz.audit(dmark, "allowed.example", 443)
            for record in (decision, ddecision):
                assert get(record, "orig_dst") == f"{_host(ip)}:443"
                assert get(record, "requested.name_source") == "sni"
        _schema_ok(tproxy)
    finally:
        if tproxy is not None:
            world.app.stop(tproxy)
        world.redirect_ok("install", *INSTALL)


# -- UDP ----------------------------------------------------------------------------------

UDP = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b"ping")
except PermissionError:
    print("eperm")
try:
    s.recv(64)
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_other_than_dns_is_refused_at_once(world: World, family: str) -> None:
    def counted() -> int:
        text = world.app.ns.run("nft", "list", "chain", "inet", "pyegress", "refuse_udp").stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", text))

    before = counted()
    done = world.app.exec("python3", "-c", UDP, NAMED_ORIGIN[family], "443")  # QUIC-like
    assert done.stdout.split() == ["eperm", "refused"], done.stderr
    assert counted() == before + 1
