"""Source NAT to a packet tunnel's address and back, with checksums checked by full recomputation."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tun_stack import NEEDS_ROOT, read_packet, tun_in_netns

from awg_split_tunnel.lab.netns import call_in_netns
from awg_split_tunnel.net import tunnel_nat
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, PacketView
from awg_split_tunnel.net.tunnel_nat import NatResult, TunnelNat

APP4 = ipaddress.IPv4Address("198.18.5.20").packed
APP4_OTHER = ipaddress.IPv4Address("198.18.5.21").packed
TUN4 = ipaddress.IPv4Address("198.19.0.2").packed
REMOTE4 = ipaddress.IPv4Address("198.19.200.1").packed
APP6 = ipaddress.IPv6Address("2001:2::20").packed
TUN6 = ipaddress.IPv6Address("2001:2:0:ff::2").packed
REMOTE6 = ipaddress.IPv6Address("2001:2:0:1::1").packed

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


def naive_checksum(data: bytes, initial: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    raw = (
        src
        + dst
        + (struct.pack("!BBH", 0, proto, length) if len(src) == 4 else struct.pack("!I3xB", length, proto))
    )
    return sum(struct.unpack(f"!{len(raw) // 2}H", raw))


def packet(
    src: bytes,
    dst: bytes,
    proto: int,
    sport: int,
    dport: int,
    payload: bytes = b"data",
    *,
    flags: int = ACK,
    udp_checksum: bool = True,
) -> bytearray:
    """A TCP/UDP packet whose checksums are computed here, independently of the code under test."""
    if proto == IPPROTO_TCP:
        l4 = bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, flags, 1000, 0, 0) + payload)
        off = 16
    else:
        l4 = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
        off = 6
    if proto == IPPROTO_TCP or udp_checksum or len(src) == 16:
        csum = naive_checksum(bytes(l4), pseudo(src, dst, proto, len(l4)))
        if proto == IPPROTO_UDP and csum == 0:
            csum = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
        struct.pack_into("!H", l4, off, csum)
    return ip_header(src, dst, proto, len(l4)) + l4


def ip_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytearray:
    """An IPv4 (with its checksum) or IPv6 header, by the addresses' length."""
    if len(src) == 16:
        return bytearray(struct.pack("!IHBB16s16s", 6 << 28, payload_len, proto, 64, src, dst))
    total = 20 + payload_len
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 7, 0x4000, 64, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, naive_checksum(bytes(hdr)))
    return hdr


def assert_valid(data: bytearray) -> None:
    """IPv4 header and TCP/UDP checksums verify by full recomputation (IPv4 UDP checksum 0 = none)."""
    raw = bytes(data)
    if raw[0] >> 4 == 4:
        assert naive_checksum(raw[:20]) == 0, "IPv4 header checksum"
        src, dst, proto, l4 = raw[12:16], raw[16:20], raw[9], 20
    else:
        src, dst, proto, l4 = raw[8:24], raw[24:40], raw[6], 40
    if proto == IPPROTO_UDP and raw[0] >> 4 == 4 and raw[l4 + 6 : l4 + 8] == b"\0\0":
        return
    assert naive_checksum(raw[l4:], pseudo(src, dst, proto, len(raw) - l4)) == 0, "transport checksum"


def view_of(data: bytearray) -> PacketView:
    view = PacketView()
    assert view.parse(data, len(data))
    return view


def addresses(data: bytearray) -> tuple[bytes, int, bytes, int]:
    view = view_of(data)
    src_port, dst_port = view.ports()
    return view.src_addr, src_port, view.dst_addr, dst_port


def swapped(data: bytearray) -> bytearray:
    """The same packet as the other side would send it back (addresses and ports exchanged)."""
    out = bytearray(data)
    view = view_of(out)
    view.swap_addresses()
    src_port, dst_port = view.ports()
    struct.pack_into("!HH", out, view.l4, dst_port, src_port)  # a swap keeps every checksum
    return out


