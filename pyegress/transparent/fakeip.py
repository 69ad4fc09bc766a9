"""Names behind synthetic addresses: the table the DNS listener fills and the redirect
listener reads.

In a closed network an application's lookup of an outside name fails before any
connection exists. The sidecar's DNS listener answers such a name with an address from
a reserved range (``198.18.0.0/15`` by default, and an IPv6 range) and remembers which
name it handed out; the application connects to that address, the firewall redirects
the connection to the redirect listener, and the listener turns the address back into
the name. Both listeners live in one process and share one :class:`FakeNames` per
engine (:func:`register`, :func:`lookup`).

Each family's pool is an LRU table bounded by ``size`` entries. An entry lives ``keep``
seconds after its last use (an answer or a connection) and is then forgotten; when the
table is full the least recently used entry goes first. Addresses are handed out by a
cursor that walks the whole range before coming back, so an address forgotten a moment
ago is the last one to be given to another name.
"""

from __future__ import annotations

import ipaddress
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_RANGE = "198.18.0.0/15"
DEFAULT_RANGE6 = "fc00:ffff::/96"
DEFAULT_SIZE = 65536
DEFAULT_KEEP = 600.0


class Pool:
    """One family's range: name <-> address, LRU-bounded, entries expire ``keep``
    seconds after their last use."""

    def __init__(
        self, network: Network, size: int, keep: float, clock: Callable[[], float]
    ) -> None:
        self.network = network
        first, last = 1, network.num_addresses - 1  # skip the all-zeros address
        if network.version == 4 and network.num_addresses > 2:
            last -= 1  # and IPv4's all-ones
        if last - first < 1:
            raise ValueError(f"range {network} is too small")
        self._first, self._count = first, last - first + 1
        self.size = max(1, min(size, self._count - 1))
        self.keep = keep
        self._clock = clock
        self._cursor = 0
        self._names: OrderedDict[str, tuple[int, float]] = OrderedDict()  # name -> (offset, used)
        self._offsets: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, address: Address) -> bool:
        return address.version == self.network.version and address in self.network

    def _expire(self, now: float) -> None:
        while self._names:
            name, (offset, used) = next(iter(self._names.items()))
            if now - used < self.keep and len(self._names) < self.size:
                break
            del self._names[name]
            del self._offsets[offset]

    def address_for(self, name: str) -> Address:
        """The address of ``name``: the one it has, else a new one."""
        now = self._clock()
        found = self._names.get(name)
        if found is not None and now - found[1] < self.keep:
            self._names[name] = (found[0], now)
            self._names.move_to_end(name)
            return self.network[found[0]]
        if found is not None:
            del self._names[name]
            del self._offsets[found[0]]
        self._expire(now)
        while True:
            offset = self._first + self._cursor
            self._cursor = (self._cursor + 1) % self._count
            if offset not in self._offsets:
                break
        self._names[name] = (offset, now)
        self._offsets[offset] = name
        return self.network[offset]

    def name_for(self, address: Address) -> str | None:
        """The name behind ``address`` (its use refreshed), None when unknown or
        expired."""
        if address not in self:
            return None
        offset = int(address) - int(self.network.network_address)
        name = self._offsets.get(offset)
        if name is None:
            return None
        now = self._clock()
        _, used = self._names[name]
        if now - used >= self.keep:
            del self._names[name]
            del self._offsets[offset]
            return None
        self._names[name] = (offset, now)
        self._names.move_to_end(name)
        return name


class FakeNames:
    """The IPv4 and IPv6 pools of one DNS listener."""

    def __init__(
        self,
        v4: Network | None,
        v6: Network | None,
        *,
        size: int = DEFAULT_SIZE,
        keep: float = DEFAULT_KEEP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if v4 is not None and v4.version != 4:
            raise ValueError(f"range {v4} is not IPv4")
        if v6 is not None and v6.version != 6:
            raise ValueError(f"range6 {v6} is not IPv6")
        self.v4 = Pool(v4, size, keep, clock) if v4 is not None else None
        self.v6 = Pool(v6, size, keep, clock) if v6 is not None else None

    def address_for(self, name: str, version: int) -> Address | None:
        pool = self.v4 if version == 4 else self.v6
        return pool.address_for(name) if pool is not None else None

    def covers(self, address: Address) -> bool:
        return any(pool is not None and address in pool for pool in (self.v4, self.v6))

    def name_for(self, address: Address) -> str | None:
        for pool in (self.v4, self.v6):
            if pool is not None and address in pool:
                return pool.name_for(address)
        return None


# One list of tables per engine (normally one DNS listener, so one table).
_TABLES: weakref.WeakKeyDictionary[Any, list[FakeNames]] = weakref.WeakKeyDictionary()


def register(owner: Any, table: FakeNames) -> None:
    """Make ``table`` visible to the redirect listeners of ``owner`` (the engine)."""
    _TABLES.setdefault(owner, []).append(table)


def unregister(owner: Any, table: FakeNames) -> None:
    tables = _TABLES.get(owner)
    if tables is not None and table in tables:
        tables.remove(table)


def lookup(owner: Any, address: Address) -> tuple[bool, str | None]:
    """(whether ``address`` is a synthetic one of ``owner``'s DNS listeners, the name
    behind it or None when it is unknown or expired)."""
    for table in _TABLES.get(owner, ()):
        if table.covers(address):
            return True, table.name_for(address)
    return False, None
