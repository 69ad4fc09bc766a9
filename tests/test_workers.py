"""``--workers N``: a supervisor and worker processes sharing the listening ports.

Real processes throughout: a judging proxy (``-L http:// -C policy``, tier ``dmz``) and
the two-tier chain, each with ``--workers 2`` and the supervisor's ``-metrics``. What is
checked: both workers take connections (the ``worker`` field of the records), the
supervisor's ``/metrics`` adds up every worker's counters, SIGHUP brings every worker to
the same policy version (one ``pyegress_policy_info`` series), SIGTERM drains every
worker with every close record written and exit status 0, a killed worker is restarted,
and configurations several workers cannot run are refused before anything starts.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyegress.cli import main
from tests.conftest import PyegressFactory, TierCerts
from tests.support.clients import recv_exact
from tests.support.ops import http_get, read_until_closed, scrape, series, value, wait_for
from tests.support.origins import TcpOrigin
from tests.support.ports import free_port
from tests.support.procs import Pyegress
from tests.test_scenarios_ops import (
    assert_contract,
    echo_tunnel,
    finish,
    log_events,
    policy_text,
    refused,
    version_of,
    write_policy,
)


@pytest.fixture
def origin() -> Iterator[TcpOrigin]:
    o = TcpOrigin().start()
    yield o
    o.stop()


def wait_ready(admin: int, *procs: Pyegress, timeout: float = 20.0) -> None:
    def ready() -> bool:
        try:
            return http_get(admin, "/readyz")[0] == 200
        except OSError:
            return False

    try:
        wait_for(ready, timeout, "/readyz 200 from the supervisor")
    except AssertionError:
        raise AssertionError("".join(p.output()[-3000:] for p in procs)) from None


def start_judge(pyegress: PyegressFactory, policy: Path, *extra: str) -> Pyegress:
    """A judging proxy with two workers: ``-L http:// -C policy -metrics``."""
    proc = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-C",
            str(policy),
            "-metrics",
            "127.0.0.1:{1}",
            "--workers",
            "2",
            *extra,
        ],
        nports=2,
    )
    wait_ready(proc.ports[1], proc)
    return proc


def tunnels(port: int, target: str, count: int, *procs: Pyegress) -> None:
    """``count`` echo tunnels one after another, each finished with ``eof``."""
    for _ in range(count):
        finish(echo_tunnel(port, target, *procs))


def workers_of(records: list[dict[str, Any]]) -> set[Any]:
    return {r.get("worker") for r in records}


def pids(proc: Pyegress) -> dict[int, int]:
    """Worker number -> PID of its latest start."""
    return {int(r["worker"]): int(r["pid"]) for r in log_events(proc, "worker_started")}


@pytest.fixture
def judge(pyegress: PyegressFactory, origin: TcpOrigin, tmp_path: Path) -> tuple[Pyegress, Path]:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    return start_judge(pyegress, policy), policy


def test_every_worker_accepts_and_the_metrics_add_up(
    judge: tuple[Pyegress, Path], origin: TcpOrigin
) -> None:
    proc, policy = judge
    port, admin = proc.ports
    tunnels(port, f"127.0.0.1:{origin.port}", 40, proc)

    closes = proc.matching(40, 10.0, "tunnel_closed", reason="eof")
    assert workers_of(closes) == {0, 1}  # 40 connections never all hash to one worker
    decisions = proc.records("decision")
    assert len(decisions) == 40
    assert workers_of(decisions) == {0, 1}
    assert {c["policy_version"] for c in closes} == {version_of(policy)}
    # Log lines name their worker; the supervisor's own do not.
    listening = log_events(proc, "listening")
    assert sorted(r["worker"] for r in listening) == [0, 1]
    assert all("worker" not in r for r in log_events(proc, "workers_starting"))

    def counted() -> bool:  # a worker publishes its counts every PUBLISH_PERIOD
        metrics = scrape(admin)
        return (
            value(metrics, "pyegress_decisions_total", decision="allow") == 40
            and value(metrics, "pyegress_connection_duration_seconds_count", tier="dmz") == 40
        )

    wait_for(counted, 5.0, "decisions and closed connections == 40 in the merged /metrics")
    metrics = scrape(admin)
    assert value(metrics, "pyegress_connections_accepted_total", tier="dmz") == 40
    assert value(metrics, "pyegress_connections_active", tier="dmz") == 0
    assert value(metrics, "pyegress_connection_duration_seconds_count", tier="dmz") == 40
    assert value(metrics, "pyegress_audit_events_total", event="close") == 40
    assert value(metrics, "pyegress_ready", tier="dmz") == 1
    assert value(metrics, "pyegress_workers", state="ready") == 2
    assert value(metrics, "pyegress_worker_restarts_total") == 0
    assert series(metrics, "pyegress_policy_info") == [
        {"tier": "dmz", "policy_version": version_of(policy)}
    ]
    assert_contract(proc)  # every line whole: workers' lines never interleave


