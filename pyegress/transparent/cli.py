"""``pyegress redirect``: the firewall rules of transparent mode.

    pyegress redirect render    [options]             print the rules (no privileges)
    pyegress redirect install   [options] [--dry-run] apply them in this network namespace
    pyegress redirect uninstall [--backend B] [--dry-run]

``install`` replaces what an earlier install left, so running it twice changes nothing;
``uninstall`` removes pyegress's table/chains and TPROXY routes and nothing else. Both are
meant for a short-lived init container with CAP_NET_ADMIN. Errors are one line
``pyegress redirect: ...``: exit status 1 for the environment, 2 for usage.
"""

from __future__ import annotations

import argparse
import grp
import ipaddress
import pwd
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from pyegress.transparent import install as inst
from pyegress.transparent.rules import (
    DEFAULT_EXCLUDES,
    DEFAULT_FAKE_RANGES,
    DEFAULT_PROXY_PORT,
    DEFAULT_PROXY_UID,
    DEFAULT_ROUTE_TABLE,
    DEFAULT_TPROXY_MARK,
    Network,
    RedirectSpec,
    parse_ports,
)

PROG = "pyegress redirect"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message}\n")


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}")
    return value


def _ports(text: str) -> tuple[tuple[int, int], ...] | None:
    try:
        return parse_ports(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (want e.g. 80,443,8000-8100 or all)") from None


def _cidr(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad CIDR {text!r}") from None


def _int(text: str, what: str, limit: int = 2**32) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value < limit:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}")
    return value


def _mark(text: str) -> int:
    value = _int(text, "mark")
    if value == 0:
        raise argparse.ArgumentTypeError(f"bad mark {text!r} (0 marks nothing)")
    return value


def _uid(text: str) -> int:
    if not text.isdigit():
        try:
            return pwd.getpwnam(text).pw_uid
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown user {text!r}") from None
    return _int(text, "uid")


def _gid(text: str) -> int:
    if not text.isdigit():
        try:
            return grp.getgrnam(text).gr_gid
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown group {text!r}") from None
    return _int(text, "gid")


def _table(text: str) -> int:
    value = _int(text, "route table")
    if value in (0, 253, 254, 255):
        raise argparse.ArgumentTypeError(f"bad route table {text!r} (reserved)")
    return value


def resolve_dmz(text: str) -> tuple[Network, ...]:
    """An address, a CIDR or a host name (every address it resolves to, now)."""
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return (ipaddress.ip_network(value, strict=False),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(value, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise argparse.ArgumentTypeError(f"cannot resolve --dmz {text!r}") from None
    return tuple(
        dict.fromkeys(ipaddress.ip_network(str(info[4][0]).split("%")[0]) for info in infos)
    )


def _routing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=inst.BACKENDS, default="auto",
        help="auto (default): nft where installed, else iptables-restore",
    )  # fmt: skip
    parser.add_argument(
        "--tproxy-mark", type=_mark, default=DEFAULT_TPROXY_MARK, metavar="MARK",
        help=f"TPROXY: the mark selecting the local route (default {DEFAULT_TPROXY_MARK:#x})",
    )  # fmt: skip
    parser.add_argument(
        "--route-table", type=_table, default=DEFAULT_ROUTE_TABLE, metavar="N",
        help=f"TPROXY: the routing table of the local route (default {DEFAULT_ROUTE_TABLE})",
    )  # fmt: skip


def _spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("redirect", "tproxy"), default="redirect")
    parser.add_argument(
        "--proxy-port", type=_port, default=DEFAULT_PROXY_PORT, metavar="PORT",
        help=f"the sidecar's redirect listener (default {DEFAULT_PROXY_PORT})",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-uid", type=_uid, action="append", metavar="UID",
        help=f"the sidecar's user, never captured; repeatable (default {DEFAULT_PROXY_UID})",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-gid", type=_gid, action="append", default=[], metavar="GID",
        help="the sidecar's group, never captured; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--mark", type=_mark, metavar="MARK",
        help="packets carrying this mark (the sidecar's SO_MARK) are never captured",
    )  # fmt: skip
    parser.add_argument(
        "--ports", type=_ports, default=None, metavar="LIST",
        help="TCP destination ports to capture, e.g. 80,443,8000-8100, or all (default)",
    )  # fmt: skip
    parser.add_argument(
        "--dmz", type=resolve_dmz, action="append", default=[], metavar="ADDR",
        help="the DMZ's address, CIDR or host name, never captured; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--exclude-cidr", type=_cidr, action="append", default=[], metavar="CIDR",
        help="a cluster CIDR never captured; repeatable, added to the defaults "
        f"({', '.join(map(str, DEFAULT_EXCLUDES))})",
    )  # fmt: skip
    parser.add_argument(
        "--no-default-excludes", action="store_true",
        help="do not exclude the default private ranges",
    )  # fmt: skip
    parser.add_argument(
        "--fake-range", type=_cidr, action="append", metavar="CIDR",
        help="the DNS listener's reserved range, captured on every TCP port; repeatable "
        f"(default {', '.join(map(str, DEFAULT_FAKE_RANGES))})",
    )  # fmt: skip
    parser.add_argument(
        "--no-fake-range", action="store_true", help="capture no reserved DNS range"
    )
    parser.add_argument(
        "--dns-port", type=_port, metavar="PORT",
        help="send the pod's DNS (UDP and TCP 53) to this port of the sidecar",
    )  # fmt: skip
    parser.add_argument(
        "--ipv6", action=argparse.BooleanOptionalAction, default=True,
        help="capture IPv6 as well (default on)",
    )  # fmt: skip
    parser.add_argument(
        "--udp", choices=("reject", "allow"), default="reject",
        help="UDP other than DNS: reject (default: logged with prefix 'pyegress-udp ' and "
        "refused with ICMP port unreachable) or allow (left alone)",
    )  # fmt: skip
    _routing_options(parser)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Firewall rules for transparent mode.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    render = sub.add_parser("render", help="print the rules (no privileges needed)")
    _spec_options(render)
    install = sub.add_parser("install", help="apply the rules in this network namespace")
    _spec_options(install)
    install.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    uninstall = sub.add_parser("uninstall", help="remove pyegress's rules and routes")
    _routing_options(uninstall)
    uninstall.add_argument("--dry-run", action="store_true", help="print what would go")
    return parser


def spec_from_args(args: argparse.Namespace) -> RedirectSpec:
    exclude = () if args.no_default_excludes else DEFAULT_EXCLUDES
    if args.no_fake_range:
        fake: tuple[Network, ...] = ()
    else:
        fake = tuple(args.fake_range) if args.fake_range else DEFAULT_FAKE_RANGES
    return RedirectSpec(
        mode=args.mode,
        proxy_port=args.proxy_port,
        proxy_uids=tuple(dict.fromkeys(args.proxy_uid or [DEFAULT_PROXY_UID])),
        proxy_gids=tuple(dict.fromkeys(args.proxy_gid)),
        mark=args.mark,
        ports=args.ports,
        dmz=tuple(net for nets in args.dmz for net in nets),
        exclude=exclude + tuple(args.exclude_cidr),
        fake_ranges=fake,
        dns_port=args.dns_port,
        ipv6=args.ipv6,
        udp=args.udp,
        tproxy_mark=args.tproxy_mark,
        route_table=args.route_table,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.command == "uninstall":
            backend = inst.detect_backend(args.backend)
            routes = inst.Routes(args.tproxy_mark, args.route_table)
            if args.dry_run:
                sys.stdout.write(inst.render_uninstall(backend, routes))
            else:
                inst.uninstall(backend, routes)
            return 0
        try:
            spec = spec_from_args(args)
        except ValueError as exc:
            parser.error(str(exc))
        if args.command == "render":
            backend = "nft" if args.backend == "auto" else inst.detect_backend(args.backend)
            sys.stdout.write(inst.render(spec, backend))
            return 0
        backend = inst.detect_backend(args.backend)
        if args.dry_run:
            sys.stdout.write(inst.render(spec, backend))
        else:
            inst.install(spec, backend)
        return 0
    except inst.RedirectError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.status
