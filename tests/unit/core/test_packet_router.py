"""PacketRouter as a user sees it: which apps go through which tunnel, what is held, reset or dropped."""

from __future__ import annotations

import ipaddress
import struct
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.core import packet_router
from awg_split_tunnel.core.packet_router import (
    LOOKUP_TIMEOUT,
    MAX_HELD_PER_REMOTE,
    OWNER_PENDING,
    PacketAction,
    PacketRouter,
    TunnelRoute,
    flow_row,
    is_lan_destination,
)
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.router_messages import FlowForgotten, FlowTunnelled, FromRouter
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.packet import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    PacketView,
    build_packet,
)
from awg_split_tunnel.process.matcher import Platform
from awg_split_tunnel.router.divert_loop import RouterLoop
from awg_split_tunnel.router.process import RouterProcess, RouterSettings, nat_announcement, nat_withdrawal

APP = ipaddress.ip_address("198.18.0.1").packed
WEB = ipaddress.ip_address("198.18.0.10").packed
APP6 = ipaddress.ip_address("2001:2::1").packed
WEB6 = ipaddress.ip_address("2001:2::10").packed
NAS = ipaddress.ip_address("192.168.1.5").packed
PROXY_TCP, PROXY_UDP, HTTP_TCP = 15001, 15002, 15003

PIDS = {
    100: "/usr/bin/app-socks",
    200: "/usr/bin/app-direct",
    300: "/usr/bin/app-drop",
    400: "/usr/bin/app-block",
    500: "/usr/bin/app-http",
    600: "/usr/bin/app-lan",
}


class Env:
    def __init__(self, default: str = "direct", ancestors: dict[int, tuple[str, ...]] | None = None) -> None:
        self.states = {"socks": TunnelState.UP, "web": TunnelState.UP, "lan": TunnelState.UP}
        self.lookups: list[tuple[int, int]] = []
        self.os_owner: int | None = None
        self.sockets: dict[int, set[int]] | None = None
        """pid → the local ports of its sockets, for the owner check (None: the OS cannot tell)."""
        self.owner_checks: list[tuple[int, int]] = []
        rules = [
            Rule("app-socks", "socks"),
            Rule("app-direct", "direct"),
            Rule("app-drop", "socks", FallbackPolicy.DROP),
            Rule("app-block", "socks", FallbackPolicy.BLOCK),
            Rule("app-http", "web", FallbackPolicy.BLOCK),
            Rule("app-lan", "lan"),
        ]
        self.router = PacketRouter(
            RuleEngine(rules, default, Platform.POSIX),
            self.states.get,
            {
                "socks": TunnelRoute(PROXY_TCP, PROXY_UDP),
                "web": TunnelRoute(HTTP_TCP, None),
                "lan": TunnelRoute(PROXY_TCP + 10, None, lan_bypass=False),
            },
            own_pids={999},
            exe_of=PIDS.get,
            ancestors_of=None if ancestors is None else lambda pid: ancestors.get(pid, ()),
            os_lookup=self._os_lookup,
            owns=self._owns,
        )
        self.now = 1000.0

    def _owns(self, pid: int, proto: int, sport: int, dst: bytes, dport: int) -> bool | None:
        self.owner_checks.append((pid, sport))
        return None if self.sockets is None else sport in self.sockets.get(pid, set())

    def _os_lookup(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> int | None:
        self.lookups.append((proto, sport))
        return self.os_owner

    def route(self, packet: bytearray) -> PacketAction:
        return self.router.route(packet, len(packet), self.now, lambda: "meta")

    def connect(self, pid: int, dst: bytes = WEB, dport: int = 80, proto: int = IPPROTO_TCP) -> None:
        self.router.connect_event(proto, dst, dport, pid, self.now)


def syn(sport: int = 40000, dst: bytes = WEB, dport: int = 80, src: bytes = APP) -> bytearray:
    return build_packet(src, dst, IPPROTO_TCP, sport, dport, tcp_flags=TCP_SYN, seq=77)


def view(packet: bytearray) -> PacketView:
    v = PacketView()
    assert v.parse(packet, len(packet))
    return v


def test_app_routed_to_tunnel_is_hairpinned_to_its_proxy_and_found_by_nat_lookup() -> None:
    env = Env()
    env.connect(100)
    packet = syn()
    assert env.route(packet) is PacketAction.INJECT_INBOUND
    v = view(packet)
    assert (v.src_addr, v.src_port, v.dst_addr, v.dst_port) == (WEB, 40000, APP, PROXY_TCP)
    assert v.checksums_valid()
    entry = env.router.nat_lookup("tcp", "198.18.0.10", 40000)
    assert entry is not None
    assert (entry.orig_dst_ip, entry.orig_dst_port, entry.pid, entry.exe) == (
        "198.18.0.10",
        80,
        100,
        PIDS[100],
    )
    assert env.router.nat_lookup("tcp", "::ffff:198.18.0.10", 40000) is entry


def test_proxy_reply_is_rewritten_to_come_from_the_original_destination() -> None:
    env = Env()
    env.connect(100)
    env.route(syn())
    reply = build_packet(APP, WEB, IPPROTO_TCP, PROXY_TCP, 40000, b"hello", tcp_flags=TCP_ACK | TCP_SYN)
    assert env.route(reply) is PacketAction.INJECT_INBOUND
    v = view(reply)
    assert (v.src_addr, v.src_port, v.dst_addr, v.dst_port) == (WEB, 80, APP, 40000)
    assert v.checksums_valid()


def test_one_app_port_to_two_ports_of_one_host_both_reach_the_proxy_as_different_peers() -> None:
    # Linux gives one local port to connections to different destinations: the proxy, which sees only
    # (original address, port), must still tell them apart.
    env = Env()
    env.connect(100, dport=80)
    env.connect(100, dport=443)
    web, tls = syn(dport=80), syn(dport=443)
    assert env.route(web) is PacketAction.INJECT_INBOUND and env.route(tls) is PacketAction.INJECT_INBOUND
    assert view(web).src_port == 40000
    peer_port = view(tls).src_port
    assert peer_port != 40000 and view(tls).checksums_valid()
    first = env.router.nat_lookup("tcp", "198.18.0.10", 40000)
    second = env.router.nat_lookup("tcp", "198.18.0.10", peer_port)
    assert first is not None and second is not None
    assert (first.orig_dst_port, second.orig_dst_port) == (80, 443)
    # The proxy answers the translated peer: the app gets it on its own port, from port 443.
    reply = build_packet(APP, WEB, IPPROTO_TCP, PROXY_TCP, peer_port, tcp_flags=TCP_ACK | TCP_SYN)
    assert env.route(reply) is PacketAction.INJECT_INBOUND
    v = view(reply)
    assert (v.src_port, v.dst_port) == (443, 40000) and v.checksums_valid()
    # And the app's next packet of that flow keeps going to the same translated peer.
    ack = build_packet(APP, WEB, IPPROTO_TCP, 40000, 443, b"hello", tcp_flags=TCP_ACK)
    assert env.route(ack) is PacketAction.INJECT_INBOUND and view(ack).src_port == peer_port


def test_a_new_connection_on_a_reused_port_is_decided_afresh_a_retransmit_is_not() -> None:
    # app-direct's connection from port 40000 ends; the kernel hands the same port to app-socks for the
    # same server while the old entry still lingers: app-socks must not inherit "direct".
    env = Env()
    env.connect(200)
    assert env.route(syn()) is PacketAction.REINJECT
    assert env.route(build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_FIN | TCP_ACK)) is (
        PacketAction.REINJECT
    )
    env.connect(100)
    again = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN, seq=9000)
    assert env.route(again) is PacketAction.INJECT_INBOUND, "the new owner's route, not the old flow's"
    assert [e.pid for e in env.router.connections()] == [100]
    retransmit = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN, seq=9000)
    assert env.route(retransmit) is PacketAction.INJECT_INBOUND and env.router.stats.new_flows == 2


