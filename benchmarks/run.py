"""Benchmark harness: pyegress against anchor proxies on one machine, one load generator.

Run from the repository root:

    .venv/bin/python benchmarks/run.py [--runs N] [--quick] [--subjects a,b,...] [--out DIR]

Every subject is started fresh for each round, rounds interleave the subjects
(round-robin with a rotating start), and the report gives medians over rounds.
All traffic stays on 127.0.0.1; every process started here is stopped by PID.
Subjects that need a firewall REDIRECT (``--set redirect``) run, with the origin and the
load generator, in a network namespace made for the run (root only), so the rules never
touch the machine's own ruleset. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import pwd
import random
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Literal

from chart import Bar, svg_chart, text_chart

Proto = Literal["http", "socks5", "none"]
JSON = dict[str, Any]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / ".build"
LOADGEN_SRC = BENCH_DIR / "loadgen.c"
LOADGEN = BUILD_DIR / "loadgen"
VENV_BIN = REPO / ".venv" / "bin"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
ERR_KEYS = ("err_connect", "err_handshake", "err_io")
REDIRECT_UID = 10001  # pyegress's user in the redirect subjects (the image's USER)
NOISE_WARN_PCT = 20.0  # % of one core used by processes not ours, median over tests
ANCHOR_ALL = "squid"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class Proc:
    """One process of a subject; ready once ``ready_port`` on 127.0.0.1 accepts."""

    name: str
    argv: list[str]
    ready_port: int | None
    env: dict[str, str] | None = None
    tier: str = ""  # "sidecar" or "dmz" in a two-tier subject, for per-tier figures


@dataclass(frozen=True)
class Plan:
    """What to start (in order) and where the load generator connects."""

    procs: list[Proc]
    proxy_port: int | None  # None: no proxy (the direct baseline, or a redirect subject)
    # Transparent subjects: the origin's ports are REDIRECTed (nat OUTPUT) to this port
    # while the subject runs; the load generator then dials the origin itself.
    redirect_to: int | None = None


class Ctx:
    """Scratch space for building one subject instance: free ports, a private dir."""

    handed_out: ClassVar[set[int]] = set()

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    @classmethod
    def port(cls) -> int:
        """A free listening port below the ephemeral range.

        Ports from bind(0) come out of the range that outgoing connections use, and the
        rate test leaves thousands of those in TIME_WAIT; a proxy binding such a port
        without SO_REUSEADDR would fail.  So pick below it and check it binds.
        """
        low = 20000
        with contextlib.suppress(OSError, ValueError):
            low = min(
                low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
            )
        for _ in range(1000):
            port = random.randrange(low // 2, low)
            if port in cls.handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((HOST, port))
                except OSError:
                    continue
            cls.handed_out.add(port)
            return port
        raise RuntimeError("no free port found")

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def pki(self) -> Pki:
        """A throwaway CA with a DMZ server and an app client certificate (ECDSA P-256),
        made with pyegress's own ``pyegress.pki``; the same for every TLS subject."""
        from pyegress.pki import CertAuthority

        ca = CertAuthority(self.tmp, "bench CA", days=2)
        dmz = ca.issue("dmz", dns=("localhost",), ips=(HOST,), days=2)
        app = ca.issue("app", uris=("spiffe://bench/app",), client=True, days=2)
        return Pki(ca.path, dmz.cert, dmz.key, app.cert, app.key)


@dataclass(frozen=True)
class Pki:
    ca: Path
    dmz_cert: Path
    dmz_key: Path
    app_cert: Path
    app_key: Path


@dataclass(frozen=True)
class Subject:
    name: str
    proto: Proto
    about: str
    build: Callable[[Ctx], Plan]
    tests: frozenset[str] = frozenset({"rate", "bulk", "idle"})
    two_tier: bool = False  # its processes have tier "sidecar" or "dmz"
    netns: bool = False  # needs the run's own network namespace (firewall rules)


def _py(*args: str) -> list[str]:
    return [str(VENV_BIN / "python"), *args]


def _pproxy(*args: str, loop: Literal["uvloop", "asyncio"] = "uvloop") -> list[str]:
    """pproxy on uvloop (or asyncio), through the small shim (see pproxy_uvloop.py)."""
    shim = str(BENCH_DIR / "pproxy_uvloop.py")
    return _py(shim, *args) if loop == "uvloop" else _py(shim, "--asyncio", *args)


def _single(name: str, argv: Callable[[int], list[str]]) -> Callable[[Ctx], Plan]:
    def build(ctx: Ctx) -> Plan:
        port = ctx.port()
        return Plan([Proc(name, argv(port), port)], port)

    return build


def _squid_conf(ctx: Ctx, port: int, access_log: bool = False) -> Path:
    """squid as a bare CONNECT proxy; with ``access_log``, writing its access log
    itself (``stdio:``, one line per tunnel, no log daemon process)."""
    t = ctx.tmp
    log = f"stdio:{t}/squid-access.log squid" if access_log else "none"
    return ctx.write(
        "squid.conf",
        f"""http_port {HOST}:{port}
http_access allow all
cache deny all
access_log {log}
cache_store_log none
cache_log {t}/squid-cache.log
pid_filename {t}/squid.pid
coredump_dir {t}
max_filedescriptors 16384
visible_hostname pyegress-bench
shutdown_lifetime 1 seconds
icp_port 0
htcp_port 0
pinger_enable off
netdb_filename none
logfile_rotate 0
dns_nameservers {HOST}
""",
    )


def _squid(ctx: Ctx) -> Plan:
    port = ctx.port()
    conf = _squid_conf(ctx, port)
    return Plan([Proc("squid", ["/usr/sbin/squid", "-N", "-f", str(conf)], port)], port)


def _tinyproxy(ctx: Ctx) -> Plan:
    port = ctx.port()
    # No ConnectPort line: CONNECT to any port is allowed (tinyproxy.conf(5)).
    conf = ctx.write(
        "tinyproxy.conf",
        f"""Port {port}
Listen {HOST}
Timeout 600
MaxClients 8192
Allow {HOST}
LogLevel Error
LogFile "{ctx.tmp}/tinyproxy.log"
PidFile "{ctx.tmp}/tinyproxy.pid"
DisableViaHeader Yes
""",
    )
    return Plan([Proc("tinyproxy", ["/usr/bin/tinyproxy", "-d", "-c", str(conf)], port)], port)


def _pproxy_tls_chain(ctx: Ctx) -> Plan:
    """Two tiers: pproxy http (sidecar) -> http+ssl -> pproxy http+ssl (DMZ) -> origin.

    One TLS connection per tunnel.  pproxy's ``ssl`` client verifies nothing and cannot
    present a client certificate, so this link is server-authenticated only, unverified.
    """
    pki = ctx.pki()
    front, back = ctx.port(), ctx.port()
    ssl = f"{pki.dmz_cert},{pki.dmz_key}"
    return Plan(
        [
            Proc("dmz", _pproxy("-l", f"http+ssl://{HOST}:{back}", "--ssl", ssl), back, tier="dmz"),
            Proc(
                "sidecar",
                _pproxy("-l", f"http://{HOST}:{front}", "-r", f"http+ssl://{HOST}:{back}"),
                front,
                tier="sidecar",
            ),
        ],
        front,
    )