def test_sighup_reloads_every_worker_to_one_version(
    judge: tuple[Pyegress, Path], origin: TcpOrigin
) -> None:
    proc, policy = judge
    port, admin = proc.ports
    old = version_of(policy)
    write_policy(policy, policy_text([origin.port], hosts=("127.0.0.1", "localhost")))
    new = version_of(policy)
    assert new != old

    proc.signal(signal.SIGHUP)
    reloads = proc.matching(2, 10.0, "config_reload", result="success")
    assert sorted(r["worker"] for r in reloads) == [0, 1]
    assert {(r["policy_version"], r["previous_version"]) for r in reloads} == {(new, old)}
    done = proc.matching(1, 10.0, "workers_reloaded")[0]
    assert done["policy_version"] == new

    metrics = scrape(admin)
    assert series(metrics, "pyegress_policy_info") == [{"tier": "dmz", "policy_version": new}]
    assert value(metrics, "pyegress_config_reloads_total", result="success") == 2
    tunnels(port, f"localhost:{origin.port}", 20, proc)  # denied by the old policy
    closes = proc.matching(20, 10.0, "tunnel_closed", reason="eof")
    assert workers_of(closes) == {0, 1}
    assert {c["policy_version"] for c in closes} == {new}
    assert_contract(proc)


def test_a_killed_worker_is_restarted(judge: tuple[Pyegress, Path], origin: TcpOrigin) -> None:
    proc, _ = judge
    port, admin = proc.ports
    target = f"127.0.0.1:{origin.port}"
    tunnels(port, target, 10, proc)
    wait_for(lambda: value(scrape(admin), "pyegress_decisions_total") == 10, 5.0, "10 decisions")
    before = pids(proc)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    exited = proc.matching(1, 10.0, "worker_exited")[0]
    assert (exited["worker"], exited["pid"], exited["exit"]) == (0, victim, "SIGKILL")

    def restarted() -> bool:
        now = pids(proc)
        return now.get(0, victim) != victim

    wait_for(restarted, 10.0, "worker 0 to be started again")
    assert pids(proc)[1] == before[1]
    wait_ready(admin, proc)
    tunnels(port, target, 30, proc)
    closes = proc.matching(40, 10.0, "tunnel_closed", reason="eof")
    assert workers_of(closes[10:]) == {0, 1}
    wait_for(lambda: value(scrape(admin), "pyegress_decisions_total") == 40, 5.0, "40 decisions")
    metrics = scrape(admin)
    # The dead worker's counts stay in the sums; its live gauges are gone.
    assert value(metrics, "pyegress_decisions_total") == 40
    assert value(metrics, "pyegress_worker_restarts_total") == 1
    assert value(metrics, "pyegress_workers", state="running") == 2
    assert value(metrics, "pyegress_connections_active") == 0