def test_app_packet_leaves_from_the_tunnel_address_and_the_reply_comes_back() -> None:
    nat = TunnelNat(TUN4, TUN6)
    out = packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, b"GET / HTTP/1.1\r\n", flags=SYN)
    assert nat.outbound(view_of(out), now=1.0) is NatResult.REWRITTEN
    assert addresses(out) == (TUN4, 40000, REMOTE4, 443), "source NATed, port preserved"
    assert_valid(out)
    assert out.endswith(b"GET / HTTP/1.1\r\n")
    reply = packet(REMOTE4, TUN4, IPPROTO_TCP, 443, 40000, b"HTTP/1.1 200 OK", flags=SYN | ACK)
    assert nat.inbound(view_of(reply), now=1.1) is NatResult.REWRITTEN
    assert reply == packet(REMOTE4, APP4, IPPROTO_TCP, 443, 40000, b"HTTP/1.1 200 OK", flags=SYN | ACK)


def test_ipv6_udp_round_trip() -> None:
    nat = TunnelNat(None, TUN6)
    out = packet(APP6, REMOTE6, IPPROTO_UDP, 5353, 53, b"query")
    assert nat.outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
    assert out == packet(TUN6, REMOTE6, IPPROTO_UDP, 5353, 53, b"query")
    reply = packet(REMOTE6, TUN6, IPPROTO_UDP, 53, 5353, b"answer")
    assert nat.inbound(view_of(reply), now=0.1) is NatResult.REWRITTEN
    assert reply == packet(REMOTE6, APP6, IPPROTO_UDP, 53, 5353, b"answer")


def test_ipv4_udp_without_checksum_stays_without_one() -> None:
    nat = TunnelNat(TUN4, None)
    out = packet(APP4, REMOTE4, IPPROTO_UDP, 5000, 9, b"x" * 33, udp_checksum=False)
    assert nat.outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
    assert out[26:28] == b"\0\0"
    assert_valid(out)
    reply = packet(REMOTE4, TUN4, IPPROTO_UDP, 9, 5000, udp_checksum=False)
    assert nat.inbound(view_of(reply), now=0.0) is NatResult.REWRITTEN
    assert reply[26:28] == b"\0\0" and reply[16:20] == APP4
    assert_valid(reply)


def test_a_port_held_towards_the_same_remote_gets_a_new_port() -> None:
    nat = TunnelNat(TUN4, None)
    first = packet(APP4, REMOTE4, IPPROTO_UDP, 40000, 443)
    second = packet(APP4_OTHER, REMOTE4, IPPROTO_UDP, 40000, 443)
    elsewhere = packet(APP4_OTHER, REMOTE4, IPPROTO_UDP, 40000, 8443)
    for p in (first, second, elsewhere):
        assert nat.outbound(view_of(p), now=0.0) is NatResult.REWRITTEN
        assert_valid(p)
    assert addresses(first)[1] == 40000
    new_port = addresses(second)[1]
    assert new_port != 40000 and new_port in tunnel_nat.EPHEMERAL_PORTS
    assert addresses(elsewhere)[1] == 40000, "another remote port does not collide"
    # The next packet of the second flow keeps its port; replies reach the right app and port.
    again = packet(APP4_OTHER, REMOTE4, IPPROTO_UDP, 40000, 443)
    assert nat.outbound(view_of(again), now=1.0) is NatResult.REWRITTEN
    assert addresses(again)[1] == new_port
    for port, app in ((40000, APP4), (new_port, APP4_OTHER)):
        reply = packet(REMOTE4, TUN4, IPPROTO_UDP, 443, port)
        assert nat.inbound(view_of(reply), now=1.0) is NatResult.REWRITTEN
        assert addresses(reply) == (REMOTE4, 443, app, 40000)
        assert_valid(reply)
    assert len(nat) == 3


def test_tcp_and_udp_ports_are_separate() -> None:
    nat = TunnelNat(TUN4, None)
    tcp = packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, flags=SYN)
    udp = packet(APP4_OTHER, REMOTE4, IPPROTO_UDP, 40000, 443)
    nat.outbound(view_of(tcp), now=0.0)
    nat.outbound(view_of(udp), now=0.0)
    assert addresses(tcp)[1] == addresses(udp)[1] == 40000


