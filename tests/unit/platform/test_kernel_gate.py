"""The kernel data path's gate as an app sees it: each new flow's first packet leaves the queue with the
class its rule gives it, and the nftables table says what the kernel does with each class."""

from __future__ import annotations

import gc
import ipaddress
import os
import subprocess
import sys
import weakref

import pytest

from awg_split_tunnel.core.packet_router import PacketRouter, TunnelRoute
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.nat import NatEntry
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, TCP_SYN, build_packet
from awg_split_tunnel.platform.linux.kernel_datapath import (
    KernelGate,
    TunnelSlots,
    headers_of,
    kernel_peer_key,
)
from awg_split_tunnel.platform.linux.kernel_rules import (
    BLOCK,
    DIRECT,
    MARK_MASK,
    PACKET_BASE,
    STREAM_BASE,
    SYSTEM_DNS,
    KernelRuleset,
    PacketTunnelRules,
    StreamRedirect,
    gate_rules,
    mark_value,
    packet_ifname,
    packet_route_commands,
    packet_table,
)
from awg_split_tunnel.process.matcher import Platform

APP = ipaddress.ip_address("198.18.0.1").packed
WEB = ipaddress.ip_address("198.18.0.10").packed
APP6 = ipaddress.ip_address("2001:2::1").packed
WEB6 = ipaddress.ip_address("2001:2::10").packed
OTHER_BITS = 0x00000042
"""A mark bit of another program, on the app's packet: it must survive our verdict."""
EXES = {
    100: "/usr/bin/app-socks",
    200: "/usr/bin/app-direct",
    300: "/usr/bin/app-block",
    400: "/usr/bin/app-wg",
}


class QueuedPacket:
    """A packet as NetfilterQueue hands it over: payload (maybe cut), mark, one verdict."""

    def __init__(self, payload: bytes, mark: int = OTHER_BITS) -> None:
        self.payload = payload
        self.mark = mark
        self.verdicts: list[str] = []

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdicts.append("accept")

    @property
    def flow_class(self) -> int:
        assert self.verdicts == ["accept"], "exactly one verdict"
        assert self.mark & ~MARK_MASK == OTHER_BITS, "other programs' mark bits are kept"
        return (self.mark & MARK_MASK) >> 16


class Gate:
    def __init__(self) -> None:
        self.states = {"socks": TunnelState.UP, "wg": TunnelState.UP}
        rules = [
            Rule("app-socks", "socks"),
            Rule("app-direct", "direct"),
            Rule("app-block", "socks", FallbackPolicy.BLOCK),
            Rule("app-wg", "wg", FallbackPolicy.BLOCK),
        ]
        routes = {
            "socks": TunnelRoute(15001, 15002),
            "wg": PacketTunnelRoute(ipaddress.ip_address("198.19.0.2").packed, None, 1420),
        }
        self.slots = TunnelSlots()
        self.slots.update(routes)
        self.router = PacketRouter(
            RuleEngine(rules, "direct", Platform.POSIX),
            self.states.get,
            routes,
            own_pids={999},
            exe_of=EXES.get,
            os_lookup=lambda *flow: None,
            owns=None,
            reject_tcp=False,
            carries_packets=False,
            on_decided=lambda entry, packets: self.gate.decided(entry, packets),
        )
        self.gate = KernelGate(self.router, self.slots)
        self.now = 1000.0

    def first(self, packet: QueuedPacket) -> QueuedPacket:
        self.gate.packet(packet, self.now)
        return packet

    def connect(self, pid: int, dst: bytes = WEB, dport: int = 80, proto: int = IPPROTO_TCP) -> None:
        self.router.connect_event(proto, dst, dport, pid, self.now)


def syn(sport: int = 40000, src: bytes = APP, dst: bytes = WEB) -> bytes:
    return bytes(build_packet(src, dst, IPPROTO_TCP, sport, 80, tcp_flags=TCP_SYN, seq=7))


def datagram(size: int, sport: int = 41000) -> bytes:
    return bytes(build_packet(APP, WEB, IPPROTO_UDP, sport, 7, payload=b"x" * size))


