"""Segmentation of oversize TCP packets and MSS clamping, checked against plain full recomputations."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tun_stack import NEEDS_ROOT, read_packet, tun_in_netns

from awg_split_tunnel.lab.netns import call_in_netns
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, PacketView
from awg_split_tunnel.net.segment import (
    ClampResult,
    Rejected,
    clamp_mss,
    clamp_mss_packet,
    mss_for_mtu,
    segment_tcp,
)

A4 = ipaddress.IPv4Address("198.18.0.1").packed
B4 = ipaddress.IPv4Address("198.19.7.9").packed
A6 = ipaddress.IPv6Address("2001:2::1").packed
B6 = ipaddress.IPv6Address("2001:2:0:1::9").packed

FIN, SYN, RST, PSH, ACK, CWR, ECE = 0x01, 0x02, 0x04, 0x08, 0x10, 0x80, 0x40
TIMESTAMPS = bytes([1, 1, 8, 10]) + struct.pack("!II", 0x01020304, 0x05060708)


# -- a tiny independent packet builder and checker ------------------------------------------------------


def naive_checksum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 word by word, as the RFC writes it."""
    if len(data) % 2:
        data += b"\0"
    total: int = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        raw = src + dst + struct.pack("!BBH", 0, proto, length)
    else:
        raw = src + dst + struct.pack("!IxxxB", length, proto)
    return sum(struct.unpack(f"!{len(raw) // 2}H", raw))


def tcp_packet(
    src: bytes,
    dst: bytes,
    payload: bytes = b"",
    *,
    seq: int = 1000,
    ack: int = 77,
    ports: tuple[int, int] = (40000, 443),
    flags: int = ACK,
    options: bytes = b"",
    ip_options: bytes = b"",
    ident: int = 0x1234,
    tcp_checksum: int | None = None,
) -> bytearray:
    """An IPv4/IPv6 TCP packet with every checksum computed here, independently of the code under test."""
    assert len(options) % 4 == 0 and len(ip_options) % 4 == 0
    doff = (20 + len(options)) // 4
    tcp = bytearray(struct.pack("!HHIIBBHHH", *ports, seq, ack, doff << 4, flags, 65535, 0, 0) + options)
    tcp += payload
    csum = naive_checksum(bytes(tcp), pseudo(src, dst, IPPROTO_TCP, len(tcp)))
    struct.pack_into("!H", tcp, 16, csum if tcp_checksum is None else tcp_checksum)
    if len(src) == 4:
        ihl = 20 + len(ip_options)
        hdr = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + len(tcp), ident, 0x4000, 64, 6, 0, src, dst
            )
        )
        hdr += ip_options
        struct.pack_into("!H", hdr, 10, naive_checksum(bytes(hdr)))
    else:
        hdr = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(tcp), IPPROTO_TCP, 64, src, dst))
    return hdr + tcp


def headers_of(packet: bytes | bytearray) -> tuple[int, int]:
    """(offset of the TCP header, offset of the payload)."""
    l4 = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    return l4, l4 + (packet[l4 + 12] >> 4) * 4


def assert_valid(packet: bytes | bytearray) -> None:
    """Every length and checksum of ``packet`` verifies by full recomputation."""
    data = bytes(packet)
    l4, _ = headers_of(data)
    if data[0] >> 4 == 4:
        assert struct.unpack_from("!H", data, 2)[0] == len(data)
        assert naive_checksum(data[:l4]) == 0, "IPv4 header checksum"
        src, dst = data[12:16], data[16:20]
    else:
        assert struct.unpack_from("!H", data, 4)[0] == len(data) - 40
        src, dst = data[8:24], data[24:40]
    assert naive_checksum(data[l4:], pseudo(src, dst, IPPROTO_TCP, len(data) - l4)) == 0, "TCP checksum"


