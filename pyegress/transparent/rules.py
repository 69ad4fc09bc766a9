"""Firewall rules for transparent mode, rendered by pure functions (no I/O).

One :class:`RedirectSpec` says what to capture; :func:`render_nft` turns it into an
``nft -f`` script and :func:`render_iptables` into a pair of ``iptables-restore`` /
``ip6tables-restore`` inputs. The installer (:mod:`pyegress.transparent.install`) applies
exactly this text, so ``--dry-run`` and the golden files show what the kernel gets.

Every rule lives in pyegress's own table (nft) or chains (``PYEGRESS_*``, iptables) and
carries a ``pyegress/<purpose>`` comment. The capture chain is evaluated in this order,
first match wins:

1. IPv6 skipped entirely when IPv6 capture is off;
2. the sidecar's own traffic (owner UID/GID, optionally a packet mark) returns, so its
   connections to the DMZ and its DNS forwarding to the cluster DNS never loop back;
3. anything leaving through ``lo`` returns (loopback, and the pod's own addresses);
4. DNS (UDP and TCP port 53) goes to the sidecar's DNS port, when one is given; before the
   CIDR exclusions, because the cluster DNS usually sits inside the cluster CIDRs;
5. the DNS listener's reserved fake ranges are captured on every TCP port, ahead of the
   exclusions, since a fake address can only be answered by the sidecar;
6. the DMZ address and the excluded (cluster) CIDRs return;
7. the remaining TCP, on the chosen ports or all of them, goes to the proxy port.

In ``redirect`` mode step 7 is a NAT ``REDIRECT`` in the output hook (the listener reads
``SO_ORIGINAL_DST``). In ``tproxy`` mode step 7 sets a mark in the output (route) hook, a
policy route (``ip rule fwmark M lookup T`` + ``local default dev lo table T``, set by the
installer) loops the packet back through ``lo``, and a prerouting rule hands it to the
listener with ``TPROXY``; DNS stays a NAT redirect there.

UDP other than DNS is not proxied. With ``udp="reject"`` (the default) a filter chain in
the output hook refuses it *loudly*: the same exemptions (steps 1-3), then UDP whose
original destination port (conntrack's, before any redirect to the DNS port) is 53
returns, UDP to a fake range is logged and rejected (QUIC to a fake address must fail
fast so the client falls back to TCP), the DMZ and excluded CIDRs return, and any other
UDP is logged (``pyegress-udp `` prefix) and rejected with ICMP port unreachable, so a
connected socket gets ECONNREFUSED at once instead of a silent timeout. ``udp="allow"``
leaves UDP alone.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from pyegress.transparent.fakeip import DEFAULT_RANGE, DEFAULT_RANGE6

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]
Mode = Literal["redirect", "tproxy"]
UdpPolicy = Literal["reject", "allow"]

NFT_TABLE = "pyegress"
CHAIN_PREFIX = "PYEGRESS_"
TAG = "pyegress"

DEFAULT_PROXY_PORT = 15001
DEFAULT_PROXY_UID = 10001  # the Dockerfile's USER
DEFAULT_TPROXY_MARK = 0x150
DEFAULT_ROUTE_TABLE = 150
# The source article's cluster exclusions (RFC 1918), plus IPv6 unique local addresses.
DEFAULT_EXCLUDES: tuple[Network, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("fc00::/7"),
)
# The DNS listener's reserved ranges (pyegress.transparent.fakeip), one source of truth.
DEFAULT_FAKE_RANGES: tuple[Network, ...] = (
    ipaddress.ip_network(DEFAULT_RANGE),
    ipaddress.ip_network(DEFAULT_RANGE6),
)

# The kernel log prefix of refused UDP (nft ``log prefix``, iptables ``--log-prefix``).
UDP_LOG_PREFIX = "pyegress-udp "

# iptables' multiport takes at most 15 ports, a range counting as two.
_MULTIPORT_MAX = 15


@dataclass(frozen=True)
class RedirectSpec:
    """What to capture and where to send it. Field order is rule order where it matters."""

    mode: Mode = "redirect"
    proxy_port: int = DEFAULT_PROXY_PORT
    # The sidecar's own traffic is never captured: its UIDs, GIDs and (optional) SO_MARK.
    proxy_uids: tuple[int, ...] = (DEFAULT_PROXY_UID,)
    proxy_gids: tuple[int, ...] = ()
    mark: int | None = None
    # Destination TCP ports to capture; ``None`` captures all TCP.
    ports: tuple[PortRange, ...] | None = None
    # Never captured: the DMZ's addresses and the cluster CIDRs.
    dmz: tuple[Network, ...] = ()
    exclude: tuple[Network, ...] = DEFAULT_EXCLUDES
    # Always captured on every TCP port: the DNS listener's reserved (fake) ranges.
    fake_ranges: tuple[Network, ...] = DEFAULT_FAKE_RANGES
    # UDP and TCP port 53 go to this port of the sidecar when set.
    dns_port: int | None = None
    ipv6: bool = True
    # UDP other than DNS from the pod's applications: logged and rejected, or left alone.
    udp: UdpPolicy = "reject"
    # TPROXY only: the mark that selects the policy route, and that route's table.
    tproxy_mark: int = DEFAULT_TPROXY_MARK
    route_table: int = DEFAULT_ROUTE_TABLE
    comment: str = field(default="pyegress redirect", compare=False)

    def __post_init__(self) -> None:
        for name, port in (("proxy port", self.proxy_port), ("DNS port", self.dns_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"{name} {port} is not in 1-65535")
        for low, high in self.ports or ():
            if not 1 <= low <= high <= 65535:
                raise ValueError(f"port range {low}-{high} is not within 1-65535")
        if self.ports is not None and not self.ports:
            raise ValueError("an empty port list captures nothing; use None for all TCP")
        for ident in (*self.proxy_uids, *self.proxy_gids):
            if not 0 <= ident < 2**32:
                raise ValueError(f"owner id {ident} is out of range")
        for mark in (self.mark, self.tproxy_mark):
            if mark is not None and not 0 < mark < 2**32:
                raise ValueError(f"mark {mark:#x} is out of range")
        if self.udp not in ("reject", "allow"):
            raise ValueError(f"udp must be reject or allow, not {self.udp!r}")
        if self.mode == "tproxy" and self.mark == self.tproxy_mark:
            raise ValueError("the sidecar's mark must differ from the TPROXY mark")
        if not 0 < self.route_table < 2**32 or self.route_table in (253, 254, 255):
            raise ValueError(f"route table {self.route_table} is reserved or out of range")

    def nets(self, which: tuple[Network, ...], version: int) -> list[Network]:
        """The networks of one IP version, in the order given, without duplicates."""
        return list(dict.fromkeys(net for net in which if net.version == version))

    @property
    def versions(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)


def parse_ports(text: str) -> tuple[PortRange, ...] | None:
    """``"all"`` -> ``None``; ``"80,443,8000-8100"`` -> ranges. ValueError names the part."""
    if text.strip().lower() == "all":
        return None
    ranges: list[PortRange] = []
    for part in text.split(","):
        item = part.strip()
        low_s, sep, high_s = item.partition("-")
        try:
            low = int(low_s, 10)
            high = int(high_s, 10) if sep else low
        except ValueError:
            raise ValueError(f"bad port {item!r}") from None
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port {item!r}")
        ranges.append((low, high))
    return tuple(dict.fromkeys(ranges))


def _port_text(ports: tuple[PortRange, ...], range_sep: str) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}{range_sep}{hi}" for lo, hi in ports]


# --- nftables ------------------------------------------------------------------------


def _nft_set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _nft_tag(purpose: str) -> str:
    return f'comment "{TAG}/{purpose}"'


def _nft_exempt(spec: RedirectSpec) -> list[str]:
    """Steps 1-3: traffic never captured, whatever its destination."""
    rules: list[str] = []
    if not spec.ipv6:
        rules.append(f"meta nfproto ipv6 return {_nft_tag('ipv4-only')}")
    rules += [f"meta skuid {uid} return {_nft_tag('owner-uid')}" for uid in spec.proxy_uids]
    rules += [f"meta skgid {gid} return {_nft_tag('owner-gid')}" for gid in spec.proxy_gids]
    if spec.mark is not None:
        rules.append(f"meta mark & {spec.mark:#x} == {spec.mark:#x} return {_nft_tag('mark')}")
    rules.append(f'oifname "lo" return {_nft_tag("loopback")}')
    return rules


def _nft_dns(spec: RedirectSpec) -> list[str]:
    if spec.dns_port is None:
        return []
    return [
        f"{proto} dport 53 redirect to :{spec.dns_port} {_nft_tag('dns')}"
        for proto in ("udp", "tcp")
    ]


def _nft_capture(spec: RedirectSpec, action: str) -> list[str]:
    """Steps 5-7, with ``action`` the verdict for captured TCP."""
    rules: list[str] = []
    for version, key in ((4, "ip"), (6, "ip6")):
        if version in spec.versions and (fake := spec.nets(spec.fake_ranges, version)):
            items = [str(net) for net in fake]
            rules.append(
                f"{key} daddr {_nft_set(items)} meta l4proto tcp {action} {_nft_tag('fake-range')}"
            )
    for purpose, nets in (("dmz", spec.dmz), ("exclude", spec.exclude)):
        for version, key in ((4, "ip"), (6, "ip6")):
            if version in spec.versions and (chosen := spec.nets(nets, version)):
                items = [str(net) for net in chosen]
                rules.append(f"{key} daddr {_nft_set(items)} return {_nft_tag(purpose)}")
    match = "meta l4proto tcp"
    if spec.ports is not None:
        match = f"tcp dport {_nft_set(_port_text(spec.ports, '-'))}"
    rules.append(f"{match} {action} {_nft_tag('capture')}")
    return rules


def _nft_udp(spec: RedirectSpec) -> list[str]:
    """The UDP filter chain's rules: exemptions, DNS, then log + reject (module doc)."""
    refuse = f'counter log prefix "{UDP_LOG_PREFIX}" reject {_nft_tag("udp-reject")}'
    # DNS by its original port: a query redirected to --dns-port no longer has dport 53,
    # and the output hook's oifname still names the route chosen before the redirect.
    dns = f"meta l4proto udp ct original proto-dst 53 return {_nft_tag('udp-dns')}"
    rules = [*_nft_exempt(spec), dns]
    for version, key in ((4, "ip"), (6, "ip6")):
        if version in spec.versions and (fake := spec.nets(spec.fake_ranges, version)):
            items = [str(net) for net in fake]
            rules.append(f"{key} daddr {_nft_set(items)} meta l4proto udp {refuse}")
    for purpose, nets in (("dmz", spec.dmz), ("exclude", spec.exclude)):
        for version, key in ((4, "ip"), (6, "ip6")):
            if version in spec.versions and (chosen := spec.nets(nets, version)):
                items = [str(net) for net in chosen]
                rules.append(
                    f"{key} daddr {_nft_set(items)} meta l4proto udp return {_nft_tag(purpose)}"
                )
    rules.append(f"meta l4proto udp {refuse}")
    return rules


