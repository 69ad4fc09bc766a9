"""``pyegress redirect``: golden files of the pure renderers, the command line, and (as
root) install/uninstall in throwaway network namespaces.

Regenerate the golden files after an intended change with
``PYEGRESS_UPDATE_GOLDEN=1 pytest tests/test_redirect_rules.py -k golden`` and review the diff.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyegress.cli import main as pyegress_main
from pyegress.transparent import install as inst
from pyegress.transparent.rules import (
    RedirectSpec,
    ipt_cleanup,
    parse_ports,
    render_iptables,
    render_nft,
)
from tests.support import netns, procs

GOLDEN = Path(__file__).parent / "golden" / "redirect"
UPDATE = os.environ.get("PYEGRESS_UPDATE_GOLDEN") == "1"


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


SPECS: dict[str, RedirectSpec] = {
    "default": RedirectSpec(),
    # The source article's initContainer: RFC 1918 excluded, TCP 80 and 443 to 15001.
    "article": RedirectSpec(ports=((80, 80), (443, 443))),
    "full": RedirectSpec(
        proxy_uids=(10001, 10002),
        proxy_gids=(10001,),
        mark=0x539,
        ports=((80, 80), (443, 443), (8000, 8100)),
        dmz=(net("10.9.0.5/32"), net("2001:db8::5/128")),
        exclude=(net("10.96.0.0/12"), net("100.64.0.0/10"), net("fd00:10::/64")),
        dns_port=15053,
    ),
    "ipv4-only": RedirectSpec(ipv6=False, dns_port=15053, dmz=(net("192.0.2.7/32"),)),
    "tproxy": RedirectSpec(mode="tproxy", dns_port=15053, dmz=(net("10.9.0.5/32"),)),
    "many-ports": RedirectSpec(
        ports=(*((p, p) for p in range(8001, 8021)), (9000, 9100)), fake_ranges=()
    ),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path} (PYEGRESS_UPDATE_GOLDEN=1 writes it)"
    assert text == path.read_text(), f"{name} differs from its golden file"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden_nft(name: str) -> None:
    check_golden(f"{name}.nft", render_nft(SPECS[name]))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden_iptables(name: str) -> None:
    v4, v6 = render_iptables(SPECS[name])
    check_golden(f"{name}.v4.rules", v4)
    if SPECS[name].ipv6:
        check_golden(f"{name}.v6.rules", v6)
    else:
        assert v6 == ""


def test_capture_order_sidecar_first_dns_and_fake_before_exclusions() -> None:
    lines = [line.strip() for line in render_nft(SPECS["full"]).splitlines()]
    tags = [m.group(1) for line in lines if (m := re.search(r'comment "pyegress/([^"]+)"$', line))]
    split = tags.index("udp")  # the UDP filter chain follows the capture chain
    order = list(dict.fromkeys(t for t in tags[:split] if t != "output"))
    assert order == [
        "owner-uid", "owner-gid", "mark", "loopback", "dns", "fake-range", "dmz", "exclude",
        "capture",
    ]  # fmt: skip
    assert list(dict.fromkeys(tags[split + 1 :])) == [
        "owner-uid", "owner-gid", "mark", "loopback", "udp-dns", "udp-reject", "dmz", "exclude",
    ]  # fmt: skip


def test_udp_other_than_dns_is_logged_and_rejected_unless_allowed() -> None:
    nft = render_nft(SPECS["default"])
    assert 'meta l4proto udp counter log prefix "pyegress-udp " reject' in nft
    assert "type filter hook output priority filter" in nft
    v4, v6 = render_iptables(SPECS["default"])
    assert '-A PYEGRESS_UDP -p udp -m comment --comment "pyegress/udp-reject" -j LOG' in v4
    assert "-j REJECT --reject-with icmp-port-unreachable" in v4
    assert "-j REJECT --reject-with icmp6-port-unreachable" in v6
    allow = RedirectSpec(udp="allow")
    assert "refuse_udp" not in render_nft(allow)
    assert "PYEGRESS_UDP" not in "".join(render_iptables(allow))
    with pytest.raises(ValueError, match="udp must be"):
        RedirectSpec(udp="drop")  # type: ignore[arg-type]


def test_article_rules_are_contained() -> None:
    """Everything the article's initContainer excludes we exclude, what it redirects we
    redirect, and the defaults capture all TCP (a superset of its 80 and 443)."""
    text = render_iptables(SPECS["default"])[0]
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"):
        assert f"-d {cidr} " in text
    assert '-p tcp -m comment --comment "pyegress/capture" -j REDIRECT --to-ports 15001' in text
    article = render_iptables(SPECS["article"])[0]
    assert "--dports 80,443 " in article


def test_multiport_batches_of_fifteen() -> None:
    v4 = render_iptables(SPECS["many-ports"])[0]
    batches = re.findall(r"--dports (\S+)", v4)
    assert len(batches) == 2
    for batch in batches:
        assert sum(2 if ":" in p else 1 for p in batch.split(",")) <= 15
    assert ",".join(batches).count(",") + 1 == 21


def test_parse_ports() -> None:
    assert parse_ports("all") is None
    assert parse_ports("80, 443,8000-8100,80") == ((80, 80), (443, 443), (8000, 8100))
    for bad in ("0", "65536", "90-80", "http", "", "1,,2"):
        with pytest.raises(ValueError, match="bad port"):
            parse_ports(bad)


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        RedirectSpec(proxy_port=0)
    with pytest.raises(ValueError):
        RedirectSpec(ports=())
    with pytest.raises(ValueError):
        RedirectSpec(mode="tproxy", mark=0x150, tproxy_mark=0x150)
    with pytest.raises(ValueError):
        RedirectSpec(route_table=254)


SAVED = """\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:PYEGRESS_OUTPUT - [0:0]
:OTHER - [0:0]
-A OUTPUT -p tcp -j OTHER
-A OUTPUT -m comment --comment pyegress/jump -j PYEGRESS_OUTPUT
-A PYEGRESS_OUTPUT -o lo -m comment --comment pyegress/loopback -j RETURN
COMMIT
*mangle
:OUTPUT ACCEPT [0:0]
COMMIT
"""


def test_cleanup_removes_only_pyegress_chains_and_jumps() -> None:
    assert ipt_cleanup(SAVED) == {
        "nat": [
            "-D OUTPUT -m comment --comment pyegress/jump -j PYEGRESS_OUTPUT",
            "-F PYEGRESS_OUTPUT",
            "-X PYEGRESS_OUTPUT",
        ]
    }
    merged = inst.merge_restore(render_iptables(SPECS["default"])[0], ipt_cleanup(SAVED))
    lines = merged.splitlines()
    assert lines[lines.index("*nat") + 1].startswith("-D OUTPUT")
    assert inst.merge_restore("", ipt_cleanup(SAVED)).splitlines()[0] == "*nat"


def test_detect_backend() -> None:
    assert inst.detect_backend("auto", lambda p: f"/usr/sbin/{p}") == "nft"
    only_ipt = {"iptables-restore": "/usr/sbin/iptables-restore"}
    assert inst.detect_backend("auto", only_ipt.get) == "iptables"
    with pytest.raises(inst.RedirectError, match="neither nft nor iptables"):
        inst.detect_backend("auto", lambda p: None)


def test_has_net_admin_reads_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert inst.has_net_admin(status)
    status.write_text("Name:\tx\nCapEff:\t00000000a80425fb\n")  # a container's default set
    assert not inst.has_net_admin(status)


def test_render_and_dry_run_print_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert pyegress_main(["redirect", "render", "--ports", "80,443"]) == 0
    assert capsys.readouterr().out == render_nft(SPECS["article"])
    args = ["redirect", "install", "--dry-run", "--backend", "iptables", "--no-ipv6"]
    assert pyegress_main(args) == 0
    out = capsys.readouterr().out
    assert out == "# iptables-restore --noflush\n" + render_iptables(RedirectSpec(ipv6=False))[0]
    assert pyegress_main(["redirect", "uninstall", "--dry-run", "--backend", "nft"]) == 0
    assert "delete table inet pyegress" in capsys.readouterr().out


def test_cli_options_build_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "redirect", "render", "--backend", "iptables", "--dmz", "[2001:db8::5]",
        "--dmz", "10.9.0.5", "--exclude-cidr", "10.96.0.1/12", "--no-default-excludes",
        "--proxy-uid", "10001", "--proxy-uid", "10002", "--proxy-gid", "10001",
        "--mark", "0x539", "--ports", "80,443,8000-8100", "--dns-port", "15053",
        "--fake-range", "198.18.0.0/15",
    ]  # fmt: skip
    assert pyegress_main(args) == 0
    out = capsys.readouterr().out
    assert "-d 10.96.0.0/12 " in out
    assert "-d 10.0.0.0/8 " not in out
    assert "-d 2001:db8::5/128 " in out
    assert "fc00:ffff::/96" not in out
    assert "--mark 0x539/0x539" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--exclude-cidr", "10.0.0.0/33"], "bad CIDR '10.0.0.0/33'"),
        (["--ports", "80,99999"], "bad port '99999'"),
        (["--proxy-port", "http"], "bad port 'http'"),
        (["--dns-port", "0"], "bad port '0'"),
        (["--mark", "0"], "bad mark '0'"),
        (["--dmz", "no-such-host.invalid"], "cannot resolve --dmz 'no-such-host.invalid'"),
        (["--mode", "tproxy", "--mark", "0x150"], "must differ from the TPROXY mark"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        pyegress_main(["redirect", "install", "--dry-run", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pyegress redirect: ")
    assert needle in err
    assert err.count("\n") == 1


def test_missing_net_admin_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(inst, "has_net_admin", lambda: False)
    assert pyegress_main(["redirect", "install", "--backend", "nft"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyegress redirect: need CAP_NET_ADMIN (")
    assert err.count("\n") == 1


# --- as root, in network namespaces --------------------------------------------------

_why = netns.unavailable() or (None if shutil.which("nft") else "nft is not installed")
needs_netns = pytest.mark.skipif(_why is not None, reason=_why or "")


def redirect_cmd(ns: netns.Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ns.argv([sys.executable, "-m", "pyegress", "redirect", *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=procs.ROOT)


def install_ok(ns: netns.Namespace, *args: str) -> None:
    proc = redirect_cmd(ns, *args)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def app_ns() -> Iterator[netns.Namespace]:
    ns = netns.Namespace(f"pyegrr-{secrets.token_hex(3)}")
    netns.run(["ip", "netns", "add", ns.name])
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        netns.run(["ip", "netns", "del", ns.name], check=False)


def nft_state(ns: netns.Namespace) -> str:
    return ns.run("nft", "list", "ruleset").stdout


def ipt_state(ns: netns.Namespace) -> str:
    """iptables-save and ip6tables-save without counters, comments and the empty built-in
    chains that iptables creates on first use (no rule and no policy of ours in them)."""
    out = []
    for save in ("iptables-save", "ip6tables-save"):
        for line in ns.run(save).stdout.splitlines():
            if line.startswith("#"):
                continue
            out.append(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
    text = "\n".join(out)
    empty = r"\*\w+\n(?::[A-Z]+ ACCEPT \[0:0\]\n)*COMMIT\n?"
    return re.sub(empty, "", text + "\n").strip()


def policy_routing(ns: netns.Namespace) -> str:
    rules = ns.run("ip", "rule").stdout + ns.run("ip", "-6", "rule").stdout
    routes = ns.run("ip", "route", "show", "table", "all").stdout
    routes += ns.run("ip", "-6", "route", "show", "table", "all").stdout
    return rules + "".join(line + "\n" for line in routes.splitlines() if "table 150" in line)


@pytest.mark.root
@needs_netns
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_nft_install_idempotent_and_uninstall_restores(app_ns: netns.Namespace, mode: str) -> None:
    before = nft_state(app_ns)
    routing_before = policy_routing(app_ns)
    args = ["--backend", "nft", "--mode", mode, "--dns-port", "15053", "--dmz", "10.9.0.5"]
    install_ok(app_ns, "install", *args)
    first = nft_state(app_ns)
    assert 'table inet pyegress {\n\tcomment "pyegress redirect: managed by' in first
    assert 'meta skuid 10001 return comment "pyegress/owner-uid"' in first
    install_ok(app_ns, "install", *args)
    assert nft_state(app_ns) == first
    routing = policy_routing(app_ns)
    if mode == "tproxy":
        assert routing.count("fwmark 0x150 lookup 150") == 2  # IPv4 and IPv6
        assert "local default dev lo" in routing
    else:
        assert routing == routing_before
    install_ok(app_ns, "uninstall", "--backend", "nft")
    assert nft_state(app_ns) == before
    assert policy_routing(app_ns) == routing_before
    install_ok(app_ns, "uninstall", "--backend", "nft")  # nothing left to remove: fine


@pytest.mark.root
@needs_netns
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_iptables_install_idempotent_and_uninstall_restores(
    app_ns: netns.Namespace, mode: str
) -> None:
    before = ipt_state(app_ns)
    args = ["--backend", "iptables", "--mode", mode, "--dns-port", "15053", "--ports", "80,443"]
    install_ok(app_ns, "install", *args)
    first = ipt_state(app_ns)
    unquoted = first.replace('"', "")  # iptables-nft-save quotes comments, legacy does not
    table = "*nat" if mode == "redirect" else "*mangle"
    assert table in first
    assert ":PYEGRESS_OUTPUT - [0:0]" in first
    assert "-A OUTPUT -m comment --comment pyegress/jump -j PYEGRESS_OUTPUT" in unquoted
    assert "--uid-owner 10001 -m comment --comment pyegress/owner-uid -j RETURN" in unquoted
    install_ok(app_ns, "install", *args)
    assert ipt_state(app_ns) == first
    # a change of mode replaces the earlier chains rather than adding to them
    other = "tproxy" if mode == "redirect" else "redirect"
    install_ok(app_ns, "install", "--backend", "iptables", "--mode", other)
    # per IP version: OUTPUT and PREROUTING (tproxy) or OUTPUT (nat), and the UDP filter
    assert ipt_state(app_ns).count("pyegress/jump") == (6 if other == "tproxy" else 4)
    install_ok(app_ns, "uninstall", "--backend", "iptables")
    assert ipt_state(app_ns) == before
    assert "fwmark" not in app_ns.run("ip", "rule").stdout


class Responder:
    """Accepts on a listening socket and answers each connection with a fixed word."""

    def __init__(self, sock: socket.socket, word: bytes) -> None:
        self.sock = sock
        self.word = word
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.word)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.sock.close()
        self.thread.join(5)


def read_word(sock: socket.socket) -> bytes:
    with sock:
        sock.settimeout(5)
        return sock.recv(64)


CONNECT_AS = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.recv(64).decode())
"""


