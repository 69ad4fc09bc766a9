"""Apply and remove the rules of :mod:`pyegress.transparent.rules` in the current network
namespace, atomically, as a short-lived init container with CAP_NET_ADMIN would.

* nftables: one ``nft -f -`` transaction that deletes pyegress's table (if any) and
  creates it again, so a second install changes nothing and uninstall leaves no trace.
* iptables: one ``iptables-restore --noflush`` (and ``ip6tables-restore``) per IP version
  whose input first removes what an earlier install left (read from ``iptables-save``) and
  then adds the chains again, so the same holds.
* TPROXY: ``ip rule fwmark M lookup T`` and ``ip route local default dev lo table T`` for
  both IP versions, through pyroute2 (netlink), added only when missing.

Failures raise :class:`RedirectError` with a one-line message and an exit status:
1 for the environment (no capability, missing program, kernel refusal), 2 for usage.
"""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyegress.transparent.rules import (
    DEFAULT_ROUTE_TABLE,
    DEFAULT_TPROXY_MARK,
    RedirectSpec,
    ipt_cleanup,
    nft_prelude,
    render_iptables_family,
    render_nft,
)

Backend = Literal["nft", "iptables", "iptables-legacy", "iptables-nft"]
BACKENDS: tuple[str, ...] = ("auto", "nft", "iptables", "iptables-legacy", "iptables-nft")

CAP_NET_ADMIN = 12
_NEED_CAP = "need CAP_NET_ADMIN (run as root or with securityContext.capabilities.add: [NET_ADMIN])"


class RedirectError(Exception):
    """A one-line failure of ``pyegress redirect``, with its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def has_net_admin(status_file: Path = Path("/proc/self/status")) -> bool:
    """Whether CAP_NET_ADMIN is in this process's effective set."""
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return True  # unknown: let the kernel decide, its refusal is mapped below


def detect_backend(choice: str, which: Callable[[str], str | None] = shutil.which) -> Backend:
    """``auto``: nftables where ``nft`` exists, else iptables-restore."""
    if choice == "auto":
        if which("nft"):
            return "nft"
        if which("iptables-restore"):
            return "iptables"
        raise RedirectError("neither nft nor iptables-restore is installed")
    if choice not in BACKENDS:
        raise RedirectError(f"unknown backend {choice!r}", 2)
    return choice  # type: ignore[return-value]


def _restore_programs(backend: Backend) -> tuple[str, str, str, str]:
    """``(iptables-restore, iptables-save, ip6tables-restore, ip6tables-save)``."""
    suffix = {"iptables": "", "iptables-legacy": "-legacy", "iptables-nft": "-nft"}[backend]
    return (
        f"iptables{suffix}-restore",
        f"iptables{suffix}-save",
        f"ip6tables{suffix}-restore",
        f"ip6tables{suffix}-save",
    )


