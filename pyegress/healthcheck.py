"""``pyegress healthcheck``: probe the admin listener for container HEALTHCHECKs.

Images without curl or wget can run ``pyegress healthcheck`` (Docker ``HEALTHCHECK``,
a Kubernetes ``exec`` probe). It GETs the readiness URL and exits 0 on HTTP 200 and 1
on anything else, printing one line to stderr; never a traceback. Exit 1 also covers
usage errors, since Docker reserves exit status 2.

The URL is ``--url``, else ``$PYEGRESS_HEALTHCHECK_URL``, else
``http://127.0.0.1:9000/readyz``. Standard library only: it must start fast and import
nothing of the proxy.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import socket
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:9000/readyz"
ENV_URL = "PYEGRESS_HEALTHCHECK_URL"
DEFAULT_TIMEOUT = 3.0
PROG = "pyegress healthcheck"


class _Failure(Exception):
    """One-line reason the check failed."""


def main(argv: Sequence[str]) -> int:
    """Run the check with ``argv`` (arguments after ``healthcheck``); return the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description="Exit 0 if the admin URL answers 200.")
    parser.add_argument("--url", help=f"URL to GET (default ${ENV_URL} or {DEFAULT_URL})")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds for connecting and for each read (default {DEFAULT_TIMEOUT:g})",
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (argparse printed it)
        return 0 if exc.code == 0 else 1
    url: str = args.url or os.environ.get(ENV_URL) or DEFAULT_URL
    try:
        status, detail = _get(url, args.timeout)
    except _Failure as exc:
        _say(f"{url}: {exc}")
        return 1
    if status == 200:
        return 0
    _say(f"{url}: {status} {detail}".rstrip())
    return 1


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _get(url: str, timeout: float) -> tuple[int, str]:
    """GET ``url``; return the status and the first line of the body (at most 200
    printable characters). Raises :class:`_Failure` when no response arrives."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise _Failure(f"bad URL: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise _Failure("bad URL: expected http://HOST[:PORT]/PATH")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "pyegress-healthcheck"})
        response = conn.getresponse()
        body = response.read(1024)
    except ConnectionRefusedError:
        raise _Failure("connection refused") from None
    except TimeoutError:
        raise _Failure(f"timed out after {timeout:g}s") from None
    except socket.gaierror as exc:
        raise _Failure(f"cannot resolve host: {exc.strerror}") from None
    except OSError as exc:
        raise _Failure(exc.strerror or type(exc).__name__) from None
    except http.client.HTTPException as exc:
        raise _Failure(f"bad response: {type(exc).__name__}") from None
    finally:
        conn.close()
    text = body.decode("utf-8", "replace").splitlines()
    first = text[0] if text else ""
    return response.status, "".join(c if c.isprintable() else "?" for c in first)[:200]


def _say(message: str) -> None:
    line = "".join(c if c.isprintable() else "?" for c in message)
    print(f"{PROG}: {line}", file=sys.stderr)