def stream_class(gate: Gate) -> int:
    return STREAM_BASE + gate.slots.streams["socks"]


@pytest.mark.parametrize(
    ("pid", "expected"),
    [(200, "direct"), (100, "stream"), (300, "stream"), (400, "packet"), (999, "direct")],
    ids=["direct-app", "socks-app", "block-app-tunnel-up", "wireguard-app", "the-daemon-itself"],
)
def test_a_first_packet_leaves_with_the_class_of_its_apps_rule(pid: int, expected: str) -> None:
    gate = Gate()
    gate.connect(pid)
    packet = gate.first(QueuedPacket(syn()))
    classes = {
        "direct": DIRECT,
        "stream": stream_class(gate),
        "packet": PACKET_BASE + gate.slots.packets["wg"],
    }
    assert packet.flow_class == classes[expected]


def test_a_block_app_whose_tunnel_is_down_is_blocked_in_the_kernel() -> None:
    gate = Gate()
    gate.states["socks"] = TunnelState.DOWN
    gate.connect(300)
    assert gate.first(QueuedPacket(syn())).flow_class == BLOCK


def test_a_packet_whose_owner_is_not_known_yet_waits_in_the_queue_until_the_event_comes() -> None:
    gate = Gate()
    packet = gate.first(QueuedPacket(syn()))
    retransmit = gate.first(QueuedPacket(syn()))
    assert packet.verdicts == [] and retransmit.verdicts == [], "held: no verdict yet"
    gate.connect(100)
    assert packet.flow_class == retransmit.flow_class == stream_class(gate)


def test_a_packet_whose_owner_stays_unknown_gets_the_default_after_the_hold() -> None:
    gate = Gate()
    packet = gate.first(QueuedPacket(syn()))
    gate.router.poll(gate.now + 1.0)
    assert packet.flow_class == DIRECT  # default: direct


@pytest.mark.parametrize("event_first", [True, False], ids=["event-first", "packet-held-first"])
@pytest.mark.parametrize("pid", [100, 200, 400], ids=["socks-app", "direct-app", "wireguard-app"])
def test_a_decided_flow_does_not_keep_its_queued_packet(event_first: bool, pid: int) -> None:
    # The kernel carries the flow after its verdict: the queued packet (and its payload) goes with it,
    # it does not stay referenced by the router's flow for the flow's lifetime.
    gate = Gate()
    if event_first:
        gate.connect(pid, proto=IPPROTO_UDP, dport=7)
    packet = QueuedPacket(datagram(1000))
    gate.first(packet)
    if not event_first:
        assert packet.verdicts == []
        gate.connect(pid, proto=IPPROTO_UDP, dport=7)
        gate.router.poll(gate.now)
    assert packet.verdicts == ["accept"]
    assert len(list(gate.router.connections())) == 1
    gone = weakref.ref(packet)
    del packet
    gc.collect()
    assert gone() is None


def test_a_first_packet_cut_by_the_queue_is_decided_by_its_headers() -> None:
    # NetfilterQueue hands over at most 4016 bytes: a 5000-byte datagram arrives cut.
    gate = Gate()
    gate.connect(400, proto=IPPROTO_UDP, dport=7)
    cut = QueuedPacket(datagram(5000)[:4016])
    assert gate.first(cut).flow_class == PACKET_BASE + gate.slots.packets["wg"]


def test_a_queued_packet_that_cannot_be_read_is_blocked_never_let_through() -> None:
    gate = Gate()
    assert gate.first(QueuedPacket(b"\x45\x00\x00")).flow_class == BLOCK
    assert gate.router.stats.malformed == 1


def test_headers_of_sets_the_length_to_what_arrived_for_both_families() -> None:
    v4 = headers_of(datagram(5000)[:4016])
    assert int.from_bytes(v4[2:4], "big") == 4016
    v6 = headers_of(bytes(build_packet(APP6, WEB6, IPPROTO_UDP, 1, 7, payload=b"y" * 5000))[:4016])
    assert int.from_bytes(v6[4:6], "big") == 4016 - 40
    whole = datagram(100)
    assert headers_of(whole) == whole