def test_replies_nobody_asked_for_are_refused_untouched() -> None:
    nat = TunnelNat(TUN4, TUN6)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_UDP, 40000, 443)), now=0.0)
    for stray in (
        packet(REMOTE4, TUN4, IPPROTO_UDP, 444, 40000),  # other remote port
        packet(APP4_OTHER, TUN4, IPPROTO_UDP, 443, 40000),  # other remote address
        packet(REMOTE4, TUN4, IPPROTO_TCP, 443, 40000),  # other protocol
        packet(REMOTE4, APP4, IPPROTO_UDP, 443, 40000),  # not addressed to the tunnel
        packet(REMOTE6, TUN6, IPPROTO_UDP, 443, 40000),
    ):
        before = bytes(stray)
        assert nat.inbound(view_of(stray), now=0.0) is NatResult.NO_MAPPING
        assert bytes(stray) == before


def test_missing_tunnel_address_and_unsupported_protocols() -> None:
    nat = TunnelNat(TUN4, None)
    v6 = packet(APP6, REMOTE6, IPPROTO_UDP, 1, 2)
    assert nat.outbound(view_of(v6), now=0.0) is NatResult.NO_ADDRESS
    icmp = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 1, 0, APP4, REMOTE4) + bytes(8))
    assert nat.outbound(view_of(icmp), now=0.0) is NatResult.UNSUPPORTED
    with pytest.raises(ValueError, match="4 bytes"):
        TunnelNat(TUN6, None)


def test_later_fragments_are_nated_by_address() -> None:
    nat = TunnelNat(TUN4, None)
    first = packet(APP4, REMOTE4, IPPROTO_UDP, 40000, 443, bytes(64))
    struct.pack_into("!H", first, 6, 0x2000)  # MF, offset 0: carries the UDP header
    struct.pack_into("!H", first, 10, 0)
    struct.pack_into("!H", first, 10, naive_checksum(bytes(first[:20])))
    assert nat.outbound(view_of(first), now=0.0) is NatResult.REWRITTEN
    later = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 7, 11, 64, 17, 0, APP4, REMOTE4) + bytes(40))
    struct.pack_into("!H", later, 10, naive_checksum(bytes(later[:20])))
    assert nat.outbound(view_of(later), now=0.0) is NatResult.REWRITTEN
    assert later[12:16] == TUN4 and naive_checksum(bytes(later[:20])) == 0
    back = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 9, 11, 64, 17, 0, REMOTE4, TUN4) + bytes(40))
    struct.pack_into("!H", back, 10, naive_checksum(bytes(back[:20])))
    assert nat.inbound(view_of(back), now=0.0) is NatResult.REWRITTEN
    assert back[16:20] == APP4 and naive_checksum(bytes(back[:20])) == 0
    # With two app addresses behind the tunnel a portless fragment cannot be placed.
    nat.outbound(view_of(packet(APP4_OTHER, REMOTE4, IPPROTO_UDP, 1, 2)), now=0.0)
    struct.pack_into("!4s", back, 16, TUN4)
    assert nat.inbound(view_of(back), now=0.0) is NatResult.UNSUPPORTED


def test_udp_mappings_expire_when_idle() -> None:
    nat = TunnelNat(TUN4, None)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_UDP, 40000, 53)), now=0.0)
    assert (
        nat.inbound(view_of(packet(REMOTE4, TUN4, IPPROTO_UDP, 53, 40000)), now=100.0) is NatResult.REWRITTEN
    )
    assert nat.expire(now=200.0) == []
    gone = nat.expire(now=100.0 + tunnel_nat.UDP_IDLE_TIMEOUT)
    assert [m.app_port for m in gone] == [40000] and len(nat) == 0
    reply = packet(REMOTE4, TUN4, IPPROTO_UDP, 53, 40000)
    assert nat.inbound(view_of(reply), now=300.0) is NatResult.NO_MAPPING


