"""Real processes the tests run: pyegress itself, squid, danted, microsocks.

Each is started on free loopback ports with a config in a temporary directory and
stopped by its PID when the test ends.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]


class Process:
    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(ROOT),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class Pyegress(Process):
    """``python -m pyegress`` with the given arguments."""

    def __init__(self, args: Sequence[str], workdir: Path, loop: str = "uvloop") -> None:
        self.ports: list[int] = []  # the free ports the test fixture chose for it
        env = dict(os.environ)
        env["PYEGRESS_LOOP"] = loop
        env["PYTHONUNBUFFERED"] = "1"
        super().__init__(
            [sys.executable, "-m", "pyegress", *args],
            workdir / f"pyegress-{time.monotonic_ns()}.log",
            env,
        )

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """JSON lines of the output; ``tunnel_closed`` asks for audit ``close`` records,
        each with a flat view added (see :func:`flat_close`)."""
        if event == "tunnel_closed":
            event = "close"
        out = []
        for line in self.output().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if event is None or record.get("event") == event:
                if record.get("event") == "close" and "schema" in record:
                    record = flat_close(record)
                out.append(record)
        return out

    def matching(
        self,
        count: int = 1,
        timeout: float = 10.0,
        event: str = "tunnel_closed",
        /,
        **match: object,
    ) -> list[dict[str, Any]]:
        """Wait for ``count`` records of ``event`` whose fields equal ``match``; fail with
        the log's tail when they do not come."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records(event) if all(r.get(k) == v for k, v in match.items())]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} {event} records matching {match}, got {len(found)}:\n"
                    + self.output()[-4000:]
                )
            time.sleep(0.02)

    def record(self, timeout: float = 10.0, /, **match: object) -> dict[str, Any]:
        """The first close record whose fields equal ``match`` (waiting for it)."""
        return self.matching(1, timeout, **match)[0]

    def wait_records(self, event: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.records(event)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def flat_close(record: dict[str, Any]) -> dict[str, Any]:
    """An audit ``close`` record (docs/audit.md) with the flat keys tests match on added:
    ``reason``, ``status``, ``error``, ``target``, ``bytes_up``/``bytes_down``, ``client``
    (addr:port), ``identity``, ``user``, ``decision`` stays the nested object."""
    out = dict(record)
    result = record.get("result") or {}
    requested = record.get("requested") or {}
    client = record.get("client") or {}
    counts = record.get("bytes") or {}
    out["reason"] = result.get("close_reason")
    if result.get("client_reply") is not None:
        out["status"] = result["client_reply"]
    if result.get("error") is not None:
        out["error"] = result["error"]
    host = requested.get("host")
    if host:
        shown = f"[{host}]" if ":" in host else host
        out["target"] = f"{shown}:{requested.get('port')}"
    else:
        out["target"] = ""
    out["bytes_up"] = counts.get("from_client", 0)
    out["bytes_down"] = counts.get("to_client", 0)
    addr = client.get("addr")
    out["client"] = (f"[{addr}]" if ":" in addr else addr) + f":{client['port']}" if addr else ""
    for key in ("identity", "user"):
        if client.get(key) is not None:
            out[key] = client[key]
    decision = record.get("decision") or {}
    if decision.get("policy_version") is not None:
        out["policy_version"] = decision["policy_version"]
    return out


def have(program: str) -> bool:
    return shutil.which(program) is not None or Path(program).exists()


def _chmod_for(path: Path, user: str) -> None:
    """Let a daemon that drops privileges write into our temp dir."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    if os.geteuid() == 0:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def start_squid(workdir: Path) -> tuple[Process, int]:
    port = free_port()
    d = workdir / f"squid-{port}"
    d.mkdir()
    _chmod_for(d, "proxy")
    conf = d / "squid.conf"
    conf.write_text(
        f"""
http_port 127.0.0.1:{port}
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log none
cache deny all
cache_mem 8 MB
coredump_dir {d}
acl localnet src 127.0.0.0/8
acl SSL_ports port 1-65535
acl Safe_ports port 1-65535
http_access deny !localnet
http_access allow all
shutdown_lifetime 1 seconds
dns_v4_first on
"""
    )
    proc = Process(["squid", "-N", "-f", str(conf)], d / "stdout.log")
    wait_port("127.0.0.1", port, 30)
    return proc, port


def start_microsocks(
    workdir: Path, user: str | None = None, password: str | None = None
) -> tuple[Process, int]:
    port = free_port()
    argv = ["microsocks", "-i", "127.0.0.1", "-p", str(port)]
    if user is not None:
        argv += ["-u", user, "-P", password or ""]
    proc = Process(argv, workdir / f"microsocks-{port}.log")
    wait_port("127.0.0.1", port)
    return proc, port


def start_danted(workdir: Path) -> tuple[Process, int]:
    port = free_port()
    d = workdir / f"danted-{port}"
    d.mkdir()
    conf = d / "danted.conf"
    conf.write_text(
        f"""
logoutput: {d}/danted.log
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}
"""
    )
    proc = Process(
        ["danted", "-f", str(conf), "-p", str(d / "danted.pid"), "-N", "1"], d / "stdout.log"
    )
    wait_port("127.0.0.1", port, 20)
    return proc, port


def stop_all(procs: Iterator[Process] | Sequence[Process]) -> None:
    for p in procs:
        p.stop()