def test_a_closed_udp_sockets_flow_ends_so_the_next_owner_of_its_port_gets_its_own_route() -> None:
    env = Env()
    env.router.connect_event(IPPROTO_UDP, WEB, 53, 200, env.now, local_port=5000)  # app-direct
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"q1")) is PacketAction.REINJECT
    env.router.flow_deleted(IPPROTO_UDP, APP, 5000, WEB, 53)  # its socket closed
    assert env.router.connections() == []
    env.router.connect_event(IPPROTO_UDP, WEB, 53, 100, env.now, local_port=5000)  # app-socks, same port
    datagram = build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"q2")
    assert env.route(datagram) is PacketAction.INJECT_INBOUND and view(datagram).dst_port == PROXY_UDP
    env.router.flow_deleted(IPPROTO_UDP, APP, 5001, WEB, 53)  # another socket's: nothing of ours
    assert [e.pid for e in env.router.connections()] == [100]


def test_the_loop_ends_udp_flows_on_flow_deleted_events() -> None:
    env = Env()
    established = SimpleNamespace(
        kind=1, pid=200, proto=IPPROTO_UDP, local_addr=APP, local_port=5000, remote_addr=WEB, remote_port=53
    )
    deleted = SimpleNamespace(**{**vars(established), "kind": 2})
    network = FakeNetwork([build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"q")])
    events = FakeEvents([established])
    loop = RouterLoop(env.router, network, [events], accept_pid={200}.__contains__)
    loop.drain_events(env.now)
    assert env.route(bytearray(network.incoming[0])) is PacketAction.REINJECT
    assert len(env.router.connections()) == 1
    events.events.append(deleted)
    loop.drain_events(env.now)
    assert env.router.connections() == []


def test_reply_for_an_unknown_flow_is_dropped_not_leaked() -> None:
    env = Env()
    stray = build_packet(APP, WEB, IPPROTO_TCP, PROXY_TCP, 41000, b"x")
    assert env.route(stray) is PacketAction.DROP
    assert env.router.stats.orphan_replies == 1


def test_first_packet_waits_for_its_connect_event() -> None:
    env = Env()
    assert env.route(syn()) is PacketAction.HOLD
    retransmit = syn()
    assert env.route(retransmit) is PacketAction.HOLD
    assert env.router.take_outgoing() == []
    env.connect(100)
    out = env.router.take_outgoing()
    assert len(out) == 2 and all(o.inbound and o.meta == "meta" for o in out)
    assert view(out[0].data).dst_port == PROXY_TCP
    assert env.lookups == []


def test_two_apps_connecting_to_one_server_at_once_each_get_their_own_route() -> None:
    # Their CONNECT events and SYNs arrive in opposite orders: the events say only "someone connects to
    # WEB:80", so the owner is confirmed from each candidate's own sockets.
    env = Env()
    env.sockets = {100: {40001}, 200: {40002}}
    env.connect(200)
    env.connect(100)
    socks_syn, direct_syn = syn(sport=40001), syn(sport=40002)
    assert env.route(socks_syn) is PacketAction.INJECT_INBOUND and view(socks_syn).dst_port == PROXY_TCP
    assert env.route(direct_syn) is PacketAction.REINJECT and view(direct_syn).dst_port == 80
    assert {(e.app_port, e.pid) for e in env.router.connections()} == {(40001, 100), (40002, 200)}


def test_one_app_connecting_twice_needs_no_owner_check() -> None:
    env = Env()
    env.sockets = {}
    env.connect(100)
    env.connect(100)
    assert env.route(syn(sport=40001)) is PacketAction.INJECT_INBOUND
    assert env.route(syn(sport=40002)) is PacketAction.INJECT_INBOUND
    assert env.owner_checks == []


def test_when_the_os_cannot_tell_the_oldest_event_wins() -> None:
    env = Env()
    env.connect(200)
    env.connect(100)
    assert env.route(syn(sport=40001)) is PacketAction.REINJECT  # pid 200's event, the oldest
    assert env.owner_checks == [(200, 40001), (100, 40001)]
    assert env.route(syn(sport=40002)) is PacketAction.INJECT_INBOUND


def test_an_event_of_another_app_is_not_taken_when_neither_owns_the_socket() -> None:
    env = Env()
    env.sockets = {100: set(), 200: set()}
    env.os_owner = 300
    env.connect(200)
    env.connect(100)
    assert env.route(syn(sport=40003)) is PacketAction.HOLD
    env.router.poll(env.now + 1.0)
    assert env.lookups == [(IPPROTO_TCP, 40003)]
    assert [e.pid for e in env.router.connections()] == [300]


def test_held_flows_of_two_apps_are_matched_to_their_own_events() -> None:
    env = Env()
    env.sockets = {100: {40001}, 200: {40002}}
    assert env.route(syn(sport=40001)) is PacketAction.HOLD
    assert env.route(syn(sport=40002)) is PacketAction.HOLD
    env.connect(200)  # the second flow's owner speaks first
    (out,) = env.router.take_outgoing()
    assert view(out.data).src_port == 40002 and not out.inbound
    env.connect(100)
    (out,) = env.router.take_outgoing()
    assert view(out.data).src_port == 40001 and out.inbound and view(out.data).dst_port == PROXY_TCP


