"""``--workers N``: one supervisor and N worker processes that share the listening ports.

The parent binds nothing on the data path. It starts every worker as a fresh
``python -m pyegress`` with its own arguments (so each worker runs its own event loop,
uvloop included; nothing is inherited from a forked loop) and marks it through the
environment:

* ``PYEGRESS_WORKER=i/N``: the worker's number and the count. Its listeners bind with
  SO_REUSEPORT, so the kernel spreads new connections over the workers; its audit records
  and log lines carry ``"worker": i``; it has no ``-metrics`` listener of its own.
* ``PROMETHEUS_MULTIPROC_DIR``: a directory the parent made empty. prometheus-client
  writes each worker's values to files there; the parent's ``-metrics`` serves them
  merged (``metrics.render_merged``).
* ``PYEGRESS_STATUS_FD``: the write end of a pipe to the parent. The worker writes one
  short JSON line whenever its readiness, its policy version or its reload count changes.
  A pipe rather than a file in the metrics directory: the parent learns at once (no
  polling), and a worker that dies leaves no stale state behind.

The parent

* hands its standard output to every worker, which writes its batches of whole lines
  there itself, one ``write`` each; nothing is copied through the parent. Writes to a
  regular file (or ``/dev/null``) do not interleave. Writes to a pipe or a terminal
  may, past PIPE_BUF bytes, so there every writer, the parent's log writer included,
  holds an ``flock`` on one lock file while it writes: lines of different workers never
  interleave, whatever their length. The parent makes the file and unlinks it at once
  (nothing to clean up, nothing a tmp cleaner can take away) and passes its descriptor;
  each process opens its own description of it through ``/proc/self/fd``
  (``PYEGRESS_STDOUT_LOCK`` names that path);
* forwards SIGTERM and SIGINT as SIGTERM (every worker drains; a second signal cuts the
  drain), and SIGHUP (every worker reloads its policy and TLS files on its own, atomically
  for itself). When the workers then report different policy versions (the file changed
  between their reads, or a restarted worker read a newer one) it sends SIGHUP again until
  they agree, so the tier reports one version;
* restarts a worker that exits unexpectedly, after a backoff that doubles while the
  worker keeps dying young (0.5 s up to 30 s), each time logged as ``worker_exited``;
  a worker that fails before its listeners were ever up (a port in use, a bad
  certificate) ends the whole process with its exit status instead;
* answers ``/readyz`` with 200 only while every worker is running and ready;
* exits 0 once every worker has drained (1 when the drain outlived its deadline and
  workers had to be killed, 130 when a second signal cut it).

Workers ask the kernel for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), so they
drain rather than linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric

from pyegress.errors import ConfigError
from pyegress.observe import metrics
from pyegress.observe.audit import never_waits, stream_fd
from pyegress.observe.log import Logger

if TYPE_CHECKING:
    from pyegress.engine import Engine

WORKER_ENV = "PYEGRESS_WORKER"
STATUS_FD_ENV = "PYEGRESS_STATUS_FD"
STDOUT_LOCK_ENV = "PYEGRESS_STDOUT_LOCK"
PARENT_ENV = "PYEGRESS_PARENT"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_SECONDS = 10.0  # a worker that ran this long resets its backoff
KILL_GRACE = 15.0  # beyond the drain deadline before remaining workers are killed
STATUS_POLL = 0.5  # how often a worker re-checks readiness (a sidecar's tier link)
RELOAD_WAIT = 10.0  # how long the parent waits for every worker's reload report


def parse_workers(text: str) -> int:
    """``--workers`` value: a count from 1, or ``auto`` (one per usable core)."""
    if text == "auto":
        return cores()
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"not a number or 'auto': {text!r}") from None
    if not 1 <= count <= 256:
        raise ValueError(f"{count} is not between 1 and 256")
    return count


def cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def worker_identity() -> tuple[int, int] | None:
    """``(index, count)`` when this process is a worker, else ``None``."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, count = value.partition("/")
    return int(index), int(count)