def test_sigterm_drains_every_worker_then_exits_0(
    pyegress: PyegressFactory, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    proc = start_judge(pyegress, policy, "--drain-timeout", "2")
    port, admin = proc.ports
    target = f"127.0.0.1:{origin.port}"
    # Enough open tunnels that both workers hold some.
    held = [echo_tunnel(port, target, proc) for _ in range(16)]
    assert workers_of(proc.matching(16, 10.0, "decision")) == {0, 1}

    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    wait_for(lambda: http_get(admin, "/readyz") == (503, b"draining\n"), 2.0, "/readyz 503")
    wait_for(lambda: refused(port), 2.0, "every worker's listener to close")
    finishing = held.pop()
    finishing.sendall(b"during drain")
    assert recv_exact(finishing, 12) == b"during drain"
    finish(finishing)
    for sock in held:  # cut at the drain deadline
        state, _ = read_until_closed(sock, 10)
        sock.close()
        assert state in ("eof", "reset")
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 10

    closes = proc.records("tunnel_closed")
    assert sorted(c["reason"] for c in closes) == ["drain"] * 15 + ["eof"]
    assert workers_of(closes) == {0, 1}
    stopped = log_events(proc, "worker_stopped")
    assert sorted((r["worker"], r["exit"]) for r in stopped) == [(0, "status 0"), (1, "status 0")]
    assert_contract(proc)


def test_two_tiers_with_two_workers_each(
    pyegress: PyegressFactory, tier_certs: TierCerts, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    dmz = pyegress(
        [
            "-L",
            "h2://127.0.0.1:{0}?" + tier_certs.dmz_params(),
            "-C",
            str(policy),
            "-metrics",
            "127.0.0.1:{1}",
            "--workers",
            "2",
        ]
    )
    wait_ready(dmz.ports[1], dmz)
    sidecar = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}",
            "-F",
            f"h2://127.0.0.1:{dmz.ports[0]}?{tier_certs.sidecar_params()}",
            "-metrics",
            "127.0.0.1:{1}",
            "--workers",
            "2",
        ]
    )
    wait_ready(sidecar.ports[1], sidecar, dmz)  # both sidecar workers have a tier link
    tunnels(sidecar.ports[0], f"localhost:{origin.port}", 30, sidecar, dmz)

    assert workers_of(sidecar.matching(30, 10.0, "tunnel_closed", reason="eof")) == {0, 1}
    dmz_closes = dmz.matching(30, 10.0, "tunnel_closed", reason="eof")
    assert {c["identity"] for c in dmz_closes} == {TierCerts.IDENTITY}
    wait_for(
        lambda: value(scrape(dmz.ports[1]), "pyegress_decisions_total", decision="allow") == 30,
        5.0,
        "30 decisions at the DMZ",
    )
    wait_for(
        lambda: (
            value(scrape(sidecar.ports[1]), "pyegress_connections_accepted_total", tier="sidecar")
            == 30
        ),
        5.0,
        "30 accepted at the sidecar",
    )
    metrics = scrape(sidecar.ports[1])
    assert value(metrics, "pyegress_tier_links", state="up") >= 2  # one per worker at least
    assert value(metrics, "pyegress_connections_accepted_total", tier="sidecar") == 30
    assert_contract(sidecar, dmz)


def test_audit_files_are_per_worker(
    pyegress: PyegressFactory, origin: TcpOrigin, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", policy_text([origin.port]))
    pattern = str(tmp_path / "audit-{{worker}}.jsonl")  # the fixture formats arguments
    proc = start_judge(pyegress, policy, "--audit-file", pattern)
    tunnels(proc.ports[0], f"127.0.0.1:{origin.port}", 30, proc)
    files = [tmp_path / f"audit-{i}.jsonl" for i in (0, 1)]

    def written() -> bool:
        return sum(f.read_text().count('"event":"close"') for f in files if f.exists()) == 30

    wait_for(written, 10.0, "30 close records in the two audit files")
    for index, path in enumerate(files):
        lines = path.read_text().splitlines()
        assert lines
        assert all(f'"worker":{index}' in line for line in lines)
    assert proc.records("close") == []  # stdout carries no audit records


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--audit-file", "/tmp/audit.jsonl"], "{worker}"),
        (["-L", "dns://127.0.0.1:15053"], "DNS listener"),
    ],
)
def test_what_several_workers_cannot_run_is_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["-L", "http://127.0.0.1:18080"] if "-L" not in args else []
    assert main([*base, *args, "--workers", "2"]) == 2
    assert message in capsys.readouterr().err