def test_events_that_came_while_a_batch_was_read_are_pulled_before_claiming() -> None:
    env = Env()
    env.sockets = {100: {40001}, 200: {40002}}
    env.connect(200)  # already given to the router
    late = [(IPPROTO_TCP, WEB, 80, 100, 0)]  # still on the handle when pid 100's SYN is read
    env.router.event_source = lambda: [late.pop()] if late else []
    packet = syn(sport=40001)
    assert env.route(packet) is PacketAction.INJECT_INBOUND, "pid 200's event must not be taken for it"
    assert env.route(syn(sport=40002)) is PacketAction.REINJECT


def test_a_held_flow_whose_event_was_pulled_by_another_flow_is_decided_at_the_next_poll() -> None:
    env = Env()
    env.sockets = {100: {40001}, 200: {40002}}
    assert env.route(syn(sport=40001)) is PacketAction.HOLD  # pid 100's event is not in yet
    late = [(IPPROTO_TCP, WEB, 80, 100, 0), (IPPROTO_TCP, WEB, 80, 200, 0)]
    env.router.event_source = lambda: [late.pop(0) for _ in range(len(late))]
    assert env.route(syn(sport=40002)) is PacketAction.REINJECT  # pid 200: direct, decided at once
    assert env.router.next_deadline() == env.now, "the held flow need not wait for its hold timeout"
    env.router.poll(env.now)
    (out,) = env.router.take_outgoing()
    assert view(out.data).src_port == 40001 and view(out.data).dst_port == PROXY_TCP and out.inbound
    assert env.lookups == []


def test_without_event_the_os_tables_are_asked_after_the_hold_timeout() -> None:
    env = Env()
    env.os_owner = 200
    assert env.route(syn()) is PacketAction.HOLD
    env.router.poll(env.now + 0.001)
    assert env.router.take_outgoing() == []
    env.router.poll(env.now + 1.0)
    out = env.router.take_outgoing()
    assert env.lookups == [(IPPROTO_TCP, 40000)]
    assert len(out) == 1 and not out[0].inbound and view(out[0].data).dst_port == 80


def test_a_connect_event_that_comes_after_its_flow_was_looked_up_is_not_taken_by_the_next_app() -> None:
    # Under load an app's CONNECT event can come after the hold timeout, when its flow was decided by the
    # OS lookup already. Kept, it would be the only event waiting for that server when another app's
    # first packet comes before that app's own event: that flow would go the first app's way.
    env = Env()
    env.os_owner = 100  # app-socks
    assert env.route(syn(sport=40001)) is PacketAction.HOLD
    env.now += 1.0
    env.router.poll(env.now)
    (out,) = env.router.take_outgoing()
    assert out.inbound and view(out.data).dst_port == PROXY_TCP  # app-socks's, found by the lookup
    env.connect(100)  # ...and its event, late
    env.now += 0.1
    assert env.route(syn(sport=40002)) is PacketAction.HOLD  # app-direct's SYN, before its own event
    env.connect(200)
    (out,) = env.router.take_outgoing()
    assert not out.inbound and view(out.data).dst_port == 80  # direct, as app-direct's rule says
    assert {(e.app_port, e.pid) for e in env.router.connections()} == {(40001, 100), (40002, 200)}


def test_an_old_connect_event_whose_packet_never_came_is_confirmed_before_another_flow_takes_it() -> None:
    # glibc's getaddrinfo connects a UDP socket to each address it sorts and sends nothing: that CONNECT
    # waits, alone, for a flow that never comes. Another app's flow to the same server, whose own event
    # is not in yet, must not take it.
    env = Env()
    env.sockets = {100: set(), 200: {40002}}
    env.connect(100, dport=443, proto=IPPROTO_UDP)  # app-socks only probes
    env.now += 0.5
    packet = build_packet(APP, WEB, IPPROTO_UDP, 40002, 443, b"quic")
    assert env.route(packet) is PacketAction.HOLD  # app-direct's datagram: pid 100 does not own it
    assert env.owner_checks == [(100, 40002)]
    env.connect(200, dport=443, proto=IPPROTO_UDP)
    (out,) = env.router.take_outgoing()
    assert not out.inbound and view(out.data).dst_port == 443  # direct
    assert [(e.app_port, e.pid) for e in env.router.connections()] == [(40002, 200)]


def test_a_fresh_single_connect_event_is_taken_without_asking_the_os() -> None:
    env = Env()
    env.sockets = {100: {40001}}
    env.connect(100)
    env.now += 0.01
    assert env.route(syn(sport=40001)) is PacketAction.INJECT_INBOUND
    assert env.owner_checks == []


def test_an_app_connecting_again_after_a_looked_up_flow_is_still_found() -> None:
    env = Env()
    env.os_owner = 100
    assert env.route(syn(sport=40001)) is PacketAction.HOLD
    env.now += 1.0
    env.router.poll(env.now)
    env.router.take_outgoing()
    env.connect(100)  # the first flow's late event: consumed by it
    env.connect(100)  # the second connection's
    assert env.route(syn(sport=40002)) is PacketAction.INJECT_INBOUND
    assert {(e.app_port, e.pid) for e in env.router.connections()} == {(40001, 100), (40002, 100)}
    assert env.lookups == [(IPPROTO_TCP, 40001)]


def test_a_lookup_answering_later_keeps_the_flow_held_until_its_answer_or_the_lookup_timeout() -> None:
    env = Env(default="socks")
    env.os_owner = OWNER_PENDING  # the lookup answers later, as a connect event with the local port
    assert env.route(syn()) is PacketAction.HOLD
    env.router.poll(env.now + 0.1)
    assert env.router.take_outgoing() == [] and env.lookups == [(IPPROTO_TCP, 40000)]
    env.router.connect_event(IPPROTO_TCP, WEB, 80, 200, env.now + 0.2, local_port=40000)
    (out,) = env.router.take_outgoing()
    assert not out.inbound and view(out.data).dst_port == 80  # app-direct's, not the default tunnel

    env.route(syn(40001))  # no answer comes: after LOOKUP_TIMEOUT the owner is unknown, asked once
    env.router.poll(env.now + 0.1)
    env.router.poll(env.now + 0.1 + LOOKUP_TIMEOUT / 2)
    assert env.router.take_outgoing() == []
    env.router.poll(env.now + 0.2 + LOOKUP_TIMEOUT)
    (out,) = env.router.take_outgoing()
    assert out.inbound and view(out.data).dst_port == PROXY_TCP
    assert env.lookups == [(IPPROTO_TCP, 40000), (IPPROTO_TCP, 40001)]
    assert env.router.stats.unknown_owner == 1