def test_tcp_mapping_lingers_after_reset_or_both_fins() -> None:
    nat = TunnelNat(TUN4, None)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, flags=SYN)), now=0.0)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_TCP, 40001, 443, flags=SYN)), now=0.0)
    nat.inbound(view_of(packet(REMOTE4, TUN4, IPPROTO_TCP, 443, 40000, flags=RST | ACK)), now=5.0)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_TCP, 40001, 443, flags=FIN | ACK)), now=5.0)
    assert [m.app_port for m in nat.expire(now=5.0 + tunnel_nat.TCP_CLOSED_LINGER)] == [40000]
    nat.inbound(view_of(packet(REMOTE4, TUN4, IPPROTO_TCP, 443, 40001, flags=FIN | ACK)), now=6.0)
    assert nat.expire(now=5.5 + tunnel_nat.TCP_CLOSED_LINGER) == [], "one FIN is not a close"
    assert [m.app_port for m in nat.expire(now=6.0 + tunnel_nat.TCP_CLOSED_LINGER)] == [40001]
    assert len(nat) == 0


def test_a_tcp_mapping_nothing_came_back_to_goes_after_the_syn_timeout() -> None:
    nat = TunnelNat(TUN4, None)
    for port in (40000, 40001):
        nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_TCP, port, 443, flags=SYN)), now=0.0)
    syn_ack = packet(REMOTE4, TUN4, IPPROTO_TCP, 443, 40001, flags=SYN | ACK)
    assert nat.inbound(view_of(syn_ack), now=1.0) is NatResult.REWRITTEN
    assert nat.expire(now=tunnel_nat.TCP_SYN_TIMEOUT - 1) == []
    gone = nat.expire(now=tunnel_nat.TCP_SYN_TIMEOUT)
    assert [m.app_port for m in gone] == [40000], "an unanswered SYN's mapping does not stay for 2 h"
    assert nat.expire(now=1.0 + tunnel_nat.TCP_IDLE_TIMEOUT - 1) == []
    assert len(nat.expire(now=1.0 + tunnel_nat.TCP_IDLE_TIMEOUT)) == 1


def test_a_new_syn_revives_a_closing_mapping() -> None:
    nat = TunnelNat(TUN4, None)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, flags=SYN)), now=0.0)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, flags=RST)), now=1.0)
    nat.outbound(view_of(packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, flags=SYN)), now=2.0)
    assert nat.expire(now=2.0 + tunnel_nat.TCP_CLOSED_LINGER) == []
    assert len(nat.expire(now=2.0 + tunnel_nat.TCP_IDLE_TIMEOUT)) == 1


def test_port_exhaustion_is_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel_nat, "EPHEMERAL_PORTS", range(60000, 60002))
    nat = TunnelNat(TUN4, None)
    results = []
    for i in range(4):
        app = ipaddress.IPv4Address(f"198.18.9.{i + 1}").packed
        results.append(nat.outbound(view_of(packet(app, REMOTE4, IPPROTO_UDP, 40000, 443)), now=0.0))
    # One keeps its port, two get the two spare ports, the fourth finds none.
    assert results == [NatResult.REWRITTEN] * 3 + [NatResult.NO_PORT]
    assert nat.exhausted == 1
    assert sorted(m.tunnel_port for m in nat.mappings()) == [40000, 60000, 60001]


