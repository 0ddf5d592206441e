"""ICMP "fragmentation needed" / "packet too big" replies to oversize packets bound for a tunnel."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tun_stack import NEEDS_ROOT, read_packet, tun_in_netns

from awg_split_tunnel.lab.netns import call_in_netns
from awg_split_tunnel.net.icmp import fragmentation_needed, packet_too_big, too_big_reply
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, PacketView, build_packet

APP4 = ipaddress.IPv4Address("198.18.0.2").packed
REMOTE4 = ipaddress.IPv4Address("198.19.1.1").packed
GATEWAY4 = ipaddress.IPv4Address("198.18.0.1").packed
APP6 = ipaddress.IPv6Address("2001:2::2").packed
REMOTE6 = ipaddress.IPv6Address("2001:2:0:1::1").packed
GATEWAY6 = ipaddress.IPv6Address("2001:2::1").packed


def naive_checksum(data: bytes, initial: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp(src: bytes, dst: bytes, size: int) -> bytearray:
    """A UDP packet of ``size`` bytes in all, with a recognisable payload."""
    header = 28 if len(src) == 4 else 48
    payload = bytes((i * 13) & 0xFF for i in range(size - header))
    return build_packet(src, dst, IPPROTO_UDP, 5353, 443, payload)


def icmp_packet(src: bytes, dst: bytes, icmp: bytes, size: int) -> bytearray:
    """An ICMP/ICMPv6 packet of ``size`` bytes starting with ``icmp`` (type, code, ...)."""
    body = icmp + bytes(size - len(icmp) - (20 if len(src) == 4 else 40))
    if len(src) == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0x4000, 64, 1, 0, src, dst)
    else:
        hdr = struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, 64, src, dst)
    return bytearray(hdr + body)


def test_ipv4_fragmentation_needed_known_answer() -> None:
    offending = udp(APP4, REMOTE4, 1600)
    reply = too_big_reply(offending, 1420)
    assert reply is not None
    # RFC 1812 §4.3.2.3: the error is at most 576 bytes, quoting as much of the packet as fits.
    assert len(reply) == 576
    assert reply[:10] == bytes.fromhex("4500 0240 0000 0000 4001".replace(" ", ""))
    assert reply[12:16] == REMOTE4 and reply[16:20] == APP4, "addressed back to the sender"
    assert naive_checksum(bytes(reply[:20])) == 0, "IPv4 header checksum"
    assert reply[20:28] == bytes([3, 4]) + reply[22:24] + bytes([0, 0]) + struct.pack("!H", 1420)
    assert naive_checksum(bytes(reply[20:])) == 0, "ICMP checksum"
    assert reply[28:] == offending[:548]


def test_small_ipv4_packet_is_quoted_whole() -> None:
    offending = udp(APP4, REMOTE4, 301)  # an odd length: the checksum pads the quote with a zero byte
    reply = too_big_reply(offending, 200)
    assert reply is not None
    assert len(reply) == 28 + 301 and reply[28:] == offending
    assert naive_checksum(bytes(reply[:20])) == 0 and naive_checksum(bytes(reply[20:])) == 0
    assert struct.unpack_from("!H", reply, 26)[0] == 200


def test_error_source_can_be_the_tunnel_gateway() -> None:
    reply = too_big_reply(udp(APP4, REMOTE4, 1500), 1420, source=GATEWAY4)
    assert reply is not None
    assert reply[12:16] == GATEWAY4
    assert naive_checksum(bytes(reply[:20])) == 0 and naive_checksum(bytes(reply[20:])) == 0
    with pytest.raises(ValueError, match="4-byte"):
        too_big_reply(udp(APP4, REMOTE4, 1500), 1420, source=GATEWAY6)


def test_ipv6_packet_too_big_known_answer() -> None:
    offending = udp(APP6, REMOTE6, 1500)
    reply = too_big_reply(offending, 1280)
    assert reply is not None
    # RFC 4443 §2.4(c): the error does not exceed the minimum IPv6 MTU.
    assert len(reply) == 1280
    assert reply[:8] == bytes.fromhex("6000000004d83a40")
    assert reply[8:24] == REMOTE6 and reply[24:40] == APP6
    assert reply[40:42] == bytes([2, 0])
    assert struct.unpack_from("!I", reply, 44)[0] == 1280
    pseudo = REMOTE6 + APP6 + struct.pack("!I3xB", 1240, 58)
    assert naive_checksum(pseudo + bytes(reply[40:])) == 0, "ICMPv6 checksum over the pseudo-header"
    assert reply[48:] == offending[:1232]


def test_ipv6_error_from_the_gateway_quotes_small_packets_whole() -> None:
    offending = udp(APP6, REMOTE6, 1400)
    reply = too_big_reply(offending, 1300, source=GATEWAY6)
    assert reply is not None
    assert len(reply) == 48 + 1232 and reply[8:24] == GATEWAY6
    pseudo = GATEWAY6 + APP6 + struct.pack("!I3xB", len(reply) - 40, 58)
    assert naive_checksum(pseudo + bytes(reply[40:])) == 0


def test_packets_that_fit_get_no_error() -> None:
    assert too_big_reply(udp(APP4, REMOTE4, 1420), 1420) is None
    assert too_big_reply(udp(APP6, REMOTE6, 1280), 1280) is None


def test_tcp_and_echo_requests_get_an_error_but_icmp_errors_do_not() -> None:
    tcp = build_packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, bytes(1500))
    assert too_big_reply(tcp, 1420) is not None
    assert too_big_reply(icmp_packet(APP4, REMOTE4, bytes([8, 0]), 1500), 1420) is not None
    assert too_big_reply(icmp_packet(APP6, REMOTE6, bytes([128, 0]), 1500), 1280) is not None
    # RFC 1122 §3.2.2 / RFC 4443 §2.4(e): never an error about an error.
    assert too_big_reply(icmp_packet(APP4, REMOTE4, bytes([3, 1]), 1500), 1420) is None
    assert too_big_reply(icmp_packet(APP4, REMOTE4, bytes([11, 0]), 1500), 1420) is None
    assert too_big_reply(icmp_packet(APP6, REMOTE6, bytes([1, 4]), 1500), 1280) is None


def test_non_first_ipv4_fragments_get_no_error() -> None:
    fragment = udp(APP4, REMOTE4, 1500)
    struct.pack_into("!H", fragment, 6, 185)  # offset 1480
    assert too_big_reply(fragment, 1420) is None
    struct.pack_into("!H", fragment, 6, 0x2000)  # first fragment (MF): answered
    assert too_big_reply(fragment, 1420) is not None


def test_packets_without_dont_fragment_still_get_an_error() -> None:
    # The tunnel never fragments; hosts lower their path MTU on the error and fragment themselves.
    packet = udp(APP4, REMOTE4, 1500)
    struct.pack_into("!H", packet, 6, 0)
    assert too_big_reply(packet, 1420) is not None


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (bytes(4), REMOTE4),
        (ipaddress.IPv4Address("224.0.0.251").packed, REMOTE4),
        (APP4, ipaddress.IPv4Address("239.255.255.250").packed),
        (APP4, b"\xff\xff\xff\xff"),
    ],
)
def test_no_ipv4_error_for_unspecified_multicast_or_broadcast(src: bytes, dst: bytes) -> None:
    assert too_big_reply(udp(src, dst, 1500), 1420) is None


def test_ipv6_multicast_destination_gets_an_error_but_multicast_source_does_not() -> None:
    group = ipaddress.IPv6Address("ff0e::1").packed
    # RFC 4443 §2.4(e.2): "packet too big" is the one error sent for multicast destinations.
    reply = too_big_reply(udp(APP6, group, 1500), 1280, source=GATEWAY6)
    assert reply is not None and reply[24:40] == APP6
    assert too_big_reply(udp(APP6, group, 1500), 1280) is None, "no default unicast source"
    assert too_big_reply(udp(group, REMOTE6, 1500), 1280) is None
    assert too_big_reply(udp(bytes(16), REMOTE6, 1500), 1280) is None


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45" + bytes(10),  # truncated IPv4 header
        b"\x43" + bytes(1599),  # IHL 3
        bytes(udp(APP4, REMOTE4, 1500))[:1400],  # total length beyond the buffer
        bytes(udp(APP6, REMOTE6, 1500))[:30],  # truncated IPv6 header
        b"\x95" + bytes(1599),  # IP version 9
    ],
)
def test_malformed_packets_get_no_error(packet: bytes) -> None:
    assert too_big_reply(packet, 1280) is None


def test_invalid_mtus_are_programming_errors() -> None:
    view = PacketView()
    packet = udp(APP6, REMOTE6, 1500)
    assert view.parse(packet, len(packet))
    with pytest.raises(ValueError, match="1280"):
        packet_too_big(view, 1000)
    packet4 = udp(APP4, REMOTE4, 1500)
    assert view.parse(packet4, len(packet4))
    with pytest.raises(ValueError, match="IPv4 MTU"):
        fragmentation_needed(view, 40)
    assert packet_too_big(view, 1280) is None, "an IPv4 packet gets no ICMPv6 error"


@settings(max_examples=60, deadline=None)
@given(
    v6=st.booleans(),
    size=st.integers(min_value=1281, max_value=9000),
    mtu=st.integers(min_value=1280, max_value=1500),
)
def test_every_error_is_well_formed(v6: bool, size: int, mtu: int) -> None:
    offending = udp(APP6, REMOTE6, size) if v6 else udp(APP4, REMOTE4, size)
    reply = too_big_reply(offending, mtu)
    if size <= mtu:
        assert reply is None
        return
    assert reply is not None
    view = PacketView()
    assert view.parse(reply, len(reply)), "the error itself parses as an IP packet"
    assert view.length == len(reply)
    header = 28 if not v6 else 48
    assert reply[header:] == offending[: len(reply) - header]
    if v6:
        assert len(reply) <= 1280
        pseudo = REMOTE6 + APP6 + struct.pack("!I3xB", len(reply) - 40, 58)
        assert naive_checksum(pseudo + bytes(reply[40:])) == 0
    else:
        assert len(reply) <= 576
        assert naive_checksum(bytes(reply[:20])) == 0 and naive_checksum(bytes(reply[20:])) == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1280, max_value=1500))
def test_random_bytes_never_raise(data: bytes, mtu: int) -> None:
    reply = too_big_reply(data, mtu)
    assert reply is None or len(reply) <= 1280


@settings(max_examples=200, deadline=None)
@given(
    v6=st.booleans(),
    index=st.integers(min_value=0, max_value=47),
    value=st.integers(min_value=0, max_value=255),
)
def test_corrupted_headers_never_raise(v6: bool, index: int, value: int) -> None:
    packet = udp(APP6, REMOTE6, 1400) if v6 else udp(APP4, REMOTE4, 200)
    packet[index] = value
    reply = too_big_reply(packet, 1280 if v6 else 100)
    if reply is not None:
        assert len(reply) <= (1280 if reply[0] >> 4 == 6 else 576)


# -- the Linux stack takes the errors: its path MTU drops ------------------------------------------------

IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU = 23, 2, 24


def path_mtu_after_error(v6: bool, reported_mtu: int) -> tuple[int, int]:
    """Send a 1400-byte UDP datagram with DF into the TUN, answer it with our error, and return the
    socket's path MTU before and after."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    with tun_in_netns("icmp6" if v6 else "icmp4") as (name, fd):
        sock = call_in_netns(name, lambda: socket.socket(family, socket.SOCK_DGRAM))
        with sock:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
                sock.connect(("2001:2::2", 9))
                level, option = socket.IPPROTO_IPV6, IPV6_MTU
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
                sock.connect(("198.18.0.2", 9))
                level, option = socket.IPPROTO_IP, IP_MTU
            before = sock.getsockopt(level, option)
            sock.send(bytes(1400 - (48 if v6 else 28)))
            udp_proto = 6 if v6 else 9
            sent = read_packet(fd, lambda p: p[0] >> 4 == (6 if v6 else 4) and p[udp_proto] == IPPROTO_UDP)
            reply = too_big_reply(sent, reported_mtu)
            assert reply is not None
            os.write(fd, reply)
            deadline = time.monotonic() + 3.0
            after = before
            while after == before and time.monotonic() < deadline:
                time.sleep(0.01)
                after = sock.getsockopt(level, option)
            if v6:
                return before, after
            with pytest.raises(OSError) as too_big:
                sock.send(bytes(1400 - 28))
            assert too_big.value.errno == errno.EMSGSIZE, "DF datagrams above the new path MTU are refused"
            return before, after


@NEEDS_ROOT
def test_linux_lowers_its_ipv4_path_mtu_on_our_fragmentation_needed() -> None:
    assert path_mtu_after_error(False, 1200) == (1500, 1200)


@NEEDS_ROOT
def test_linux_lowers_its_ipv6_path_mtu_on_our_packet_too_big() -> None:
    assert path_mtu_after_error(True, 1280) == (1500, 1280)
