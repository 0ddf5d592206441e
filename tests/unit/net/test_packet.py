"""Packet views: parsing, in-place rewrites with incremental checksums, and reset generation."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.net.packet import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    PacketView,
    build_packet,
    checksum_adjust,
    internet_checksum,
    ones_complement_sum,
    tcp_reset_for,
)

A4 = ipaddress.IPv4Address("198.18.0.1").packed
B4 = ipaddress.IPv4Address("198.18.0.10").packed
A6 = ipaddress.IPv6Address("2001:2::1").packed
B6 = ipaddress.IPv6Address("2001:2::10").packed

ports = st.integers(min_value=1, max_value=65535)
v4 = st.binary(min_size=4, max_size=4)
v6 = st.binary(min_size=16, max_size=16)
protos = st.sampled_from([IPPROTO_TCP, IPPROTO_UDP])


def _view(packet: bytearray) -> PacketView:
    view = PacketView()
    assert view.parse(packet, len(packet))
    return view


def _naive_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@settings(max_examples=60)
@given(st.binary(max_size=3000))
def test_checksum_matches_the_word_by_word_definition(data: bytes) -> None:
    assert internet_checksum(data) == _naive_checksum(data)


def test_checksum_known_answer_rfc1071() -> None:
    # RFC 1071 §3 example: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert ones_complement_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2


@settings(max_examples=60)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=40))
def test_incremental_update_verifies_like_recomputation(word_old: int, word_new: int, rest: bytes) -> None:
    data = bytearray(rest[: len(rest) // 2 * 2] + struct.pack("!H", word_old))
    adjusted = checksum_adjust(internet_checksum(data), word_old, word_new)
    data[-2:] = struct.pack("!H", word_new)
    # A checksum is right when data + checksum sums to all ones; an end-around-carry sum is 0 only when
    # every word is 0, where +0 and -0 are the same number.
    assert ones_complement_sum(data + struct.pack("!H", adjusted)) in (0xFFFF, 0)


@settings(max_examples=60)
@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), protos, ports, ports, st.binary(max_size=200))
def test_built_packets_parse_back(
    addrs: tuple[bytes, bytes], proto: int, sport: int, dport: int, payload: bytes
) -> None:
    packet = build_packet(addrs[0], addrs[1], proto, sport, dport, payload)
    view = _view(packet)
    assert (view.src_addr, view.dst_addr, view.proto) == (addrs[0], addrs[1], proto)
    assert view.ports() == (sport, dport)
    assert view.payload_len == len(payload)
    assert view.checksums_valid()
    assert not view.fragment


@settings(max_examples=60)
@given(
    st.one_of(st.tuples(v4, v4, v4), st.tuples(v6, v6, v6)),
    protos,
    ports,
    ports,
    ports,
    st.binary(max_size=100),
)
def test_hairpin_rewrite_keeps_checksums_valid(
    addrs: tuple[bytes, bytes, bytes], proto: int, sport: int, dport: int, new_port: int, payload: bytes
) -> None:
    packet = build_packet(addrs[0], addrs[1], proto, sport, dport, payload)
    view = _view(packet)
    view.swap_addresses()
    view.set_dst_port(new_port)
    view.set_src_port(new_port ^ 0x5555 or 1)
    view.set_src_addr(addrs[2])
    assert view.dst_addr == addrs[0] and view.src_addr == addrs[2]
    assert view.ports() == (new_port ^ 0x5555 or 1, new_port)
    assert view.checksums_valid()


def test_ipv4_udp_without_checksum_stays_without() -> None:
    packet = build_packet(A4, B4, IPPROTO_UDP, 1000, 53, b"q")
    packet[26:28] = b"\0\0"
    view = _view(packet)
    view.set_dst_port(15002)
    assert packet[26:28] == b"\0\0"
    assert view.checksums_valid()


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_garbage_never_raises(data: bytes) -> None:
    view = PacketView()
    if view.parse(bytearray(data), len(data)) and view.has_ports:
        view.ports()
        view.checksums_valid()


@settings(max_examples=100)
@given(st.binary(min_size=1, max_size=60), st.integers(0, 59))
def test_truncated_packets_are_rejected(payload: bytes, cut: int) -> None:
    packet = build_packet(A4, B4, IPPROTO_TCP, 1, 2, payload)
    assert not PacketView().parse(packet[: min(cut, 39)], min(cut, 39))


def test_ipv4_fragments_are_flagged_and_later_ones_have_no_ports() -> None:
    first = build_packet(A4, B4, IPPROTO_UDP, 1000, 53, b"x" * 16)
    first[6:8] = struct.pack("!H", 0x2000)  # MF set, offset 0
    view = _view(first)
    assert view.fragment and view.has_ports and view.dst_port == 53
    later = bytearray(first)
    later[6:8] = struct.pack("!H", 0x0002)  # offset 16 bytes, last fragment
    view = _view(later)
    assert view.fragment and not view.has_ports


def test_ipv6_fragment_header_is_walked() -> None:
    base = build_packet(A6, B6, IPPROTO_UDP, 1000, 53, b"x" * 8)
    frag_hdr = struct.pack("!BBHI", IPPROTO_UDP, 0, 1, 7)  # offset 0, M flag
    packet = bytearray(base[:40] + frag_hdr + base[40:])
    packet[6] = 44
    packet[4:6] = struct.pack("!H", len(packet) - 40)
    view = _view(packet)
    assert view.fragment and view.has_ports and view.ports() == (1000, 53)
    packet[40 + 2 : 40 + 4] = struct.pack("!H", 8 << 3)  # offset 8 units, no M flag
    view = _view(packet)
    assert view.fragment and not view.has_ports and view.proto == IPPROTO_UDP


def test_reset_for_a_syn_acknowledges_it() -> None:
    syn = build_packet(A4, B4, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN, seq=1000)
    rst = _view(tcp_reset_for(_view(syn)))
    assert (rst.src_addr, rst.dst_addr, rst.ports()) == (B4, A4, (80, 40000))
    assert rst.tcp_flags == TCP_RST | TCP_ACK and rst.tcp_ack == 1001
    assert rst.checksums_valid()


def test_reset_for_an_ack_uses_its_ack_number() -> None:
    data = build_packet(A6, B6, IPPROTO_TCP, 40000, 80, b"GET", tcp_flags=TCP_ACK, seq=5, ack=777)
    rst = _view(tcp_reset_for(_view(data)))
    assert rst.tcp_flags == TCP_RST and rst.tcp_seq == 777
    assert rst.checksums_valid()