def test_workers_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["-L", "http://:18080", "--workers", "0"])
    assert "--workers" in capsys.readouterr().err
    from pyegress.workers import cores, parse_workers

    assert parse_workers("auto") == cores() >= 1
    assert parse_workers("3") == 3


def test_a_worker_that_cannot_start_ends_the_supervisor(
    pyegress: PyegressFactory, tmp_path: Path
) -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = pyegress(
            ["-L", f"http://127.0.0.1:{port}", "--workers", "2", "-metrics", "127.0.0.1:{0}"],
            wait=False,
            nports=1,
        )
        assert proc.wait(20) == 2
    out = proc.output()
    assert "cannot listen on" in out
    assert log_events(proc, "worker_failed")
    assert free_port()  # nothing left bound


def test_workers_write_a_piped_stdout_themselves_under_one_lock(
    origin: TcpOrigin, tmp_path: Path
) -> None:
    """Standard output a pipe (as under a container runtime): every worker writes to the
    same pipe itself, nothing is copied through the supervisor, and batches far over
    PIPE_BUF from both workers at once still arrive as whole lines."""
    import json
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyegress", "-L", f"http://127.0.0.1:{port}", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(_started_pids(lines)) == 2, 20.0, "two workers started")
        wait_for(lambda: _listening(port), 20.0, "the listener")
        time.sleep(0.5)  # both workers listening
        worker_pids = _started_pids(lines)
        pipe = os.readlink(f"/proc/{proc.pid}/fd/1")
        assert pipe.startswith("pipe:")
        for pid in worker_pids:
            assert os.readlink(f"/proc/{pid}/fd/1") == pipe  # the same pipe, not a copy
        lock = _environ(worker_pids[0])["PYEGRESS_STDOUT_LOCK"]  # /proc/self/fd/N
        assert lock.startswith("/proc/self/fd/")
        for pid in (proc.pid, *worker_pids):  # one unlinked file: nothing to clean up
            held = os.readlink(f"/proc/{pid}/fd/{lock.rsplit('/', 1)[1]}")
            assert held.endswith(" (deleted)")
            assert "pyegress-stdout-" in held
        target = f"127.0.0.1:{origin.port}"
        with ThreadPoolExecutor(16) as pool:  # many records per 5 ms batch, both workers
            list(pool.map(lambda _: finish(echo_tunnel(port, target)), range(400)))
        time.sleep(0.5)  # the last batches written
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.join(10)
        proc.stdout.close()
    records = [json.loads(line) for line in lines]  # every line whole
    closes = [r for r in records if r.get("event") == "close" and "schema" in r]
    assert len(closes) == 400
    assert workers_of(closes) == {0, 1}
    assert {r.get("event") for r in records} >= {"workers_starting", "listening", "stopped"}
    assert proc.returncode == 0


def _started_pids(lines: list[bytes]) -> list[int]:
    import json

    return [
        int(r["pid"])
        for r in (json.loads(x) for x in list(lines) if x.startswith(b"{"))
        if r.get("event") == "worker_started"
    ]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


def test_workers_write_a_file_stdout_themselves(
    judge: tuple[Pyegress, Path], origin: TcpOrigin
) -> None:
    """Standard output a regular file: each worker holds it (no copy through the
    supervisor) and its lines land whole."""
    proc, _ = judge
    log_file = os.path.realpath(proc.log_path)
    for pid in pids(proc).values():
        assert os.readlink(f"/proc/{pid}/fd/1") == log_file
    tunnels(proc.ports[0], f"127.0.0.1:{origin.port}", 20, proc)
    assert workers_of(proc.matching(20, 10.0, "tunnel_closed")) == {0, 1}
    assert_contract(proc)


def test_a_worker_whose_stdout_lock_is_gone_says_so_in_one_line() -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYEGRESS_WORKER": "0/2", "PYEGRESS_STDOUT_LOCK": "/nonexistent/x.lock"}
    run = subprocess.run(
        [sys.executable, "-m", "pyegress", "-L", f"http://127.0.0.1:{free_port()}"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.decode().strip().splitlines() == [
        "pyegress: error: cannot open the stdout lock file /nonexistent/x.lock: "
        "No such file or directory"
    ]