def test_unknown_owner_gets_the_default_route_and_is_counted() -> None:
    env = Env(default="socks")
    env.route(syn())
    env.router.poll(env.now + 1.0)
    (out,) = env.router.take_outgoing()
    assert out.inbound and view(out.data).dst_port == PROXY_TCP
    assert env.router.stats.unknown_owner == 1


def test_a_syn_flood_to_one_server_does_not_stop_other_apps_new_flows() -> None:
    # 3000 SYNs without connect events (raw packets, or events lost) from one app to one server.
    env = Env()
    flood = ipaddress.ip_address("198.18.0.66").packed
    results = [env.route(syn(sport=20000 + n, dst=flood)) for n in range(3000)]
    assert results.count(PacketAction.HOLD) == MAX_HELD_PER_REMOTE
    assert env.router.stats.held_remote_full == 3000 - MAX_HELD_PER_REMOTE
    env.connect(100)
    assert env.route(syn(sport=40001)) is PacketAction.INJECT_INBOUND, "app-socks decided at once"
    assert env.route(syn(sport=40002, dport=443)) is PacketAction.HOLD, "an app without event still waits"


def test_held_packets_are_bounded_in_bytes_and_freed_when_decided(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packet_router, "MAX_HELD_BYTES", 4000)
    env = Env()

    def datagram(sport: int, dst: bytes = WEB) -> bytearray:
        return build_packet(APP, dst, IPPROTO_UDP, sport, 443, b"x" * 1372)  # 1400 bytes

    assert [env.route(datagram(5000 + n)) for n in range(3)] == [PacketAction.HOLD] * 3
    assert env.route(datagram(5003, dst=NAS)) is PacketAction.DROP, "4200 bytes held already"
    assert env.route(datagram(5000)) is PacketAction.DROP, "nor more of a held flow"
    assert env.router.stats.hold_overflow == 2
    env.router.poll(env.now + 1.0)  # decided (unknown owner: direct), their bytes freed
    assert len(env.router.take_outgoing()) == 3
    assert env.route(datagram(5004)) is PacketAction.HOLD


def test_os_lookups_are_budgeted_per_poll_and_the_rest_follow_at_once() -> None:
    env = Env()
    env.os_owner = 200
    for n in range(40):
        assert env.route(syn(sport=30000 + n)) is PacketAction.HOLD
    env.now += 1.0
    env.router.os_lookups_per_poll = 16
    env.router.poll(env.now)
    assert len(env.lookups) == 16 and len(env.router.take_outgoing()) == 16
    assert env.router.next_deadline() == env.now, "the rest wait for the next run, not for a tick"
    env.router.poll(env.now)
    env.router.poll(env.now)
    assert len(env.lookups) == 40 and env.router.next_deadline() is None
    assert [view(o.data).src_port for o in env.router.take_outgoing()] == list(range(30016, 30040))


def test_direct_app_passes_unchanged() -> None:
    env = Env()
    env.connect(200)
    packet = syn()
    original = bytes(packet)
    assert env.route(packet) is PacketAction.REINJECT
    assert bytes(packet) == original
    data = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, b"GET /", tcp_flags=TCP_ACK)
    assert env.route(data) is PacketAction.REINJECT


def test_drop_app_is_refused_with_a_reset() -> None:
    env = Env()
    env.connect(300)
    assert env.route(syn()) is PacketAction.DROP
    (rst,) = env.router.take_outgoing()
    v = view(rst.data)
    assert rst.inbound and v.tcp_flags == TCP_RST | TCP_ACK and v.tcp_ack == 78
    assert (v.src_addr, v.src_port, v.dst_addr, v.dst_port) == (WEB, 80, APP, 40000)


def test_own_traffic_always_passes() -> None:
    env = Env(default="socks")
    env.connect(999, dport=1080)
    assert env.route(syn(dport=1080)) is PacketAction.REINJECT


def test_lan_destinations_bypass_tunnels_unless_the_tunnel_says_otherwise() -> None:
    env = Env()
    env.connect(100, dst=NAS)
    assert env.route(syn(dst=NAS)) is PacketAction.REINJECT
    env.connect(600, dst=NAS)
    assert env.route(syn(sport=40001, dst=NAS)) is PacketAction.INJECT_INBOUND


@pytest.mark.parametrize(
    ("address", "lan"),
    [
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("172.31.255.255", True),
        ("172.32.0.1", False),
        ("192.168.0.1", True),
        ("169.254.1.1", True),
        ("127.0.0.1", True),
        ("198.18.0.10", False),
        ("100.64.0.1", False),
        ("8.8.8.8", False),
        ("fc00::1", True),
        ("fdff::1", True),
        ("fe80::1", True),
        ("febf::1", True),
        ("fec0::1", False),
        ("::1", True),
        ("2001:2::10", False),
    ],
)
def test_lan_list_is_exactly_the_designs(address: str, lan: bool) -> None:
    assert is_lan_destination(ipaddress.ip_address(address).packed) is lan


def test_block_app_is_dropped_while_its_tunnel_is_down_and_retried_when_up() -> None:
    env = Env()
    env.states["socks"] = TunnelState.DOWN
    env.connect(400)
    assert env.route(syn()) is PacketAction.DROP
    env.states["socks"] = TunnelState.UP
    env.router.tunnel_state_changed("socks", TunnelState.UP)
    env.router.poll(env.now)
    env.connect(400)
    assert env.route(syn()) is PacketAction.INJECT_INBOUND


def test_allow_direct_app_goes_direct_while_its_tunnel_is_down() -> None:
    env = Env()
    env.states["socks"] = TunnelState.CONNECTING
    env.connect(100)
    assert env.route(syn()) is PacketAction.REINJECT


