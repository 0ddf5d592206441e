"""AllowedIPs picks the peer of the longest matching prefix, both ways, for IPv4 and IPv6."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.wireguard.allowed_ips import AllowedIPs


def _ipv4_packet(src: str, dst: str) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, b"\0" * 4, b"\0" * 4)
    packet = bytearray(header)
    packet[12:16] = ipaddress.IPv4Address(src).packed
    packet[16:20] = ipaddress.IPv4Address(dst).packed
    return bytes(packet)


def _ipv6_packet(src: str, dst: str) -> bytes:
    packet = bytearray(40)
    packet[0] = 0x60
    packet[8:24] = ipaddress.IPv6Address(src).packed
    packet[24:40] = ipaddress.IPv6Address(dst).packed
    return bytes(packet)


def test_longest_prefix_wins_over_default_route() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("0.0.0.0/0", "exit")
    table.insert("198.19.0.0/24", "office")
    table.insert("198.19.0.7/32", "printer")
    assert table.lookup("198.19.0.7") == "printer"
    assert table.lookup("198.19.0.8") == "office"
    assert table.lookup("8.8.8.8") == "exit"
    assert table.lookup("2001:2::1") is None


def test_ipv6_and_ipv4_are_separate() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("::/0", "v6-exit")
    table.insert("2001:2::/48", "lab")
    assert table.lookup("2001:2::5") == "lab"
    assert table.lookup("2001:db8::1") == "v6-exit"
    assert table.lookup("198.18.0.1") is None


def test_same_prefix_for_another_peer_moves_it() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("198.19.0.0/24", "a")
    table.insert("198.19.0.0/24", "b")
    assert table.lookup("198.19.0.1") == "b"
    assert len(table) == 1


def test_host_bits_are_ignored_like_wg() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("198.19.0.77/24", "a")
    assert table.networks_of("a") == [ipaddress.ip_network("198.19.0.0/24")]


def test_removing_a_peer_removes_all_its_prefixes() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("198.19.0.0/24", "a")
    table.insert("2001:2::/48", "a")
    table.insert("198.18.0.0/24", "b")
    assert table.remove_value("a") == 2
    assert table.lookup("198.19.0.1") is None
    assert table.lookup("2001:2::1") is None
    assert table.lookup("198.18.0.1") == "b"


def test_packet_source_and_destination_lookups() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("198.19.0.0/24", "tunnel")
    table.insert("2001:2::/64", "tunnel6")
    assert table.lookup_destination(_ipv4_packet("198.18.0.1", "198.19.0.9")) == "tunnel"
    assert table.lookup_source(_ipv4_packet("198.18.0.1", "198.19.0.9")) is None
    assert table.lookup_source(_ipv6_packet("2001:2::9", "2001:2:1::1")) == "tunnel6"
    assert table.lookup_destination(_ipv6_packet("2001:2::9", "2001:2:1::1")) is None
    assert table.lookup_destination(b"\x00" * 40) is None
    assert table.lookup_destination(b"\x45") is None


def test_packed_address_must_have_an_address_length() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    with pytest.raises(ValueError):
        table.lookup(b"\x01\x02\x03")


_v4_networks = st.builds(
    lambda addr, length: ipaddress.IPv4Network((addr, length), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(st.tuples(_v4_networks, st.integers(0, 5)), max_size=12),
    probes=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
)
def test_lookup_matches_a_linear_scan(
    entries: list[tuple[ipaddress.IPv4Network, int]], probes: list[int]
) -> None:
    table: AllowedIPs[int] = AllowedIPs()
    reference: dict[ipaddress.IPv4Network, int] = {}
    for net, peer in entries:
        table.insert(net, peer)
        reference[net] = peer
    # Probe addresses inside the prefixes too, not only random ones.
    addresses = [ipaddress.IPv4Address(p) for p in probes] + [net.network_address for net, _ in entries]
    for addr in addresses:
        matching = [net for net in reference if addr in net]
        expected = reference[max(matching, key=lambda n: n.prefixlen)] if matching else None
        assert table.lookup(addr) == expected
        assert table.lookup(addr.packed) == expected
    assert len(table) == len(reference)
    assert sorted(table.items(), key=str) == sorted(reference.items(), key=str)


def test_changes_take_effect_for_packets_already_seen() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("198.19.0.0/24", "a")
    packet = _ipv4_packet("198.18.0.1", "198.19.0.9")
    assert table.lookup_destination(packet) == "a"
    table.insert("198.19.0.9/32", "b")
    assert table.lookup_destination(packet) == "b"
    table.remove("198.19.0.9/32")
    table.remove("198.19.0.0/24")
    assert table.lookup_destination(packet) is None