@settings(max_examples=80, deadline=None)
@given(
    v6=st.booleans(),
    proto=st.sampled_from([IPPROTO_TCP, IPPROTO_UDP]),
    app=st.binary(min_size=16, max_size=16),
    remote=st.binary(min_size=16, max_size=16),
    sport=st.integers(min_value=1, max_value=65535),
    dport=st.integers(min_value=1, max_value=65535),
    payload=st.binary(max_size=64),
    udp_checksum=st.booleans(),
    collide=st.booleans(),
)
def test_there_and_back_is_the_identity(
    v6: bool,
    proto: int,
    app: bytes,
    remote: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    udp_checksum: bool,
    collide: bool,
) -> None:
    size = 16 if v6 else 4
    app_addr, remote_addr = app[:size], remote[:size]
    tun_addr = TUN6 if v6 else TUN4
    nat = TunnelNat(TUN4, TUN6)
    if collide:
        # Another app already holds this port towards this remote: the flow must move to a new port.
        other = packet(bytes(size - 1) + b"\x01", remote_addr, proto, sport, dport)
        assert nat.outbound(view_of(other), now=0.0) is NatResult.REWRITTEN
    original = packet(app_addr, remote_addr, proto, sport, dport, payload, udp_checksum=udp_checksum)
    out = bytearray(original)
    if collide and app_addr == bytes(size - 1) + b"\x01":
        return
    assert nat.outbound(view_of(out), now=1.0) is NatResult.REWRITTEN
    assert_valid(out)
    src, tport, dst, port = addresses(out)
    assert (src, dst, port) == (tun_addr, remote_addr, dport)
    assert (tport == sport) != collide
    assert out == packet(tun_addr, remote_addr, proto, tport, dport, payload, udp_checksum=udp_checksum)
    if not v6 and proto == IPPROTO_UDP and not udp_checksum:
        assert out[26:28] == b"\0\0"
    reply = swapped(out)
    assert nat.inbound(view_of(reply), now=2.0) is NatResult.REWRITTEN
    assert_valid(reply)
    assert reply == swapped(original)


def test_a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() -> None:
    # Pick the payload so that, seen from the tunnel address, the UDP checksum computes to 0.
    probe = packet(TUN4, REMOTE4, IPPROTO_UDP, 40000, 53, b"\0\0")
    probe[26:28] = b"\0\0"
    partial = (~naive_checksum(bytes(probe[20:]), pseudo(TUN4, REMOTE4, IPPROTO_UDP, 10))) & 0xFFFF
    filler = struct.pack("!H", 0xFFFF - partial)
    expected = packet(TUN4, REMOTE4, IPPROTO_UDP, 40000, 53, filler)
    assert expected[26:28] == b"\xff\xff"
    nat = TunnelNat(TUN4, None)
    out = packet(APP4, REMOTE4, IPPROTO_UDP, 40000, 53, filler)
    assert out[26:28] != b"\xff\xff"
    assert nat.outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
    assert out == expected
    assert_valid(out)


def test_a_tcp_checksum_that_comes_out_zero_stays_zero() -> None:
    # As above for TCP, where 0 is an ordinary checksum value and the canonical form of a zero sum.
    probe = packet(TUN4, REMOTE4, IPPROTO_TCP, 40000, 443, b"\0\0")
    probe[36:38] = b"\0\0"
    partial = (~naive_checksum(bytes(probe[20:]), pseudo(TUN4, REMOTE4, IPPROTO_TCP, 22))) & 0xFFFF
    filler = struct.pack("!H", 0xFFFF - partial)
    expected = packet(TUN4, REMOTE4, IPPROTO_TCP, 40000, 443, filler)
    assert expected[36:38] == b"\0\0"
    out = packet(APP4, REMOTE4, IPPROTO_TCP, 40000, 443, filler)
    assert TunnelNat(TUN4, None).outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
    assert out == expected


# -- the Linux stack as the remote end: it accepts what we NAT and answers the tunnel address -----------

STACK4 = ipaddress.IPv4Address("198.18.0.1").packed
PEER4 = ipaddress.IPv4Address("198.18.0.2").packed
STACK6 = ipaddress.IPv6Address("2001:2::1").packed
PEER6 = ipaddress.IPv6Address("2001:2::2").packed


@NEEDS_ROOT
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_linux_takes_our_nated_udp_and_its_answer_finds_the_app(v6: bool) -> None:
    family, stack, peer = (socket.AF_INET6, STACK6, PEER6) if v6 else (socket.AF_INET, STACK4, PEER4)
    app = APP6 if v6 else APP4
    nat = TunnelNat(PEER4, PEER6)
    with tun_in_netns("nat6" if v6 else "nat4") as (name, fd):
        server = call_in_netns(name, lambda: socket.socket(family, socket.SOCK_DGRAM))
        with server:
            server.bind((str(ipaddress.ip_address(stack)), 9000))
            server.settimeout(3.0)
            out = packet(app, stack, IPPROTO_UDP, 40000, 9000, b"ping")
            assert nat.outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
            os.write(fd, out)
            data, sender = server.recvfrom(100)  # the stack drops datagrams with a wrong checksum
            assert (data, sender[:2]) == (b"ping", (str(ipaddress.ip_address(peer)), 40000))
            server.sendto(b"pong", sender)
            reply = read_packet(fd, lambda p: p[0] >> 4 == (6 if v6 else 4) and p.endswith(b"pong"))
            assert nat.inbound(view_of(reply), now=0.1) is NatResult.REWRITTEN
            assert_valid(reply)
            assert addresses(reply) == (stack, 9000, app, 40000)