def test_tunnel_down_resets_fail_closed_flows_and_leaves_allow_direct_ones() -> None:
    env = Env()
    env.connect(400)
    env.route(syn(sport=40000))
    env.connect(100)
    env.route(syn(sport=40001))
    env.router.take_outgoing()
    env.router.tunnel_state_changed("socks", TunnelState.DOWN)
    env.router.poll(env.now)
    blocked = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, b"more", tcp_flags=TCP_ACK, seq=5, ack=9000)
    assert env.route(blocked) is PacketAction.DROP
    (rst,) = env.router.take_outgoing()
    assert view(rst.data).tcp_flags == TCP_RST and view(rst.data).tcp_seq == 9000
    allowed = build_packet(APP, WEB, IPPROTO_TCP, 40001, 80, b"more", tcp_flags=TCP_ACK)
    assert env.route(allowed) is PacketAction.INJECT_INBOUND


def test_tunnel_down_resets_a_waiting_app_at_once() -> None:
    env = Env()
    env.connect(400)
    env.route(syn())
    env.route(build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, b"GET", tcp_flags=TCP_ACK, seq=78, ack=5000))
    assert env.router.take_outgoing() == []
    env.router.tunnel_state_changed("socks", TunnelState.DOWN)
    env.router.poll(env.now)
    (rst,) = env.router.take_outgoing()
    v = view(rst.data)
    assert rst.inbound and rst.meta == "meta"
    assert (v.src_addr, v.src_port, v.dst_addr, v.dst_port) == (WEB, 80, APP, 40000)
    assert v.tcp_flags == TCP_RST and v.tcp_seq == 5000 and v.checksums_valid()


def test_udp_through_a_tunnel_without_udp_is_dropped() -> None:
    env = Env()
    env.connect(500, dport=443, proto=IPPROTO_UDP)
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 443, b"quic")) is PacketAction.DROP
    assert env.router.stats.unroutable == 1


def test_udp_hairpin_and_reply() -> None:
    env = Env()
    env.router.connect_event(IPPROTO_UDP, WEB, 7, 100, env.now, local_port=5000)
    out = build_packet(APP, WEB, IPPROTO_UDP, 5000, 7, b"ping")
    assert env.route(out) is PacketAction.INJECT_INBOUND
    assert view(out).dst_port == PROXY_UDP and view(out).checksums_valid()
    back = build_packet(APP, WEB, IPPROTO_UDP, PROXY_UDP, 5000, b"pong")
    assert env.route(back) is PacketAction.INJECT_INBOUND
    v = view(back)
    assert (v.src_addr, v.src_port, v.dst_port) == (WEB, 7, 5000) and v.checksums_valid()


def test_ipv6_flows_are_tunnelled_too() -> None:
    env = Env()
    env.connect(100, dst=WEB6)
    packet = syn(src=APP6, dst=WEB6)
    assert env.route(packet) is PacketAction.INJECT_INBOUND
    v = view(packet)
    assert (v.src_addr, v.dst_addr, v.dst_port) == (WEB6, APP6, PROXY_TCP) and v.checksums_valid()
    assert env.router.nat_lookup("tcp", "2001:2::10", 40000) is not None


def test_fragments_of_tunnelled_udp_are_dropped_all_of_them() -> None:
    env = Env()
    env.connect(100, dport=7, proto=IPPROTO_UDP)
    env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 7, b"first"))
    first = build_packet(APP, WEB, IPPROTO_UDP, 5000, 7, b"x" * 32)
    first[4:6], first[6:8] = b"\x12\x34", struct.pack("!H", 0x2000)
    assert env.route(first) is PacketAction.DROP
    later = bytearray(first)
    later[6:8] = struct.pack("!H", 4)
    assert env.route(later) is PacketAction.DROP
    unrelated = bytearray(later)
    unrelated[4:6] = b"\x99\x99"
    assert env.route(unrelated) is PacketAction.REINJECT


def _fragments(sport: int = 5000, ident: bytes = b"\x12\x34") -> tuple[bytearray, bytearray]:
    """A UDP datagram's first fragment (ports, MF set) and a later one (offset 4, no ports)."""
    first = build_packet(APP, WEB, IPPROTO_UDP, sport, 7, b"x" * 32)
    first[4:6], first[6:8] = ident, struct.pack("!H", 0x2000)
    later = bytearray(first)
    later[6:8] = struct.pack("!H", 4)
    return first, later


def test_later_fragments_of_a_dropped_flow_are_dropped_too() -> None:
    env = Env()
    env.states["socks"] = TunnelState.DOWN
    env.connect(400, dport=7, proto=IPPROTO_UDP)  # app-block: fail closed while its tunnel is down
    first, later = _fragments()
    assert env.route(first) is PacketAction.DROP
    assert env.route(later) is PacketAction.DROP, "a later fragment of a blocked app left directly"
    again, again_later = _fragments(ident=b"\x12\x35")  # the next datagram of the same, known flow
    assert env.route(again) is PacketAction.DROP and env.route(again_later) is PacketAction.DROP


def test_later_fragments_wait_with_their_held_first_fragment_and_share_its_fate() -> None:
    env = Env()
    first, later = _fragments()
    assert env.route(first) is PacketAction.HOLD
    assert env.route(later) is PacketAction.HOLD, "passed on before the owner is known, it could leak"
    env.router.connect_event(IPPROTO_UDP, WEB, 7, 300, env.now)  # app-drop
    assert env.router.take_outgoing() == []
    first, later = _fragments(sport=5001, ident=b"\x22\x22")
    assert env.route(first) is PacketAction.HOLD and env.route(later) is PacketAction.HOLD
    env.router.connect_event(IPPROTO_UDP, WEB, 7, 200, env.now)  # app-direct: both go, in order
    assert [(bytes(o.data), o.inbound) for o in env.router.take_outgoing()] == [
        (bytes(first), False),
        (bytes(later), False),
    ]


def test_flows_expire() -> None:
    env = Env()
    env.router.connect_event(IPPROTO_UDP, WEB, 7, 100, env.now, local_port=5000)
    env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 7, b"ping"))
    env.connect(100)
    env.route(syn())
    env.route(build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_RST | TCP_ACK))
    assert len(env.router.table) == 2
    env.router.poll(env.now + 11)
    assert [e.proto for e in env.router.connections()] == [IPPROTO_UDP]
    env.router.poll(env.now + 61)
    assert env.router.connections() == []


def test_tcp_flow_closes_after_fin_both_ways() -> None:
    env = Env()
    env.connect(100)
    env.route(syn())
    env.route(build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_FIN | TCP_ACK))
    env.route(build_packet(APP, WEB, IPPROTO_TCP, PROXY_TCP, 40000, tcp_flags=TCP_FIN | TCP_ACK))
    env.router.poll(env.now + 10.5)
    assert env.router.connections() == []