@pytest.fixture
def far_ns(app_ns: netns.Namespace) -> Iterator[netns.Namespace]:
    """A second namespace holding 203.0.113.2 and .3, the app's default route, by veth."""
    far = netns.Namespace(f"pyegrf-{secrets.token_hex(3)}")
    netns.run(["ip", "netns", "add", far.name])
    try:
        veth = f"pr{secrets.token_hex(3)}"
        netns.run(["ip", "link", "add", veth, "netns", app_ns.name, "type", "veth",
                   "peer", "name", "far", "netns", far.name])  # fmt: skip
        app_ns.run("ip", "addr", "add", "203.0.113.1/24", "dev", veth)
        app_ns.run("ip", "link", "set", veth, "up")
        app_ns.run("ip", "route", "add", "default", "via", "203.0.113.2")
        for addr in ("203.0.113.2/24", "203.0.113.3/24"):
            far.run("ip", "addr", "add", addr, "dev", "far")
        far.run("ip", "link", "set", "far", "up")
        far.run("ip", "link", "set", "lo", "up")
        yield far
    finally:
        netns.run(["ip", "netns", "del", far.name], check=False)


@pytest.fixture
def responders() -> Iterator[list[Responder]]:
    started: list[Responder] = []
    yield started
    for responder in started:
        responder.close()