def _nft_chain(name: str, hook: str, rules: list[str], purpose: str) -> list[str]:
    lines = [f"\tchain {name} {{", f'\t\tcomment "{TAG}/{purpose}"', f"\t\t{hook}"]
    lines += [f"\t\t{rule}" for rule in rules]
    lines.append("\t}")
    return lines


def nft_prelude() -> str:
    """Create-then-delete: removes pyegress's table in the same transaction whether or not
    it exists, which makes every apply a replacement (idempotent) and uninstall clean."""
    return f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"


def render_nft(spec: RedirectSpec) -> str:
    """The ``nft -f`` script that replaces pyegress's table with the rules of ``spec``."""
    nat_hook = "type nat hook output priority -100; policy accept;"
    chains: list[list[str]] = []
    if spec.mode == "redirect":
        rules = _nft_exempt(spec) + _nft_dns(spec)
        rules += _nft_capture(spec, f"redirect to :{spec.proxy_port}")
        chains.append(_nft_chain("output", nat_hook, rules, "output"))
    else:
        mark = f"{spec.tproxy_mark:#x}"
        if spec.dns_port is not None:
            rules = _nft_exempt(spec) + _nft_dns(spec)
            chains.append(_nft_chain("dns", nat_hook, rules, "dns"))
        rules = _nft_exempt(spec) + _nft_capture(spec, f"meta mark set {mark}")
        route_hook = "type route hook output priority mangle; policy accept;"
        chains.append(_nft_chain("steer", route_hook, rules, "steer"))
        port = spec.proxy_port
        tproxy = [
            f'iifname "lo" meta nfproto {proto} meta l4proto tcp meta mark {mark} '
            f"tproxy {key} to {addr}:{port} accept {_nft_tag('tproxy')}"
            for version, proto, key, addr in (
                (4, "ipv4", "ip", "127.0.0.1"),
                (6, "ipv6", "ip6", "[::1]"),
            )
            if version in spec.versions
        ]
        pre_hook = "type filter hook prerouting priority mangle; policy accept;"
        chains.append(_nft_chain("deliver", pre_hook, tproxy, "deliver"))
    if spec.udp == "reject":
        filter_hook = "type filter hook output priority filter; policy accept;"
        chains.append(_nft_chain("refuse_udp", filter_hook, _nft_udp(spec), "udp"))
    lines = [
        f"# {spec.comment} ({spec.mode}): nftables, apply with nft -f",
        nft_prelude().rstrip("\n"),
        f"table inet {NFT_TABLE} {{",
        f'\tcomment "{spec.comment}: managed by pyegress redirect install|uninstall"',
    ]
    for index, chain in enumerate(chains):
        if index:
            lines.append("")
        lines += chain
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- iptables ------------------------------------------------------------------------