def test_mid_stream_packets_of_unknown_connections_pass() -> None:
    env = Env(default="socks")
    packet = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, b"old", tcp_flags=TCP_ACK)
    assert env.route(packet) is PacketAction.REINJECT
    assert env.router.stats.new_flows == 0


def _data(sport: int = 40000, payload: bytes = b"secret", flags: int = TCP_ACK) -> bytearray:
    return build_packet(APP, WEB, IPPROTO_TCP, sport, 80, payload, tcp_flags=flags, seq=78, ack=9000)


def test_a_block_apps_flow_never_leaves_directly_after_its_tunnel_went_down() -> None:
    env = Env()
    env.connect(400)
    assert env.route(syn()) is PacketAction.INJECT_INBOUND
    env.router.tunnel_state_changed("socks", TunnelState.DOWN)
    env.router.poll(env.now)
    env.router.take_outgoing()
    for n in range(3):  # the app goes on sending: the reset packet, then its retransmits
        assert env.route(_data()) is PacketAction.DROP, f"packet {n} left directly, payload and all"
        (rst,) = env.router.take_outgoing()
        assert rst.inbound and view(rst.data).tcp_flags & TCP_RST and view(rst.data).dst_port == 40000
    assert env.router.stats.tombstone_drops == 2


def test_a_tunnelled_flow_idle_until_it_expired_is_dropped_not_sent_directly() -> None:
    env = Env()
    env.connect(100)
    env.route(syn())
    env.route(build_packet(APP, WEB, IPPROTO_TCP, PROXY_TCP, 40000, tcp_flags=TCP_ACK | TCP_SYN))
    env.now += 7440 + 4 * 60  # 2 h 4 min idle, and then some
    env.router.poll(env.now)
    assert env.router.connections() == []
    assert env.route(_data()) is PacketAction.DROP
    (rst,) = env.router.take_outgoing()
    assert view(rst.data).tcp_flags & TCP_RST


def test_a_tunnelled_flow_closed_both_ways_does_not_leak_its_late_packets() -> None:
    env = Env()
    env.connect(100)
    env.route(syn())
    env.route(_data(flags=TCP_FIN | TCP_ACK, payload=b""))
    env.route(build_packet(APP, WEB, IPPROTO_TCP, PROXY_TCP, 40000, tcp_flags=TCP_FIN | TCP_ACK))
    env.now += 10.5
    env.router.poll(env.now)
    assert env.router.connections() == []
    assert env.route(_data(payload=b"late")) is PacketAction.DROP


def test_a_new_connection_on_a_forgotten_tunnelled_flows_port_is_decided_afresh() -> None:
    env = Env()
    env.connect(400)
    env.route(syn())
    env.router.tunnel_state_changed("socks", TunnelState.DOWN)
    env.router.poll(env.now)
    assert env.route(_data()) is PacketAction.DROP  # reset and forgotten
    env.connect(200)  # app-direct gets the same port for the same server
    again = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN, seq=5000)
    assert env.route(again) is PacketAction.REINJECT
    assert env.route(_data(payload=b"ok")) is PacketAction.REINJECT, "its own packets pass"


def test_tombstones_go_after_their_age() -> None:
    env = Env()
    env.connect(100)
    env.route(syn())
    env.now += 75
    env.router.poll(env.now)  # never answered: expired
    assert env.route(_data()) is PacketAction.DROP
    env.now += env.router.tombstones.age
    env.router.poll(env.now)
    assert len(env.router.tombstones) == 0
    assert env.route(_data()) is PacketAction.REINJECT, "as old as a connection older than the router"


def test_a_block_apps_udp_flow_stays_blocked_when_the_os_no_longer_names_its_owner() -> None:
    env = Env()  # unknown owners go direct
    env.router.connect_event(IPPROTO_UDP, WEB, 53, 400, env.now, local_port=5000)
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"q1")) is PacketAction.INJECT_INBOUND
    env.router.tunnel_state_changed("socks", TunnelState.DOWN)
    env.states["socks"] = TunnelState.DOWN
    env.router.poll(env.now)
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"q2")) is PacketAction.DROP  # reset
    # The next datagram is a new flow: no connect event (the socket is old), the OS lookup finds nobody.
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"q3")) is PacketAction.HOLD
    env.router.poll(env.now + 1.0)
    assert env.router.take_outgoing() == [], "went direct with the default route"
    assert [(e.pid, e.verdict.name) for e in env.router.connections()] == [(400, "DROP")]
    assert env.router.stats.tombstone_owners == 1


def test_a_closed_udp_socket_takes_its_forgotten_flows_owner_along() -> None:
    env = Env()
    env.router.connect_event(IPPROTO_UDP, WEB, 53, 400, env.now, local_port=5000)  # app-block
    env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"q1"))
    env.now += 61
    env.router.poll(env.now)  # expired: a tombstone naming pid 400
    env.router.flow_deleted(IPPROTO_UDP, APP, 5000, WEB, 53)  # then its socket closed
    env.os_owner = None  # the port's next owner is not found by the OS either: the default route
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 5000, 53, b"other app")) is PacketAction.HOLD
    env.router.poll(env.now + 1.0)
    assert [(e.pid, e.verdict.name) for e in env.router.connections()] == [(None, "PASS")]


@settings(max_examples=150)
@given(st.binary(max_size=100))
def test_garbage_never_raises(data: bytes) -> None:
    env = Env(default="socks")
    env.router.route(bytearray(data), len(data), 0.0, lambda: None)


def _settings() -> RouterSettings:
    return RouterSettings((Rule("app-socks", "socks"),), "direct", {"socks": TunnelRoute(PROXY_TCP)}, {})