@pytest.mark.root
@needs_netns
@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_sidecar_uid_and_dmz_are_not_captured(
    app_ns: netns.Namespace, far_ns: netns.Namespace, responders: list[Responder], backend: str
) -> None:
    """The app (root, or any other user) is captured; the sidecar's UID and the DMZ
    address reach the target in the far namespace directly."""
    responders.append(Responder(app_ns.listen("0.0.0.0", 15001), b"sidecar"))
    responders.append(Responder(far_ns.listen("0.0.0.0", 8080), b"target"))
    install_ok(app_ns, "install", "--backend", backend, "--dmz", "203.0.113.3", "--no-ipv6")

    def as_uid(uid: int, host: str) -> str:
        argv = app_ns.argv(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            "/usr/bin/python3", "-c", CONNECT_AS, host, "8080"])  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert read_word(app_ns.connect("203.0.113.2", 8080)) == b"sidecar"  # root: captured
    assert as_uid(10002, "203.0.113.2") == "sidecar"  # another user: captured
    assert as_uid(10001, "203.0.113.2") == "target"  # the sidecar's own UID: not
    assert read_word(app_ns.connect("203.0.113.3", 8080)) == b"target"  # the DMZ: not
    assert read_word(app_ns.connect("198.18.0.9", 443)) == b"sidecar"  # a fake address
    install_ok(app_ns, "uninstall", "--backend", backend)
    assert read_word(app_ns.connect("203.0.113.2", 8080)) == b"target"


