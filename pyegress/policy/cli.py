"""``pyegress policy``: operator commands on a policy file, from the code live traffic uses.

    pyegress policy check  -C policy.yaml --identity ID --dest host:port [--resolve]
    pyegress policy replay -C new.yaml audit.jsonl [--show-unchanged] [--json]
    pyegress policy check  -C new.yaml --replay audit.jsonl     (the same as replay)
    pyegress policy lint   -C policy.yaml

``check``: without ``--resolve`` only the rules are consulted (a name is not looked up);
with it, the name is resolved once and its answers are checked and pinned exactly as the
DMZ does before dialing. Prints the decision record as JSON; exit status 0 when the
tunnel would be allowed (or passed in report mode), 1 when refused.

``replay`` (:mod:`pyegress.policy.replay`): the past tunnels of an audit file whose
verdict the candidate policy would change; exit status 0 when none, 1 otherwise.

``lint`` (:mod:`pyegress.policy.lint`): warnings about rules that can never decide,
overlaps, duplicate and unused identities; exit status 0 when clean, 1 with warnings.

Usage and configuration errors are one line ``pyegress: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import suppress
from typing import IO, Any, NoReturn

from pyegress.errors import ConfigError, PyegressError
from pyegress.policy.enforce import judge
from pyegress.policy.lint import lint_policy
from pyegress.policy.loader import load_policy
from pyegress.policy.replay import Counts, Malformed, Replayer, format_outcome, replay_lines
from pyegress.policy.rules import Policy, Request
from pyegress.protocols.addresses import split_host_port


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other pyegress error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pyegress: error: {message}\n")


def _replay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--show-unchanged", action="store_true", help="also list tunnels whose verdict stays"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument(
        "--via-proxy",
        action="store_true",
        help="a corporate proxy is configured (route: proxy rules go through it)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyegress policy")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="the verdict for one destination")
    check.add_argument("-C", dest="config", required=True, metavar="POLICY.yaml")
    check.add_argument("--identity", default=None, help="the client certificate identity")
    check.add_argument("--dest", default=None, metavar="HOST:PORT")
    check.add_argument("--resolve", action="store_true", help="resolve and check the answers")
    check.add_argument(
        "--replay", default=None, metavar="AUDIT.jsonl", help="the same as 'policy replay'"
    )
    _replay_options(check)
    replay = sub.add_parser("replay", help="past tunnels whose verdict would change")
    replay.add_argument("-C", dest="config", required=True, metavar="POLICY.yaml")
    replay.add_argument("audit", metavar="AUDIT.jsonl", help="audit JSON Lines ('-': stdin)")
    _replay_options(replay)
    lint = sub.add_parser("lint", help="warnings about rules that cannot decide or overlap")
    lint.add_argument("-C", dest="config", required=True, metavar="POLICY.yaml")
    return parser


def _fail(message: str) -> int:
    print(f"pyegress: error: {message}", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace, policy: Policy) -> int:
    try:
        host, port = split_host_port(args.dest)
    except PyegressError as exc:
        return _fail(str(exc))
    record: dict[str, Any] = {"identity": args.identity, "requested": {"host": host, "port": port}}
    if args.resolve:
        # A refusal raises after filling the record; the record is the answer.
        with suppress(PyegressError):
            asyncio.run(
                judge(
                    policy,
                    record,
                    args.identity,
                    host,
                    port,
                    dns_timeout=5.0,
                    self_endpoints=(),
                    have_proxy=args.via_proxy,
                )
            )
    else:
        decision = policy.decide(Request(identity=args.identity, host=host, port=port))
        record["decision"] = {
            "action": decision.action,
            "would_deny": decision.action == "report",
            "reason": decision.reason,
            "rule_id": decision.rule_id,
            "policy_version": policy.version,
            "detail": decision.detail,
        }
    print(json.dumps(record))
    return 1 if record.get("decision", {}).get("action") == "deny" else 0


def _lines(stream: IO[bytes]) -> Iterator[str]:
    for raw in stream:
        yield raw.decode("utf-8", "replace")


def _replay(args: argparse.Namespace, policy: Policy, path: str) -> int:
    counts = Counts()
    try:
        stream: IO[bytes] = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        return _fail(f"{path}: cannot read audit file: {exc.strerror or exc}")
    out = sys.stdout
    try:
        with Replayer(policy, have_proxy=args.via_proxy) as replayer:
            for item in replay_lines(replayer, _lines(stream), counts):
                if isinstance(item, Malformed):
                    print(
                        f"pyegress: warning: {path}:{item.line}: malformed decision record: "
                        f"{item.problem}",
                        file=sys.stderr,
                    )
                elif item.change != "unchanged" or args.show_unchanged:
                    if args.json:
                        out.write(json.dumps(item.as_json()) + "\n")
                    else:
                        out.write(format_outcome(item) + "\n")
    except OSError as exc:
        return _fail(f"{path}: cannot read audit file: {exc.strerror or exc}")
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if args.json:
        summary = {"summary": counts.as_json(), "policy_version": policy.version}
        out.write(json.dumps(summary) + "\n")
    else:
        out.write(counts.summary() + "\n")
    return 1 if counts.changed else 0


def _lint(path: str) -> int:
    try:
        warnings = lint_policy(path)
    except ConfigError as exc:
        return _fail(str(exc))
    for warning in warnings:
        print(warning)
    return 1 if warnings else 0


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "lint":
        return _lint(args.config)
    if args.command == "check":
        if args.replay is not None and (args.dest is not None or args.resolve):
            return _fail("policy check: --replay does not take --dest or --resolve")
        if args.replay is None and args.dest is None:
            return _fail("policy check: one of --dest HOST:PORT or --replay AUDIT.jsonl")
    try:
        policy = load_policy(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.command == "replay":
        return _replay(args, policy, args.audit)
    if args.replay is not None:
        return _replay(args, policy, args.replay)
    return _check(args, policy)