@NEEDS_ROOT
def test_linux_answers_a_moved_port_and_the_answer_returns_to_the_app_port() -> None:
    nat = TunnelNat(PEER4, None)
    with tun_in_netns("natp") as (name, fd):
        listener = call_in_netns(name, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with listener:
            listener.bind(("198.18.0.1", 8080))
            listener.listen(4)
            moved: list[int] = []
            for app in (APP4, APP4_OTHER):  # the same app port twice: the second flow moves
                syn = packet(app, STACK4, IPPROTO_TCP, 40000, 8080, b"", flags=SYN)
                assert nat.outbound(view_of(syn), now=0.0) is NatResult.REWRITTEN
                moved.append(addresses(syn)[1])
                os.write(fd, syn)
            assert moved[0] == 40000 and moved[1] != 40000
            for app, port in zip((APP4, APP4_OTHER), moved, strict=True):
                to_port = port.to_bytes(2, "big")
                syn_ack = read_packet(fd, lambda p: p[0] == 0x45 and p[22:24] == to_port)  # noqa: B023
                assert syn_ack[33] & (SYN | ACK) == SYN | ACK
                assert nat.inbound(view_of(syn_ack), now=0.1) is NatResult.REWRITTEN
                assert_valid(syn_ack)
                assert addresses(syn_ack) == (STACK4, 8080, app, 40000)


# -- ICMP errors from inside the tunnel: found by the packet they quote, rewritten for the app -----------


def icmp_error(outer_src: bytes, quoted: bytes, *, icmp_type: int | None = None, code: int = 3) -> bytearray:
    """An ICMP/ICMPv6 error to the tunnel address quoting ``quoted``, checksums computed here."""
    v6 = quoted[0] >> 4 == 6
    dst = quoted[8:24] if v6 else quoted[12:16]
    kind = (1 if v6 else 3) if icmp_type is None else icmp_type
    body = bytearray(struct.pack("!BBHI", kind, code if not v6 else 4, 0, 0)) + quoted
    proto = 58 if v6 else 1
    initial = pseudo(outer_src, dst, proto, len(body)) if v6 else 0
    struct.pack_into("!H", body, 2, naive_checksum(bytes(body), initial))
    return ip_header(outer_src, dst, proto, len(body)) + body


def assert_icmp_valid(data: bytearray) -> None:
    raw = bytes(data)
    if raw[0] >> 4 == 4:
        assert naive_checksum(raw[:20]) == 0, "IPv4 header checksum"
        assert naive_checksum(raw[20:]) == 0, "ICMP checksum"
    else:
        assert naive_checksum(raw[40:], pseudo(raw[8:24], raw[24:40], 58, len(raw) - 40)) == 0, "ICMPv6"


@pytest.mark.parametrize("proto", [IPPROTO_UDP, IPPROTO_TCP], ids=["udp", "tcp"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_an_icmp_error_quoting_our_packet_is_rewritten_as_the_app_would_have_received_it(
    proto: int, v6: bool
) -> None:
    app, remote = (APP6, REMOTE6) if v6 else (APP4, REMOTE4)
    nat = TunnelNat(TUN4, TUN6)
    sent = packet(app, remote, proto, 40000, 53, b"query", flags=SYN)
    out = bytearray(sent)
    assert nat.outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
    router = ipaddress.ip_address("2001:2:0:1::fe" if v6 else "198.19.200.254").packed
    error = icmp_error(router, bytes(out))
    assert nat.inbound(view_of(error), now=0.1) is NatResult.REWRITTEN
    assert_icmp_valid(error)
    header = 40 if v6 else 20
    assert bytes(error[header - (16 if v6 else 4) : header]) == app, "addressed to the app"
    assert error[header + 8 :] == sent, "quoting the packet exactly as the app sent it, checksums included"


def test_a_short_quote_of_eight_transport_bytes_is_enough() -> None:
    """RFC 792 only promises the IP header and 8 bytes: the ports, not the TCP checksum."""
    nat = TunnelNat(TUN4, None)
    sent = packet(APP4, REMOTE4, IPPROTO_TCP, 40001, 443, b"", flags=SYN)
    out = bytearray(sent)
    assert nat.outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
    error = icmp_error(REMOTE4, bytes(out[:28]), code=4)  # fragmentation needed
    assert nat.inbound(view_of(error), now=0.1) is NatResult.REWRITTEN
    assert_icmp_valid(error)
    assert error[28:] == sent[:28]


def test_icmp_that_quotes_no_flow_of_ours_is_left_alone() -> None:
    nat = TunnelNat(TUN4, TUN6)
    ours = packet(APP4, REMOTE4, IPPROTO_UDP, 40002, 53, b"q")
    assert nat.outbound(view_of(ours), now=0.0) is NatResult.REWRITTEN
    cases = {
        "unknown flow": icmp_error(REMOTE4, bytes(packet(TUN4, REMOTE4, IPPROTO_UDP, 40003, 53, b"q"))),
        "echo reply": icmp_error(REMOTE4, bytes(ours), icmp_type=0),
        "redirect": icmp_error(REMOTE4, bytes(ours), icmp_type=5),
        "quote from elsewhere": icmp_error(REMOTE4, bytes(packet(REMOTE4, TUN4, IPPROTO_UDP, 53, 40002))),
        "cut inside the quoted header": icmp_error(REMOTE4, bytes(ours[:19])),
        "cut before the ports": icmp_error(REMOTE4, bytes(ours[:22])),
    }
    for name, error in cases.items():
        before = bytes(error)
        assert nat.inbound(view_of(error), now=0.1) is NatResult.NO_MAPPING, name
        assert error == before, name


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_random_icmp_bodies_never_raise(body: bytes, v6: bool) -> None:
    nat = TunnelNat(TUN4, TUN6)
    nat.outbound(
        view_of(packet(APP6 if v6 else APP4, REMOTE6 if v6 else REMOTE4, IPPROTO_UDP, 40004, 53)), 0.0
    )
    data = (ip_header(REMOTE6, TUN6, 58, len(body)) if v6 else ip_header(REMOTE4, TUN4, 1, len(body))) + body
    view = PacketView()
    if view.parse(data, len(data)):
        assert nat.inbound(view, now=0.1) in (NatResult.NO_MAPPING, NatResult.REWRITTEN)


@NEEDS_ROOT
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_linux_port_unreachable_for_our_nated_udp_comes_back_to_the_app(v6: bool) -> None:
    stack, app = (STACK6, APP6) if v6 else (STACK4, APP4)
    nat = TunnelNat(PEER4, PEER6)
    with tun_in_netns("icmp6" if v6 else "icmp4") as (_name, fd):
        sent = packet(app, stack, IPPROTO_UDP, 40005, 9999, b"anyone there?")  # nothing listens on 9999
        out = bytearray(sent)
        assert nat.outbound(view_of(out), now=0.0) is NatResult.REWRITTEN
        os.write(fd, out)
        error = read_packet(
            fd, lambda p: p[:1] == (b"\x60" if v6 else b"\x45") and p[40 if v6 else 20] == (1 if v6 else 3)
        )  # destination unreachable (the stack also sends router solicitations and MLD reports)
        assert nat.inbound(view_of(error), now=0.1) is NatResult.REWRITTEN
        assert_icmp_valid(error)
        header = 40 if v6 else 20
        assert bytes(error[header - (16 if v6 else 4) : header]) == app
        assert error[header] == (1 if v6 else 3), "destination unreachable"
        assert error[header + 1] == (4 if v6 else 3), "port unreachable"
        assert error[header + 8 :] == sent