@pytest.mark.root
@needs_netns
@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_tproxy_delivers_with_the_original_destination(
    app_ns: netns.Namespace, far_ns: netns.Namespace, responders: list[Responder], backend: str
) -> None:
    """TPROXY: a listener with IP_TRANSPARENT on 127.0.0.1 accepts the app's connection
    with the original destination as its local address."""

    def transparent_listener() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 15001))
        sock.listen(8)
        sock.settimeout(5)
        return sock

    listener = app_ns.call(transparent_listener)
    with listener:  # closed on every path, so a failure leaks no socket
        responders.append(Responder(far_ns.listen("0.0.0.0", 8080), b"target"))
        install_ok(app_ns, "install", "--backend", backend, "--mode", "tproxy", "--no-ipv6")
        with app_ns.connect("203.0.113.2", 8080):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockname() == ("203.0.113.2", 8080)
    install_ok(app_ns, "uninstall", "--backend", backend)
    assert read_word(app_ns.connect("203.0.113.2", 8080)) == b"target"


UDP_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b"ping")
    print(s.recv(64).decode())
except PermissionError:  # the local send itself was rejected (netfilter verdict)
    try:
        s.recv(64)
        print("eperm")
    except ConnectionRefusedError:  # and the ICMP port unreachable arrived
        print("eperm+refused")
    except TimeoutError:
        print("eperm+timeout")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""