def _ipt_tag(purpose: str) -> str:
    return f'-m comment --comment "{TAG}/{purpose}"'


def _ipt_exempt(spec: RedirectSpec, chain: str) -> list[str]:
    rules = [
        f"-A {chain} -m owner --uid-owner {uid} {_ipt_tag('owner-uid')} -j RETURN"
        for uid in spec.proxy_uids
    ]
    rules += [
        f"-A {chain} -m owner --gid-owner {gid} {_ipt_tag('owner-gid')} -j RETURN"
        for gid in spec.proxy_gids
    ]
    if spec.mark is not None:
        mark = f"{spec.mark:#x}"
        rules.append(f"-A {chain} -m mark --mark {mark}/{mark} {_ipt_tag('mark')} -j RETURN")
    rules.append(f"-A {chain} -o lo {_ipt_tag('loopback')} -j RETURN")
    return rules


def _ipt_dns(spec: RedirectSpec, chain: str) -> list[str]:
    if spec.dns_port is None:
        return []
    return [
        f"-A {chain} -p {proto} -m {proto} --dport 53 {_ipt_tag('dns')} "
        f"-j REDIRECT --to-ports {spec.dns_port}"
        for proto in ("udp", "tcp")
    ]


def _multiport_batches(ports: tuple[PortRange, ...]) -> list[str]:
    batches: list[list[PortRange]] = [[]]
    weight = 0
    for item in ports:
        cost = 1 if item[0] == item[1] else 2
        if weight + cost > _MULTIPORT_MAX:
            batches.append([])
            weight = 0
        batches[-1].append(item)
        weight += cost
    return [",".join(_port_text(tuple(batch), ":")) for batch in batches]


