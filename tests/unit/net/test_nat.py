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
    Tombstones,
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


class _CountingEntry(NatEntry):
    """A flow that counts how often its deadline is looked at."""

    __slots__ = ("looks",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.looks = 0

    def deadline(self) -> float:
        self.looks += 1
        return super().deadline()


def test_expiry_looks_only_at_flows_whose_time_may_be_up() -> None:
    table = FlowTable()
    flows = [
        _CountingEntry(IPPROTO_TCP, APP, port, WEB, 80, FlowVerdict.PASS, replied=True)
        for port in range(1000)
    ]
    for e in flows:
        table.add(key_of(e), e)
    short = entry(5000)
    table.add(key_of(short), short)
    for second in range(1, 120):  # a poll a second, for two minutes
        table.expire(float(second))
    assert len(table) == 1000 and table.lookup_peer(IPPROTO_TCP, WEB, 5000) is None
    assert sum(e.looks for e in flows) == 1000, "each long-lived flow looked at when added, not per poll"


def test_a_closing_flow_expires_on_time_although_it_was_scheduled_for_later() -> None:
    table = FlowTable()
    e = entry()
    e.replied = True
    table.add(key_of(e), e)
    e.closed_at = 30.0
    table.reschedule(e)
    assert table.expire(30.0 + TCP_CLOSED_LINGER) == [e]


def test_expiry_of_a_burst_is_spread_over_runs_by_its_limit() -> None:
    table = FlowTable()
    burst = [entry(port) for port in range(1, 101)]
    for e in burst:
        table.add(key_of(e), e)
    assert len(table.expire(TCP_SYN_TIMEOUT, limit=40)) == 40 and table.expiry_behind
    assert len(table.expire(TCP_SYN_TIMEOUT, limit=40)) == 40
    assert len(table.expire(TCP_SYN_TIMEOUT, limit=40)) == 20 and not table.expiry_behind


class _CountingPeers(dict[bytes, NatEntry]):
    looks = 0

    def __contains__(self, key: object) -> bool:
        _CountingPeers.looks += 1
        return super().__contains__(key)


def test_a_free_peer_port_is_found_without_scanning_and_exhaustion_costs_no_scan() -> None:
    table = FlowTable()
    table._peers = (_CountingPeers(), _CountingPeers())  # counts the candidates tried
    first = entry(40000, dport=1)
    table.add(key_of(first), first)
    for dport in range(2, 2 + len(PEER_PORTS)):  # the same app port to every port of WEB
        e = entry(40000, dport=dport)
        assert table.add(key_of(e), e)
    _CountingPeers.looks = 0
    for dport in range(20000, 20100):
        refused = entry(40000, dport=dport)
        assert not table.add(key_of(refused), refused)
    assert table.exhausted == 100 and _CountingPeers.looks == 0
    gone = table.lookup_peer(IPPROTO_TCP, WEB, PEER_PORTS.start + 7)
    assert gone is not None
    table.remove(gone)
    again = entry(40000, dport=30000)
    assert table.add(key_of(again), again) and again.peer_port == PEER_PORTS.start + 7
    assert _CountingPeers.looks == 1


def test_tombstones_are_bounded_in_number_and_age() -> None:
    stones = Tombstones(age=100.0, limit=3)
    flows = [entry(port) for port in range(1, 6)]
    for n, e in enumerate(flows):
        e.key = key_of(e)
        stones.add(e, now=float(n))
    assert len(stones) == 3, "the oldest went first"
    assert stones.get(IPPROTO_TCP, flows[0].key, 5.0) is None
    assert stones.get(IPPROTO_TCP, flows[4].key, 5.0) is not None
    assert stones.get(IPPROTO_UDP, flows[4].key, 5.0) is None
    assert stones.expire(102.5) == 1 and len(stones) == 2
    assert stones.get(IPPROTO_TCP, flows[3].key, 103.0) is None, "past its age"
    assert stones.pop(IPPROTO_TCP, flows[4].key, 103.5) is not None and len(stones) == 1