def _run(argv: list[str], stdin: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise RedirectError(f"{argv[0]} is not installed (choose another --backend)")
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        if "Operation not permitted" in err or "Permission denied" in err:
            raise RedirectError(f"{_NEED_CAP}: {argv[0]}: {err}")
        raise RedirectError(f"{argv[0]} failed: {err}")
    return proc.stdout


# --- iptables ------------------------------------------------------------------------


def merge_restore(rendered: str, cleanup: dict[str, list[str]]) -> str:
    """Insert, right after each ``*table`` line of ``rendered``, the lines removing what
    an earlier install left there; tables only in ``cleanup`` get their own block."""
    out: list[str] = []
    done: set[str] = set()
    for line in rendered.splitlines():
        out.append(line)
        if line.startswith("*"):
            table = line[1:]
            out += cleanup.get(table, [])
            done.add(table)
    for table, lines in cleanup.items():
        if table not in done and lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n"


def _saved(save: str) -> str:
    return "".join(_run([save, "-t", table]) for table in ("nat", "mangle", "filter"))


def _ipt_apply(spec: RedirectSpec | None, backend: Backend) -> None:
    restore4, save4, restore6, save6 = _restore_programs(backend)
    for version, restore, save in ((4, restore4, save4), (6, restore6, save6)):
        wanted = render_iptables_family(spec, version) if spec else ""
        if version == 6 and not wanted and shutil.which(save) is None:
            continue
        try:
            cleanup = ipt_cleanup(_saved(save))
        except RedirectError:
            if wanted:
                raise
            continue  # no IPv6 tables in this kernel: nothing to remove either
        text = merge_restore(wanted, cleanup)
        if text.strip():
            _run([restore, "--noflush"], text)


# --- TPROXY policy routing -----------------------------------------------------------


@dataclass(frozen=True)
class Routes:
    """The policy routing of TPROXY: marked packets are delivered locally."""

    mark: int = DEFAULT_TPROXY_MARK
    table: int = DEFAULT_ROUTE_TABLE

    def describe(self, ipv6: bool = True) -> list[str]:
        lines = []
        for flag, default in (("-4", "0.0.0.0/0"), ("-6", "::/0"))[: 2 if ipv6 else 1]:
            lines += [
                f"ip {flag} rule add fwmark {self.mark:#x} lookup {self.table}",
                f"ip {flag} route add local {default} dev lo table {self.table}",
            ]
        return lines


def _families(ipv6: bool) -> list[tuple[int, str]]:
    pairs: list[tuple[int, str]] = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    return pairs if ipv6 else pairs[:1]


def _my_rules(ipr: Any, routes: Routes, family: int) -> list[Any]:
    return [
        rule
        for rule in ipr.get_rules(family=family)
        if rule.get("fwmark") == routes.mark and rule.get("table") == routes.table
    ]


def _my_routes(ipr: Any, routes: Routes, family: int) -> list[Any]:
    return [
        route
        for route in ipr.get_routes(family=family, table=routes.table)
        if route.get("table") == routes.table
    ]


def add_routes(routes: Routes, ipv6: bool) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family, any_addr in _families(ipv6):
            if not _my_rules(ipr, routes, family):
                ipr.rule(
                    "add", family=family, fwmark=routes.mark, fwmask=0xFFFFFFFF,
                    table=routes.table,
                )  # fmt: skip
            if not _my_routes(ipr, routes, family):
                # scope host, as ip(8) sets for a local route (IPv4 refuses any other)
                ipr.route(
                    "add", family=family, dst=f"{any_addr}/0", type="local", scope=254,
                    oif=lo, table=routes.table,
                )  # fmt: skip


def remove_routes(routes: Routes) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for family, any_addr in _families(True):
            for rule in _my_rules(ipr, routes, family):
                ipr.rule(
                    "del", family=family, fwmark=routes.mark, fwmask=rule.get("fwmask"),
                    table=routes.table, priority=rule.get("priority"),
                )  # fmt: skip
            for route in _my_routes(ipr, routes, family):
                ipr.route(
                    "del", family=family, dst=f"{route.get('dst') or any_addr}/"
                    f"{route.get('dst_len') or 0}", type=route.get("type"), scope=route.get(
                    "scope"), oif=route.get("oif"), table=routes.table,
                )  # fmt: skip


# --- entry points --------------------------------------------------------------------


def render(spec: RedirectSpec, backend: Backend) -> str:
    """What ``install`` applies, as text (``--dry-run``)."""
    if backend == "nft":
        text = render_nft(spec)
    else:
        restore4, _, restore6, _ = _restore_programs(backend)
        text = f"# {restore4} --noflush\n" + render_iptables_family(spec, 4)
        if spec.ipv6:
            text += f"\n# {restore6} --noflush\n" + render_iptables_family(spec, 6)
    if spec.mode == "tproxy":
        steps = Routes(spec.tproxy_mark, spec.route_table).describe(spec.ipv6)
        text += "\n# policy routing (pyroute2):\n" + "".join(f"# {s}\n" for s in steps)
    return text


def render_uninstall(backend: Backend, routes: Routes) -> str:
    if backend == "nft":
        text = nft_prelude()
    else:
        text = "# iptables-restore / ip6tables-restore --noflush: -D the jumps into, -F and -X\n"
        text += "# every PYEGRESS_* chain iptables-save shows in the nat, mangle, filter tables\n"
    steps = [line.replace(" add ", " del ", 1) for line in routes.describe()]
    return (
        text + "# policy routing (pyroute2), when present:\n" + "".join(f"# {s}\n" for s in steps)
    )


def _check_privileges() -> None:
    if not has_net_admin():
        raise RedirectError(_NEED_CAP)


def install(spec: RedirectSpec, backend: Backend) -> None:
    """Replace whatever pyegress installed before with ``spec``'s rules (idempotent)."""
    _check_privileges()
    routes = Routes(spec.tproxy_mark, spec.route_table)
    if backend == "nft":
        _run(["nft", "-f", "-"], render_nft(spec))
    else:
        _ipt_apply(spec, backend)
    if spec.mode == "tproxy":
        _netlink("policy routing", lambda: add_routes(routes, spec.ipv6))
    else:
        _netlink("policy routing removal", lambda: remove_routes(routes))


def _netlink(what: str, call: Callable[[], None]) -> None:
    """pyroute2's NetlinkError (not an OSError) and OSError as one-line errors."""
    try:
        call()
    except Exception as exc:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if isinstance(exc, PermissionError) or code in (errno.EPERM, errno.EACCES):
            raise RedirectError(f"{_NEED_CAP}: {what}: {exc}") from None
        if isinstance(exc, OSError) or type(exc).__name__ == "NetlinkError":
            raise RedirectError(f"{what} failed: {exc}") from None
        raise


def uninstall(backend: Backend, routes: Routes) -> None:
    """Remove pyegress's table or chains and its TPROXY routes; nothing else."""
    _check_privileges()
    if backend == "nft":
        _run(["nft", "-f", "-"], nft_prelude())
    else:
        _ipt_apply(None, backend)
    _netlink("policy routing removal", lambda: remove_routes(routes))
