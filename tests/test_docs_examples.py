"""Every command the documentation shows is run here, on loopback, with real processes.

Convention (docs/README-style markdown under ``README.md`` and ``docs/``):

* a fenced block whose info string is exactly ``sh`` is a runnable command block;
  ```` ```text ```` or ```` ```console ```` mark illustrative output and the few commands
  that need a cluster, root or the internet;
* the blocks of one file run in order, each in ``bash -e -o pipefail``, in one fresh
  working directory per file, with this virtual environment's ``bin`` first on ``PATH``
  (so ``pyegress`` and ``python`` are the project's);
* a block exits 0, unless its first line is a comment ``# exit status N``;
* port numbers 18000-19999 are placeholders: each distinct number is mapped to a free
  port, the same one in every block of the file (``18080`` stays ``18080``'s stand-in
  everywhere); nothing else is substituted;
* processes a block starts in the background are ended (by process group) when the
  file's blocks are done.

A block that names ``curl``, ``openssl`` or ``jq`` is skipped (with the rest of its
file) when that program is missing.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
PORT = re.compile(r"\b1[89]\d{3}\b")
EXIT = re.compile(r"\A# exit status (\d+)\b")
TOOLS = ("curl", "openssl", "jq")
BLOCK_TIMEOUT = 45.0
PORT_SPAN = 12  # ports reserved after each mapped port (the demo uses base+0..base+11)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    code: str

    @property
    def expected_exit(self) -> int:
        match = EXIT.match(self.code)
        return int(match.group(1)) if match else 0

    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The ``sh`` fenced blocks of a markdown file, in order."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        fence, info, start = match.group("fence"), match.group("info").strip(), index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        index += 1
        if info == "sh":
            out.append(Block(path, start + 1, "\n".join(body) + "\n"))
    return out


def _port_block_free(base: int) -> bool:
    for port in range(base, base + PORT_SPAN):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


class PortMap:
    """Doc port number -> a free loopback port, below the ephemeral range so a client
    socket cannot take it between the check and the listener's bind."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self._used: set[int] = set()

    def _allocate(self) -> int:
        rng = random.Random()
        for _ in range(500):
            base = rng.randrange(20000, 32000 - PORT_SPAN, PORT_SPAN)
            if base not in self._used and _port_block_free(base):
                self._used.add(base)
                return base
        raise RuntimeError("no free loopback port block")

    def __call__(self, code: str) -> str:
        def replace(match: re.Match[str]) -> str:
            number = match.group(0)
            if number not in self.ports:
                self.ports[number] = self._allocate()
            return str(self.ports[number])

        return PORT.sub(replace, code)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYEGRESS_HEALTHCHECK_URL", None)
    env.pop("HTTP_PROXY", None)
    env.pop("http_proxy", None)
    env.pop("HTTPS_PROXY", None)
    env.pop("https_proxy", None)
    env.pop("ALL_PROXY", None)
    env.pop("all_proxy", None)
    return env


def _stop_groups(groups: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
                alive.append(pgid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and alive:
            time.sleep(0.05)
            still = []
            for pgid in alive:
                try:
                    os.killpg(pgid, 0)
                    still.append(pgid)
                except ProcessLookupError:
                    pass
            alive = still


def run_file(path: Path, workdir: Path) -> None:
    found = blocks(path)
    needed = {tool for block in found for tool in TOOLS if re.search(rf"\b{tool}\b", block.code)}
    missing = sorted(tool for tool in needed if shutil.which(tool) is None)
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    ports = PortMap()
    env = _environment()
    groups: list[int] = []
    try:
        for number, block in enumerate(found):
            code = ports(block.code)
            log = workdir / f".block-{number}.out"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    ["bash", "-e", "-o", "pipefail", "-c", code],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                groups.append(proc.pid)
                try:
                    status = proc.wait(BLOCK_TIMEOUT)
                except subprocess.TimeoutExpired:
                    status = -1
            if status != block.expected_exit:
                output = log.read_text(errors="replace")[-4000:]
                logs = _tails(workdir)
                raise AssertionError(
                    f"{block.where()}: exit status {status}, expected {block.expected_exit}"
                    f" (ports {ports.ports})\n--- block ---\n{code}--- output ---\n{output}"
                    f"{logs}"
                )
    finally:
        _stop_groups(groups)


def _tails(workdir: Path) -> str:
    parts = []
    for log in sorted(workdir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-8:]
        parts.append(f"\n--- {log.name} (tail) ---\n" + "\n".join(text))
    return "".join(parts)


WITH_BLOCKS = [path for path in DOCS if blocks(path)]


@pytest.mark.parametrize("path", WITH_BLOCKS, ids=[p.name for p in WITH_BLOCKS])
def test_doc_commands(path: Path, tmp_path: Path) -> None:
    run_file(path, tmp_path)


def test_operator_docs_have_runnable_examples() -> None:
    """The walk-throughs keep at least one runnable block each (a block turned into
    ```text by mistake would silently stop being tested)."""
    for name in ("quickstart.md", "metrics.md", "tls.md", "troubleshooting.md", "ha.md"):
        assert blocks(ROOT / "docs" / name), f"docs/{name} has no ```sh block"


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def test_metrics_doc_lists_every_metric() -> None:
    """docs/metrics.md names exactly the pyegress_* families the code exports."""
    from pyegress.observe import metrics

    body, _ = metrics.render()
    # With --workers the supervisor adds its own families to the merged workers' ones.
    registry = CollectorRegistry()
    registry.register(_Families(metrics.supervisor_families(2, 2, 2, 0)))
    body += generate_latest(registry)
    exported = set(re.findall(r"^# TYPE (pyegress_\w+) ", body.decode(), flags=re.M))
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(pyegress_\w+)` \|", text, flags=re.M))
    assert documented == exported


def test_fence_parser(tmp_path: Path) -> None:
    text = "a\n```sh\necho 1\n```\n```text\nnot run\n```\n````sh\n```\ninner\n````\n"
    sample = tmp_path / "sample.md"
    sample.write_text(text, encoding="utf-8")
    found = blocks(sample)
    assert [b.code for b in found] == ["echo 1\n", "```\ninner\n"]
    assert [b.line for b in found] == [2, 8]
    assert Block(sample, 1, "# exit status 3: refused\nfalse\n").expected_exit == 3


def test_port_map_is_consistent() -> None:
    ports = PortMap()
    first = ports("a 18080 b 18081 c 18080")
    again = ports("x 18081")
    a, b, c = first.split()[1::2]
    assert a == c
    assert a != b
    assert again == f"x {b}"
    assert ports("port 1808 and 180800 stay") == "port 1808 and 180800 stay"
