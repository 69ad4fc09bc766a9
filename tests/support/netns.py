"""A fake internet in network namespaces, for scenarios that need real addresses.

:class:`FakeInternet` builds, on one Linux box (root, ``ip``)::

    root namespace                dmz-XXXXXX                     inet-XXXXXX
    test client  10.200.N.1 ──veth── 10.200.N.2  pyegress (DMZ)
                                      10.201.0.2 ──veth── 10.201.0.1
                                      fd00:201::2          fd00:201::1
                                      default routes ──►   lo: 1.1.1.1, 93.184.216.34,
                                                               100.63.255.254, 100.128.0.1,
                                                               2606:4700::1111  (origins)
                                                               8.8.8.8          (DNS stub)
                                                               10.99.0.1        (squid)

Names carry a random suffix so parallel runs cannot clash, and everything built is torn
down by :meth:`FakeInternet.close` (also when building fails half way): processes are
stopped by PID first, then iptables rules, links, namespaces and ``/etc/netns/<dmz>``
are removed. ``ip netns exec dmz-XXXXXX`` bind-mounts ``/etc/netns/dmz-XXXXXX/resolv.conf``
over ``/etc/resolv.conf``, so the DMZ's resolver (glibc ``getaddrinfo``) asks the stub.

The test process itself can open sockets in either namespace (:meth:`Namespace.call`
switches one short-lived thread with ``setns(2)``), so a test can listen on the DMZ's
``127.0.0.1`` or probe squid directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.support import procs
from tests.support.dnsstub import read_log, write_zone
from tests.support.ports import wait_port

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
SQUID_BASIC_AUTH = Path("/usr/lib/squid/basic_ncsa_auth")


def unavailable() -> str | None:
    """Why this machine cannot build a fake internet, or ``None`` when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for program in ("ip", "iptables"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


def run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure raise with its stderr."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


_libc: Any = None


def _setns(path: Path) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class Namespace:
    """One named network namespace (``ip netns``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.argv(argv), check)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("cwd", str(procs.ROOT))
        return subprocess.Popen(self.argv(argv), **kwargs)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a fresh thread switched into this namespace. Sockets it creates
        stay in the namespace when used from other threads afterwards."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                _setns(NETNS_RUN / self.name)
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        value: T = box["value"]
        return value

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        return self.call(lambda: socket.create_connection((host, port), timeout=timeout))

    def listen(self, host: str, port: int) -> socket.socket:
        def make() -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
            return sock

        return self.call(make)

    def wait_port(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.call(lambda: wait_port(host, port, timeout))


def _wait_output(proc: procs.Process, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while marker not in proc.output():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.argv} did not say {marker!r}:\n{proc.output()[-3000:]}")
        time.sleep(0.02)


def get(record: dict[str, Any], path: str) -> Any:
    """``get(r, "decision.reason")``: a nested value, ``None`` when any step is absent."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


class NetnsPyegress(procs.Pyegress):
    """``python -m pyegress ARGS`` inside a namespace, its output captured like
    :class:`procs.Pyegress` (records(), matching(), ...)."""

    def __init__(
        self, ns: Namespace, args: Sequence[str], workdir: Path, loop: str = "uvloop"
    ) -> None:
        self.ports = []
        self.ns = ns
        env = dict(os.environ)
        env["PYEGRESS_LOOP"] = loop
        env["PYTHONUNBUFFERED"] = "1"
        procs.Process.__init__(
            self,
            ns.argv([sys.executable, "-m", "pyegress", *args]),
            workdir / f"pyegress-{ns.name}-{time.monotonic_ns()}.log",
            env,
        )

    def mark(self) -> int:
        """A position in the output; :meth:`audit` looks only at records after it."""
        return len(self.output().splitlines())

    def records_since(self, mark: int) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines()[mark:]:
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def audit(
        self, mark: int, host: str, port: int | None = None, timeout: float = 10.0
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``decision`` and ``close`` records (docs/audit.md) of the one tunnel to
        ``host`` (``requested.host``, IPv6 without brackets) begun after ``mark``."""
        host = host.strip("[]").lower()
        deadline = time.monotonic() + timeout
        while True:
            records = self.records_since(mark)
            decisions = [
                r
                for r in records
                if r.get("event") == "decision"
                and str(get(r, "requested.host") or "").lower() == host
                and (port is None or get(r, "requested.port") == port)
            ]
            if decisions:
                conn_id = decisions[0].get("conn_id")
                closes = [
                    r for r in records if r.get("event") == "close" and r.get("conn_id") == conn_id
                ]
                if closes:
                    return decisions[0], closes[0]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no decision+close records for {host}:{port} after {timeout}s:\n"
                    + "\n".join(self.output().splitlines()[mark:][-40:])
                )
            time.sleep(0.02)


class Squid(procs.Process):
    def __init__(self, argv: Sequence[str], directory: Path) -> None:
        self.directory = directory
        super().__init__(argv, directory / "stdout.log")

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def access_lines(self) -> list[str]:
        try:
            return self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_access(self, needle: str, timeout: float = 5.0) -> str:
        """The first access.log line containing ``needle`` (squid logs at the end of
        a transaction)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.access_lines():
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"squid logged no line with {needle!r}:\n" + "\n".join(self.access_lines())
                )
            time.sleep(0.05)


class Origins(procs.Process):
    """``tests.support.netorigins`` running in the inet namespace."""

    def accepts(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return [r for r in out if r.get("event") == "accept"]


def _pick_subnet() -> int:
    """A third octet N with no 10.200.N.0/24 address in the root namespace yet."""
    used = set(re.findall(r"inet 10\.200\.(\d+)\.", run(["ip", "-4", "-o", "addr"]).stdout))
    free = [n for n in range(256) if str(n) not in used]
    if not free:
        raise RuntimeError("no free 10.200.N.0/24 subnet")
    return free[secrets.randbelow(len(free))]


class FakeInternet:
    PUBLIC_V4 = ("1.1.1.1", "93.184.216.34", "100.63.255.254", "100.128.0.1")
    PUBLIC_V6 = ("2606:4700::1111",)
    DNS_IP = "8.8.8.8"
    PROXY_IP = "10.99.0.1"
    PROXY_PORT = 3128
    HTTP_PORT = 80
    TLS_PORT = 443
    TCP_PORTS = (7000, 7001, 7002, 7003)
    LINK_DMZ, LINK_INET = "10.201.0.2", "10.201.0.1"
    LINK6_DMZ, LINK6_INET = "fd00:201::2", "fd00:201::1"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.suffix = secrets.token_hex(3)
        self.inet = Namespace(f"inet-{self.suffix}")
        self.dmz = Namespace(f"dmz-{self.suffix}")
        self.veth = f"pe{self.suffix}"  # root side of the client link (<= 15 chars)
        self.subnet = 0
        self.zone_path = workdir / "zone.json"
        self.query_log = workdir / "dns-queries.jsonl"
        self.zone: dict[str, dict[str, Any]] = {}
        self._procs: list[procs.Process] = []
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self.dns: procs.Process | None = None
        self.origins: Origins | None = None

    # -- addresses ------------------------------------------------------------------

    @property
    def client_ip(self) -> str:
        """The root namespace's end of the client link."""
        return f"10.200.{self.subnet}.1"

    @property
    def dmz_ip(self) -> str:
        """The DMZ's address on the client link: where the test client connects."""
        return f"10.200.{self.subnet}.2"

    # -- building and tearing down ----------------------------------------------------

    def __enter__(self) -> FakeInternet:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _later(self, what: str, undo: Callable[[], object]) -> None:
        self._undo.append((what, undo))

    def _build(self) -> None:
        self.subnet = _pick_subnet()
        for ns in (self.inet, self.dmz):
            run(["ip", "netns", "add", ns.name])
            self._later(f"netns {ns.name}", functools.partial(run, ["ip", "netns", "del", ns.name]))
            ns.run("ip", "link", "set", "lo", "up")
        etc = NETNS_ETC / self.dmz.name
        etc.mkdir(parents=True, exist_ok=True)
        self._later(f"{etc}", lambda: shutil.rmtree(etc, ignore_errors=True))
        (etc / "resolv.conf").write_text(
            f"nameserver {self.DNS_IP}\noptions timeout:1 attempts:1\n"
        )
        # Client link: root <-> dmz.
        peer = f"pd{self.suffix}"
        run(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer])
        self._later(f"link {self.veth}", lambda: run(["ip", "link", "del", self.veth], False))
        run(["ip", "link", "set", peer, "netns", self.dmz.name])
        run(["ip", "addr", "add", f"{self.client_ip}/24", "dev", self.veth])
        run(["ip", "link", "set", self.veth, "up"])
        self.dmz.run("ip", "link", "set", peer, "name", "client0")
        self.dmz.run("ip", "addr", "add", f"{self.dmz_ip}/24", "dev", "client0")
        self.dmz.run("ip", "link", "set", "client0", "up")
        # Upstream link: dmz <-> inet, default routes into inet.
        self.dmz.run("ip", "link", "add", "up0", "type", "veth", "peer", "name", "down0")
        self.dmz.run("ip", "link", "set", "down0", "netns", self.inet.name)
        for ns, dev, v4, v6 in (
            (self.dmz, "up0", self.LINK_DMZ, self.LINK6_DMZ),
            (self.inet, "down0", self.LINK_INET, self.LINK6_INET),
        ):
            ns.run("ip", "addr", "add", f"{v4}/30", "dev", dev)
            ns.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ns.run("ip", "link", "set", dev, "up")
        self.dmz.run("ip", "route", "add", "default", "via", self.LINK_INET)
        self.dmz.run("ip", "-6", "route", "add", "default", "via", self.LINK6_INET)
        self.inet.run("ip", "route", "add", f"10.200.{self.subnet}.0/24", "via", self.LINK_DMZ)
        for address in (*self.PUBLIC_V4, self.DNS_IP, self.PROXY_IP):
            self.inet.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        for address in self.PUBLIC_V6:
            self.inet.run("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo")
        self.set_zone({})
        self.dns = self.start(
            self.inet,
            [
                sys.executable,
                "-m",
                "tests.support.dnsstub",
                "--listen",
                f"{self.DNS_IP}:53",
                "--zone",
                str(self.zone_path),
                "--log",
                str(self.query_log),
            ],
            "dnsstub",
        )
        _wait_output(self.dns, "ready", 15)

    def close(self) -> None:
        """Stop every process (by PID), then undo every change, newest first. Errors
        are collected and raised together after everything was tried."""
        errors: list[str] = []
        for proc in reversed(self._procs):
            try:
                proc.stop(5)
            except Exception as exc:
                errors.append(f"stop {proc.argv[:6]}: {exc}")
        self._procs.clear()
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:
                errors.append(f"undo {what}: {exc}")
        if errors:
            raise RuntimeError("fake internet teardown: " + "; ".join(errors))

    # -- processes --------------------------------------------------------------------

    def run_in(self, ns: Namespace, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``ns``; the caller owns (and stops) the process."""
        return ns.popen(argv, **kwargs)

    def start(self, ns: Namespace, argv: Sequence[str], label: str) -> procs.Process:
        """A long-lived helper in ``ns``, stopped by PID at :meth:`close`."""
        proc = procs.Process(ns.argv(argv), self.workdir / f"{label}-{time.monotonic_ns()}.log")
        self._procs.append(proc)
        return proc

    def forget(self, proc: procs.Process) -> None:
        """Stop ``proc`` now (it is no longer stopped at :meth:`close`)."""
        proc.stop(5)
        if proc in self._procs:
            self._procs.remove(proc)

    def start_origins(self, cert: Path, key: Path) -> Origins:
        """HTTP on :80, TLS on :443 (``cert`` should name every host the tests use) and
        raw TCP on :TCP_PORTS of every public address."""
        argv = [sys.executable, "-m", "tests.support.netorigins", "--cert", str(cert)]
        argv += ["--key", str(key)]
        for address in (*self.PUBLIC_V4, *self.PUBLIC_V6):
            host = f"[{address}]" if ":" in address else address
            argv += ["--http", f"{host}:{self.HTTP_PORT}", "--tls", f"{host}:{self.TLS_PORT}"]
            argv += [arg for port in self.TCP_PORTS for arg in ("--tcp", f"{host}:{port}")]
        path = self.workdir / f"origins-{time.monotonic_ns()}.log"
        origins = Origins(self.inet.argv(argv), path)
        self._procs.append(origins)
        _wait_output(origins, "ready", 15)
        self.origins = origins
        return origins

    def start_squid(
        self, auth: tuple[str, str] | None = None, deny_domains: Sequence[str] = ()
    ) -> Squid:
        """squid on PROXY_IP:PROXY_PORT in inet, resolving through the stub. With
        ``auth`` every request needs those Basic credentials; ``deny_domains`` (squid
        ``dstdomain`` syntax) are refused with 403."""
        if shutil.which("squid") is None:
            raise FileNotFoundError("squid is not installed")
        # Outside pytest's 0700 temp tree: squid's workers run as "proxy".
        d = Path(tempfile.mkdtemp(prefix=f"pyegress-squid-{self.suffix}-"))
        self._later(f"{d}", lambda: shutil.rmtree(d, ignore_errors=True))
        lines = [
            f"http_port {self.PROXY_IP}:{self.PROXY_PORT}",
            f"pid_filename {d}/squid.pid",
            f"cache_log {d}/cache.log",
            f"access_log stdio:{d}/access.log squid",
            "logfile_rotate 0",
            "cache deny all",
            "cache_mem 8 MB",
            f"coredump_dir {d}",
            f"dns_nameservers {self.DNS_IP}",
            "dns_timeout 5 seconds",
            "connect_timeout 5 seconds",
            "shutdown_lifetime 1 seconds",
            "acl to_any port 1-65535",
        ]
        if auth is not None:
            user, password = auth
            hashed = run(["openssl", "passwd", "-apr1", password]).stdout.strip()
            (d / "passwd").write_text(f"{user}:{hashed}\n")
            lines += [
                f"auth_param basic program {SQUID_BASIC_AUTH} {d}/passwd",
                "auth_param basic realm corp",
                "auth_param basic children 2",
                "acl authed proxy_auth REQUIRED",
                "http_access deny !authed",
            ]
        if deny_domains:
            lines.append("acl refused dstdomain " + " ".join(deny_domains))
            lines.append("http_access deny refused")
        lines.append("http_access allow to_any")
        (d / "squid.conf").write_text("\n".join(lines) + "\n")
        _give_to(d, "proxy")
        squid = Squid(self.inet.argv(["squid", "-N", "-f", str(d / "squid.conf")]), d)
        self._procs.append(squid)
        try:
            self.inet.wait_port(self.PROXY_IP, self.PROXY_PORT, 30)
        except TimeoutError:
            raise RuntimeError(
                f"squid did not start:\n{squid.output()[-2000:]}\n" + _read(d / "cache.log")[-2000:]
            ) from None
        return squid

    def start_dmz(
        self, args: Sequence[str], port: int | None = None, loop: str = "uvloop", wait: bool = True
    ) -> NetnsPyegress:
        """pyegress in the DMZ namespace; waits until ``dmz_ip:port`` accepts (with
        ``wait=False`` call :meth:`wait_dmz` later, to start several at once)."""
        proc = NetnsPyegress(self.dmz, args, self.workdir, loop)
        self._procs.append(proc)
        if port is not None:
            proc.ports = [port]
            if wait:
                self.wait_dmz(proc)
        return proc

    def wait_dmz(self, proc: NetnsPyegress, timeout: float = 15.0) -> None:
        for port in proc.ports:
            try:
                wait_port(self.dmz_ip, port, timeout)
            except TimeoutError:
                raise AssertionError(f"DMZ pyegress did not start:\n{proc.output()}") from None

    # -- DNS --------------------------------------------------------------------------

    def set_zone(self, zone: dict[str, dict[str, Any]]) -> None:
        self.zone = dict(zone)
        write_zone(self.zone_path, self.zone)

    def add_name(self, name: str, entry: dict[str, Any]) -> None:
        self.zone[name.lower()] = entry
        write_zone(self.zone_path, self.zone)

    def queries(
        self, name: str | None = None, qtype: str | None = None, client: str | None = None
    ) -> list[dict[str, str]]:
        """The queries the stub has answered (or dropped), oldest first; ``client`` is
        the asking address (the DMZ asks from LINK_DMZ, squid from an inet address)."""
        return [
            q
            for q in read_log(self.query_log)
            if (name is None or q["name"] == name.lower())
            and (qtype is None or q["type"] == qtype)
            and (client is None or q.get("client") == client)
        ]

    # -- packet filter ----------------------------------------------------------------

    @contextlib.contextmanager
    def iptables(self, ns: Namespace, rule: Sequence[str], chain: str = "INPUT") -> Iterator[None]:
        """Insert ``rule`` at the top of ``chain`` in ``ns`` for the block; removed on
        exit, and at :meth:`close` if the block never exits."""
        binary = "ip6tables" if any(":" in part for part in rule) else "iptables"
        ns.run(binary, "-w", "-I", chain, *rule)
        removed = False

        def remove() -> None:
            nonlocal removed
            if not removed:
                removed = True
                ns.run(binary, "-w", "-D", chain, *rule, check=False)

        self._later(f"{binary} {chain} {' '.join(rule)}", remove)
        try:
            yield
        finally:
            remove()


def _give_to(directory: Path, user: str) -> None:
    """Let a daemon that drops privileges to ``user`` write in ``directory``."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    for child in directory.iterdir():
        os.chown(child, entry.pw_uid, entry.pw_gid)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
