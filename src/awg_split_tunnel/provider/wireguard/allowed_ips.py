"""AllowedIPs: WireGuard's cryptokey routing table (longest-prefix match, IPv4 and IPv6).

Sending, the destination of a packet picks the peer; receiving, the source of a decrypted packet must map
back to the peer it came from. A prefix belongs to at most one peer: inserting it for another peer moves
it, as in wireguard-go. Lookups hash the address masked to each prefix length in use, longest first, so
their cost grows with the number of distinct lengths (a handful in real configs), not with the table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")
_CACHE_LIMIT = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Family(Generic[V]):
    """One address family: a dict per prefix length, lengths kept sorted longest first."""

    __slots__ = ("bits", "lengths", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, V]] = {}
        self.lengths: tuple[int, ...] = ()

    def insert(self, prefix: int, length: int, value: V) -> None:
        table = self.tables.get(length)
        if table is None:
            table = self.tables[length] = {}
            self.lengths = tuple(sorted(self.tables, reverse=True))
        table[prefix >> (self.bits - length)] = value

    def remove(self, prefix: int, length: int) -> V | None:
        table = self.tables.get(length)
        if table is None:
            return None
        value = table.pop(prefix >> (self.bits - length), None)
        if not table:
            del self.tables[length]
            self.lengths = tuple(sorted(self.tables, reverse=True))
        return value

    def lookup(self, address: int) -> V | None:
        bits = self.bits
        tables = self.tables
        for length in self.lengths:
            value = tables[length].get(address >> (bits - length))
            if value is not None:
                return value
        return None

    def items(self) -> Iterator[tuple[int, int, V]]:
        for length in self.lengths:
            shift = self.bits - length
            for key, value in self.tables[length].items():
                yield key << shift, length, value


class AllowedIPs(Generic[V]):
    """Longest-prefix-match table from IP prefixes to peers (any hashable value)."""

    __slots__ = ("_cache", "_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[V] = _Family(32)
        self._v6: _Family[V] = _Family(128)
        # Packed address → result of the packet lookups; a flow's packets repeat the same few addresses,
        # so most lookups on the data path are one slice and one dict hit. Cleared on every change.
        self._cache: dict[bytes, V | None] = {}

    def insert(self, network: Network | str, value: V) -> None:
        """Map `network` to `value`, replacing whoever held exactly that prefix. Host bits are ignored
        (wg does the same: 10.0.0.1/24 means 10.0.0.0/24)."""
        net = _network(network)
        family = self._v4 if net.version == 4 else self._v6
        family.insert(int(net.network_address), net.prefixlen, value)
        self._cache.clear()

    def remove(self, network: Network | str) -> V | None:
        """Remove exactly this prefix; returns the value it had, or None."""
        net = _network(network)
        family = self._v4 if net.version == 4 else self._v6
        self._cache.clear()
        return family.remove(int(net.network_address), net.prefixlen)

    def remove_value(self, value: V) -> int:
        """Remove every prefix that maps to `value` (a peer being removed); returns how many."""
        doomed = [net for net, v in self.items() if v == value]
        for net in doomed:
            self.remove(net)
        return len(doomed)

    def lookup(self, address: Address | str | bytes) -> V | None:
        """The value of the longest prefix containing `address` (4 or 16 packed bytes, text or object)."""
        if isinstance(address, bytes):
            if len(address) == 4:
                return self._v4.lookup(int.from_bytes(address, "big"))
            if len(address) == 16:
                return self._v6.lookup(int.from_bytes(address, "big"))
            raise ValueError(f"packed address must be 4 or 16 bytes, got {len(address)}")
        addr = ipaddress.ip_address(address)
        family = self._v4 if addr.version == 4 else self._v6
        return family.lookup(int(addr))

    def lookup_v4(self, address: int) -> V | None:
        """Hot-path lookup of an IPv4 address given as an int."""
        return self._v4.lookup(address)

    def lookup_v6(self, address: int) -> V | None:
        """Hot-path lookup of an IPv6 address given as an int."""
        return self._v6.lookup(address)

    def lookup_destination(self, packet: bytes | bytearray | memoryview) -> V | None:
        """Peer for an IP packet's destination address; None for anything that is not IPv4/IPv6."""
        n = len(packet)
        if n >= 20 and packet[0] >> 4 == 4:
            return self._cached(bytes(packet[16:20]))
        if n >= 40 and packet[0] >> 4 == 6:
            return self._cached(bytes(packet[24:40]))
        return None

    def lookup_source(self, packet: bytes | bytearray | memoryview) -> V | None:
        """Peer for an IP packet's source address; None for anything that is not IPv4/IPv6."""
        n = len(packet)
        if n >= 20 and packet[0] >> 4 == 4:
            return self._cached(bytes(packet[12:16]))
        if n >= 40 and packet[0] >> 4 == 6:
            return self._cached(bytes(packet[8:24]))
        return None

    def lookup_destinations(self, packets: Sequence[bytes | bytearray | memoryview]) -> list[V | None]:
        """`lookup_destination` of each packet in one call; a run of packets to one address is looked up
        once."""
        return self._lookup_each(packets, 16, 24)

    def lookup_sources(self, packets: Sequence[bytes | bytearray | memoryview]) -> list[V | None]:
        """`lookup_source` of each packet in one call; a run of packets from one address is looked up
        once."""
        return self._lookup_each(packets, 12, 8)

    def _lookup_each(
        self, packets: Sequence[bytes | bytearray | memoryview], v4_at: int, v6_at: int
    ) -> list[V | None]:
        out: list[V | None] = []
        append = out.append
        cached = self._cached
        last: bytes | bytearray | memoryview | None = None
        value: V | None = None
        for packet in packets:
            n = len(packet)
            version = packet[0] >> 4 if n else 0
            if version == 4 and n >= 20:
                address = packet[v4_at : v4_at + 4]
            elif version == 6 and n >= 40:
                address = packet[v6_at : v6_at + 16]
            else:
                append(None)
                continue
            if address != last:
                last = address
                value = cached(bytes(address))
            append(value)
        return out

    def _cached(self, packed: bytes) -> V | None:
        cache = self._cache
        try:
            return cache[packed]
        except KeyError:
            pass
        family = self._v4 if len(packed) == 4 else self._v6
        value = family.lookup(int.from_bytes(packed, "big"))
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()  # a scan of many addresses must not grow memory without bound
        cache[packed] = value
        return value

    def items(self) -> list[tuple[Network, V]]:
        """Every (prefix, value), IPv4 first, longest prefixes first within a family."""
        out: list[tuple[Network, V]] = []
        for prefix, length, value in self._v4.items():
            out.append((ipaddress.IPv4Network((prefix, length)), value))
        for prefix, length, value in self._v6.items():
            out.append((ipaddress.IPv6Network((prefix, length)), value))
        return out

    def networks_of(self, value: V) -> list[Network]:
        """The prefixes that map to `value`."""
        return [net for net, v in self.items() if v == value]

    def __len__(self) -> int:
        return sum(len(t) for t in self._v4.tables.values()) + sum(len(t) for t in self._v6.tables.values())


def _network(network: Network | str) -> Network:
    if isinstance(network, str):
        return ipaddress.ip_network(network, strict=False)
    return network
