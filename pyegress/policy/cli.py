"""``pyegress policy check``: the verdict live traffic would get, from the same code.

    pyegress policy check -C policy.yaml --identity ID --dest host:port [--resolve]

Without ``--resolve`` only the rules are consulted (a name is not looked up); with it,
the name is resolved once and its answers are checked and pinned exactly as the DMZ
does before dialing. Prints the decision record as JSON; exit status 0 when the tunnel
would be allowed (or passed in report mode), 1 when refused, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from pyegress.errors import ConfigError, PyegressError
from pyegress.policy.enforce import judge
from pyegress.policy.loader import load_policy
from pyegress.policy.rules import Request
from pyegress.protocols.addresses import split_host_port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyegress policy")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="the verdict for one destination")
    check.add_argument("-C", dest="config", required=True, metavar="POLICY.yaml")
    check.add_argument("--identity", default=None, help="the client certificate identity")
    check.add_argument("--dest", required=True, metavar="HOST:PORT")
    check.add_argument("--resolve", action="store_true", help="resolve and check the answers")
    check.add_argument("--via-proxy", action="store_true", help="a corporate proxy is configured")
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        policy = load_policy(args.config)
        host, port = split_host_port(args.dest)
    except (ConfigError, PyegressError) as exc:
        print(f"pyegress: error: {exc}", file=sys.stderr)
        return 2
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