def canonical(packet: bytes | bytearray) -> bytearray:
    """``packet`` with its IPv4 header and TCP checksums recomputed word by word from zeroed fields."""
    out = bytearray(packet)
    l4, _ = headers_of(out)
    if out[0] >> 4 == 4:
        struct.pack_into("!H", out, 10, 0)
        struct.pack_into("!H", out, 10, naive_checksum(bytes(out[:l4])))
        src, dst = bytes(out[12:16]), bytes(out[16:20])
    else:
        src, dst = bytes(out[8:24]), bytes(out[24:40])
    struct.pack_into("!H", out, l4 + 16, 0)
    csum = naive_checksum(bytes(out[l4:]), pseudo(src, dst, IPPROTO_TCP, len(out) - l4))
    struct.pack_into("!H", out, l4 + 16, csum)
    return out


def field(packet: bytes | bytearray, fmt: str, off: int) -> int:
    return int(struct.unpack_from(fmt, packet, off)[0])


# -- segmentation ---------------------------------------------------------------------------------------


def test_ipv4_super_packet_becomes_mtu_sized_segments() -> None:
    payload = bytes(range(256)) * 16  # 4096 bytes
    packet = tcp_packet(A4, B4, payload, seq=5000, flags=ACK | PSH | FIN | CWR, options=TIMESTAMPS)
    segments = segment_tcp(packet, 1500)
    assert isinstance(segments, list)
    # 20 IP + 32 TCP (with timestamps) leave 1448 bytes of payload per 1500-byte packet.
    assert [len(s) for s in segments] == [1500, 1500, 52 + 4096 - 2 * 1448]
    for i, seg in enumerate(segments):
        assert_valid(seg)
        l4, data = headers_of(seg)
        assert field(seg, "!H", 4) == 0x1234 + i, "IPv4 id increments per segment"
        assert field(seg, "!H", 6) == 0x4000, "DF kept"
        assert field(seg, "!I", l4 + 4) == 5000 + i * 1448
        assert field(seg, "!I", l4 + 8) == 77, "ACK number unchanged"
        assert seg[l4 + 20 : data] == TIMESTAMPS, "options copied to every segment"
    assert [s[20 + 13] for s in segments] == [ACK | CWR, ACK, ACK | PSH | FIN]
    assert b"".join(bytes(s[52:]) for s in segments) == payload


