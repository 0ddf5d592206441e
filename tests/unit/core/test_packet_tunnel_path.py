"""Apps routed into a WireGuard/AmneziaWG tunnel: what the device gets, what the app gets back."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Callable, Sequence
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.core.packet_router import PacketAction, PacketRouter, router_filter
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.packet import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    PacketView,
    build_packet,
    internet_checksum,
)
from awg_split_tunnel.process.matcher import Platform
from awg_split_tunnel.router.divert_loop import AsyncRouterLoop


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


APP, WEB, TUN = ip("198.18.0.1"), ip("198.18.0.10"), ip("198.19.0.2")
APP6, WEB6 = ip("2001:2::1"), ip("2001:2::10")
MTU = 1420
DEVICE_PORT = 51900
PIDS = {
    100: "/usr/bin/app-wg",
    200: "/usr/bin/app-direct",
    300: "/usr/bin/app-wgblock",
    400: "/usr/bin/app-wg6",
}


class Env:
    """A router with one WireGuard tunnel ``wg`` (v4 address only) and a fake device (lists)."""

    def __init__(self) -> None:
        self.states = {"wg": TunnelState.UP}
        rules = [
            Rule("app-wg", "wg"),
            Rule("app-wgblock", "wg", FallbackPolicy.BLOCK),
            Rule("app-direct", "direct"),
            Rule("app-wg6", "wg"),
        ]
        self.router = PacketRouter(
            RuleEngine(rules, "direct", Platform.POSIX),
            self.states.get,
            {"wg": PacketTunnelRoute(TUN, None, MTU, listen_port=DEVICE_PORT)},
            own_pids={999},
            exe_of=PIDS.get,
            os_lookup=lambda *a: None,
        )
        self.now = 1000.0
        self.metas = 0

    def meta(self) -> object:
        self.metas += 1
        return f"if-eth0-{self.metas}"

    def route(self, packet: bytearray) -> PacketAction:
        return self.router.route(packet, len(packet), self.now, self.meta)

    def connect(self, pid: int, dst: bytes = WEB, dport: int = 80, proto: int = IPPROTO_TCP) -> None:
        self.router.connect_event(proto, dst, dport, pid, self.now)

    def to_device(self) -> list[bytes]:
        out = self.router.take_tunnel_packets()
        assert all(tunnel == "wg" for tunnel, _ in out)
        return [p for _, packets in out for p in packets]

    def set_state(self, state: TunnelState) -> None:
        self.states["wg"] = state
        self.router.tunnel_state_changed("wg", state)
        self.router.poll(self.now)


def with_mss(packet: bytearray, mss: int) -> bytearray:
    """``packet`` (a TCP packet built without options) with an MSS option, checksums recomputed."""
    v = parse(packet)
    l4 = v.l4
    out = bytearray(packet[: l4 + 20]) + struct.pack("!BBH", 2, 4, mss) + packet[l4 + 20 :]
    out[l4 + 12] = 6 << 4
    if len(v.src_addr) == 4:
        struct.pack_into("!H", out, 2, len(out))
    else:
        struct.pack_into("!H", out, 4, len(out) - 40)
    v2 = parse(out)
    v2.compute_checksums()
    return out


def parse(packet: bytes | bytearray) -> PacketView:
    v = PacketView()
    data = packet if isinstance(packet, bytearray) else bytearray(packet)
    assert v.parse(data, len(data))
    return v


def mss_of(packet: bytes) -> int:
    v = parse(packet)
    return int(struct.unpack_from("!H", v.buf, v.l4 + 22)[0])


def syn(sport: int = 40000, src: bytes = APP, dst: bytes = WEB, mss: int = 1460) -> bytearray:
    return with_mss(build_packet(src, dst, IPPROTO_TCP, sport, 80, tcp_flags=TCP_SYN, seq=77), mss)


def open_flow(env: Env, pid: int = 100, sport: int = 40000) -> bytes:
    env.connect(pid)
    assert env.route(syn(sport)) is PacketAction.TO_TUNNEL
    (sent,) = env.to_device()
    return sent


# -- app → device ----------------------------------------------------------------------------------------


def test_syn_of_a_tunnelled_app_goes_to_the_device_from_the_tunnel_address_with_mss_clamped() -> None:
    env = Env()
    sent = open_flow(env)
    expected = with_mss(build_packet(TUN, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN, seq=77), MTU - 40)
    assert sent == expected  # byte for byte: addresses, port kept, MSS 1380, both checksums right
    assert env.router.take_outgoing() == []  # nothing reinjected, nothing injected


def test_data_of_an_established_flow_is_rewritten_with_valid_checksums() -> None:
    env = Env()
    open_flow(env)
    data = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, b"GET / HTTP/1.1\r\n\r\n", seq=78, ack=5)
    # The stack hands over offloaded packets whose TCP checksum is only partial: the router fixes it.
    struct.pack_into("!H", data, 36, 0x1234)
    assert env.route(data) is PacketAction.TO_TUNNEL
    (sent,) = env.to_device()
    assert sent == build_packet(TUN, WEB, IPPROTO_TCP, 40000, 80, b"GET / HTTP/1.1\r\n\r\n", seq=78, ack=5)


def test_direct_app_is_untouched_and_nothing_reaches_the_device() -> None:
    env = Env()
    env.connect(200)
    packet = syn()
    assert env.route(packet) is PacketAction.REINJECT
    assert packet == syn()
    assert env.to_device() == []


def test_the_devices_own_datagrams_to_the_endpoint_are_never_held_or_tunnelled() -> None:
    env = Env()
    handshake = build_packet(APP, ip("198.18.0.40"), IPPROTO_UDP, DEVICE_PORT, 51820, b"\x01" + bytes(147))
    assert env.route(handshake) is PacketAction.REINJECT  # no connect event needed, nothing held
    assert env.router.stats.held == 0 and env.to_device() == []


def test_oversize_tcp_is_cut_into_segments_that_fit_the_tunnel() -> None:
    env = Env()
    open_flow(env)
    payload = bytes(range(256)) * 40  # 10,240 bytes: a GSO super-packet
    big = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, payload, tcp_flags=TCP_ACK | TCP_PSH, seq=1000)
    assert env.route(big) is PacketAction.TO_TUNNEL
    segments = env.to_device()
    assert len(segments) == 8 and all(len(s) <= MTU for s in segments)
    views = [parse(s) for s in segments]
    assert all(v.src_addr == TUN and v.checksums_valid() for v in views)
    assert b"".join(bytes(v.buf[v.l4 + 20 : v.length]) for v in views) == payload
    assert [v.tcp_seq for v in views] == [1000 + i * (MTU - 40) for i in range(8)]
    assert [bool(v.tcp_flags & TCP_PSH) for v in views] == [False] * 7 + [True]


def test_oversize_udp_is_answered_with_fragmentation_needed_and_dropped() -> None:
    env = Env()
    env.connect(100, dport=7, proto=IPPROTO_UDP)
    big = build_packet(APP, WEB, IPPROTO_UDP, 40001, 7, b"x" * 1472)
    assert env.route(big) is PacketAction.DROP
    assert env.to_device() == []
    (error,) = env.router.take_outgoing()
    assert error.inbound and error.meta is not None
    icmp = bytes(error.data)
    assert icmp[9] == 1 and icmp[12:16] == WEB and icmp[16:20] == APP  # ICMP from the path to the app
    assert (icmp[20], icmp[21], struct.unpack_from("!H", icmp, 26)[0]) == (3, 4, MTU)
    assert icmp[28:56] == bytes(big[:28])  # quotes the app's own packet, before any NAT
    small = build_packet(APP, WEB, IPPROTO_UDP, 40001, 7, b"x" * 1000)
    assert env.route(small) is PacketAction.TO_TUNNEL
    assert parse(env.to_device()[0]).src_addr == TUN


def test_oversize_udp_without_df_is_sent_as_fragments_of_the_natted_datagram() -> None:
    # An app whose stack does not set DF (or a datagram seen before the OS fragments it): the tunnel
    # carries it as IPv4 fragments that the far side reassembles into the SNATed datagram.
    env = Env()
    env.connect(100, dport=7, proto=IPPROTO_UDP)
    payload = bytes(range(256)) * 8
    big = build_packet(APP, WEB, IPPROTO_UDP, 40001, 7, payload)
    struct.pack_into("!HH", big, 4, 0x4242, 0)  # identification, flags: DF clear
    struct.pack_into("!H", big, 10, 0)
    struct.pack_into("!H", big, 10, internet_checksum(big[:20]))
    assert env.route(big) is PacketAction.TO_TUNNEL
    assert env.router.take_outgoing() == []  # no "too big" for the app
    pieces = env.to_device()
    assert len(pieces) == 2 and all(len(p) <= MTU for p in pieces)
    assert all(p[12:16] == TUN and struct.unpack_from("!H", p, 4)[0] == 0x4242 for p in pieces)
    datagram = bytearray(pieces[0][:20]) + b"".join(p[20:] for p in pieces)
    struct.pack_into("!HHH", datagram, 2, len(datagram), 0x4242, 0)  # reassembled: one whole datagram
    struct.pack_into("!H", datagram, 10, 0)
    struct.pack_into("!H", datagram, 10, internet_checksum(datagram[:20]))
    assert datagram[28:] == payload
    assert parse(datagram).checksums_valid()  # the UDP checksum covers the SNATed datagram
    stats = env.router.packet_tunnel_stats()["wg"]
    assert stats["fragmented"] == 1 and stats["too_big"] == 0


def test_oversize_ipv6_udp_is_sent_as_fragments() -> None:
    env = Env()
    tun6 = ip("2001:2:1::2")
    env.router.set_tunnels({"wg": PacketTunnelRoute(TUN, tun6, MTU)})
    env.router.poll(env.now)
    env.connect(400, dst=WEB6, dport=7, proto=IPPROTO_UDP)
    big = build_packet(APP6, WEB6, IPPROTO_UDP, 40001, 7, b"v" * 2000)
    assert env.route(big) is PacketAction.TO_TUNNEL
    pieces = env.to_device()
    assert len(pieces) == 2 and all(len(p) <= MTU and p[6] == 44 and p[8:24] == tun6 for p in pieces)


def test_ipv6_flow_without_a_tunnel_ipv6_address_fails_closed() -> None:
    env = Env()
    env.router.connect_event(IPPROTO_TCP, WEB6, 80, 400, env.now)
    packet = build_packet(APP6, WEB6, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN)
    assert env.route(packet) is PacketAction.DROP
    assert env.to_device() == [] and env.router.stats.unroutable == 1


def test_ipv6_flow_goes_through_a_tunnel_with_an_ipv6_address() -> None:
    env = Env()
    tun6 = ip("2001:2:1::2")
    env.router.set_tunnels({"wg": PacketTunnelRoute(TUN, tun6, MTU)})
    env.router.poll(env.now)
    env.router.connect_event(IPPROTO_TCP, WEB6, 80, 400, env.now)
    packet = with_mss(build_packet(APP6, WEB6, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN), 1440)
    assert env.route(packet) is PacketAction.TO_TUNNEL
    (sent,) = env.to_device()
    assert sent == with_mss(build_packet(tun6, WEB6, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_SYN), MTU - 60)


# -- device → app ------------------------------------------------------------------------------------------


def test_reply_from_the_device_is_dnatted_and_injected_inbound_where_the_flow_left() -> None:
    env = Env()
    open_flow(env)
    synack = with_mss(
        build_packet(WEB, TUN, IPPROTO_TCP, 80, 40000, tcp_flags=TCP_SYN | TCP_ACK, seq=5, ack=78), 8960
    )
    env.router.from_tunnel("wg", [bytes(synack)], env.now)
    (out,) = env.router.take_outgoing()
    assert out.inbound and out.meta == "if-eth0-1"  # the interface of the flow's first packet
    expected = with_mss(
        build_packet(WEB, APP, IPPROTO_TCP, 80, 40000, tcp_flags=TCP_SYN | TCP_ACK, seq=5, ack=78), 1380
    )
    assert bytes(out.data) == bytes(expected)
    assert env.router.connections()[0].packets_in == 1


def test_packets_from_the_device_for_no_flow_are_counted_and_dropped() -> None:
    env = Env()
    open_flow(env)
    stray = build_packet(WEB, TUN, IPPROTO_TCP, 80, 41000, tcp_flags=TCP_ACK)  # no such flow
    other = build_packet(WEB, ip("198.19.0.77"), IPPROTO_UDP, 7, 40000, b"hi")  # not our address
    env.router.from_tunnel("wg", [bytes(stray), bytes(other), b"\x45garbage"], env.now)
    assert env.router.take_outgoing() == []
    assert env.router.stats.tunnel_orphans == 3


@settings(max_examples=40, deadline=None)
@given(
    sport=st.integers(1024, 65535),
    dport=st.integers(1, 65535),
    payload=st.binary(max_size=1300),
    udp=st.booleans(),
)
def test_round_trip_reaches_the_app_at_its_own_address_and_port(
    sport: int, dport: int, payload: bytes, udp: bool
) -> None:
    env = Env()
    proto = IPPROTO_UDP if udp else IPPROTO_TCP
    env.connect(100, dport=dport, proto=proto)
    flags = TCP_ACK if udp else TCP_SYN
    assert (
        env.route(build_packet(APP, WEB, proto, sport, dport, payload, tcp_flags=flags))
        is PacketAction.TO_TUNNEL
    )
    (sent,) = env.to_device()
    out_view = parse(sent)
    assert out_view.src_addr == TUN and out_view.dst_addr == WEB and out_view.checksums_valid()
    tunnel_port, _ = out_view.ports()
    reply = build_packet(WEB, TUN, proto, dport, tunnel_port, payload[::-1], tcp_flags=TCP_SYN | TCP_ACK)
    env.router.from_tunnel("wg", [bytes(reply)], env.now)
    (back,) = env.router.take_outgoing()
    v = parse(back.data)
    assert (v.src_addr, v.dst_addr, v.ports()) == (WEB, APP, (dport, sport))
    assert v.checksums_valid()


# -- tunnel state -------------------------------------------------------------------------------------------


def test_tunnel_down_resets_block_apps_and_refuses_new_ones() -> None:
    env = Env()
    open_flow(env, pid=300)
    ack = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_ACK, seq=78, ack=6)
    assert env.route(ack) is PacketAction.TO_TUNNEL
    env.to_device()
    env.set_state(TunnelState.DOWN)
    (rst,) = env.router.take_outgoing()
    rv = parse(rst.data)
    assert rst.inbound and rv.tcp_flags & TCP_RST and rv.ports() == (80, 40000) and rv.tcp_seq == 6
    env.connect(300)
    assert env.route(syn(40002)) is PacketAction.DROP
    assert env.to_device() == []


def test_a_block_apps_packet_tunnel_flow_never_leaves_directly_after_the_tunnel_went_down() -> None:
    env = Env()
    open_flow(env, pid=300)
    env.set_state(TunnelState.DOWN)
    for _ in range(3):
        data = build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, b"secret", tcp_flags=TCP_ACK, seq=78, ack=6)
        assert env.route(data) is PacketAction.DROP, "left directly from the app's own address"
    assert env.to_device() == []


def test_tunnel_down_sends_allow_direct_apps_direct() -> None:
    env = Env()
    open_flow(env, pid=100)
    env.connect(100, dport=7, proto=IPPROTO_UDP)
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 40001, 7, b"a")) is PacketAction.TO_TUNNEL
    assert len(env.to_device()) == 1
    env.set_state(TunnelState.DOWN)
    # The SNATed TCP connection cannot go on directly: reset, so the app reconnects (direct).
    assert (
        env.route(build_packet(APP, WEB, IPPROTO_TCP, 40000, 80, tcp_flags=TCP_ACK, ack=1))
        is PacketAction.DROP
    )
    assert any(parse(o.data).tcp_flags & TCP_RST for o in env.router.take_outgoing())
    env.connect(100)
    assert env.route(syn(40003)) is PacketAction.REINJECT
    env.connect(100, dport=7, proto=IPPROTO_UDP)
    assert env.route(build_packet(APP, WEB, IPPROTO_UDP, 40001, 7, b"b")) is PacketAction.REINJECT
    assert env.to_device() == []
    env.set_state(TunnelState.UP)
    env.connect(100)
    assert env.route(syn(40004)) is PacketAction.TO_TUNNEL


# -- fragments and the capture filter ---------------------------------------------------------------------


def fragments(payload: bytes, sport: int = 40005) -> tuple[bytearray, bytearray]:
    """An IPv4 UDP datagram split in two fragments (first one carries the UDP header)."""
    whole = build_packet(APP, WEB, IPPROTO_UDP, sport, 7, payload)
    body = whole[20:]
    first_len = 800
    first = bytearray(whole[:20]) + body[:first_len]
    second = bytearray(whole[:20]) + body[first_len:]
    for frag, off, more in ((first, 0, 0x2000), (second, first_len // 8, 0)):
        struct.pack_into("!HHH", frag, 2, len(frag), 0x4242, more | off)
        struct.pack_into("!H", frag, 10, 0)
        parse(frag).compute_checksums()
    return first, second


def test_fragments_of_a_tunnelled_datagram_all_go_into_the_tunnel() -> None:
    env = Env()
    env.connect(100, dport=7, proto=IPPROTO_UDP)
    first, second = fragments(b"y" * 1200)
    assert env.route(first) is PacketAction.TO_TUNNEL
    assert env.route(second) is PacketAction.TO_TUNNEL  # no ports, but known by its fragment id
    sent = env.to_device()
    assert [parse(p).src_addr for p in sent] == [TUN, TUN]
    assert parse(sent[1]).checksums_valid()


def test_router_filter_leaves_out_the_devices_ports() -> None:
    assert (
        router_filter() == "outbound and !loopback and (tcp or udp or ip.FragOff > 0 or ipv6.NextHdr == 44)"
    )
    assert router_filter([51900, 51820]) == (
        "outbound and !loopback and (tcp or (udp and udp.SrcPort != 51820 and udp.SrcPort != 51900)"
        " or ip.FragOff > 0 or ipv6.NextHdr == 44)"
    )


# -- the asyncio adapter, with a fake divert handle and a fake device ----------------------------------------


class FakeNetwork:
    """A NETWORK handle: packets queued by the test come out of ``recv_into``; ``send`` records."""

    def __init__(self) -> None:
        import os

        self._r, self._w = os.pipe()
        self.queue: list[tuple[bytes, int]] = []
        self.sent: list[tuple[bytes, bool, int]] = []

    def push(self, packet: bytes, ifidx: int) -> None:
        import os

        self.queue.append((packet, ifidx))
        os.write(self._w, b"x")

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def fileno(self) -> int:
        return self._r

    def recv_into(self, buf: bytearray, c_buf: object, addr: SimpleNamespace, timeout_ms: int = 0) -> int:
        import os

        if not self.queue:
            return 0
        packet, addr.ifidx = self.queue.pop(0)
        os.read(self._r, 1)
        buf[: len(packet)] = packet
        addr.inbound = False
        return len(packet)

    def send(self, c_buf: bytearray, length: int, addr: SimpleNamespace) -> bool:
        self.sent.append((bytes(c_buf[:length]), addr.inbound, addr.ifidx))
        return True

    def refresh(self) -> bool:
        return False

    def new_buffer(self) -> tuple[bytearray, bytearray, SimpleNamespace]:
        buf = bytearray(65535)
        return buf, buf, SimpleNamespace(ifidx=0, inbound=False)

    def copy_address(self, addr: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(**vars(addr))

    def set_inbound(self, addr: SimpleNamespace, inbound: bool = True) -> None:
        addr.inbound = inbound

    def c_buffer(self, data: bytearray) -> bytearray:
        return data


class FakeDevice:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.on_packets: Callable[[list[bytes]], None] = lambda packets: None

    def send_packets(self, packets: Sequence[bytes]) -> None:
        self.sent.extend(packets)


def test_async_loop_hands_app_packets_to_the_device_and_injects_its_replies() -> None:
    async def scenario() -> tuple[FakeNetwork, FakeDevice]:
        env = Env()
        network, device = FakeNetwork(), FakeDevice()
        loop = AsyncRouterLoop(env.router, network, clock=lambda: env.now)
        loop.attach_device("wg", device)
        await loop.start()
        try:
            env.connect(100)
            network.push(bytes(syn()), ifidx=7)
            network.push(bytes(build_packet(APP, WEB, IPPROTO_TCP, 40100, 80, tcp_flags=TCP_ACK)), ifidx=7)
            await asyncio.sleep(0.05)
            synack = build_packet(WEB, TUN, IPPROTO_TCP, 80, 40000, tcp_flags=TCP_SYN | TCP_ACK, ack=78)
            device.on_packets([bytes(synack)])
        finally:
            await loop.stop()
        return network, device

    network, device = asyncio.run(scenario())
    assert [parse(p).src_addr for p in device.sent] == [TUN]  # the SYN; nothing else was tunnelled
    # The mid-stream packet of an unknown flow went back unchanged; the reply was injected inbound on the
    # interface of the flow's first packet, addressed to the app.
    (passed, injected) = network.sent
    assert passed[1:] == (False, 7) and parse(passed[0]).src_addr == APP
    reply = parse(injected[0])
    assert injected[1:] == (True, 7)
    assert (reply.src_addr, reply.dst_addr, reply.ports()) == (
        WEB,
        APP,
        (80, 40000),
    ) and reply.checksums_valid()


# -- the daemon's DNS port (docs/DNS.md) -----------------------------------------------------------------

DNS_PORT = 41053
RESOLVER = ip("10.8.0.1")  # a tunnel's DNS server on a private address: LAN bypass must not apply


def dns_env() -> Env:
    env = Env()
    env.router.set_tunnels(
        {"wg": PacketTunnelRoute(TUN, None, MTU, listen_port=DEVICE_PORT, dns_port=DNS_PORT)}
    )
    env.router.poll(env.now)
    return env


def daemon_query(env: Env, sport: int = DNS_PORT) -> PacketAction:
    env.router.connect_event(IPPROTO_UDP, RESOLVER, 53, 999, env.now)
    return env.route(build_packet(APP, RESOLVER, IPPROTO_UDP, sport, 53, b"query"))


def test_the_daemons_lookups_from_a_tunnels_dns_port_go_into_that_tunnel_from_its_address() -> None:
    env = dns_env()
    assert daemon_query(env) is PacketAction.TO_TUNNEL
    (sent,) = env.to_device()
    assert sent == build_packet(TUN, RESOLVER, IPPROTO_UDP, DNS_PORT, 53, b"query")


def test_the_daemons_other_flows_pass_as_before() -> None:
    env = dns_env()
    assert daemon_query(env, sport=DNS_PORT + 1) is PacketAction.REINJECT
    assert env.to_device() == []


def test_the_daemons_lookups_for_a_tunnel_that_is_down_are_dropped_never_sent_direct() -> None:
    env = dns_env()
    env.set_state(TunnelState.DOWN)
    assert daemon_query(env) is PacketAction.DROP
    assert env.to_device() == [] and env.router.take_outgoing() == []


# -- dns.system: the local resolver's own lookups go to the tunnel's DNS servers (docs/DNS.md) ------------

RESOLVER_PID, UPSTREAM, TUNNEL_DNS = 500, ip("198.18.0.53"), ip("198.19.0.1")


def system_env(dns_servers: tuple[bytes, ...] = (TUNNEL_DNS,)) -> Env:
    """A router whose local resolver (pid 500) has ``dns.system: wg``; wg has ``dns_servers``."""
    from awg_split_tunnel.dns.route import exe_rule_pattern, system_rules

    env = Env()
    rules = [*system_rules([exe_rule_pattern("/usr/sbin/resolver")], "wg"), Rule("app-wg", "wg")]
    env.router.set_rules(RuleEngine(rules, "direct", Platform.POSIX))
    env.router.set_tunnels({"wg": PacketTunnelRoute(TUN, None, MTU, dns_servers=dns_servers)})
    PIDS[RESOLVER_PID] = "/usr/sbin/resolver"
    env.router.poll(env.now)
    return env


def upstream_query(
    env: Env, pid: int = RESOLVER_PID, dport: int = 53, proto: int = IPPROTO_UDP, sport: int = 45000
) -> PacketAction:
    env.router.connect_event(proto, UPSTREAM, dport, pid, env.now)
    flags = TCP_SYN if proto == IPPROTO_TCP else 0
    return env.route(build_packet(APP, UPSTREAM, proto, sport, dport, b"query", tcp_flags=flags))


def test_the_resolvers_upstream_lookup_goes_to_the_tunnels_dns_server_and_is_answered_as_the_one_asked() -> (
    None
):
    env = system_env()
    assert upstream_query(env) is PacketAction.TO_TUNNEL
    (sent,) = env.to_device()
    assert sent == build_packet(TUN, TUNNEL_DNS, IPPROTO_UDP, 45000, 53, b"query")
    env.router.from_tunnel("wg", [build_packet(TUNNEL_DNS, TUN, IPPROTO_UDP, 53, 45000, b"answer")], env.now)
    (answer,) = env.router.take_outgoing()
    assert bytes(answer.data) == build_packet(UPSTREAM, APP, IPPROTO_UDP, 53, 45000, b"answer")
    assert parse(answer.data).checksums_valid()


def test_the_resolvers_lookup_over_tcp_goes_to_the_tunnels_dns_server_too() -> None:
    env = system_env()
    assert upstream_query(env, proto=IPPROTO_TCP) is PacketAction.TO_TUNNEL
    (sent,) = env.to_device()
    assert parse(sent).dst_addr == TUNNEL_DNS and parse(sent).checksums_valid()


def test_only_the_resolvers_port_53_flows_are_redirected() -> None:
    env = system_env()
    assert upstream_query(env, dport=853) is PacketAction.TO_TUNNEL  # DNS over TLS: where it was going
    assert upstream_query(env, pid=100, sport=45001) is PacketAction.TO_TUNNEL  # an app of wg: its own server
    assert [parse(p).dst_addr for p in env.to_device()] == [UPSTREAM, UPSTREAM]


def test_a_tunnel_without_dns_servers_leaves_the_resolvers_lookups_with_its_own_servers() -> None:
    env = system_env(dns_servers=(ip("2001:2::53"),))  # none of the flow's IP version
    assert upstream_query(env) is PacketAction.TO_TUNNEL
    assert [parse(p).dst_addr for p in env.to_device()] == [UPSTREAM]