def _ipt_capture(spec: RedirectSpec, chain: str, version: int, action: str) -> list[str]:
    rules = [
        f"-A {chain} -d {net} -p tcp {_ipt_tag('fake-range')} {action}"
        for net in spec.nets(spec.fake_ranges, version)
    ]
    for purpose, nets in (("dmz", spec.dmz), ("exclude", spec.exclude)):
        rules += [
            f"-A {chain} -d {net} {_ipt_tag(purpose)} -j RETURN" for net in spec.nets(nets, version)
        ]
    if spec.ports is None:
        rules.append(f"-A {chain} -p tcp {_ipt_tag('capture')} {action}")
    else:
        rules += [
            f"-A {chain} -p tcp -m multiport --dports {batch} {_ipt_tag('capture')} {action}"
            for batch in _multiport_batches(spec.ports)
        ]
    return rules


def _ipt_udp(spec: RedirectSpec, chain: str, version: int) -> list[str]:
    """The UDP filter chain of one IP version: exemptions, DNS, log + reject."""
    unreachable = "icmp-port-unreachable" if version == 4 else "icmp6-port-unreachable"

    def refuse(match: str) -> list[str]:
        head = f"-A {chain}{match} -p udp {_ipt_tag('udp-reject')}"
        return [
            f'{head} -j LOG --log-prefix "{UDP_LOG_PREFIX}"',
            f"{head} -j REJECT --reject-with {unreachable}",
        ]

    rules = _ipt_exempt(spec, chain)
    rules.append(
        f"-A {chain} -p udp -m conntrack --ctorigdstport 53 {_ipt_tag('udp-dns')} -j RETURN"
    )
    for net in spec.nets(spec.fake_ranges, version):
        rules += refuse(f" -d {net}")
    for purpose, nets in (("dmz", spec.dmz), ("exclude", spec.exclude)):
        rules += [
            f"-A {chain} -d {net} -p udp {_ipt_tag(purpose)} -j RETURN"
            for net in spec.nets(nets, version)
        ]
    return rules + refuse("")