def test_stream_flows_are_announced_by_the_key_the_proxy_sees() -> None:
    tcp = NatEntry(IPPROTO_TCP, APP, 40000, WEB, 80, 1)
    udp = NatEntry(IPPROTO_UDP, APP, 41000, WEB, 7, 1)
    port = (40000).to_bytes(2, "big")
    assert kernel_peer_key(tcp) == APP + port + WEB + (80).to_bytes(2, "big")  # TPROXY: the whole 4-tuple
    assert kernel_peer_key(udp) == APP + (41000).to_bytes(2, "big")  # redirect: the app's address


def test_slots_of_removed_tunnels_go_to_new_ones_and_others_keep_theirs() -> None:
    slots = TunnelSlots()
    slots.update({"a": TunnelRoute(1), "b": TunnelRoute(2), "w": PacketTunnelRoute(APP)})
    before = dict(slots.streams)
    slots.update({"b": TunnelRoute(2), "c": TunnelRoute(3), "w": PacketTunnelRoute(APP)})
    assert slots.streams["b"] == before["b"]
    assert slots.streams["c"] == before["a"]
    assert slots.class_of("w", packet=True) == PACKET_BASE and slots.class_of("a", packet=False) is None


def test_the_table_carries_each_class_as_the_design_says() -> None:
    text = KernelRuleset(
        {0: StreamRedirect(15001, 15002), 1: StreamRedirect(15003, None)}, {2: PacketTunnelRules(1420)}
    ).table_text()
    assert text.startswith("table inet awg_split_tunnel\ndelete table inet awg_split_tunnel\n")  # atomic
    stream0 = f"ct mark and 0x{MARK_MASK:08x} == 0x{mark_value(STREAM_BASE):08x}"
    assert f"{stream0} meta l4proto tcp meta nfproto ipv4 tproxy ip to 127.0.0.1:15001" in text
    assert f"{stream0} meta l4proto tcp meta nfproto ipv6 tproxy ip6 to [::1]:15001" in text
    assert f"{stream0} meta l4proto udp redirect to :15002" in text
    stream1 = f"ct mark and 0x{MARK_MASK:08x} == 0x{mark_value(STREAM_BASE + 1):08x}"
    assert f"{stream1} meta l4proto udp drop" in text, "a tunnel without UDP drops it, never passes it"
    packet = f"ct mark and 0x{MARK_MASK:08x} == 0x{mark_value(PACKET_BASE + 2):08x}"
    assert f'{packet} oifname != "{packet_ifname(2)}" drop' in text, "the guard"
    assert f'{packet} oifname "{packet_ifname(2)}" masquerade' in text
    assert "tcp option maxseg size set 1380" in text and "tcp option maxseg size set 1360" in text
    blocked = f"ct direction original ct mark and 0x{MARK_MASK:08x} == 0x{mark_value(BLOCK):08x}"
    assert f"{blocked} meta l4proto tcp reject with tcp reset" in text and f"{blocked} drop" in text
    assert "queue" not in text, "without nft queue the gate is the iptables-nft chain"
    assert "queue num" in KernelRuleset(nft_queue=True).table_text()


def test_the_gate_queues_new_tcp_and_udp_without_bypass_and_leaves_loopback_alone() -> None:
    rules = [" ".join(rule) for rule in gate_rules(4711)]
    assert rules[0] == "-o lo -j RETURN"
    for proto, rule in zip(("tcp", "udp"), rules[1:], strict=True):
        assert rule.startswith(f"-p {proto} ") and "--ctstate NEW" in rule
        assert "--queue-num 4711" in rule and "bypass" not in rule
        assert rule.count(f"0/0x{MARK_MASK:08x}") == 2, "packet and ct marks without our bits"


