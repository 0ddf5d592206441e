"""The flow table: keys from packets, the hairpin mapping a proxy looks up, collisions and expiry."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.net.nat import (
    PEER_PORTS,
    TCP_CLOSED_LINGER,
    TCP_IDLE_TIMEOUT,
    TCP_SYN_TIMEOUT,
    UDP_IDLE_TIMEOUT,
    FlowTable,
    FlowVerdict,
    NatEntry,
    app_key,
    reply_key,
)
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, PacketView, build_packet

APP = ipaddress.ip_address("198.18.0.1").packed
WEB = ipaddress.ip_address("198.18.0.10").packed
OTHER = ipaddress.ip_address("198.18.0.11").packed


def view(packet: bytearray) -> PacketView:
    v = PacketView()
    assert v.parse(packet, len(packet))
    return v


def entry(
    sport: int = 40000,
    dst: bytes = WEB,
    dport: int = 80,
    verdict: FlowVerdict = FlowVerdict.TUNNEL,
    proto: int = IPPROTO_TCP,
) -> NatEntry:
    return NatEntry(proto, APP, sport, dst, dport, verdict, tunnel_id="socks", proxy_port=15001, created=0.0)


def key_of(e: NatEntry) -> bytes:
    return app_key(view(build_packet(e.app_addr, e.orig_dst_addr, e.proto, e.app_port, e.orig_dst_port)))


@settings(max_examples=50)
@given(st.sampled_from([4, 16]), st.integers(1, 65535), st.integers(1, 65535), st.binary(max_size=40))
def test_the_proxy_reply_key_is_the_flows_peer_key(size: int, sport: int, dport: int, payload: bytes) -> None:
    app, dst = bytes(range(1, size + 1)), bytes(range(100, 100 + size))
    e = NatEntry(IPPROTO_UDP, app, sport, dst, dport, FlowVerdict.TUNNEL, proxy_port=15002)
    # The reply the proxy sends to the peer it saw: app:proxy_port -> dst:sport.
    reply = build_packet(app, dst, IPPROTO_UDP, 15002, sport, payload)
    assert reply_key(view(reply)) == e.peer_key


def test_app_key_ignores_ip_options() -> None:
    plain = build_packet(APP, WEB, IPPROTO_TCP, 1, 2)
    with_options = bytearray(plain[:20] + bytes(4) + plain[20:])
    with_options[0] = 0x46
    with_options[2:4] = len(with_options).to_bytes(2, "big")
    assert app_key(view(with_options)) == app_key(view(plain))


def test_proxy_finds_the_original_destination() -> None:
    table = FlowTable()
    e = entry()
    assert table.add(key_of(e), e)
    found = table.lookup_peer(IPPROTO_TCP, WEB, 40000)
    assert found is e and found.orig_dst_ip == "198.18.0.10" and found.orig_dst_port == 80
    assert table.lookup_peer(IPPROTO_UDP, WEB, 40000) is None


def test_same_port_and_address_with_another_port_gets_a_peer_port_of_its_own() -> None:
    table = FlowTable()
    first, second = entry(dport=80), entry(dport=443)
    assert table.add(key_of(first), first) and first.peer_port == 0
    assert table.add(key_of(second), second)
    assert table.collisions == 1 and second.peer_port in PEER_PORTS
    assert table.lookup_peer(IPPROTO_TCP, WEB, 40000) is first
    assert table.lookup_peer(IPPROTO_TCP, WEB, second.peer_port) is second
    third = entry(dst=OTHER)
    assert table.add(key_of(third), third) and third.peer_port == 0, "another address: no collision"
    table.remove(second)
    assert table.lookup_peer(IPPROTO_TCP, WEB, second.peer_port) is None


def test_passed_flows_have_no_peer_entry() -> None:
    table = FlowTable()
    e = entry(verdict=FlowVerdict.PASS)
    table.add(key_of(e), e)
    assert table.lookup_peer(IPPROTO_TCP, WEB, 40000) is None
    assert table.flows(IPPROTO_TCP)[key_of(e)] is e


def test_expiry_follows_protocol_and_state() -> None:
    table = FlowTable()
    syn_only, established, closed, udp = entry(1), entry(2), entry(3), entry(4, proto=IPPROTO_UDP)
    established.replied = True
    closed.replied, closed.closed_at = True, 5.0
    for e in (syn_only, established, closed, udp):
        table.add(key_of(e), e)
    assert table.expire(4.0) == []
    assert table.expire(5.0 + TCP_CLOSED_LINGER) == [closed]
    assert table.expire(UDP_IDLE_TIMEOUT) == [udp]
    assert table.expire(TCP_SYN_TIMEOUT) == [syn_only]
    assert table.expire(TCP_IDLE_TIMEOUT - 1) == []
    assert table.expire(TCP_IDLE_TIMEOUT) == [established]
    assert len(table) == 0 and table.lookup_peer(IPPROTO_TCP, WEB, 2) is None