def _stunnel_squid(ctx: Ctx) -> Plan:
    """Two tiers: stunnel client (sidecar) -> mutual TLS -> stunnel server -> squid (DMZ).

    The client accepts plain TCP and opens one TLS connection per tunnel; both ends verify
    the other's certificate against the bench CA, as pyegress's h2 link does.  stunnel
    logs to stderr (the process log) at level 3 (errors).
    """
    pki = ctx.pki()
    front, tls, sq = ctx.port(), ctx.port(), ctx.port()
    squid_conf = _squid_conf(ctx, sq)
    common = "foreground = yes\npid =\ndebug = 3\n"
    server = ctx.write(
        "stunnel-server.conf",
        common + f"[dmz]\naccept = {HOST}:{tls}\nconnect = {HOST}:{sq}\n"
        f"cert = {pki.dmz_cert}\nkey = {pki.dmz_key}\n"
        f"CAfile = {pki.ca}\nverifyChain = yes\nrequireCert = yes\n",
    )
    client = ctx.write(
        "stunnel-client.conf",
        common + f"[sidecar]\nclient = yes\naccept = {HOST}:{front}\nconnect = {HOST}:{tls}\n"
        f"cert = {pki.app_cert}\nkey = {pki.app_key}\n"
        f"CAfile = {pki.ca}\nverifyChain = yes\ncheckHost = localhost\n",
    )
    return Plan(
        [
            Proc("squid", ["/usr/sbin/squid", "-N", "-f", str(squid_conf)], sq, tier="dmz"),
            Proc("stunnel-dmz", ["/usr/bin/stunnel4", str(server)], tls, tier="dmz"),
            Proc("stunnel-sidecar", ["/usr/bin/stunnel4", str(client)], front, tier="sidecar"),
        ],
        front,
    )


def _pyegress_h2(tls: bool, workers: int = 1) -> Callable[[Ctx], Plan]:
    """Two tiers of pyegress over its tier link, gost grammar: sidecar ``-L http://
    -F h2://`` (one shared HTTP/2 connection, a stream per tunnel) -> DMZ ``-L h2://``.

    With ``tls`` the link is mutual TLS (the DMZ requires a client certificate signed by
    the bench CA, the sidecar verifies the DMZ's as ``localhost``); without, ``h2c``.
    With ``workers`` > 1 both tiers run ``--workers N`` (a supervisor and N worker
    processes each; every sidecar worker has its own tier link).
    """
    more = ["--workers", str(workers)] if workers > 1 else []

    def build(ctx: Ctx) -> Plan:
        front, back = ctx.port(), ctx.port()
        if tls:
            pki = ctx.pki()
            listen = f"h2://{HOST}:{back}?cert={pki.dmz_cert}&key={pki.dmz_key}&ca={pki.ca}"
            hop = (
                f"h2://{HOST}:{back}?cert={pki.app_cert}&key={pki.app_key}&ca={pki.ca}"
                "&serverName=localhost"
            )
        else:
            listen = hop = f"h2c://{HOST}:{back}"
        return Plan(
            [
                Proc("dmz", _py("-m", "pyegress", "-L", listen, *more), back, tier="dmz"),
                Proc(
                    "sidecar",
                    _py("-m", "pyegress", "-L", f"http://{HOST}:{front}", "-F", hop, *more),
                    front,
                    tier="sidecar",
                ),
            ],
            front,
        )

    return build


def _policy_text(rules: int) -> str:
    """A DMZ policy with ``rules`` rules of every kind (exact names, wildcards, apex
    suffixes, CIDRs, per-identity, deny rules) before the one rule that admits the bench
    origin on loopback: each tunnel is judged against all of them."""
    # host_check off: the load generator's payload is one byte ("e"), which a Host check
    # would hold for tls.sniff_timeout to learn whether an HTTP request line follows.
    lines = ["version: 1", "default: deny", "tls: {host_check: false}", "groups:"]
    lines.append("  bench: [spiffe://bench/ns/a/sa/b]")
    lines.append("rules:")
    for i in range(rules):
        kind = i % 5
        if kind == 0:
            body = f"allow: [api{i}.svc{i % 97}.example.com]"
        elif kind == 1:
            body = f'allow: ["*.team{i}.corp.example"]\n    ports: [443, 8443]'
        elif kind == 2:
            body = f'allow: [".pkg{i}.example.org"]\n    identities: [bench]'
        elif kind == 3:
            body = f'allow: ["93.{i // 250}.{i % 250}.0/24"]\n    ports: ["8000-8999"]'
        else:
            body = f'deny: ["blocked{i}.example.net", "10.{i % 250}.{i // 250}.0/24"]'
        lines.append(f"  - id: r{i}\n    {body}")
    lines.append('  - id: bench-origin\n    allow: ["127.0.0.1"]\n    ports: ["1-65535"]')
    lines.append("    private: [loopback]")
    return "\n".join(lines) + "\n"


def _pyegress_policy(rules: int) -> Callable[[Ctx], Plan]:
    """pyegress as the DMZ's judge, single tier: ``-L http:// -C policy.yaml`` with
    ``rules`` rules ahead of the one that matches (the 1,000-rule target of issue 4)."""

    def build(ctx: Ctx) -> Plan:
        port = ctx.port()
        policy = ctx.write(f"policy-{rules}.yaml", _policy_text(rules))
        argv = _py("-m", "pyegress", "-L", f"http://{HOST}:{port}", "-C", str(policy))
        return Plan([Proc("pyegress", argv, port)], port)

    return build