def _ipt_jump(builtin: str, chain: str) -> str:
    return f"-I {builtin} 1 {_ipt_tag('jump')} -j {chain}"


def _ipt_table(name: str, chains: list[str], rules: list[str]) -> list[str]:
    return [f"*{name}", *(f":{chain} - [0:0]" for chain in chains), *rules, "COMMIT"]


def render_iptables_family(spec: RedirectSpec, version: int) -> str:
    """The ``iptables-restore --noflush`` input of one IP version ("" when not captured)."""
    if version not in spec.versions:
        return ""
    out = f"{CHAIN_PREFIX}OUTPUT"
    tables: list[list[str]] = []
    if spec.mode == "redirect":
        rules = _ipt_exempt(spec, out) + _ipt_dns(spec, out)
        rules += _ipt_capture(spec, out, version, f"-j REDIRECT --to-ports {spec.proxy_port}")
        tables.append(_ipt_table("nat", [out], [*rules, _ipt_jump("OUTPUT", out)]))
    else:
        mark = f"{spec.tproxy_mark:#x}"
        pre = f"{CHAIN_PREFIX}PREROUTING"
        rules = _ipt_exempt(spec, out)
        rules += _ipt_capture(spec, out, version, f"-j MARK --set-xmark {mark}/0xffffffff")
        addr = "127.0.0.1" if version == 4 else "::1"
        rules.append(
            f"-A {pre} -i lo -p tcp -m mark --mark {mark} {_ipt_tag('tproxy')} "
            f"-j TPROXY --on-port {spec.proxy_port} --on-ip {addr} "
            f"--tproxy-mark {mark}/0xffffffff"
        )
        rules += [_ipt_jump("OUTPUT", out), _ipt_jump("PREROUTING", pre)]
        tables.append(_ipt_table("mangle", [out, pre], rules))
        if spec.dns_port is not None:
            dns = f"{CHAIN_PREFIX}DNS"
            rules = [*_ipt_exempt(spec, dns), *_ipt_dns(spec, dns), _ipt_jump("OUTPUT", dns)]
            tables.append(_ipt_table("nat", [dns], rules))
    if spec.udp == "reject":
        udp = f"{CHAIN_PREFIX}UDP"
        rules = [*_ipt_udp(spec, udp, version), _ipt_jump("OUTPUT", udp)]
        tables.append(_ipt_table("filter", [udp], rules))
    ip = "iptables" if version == 4 else "ip6tables"
    lines = [f"# {spec.comment} ({spec.mode}): IPv{version}, apply with {ip}-restore --noflush"]
    for table in tables:
        lines += table
    return "\n".join(lines) + "\n"


def render_iptables(spec: RedirectSpec) -> tuple[str, str]:
    """``(ipv4, ipv6)`` ``iptables-restore --noflush`` inputs; the IPv6 one is ``""`` when
    IPv6 is not captured. They add pyegress's chains and jumps to a clean ruleset; the
    installer prefixes the removal of what an earlier install left (:func:`ipt_cleanup`)."""
    return render_iptables_family(spec, 4), render_iptables_family(spec, 6)


def ipt_cleanup(saved: str) -> dict[str, list[str]]:
    """From ``iptables-save`` text, per table, the restore lines that remove every
    pyegress chain and the jumps into them (nothing for a table without them)."""
    table = ""
    found: dict[str, list[str]] = {}
    chains: dict[str, list[str]] = {}
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(f":{CHAIN_PREFIX}"):
            chains.setdefault(table, []).append(line[1:].split()[0])
        elif line.startswith("-A "):
            builtin, _, rest = line[3:].partition(" ")
            if not builtin.startswith(CHAIN_PREFIX) and f"-j {CHAIN_PREFIX}" in f" {rest}":
                found.setdefault(table, []).append(f"-D {builtin} {rest}")
    out: dict[str, list[str]] = {}
    for name in dict.fromkeys([*found, *chains]):
        mine = chains.get(name, [])
        out[name] = (
            found.get(name, []) + [f"-F {chain}" for chain in mine] + [f"-X {c}" for c in mine]
        )
    return out