def test_ipv6_super_packet_becomes_mtu_sized_segments() -> None:
    payload = bytes(range(251)) * 40  # 10040 bytes
    packet = tcp_packet(A6, B6, payload, seq=0xFFFFF000, flags=ACK | PSH | ECE | CWR)
    segments = segment_tcp(packet, 1420)
    assert isinstance(segments, list)
    mss = 1420 - 60
    assert len(segments) == -(-len(payload) // mss)
    for i, seg in enumerate(segments):
        assert_valid(seg)
        assert len(seg) <= 1420
        # The sequence number wraps around 2**32 in the middle of the run.
        assert field(seg, "!I", 44) == (0xFFFFF000 + i * mss) & 0xFFFFFFFF
        assert seg[40 + 13] & ECE, "ECE stays on every segment"
        assert bool(seg[40 + 13] & CWR) == (i == 0)
        assert bool(seg[40 + 13] & PSH) == (i == len(segments) - 1)
    assert b"".join(bytes(s[60:]) for s in segments) == payload


def test_64k_packet_with_a_partial_checksum_segments_with_fresh_checksums() -> None:
    payload = bytes(65535 - 40)
    # Offloaded packets carry only the pseudo-header sum in the TCP checksum field; it must be ignored.
    packet = tcp_packet(A4, B4, payload, tcp_checksum=0xBEEF)
    segments = segment_tcp(packet, 1420)
    assert isinstance(segments, list)
    assert len(segments) == -(-len(payload) // 1380)
    for seg in segments:
        assert_valid(seg)


def test_a_segment_whose_checksum_is_zero_gets_zero_not_all_ones() -> None:
    # Choose the first segment's last payload word so that its TCP sum is 0xFFFF: the checksum is 0.
    head = bytes(range(98)) + b"\0\0"
    probe = tcp_packet(A4, B4, head, seq=1000, flags=ACK)
    probe[36:38] = b"\0\0"
    partial = ~naive_checksum(bytes(probe[20:]), pseudo(A4, B4, IPPROTO_TCP, 120)) & 0xFFFF
    head = head[:98] + struct.pack("!H", 0xFFFF - partial)
    segments = segment_tcp(tcp_packet(A4, B4, head + bytes(range(100)), seq=1000, flags=ACK | PSH), 140)
    assert isinstance(segments, list) and len(segments) == 2
    assert segments[0][36:38] == b"\0\0"
    assert segments[0] == canonical(segments[0])


def test_ip_options_are_copied_to_every_segment() -> None:
    router_alert = bytes([148, 4, 0, 0])
    packet = tcp_packet(A4, B4, bytes(3000), ip_options=router_alert)
    segments = segment_tcp(packet, 1000)
    assert isinstance(segments, list)
    for seg in segments:
        assert seg[0] == 0x46 and seg[20:24] == router_alert
        assert_valid(seg)
    assert sum(len(s) - 44 for s in segments) == 3000


def test_packet_that_fits_comes_back_unchanged() -> None:
    packet = tcp_packet(A4, B4, b"hello" * 20, flags=ACK | PSH | FIN)
    assert segment_tcp(packet, 1500) == [packet]
    assert segment_tcp(bytes(packet), len(packet)) == [packet]


def test_ethernet_padding_after_the_ip_packet_is_not_payload() -> None:
    packet = tcp_packet(A4, B4, bytes(2000))
    segments = segment_tcp(bytes(packet) + b"\xaa" * 6, 1500)
    assert isinstance(segments, list)
    assert sum(len(s) - 40 for s in segments) == 2000
    assert all(b"\xaa" not in bytes(s) for s in segments)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", Rejected.MALFORMED),
        (bytes(tcp_packet(A4, B4, bytes(3000)))[:19], Rejected.MALFORMED),  # truncated IP header
        (b"\x44" + bytes(tcp_packet(A4, B4, bytes(3000)))[1:], Rejected.MALFORMED),  # IHL 4 < 5
        (b"\x4f" + bytes(tcp_packet(A4, B4, bytes(30)))[1:], Rejected.MALFORMED),  # IHL 60 > packet
        (bytes(tcp_packet(A4, B4, bytes(3000)))[:1000], Rejected.MALFORMED),  # total length > buffer
        (bytes(tcp_packet(A6, B6, bytes(3000)))[:39], Rejected.MALFORMED),
        (b"\x75" + bytes(60), Rejected.MALFORMED),  # IP version 7
    ],
)
def test_malformed_packets_are_rejected(packet: bytes, reason: Rejected) -> None:
    assert segment_tcp(packet, 1280) is reason


def test_tcp_data_offset_overflowing_the_packet_is_rejected() -> None:
    packet = tcp_packet(A4, B4)  # 40 bytes, no payload
    packet[20 + 12] = 0xF0  # data offset 60 bytes: options run past the end
    assert segment_tcp(packet, 68) is Rejected.MALFORMED
    packet[20 + 12] = 0x40  # data offset 16 < 20
    assert segment_tcp(packet, 68) is Rejected.MALFORMED


def test_non_tcp_fragments_and_headers_filling_the_mtu_are_rejected() -> None:
    udp = tcp_packet(A4, B4, bytes(3000))
    udp[9] = IPPROTO_UDP
    assert segment_tcp(udp, 1500) is Rejected.NOT_TCP
    fragment = tcp_packet(A4, B4, bytes(3000))
    struct.pack_into("!H", fragment, 6, 0x2000)  # MF
    assert segment_tcp(fragment, 1500) is Rejected.FRAGMENT
    fat = tcp_packet(A4, B4, bytes(100), options=bytes([1]) * 40, ip_options=bytes([1]) * 40)
    assert segment_tcp(fat, 120) is Rejected.NO_ROOM


