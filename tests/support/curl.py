"""Run the real curl: one invocation, any number of URLs, each transfer's outcome.

Every transfer writes its body to its own file and its ``%{json}`` write-out line, so a
test sees the status code, the CONNECT status and the connection count of each URL of a
keep-alive run. Proxy variables of the environment are dropped and ``~/.curlrc`` is
ignored (``-q``): only the command line decides where curl connects.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CURL = shutil.which("curl") or "/usr/bin/curl"

_PROXY_ENV = {
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "ftp_proxy",
    "socks_proxy",
}


@dataclass
class Transfer:
    info: dict[str, Any]
    body: bytes

    @property
    def http_code(self) -> int:
        return int(self.info.get("http_code") or 0)

    @property
    def http_connect(self) -> int:
        return int(self.info.get("http_connect") or 0)

    @property
    def num_connects(self) -> int:
        return int(self.info.get("num_connects") or 0)

    @property
    def exitcode(self) -> int:
        return int(self.info.get("exitcode") or 0)


@dataclass
class CurlRun:
    argv: list[str]
    returncode: int
    transfers: list[Transfer]
    headers: str
    stderr: str

    @property
    def only(self) -> Transfer:
        assert len(self.transfers) == 1, self
        return self.transfers[0]

    @property
    def body(self) -> bytes:
        return self.only.body

    def describe(self) -> str:
        codes = [(t.http_code, t.http_connect, t.exitcode) for t in self.transfers]
        return (
            f"curl {' '.join(self.argv[1:])}\nrc={self.returncode} "
            f"(http_code, http_connect, exitcode)={codes}\nstderr: {self.stderr.strip()}"
            f"\nheaders:\n{self.headers}"
        )


def available() -> bool:
    return Path(CURL).exists()


def curl(
    workdir: Path,
    urls: Sequence[str],
    *options: str,
    timeout: float = 30.0,
) -> CurlRun:
    """``curl -q -sS <options> -o body1 URL1 -o body2 URL2 ...`` with a JSON write-out.

    Every URL gets its own body file; ``options`` apply to all of them. The process is
    bounded by ``--max-time`` and by ``timeout`` on the subprocess.
    """
    return curl_steps(workdir, [(list(urls), list(options))], timeout=timeout)


def curl_steps(
    workdir: Path,
    steps: Sequence[tuple[Sequence[str], Sequence[str]]],
    timeout: float = 30.0,
) -> CurlRun:
    """One curl process running ``steps`` (URLs, options) separated by ``--next``.

    The steps share curl's connection cache, so a later step may reuse the connection
    of an earlier one (``num_connects`` 0) though its options differ (``-I`` then GET).
    """
    stamp = time.monotonic_ns()
    argv = [CURL, "-q"]
    head_files: list[Path] = []
    bodies: list[Path] = []
    for index, (urls, options) in enumerate(steps):
        if index:
            argv.append("--next")
        head_file = workdir / f"curl-{stamp}-{index}.headers"
        head_files.append(head_file)
        argv += ["-sS", "--max-time", str(int(timeout)), "-D", str(head_file)]
        argv += ["-w", "%{json}\\n", *options]
        for url in urls:
            body = workdir / f"curl-{stamp}-{len(bodies)}.body"
            bodies.append(body)
            argv += ["-o", str(body), url]
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}
    proc = subprocess.run(argv, capture_output=True, timeout=timeout + 10, env=env)
    infos = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
    transfers = []
    for info, body in zip(infos, bodies, strict=False):
        transfers.append(Transfer(info, body.read_bytes() if body.exists() else b""))
    headers = "".join(f.read_text(errors="replace") for f in head_files if f.exists())
    return CurlRun(argv, proc.returncode, transfers, headers, proc.stderr.decode(errors="replace"))