def test_a_packet_tunnels_table_ends_in_an_unreachable_route() -> None:
    commands = [" ".join(c) for c in packet_route_commands(3, "add")]
    table = packet_table(3)
    assert f"-4 route add unreachable default metric 4000 table {table}" in commands
    assert f"-6 route add unreachable default metric 4000 table {table}" in commands
    assert any(c.startswith("-4 rule add fwmark") and f"lookup {table}" in c for c in commands)


# -- dns.system: the local resolver's own lookups go to the tunnel's DNS server (docs/DNS.md) -------------

TUNNEL_DNS = "198.19.0.1"


def system_dns_gate() -> Gate:
    """``Gate`` whose local resolver (pid 500) has ``dns.system: wg``, wg with DNS server ``TUNNEL_DNS``."""
    from awg_split_tunnel.dns.route import exe_rule_pattern, system_rules

    gate = Gate()
    EXES[500] = "/usr/sbin/resolver"
    rules = [*system_rules([exe_rule_pattern("/usr/sbin/resolver")], "wg"), Rule("app-wg", "wg")]
    route = PacketTunnelRoute(
        ipaddress.ip_address("198.19.0.2").packed,
        None,
        1420,
        dns_servers=(ipaddress.ip_address(TUNNEL_DNS).packed,),
    )
    routes = {"socks": TunnelRoute(15001, 15002), "wg": route}
    gate.slots.update(routes)
    gate.router.set_rules(RuleEngine(rules, "direct", Platform.POSIX))
    gate.router.set_tunnels(routes)
    gate.router.poll(gate.now)
    return gate


def lookup(sport: int) -> QueuedPacket:
    return QueuedPacket(bytes(build_packet(APP, WEB, IPPROTO_UDP, sport, 53, payload=b"query")))


def test_the_resolvers_lookup_into_a_packet_tunnel_carries_the_system_dns_bit_an_apps_does_not() -> None:
    gate = system_dns_gate()
    gate.connect(500, dport=53, proto=IPPROTO_UDP)
    resolver = gate.first(lookup(45000))
    gate.connect(400, dport=53, proto=IPPROTO_UDP)
    app = gate.first(lookup(45001))
    wg = mark_value(PACKET_BASE + gate.slots.packets["wg"])
    assert resolver.mark == OTHER_BITS | wg | SYSTEM_DNS
    assert app.mark == OTHER_BITS | wg


def test_the_table_sends_system_dns_flows_to_their_tunnels_dns_server() -> None:
    gate = system_dns_gate()
    streams, packets = gate.slots.update(gate.router.routes)
    slot = gate.slots.packets["wg"]
    assert packets[slot] == PacketTunnelRules(1420, TUNNEL_DNS, None)
    text = KernelRuleset(streams, packets).table_text()
    packet = f"ct mark and 0x{MARK_MASK:08x} == 0x{mark_value(PACKET_BASE + slot):08x}"
    chain = text[text.index("chain system_dns") : text.index("chain packet_tunnels")]
    assert f"meta mark and 0x{SYSTEM_DNS:08x} == 0 accept" in chain
    assert (
        f"{packet} meta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {TUNNEL_DNS}" in chain
    )
    six = KernelRuleset({}, {0: PacketTunnelRules(1420, None, "2001:2::53")}).table_text()
    assert "th dport 53 dnat ip6 to [2001:2::53]" in six


CHECK_SUPPORT = """
import sys
from awg_split_tunnel.errors import AwgSplitTunnelError
from awg_split_tunnel.platform.linux import kernel_datapath

class NoFirewall:
    def __init__(self):
        raise AwgSplitTunnelError("no nftables here")

kernel_datapath.KernelFirewall = NoFirewall
print(kernel_datapath.support_problem(), "pyroute2" in sys.modules)
"""


def test_the_daemons_support_check_does_not_load_pyroute2() -> None:
    # Only the router process uses pyroute2 (conntrack); loaded in the daemon it would cost it ~10 MB.
    pytest.importorskip("netfilterqueue")
    pytest.importorskip("pyroute2")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", CHECK_SUPPORT], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.split() == ["no", "nftables", "here", "False"]