def _as_user(uid: int, argv: list[str]) -> list[str]:
    """``argv`` as ``uid`` (and the same GID, no supplementary groups)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def _pyegress_redirect(ctx: Ctx, workers: int = 1, piped: bool = False) -> Plan:
    """The redirect listener dialing the original destination itself, as its own user
    (the nat rules let that user's connections through, as the installer's do).
    With workers: SO_REUSEPORT worker processes (the user must be able to run the
    venv's python: a python under a private home directory cannot be). Piped: its
    standard output is a pipe read by ``cat`` (as a container runtime reads it), not the
    log file itself."""
    port = ctx.port()
    args = ["-m", "pyegress", "-L", f"redirect://{HOST}:{port}"]
    if workers > 1:
        args += ["--workers", str(workers)]
    argv = _as_user(REDIRECT_UID, _py(*args))
    if piped:
        argv = ["sh", "-c", '"$@" | cat', "sh", *argv]
    return Plan([Proc("pyegress", argv, port)], None, redirect_to=port)


def _redsocks_squid(ctx: Ctx, access_log: bool = False) -> Plan:
    """redsocks (type http-connect) in front of squid: the C way to do case B."""
    squid_port, port = ctx.port(), ctx.port()
    conf = _squid_conf(ctx, squid_port, access_log)
    squid = ["/usr/sbin/squid", "-N", "-f", str(conf)]
    conf = ctx.write(
        "redsocks.conf",
        f"""base {{
    log_debug = off;
    log_info = off;
    log = stderr;
    daemon = off;
    redirector = iptables;
}}
redsocks {{
    local_ip = {HOST};
    local_port = {port};
    ip = {HOST};
    port = {squid_port};
    type = http-connect;
}}
""",
    )
    redsocks = ["/usr/sbin/redsocks", "-c", str(conf)]
    return Plan([Proc("squid", squid, squid_port), Proc("redsocks", redsocks, port)], None, port)


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in [
        Subject(
            "direct",
            "none",
            "no proxy: loadgen straight to the origin (baseline)",
            lambda ctx: Plan([], None),
            frozenset({"rate", "bulk"}),
        ),
        Subject(
            "pyegress-http",
            "http",
            "pyegress -L http:// (HTTP CONNECT)",
            _single("pyegress", lambda p: _py("-m", "pyegress", "-L", f"http://{HOST}:{p}")),
        ),
        Subject(
            "pyegress-socks5",
            "socks5",
            "pyegress -L socks5://",
            _single("pyegress", lambda p: _py("-m", "pyegress", "-L", f"socks5://{HOST}:{p}")),
        ),
        Subject(
            "pyegress-http-nosplice",
            "http",
            "pyegress -L http://...?splice=false (the plain relay, no zero-copy)",
            _single(
                "pyegress",
                lambda p: _py("-m", "pyegress", "-L", f"http://{HOST}:{p}?splice=false"),
            ),
        ),
        Subject(
            "pyegress-socks5-nosplice",
            "socks5",
            "pyegress -L socks5://...?splice=false (the plain relay, no zero-copy)",
            _single(
                "pyegress",
                lambda p: _py("-m", "pyegress", "-L", f"socks5://{HOST}:{p}?splice=false"),
            ),
        ),
        Subject("squid", "http", "squid -N, no cache, no access log", _squid),
        Subject("tinyproxy", "http", "tinyproxy -d, no ConnectPort limit", _tinyproxy),
        Subject(
            "pproxy-http",
            "http",
            "pproxy -l http:// (uvloop)",
            _single("pproxy", lambda p: _pproxy("-l", f"http://{HOST}:{p}")),
        ),
        Subject(
            "pproxy-http-asyncio",
            "http",
            "pproxy -l http:// on the standard asyncio loop (no uvloop)",
            _single("pproxy", lambda p: _pproxy("-l", f"http://{HOST}:{p}", loop="asyncio")),
        ),
        Subject(
            "pproxy-socks5",
            "socks5",
            "pproxy -l socks5:// (uvloop)",
            _single("pproxy", lambda p: _pproxy("-l", f"socks5://{HOST}:{p}")),
        ),
        Subject(
            "microsocks",
            "socks5",
            "microsocks (C, thread per connection)",
            _single("microsocks", lambda p: ["/usr/bin/microsocks", "-i", HOST, "-p", str(p)]),
        ),
        Subject(
            "pyegress-policy-1",
            "http",
            "pyegress -L http:// -C policy (1 rule: the origin's)",
            _pyegress_policy(0),
        ),
        Subject(
            "pyegress-policy-1000",
            "http",
            "pyegress -L http:// -C policy (1,000 rules, then the origin's)",
            _pyegress_policy(1000),
        ),
        # Two-tier subjects (sidecar -> DMZ): the --set tier comparison.
        Subject(
            "pyegress-h2",
            "http",
            "pyegress sidecar -F h2:// (mutual TLS, one HTTP/2 connection) -> pyegress DMZ",
            _pyegress_h2(tls=True),
            two_tier=True,
        ),
        Subject(
            "pyegress-h2-w2",
            "http",
            "pyegress-h2 with --workers 2 at both tiers (SO_REUSEPORT workers)",
            _pyegress_h2(tls=True, workers=2),
            two_tier=True,
        ),
        Subject(
            "pyegress-h2c",
            "http",
            "pyegress sidecar -F h2c:// (HTTP/2 without TLS) -> pyegress DMZ; reference",
            _pyegress_h2(tls=False),
            two_tier=True,
        ),
        Subject(
            "stunnel-squid",
            "http",
            "stunnel client -> mutual TLS per tunnel -> stunnel server -> squid",
            _stunnel_squid,
            two_tier=True,
        ),
        Subject(
            "pproxy-http-tls-chain",
            "http",
            "pproxy http -> TLS per tunnel (unverified) -> pproxy http+ssl (uvloop)",
            _pproxy_tls_chain,
            two_tier=True,
        ),
        # Transparent (case B): nat OUTPUT REDIRECT of the origin's ports, in a namespace.
        Subject(
            "pyegress-redirect",
            "none",
            "pyegress -L redirect:// (SO_ORIGINAL_DST, sniffing on), dialing directly",
            _pyegress_redirect,
            netns=True,
        ),
        Subject(
            "pyegress-redirect-w2",
            "none",
            "the same with --workers 2 (two processes, as redsocks + squid are)",
            lambda ctx: _pyegress_redirect(ctx, workers=2),
            netns=True,
        ),
        Subject(
            "pyegress-redirect-w2-piped",
            "none",
            "the same with its stdout a pipe (read by cat), as under a container runtime",
            lambda ctx: _pyegress_redirect(ctx, workers=2, piped=True),
            netns=True,
        ),
        Subject(
            "redsocks-squid",
            "none",
            "redsocks (http-connect) -> squid, the C way without a mesh",
            _redsocks_squid,
            netns=True,
        ),
        Subject(
            "redsocks-squid-logged",
            "none",
            "the same with squid's access log on (a line per tunnel; pyegress writes two)",
            lambda ctx: _redsocks_squid(ctx, access_log=True),
            netns=True,
        ),
    ]
}


@dataclass(frozen=True)
class SubjectSet:
    """A named list of subjects and the anchors its report gives ratios against.

    An anchor is a subject name; ``{proto}`` in it stands for the protocol of the subject
    in the row (so ``pproxy-{proto}`` is pproxy-http for HTTP subjects).
    """

    name: str
    subjects: list[str]
    anchors: list[str]
    about: str


SETS: dict[str, SubjectSet] = {
    s.name: s
    for s in [
        SubjectSet(
            "single",
            [
                "direct",
                "pyegress-http",
                "pyegress-socks5",
                "squid",
                "tinyproxy",
                "pproxy-http",
                "pproxy-http-asyncio",
                "pproxy-socks5",
                "microsocks",
            ],
            [ANCHOR_ALL, "pproxy-{proto}"],
            "one proxy process (or one squid) between client and origin (the default)",
        ),
        SubjectSet(
            "splice",
            [
                "direct",
                "pyegress-http",
                "pyegress-http-nosplice",
                "pyegress-socks5",
                "pyegress-socks5-nosplice",
                "squid",
            ],
            [ANCHOR_ALL, "direct", "pyegress-{proto}-nosplice"],
            "the zero-copy relay (the default on plain TCP legs) against the plain relay",
        ),
        SubjectSet(
            "policy",
            ["pyegress-http", "pyegress-policy-1", "pyegress-policy-1000"],
            ["pyegress-policy-1"],
            "the DMZ's judgement: no policy, a one-rule policy, a 1,000-rule policy",
        ),
        SubjectSet(
            "tier",
            ["pyegress-h2", "stunnel-squid", "pproxy-http-tls-chain"],
            ["stunnel-squid", "pproxy-http-tls-chain"],
            "two tiers, sidecar -> encrypted link -> DMZ -> origin",
        ),
        SubjectSet(
            "workers",
            ["pyegress-h2", "pyegress-h2-w2"],
            ["pyegress-h2"],
            "the two-tier chain with one process per tier and with --workers 2 at both",
        ),
        SubjectSet(
            "redirect",
            [
                "pyegress-redirect",
                "pyegress-redirect-w2",
                "pyegress-redirect-w2-piped",
                "redsocks-squid",
                "redsocks-squid-logged",
            ],
            ["redsocks-squid"],
            "transparent: the load generator's connections to the origin are REDIRECTed",
        ),
    ]
}
DEFAULT_SET = "single"


# --------------------------------------------------------------------------- /proc


def _proc_stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from "state" (field 3) on


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` and all their living descendants."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _proc_stat_fields(int(entry.name))
            if fields is not None:
                kids.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in out or _proc_stat_fields(pid) is None:
            continue
        out.append(pid)
        stack.extend(kids.get(pid, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime (plus reaped children's) of ``pids``, in seconds."""
    ticks = 0
    for pid in pids:
        f = _proc_stat_fields(pid)
        if f is not None:
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def rss_by_proc(procs: Sequence[Started]) -> dict[str, int]:
    """VmRSS (KiB) of each started process, its children included, by process name."""
    return {st.name: rss_kib(st.pids()) for st in procs}


def background_load(seconds: float = 1.0) -> float:
    """CPU busy on the whole machine while we run nothing, % of one core."""
    b0, t0 = machine_jiffies()
    time.sleep(seconds)
    b1, t1 = machine_jiffies()
    return 100.0 * NCPU * (b1 - b0) / max(1, t1 - t0)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(vals[:8])  # user..steal; guest time is already inside user
    idle = vals[3] + vals[4]
    return total - idle, total


# --------------------------------------------------------------------------- processes


class Interrupted(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class Started:
    """A process we started, with every PID we ever saw in its tree."""

    def __init__(
        self, name: str, popen: subprocess.Popen[bytes], logfile: Path, tier: str = ""
    ) -> None:
        self.name = name
        self.popen = popen
        self.logfile = logfile
        self.tier = tier
        self.seen: set[int] = {popen.pid}

    def pids(self) -> list[int]:
        if self.popen.poll() is not None:
            return []
        tree = process_tree([self.popen.pid])
        self.seen.update(tree)
        return tree

    def stop(self, grace: float = 3.0) -> None:
        if self.popen.poll() is None:
            self.pids()
        victims = sorted(self.seen)
        for pid in victims:
            _signal(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        for pid in victims:
            if _proc_stat_fields(pid) is not None:
                _signal(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def wait_port(port: int, proc: Started, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def running(plan: Plan, tmp: Path, timeout: float) -> Iterator[list[Started] | str]:
    """Start the plan's processes in order; yield them, or a reason they did not start."""
    started: list[Started] = []
    try:
        failure: str | None = None
        for proc in plan.procs:
            logfile = tmp / f"{proc.name}.log"
            with logfile.open("wb") as out:
                popen = subprocess.Popen(
                    proc.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=tmp,
                    env={**os.environ, **(proc.env or {})},
                    start_new_session=True,
                )
            st = Started(proc.name, popen, logfile, proc.tier)
            started.append(st)
            if proc.ready_port is not None and not wait_port(proc.ready_port, st, timeout):
                rc = popen.poll()
                why = f"exited with {rc}" if rc is not None else f"port not open after {timeout}s"
                tail = st.tail(4).replace("\n", " | ")
                failure = f"{proc.name} {why}" + (f": {tail}" if tail else "")
                break
        yield failure if failure else started
    finally:
        for st in reversed(started):
            st.stop()


# --------------------------------------------------------------------------- namespace

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def own_namespace() -> Iterator[str]:
    """Move this (still single-threaded) process into a fresh network namespace with
    only ``lo``; everything started afterwards (origin, proxies, load generator) runs
    there. Moves back and deletes the namespace at the end."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        raise RuntimeError("the redirect subjects need root, ip and iptables")
    name = f"pyebench-{secrets.token_hex(3)}"
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    _ip("netns", "add", name)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            _ip("link", "set", "lo", "up")
            yield name
        finally:
            _setns(home)
    finally:
        os.close(home)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


REDIRECT_CHAIN = "BENCH_REDIRECT"


def _exempt_uids() -> list[int]:
    """The users whose connections are never redirected: pyegress's, and squid's
    (``proxy``), which dial the origin themselves."""
    uids = [REDIRECT_UID]
    with contextlib.suppress(KeyError):
        uids.append(pwd.getpwnam("proxy").pw_uid)
    return uids


def redirect_rules(ports: Sequence[int], to: int) -> tuple[list[list[str]], list[list[str]]]:
    """iptables commands (and their undo) redirecting TCP to ``HOST:ports`` to ``to``,
    in the style of the source article's initContainer, plus the owner exemption."""
    nat = ["iptables", "-w", "-t", "nat"]
    rules = [[*nat, "-N", REDIRECT_CHAIN]]
    rules += [
        [*nat, "-A", REDIRECT_CHAIN, "-m", "owner", "--uid-owner", str(uid), "-j", "RETURN"]
        for uid in _exempt_uids()
    ]
    rules.append(
        [*nat, "-A", REDIRECT_CHAIN, "-p", "tcp", "-d", HOST, "-m", "multiport",
         "--dports", ",".join(map(str, ports)), "-j", "REDIRECT", "--to-ports", str(to)]
    )  # fmt: skip
    rules.append([*nat, "-A", "OUTPUT", "-p", "tcp", "-j", REDIRECT_CHAIN])
    undo = [
        [*nat, "-D", "OUTPUT", "-p", "tcp", "-j", REDIRECT_CHAIN],
        [*nat, "-F", REDIRECT_CHAIN],
        [*nat, "-X", REDIRECT_CHAIN],
    ]
    return rules, undo


@contextlib.contextmanager
def redirected(ports: Sequence[int], to: int | None) -> Iterator[None]:
    if to is None:
        yield
        return
    rules, undo = redirect_rules(ports, to)
    try:
        for argv in rules:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        yield
    finally:
        for argv in undo:
            subprocess.run(argv, check=False, capture_output=True, timeout=30)


# --------------------------------------------------------------------------- load generator


def build_loadgen() -> Path:
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    log(f"compiling {LOADGEN_SRC.name} -> {LOADGEN}")
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(LOADGEN), str(LOADGEN_SRC), "-lm"],
        check=True,
    )
    return LOADGEN


def _last_json(text: str) -> JSON | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                obj: JSON = json.loads(line)
            except json.JSONDecodeError:
                return None
            return obj
    return None


class Origin:
    """The loadgen origin process: echo, bulk source and bulk sink."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [str(LOADGEN), "origin", "--echo", "0", "--source", "0", "--sink", "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.popen.stdout is not None
        ready = json.loads(self.popen.stdout.readline())
        self.echo: int = ready["echo"]
        self.source: int = ready["source"]
        self.sink: int = ready["sink"]

    def cpu(self) -> float:
        return cpu_seconds([self.popen.pid])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.stdin:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        try:
            self.popen.wait(timeout=3)
        except subprocess.TimeoutExpired:
            _signal(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=3)


# --------------------------------------------------------------------------- tests


@dataclass
class Settings:
    runs: int = 3
    rate_seconds: float = 5.0
    rate_concurrency: int = 32
    bulk_seconds: float = 4.0
    bulk_tunnels: tuple[int, ...] = (1, 8)
    upload: bool = False
    idle_count: int = 2000
    idle_settle: float = 1.0
    warmup_seconds: float = 0.5
    start_timeout: float = 15.0
    socks_domain: str | None = None
    profile: Path | None = None  # py-spy raw stacks of pyegress processes, per test


@dataclass
class Outcome:
    test: str
    metrics: dict[str, float] = field(default_factory=dict)
    raw: JSON = field(default_factory=dict)
    error: str | None = None


def _without_proxy_metrics(res: Outcome) -> Outcome:
    """The direct baseline has no proxy: drop the proxy CPU figures."""
    proxy_keys = ("rate_cpu_us", "_cpu_s_per_gb", "_proxy_cpu_pct")
    res.metrics = {k: v for k, v in res.metrics.items() if not k.endswith(proxy_keys)}
    return res


class Bench:
    def __init__(self, settings: Settings, origin: Origin) -> None:
        self.s = settings
        self.origin = origin

    def _client_args(self, subject: Subject, plan: Plan, target: int) -> list[str]:
        args = ["--proto", subject.proto, "--target", f"{HOST}:{target}"]
        if plan.proxy_port is not None:
            args += ["--proxy", f"{HOST}:{plan.proxy_port}"]
        if self.s.socks_domain and subject.proto == "socks5":
            args += ["--socks-domain", self.s.socks_domain]
        return args

    def _profilers(self, procs: list[Started], label: str) -> list[subprocess.Popen[bytes]]:
        """With --profile: py-spy sampling each pyegress process (and its workers) while
        the test runs. The samplers take CPU of their own: profile runs are for reading
        where the time goes, not for the figures."""
        if self.s.profile is None or not shutil.which("py-spy", path=str(VENV_BIN)):
            return []
        self.s.profile.mkdir(parents=True, exist_ok=True)
        spies = []
        for st in procs:
            if not (st.name.startswith("pyegress") or st.tier):  # ours: by name, or a tier
                continue
            out = self.s.profile / f"{st.name}-{label}.txt"
            argv = [str(VENV_BIN / "py-spy"), "record", "--pid", str(st.popen.pid)]
            argv += ["--subprocesses", "--rate", "200", "--format", "raw"]
            if os.environ.get("PYEGRESS_PROFILE_NATIVE") == "1":
                argv.append("--native")  # C frames too; py-spy then pauses the process
            else:
                argv.append("--nonblocking")
            argv += ["--output", str(out)]
            spies.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        if spies:
            time.sleep(0.5)  # let the samplers attach
        return spies

    @staticmethod
    def _stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
        for spy in spies:
            _signal(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        for spy in spies:
            try:
                spy.wait(timeout=20)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()

    def _measured(
        self, procs: list[Started], argv: list[str], timeout: float, label: str
    ) -> tuple[JSON | None, JSON, str]:
        """Run one loadgen client while sampling CPU of proxy, origin and machine."""
        spies = self._profilers(procs, label)
        per0 = {st.name: cpu_seconds(st.pids()) for st in procs}
        org0, (busy0, tot0), t0 = self.origin.cpu(), machine_jiffies(), time.monotonic()
        try:
            r = subprocess.run(
                [str(LOADGEN), *argv], capture_output=True, text=True, timeout=timeout, check=False
            )
        finally:
            self._stop_profilers(spies)
        # A process that exited meanwhile counts 0 from here on (its CPU is lost).
        per = {st.name: max(0.0, cpu_seconds(st.pids()) - per0[st.name]) for st in procs}
        wall = time.monotonic() - t0
        busy1, tot1 = machine_jiffies()
        meter = {
            "proxy_cpu_s": sum(per.values()),
            "proc_cpu_s": per,
            "origin_cpu_s": self.origin.cpu() - org0,
            "wall_s": wall,
            "machine_busy_pct": 100.0 * NCPU * (busy1 - busy0) / max(1, tot1 - tot0),
            "exit_code": r.returncode,
        }
        return _last_json(r.stdout), meter, r.stderr.strip()

    @staticmethod
    def _headroom(out: JSON, meter: JSON, seconds: float, prefix: str) -> dict[str, float]:
        wall = max(meter["wall_s"], 1e-9)
        ours = {
            "loadgen": 100.0 * float(out["cpu_s"]) / wall,
            "origin": 100.0 * float(meter["origin_cpu_s"]) / wall,
            "proxy": 100.0 * float(meter["proxy_cpu_s"]) / wall,
        }
        busy = float(meter["machine_busy_pct"])
        per_proc = meter.get("proc_cpu_s", {})
        return {
            **{f"{prefix}_{k}_cpu_pct": v for k, v in ours.items()},
            # each process of the subject (tells which tier is the bottleneck)
            **{f"{prefix}_proc:{n}_cpu_pct": 100.0 * float(c) / wall for n, c in per_proc.items()},
            # whatever else ran on the machine meanwhile (noise), by difference
            f"{prefix}_others_cpu_pct": max(0.0, busy - sum(ours.values())),
            f"{prefix}_machine_busy_pct": busy,
        }

    def rate(
        self,
        subj: Subject,
        plan: Plan,
        procs: list[Started],
        seconds: float,
        concurrency: int,
        name: str = "rate",
    ) -> Outcome:
        argv = [
            "rate",
            *self._client_args(subj, plan, self.origin.echo),
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
        ]
        out, meter, err = self._measured(procs, argv, seconds + 30, name)
        res = Outcome(name, raw={"loadgen": out, "meter": meter, "stderr": err})
        if out is None or not out.get("completed"):
            counts = ", ".join(f"{k}={out[k]}" for k in ERR_KEYS) if out else err
            res.error = f"no tunnel completed ({counts})"
            return res
        errors = sum(int(out[k]) for k in ERR_KEYS)
        if errors:
            res.raw["note"] = f"{errors} failed tunnels"
        done = int(out["completed"])
        res.metrics = {
            "rate_tps": float(out["tunnels_per_s"]),
            "rate_p50_ms": float(out["p50_ms"]),
            "rate_p99_ms": float(out["p99_ms"]),
            "rate_cpu_us": 1e6 * float(meter["proxy_cpu_s"]) / done,
            "rate_errors": float(errors),
            **self._headroom(out, meter, seconds, "rate"),
        }
        return _without_proxy_metrics(res) if not procs else res

    def bulk(
        self, subj: Subject, plan: Plan, procs: list[Started], tunnels: int, up: bool
    ) -> Outcome:
        name = f"bulk_{'up' if up else 'down'}{tunnels}"
        target = self.origin.sink if up else self.origin.source
        argv = [
            "bulk",
            *self._client_args(subj, plan, target),
            "--tunnels",
            str(tunnels),
            "--seconds",
            str(self.s.bulk_seconds),
            "--dir",
            "up" if up else "down",
        ]
        out, meter, err = self._measured(procs, argv, self.s.bulk_seconds + 60, name)
        res = Outcome(name, raw={"loadgen": out, "meter": meter, "stderr": err})
        if out is None or int(out.get("ok", 0)) != tunnels or int(out.get("stalled", 1)):
            res.error = f"bulk failed ({err or out})"
            return res
        gb = int(out["bytes"]) / 1e9
        res.metrics = {
            f"{name}_mbps": float(out["mb_per_s"]),
            f"{name}_cpu_s_per_gb": float(meter["proxy_cpu_s"]) / gb if gb else float("nan"),
            **self._headroom(out, meter, self.s.bulk_seconds, name),
        }
        return _without_proxy_metrics(res) if not procs else res

    def idle(self, subj: Subject, plan: Plan, procs: list[Started]) -> Outcome:
        res = Outcome("idle")
        count = self.s.idle_count
        time.sleep(self.s.idle_settle)
        before = rss_by_proc(procs)
        argv = [
            str(LOADGEN),
            "idle",
            *self._client_args(subj, plan, self.origin.echo),
            "--count",
            str(count),
            "--concurrency",
            "64",
            "--hold",
            "120",
            "--setup-timeout",
            "60",
        ]
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None
            assert p.stdin is not None
            line = p.stdout.readline()
            ready: JSON = json.loads(line) if line.startswith("{") else {}
            time.sleep(self.s.idle_settle)
            samples: list[dict[str, int]] = []
            for _ in range(3):
                samples.append(rss_by_proc(procs))
                time.sleep(0.2)
            stdout, _ = p.communicate(timeout=60)  # closes stdin: the tunnels close
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        final = _last_json(stdout)
        ok = int(ready.get("ok", 0))
        res.raw = {
            "ready": ready,
            "loadgen": final,
            "rss_before_kib": before,
            "rss_samples_kib": samples,
        }
        # Median of the samples, per process; then sums over all and over each tier.
        during = {n: int(statistics.median(x[n] for x in samples)) for n in before}
        tier_of = {st.name: st.tier for st in procs}
        groups: dict[str, list[str]] = {"": list(before)}
        for n, t in tier_of.items():
            if t:
                groups.setdefault(t, []).append(n)
        if ok == 0:
            res.error = f"no idle tunnel opened ({ready or stdout})"
            return res
        if ok < count or (final and int(final.get("dropped", 0))):
            res.raw["note"] = f"{ok}/{count} tunnels opened, dropped {final and final['dropped']}"
        res.metrics = {"idle_setup_p50_ms": float(final["p50_ms"]) if final else float("nan")}
        for tier, names in groups.items():
            sfx = f"_{tier}" if tier else ""
            b, d = sum(before[n] for n in names), sum(during[n] for n in names)
            res.metrics[f"idle{sfx}_kib_per_tunnel"] = (d - b) / ok
            res.metrics[f"idle_rss{sfx}_mib"] = d / 1024
        return res

    def instance(self, subj: Subject, tmp: Path) -> JSON:
        """Start one subject, run all its tests, stop it."""
        tmp.mkdir(parents=True)
        tmp.chmod(0o777)  # squid and tinyproxy drop privileges but write logs here
        record: JSON = {"subject": subj.name, "status": "ok", "outcomes": [], "notes": []}
        try:
            plan = subj.build(Ctx(tmp))
        except Exception as e:  # a missing tool: report and go on
            record["status"] = f"n/a: could not be set up ({e})"
            return record
        ports = (self.origin.echo, self.origin.source, self.origin.sink)
        with (
            redirected(ports, plan.redirect_to),
            running(plan, tmp, self.s.start_timeout) as procs,
        ):
            if isinstance(procs, str):
                record["status"] = "n/a: did not start"
                record["notes"].append(procs)
                return record
            if procs:
                start = rss_by_proc(procs)
                record["rss_start_kib"] = sum(start.values())
                record["rss_start_by_proc_kib"] = start
                for t in sorted({st.tier for st in procs if st.tier}):
                    record[f"rss_start_{t}_kib"] = sum(
                        start[st.name] for st in procs if st.tier == t
                    )
            warm = self.rate(subj, plan, procs, self.s.warmup_seconds, 4, "warmup")
            if warm.error:
                record["status"] = "n/a: tunnels fail"
                record["notes"].append(warm.error)
                record["notes"] += [
                    f"{st.name} log: {st.tail(3).replace(chr(10), ' | ')}"
                    for st in procs
                    if st.tail(3)
                ]
                return record
            outcomes: list[Outcome] = []
            # Idle first: its RSS baseline is then the warmed-up process, not one still
            # holding what thousands of short tunnels and bulk buffers left in its heap.
            if "idle" in subj.tests and procs:
                outcomes.append(self.idle(subj, plan, procs))
            if "rate" in subj.tests:
                outcomes.append(
                    self.rate(subj, plan, procs, self.s.rate_seconds, self.s.rate_concurrency)
                )
            if "bulk" in subj.tests:
                for up in [False, True] if self.s.upload else [False]:
                    outcomes += [self.bulk(subj, plan, procs, n, up) for n in self.s.bulk_tunnels]
            dead = [st.name for st in procs if st.popen.poll() is not None]
            if dead:
                record["notes"].append(f"exited during the tests: {', '.join(dead)}")
        for o in outcomes:
            record["outcomes"].append(
                {"test": o.test, "metrics": o.metrics, "raw": o.raw, "error": o.error}
            )
            if o.error:
                record["notes"].append(f"{o.test}: {o.error}")
            elif o.raw.get("note"):
                record["notes"].append(f"{o.test}: {o.raw['note']}")
        if "rss_start_kib" in record:
            record["metrics_extra"] = {
                f"rss_start{sfx}_mib": record[f"rss_start{sfx}_kib"] / 1024
                for sfx in ("", "_sidecar", "_dmz")
                if f"rss_start{sfx}_kib" in record
            }
        return record


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_better: bool
    digits: int
    two_tier_only: bool = False


def metric_table(settings: JSON) -> list[Metric]:
    c = settings["rate_concurrency"]
    out = [
        Metric("rate_tps", f"Tunnel rate, concurrency {c}", "tunnels/s", True, 0),
        Metric(
            "rate_p50_ms", f"Tunnel latency p50 (connect to echo), concurrency {c}", "ms", False, 2
        ),
        Metric("rate_p99_ms", f"Tunnel latency p99, concurrency {c}", "ms", False, 2),
        Metric("rate_cpu_us", "Proxy CPU per tunnel (rate test)", "µs", False, 0),
    ]
    dirs = ["down", "up"] if settings["upload"] else ["down"]
    for d in dirs:
        for n in settings["bulk_tunnels"]:
            label = "download" if d == "down" else "upload"
            out.append(Metric(f"bulk_{d}{n}_mbps", f"Bulk {label}, {n} tunnel(s)", "MB/s", True, 0))
            out.append(
                Metric(
                    f"bulk_{d}{n}_cpu_s_per_gb",
                    f"Proxy CPU per GB, bulk {label}, {n} tunnel(s)",
                    "CPU s/GB",
                    False,
                    2,
                )
            )
    out += [
        Metric(
            "idle_kib_per_tunnel",
            f"Memory per idle tunnel ({settings['idle_count']} open)",
            "KiB",
            False,
            1,
        ),
        Metric(
            "idle_sidecar_kib_per_tunnel",
            f"Memory per idle tunnel at the sidecar tier ({settings['idle_count']} open)",
            "KiB",
            False,
            1,
            two_tier_only=True,
        ),
        Metric(
            "idle_dmz_kib_per_tunnel",
            f"Memory per idle tunnel at the DMZ tier ({settings['idle_count']} open)",
            "KiB",
            False,
            1,
            two_tier_only=True,
        ),
        Metric("rss_start_mib", "Proxy RSS at start (all processes)", "MiB", False, 1),
        Metric(
            "idle_rss_mib", f"Proxy RSS with {settings['idle_count']} idle tunnels", "MiB", False, 1
        ),
    ]
    return out


def _fmt(v: float, digits: int) -> str:
    if v != v:  # NaN
        return "—"
    return f"{v:,.{digits}f}"


def collect(results: JSON) -> dict[str, dict[str, list[float]]]:
    """subject -> metric -> values over rounds."""
    vals: dict[str, dict[str, list[float]]] = {}
    for rec in results["records"]:
        per = vals.setdefault(rec["subject"], {})
        for o in rec["outcomes"]:
            for k, v in o["metrics"].items():
                per.setdefault(k, []).append(float(v))
        for k, v in rec.get("metrics_extra", {}).items():
            per.setdefault(k, []).append(float(v))
    return vals


def _noise_warning(vals: dict[str, dict[str, list[float]]]) -> list[str]:
    """A warning line when other processes took a real share of the machine meanwhile."""
    others = [x for per in vals.values() for k, v in per.items() if k.endswith("_others_cpu_pct")
              for x in v]  # fmt: skip
    if not others or statistics.median(others) < NOISE_WARN_PCT:
        return []
    return [
        f"**Warning: other processes used a median {statistics.median(others):.0f}% of one core "
        "during the tests** (column 'other processes' below): this run is noisy, compare "
        "with a run on a quiet machine.",
        "",
    ]


def _anchor(spec: str, subject: str) -> str:
    """The anchor subject for a row: ``{proto}`` in the spec becomes the row's protocol."""
    subj = SUBJECTS.get(subject)
    return spec.format(proto=subj.proto if subj else "?")


def _anchor_label(spec: str) -> str:
    return spec.replace("-{proto}", "").replace("{proto}", "")


def _summary_columns(st: JSON) -> list[tuple[str, str, int, bool]]:
    """(metric key, column header, digits, higher is better) of the summary tables."""
    bulk: list[int] = list(st["bulk_tunnels"])
    return [
        ("rate_tps", "tunnels/s", 0, True),
        ("rate_p50_ms", "p50 ms", 2, False),
        ("rate_p99_ms", "p99 ms", 2, False),
        ("rate_cpu_us", "CPU µs/tunnel", 0, False),
        *[(f"bulk_down{n}_mbps", f"MB/s, {n} tunnel{'s' * (n > 1)}", 0, True) for n in bulk],
        (f"bulk_down{bulk[-1]}_cpu_s_per_gb", f"CPU s/GB, {bulk[-1]} tunnels", 2, False),
        ("idle_kib_per_tunnel", "KiB/idle tunnel", 1, False),
        ("rss_start_mib", "RSS at start, MiB", 1, False),
    ]


# The figures of the ratio chart: (metric key, label, higher is better).
_CHART_FIGURES = [
    ("rate_tps", "tunnels/s", True),
    ("bulk_down1_mbps", "MB/s, 1 tunnel", True),
    ("bulk_down8_mbps", "MB/s, 8 tunnels", True),
    ("bulk_down8_cpu_s_per_gb", "bytes per CPU s", False),
    ("idle_kib_per_tunnel", "idle tunnels per MiB", False),
]


def chart_bars(results: JSON) -> tuple[str, list[Bar]]:
    """The first anchor of the run and, for every other subject, its ratios to it,
    oriented so that larger is better (costs inverted)."""
    subjects: list[str] = results["subjects"]
    anchors: list[str] = results.get("anchors") or SETS[DEFAULT_SET].anchors
    vals = collect(results)
    present = [spec for spec in anchors if any(_anchor(spec, s) in subjects for s in subjects)]
    if not present:
        return "", []
    spec = present[0]
    bars: list[Bar] = []
    for s in subjects:
        anchor = _anchor(spec, s)
        if s in (anchor, "direct") or anchor not in subjects:
            continue
        for key, label, higher in _CHART_FIGURES:
            mine, theirs = vals.get(s, {}).get(key), vals.get(anchor, {}).get(key)
            if not mine or not theirs:
                continue
            a, b = statistics.median(mine), statistics.median(theirs)
            if a > 0 and b > 0:
                bars.append(Bar(s, label, a / b if higher else b / a))
    return _anchor_label(spec), bars


def write_chart(results: JSON, out_dir: Path) -> None:
    anchor, bars = chart_bars(results)
    if bars:
        title = f"pyegress benchmark ({results.get('set') or 'custom'}): ratios to {anchor}"
        (out_dir / "ratios.svg").write_text(svg_chart(bars, anchor, title))


def render_report(results: JSON) -> str:
    st = results["settings"]
    subjects: list[str] = results["subjects"]
    anchors: list[str] = results.get("anchors") or SETS[DEFAULT_SET].anchors
    vals = collect(results)
    status: dict[str, list[str]] = {s: [] for s in subjects}
    notes: dict[str, list[str]] = {s: [] for s in subjects}
    for rec in results["records"]:
        status[rec["subject"]].append(rec["status"])
        notes[rec["subject"]] += [
            f"round {rec['round'] + 1}: {' '.join(n.split())}" for n in rec["notes"]
        ]
    env = results["env"]
    anchor_text = ", ".join(f"`{a}`" for a in anchors).replace("{proto}", "<protocol>")
    lines = [
        "# pyegress benchmark report",
        "",
        f"- date: {results['started']} (took {results['elapsed_s']:.0f} s)",
        f"- machine: {env['cpu']}, {env['cpus']} CPUs, kernel {env['kernel']}, "
        f"Python {env['python']}",
        f"- subject set: {results.get('set') or 'custom'}; ratio anchors: {anchor_text}",
        f"- rounds: {st['runs']} (subjects restarted and interleaved each round); medians shown",
        f"- rate: {st['rate_seconds']} s at concurrency {st['rate_concurrency']}; bulk: "
        f"{st['bulk_seconds']} s per case; idle: {st['idle_count']} tunnels",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- other load on the machine just before the run: "
        f"{env.get('background_busy_pct', float('nan')):.0f}% of one core "
        "(see 'other processes' in the CPU table for during the run)",
        "- ratios are subject median / anchor median (for latency, CPU and memory lower is better)",
        "",
        *_noise_warning(vals),
        "## Subjects",
        "",
        "| subject | protocol | what | status per round |",
        "| --- | --- | --- | --- |",
    ]
    for s in subjects:
        subj = SUBJECTS.get(s)
        lines.append(
            f"| {s} | {subj.proto if subj else '?'} | {subj.about if subj else ''} | "
            f"{', '.join(status[s]) or '—'} |"
        )

    def median(s: str, key: str) -> float | None:
        v = vals.get(s, {}).get(key)
        return statistics.median(v) if v else None

    def cell(s: str, key: str, digits: int) -> str:
        v = median(s, key)
        return "—" if v is None else _fmt(v, digits)

    def ratio(s: str, key: str, spec: str) -> str:
        med, a = median(s, key), median(_anchor(spec, s), key)
        return "—" if s == "direct" or med is None or a is None or a == 0 else f"{med / a:.2f}x"

    def two_tier(s: str) -> bool:
        subj = SUBJECTS.get(s)
        return bool(subj and subj.two_tier)

    # Summary: the headline figures side by side, then the same as ratios per anchor.
    cols = [c for c in _summary_columns(st) if any(c[0] in vals.get(s, {}) for s in subjects)]
    head = "| subject | " + " | ".join(c[1] for c in cols) + " |"
    rule = "| --- |" + " ---: |" * len(cols)
    lines += [
        "",
        "## Summary (medians)",
        "",
        f"Latency: per tunnel of the rate test (connect, handshake, 1-byte echo) at "
        f"concurrency {st['rate_concurrency']}. MB/s: bulk download. "
        f"Memory: {st['idle_count']} idle tunnels, all processes of the subject.",
        "",
        head,
        rule,
    ]
    for s in subjects:
        lines.append(f"| {s} | " + " | ".join(cell(s, k, d) for k, _, d, _ in cols) + " |")
    chart_anchor, bars = chart_bars(results)
    if bars:
        lines += [
            "",
            f"## At a glance: ratios to {chart_anchor}",
            "",
            "![ratio chart](ratios.svg)",
            "",
            "```",
            *text_chart(bars, chart_anchor),
            "```",
        ]
    for spec in anchors:
        if not any(_anchor(spec, s) in subjects for s in subjects):
            continue  # the anchor was not in this run
        label = _anchor_label(spec)
        lines += [
            "",
            f"## Ratios to {label} (subject median / {label} median)",
            "",
            "Higher is better for tunnels/s and MB/s; lower is better for the rest.",
            "",
            head,
            rule,
        ]
        for s in subjects:
            if s == "direct":
                continue
            lines.append(f"| {s} | " + " | ".join(ratio(s, k, spec) for k, *_ in cols) + " |")

    # Per tier: where the memory of a two-tier subject sits.
    tiered = [s for s in subjects if two_tier(s)]
    if tiered:
        tcols = [
            ("idle_sidecar_kib_per_tunnel", "sidecar KiB/idle tunnel", 1),
            ("idle_dmz_kib_per_tunnel", "DMZ KiB/idle tunnel", 1),
            ("idle_kib_per_tunnel", "both KiB/idle tunnel", 1),
            ("rss_start_sidecar_mib", "sidecar RSS at start, MiB", 1),
            ("rss_start_dmz_mib", "DMZ RSS at start, MiB", 1),
            ("idle_rss_sidecar_mib", f"sidecar RSS, {st['idle_count']} idle, MiB", 1),
            ("idle_rss_dmz_mib", f"DMZ RSS, {st['idle_count']} idle, MiB", 1),
        ]
        lines += [
            "",
            "## Two-tier subjects: memory per tier (medians)",
            "",
            "| subject | " + " | ".join(c[1] for c in tcols) + " |",
            "| --- |" + " ---: |" * len(tcols),
        ]
        for s in tiered:
            lines.append(f"| {s} | " + " | ".join(cell(s, k, d) for k, _, d in tcols) + " |")

    # Anchor columns of the per-figure tables: those with their anchor in this run.
    anchors = [a for a in anchors if any(_anchor(a, s) in subjects for s in subjects)]
    labels = [_anchor_label(a) for a in anchors]
    for m in metric_table(st):
        rows = [s for s in subjects if s != "direct" or m.key in vals.get(s, {})]
        if m.two_tier_only:
            rows = [s for s in rows if two_tier(s)]
        if not any(m.key in vals.get(s, {}) for s in rows):
            continue
        better = "higher is better" if m.higher_better else "lower is better"
        lines += [
            "",
            f"## {m.title} ({m.unit}, {better})",
            "",
            "| subject | median | min-max | n | " + " | ".join(f"x {x}" for x in labels) + " |",
            "| --- | ---: | ---: | ---: |" + " ---: |" * len(labels),
        ]
        for s in rows:
            v = vals.get(s, {}).get(m.key)
            if not v:
                why = next((x for x in status[s] if x.startswith("n/a")), "failed (see notes)")
                lines.append(f"| {s} | {why} | | 0 |" + " |" * len(labels))
                continue
            lines.append(
                f"| {s} | {_fmt(statistics.median(v), m.digits)} | {_fmt(min(v), m.digits)}-"
                f"{_fmt(max(v), m.digits)} | {len(v)} | "
                + " | ".join(ratio(s, m.key, a) for a in anchors)
                + " |"
            )

    # Is the load generator the bottleneck?  CPU use during each test, medians.
    tests = ["rate"] + [
        f"bulk_{d}{n}"
        for d in (["down", "up"] if st["upload"] else ["down"])
        for n in st["bulk_tunnels"]
    ]
    multi = any(
        len({k for k in vals.get(s, {}) if k.startswith("rate_proc:")}) > 1 for s in subjects
    )
    lines += [
        "",
        "## CPU use during the tests (medians, % of one core; "
        f"the machine has {env['cpus']} cores = {100 * env['cpus']}%)",
        "",
    ]
    if multi:
        lines += [
            "'proxy' is the sum over the subject's processes; 'by process' splits it (a "
            "single-threaded process near 100% is saturated).",
            "",
        ]
    lines += [
        "| subject | test | loadgen | origin | proxy | other processes | whole machine |"
        + (" proxy by process |" if multi else ""),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" --- |" if multi else ""),
    ]
    for s in subjects:
        for t in tests:
            cells = [
                median(s, f"{t}_{k}_cpu_pct") for k in ("loadgen", "origin", "proxy", "others")
            ]
            busy = median(s, f"{t}_machine_busy_pct")
            if all(c is None for c in cells):
                continue
            row = (
                f"| {s} | {t} | "
                + " | ".join("—" if c is None else f"{c:.0f}%" for c in [*cells, busy])
                + " |"
            )
            if multi:
                prefix = f"{t}_proc:"
                procs = sorted(k for k in vals.get(s, {}) if k.startswith(prefix))
                by = [
                    f"{k[len(prefix) : -len('_cpu_pct')]} {median(s, k) or 0:.0f}%" for k in procs
                ]
                row += f" {', '.join(by) if len(by) > 1 else ''} |"
            lines.append(row)
    if any(notes.values()):
        lines += ["", "## Notes", ""]
        for s in subjects:
            lines += [f"- {s}, {n}" for n in notes[s]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def _version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = r.stdout.strip()
    return text.splitlines()[0] if r.returncode == 0 and text else "?"


def environment() -> JSON:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dpkg = ["dpkg-query", "-W", "-f", "${Version}"]
    return {
        "cpu": cpu,
        "cpus": os.cpu_count() or 1,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "pyegress": _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
            "squid": _version([*dpkg, "squid"]),
            "tinyproxy": _version([*dpkg, "tinyproxy"]),
            "microsocks": _version([*dpkg, "microsocks"]),
            **{
                pkg: _version(
                    _py("-c", f"import importlib.metadata as m; print(m.version({pkg!r}))")
                )
                for pkg in ("pproxy", "uvloop")
            },
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=None, help="rounds; medians over them (default 3)")
    p.add_argument("--quick", action="store_true", help="short smoke run (~1 minute)")
    p.add_argument(
        "--set",
        dest="subject_set",
        choices=sorted(SETS),
        default=None,
        help="a named subject set with its ratio anchors: "
        + "; ".join(f"{k} = {', '.join(v.subjects)}" for k, v in SETS.items())
        + f" (default {DEFAULT_SET})",
    )
    p.add_argument(
        "--subjects",
        default=None,
        help="comma list, in this order, instead of the set's subjects (the set's anchors "
        f"stay); from: {', '.join(SUBJECTS)}",
    )
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--upload", action="store_true", help="also measure bulk upload")
    p.add_argument("--idle-count", type=int, default=None)
    p.add_argument(
        "--socks-domain",
        default=None,
        help="SOCKS5 requests name this domain (e.g. 127.0.0.1) instead of an IPv4",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and proxy logs")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy stacks (raw, collapsed) of every pyegress process per test here; "
        "summarise them with benchmarks/profile_summary.py (PYEGRESS_PROFILE_NATIVE=1 adds "
        "C frames, pausing the process at each sample: shares only, not figures)",
    )
    p.add_argument(
        "--report-only",
        type=Path,
        default=None,
        help="re-render report.md from an existing results.json",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        loaded: JSON = json.loads(args.report_only.read_text())
        (args.report_only.parent / "report.md").write_text(render_report(loaded))
        write_chart(loaded, args.report_only.parent)
        return 0
    chosen = SETS[args.subject_set or DEFAULT_SET]
    names = (
        [n.strip() for n in args.subjects.split(",") if n.strip()]
        if args.subjects
        else chosen.subjects
    )
    unknown = [n for n in names if n not in SUBJECTS]
    if unknown:
        log(f"unknown subjects: {', '.join(unknown)}; known: {', '.join(SUBJECTS)}")
        return 2
    s = Settings()
    if args.quick:
        s = Settings(
            runs=1,
            rate_seconds=1.0,
            bulk_seconds=1.0,
            idle_count=300,
            idle_settle=0.5,
            warmup_seconds=0.3,
        )
    if args.runs is not None:
        s.runs = args.runs
    if args.idle_count is not None:
        s.idle_count = args.idle_count
    s.upload = args.upload
    s.socks_domain = args.socks_domain
    s.profile = args.profile

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * s.idle_count + 256:
        s.idle_count = max(100, (hard - 256) // 2)
        log(f"RLIMIT_NOFILE hard limit {hard}: idle test lowered to {s.idle_count} tunnels")
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    build_loadgen()
    background = background_load()
    log(f"background CPU use before the run: {background:.0f}% of one core")
    subjects = [SUBJECTS[n] for n in names]
    tmp_root = Path(tempfile.mkdtemp(prefix="pyegress-bench-"))
    tmp_root.chmod(0o755)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    records: list[JSON] = []
    origin: Origin | None = None
    namespace = contextlib.ExitStack()
    try:
        if any(subj.netns for subj in subjects):
            name = namespace.enter_context(own_namespace())
            log(f"running in network namespace {name} (subjects behind a REDIRECT)")
        origin = Origin()
        bench = Bench(s, origin)
        for r in range(s.runs):
            order = subjects[r % len(subjects) :] + subjects[: r % len(subjects)]
            for subj in order:
                if not origin.alive():
                    raise RuntimeError("the origin process died")
                log(f"[round {r + 1}/{s.runs}] {subj.name} ...")
                rec = bench.instance(subj, tmp_root / f"r{r}-{subj.name}")
                rec["round"] = r
                records.append(rec)
                summary = ", ".join(
                    f"{k}={v:.1f}"
                    for o in rec["outcomes"]
                    for k, v in o["metrics"].items()
                    if not k.endswith("_pct")
                )
                log(f"    {rec['status']}: {summary}")
                for n in rec["notes"]:
                    log(f"    note: {n}")
    except (KeyboardInterrupt, Interrupted):
        log("interrupted: stopping everything; writing what was measured")
    finally:
        if origin is not None:
            origin.stop()
        namespace.close()
        if not args.keep_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)
        else:
            log(f"configs and logs kept in {tmp_root}")
    results: JSON = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "elapsed_s": time.monotonic() - t0,
        "settings": {
            **s.__dict__,
            "bulk_tunnels": list(s.bulk_tunnels),
            "profile": str(s.profile) if s.profile else None,
        },
        "subjects": names,
        "set": chosen.name if not args.subjects else (args.subject_set or None),
        "anchors": chosen.anchors,
        "env": {**environment(), "background_busy_pct": background},
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "report.md").write_text(render_report(results))
    write_chart(results, args.out)
    log(f"wrote {args.out / 'report.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