def test_oversize_syn_is_rejected() -> None:
    # SYN data (TCP Fast Open) must fit as it is: a SYN on every segment would open the connection anew.
    assert segment_tcp(tcp_packet(A4, B4, bytes(3000), flags=SYN), 1500) is Rejected.SYN


def test_ipv6_extension_headers_are_kept_and_fragments_rejected() -> None:
    plain = tcp_packet(A6, B6, bytes(range(250)) * 12, flags=ACK | PSH)
    # Insert a hop-by-hop options header (8 bytes of PadN) between the IPv6 and TCP headers.
    hop_by_hop = bytes([IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0])
    packet = bytearray(plain[:40] + hop_by_hop + plain[40:])
    packet[6] = 0
    struct.pack_into("!H", packet, 4, len(packet) - 40)
    segments = segment_tcp(packet, 1280)
    assert isinstance(segments, list) and len(segments) == 3
    for seg in segments:
        assert len(seg) <= 1280 and seg[40:48] == hop_by_hop
        assert field(seg, "!H", 4) == len(seg) - 40
        tcp = bytes(seg[48:])
        assert naive_checksum(tcp, pseudo(A6, B6, IPPROTO_TCP, len(tcp))) == 0
    assert b"".join(bytes(s[68:]) for s in segments) == bytes(range(250)) * 12
    fragment = bytearray(plain[:40] + bytes([IPPROTO_TCP, 0, 0, 1, 0, 0, 0, 9]) + plain[40:])
    fragment[6] = 44
    struct.pack_into("!H", fragment, 4, len(fragment) - 40)
    assert segment_tcp(fragment, 1280) is Rejected.FRAGMENT


def test_an_mtu_below_the_ipv4_minimum_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="minimum"):
        segment_tcp(tcp_packet(A4, B4), 40)


@settings(max_examples=40, deadline=None)
@given(
    v6=st.booleans(),
    size=st.integers(min_value=0, max_value=20000),
    mtu=st.integers(min_value=128, max_value=9000),
    seq=st.integers(min_value=0, max_value=0xFFFFFFFF),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | FIN | PSH, ACK | CWR | ECE, ACK | RST]),
    timestamps=st.booleans(),
)
def test_segmenting_then_concatenating_gives_back_the_payload(
    v6: bool, size: int, mtu: int, seq: int, flags: int, timestamps: bool
) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(size))
    options = TIMESTAMPS if timestamps else b""
    packet = tcp_packet(A6 if v6 else A4, B6 if v6 else B4, payload, seq=seq, flags=flags, options=options)
    segments = segment_tcp(packet, mtu)
    assert isinstance(segments, list) and segments
    _, data = headers_of(packet)
    expected_seq = seq
    for i, seg in enumerate(segments):
        assert len(seg) <= mtu
        assert_valid(seg)
        l4, _ = headers_of(seg)
        assert seg == canonical(seg), "checksums equal a full RFC 1071 recomputation"
        assert field(seg, "!I", l4 + 4) == expected_seq, "sequence numbers are continuous"
        expected_seq = (expected_seq + len(seg) - data) & 0xFFFFFFFF
        last = i == len(segments) - 1
        assert seg[l4 + 13] & (FIN | PSH) == (flags & (FIN | PSH) if last else 0)
        assert seg[l4 + 13] & CWR == (flags & CWR if i == 0 else 0)
    assert b"".join(bytes(s[data:]) for s in segments) == payload


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=68, max_value=1500))
def test_random_bytes_never_raise(data: bytes, mtu: int) -> None:
    result = segment_tcp(data, mtu)
    assert isinstance(result, (list, Rejected))
    assert clamp_mss_packet(bytearray(data), 1200) in ClampResult


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=59), st.integers(min_value=0, max_value=255))
def test_corrupted_header_bytes_never_raise(index: int, value: int) -> None:
    packet = tcp_packet(A4, B4, bytes(2000), options=TIMESTAMPS)
    packet[index] = value
    result = segment_tcp(packet, 576)
    if isinstance(result, list):
        assert all(len(s) <= 576 for s in result)


