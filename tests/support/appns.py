"""An "app" namespace beside a :class:`~tests.support.netns.FakeInternet`'s DMZ, for
transparent-mode tests (issue 5)::

    app-XXXXXX                        dmz-XXXXXX                    inet-XXXXXX
    app, curl, sidecar  10.202.0.2 ──veth── 10.202.0.1  (forwards) ──► origins, DNS stub
                        fd00:202::2          fd00:202::1
    lo: 10.96.0.10 (a "cluster DNS" stub, when started)

The app's default routes go through the DMZ namespace, which forwards (its own
sysctls), so a sidecar can dial the fake internet directly as well as through the DMZ
on 10.202.0.1. ``ip netns exec app-XXXXXX`` reads ``/etc/netns/app-XXXXXX/resolv.conf``
(:meth:`AppNamespace.set_resolver`). Firewall rules are applied with
:meth:`AppNamespace.rules` (iptables/ip6tables commands, undone in reverse).
The sidecar runs as its own GID (``setpriv --regid``) so rules can exclude its traffic
with ``-m owner --gid-owner``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support import procs
from tests.support.netns import NETNS_ETC, FakeInternet, Namespace, NetnsPyegress, _wait_output, run

APP_IP, APP_GW = "10.202.0.2", "10.202.0.1"
APP_IP6, APP_GW6 = "fd00:202::2", "fd00:202::1"
CLUSTER_DNS = "10.96.0.10"
SIDECAR_GID = 4242


class Sidecar(NetnsPyegress):
    """pyegress in the app namespace, as GID :data:`SIDECAR_GID` (and, given ``uid``,
    as that user, keeping only the capabilities in ``caps``, e.g. ``("net_admin",)``)."""

    def __init__(
        self,
        ns: Namespace,
        args: Sequence[str],
        workdir: Path,
        uid: int | None = None,
        caps: Sequence[str] = (),
    ) -> None:
        self.ports = []
        self.ns = ns
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYEGRESS_LOOP"] = "uvloop"
        argv = ["setpriv", f"--regid={SIDECAR_GID}", "--clear-groups"]
        if uid is not None:
            argv.append(f"--reuid={uid}")
        if caps:
            wanted = ",".join(f"+{cap}" for cap in caps)
            argv += [f"--inh-caps={wanted}", f"--ambient-caps={wanted}"]
        argv += [sys.executable, "-m", "pyegress", *args]
        procs.Process.__init__(
            self, ns.argv(argv), workdir / f"sidecar-{time.monotonic_ns()}.log", env
        )
        _wait_output(self, '"listening"', 15)


class AppNamespace:
    def __init__(self, net: FakeInternet, workdir: Path) -> None:
        self.net = net
        self.workdir = workdir
        self.ns = Namespace(f"app-{net.suffix}")
        self._undo: list[tuple[list[str], bool]] = []
        self._procs: list[procs.Process] = []
        self.etc = NETNS_ETC / self.ns.name

    def __enter__(self) -> AppNamespace:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        net, ns = self.net, self.ns
        run(["ip", "netns", "add", ns.name])
        self._undo.append((["ip", "netns", "del", ns.name], False))
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("ip", "addr", "add", f"{CLUSTER_DNS}/32", "dev", "lo")
        net.dmz.run("ip", "link", "add", "app0", "type", "veth", "peer", "name", "appside")
        net.dmz.run("ip", "link", "set", "appside", "netns", ns.name)
        net.dmz.run("ip", "addr", "add", f"{APP_GW}/30", "dev", "app0")
        net.dmz.run("ip", "-6", "addr", "add", f"{APP_GW6}/64", "dev", "app0", "nodad")
        net.dmz.run("ip", "link", "set", "app0", "up")
        ns.run("ip", "addr", "add", f"{APP_IP}/30", "dev", "appside")
        ns.run("ip", "-6", "addr", "add", f"{APP_IP6}/64", "dev", "appside", "nodad")
        ns.run("ip", "link", "set", "appside", "up")
        ns.run("ip", "route", "add", "default", "via", APP_GW)
        ns.run("ip", "-6", "route", "add", "default", "via", APP_GW6)
        net.dmz.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        net.dmz.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        net.inet.run("ip", "route", "add", "10.202.0.0/30", "via", net.LINK_DMZ)
        net.inet.run("ip", "-6", "route", "add", "fd00:202::/64", "via", net.LINK6_DMZ)
        self.etc.mkdir(parents=True, exist_ok=True)
        self.set_resolver(net.DNS_IP)

    def set_resolver(self, nameserver: str) -> None:
        (self.etc / "resolv.conf").write_text(
            f"nameserver {nameserver}\noptions timeout:2 attempts:1\n"
        )

    def close(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                proc.stop(5)
        self._procs.clear()
        with contextlib.suppress(Exception):
            self.net.inet.run("ip", "route", "del", "10.202.0.0/30", check=False)
            self.net.inet.run("ip", "-6", "route", "del", "fd00:202::/64", check=False)
        for argv, _ in reversed(self._undo):
            run(argv, check=False)
        self._undo.clear()
        shutil.rmtree(self.etc, ignore_errors=True)

    # -- processes --------------------------------------------------------------------

    def sidecar(
        self, args: Sequence[str], uid: int | None = None, caps: Sequence[str] = ()
    ) -> Sidecar:
        proc = Sidecar(self.ns, args, self.workdir, uid, caps)
        self._procs.append(proc)
        return proc

    def start(self, argv: Sequence[str], label: str, ready: str | None = None) -> procs.Process:
        proc = procs.Process(
            self.ns.argv(argv), self.workdir / f"{label}-{time.monotonic_ns()}.log"
        )
        self._procs.append(proc)
        if ready is not None:
            _wait_output(proc, ready, 15)
        return proc

    def stop(self, proc: procs.Process) -> None:
        proc.stop(5)
        if proc in self._procs:
            self._procs.remove(proc)

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command in the app namespace as the app (root, not the sidecar's GID)."""
        return subprocess.run(
            self.ns.argv(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    # -- firewall ---------------------------------------------------------------------

    @contextlib.contextmanager
    def rules(
        self, commands: Sequence[Sequence[str]], undo: Sequence[Sequence[str]]
    ) -> Iterator[None]:
        """Run ``commands`` (iptables/ip6tables argv) in the app namespace for the block,
        then ``undo`` (errors ignored)."""
        try:
            for argv in commands:
                self.ns.run(*argv)
            yield
        finally:
            for argv in undo:
                self.ns.run(*argv, check=False)


def redirect_rules(
    port: int, dports: Sequence[int], family: str = "ipv4", extra_dst: Sequence[str] = ()
) -> tuple[list[list[str]], list[list[str]]]:
    """A minimal nat OUTPUT redirect (the installer's job in production): the sidecar's
    GID and the app link are excluded; ``dports`` (and anything to ``extra_dst``) are
    redirected to ``port``."""
    binary = "iptables" if family == "ipv4" else "ip6tables"
    link = "10.202.0.0/30" if family == "ipv4" else "fd00:202::/64"
    chain = "PYETEST"
    rules = [
        [binary, "-w", "-t", "nat", "-N", chain],
        [
            binary,
            "-w",
            "-t",
            "nat",
            "-A",
            chain,
            "-m",
            "owner",
            "--gid-owner",
            str(SIDECAR_GID),
            "-j",
            "RETURN",
        ],
        [binary, "-w", "-t", "nat", "-A", chain, "-d", link, "-j", "RETURN"],
    ]
    for dport in dports:
        rules.append(
            [binary, "-w", "-t", "nat", "-A", chain, "-p", "tcp", "--dport", str(dport),
             "-j", "REDIRECT", "--to-ports", str(port)]
        )  # fmt: skip
    for dst in extra_dst:
        rules.append(
            [binary, "-w", "-t", "nat", "-A", chain, "-p", "tcp", "-d", dst,
             "-j", "REDIRECT", "--to-ports", str(port)]
        )  # fmt: skip
    rules.append([binary, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", chain])
    undo = [
        [binary, "-w", "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", chain],
        [binary, "-w", "-t", "nat", "-F", chain],
        [binary, "-w", "-t", "nat", "-X", chain],
    ]
    return rules, undo


# The source article's initContainer example, verbatim but for "|| true" (each command
# is run on its own here).
ARTICLE_RULES = [
    ["iptables", "-t", "nat", "-N", "GOST_REDIRECT"],
    ["iptables", "-t", "nat", "-F", "GOST_REDIRECT"],
    ["iptables", "-t", "nat", "-A", "GOST_REDIRECT", "-d", "10.0.0.0/8", "-j", "RETURN"],
    ["iptables", "-t", "nat", "-A", "GOST_REDIRECT", "-d", "172.16.0.0/12", "-j", "RETURN"],
    ["iptables", "-t", "nat", "-A", "GOST_REDIRECT", "-d", "192.168.0.0/16", "-j", "RETURN"],
    ["iptables", "-t", "nat", "-A", "GOST_REDIRECT", "-p", "tcp", "--dport", "80",
     "-j", "REDIRECT", "--to-ports", "15001"],
    ["iptables", "-t", "nat", "-A", "GOST_REDIRECT", "-p", "tcp", "--dport", "443",
     "-j", "REDIRECT", "--to-ports", "15001"],
    ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "GOST_REDIRECT"],
]  # fmt: skip
ARTICLE_UNDO = [
    ["iptables", "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "GOST_REDIRECT"],
    ["iptables", "-t", "nat", "-F", "GOST_REDIRECT"],
    ["iptables", "-t", "nat", "-X", "GOST_REDIRECT"],
]