def test_router_process_mirror_answers_nat_lookups_from_announcements() -> None:
    announced: list[FromRouter] = []
    env = Env()
    router = PacketRouter(
        RuleEngine([Rule("app-socks", "socks")], "direct", Platform.POSIX),
        env.states.get,
        {"socks": TunnelRoute(PROXY_TCP)},
        exe_of=PIDS.get,
        on_tunnelled=lambda e: announced.append(nat_announcement(e)),
        on_forgotten=lambda e: announced.append(nat_withdrawal(e)),
    )
    router.connect_event(IPPROTO_TCP, WEB, 80, 100, 0.0)
    packet = syn()
    router.route(packet, len(packet), 0.0, lambda: None)
    mirror = RouterProcess(_settings(), tuple)
    assert [type(m) for m in announced] == [FlowTunnelled]
    for message in announced:
        mirror._apply(message)
    entry = mirror.nat_lookup("tcp", "198.18.0.10", 40000)
    assert entry is not None and (entry.orig_dst_port, entry.pid, entry.exe) == (80, 100, PIDS[100])
    router.route(build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_RST), 40, 1.0, lambda: None)
    router.poll(100.0)
    assert [type(m) for m in announced[1:]] == [FlowForgotten]
    for message in announced[1:]:
        mirror._apply(message)
    assert mirror.nat_lookup("tcp", "198.18.0.10", 40000) is None


def test_router_process_that_cannot_open_its_handles_fails_to_start_with_the_reason() -> None:
    # ``tuple`` stands in for a handle factory that returns nothing usable.
    process = RouterProcess(_settings(), tuple)
    with pytest.raises(RuntimeError, match="packet router process failed: ValueError"):
        process.start(timeout=30)


class FakeAddress:
    def __init__(self, outbound: bool = True) -> None:
        self.outbound = outbound


class FakeNetwork:
    """A NETWORK handle without a kernel: packets queued by the test, sends recorded."""

    def __init__(self, packets: list[bytearray]) -> None:
        self.incoming = list(packets)
        self.sent: list[tuple[bytes, bool]] = []
        self.opened = self.closed = False

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.closed = True

    def fileno(self) -> int | None:
        return None  # no descriptor: the loop waits in recv_into, as on Windows

    def recv_into(self, buf: bytearray, c_buf: object, addr: FakeAddress, timeout_ms: int = 0) -> int:
        if not self.incoming:
            time.sleep(timeout_ms / 1000)
            return 0
        packet = self.incoming.pop(0)
        buf[: len(packet)] = packet
        addr.outbound = True
        return len(packet)

    def send(self, c_buf: bytearray, length: int, addr: FakeAddress) -> bool:
        self.sent.append((bytes(c_buf[:length]), addr.outbound))
        return True

    def refresh(self) -> bool:
        return False

    def new_buffer(self) -> tuple[bytearray, bytearray, FakeAddress]:
        buf = bytearray(65575)
        return buf, buf, FakeAddress()

    def copy_address(self, addr: FakeAddress) -> FakeAddress:
        return FakeAddress(addr.outbound)

    def set_inbound(self, addr: FakeAddress, inbound: bool = True) -> None:
        addr.outbound = not inbound

    def c_buffer(self, data: bytearray) -> bytearray:
        return data


class FakeEvents:
    def __init__(self, events: list[SimpleNamespace]) -> None:
        self.events = events

    def open(self) -> None: ...

    def close(self) -> None: ...

    def fileno(self) -> int | None:
        return None

    def recv(self, timeout_ms: int = 0) -> SimpleNamespace | None:
        return self.events.pop(0) if self.events else None


def _connect_event(pid: int, remote_port: int = 80) -> SimpleNamespace:
    return SimpleNamespace(
        kind=4, pid=pid, proto=IPPROTO_TCP, local_port=0, remote_addr=WEB, remote_port=remote_port
    )


def _run_loop(network: FakeNetwork, events: FakeEvents, accept: set[int], env: Env | None = None) -> None:
    env = env or Env()
    loop = RouterLoop(env.router, network, [events], accept_pid=accept.__contains__)
    loop.start()
    deadline = time.monotonic() + 2
    while network.incoming and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    loop.stop()
    assert loop.error is None and network.closed


def test_loop_reinjects_direct_flows_and_hairpins_tunnelled_ones_inbound() -> None:
    direct, tunnelled = syn(sport=40001), syn(sport=40002)
    network = FakeNetwork([direct, tunnelled])
    env = Env()
    env.sockets = {200: {40001}, 100: {40002}}
    _run_loop(network, FakeEvents([_connect_event(200), _connect_event(100)]), {100, 200}, env)
    (sent_direct, outbound_direct), (sent_tunnelled, outbound_tunnelled) = network.sent
    assert sent_direct == bytes(direct) and outbound_direct
    assert view(bytearray(sent_tunnelled)).dst_port == PROXY_TCP and not outbound_tunnelled


def test_loop_ignores_events_from_other_namespaces() -> None:
    network = FakeNetwork([syn()])
    # pid 100 (a tunnelled app) is not in our namespace: its event is ignored; the OS lookup finds no
    # owner, so the flow gets the default route (direct) after the hold timeout.
    _run_loop(network, FakeEvents([_connect_event(100)]), set())
    ((packet, outbound),) = network.sent
    assert view(bytearray(packet)).dst_port == 80 and outbound


def test_a_process_without_a_rule_follows_its_nearest_ancestor_with_one() -> None:
    PIDS[700] = "/usr/lib/browser/helper"
    PIDS[701] = "/usr/bin/tool"
    try:
        env = Env(
            default="direct",
            ancestors={
                700: ("/usr/bin/launcher", "/usr/bin/app-socks", "/usr/bin/app-http"),
                701: ("/usr/bin/app-socks",),
                200: ("/usr/bin/app-socks",),
            },
        )
        env.connect(700)
        assert env.route(syn(40000)) is PacketAction.INJECT_INBOUND  # app-socks's tunnel, not app-http's
        assert env.router.nat_lookup("tcp", "198.18.0.10", 40000) is not None
        env.connect(200)
        assert env.route(syn(40001)) is PacketAction.REINJECT  # app-direct's own rule wins
        env.connect(701)
        assert env.route(syn(40002)) is PacketAction.INJECT_INBOUND
        assert env.router.stats.inherited == 2
    finally:
        del PIDS[700], PIDS[701]


def test_a_flow_row_carries_the_bytes_seen_each_way_and_when_the_flow_began() -> None:
    env = Env()
    env.connect(100)
    first = syn()
    env.route(first)
    reply = build_packet(APP, WEB, IPPROTO_TCP, PROXY_TCP, 40000, b"x" * 500, tcp_flags=TCP_ACK | TCP_SYN)
    env.route(reply)
    data = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, b"y" * 200, tcp_flags=TCP_ACK)
    env.now += 3.0
    env.route(data)
    (entry,) = env.router.connections()
    row = flow_row(entry)
    assert (row.packets_out, row.bytes_out, row.bytes_in) == (2, len(first) + len(data), len(reply))
    assert row.created == 1000.0


