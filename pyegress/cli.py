"""Command line with gost's grammar: ``-L`` (services), ``-F`` (chain hops), ``-D``, ``-V``,
``-O`` (print the effective configuration and exit)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from pyegress import __version__
from pyegress.config.nodes import IMPLEMENTED_PARAMS, Node, parse_node
from pyegress.config.render import effective_config, to_yaml
from pyegress.engine import DEFAULT_DRAIN_TIMEOUT, Engine
from pyegress.errors import ConfigError
from pyegress.observe import log as logmod
from pyegress.observe.admin import parse_admin_address
from pyegress.observe.audit import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyegress",
        description="gost-compatible egress proxy: sidecar, h2 tier link and audited DMZ exit.",
    )
    parser.add_argument(
        "-L", dest="listen", action="append", default=[], metavar="URL",
        help="serve a node, e.g. http://:18080, socks5://user:pass@:1080, tcp://:2222/host:22",
    )  # fmt: skip
    parser.add_argument(
        "-F", dest="forward", action="append", default=[], metavar="URL",
        help="chain node (hop), in order, e.g. http://proxy:3128 or socks5://u:p@host:1080",
    )  # fmt: skip
    parser.add_argument(
        "-C", dest="config", metavar="FILE",
        help="the DMZ's policy (allowlist) file (docs/policy.md), or a gost v2 JSON / "
        "v3 YAML configuration",
    )  # fmt: skip
    parser.add_argument("-D", dest="debug", action="count", default=0, help="debug logging")
    parser.add_argument("-V", dest="version", action="store_true", help="print version, exit")
    parser.add_argument(
        "-O", dest="output", choices=("json", "yaml"), metavar="json|yaml",
        help="print the effective configuration and exit",
    )  # fmt: skip
    parser.add_argument(
        "-metrics", "--metrics", dest="metrics", metavar="ADDR",
        help="admin listener: /metrics, /livez, /readyz (e.g. :9000 or 127.0.0.1:9000)",
    )  # fmt: skip
    parser.add_argument(
        "--audit-file", metavar="PATH",
        help="write audit records to PATH (rotated by size) instead of stdout",
    )  # fmt: skip
    parser.add_argument(
        "--audit-max-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="N",
        help="rotate the audit file before it passes N bytes (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--audit-backups", type=int, default=DEFAULT_BACKUPS, metavar="K",
        help="rotated audit files to keep (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long open tunnels may finish (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=_workers_arg, default=1, metavar="N|auto",
        help="worker processes sharing the listening ports (SO_REUSEPORT) under one "
        "supervisor; auto: one per core (default %(default)s)",
    )  # fmt: skip
    return parser


def _workers_arg(text: str) -> int:
    from pyegress.workers import parse_workers

    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _strip_eq(values: Sequence[str]) -> list[str]:
    # gost users write -L=:8080; argparse hands that over as "=:8080".
    return [v[1:] if v.startswith("=") else v for v in values]


def parse_nodes(args: argparse.Namespace) -> tuple[list[Node], list[Node]]:
    listen = [parse_node(url, "listen") for url in _strip_eq(args.listen)]
    forward = [parse_node(url, "forward") for url in _strip_eq(args.forward)]
    return listen, forward


def _warn_params(listen: Sequence[Node], forward: Sequence[Node], log: logmod.Logger) -> None:
    warned: set[str] = set()
    for node in (*listen, *forward):
        for key in node.unknown_params:
            if key.lower() not in warned:
                warned.add(key.lower())
                log.warning("unknown_parameter", param=key, node=node.redacted())
        for key in node.params:
            if key not in IMPLEMENTED_PARAMS and key not in warned:
                warned.add(key)
                log.warning("parameter_ignored", param=key, node=node.redacted())


def _run(coro: Coroutine[Any, Any, None]) -> None:
    if os.environ.get("PYEGRESS_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["policy"]:
        from pyegress.policy.cli import main as policy_main

        return policy_main(argv[1:])
    if argv[:1] == ["healthcheck"]:
        from pyegress.healthcheck import main as healthcheck_main

        return healthcheck_main(argv[1:])
    if argv[:1] == ["redirect"]:
        from pyegress.transparent.cli import main as redirect_main

        return redirect_main(argv[1:])
    from pyegress import workers

    worker = workers.worker_identity()  # (index, count) in a worker of --workers
    if worker is not None:
        workers.worker_prelude()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"pyegress {__version__} (gost-compatible) python {sys.version.split()[0]}")
        return 0
    if not args.listen and not args.forward and not args.config:
        parser.print_usage(sys.stderr)
        return 2
    try:
        listen, forward = parse_nodes(args)
        gost = None
        if args.config:
            from pyegress.config.gostfile import load_gost_file

            gost = load_gost_file(args.config)  # None: the file is a pyegress policy
            if gost is not None:
                listen += gost.listen
                forward += gost.forward
        if args.output:
            config = effective_config(listen, forward)
            if args.output == "json":
                print(json.dumps(config, indent=2))
            else:
                print(to_yaml(config), end="")
            return 0
        if args.metrics is not None:
            parse_admin_address(args.metrics)  # a bad address fails before anything starts
        policy = None
        if args.config and gost is None:
            from pyegress.policy.loader import load_policy

            if any(node.transport in ("h2", "h2c", "http2") for node in forward):
                raise ConfigError(
                    "-C judges tunnels where they leave (the DMZ); this node forwards over "
                    "an h2 tier link, where a policy would dial around the DMZ"
                )
            policy = load_policy(args.config)
        count = 1 if worker is not None else args.workers
        workers.check_config(count, listen, args.audit_file)
        debug = args.debug > 0 or (gost is not None and gost.debug)
        if count > 1:
            return _supervise(argv, count, args, debug, listen, forward, policy)
        audit_file = args.audit_file
        if audit_file is not None:
            audit_file = workers.audit_path(audit_file, worker[0] if worker else 0)
        try:
            output = logmod.configure(
                debug=debug,
                audit_file=audit_file,
                audit_max_bytes=args.audit_max_bytes,
                audit_backups=args.audit_backups,
                fields={"worker": worker[0]} if worker is not None else None,
                stdout_lock=os.environ.get(workers.STDOUT_LOCK_ENV) if worker else None,
            )
        except OSError as exc:
            raise ConfigError(f"--audit-file {audit_file}: {exc.strerror or exc}") from None
        log = logmod.get_logger()
        _warn_params(listen, forward, log)
        if policy is not None:
            log.info("policy_loaded", file=args.config, policy_version=policy.version)
        try:
            engine = Engine(
                listen,
                forward,
                log,
                drain_timeout=args.drain_timeout,
                policy=policy,
                policy_path=args.config if policy is not None else None,
                # A worker's metrics are served merged by its supervisor.
                metrics_address=args.metrics if worker is None else None,
                output=output,
                worker=worker[0] if worker is not None else None,
            )
            _run(engine.run() if worker is None else workers.serve_worker(engine))
        finally:
            logmod.close()
    except ConfigError as exc:
        print(f"pyegress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        return 130
    return 0


def _supervise(
    argv: Sequence[str],
    count: int,
    args: argparse.Namespace,
    debug: bool,
    listen: Sequence[Node],
    forward: Sequence[Node],
    policy: Any,
) -> int:
    """``--workers N`` (N > 1): this process supervises N workers (pyegress/workers.py)."""
    from pyegress.workers import lock_path, stdout_lock, supervise

    try:
        lock = stdout_lock()
    except OSError as exc:
        raise ConfigError(f"--workers: cannot make the stdout lock file: {exc}") from None
    try:
        logmod.configure(debug=debug, stdout_lock=lock_path(lock) if lock is not None else None)
        log = logmod.get_logger()
        _warn_params(listen, forward, log)
        # Built and dropped: what a worker would refuse is refused here, before any starts.
        Engine(listen, forward, log, policy=policy, metrics_address=args.metrics)
        if policy is not None:
            log.info("policy_loaded", file=args.config, policy_version=policy.version)
        return supervise(
            argv,
            count,
            log,
            stdout_lock=lock,
            metrics_address=args.metrics,
            drain_timeout=args.drain_timeout,
        )
    finally:
        logmod.close()
        if lock is not None:
            os.close(lock)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
