"""Two WireGuard devices talking in memory with a fake clock: handshakes, transport, timers, cookies."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from awg_split_tunnel.provider.wireguard import protocol as wgp
from awg_split_tunnel.provider.wireguard.envelope import MessageType
from awg_split_tunnel.provider.wireguard.noise import StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import (
    DropReason,
    EndpointChanged,
    HandshakeCompleted,
    PacketReceived,
    PeerConfig,
    PeerUnreachable,
    WireGuardEvent,
    WireGuardProtocol,
)
from awg_split_tunnel.provider.wireguard.timers import TimerSettings
from awg_split_tunnel.provider.wireguard.value_range import Range

SK_A = bytes(range(1, 33))
SK_B = bytes(range(101, 133))
PK_A = StaticIdentity.from_private(SK_A).public
PK_B = StaticIdentity.from_private(SK_B).public
EP_A = ("198.18.0.1", 51820)
EP_B = ("198.18.0.2", 51821)


def ipv4(payload: bytes = b"hello", src: str = "10.0.0.1") -> bytes:
    total = 20 + len(payload)
    header = bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, 17, 0, 0])
    return header + bytes(int(x) for x in src.split(".")) + bytes([10, 0, 0, 2]) + payload


@dataclass
class Net:
    """A and B with a shared fake clock; datagrams move only when a test says so."""

    now: float = 1000.0
    a: WireGuardProtocol = field(init=False)
    b: WireGuardProtocol = field(init=False)
    wire_a: list[bytes] = field(default_factory=list)  # sent by A, not yet delivered
    wire_b: list[bytes] = field(default_factory=list)

    def build(
        self, a_kwargs: dict[str, object], b_kwargs: dict[str, object], keepalive: Range | None
    ) -> None:
        def wall() -> float:
            return 1_700_000_000.0 + self.now

        self.a = WireGuardProtocol(SK_A, rng=random.Random(1), wall_clock=wall, **a_kwargs)  # type: ignore[arg-type]
        self.b = WireGuardProtocol(SK_B, rng=random.Random(2), wall_clock=wall, **b_kwargs)  # type: ignore[arg-type]
        self.a.add_peer(PeerConfig(PK_B, endpoint=EP_B, persistent_keepalive=keepalive), self.now)
        self.b.add_peer(PeerConfig(PK_A, endpoint=EP_A), self.now)

    def collect(self) -> None:
        for datagram, endpoint in self.a.datagrams_to_send():
            assert endpoint == EP_B
            self.wire_a.append(datagram)
        for datagram, endpoint in self.b.datagrams_to_send():
            assert endpoint == EP_A
            self.wire_b.append(datagram)

    def to_b(self) -> list[WireGuardEvent]:
        self.collect()
        events: list[WireGuardEvent] = []
        sent, self.wire_a = self.wire_a, []
        for datagram in sent:
            events += self.b.receive_datagram(datagram, EP_A, self.now)
        return events

    def to_a(self) -> list[WireGuardEvent]:
        self.collect()
        events: list[WireGuardEvent] = []
        sent, self.wire_b = self.wire_b, []
        for datagram in sent:
            events += self.a.receive_datagram(datagram, EP_B, self.now)
        return events

    def settle(self) -> tuple[list[WireGuardEvent], list[WireGuardEvent]]:
        """Deliver back and forth until nobody has anything to send."""
        at_a: list[WireGuardEvent] = []
        at_b: list[WireGuardEvent] = []
        for _ in range(10):
            got_b = self.to_b()
            got_a = self.to_a()
            at_a += got_a
            at_b += got_b
            self.collect()
            if not self.wire_a and not self.wire_b:
                break
        return at_a, at_b

    def advance(self, seconds: float) -> list[WireGuardEvent]:
        """Move the clock, running timers at each deadline on the way."""
        target = self.now + seconds
        events: list[WireGuardEvent] = []
        while True:
            due = [d for d in (self.a.next_timer_deadline(), self.b.next_timer_deadline()) if d is not None]
            step = min(due) if due else None
            if step is None or step > target:
                break
            self.now = max(self.now, step)
            events += self.a.handle_timers(self.now)
            events += self.b.handle_timers(self.now)
            self.collect()
        self.now = target
        return events


def make_net(
    a_kwargs: dict[str, object] | None = None,
    b_kwargs: dict[str, object] | None = None,
    keepalive: Range | None = None,
) -> Net:
    net = Net()
    net.build(a_kwargs or {}, b_kwargs or {}, keepalive)
    return net


def packets(events: list[WireGuardEvent]) -> list[bytes]:
    return [e.ip_packet for e in events if isinstance(e, PacketReceived)]


def kinds(datagrams: list[bytes]) -> list[int]:
    return [int.from_bytes(d[:4], "little") for d in datagrams]


def handshake(net: Net) -> None:
    net.a.initiate_handshake(PK_B, net.now)
    at_a, at_b = net.settle()
    assert HandshakeCompleted(PK_B) in at_a and HandshakeCompleted(PK_A) in at_b


# -- handshake and transport ----------------------------------------------------------------------


def test_first_packet_starts_a_handshake_and_arrives_after_it() -> None:
    net = make_net()
    net.a.send_packet(PK_B, ipv4(b"first"), net.now)
    net.collect()
    assert kinds(net.wire_a) == [MessageType.INITIATION]
    at_b = net.to_b()
    assert at_b == []
    assert kinds(net.wire_b) == [] and kinds([d for d, _ in net.b._outgoing]) == [MessageType.RESPONSE]
    at_a = net.to_a()
    assert at_a == [HandshakeCompleted(PK_B)]
    net.collect()
    assert kinds(net.wire_a) == [MessageType.TRANSPORT]  # the queued packet, no separate keepalive
    at_b = net.to_b()
    assert packets(at_b) == [ipv4(b"first")]
    assert HandshakeCompleted(PK_A) in at_b


def test_transport_both_ways_after_either_side_initiates() -> None:
    for initiator in ("a", "b"):
        net = make_net()
        if initiator == "a":
            handshake(net)
        else:
            net.b.initiate_handshake(PK_A, net.now)
            net.settle()
        net.a.send_packet(PK_B, ipv4(b"ping"), net.now)
        assert packets(net.to_b()) == [ipv4(b"ping")]
        net.b.send_packet(PK_A, ipv4(b"pong"), net.now)
        assert packets(net.to_a()) == [ipv4(b"pong")]


def test_initiator_sends_a_keepalive_right_after_the_response() -> None:
    net = make_net()
    net.a.initiate_handshake(PK_B, net.now)
    net.to_b()
    assert net.to_a() == [HandshakeCompleted(PK_B)]
    net.collect()
    assert [len(d) for d in net.wire_a] == [32]
    peer_b = net.b.peers[PK_A]
    assert peer_b.keypairs.current is None and peer_b.keypairs.next is not None
    at_b = net.to_b()
    assert at_b == [HandshakeCompleted(PK_A)] and packets(at_b) == []
    assert peer_b.keypairs.current is not None and peer_b.keypairs.next is None


def test_padding_to_16_and_to_the_mtu_is_trimmed_on_receive() -> None:
    net = make_net()
    handshake(net)
    for size, wire in (
        (21, 16 + 32 + 16),
        (32, 16 + 32 + 16),
        (1419, 16 + 1420 + 16),
        (1420, 16 + 1420 + 16),
    ):
        packet = ipv4(bytes(size - 20))
        net.a.send_packet(PK_B, packet, net.now)
        net.collect()
        assert len(net.wire_a[-1]) == wire
        assert packets(net.to_b()) == [packet]


def test_ipv6_and_garbage_plaintexts() -> None:
    net = make_net()
    handshake(net)
    v6 = bytes([0x60, 0, 0, 0]) + (3).to_bytes(2, "big") + bytes([17, 64]) + bytes(32) + b"abc"
    net.a.send_packet(PK_B, v6, net.now)
    assert packets(net.to_b()) == [v6]
    net.a.send_packet(PK_B, b"\x10not ip", net.now)
    assert packets(net.to_b()) == []
    assert net.b.dropped[DropReason.INVALID_PACKET] == 1


def test_allowed_source_callable_filters_decrypted_packets() -> None:
    seen: list[bytes] = []

    def allowed(peer: bytes, packet: bytes) -> bool:
        seen.append(peer)
        return packet[12:16] == bytes([10, 0, 0, 1])

    net = make_net(b_kwargs={"allowed_source": allowed})
    handshake(net)
    net.a.send_packet(PK_B, ipv4(b"ok"), net.now)
    net.a.send_packet(PK_B, ipv4(b"spoof", src="10.9.9.9"), net.now)
    assert packets(net.to_b()) == [ipv4(b"ok")]
    assert net.b.dropped[DropReason.BAD_SOURCE] == 1 and set(seen) == {PK_A}


def test_statistics() -> None:
    net = make_net()
    handshake(net)
    net.a.send_packet(PK_B, ipv4(b"x" * 100), net.now)
    net.to_b()
    a_stats, b_stats = net.a.peers[PK_B].stats, net.b.peers[PK_A].stats
    assert a_stats.tx_packets == 1 and b_stats.rx_packets == 1
    assert a_stats.tx_bytes == 148 + 32 + 16 + 128 + 16
    assert b_stats.rx_bytes == a_stats.tx_bytes
    assert b_stats.tx_bytes == 92 and a_stats.rx_bytes == 92
    assert a_stats.last_handshake == net.now and a_stats.endpoint == EP_B


def test_bounded_queue_keeps_the_newest_packets() -> None:
    net = make_net()
    for i in range(wgp.QUEUE_STAGED_SIZE + 10):
        net.a.send_packet(PK_B, ipv4(i.to_bytes(2, "big")), net.now)
    assert net.a.dropped[DropReason.QUEUE_FULL] == 10
    _, at_b = net.settle()
    got = packets(at_b)
    assert len(got) == wgp.QUEUE_STAGED_SIZE and got[0] == ipv4((10).to_bytes(2, "big"))


# -- replay ---------------------------------------------------------------------------------------


def test_replayed_transport_is_dropped_and_out_of_order_accepted() -> None:
    net = make_net()
    handshake(net)
    for i in range(5):
        net.a.send_packet(PK_B, ipv4(bytes([i])), net.now)
    net.collect()
    datagrams = list(net.wire_a)
    net.wire_a.clear()
    order = [4, 0, 3, 1, 2]
    got = [packets(net.b.receive_datagram(datagrams[i], EP_A, net.now)) for i in order]
    assert got == [[ipv4(bytes([i]))] for i in order]
    assert net.b.receive_datagram(datagrams[2], EP_A, net.now) == []
    assert net.b.dropped[DropReason.REPLAY] == 1


def test_transport_older_than_the_window_is_dropped() -> None:
    net = make_net()
    handshake(net)
    net.a.send_packet(PK_B, ipv4(b"old"), net.now)
    net.collect()
    old = net.wire_a.pop()
    keypair = net.a.peers[PK_B].keypairs.current
    assert keypair is not None
    keypair.send_counter += 8200
    net.a.send_packet(PK_B, ipv4(b"new"), net.now)
    assert packets(net.to_b()) == [ipv4(b"new")]
    assert net.b.receive_datagram(old, EP_A, net.now) == []
    assert net.b.dropped[DropReason.REPLAY] == 1


# -- rekeying and keypair rotation ----------------------------------------------------------------


def test_rekey_after_time_on_send_rotates_keypairs() -> None:
    net = make_net()
    handshake(net)
    peer_a, peer_b = net.a.peers[PK_B], net.b.peers[PK_A]
    first_a, first_b = peer_a.keypairs.current, peer_b.keypairs.current
    net.now += 121
    net.a.send_packet(PK_B, ipv4(b"late"), net.now)
    net.collect()
    assert kinds(net.wire_a) == [MessageType.TRANSPORT, MessageType.INITIATION]
    assert packets(net.to_b()) == [ipv4(b"late")]
    # B holds the new keypair as next until A's first message under it
    assert peer_b.keypairs.current is first_b and peer_b.keypairs.next is not None
    net.to_a()
    assert peer_a.keypairs.previous is first_a and peer_a.keypairs.current is not first_a
    net.to_b()  # A's keepalive on the new keypair
    assert peer_b.keypairs.previous is first_b and peer_b.keypairs.next is None
    current_a, current_b = peer_a.keypairs.current, peer_b.keypairs.current
    assert current_a is not None and current_b is not None
    assert current_b.remote_index == current_a.local_index
    net.b.send_packet(PK_A, ipv4(b"reply"), net.now)
    assert packets(net.to_a()) == [ipv4(b"reply")]


def test_only_the_initiator_rekeys_by_time() -> None:
    net = make_net()
    handshake(net)
    net.now += 121
    net.b.send_packet(PK_A, ipv4(b"from responder"), net.now)
    net.collect()
    assert kinds(net.wire_b) == [MessageType.TRANSPORT]


def test_rekey_after_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wgp, "REKEY_AFTER_MESSAGES", 3)
    net = make_net()
    handshake(net)  # A's keepalive used counter 0
    net.now += 6  # past the minimum gap between initiations
    net.a.send_packet(PK_B, ipv4(b"1"), net.now)
    net.a.send_packet(PK_B, ipv4(b"2"), net.now)
    net.collect()
    assert MessageType.INITIATION not in kinds(net.wire_a)
    net.a.send_packet(PK_B, ipv4(b"3"), net.now)  # counter now 4 > 3
    net.collect()
    assert kinds(net.wire_a)[-1] == MessageType.INITIATION


def test_initiator_rekeys_on_receive_after_165_seconds() -> None:
    net = make_net()
    handshake(net)
    net.now += 166
    net.b.send_packet(PK_A, ipv4(b"x"), net.now)
    net.to_a()
    net.collect()
    assert MessageType.INITIATION in kinds(net.wire_a)


def test_keypair_older_than_reject_after_time_is_not_used() -> None:
    net = make_net()
    handshake(net)
    net.a.send_packet(PK_B, ipv4(b"held"), net.now)
    net.collect()
    held = net.wire_a.pop()
    net.now += 181
    assert net.b.receive_datagram(held, EP_A, net.now) == []
    assert net.b.dropped[DropReason.EXPIRED_KEYPAIR] == 1
    net.b.send_packet(PK_A, ipv4(b"y"), net.now)  # B must handshake again first
    net.collect()
    assert kinds(net.wire_b) == [MessageType.INITIATION]


# -- timers ---------------------------------------------------------------------------------------


def test_retransmits_with_jitter_then_gives_up() -> None:
    net = make_net()
    net.a.send_packet(PK_B, ipv4(b"lost"), net.now)
    assert kinds([d for d, _ in net.a.datagrams_to_send()]) == [MessageType.INITIATION]
    start = net.now
    sent_at = [net.now]
    events: list[WireGuardEvent] = []
    while not events and net.now < start + 200:
        deadline = net.a.next_timer_deadline()
        assert deadline is not None
        net.now = deadline
        events += net.a.handle_timers(net.now)
        for datagram, _ in net.a.datagrams_to_send():
            if int.from_bytes(datagram[:4], "little") == MessageType.INITIATION:
                sent_at.append(net.now)
    assert events == [PeerUnreachable(PK_B)]
    assert len(sent_at) == 18 + 2  # wireguard-go: MaxTimerHandshakes + 2 initiations per series
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert all(5.0 <= g <= 5.334 for g in gaps) and len({round(g, 6) for g in gaps}) > 1
    assert not net.a.peers[PK_B].staged
    assert net.a.peers[PK_B].timers.retransmit_handshake is None


def test_max_handshake_attempts_is_a_setting() -> None:
    settings = TimerSettings(max_handshake_attempts=Range(2, 2), rekey_timeout=Range(1, 1))
    net = make_net(a_kwargs={"timers": settings})
    net.a.initiate_handshake(PK_B, net.now)
    events = net.advance(30)
    net.wire_a = [d for d in net.wire_a if len(d) == 148]
    assert len(net.wire_a) == 4 and events == [PeerUnreachable(PK_B)]


def test_new_handshake_when_data_gets_no_reply() -> None:
    net = make_net()
    handshake(net)
    net.a.send_packet(PK_B, ipv4(b"?"), net.now)
    net.collect()
    net.wire_a.clear()  # lost
    net.advance(14.9)
    assert MessageType.INITIATION not in kinds(net.wire_a)
    net.advance(0.5)
    assert MessageType.INITIATION in kinds(net.wire_a)


def test_passive_keepalive_after_receiving_data() -> None:
    net = make_net()
    handshake(net)
    net.a.send_packet(PK_B, ipv4(b"data"), net.now)
    net.to_b()
    net.advance(9.9)
    assert net.wire_b == []
    net.advance(0.2)
    assert [len(d) for d in net.wire_b] == [32]


def test_persistent_keepalive_starts_with_the_interface_and_repeats() -> None:
    net = make_net(keepalive=Range(25, 25))
    net.a.start(net.now)
    net.collect()
    assert kinds(net.wire_a) == [MessageType.INITIATION]
    net.settle()
    net.advance(24.9)
    assert net.wire_a == []
    net.advance(0.2)
    assert [len(d) for d in net.wire_a] == [32]


def test_key_material_is_erased_after_three_reject_times() -> None:
    net = make_net()
    handshake(net)
    net.a.send_packet(PK_B, ipv4(b"held"), net.now)
    net.collect()
    held = net.wire_a.pop()
    net.advance(539)
    assert net.b.peers[PK_A].keypairs.all()
    net.advance(2)
    assert net.a.peers[PK_B].keypairs.all() == [] and net.b.peers[PK_A].keypairs.all() == []
    assert net.a._indices == {} and net.b._indices == {}
    assert net.b.receive_datagram(held, EP_A, net.now) == []
    assert net.b.dropped[DropReason.UNKNOWN_INDEX] == 1


# -- handshake protection -------------------------------------------------------------------------


def test_replayed_initiation_timestamp_is_rejected() -> None:
    net = make_net()
    net.a.initiate_handshake(PK_B, net.now)
    net.collect()
    initiation = net.wire_a[0]
    net.to_b()
    net.now += 1
    net.b.datagrams_to_send()
    assert net.b.receive_datagram(initiation, EP_A, net.now) == []
    assert net.b.datagrams_to_send() == []
    assert net.b.dropped[DropReason.STALE_TIMESTAMP] == 1


def test_initiations_closer_than_20ms_are_a_flood() -> None:
    net = make_net()
    wall = [1_700_000_000.0]
    net.a.wall_clock = lambda: wall[0]
    net.a.initiate_handshake(PK_B, net.now)
    net.to_b()
    net.b.datagrams_to_send()
    wall[0] += 0.05  # a later timestamp, so only the rate limit can refuse it
    net.a.peers[PK_B].last_sent_initiation = None
    net.now += 0.010
    net.a.initiate_handshake(PK_B, net.now)
    net.to_b()
    assert net.b.dropped[DropReason.INITIATION_FLOOD] == 1
    wall[0] += 0.05
    net.a.peers[PK_B].last_sent_initiation = None
    net.now += 0.015
    net.a.initiate_handshake(PK_B, net.now)
    net.to_b()
    assert kinds([d for d, _ in net.b.datagrams_to_send()]) == [MessageType.RESPONSE]


def test_initiations_are_sent_at_most_once_per_rekey_timeout() -> None:
    net = make_net()
    net.a.initiate_handshake(PK_B, net.now)
    net.a.initiate_handshake(PK_B, net.now + 4.9)
    net.collect()
    assert len(net.wire_a) == 1
    net.a.initiate_handshake(PK_B, net.now + 5.0)
    net.collect()
    assert len(net.wire_a) == 2


def test_bad_mac1_is_dropped() -> None:
    net = make_net()
    net.a.initiate_handshake(PK_B, net.now)
    net.collect()
    initiation = bytearray(net.wire_a[0])
    initiation[0] = 1  # unchanged type byte, but flip one covered bit elsewhere
    initiation[5] ^= 1
    assert net.b.receive_datagram(bytes(initiation), EP_A, net.now) == []
    assert net.b.dropped[DropReason.BAD_MAC1] == 1


def test_under_load_answers_with_a_cookie_and_accepts_mac2_on_retry() -> None:
    net = make_net()
    net.b.set_under_load(net.now, duration=60)
    net.a.initiate_handshake(PK_B, net.now)
    assert net.to_b() == []
    net.collect()
    assert [len(d) for d in net.wire_b] == [64] and kinds(net.wire_b) == [MessageType.COOKIE_REPLY]
    assert net.b.dropped[DropReason.BAD_MAC2] == 1
    net.to_a()
    assert net.a.peers[PK_B].cookies.cookie_time == net.now
    net.collect()
    assert net.wire_a == []  # the reply itself does not trigger a retransmission
    net.advance(5.4)  # the retransmission carries mac2
    net.collect()
    assert len(net.wire_a) == 1 and net.wire_a[0][132:] != bytes(16)
    at_a, at_b = net.settle()
    assert HandshakeCompleted(PK_B) in at_a and HandshakeCompleted(PK_A) in at_b


def test_under_load_is_detected_from_the_handshake_rate() -> None:
    net = make_net(b_kwargs={"under_load_handshakes": 2})
    net.a.initiate_handshake(PK_B, net.now)
    net.collect()
    initiation = net.wire_a.pop()
    net.b.receive_datagram(initiation, EP_A, net.now)  # first: handled normally
    net.b.receive_datagram(initiation, EP_A, net.now)  # second within a second: under load
    out = net.b.datagrams_to_send()
    assert kinds([d for d, _ in out]) == [MessageType.RESPONSE, MessageType.COOKIE_REPLY]


def test_disable_cookies_drops_silently_under_load() -> None:
    net = make_net(b_kwargs={"disable_cookies": True})
    net.b.set_under_load(net.now, duration=60)
    net.a.initiate_handshake(PK_B, net.now)
    net.to_b()
    net.collect()
    assert net.wire_b == [] and net.b.dropped[DropReason.BAD_MAC2] == 1


def test_rate_limit_with_valid_mac2() -> None:
    net = make_net()
    net.b.set_under_load(net.now, duration=60)
    net.a.initiate_handshake(PK_B, net.now)
    net.to_b()
    net.to_a()  # cookie stored at A
    accepted = 0
    for i in range(10):
        net.now += 0.001
        net.a.peers[PK_B].last_sent_initiation = None
        net.a.wall_clock = lambda i=i: 1_700_000_100.0 + i  # type: ignore[misc]
        net.a.initiate_handshake(PK_B, net.now)
        net.collect()
        net.b.receive_datagram(net.wire_a.pop(), EP_A, net.now)
        accepted += any(len(d) == 92 for d, _ in net.b.datagrams_to_send())
    # burst of 5 from one address; floods inside 20 ms are refused too, so at most 5 pass
    assert 1 <= accepted <= 5
    assert net.b.dropped[DropReason.RATE_LIMITED] >= 5


# -- roaming --------------------------------------------------------------------------------------


def test_authenticated_datagrams_move_the_endpoint() -> None:
    net = make_net()
    handshake(net)
    new_source = ("198.18.0.9", 40000)
    net.b.receive_datagram(b"\x04\x00\x00\x00" + bytes(40), new_source, net.now)  # not authentic
    assert net.b.peers[PK_A].endpoint == EP_A
    net.a.send_packet(PK_B, ipv4(b"moved"), net.now)
    net.collect()
    events = net.b.receive_datagram(net.wire_a.pop(), new_source, net.now)
    assert EndpointChanged(PK_A, new_source) in events and packets(events) == [ipv4(b"moved")]
    net.b.send_packet(PK_A, ipv4(b"back"), net.now)
    assert [ep for _, ep in net.b.datagrams_to_send()] == [new_source]
    assert net.b.peers[PK_A].stats.endpoint == new_source


def test_unknown_peer_and_unknown_index() -> None:
    net = make_net()
    stranger = WireGuardProtocol(bytes(range(50, 82)), rng=random.Random(3))
    stranger.add_peer(PeerConfig(PK_B, endpoint=EP_B), net.now)
    stranger.initiate_handshake(PK_B, net.now)
    (datagram, _), *_ = stranger.datagrams_to_send()
    assert net.b.receive_datagram(datagram, ("198.18.0.7", 1), net.now) == []
    assert net.b.dropped[DropReason.UNKNOWN_PEER] == 1
    assert net.b.receive_datagram(b"\x04" + bytes(47), EP_A, net.now) == []
    assert net.b.dropped[DropReason.UNKNOWN_INDEX] == 1