# -- MSS clamping ---------------------------------------------------------------------------------------


def mss_option(value: int) -> bytes:
    return struct.pack("!BBH", 2, 4, value)


def mss_of(packet: bytearray) -> int:
    view = PacketView()
    assert view.parse(packet, len(packet))
    off, end = view.l4 + 20, view.l4 + (packet[view.l4 + 12] >> 4) * 4
    while off < end:
        if packet[off] == 2:
            return field(packet, "!H", off + 2)
        off += 1 if packet[off] == 1 else packet[off + 1]
    raise AssertionError("no MSS option")


def test_mss_for_mtu() -> None:
    assert mss_for_mtu(1500, 4) == 1460
    assert mss_for_mtu(1420, 4) == 1380
    assert mss_for_mtu(1420, 6) == 1360


def test_syn_mss_is_clamped_with_a_valid_checksum() -> None:
    packet = tcp_packet(A4, B4, flags=SYN, options=mss_option(1460) + bytes([1, 1, 4, 2]))
    assert clamp_mss_packet(packet, 1380) is ClampResult.CLAMPED
    assert mss_of(packet) == 1380
    assert_valid(packet)


def test_syn_ack_mss_at_an_odd_offset_is_clamped_with_a_valid_checksum() -> None:
    # Windows-style option order puts the MSS after a single NOP: its value straddles two checksum words.
    options = bytes([1]) + mss_option(8960) + bytes([1, 1, 1])
    packet = tcp_packet(A6, B6, flags=SYN | ACK, options=options)
    assert clamp_mss_packet(packet, 1360) is ClampResult.CLAMPED
    assert mss_of(packet) == 1360
    assert_valid(packet)


def test_mss_is_never_raised() -> None:
    packet = tcp_packet(A4, B4, flags=SYN, options=mss_option(536))
    before = bytes(packet)
    assert clamp_mss_packet(packet, 1380) is ClampResult.UNCHANGED
    assert bytes(packet) == before


def test_only_syns_are_clamped() -> None:
    packet = tcp_packet(A4, B4, flags=ACK, options=mss_option(1460))
    before = bytes(packet)
    assert clamp_mss_packet(packet, 1380) is ClampResult.UNCHANGED
    assert bytes(packet) == before
    udp = tcp_packet(A4, B4, flags=SYN, options=mss_option(1460))
    udp[9] = IPPROTO_UDP
    assert clamp_mss_packet(udp, 1380) is ClampResult.UNCHANGED


def test_syn_without_mss_option_is_left_alone() -> None:
    packet = tcp_packet(A4, B4, flags=SYN, options=bytes([1, 1, 4, 2]))
    assert clamp_mss_packet(packet, 1380) is ClampResult.UNCHANGED


def test_options_after_end_of_list_are_not_read() -> None:
    packet = tcp_packet(A4, B4, flags=SYN, options=bytes([0, 0, 0, 0]) + mss_option(1460))
    assert clamp_mss_packet(packet, 1380) is ClampResult.UNCHANGED


@pytest.mark.parametrize(
    "options",
    [
        bytes([1, 1, 1, 1, 1, 1, 2, 4]),  # MSS option runs past the header
        bytes([3, 0, 1, 1]),  # option length 0 would loop forever
        bytes([2, 3, 5, 1]),  # MSS option of length 3
        bytes([1, 1, 1, 8]),  # kind with no length byte left
    ],
)
def test_malformed_options_are_rejected(options: bytes) -> None:
    packet = tcp_packet(A4, B4, flags=SYN, options=options)
    before = bytes(packet)
    assert clamp_mss_packet(packet, 1200) is ClampResult.MALFORMED
    assert bytes(packet) == before