# -- service: rules (Windows): processes matched by the service they host, by pid -------------------------

SVCHOST = r"C:\Windows\System32\svchost.exe"


class Services:
    """The Service Control Manager as the router asks it: service name → pids; counts the questions."""

    def __init__(self, table: dict[str, set[int]]) -> None:
        self.table = table
        self.asked = 0

    def __call__(self, name: str) -> set[int]:
        self.asked += 1
        return self.table.get(name, set())


def service_router(services: Services, rules: list[Rule]) -> tuple[PacketRouter, dict[int, str]]:
    exes = {10: SVCHOST, 11: SVCHOST, 12: SVCHOST, 20: r"C:\Apps\curl.exe", 30: r"C:\Apps\game.exe"}
    router = PacketRouter(
        RuleEngine(rules, "direct", Platform.WINDOWS),
        {"socks": TunnelState.UP}.get,
        {"socks": TunnelRoute(PROXY_TCP, PROXY_UDP)},
        own_pids={999},
        exe_of=exes.get,
        os_lookup=None,
        owns=None,
        service_pids=services,
    )
    return router, exes


def decided(router: PacketRouter, pid: int, sport: int, now: float) -> PacketAction:
    router.connect_event(IPPROTO_TCP, WEB, 80, pid, now)
    packet = syn(sport=sport)
    return router.route(packet, len(packet), now, lambda: None)


def test_a_service_rule_takes_the_process_hosting_that_service_and_no_other_svchost() -> None:
    services = Services({"dnscache": {10}})
    router, _ = service_router(services, [Rule("service:Dnscache", "socks", FallbackPolicy.BLOCK)])
    assert decided(router, 10, 40000, 1.0) is PacketAction.INJECT_INBOUND  # Dnscache's svchost: tunnelled
    assert decided(router, 11, 40001, 1.0) is PacketAction.REINJECT  # another svchost: its own route


def test_a_service_rule_matches_by_pid_even_when_the_exe_cannot_be_read() -> None:
    services = Services({"dnscache": {12}})
    router, exes = service_router(services, [Rule("service:Dnscache", "socks")])
    del exes[12]
    assert decided(router, 12, 40000, 1.0) is PacketAction.INJECT_INBOUND
    assert router.stats.unknown_owner == 0


def test_first_match_wins_between_exe_and_service_rules() -> None:
    services = Services({"dnscache": {10}})
    rules = [Rule("svchost.exe", "direct"), Rule("service:Dnscache", "socks")]
    router, _ = service_router(services, rules)
    assert decided(router, 10, 40000, 1.0) is PacketAction.REINJECT  # the exe rule comes first
    rules = [Rule("service:Dnscache", "socks"), Rule("svchost.exe", "direct")]
    router, _ = service_router(services, rules)
    assert decided(router, 10, 40000, 1.0) is PacketAction.INJECT_INBOUND


def test_a_restarted_service_is_matched_under_its_new_pid_and_the_scm_is_asked_boundedly() -> None:
    services = Services({"dnscache": {10}})
    router, _ = service_router(services, [Rule("service:Dnscache", "socks")])
    router.poll(0.0)
    assert decided(router, 10, 40000, 0.1) is PacketAction.INJECT_INBOUND
    services.table["dnscache"] = {11}  # Dnscache restarted in another svchost
    assert decided(router, 11, 40001, 0.2) is PacketAction.REINJECT  # read 0.2 s ago: not asked again yet
    asked = services.asked
    for sport in range(40100, 40150):  # many new flows of processes no rule names, within a second
        decided(router, 20, sport, 0.5)
        decided(router, 30, sport + 100, 0.5)
    assert services.asked == asked  # no SCM question per flow
    assert decided(router, 11, 40002, 1.3) is PacketAction.INJECT_INBOUND  # an unknown pid, a second on
    assert services.asked == asked + 1
    router.poll(7.0)  # and every few seconds anyway
    assert services.asked == asked + 2


def test_new_rules_are_matched_against_the_services_at_once() -> None:
    services = Services({"dnscache": {10}, "wuauserv": {11}})
    router, _ = service_router(services, [Rule("service:Dnscache", "socks")])
    router.poll(0.0)
    router.set_rules(RuleEngine([Rule("service:wuauserv", "socks")], "direct", Platform.WINDOWS))
    router.poll(0.1)
    assert decided(router, 11, 40000, 0.1) is PacketAction.INJECT_INBOUND
    assert decided(router, 10, 40001, 0.1) is PacketAction.REINJECT


# -- dns.system into a stream tunnel: the proxy connects to the tunnel's DNS server (docs/DNS.md) ---------


def test_the_resolvers_lookup_into_a_stream_tunnel_is_sent_by_its_proxy_to_the_tunnels_dns_server() -> None:
    from awg_split_tunnel.dns.route import exe_rule_pattern, system_rules

    upstream, tunnel_dns = ipaddress.ip_address("198.18.0.53").packed, ipaddress.ip_address("198.18.0.54")
    rules = [*system_rules([exe_rule_pattern("/usr/sbin/resolver")], "socks"), Rule("app-socks", "socks")]
    router = PacketRouter(
        RuleEngine(rules, "direct", Platform.POSIX),
        {"socks": TunnelState.UP}.get,
        {"socks": TunnelRoute(PROXY_TCP, PROXY_UDP, dns_servers=(tunnel_dns.packed,))},
        own_pids={999},
        exe_of={500: "/usr/sbin/resolver", 100: "/usr/bin/app-socks"}.get,
        os_lookup=None,
        owns=None,
    )
    for pid, sport in ((500, 45000), (100, 45001)):
        router.connect_event(IPPROTO_UDP, upstream, 53, pid, 1.0)
        packet = build_packet(APP, upstream, IPPROTO_UDP, sport, 53, b"query")
        assert router.route(packet, len(packet), 1.0, lambda: None) is PacketAction.INJECT_INBOUND
    resolver = router.nat_lookup("udp", "198.18.0.53", 45000)
    app = router.nat_lookup("udp", "198.18.0.53", 45001)
    assert resolver is not None and app is not None
    assert (resolver.upstream_ip, resolver.orig_dst_ip) == (str(tunnel_dns), "198.18.0.53")
    assert app.upstream_ip == "198.18.0.53"  # an app of the same tunnel keeps its server
    # The control plane's mirror (the router in its own process) tells the proxy the same.
    assert nat_announcement(resolver).dns_server == tunnel_dns.packed