class UdpEcho:
    """Answers every datagram with ``pong`` (in whichever namespace made ``sock``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                _data, peer = self.sock.recvfrom(64)
                if peer is None:  # woken by shutdown()
                    return
                self.sock.sendto(b"pong", peer)
            except OSError:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def udp_refused(ns: netns.Namespace, backend: str) -> int:
    """How many packets pyegress's UDP refusal (log + reject) has counted in ``ns``."""
    if backend == "nft":
        text = ns.run("nft", "list", "chain", "inet", "pyegress", "refuse_udp").stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", text))
    text = ns.run("iptables", "-w", "-t", "filter", "-L", "PYEGRESS_UDP", "-v", "-x", "-n").stdout
    return sum(int(line.split()[0]) for line in text.splitlines() if " LOG " in f" {line} ")


@pytest.mark.root
@needs_netns
@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_udp_other_than_dns_is_refused_and_logged(
    app_ns: netns.Namespace, far_ns: netns.Namespace, backend: str
) -> None:
    """UDP other than DNS fails at once (ICMP port unreachable: ECONNREFUSED on a
    connected socket) and is counted by the logging rule; DNS, the sidecar's own UID and
    ``--udp allow`` are let through."""

    def bound(port: int) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", port))
            return sock

        return far_ns.call(make)

    echoes = [UdpEcho(bound(9999)), UdpEcho(bound(53))]
    try:

        def probe(port: int, uid: int | None = None) -> str:
            argv = ["/usr/bin/python3", "-c", UDP_PROBE, "203.0.113.2", str(port)]
            if uid is not None:
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
            done = subprocess.run(app_ns.argv(argv), capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert probe(9999) == "pong"  # nothing installed yet
        install_ok(app_ns, "install", "--backend", backend, "--no-ipv6")
        before = udp_refused(app_ns, backend)
        # send() fails at once (EPERM, the netfilter verdict) and the ICMP port
        # unreachable the reject sent makes the next recv() fail with ECONNREFUSED
        assert probe(9999) == "eperm+refused"
        assert udp_refused(app_ns, backend) == before + 1
        assert probe(53) == "pong"  # DNS is not refused
        assert probe(9999, uid=10001) == "pong"  # nor the sidecar's own UDP
        assert udp_refused(app_ns, backend) == before + 1
        install_ok(app_ns, "install", "--backend", backend, "--no-ipv6", "--udp", "allow")
        assert probe(9999) == "pong"
        install_ok(app_ns, "uninstall", "--backend", backend)
    finally:
        for echo in echoes:
            echo.close()