def test_truncated_packet_is_rejected_by_the_clamp() -> None:
    packet = tcp_packet(A4, B4, flags=SYN, options=mss_option(1460))
    assert clamp_mss_packet(packet[:30], 1200) is ClampResult.MALFORMED


@settings(max_examples=80, deadline=None)
@given(
    v6=st.booleans(),
    nops=st.integers(min_value=0, max_value=7),
    value=st.integers(min_value=0, max_value=0xFFFF),
    clamp=st.integers(min_value=0, max_value=0xFFFF),
    flags=st.sampled_from([SYN, SYN | ACK, SYN | ECE | CWR]),
    payload=st.binary(max_size=9),
)
def test_clamp_never_raises_the_mss_and_keeps_the_checksum_valid(
    v6: bool, nops: int, value: int, clamp: int, flags: int, payload: bytes
) -> None:
    options = bytes([1]) * nops + mss_option(value)
    options += bytes([0]) * (-len(options) % 4)
    packet = tcp_packet(A6 if v6 else A4, B6 if v6 else B4, payload, flags=flags, options=options)
    view = PacketView()
    assert view.parse(packet, len(packet))
    result = clamp_mss(view, clamp)
    assert mss_of(packet) == min(value, clamp)
    assert result is (ClampResult.CLAMPED if value > clamp else ClampResult.UNCHANGED)
    assert_valid(packet)
    assert packet == canonical(packet), "the incremental update equals a full recomputation"


# -- the Linux stack takes our segments and honours the clamped MSS -------------------------------------

STACK = ipaddress.IPv4Address("198.18.0.1").packed
PEER = ipaddress.IPv4Address("198.18.0.2").packed


def from_stack(flags: int) -> Callable[[bytes], bool]:
    return lambda p: p[0] == 0x45 and p[9] == IPPROTO_TCP and p[12:16] == STACK and p[33] & flags == flags


@NEEDS_ROOT
def test_linux_accepts_our_segments_and_sends_within_the_clamped_mss() -> None:
    with tun_in_netns("seg") as (name, fd):
        listener = call_in_netns(name, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with listener:
            listener.bind(("198.18.0.1", 8080))
            listener.listen(1)
            listener.settimeout(3.0)
            ports = (40000, 8080)
            syn = tcp_packet(PEER, STACK, seq=1000, ack=0, ports=ports, flags=SYN, options=mss_option(1460))
            assert clamp_mss_packet(syn, 536) is ClampResult.CLAMPED
            os.write(fd, syn)
            syn_ack = read_packet(fd, from_stack(SYN | ACK))
            stack_seq, window = field(syn_ack, "!I", 24) + 1, field(syn_ack, "!H", 34)
            os.write(fd, tcp_packet(PEER, STACK, seq=1001, ack=stack_seq, ports=ports, flags=ACK))
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(3.0)
                # One super-packet as large as the stack's window allows, cut to 1500-byte segments.
                payload = bytes((i * 31) & 0xFF for i in range(min(window, 40000)))
                big = tcp_packet(PEER, STACK, payload, seq=1001, ack=stack_seq, ports=ports, flags=ACK | PSH)
                segments = segment_tcp(big, 1500)
                assert isinstance(segments, list) and len(segments) > 1
                for seg in segments:
                    os.write(fd, seg)
                received = b""
                while len(received) < len(payload):
                    chunk = conn.recv(65536)
                    assert chunk, "connection closed early"
                    received += chunk
                assert received == payload
                # The stack's own data comes in segments that fit the MSS our clamped SYN announced.
                conn.sendall(bytes(3000))
                sizes: list[int] = []
                while sum(sizes) < 3000:
                    packet = read_packet(fd, from_stack(ACK))
                    sizes.append(len(packet) - headers_of(packet)[1])
                assert max(sizes) <= 536 and sum(sizes) == 3000