def audit_path(path: str, index: int) -> str:
    """The audit file of worker ``index``: ``{worker}`` in ``path`` is its number."""
    return path.replace("{worker}", str(index))


def check_config(count: int, listen: Sequence[Any], audit_file: str | None) -> None:
    """What cannot run in several workers, refused before any starts."""
    if count <= 1:
        return
    for node in listen:
        if node.kind == "dns":
            raise ConfigError(
                f"-L {node.redacted()}: the DNS listener keeps per-process state (the fake "
                "addresses the redirect listener turns back into names); run it with "
                "--workers 1"
            )
    if audit_file is not None and "{worker}" not in audit_file:
        raise ConfigError(
            "--audit-file with --workers needs {worker} in the path (one file per worker, "
            "e.g. /var/log/pyegress/audit-{worker}.jsonl): a rotated file has one writer"
        )


# -- the worker's side ------------------------------------------------------------------


def worker_prelude() -> None:
    """First thing in a worker: a SIGHUP before the engine handles it is ignored (not
    fatal), and the worker gets SIGTERM (a drain) when its parent dies."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # the parent died before prctl
        raise SystemExit(1)


class StatusReporter:
    """Writes the worker's state to the parent's pipe whenever it changes."""

    def __init__(self, engine: Engine, fd: int) -> None:
        self.engine = engine
        self.fd = fd
        self.reloads = 0
        self._last = b""

    def changed(self, what: str) -> None:
        if what == "reload":
            self.reloads += 1
        self.send()

    def send(self) -> None:
        ready, reason = self.engine.readiness()
        policy = self.engine.policy
        line = json.dumps(
            {
                "pid": os.getpid(),
                "started": self.engine.started,
                "ready": ready,
                "reason": reason,
                "policy_version": policy.version if policy is not None else None,
                "reloads": self.reloads,
            },
            separators=(",", ":"),
        ).encode()
        if line == self._last or self.fd < 0:
            return
        self._last = line
        try:
            os.write(self.fd, line + b"\n")  # a few dozen bytes: one atomic write
        except OSError:  # the parent is gone; PR_SET_PDEATHSIG will stop us
            os.close(self.fd)
            self.fd = -1

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(STATUS_POLL)
            self.send()


async def serve_worker(engine: Engine) -> None:
    """Run ``engine`` as a worker: report to the parent through the status pipe."""
    fd = int(os.environ.get(STATUS_FD_ENV, "-1"))
    reporter = StatusReporter(engine, fd)
    engine.on_change = reporter.changed
    watcher = asyncio.ensure_future(reporter.watch())
    try:
        await engine.run()
    finally:
        watcher.cancel()
        if reporter.fd >= 0:
            os.close(reporter.fd)


# -- the parent's side ------------------------------------------------------------------


def stdout_lock() -> int | None:
    """The descriptor of a new, already unlinked lock file for the workers' shared
    standard output when that is a pipe, a terminal or a socket (see the module text);
    None for a regular file or /dev/null. ``OSError`` when none can be made or locked."""
    fd = stream_fd(sys.stdout)
    if fd < 0 or never_waits(fd):
        return None
    handle, path = tempfile.mkstemp(prefix="pyegress-stdout-", suffix=".lock")
    try:
        os.unlink(path)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this file system can lock
        fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        os.close(handle)
        raise
    return handle


def lock_path(fd: int) -> str:
    """A path that opens a new description of our descriptor ``fd`` (in a worker: of
    the same number, inherited)."""
    return f"/proc/self/fd/{fd}"


@dataclass(eq=False)
class _Worker:
    index: int
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    started_once: bool = False  # its listeners were up at least once
    failures: int = 0  # runs in a row that ended before STABLE_SECONDS
    restart: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0


class Supervisor:
    """Starts, watches, signals and restarts the workers; serves ``-metrics``."""

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        log: Logger,
        *,
        stdout_lock: int | None = None,
        metrics_address: str | None = None,
        drain_timeout: float = 30.0,
    ) -> None:
        self.argv = list(argv)
        self.count = count
        self.log = log
        self.stdout_lock = stdout_lock
        self.metrics_address = metrics_address
        self.drain_timeout = drain_timeout
        self.workers = [_Worker(i) for i in range(count)]
        self.stopping = False
        self.all_started_once = False
        self.restarts = 0
        self.exit_code = 0
        self.metrics_dir = ""
        self._own_dir = False
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._reload_pending: dict[int, int] = {}  # worker -> reloads seen before SIGHUP
        self._reload_timer: asyncio.TimerHandle | None = None
        self._reload_rounds = 0
        self._last_auto_reload = 0.0
        self._reapers: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until every worker has drained after SIGTERM/SIGINT; the exit status."""
        from pyegress.observe.admin import parse_admin_address, start_admin

        loop = self._loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._prepare_metrics_dir()
        admin = None
        try:
            if self.metrics_address is not None:
                host, port = parse_admin_address(self.metrics_address)
                try:
                    admin = await start_admin(
                        host, port, self.readiness, render=self.render_metrics
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen on -metrics {self.metrics_address}: {exc.strerror or exc}"
                    ) from None
                self.log.info("admin_listening", address=self.metrics_address)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, sig)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            self.log.info("workers_starting", workers=self.count, pid=os.getpid())
            for worker in self.workers:
                self._spawn(worker)
            await self._done
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for worker in self.workers:
                if worker.restart is not None:
                    worker.restart.cancel()
            if admin is not None:
                admin.close()
            for thread in self._reapers:
                thread.join(5.0)  # every worker is reaped
            if self._own_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    def _prepare_metrics_dir(self) -> None:
        given = os.environ.get(MULTIPROC_ENV)
        if given:  # the operator's (a tmpfs, say): emptied, kept
            Path(given).mkdir(parents=True, exist_ok=True)
            for old in Path(given).glob("*.db"):
                old.unlink(missing_ok=True)
            self.metrics_dir = given
        else:
            self.metrics_dir = tempfile.mkdtemp(prefix="pyegress-metrics-")
            self._own_dir = True

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        read_end, write_end = os.pipe()
        env = {
            **os.environ,
            WORKER_ENV: f"{worker.index}/{self.count}",
            STATUS_FD_ENV: str(write_end),
            PARENT_ENV: str(os.getpid()),
            MULTIPROC_ENV: self.metrics_dir,
        }
        passed: tuple[int, ...] = (write_end,)
        if self.stdout_lock is not None:
            env[STDOUT_LOCK_ENV] = lock_path(self.stdout_lock)
            passed += (self.stdout_lock,)
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "pyegress", *self.argv],
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=passed,
                # Its own process group: a terminal's Ctrl-C reaches the parent only,
                # which forwards it once (a second signal would cut the drain).
                process_group=0,
            )
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            self.log.error("worker_spawn_failed", worker=worker.index, error=str(exc))
            self._schedule_restart(worker)
            return
        os.close(write_end)
        worker.popen = popen
        worker.started = time.monotonic()
        worker.status = {}
        assert self._loop is not None
        os.set_blocking(read_end, False)
        self._loop.add_reader(read_end, self._status_readable, worker, popen, read_end, [b""])
        reaper = threading.Thread(
            target=self._reap, args=(worker, popen), name=f"pyegress-reaper-{worker.index}"
        )
        reaper.daemon = True
        reaper.start()
        self._reapers = [t for t in self._reapers if t.is_alive()] + [reaper]
        self.log.info("worker_started", worker=worker.index, pid=popen.pid)

    def _reap(self, worker: _Worker, popen: subprocess.Popen[bytes]) -> None:
        """(thread) Wait for the worker to exit; tell the loop."""
        code = popen.wait()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are done
                loop.call_soon_threadsafe(self._exited, worker, popen, code)

    def _status_readable(
        self, worker: _Worker, popen: subprocess.Popen[bytes], fd: int, buffer: list[bytes]
    ) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        assert self._loop is not None
        if not data:
            self._loop.remove_reader(fd)
            os.close(fd)
            return
        buffer[0] += data
        *lines, buffer[0] = buffer[0].split(b"\n")
        for line in lines:
            try:
                status = json.loads(line)
            except ValueError:
                continue
            if worker.popen is popen and isinstance(status, dict):
                self._on_status(worker, status)

    def _on_status(self, worker: _Worker, status: dict[str, Any]) -> None:
        worker.status = status
        if status.get("started"):
            worker.started_once = True
            if not self.all_started_once and all(w.started_once for w in self.workers):
                self.all_started_once = True
                self.log.info(
                    "workers_started",
                    workers=self.count,
                    policy_version=status.get("policy_version"),
                )
        self._check_reload()

    def _exited(self, worker: _Worker, popen: subprocess.Popen[bytes], code: int) -> None:
        if worker.popen is not popen:
            return
        worker.popen = None
        worker.status = {}
        with contextlib.suppress(OSError):
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(popen.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        how = _exit_text(code)
        if self.stopping:
            self.log.info("worker_stopped", worker=worker.index, pid=popen.pid, exit=how)
            if all(w.popen is None for w in self.workers):
                self._finish()
            return
        if not self.all_started_once and not worker.started_once:
            # Failing before its listeners were ever up: a configuration problem (a port
            # in use, a bad certificate; the worker said what on stderr). Restarting
            # would only repeat it.
            self.log.error("worker_failed", worker=worker.index, pid=popen.pid, exit=how)
            self.exit_code = code if code > 0 else 1
            self.stop(None)
            return
        lived = time.monotonic() - worker.started
        worker.failures = worker.failures + 1 if lived < STABLE_SECONDS else 0
        self.restarts += 1
        delay = self._schedule_restart(worker)
        self.log.error(
            "worker_exited",
            worker=worker.index,
            pid=popen.pid,
            exit=how,
            ran_s=round(lived, 3),
            restart_in_s=delay,
        )

    def _schedule_restart(self, worker: _Worker) -> float:
        delay = min(BACKOFF_MAX, BACKOFF_MIN * (1 << min(16, max(0, worker.failures - 1))))
        assert self._loop is not None
        worker.restart = self._loop.call_later(delay, self._spawn, worker)
        return delay

    def _finish(self) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- signals -----------------------------------------------------------------------

    def _signal(self, worker: _Worker, sig: int) -> None:
        popen = worker.popen
        if popen is not None and popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, sig)

    def stop(self, sig: int | None) -> None:
        """SIGTERM/SIGINT: every worker drains; a second signal cuts the drain."""
        if self.stopping:
            if sig is not None:
                self.log.warning("drain_cut", signal=signal.Signals(sig).name)
                self.exit_code = 130
                for worker in self.workers:
                    self._signal(worker, signal.SIGTERM)
            return
        self.stopping = True
        for worker in self.workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
        running = [w for w in self.workers if w.popen is not None]
        self.log.info("draining", workers=len(running), deadline_s=self.drain_timeout)
        for worker in running:
            self._signal(worker, signal.SIGTERM)
        if not running:
            self._finish()
            return
        assert self._loop is not None
        self._kill_timer = self._loop.call_later(
            self.drain_timeout + KILL_GRACE, self._kill_remaining
        )

    def _kill_remaining(self) -> None:
        for worker in self.workers:
            if worker.popen is not None:
                self.log.error("worker_killed", worker=worker.index, pid=worker.pid)
                self.exit_code = self.exit_code or 1
                self._signal(worker, signal.SIGKILL)

    def reload(self) -> None:
        """SIGHUP: every worker reloads; the parent checks they agree on the version."""
        if self.stopping:
            return
        self._reload_rounds = 0
        self._send_reload("signal")

    def _send_reload(self, why: str) -> None:
        self._reload_rounds += 1
        # Only workers that are up: one still starting reads the file anyway.
        self._reload_pending = {
            w.index: int(w.status.get("reloads", 0))
            for w in self.workers
            if w.status.get("started")
        }
        self.log.info("reloading", workers=len(self._reload_pending), cause=why)
        for worker in self.workers:
            if worker.index in self._reload_pending:
                self._signal(worker, signal.SIGHUP)
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        assert self._loop is not None
        self._reload_timer = self._loop.call_later(RELOAD_WAIT, self._reload_overdue)
        self._check_reload()

    def _reload_overdue(self) -> None:
        self._reload_timer = None
        if self._reload_pending:
            late = sorted(self._reload_pending)
            self.log.warning("reload_overdue", workers=late)
            self._reload_pending = {}
            self._check_reload()

    def _check_reload(self) -> None:
        """Once every signalled worker reported its reload (or went away), compare the
        versions; differing ones get another SIGHUP. Also run when a worker becomes
        ready: a restarted worker may have read a newer file than the others."""
        if self.stopping:
            return
        for index, before in list(self._reload_pending.items()):
            worker = self.workers[index]
            if worker.popen is None or int(worker.status.get("reloads", 0)) > before:
                del self._reload_pending[index]
        if self._reload_pending:
            return
        if self._reload_timer is not None:
            self._reload_timer.cancel()
            self._reload_timer = None
        serving = [w for w in self.workers if w.status.get("started")]
        versions = sorted({str(w.status.get("policy_version")) for w in serving})
        if len(versions) <= 1:
            if self._reload_rounds:
                self.log.info(
                    "workers_reloaded",
                    workers=len(serving),
                    policy_version=serving[0].status.get("policy_version") if serving else None,
                )
                self._reload_rounds = 0
            return
        now = time.monotonic()
        if self._reload_rounds >= 5 or now - self._last_auto_reload < 1.0:
            if self._reload_timer is None:  # look again shortly
                assert self._loop is not None
                self._reload_timer = self._loop.call_later(1.0, self._retry_versions)
            return
        self._last_auto_reload = now
        self.log.warning("policy_versions_differ", versions=versions)
        self._send_reload("versions_differ")

    def _retry_versions(self) -> None:
        self._reload_timer = None
        self._reload_rounds = min(self._reload_rounds, 4)
        self._check_reload()

    # -- what the admin listener asks --------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining"
        for worker in self.workers:
            if worker.popen is None:
                return False, f"worker {worker.index} is not running"
            if not worker.status.get("ready"):
                reason = worker.status.get("reason") or "starting"
                return False, f"worker {worker.index}: {reason}"
        return True, "ready"

    def render_metrics(self) -> tuple[bytes, str]:
        return metrics.render_merged(self.metrics_dir, self._own_families)

    def _own_families(self) -> list[Metric]:
        return metrics.supervisor_families(
            self.count,
            sum(w.popen is not None for w in self.workers),
            sum(bool(w.status.get("ready")) for w in self.workers),
            self.restarts,
        )


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal {-code}"
    return f"status {code}"


def supervise(
    argv: Sequence[str],
    count: int,
    log: Logger,
    *,
    stdout_lock: int | None,
    metrics_address: str | None,
    drain_timeout: float,
) -> int:
    """Run the supervisor on its own (plain asyncio) loop; the exit status."""
    supervisor = Supervisor(
        argv,
        count,
        log,
        stdout_lock=stdout_lock,
        metrics_address=metrics_address,
        drain_timeout=drain_timeout,
    )
    return asyncio.run(supervisor.run())
