"""The batch entry points (`send_packets`, `receive_datagrams`) behave as the single-packet ones do: same
bytes on the wire, same packets out, same counters and replay decisions, timers once per batch."""

from __future__ import annotations

import itertools
import random
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.amneziawg.envelope import envelope_for
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard import protocol as wgp
from awg_split_tunnel.provider.wireguard.envelope import Envelope, MessageType, padded_plaintext_length
from awg_split_tunnel.provider.wireguard.noise import StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import (
    DropReason,
    HandshakeCompleted,
    PacketReceived,
    PacketsReceived,
    PeerConfig,
    WireGuardEvent,
    WireGuardProtocol,
)
from awg_split_tunnel.provider.wireguard.replay import WINDOW_SIZE
from awg_split_tunnel.provider.wireguard.session import REJECT_AFTER_MESSAGES

SK_A, SK_B, SK_C = bytes(range(1, 33)), bytes(range(101, 133)), bytes(range(201, 233))
PK_A, PK_B, PK_C = (StaticIdentity.from_private(k).public for k in (SK_A, SK_B, SK_C))
EP_A, EP_B, EP_C = ("198.18.0.1", 51820), ("198.18.0.2", 51821), ("198.18.0.3", 51822)
T0 = 1000.0

AWG_2_0 = {"jc": 3, "jmin": 50, "jmax": 60, "s1": 37, "s2": 61, "s3": 11, "s4": 7}
AWG_3_X = {
    "jc": 2,
    "jmin": 10,
    "jmax": 20,
    "s1": 15,
    "s2": 20,
    "s3": 12,
    "s4": 12,
    "header_protection_key": bytes(range(32)),
    "random_trailers": True,
}
RANGES = {"h1": "100-199", "h2": "200-299", "h3": "300-399", "h4": "400-499"}
ENVELOPES = ["wireguard", "awg2.0", "awg3.x"]
EXAMPLES = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ipv4(payload: bytes = b"hello", src: str = "10.0.0.1") -> bytes:
    total = 20 + len(payload)
    header = bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, 17, 0, 0])
    return header + bytes(int(x) for x in src.split(".")) + bytes([10, 0, 0, 2]) + payload


def ipv6(payload: bytes = b"hello") -> bytes:
    return bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([17, 64]) + bytes(32) + payload


def make_envelope(kind: str, seed: int) -> Envelope | None:
    if kind == "wireguard":
        return None
    values: dict[str, object] = {**(AWG_2_0 if kind == "awg2.0" else AWG_3_X), **RANGES}
    rng = random.Random(seed)
    return envelope_for(AmneziaParams.from_mapping(values), rng=rng, urandom=rng.randbytes)


def device(private: bytes, seed: int, envelope: str = "wireguard", **kwargs: object) -> WireGuardProtocol:
    """A device whose every random choice is seeded, so two built alike put the same bytes on the wire."""
    ephemerals = (crypto.clamp(random.Random(seed + i).randbytes(32)) for i in itertools.count())
    rng = random.Random(seed)
    ticks = itertools.count()  # TAI64N timestamps must grow from one initiation to the next
    return WireGuardProtocol(
        private,
        envelope=make_envelope(envelope, seed),
        rng=rng,
        random_bytes=rng.randbytes,
        new_ephemeral=lambda: next(ephemerals),
        wall_clock=lambda: 1_700_000_000.0 + next(ticks),
        **kwargs,  # type: ignore[arg-type]
    )


def deliver(to: WireGuardProtocol, source: tuple[str, int], datagrams: list[bytes]) -> list[WireGuardEvent]:
    events: list[WireGuardEvent] = []
    for datagram in datagrams:
        events += to.receive_datagram(datagram, source, T0)
    return events


def wire(sender: WireGuardProtocol) -> list[bytes]:
    return [d for d, _ in sender.datagrams_to_send()]


def established(envelope: str = "wireguard", mtu: int = 1420) -> tuple[WireGuardProtocol, WireGuardProtocol]:
    """A (initiator) and B with a completed handshake; B has seen A's confirming keepalive."""
    a = device(SK_A, 1, envelope, mtu=mtu)
    b = device(SK_B, 2, envelope, mtu=mtu)
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), T0)
    b.add_peer(PeerConfig(PK_A, endpoint=EP_A), T0)
    a.initiate_handshake(PK_B, T0)
    deliver(b, EP_A, wire(a))
    deliver(a, EP_B, wire(b))
    deliver(b, EP_A, wire(a))
    assert b.peers[PK_A].keypairs.current is not None
    return a, b


def received(events: list[WireGuardEvent]) -> list[bytes]:
    """Every IP packet the events carry, in order, whichever entry point produced them."""
    out: list[bytes] = []
    for event in events:
        if isinstance(event, PacketsReceived):
            out += event.ip_packets
        elif isinstance(event, PacketReceived):
            out.append(event.ip_packet)
    return out


def state(proto: WireGuardProtocol, peer: bytes) -> tuple[object, ...]:
    p = proto.peers[peer]
    t = p.timers
    keypair = p.keypairs.current
    return (
        p.stats,
        dict(proto.dropped),
        (t.retransmit_handshake, t.send_keepalive, t.new_handshake, t.persistent_keepalive),
        keypair.send_counter if keypair is not None else None,
        p.endpoint,
        p.window.value,
        len(p.staged),
    )


packet_contents = st.one_of(
    st.binary(min_size=0, max_size=1600).map(ipv4),
    st.binary(min_size=0, max_size=200).map(ipv6),
    st.just(b""),  # a keepalive
    st.binary(min_size=1, max_size=60),  # not an IP packet: the receiver drops it
)


@pytest.mark.parametrize("envelope", ENVELOPES)
@EXAMPLES
@given(packets=st.lists(packet_contents, max_size=12), mtu=st.sampled_from([1420, 1280, 576, 0]))
def test_a_batch_puts_the_same_bytes_on_the_wire_and_delivers_the_same_packets(
    envelope: str, packets: list[bytes], mtu: int
) -> None:
    single_a, single_b = established(envelope, mtu)
    batch_a, batch_b = established(envelope, mtu)
    for packet in packets:
        single_a.send_packet(PK_B, packet, T0 + 1)
    batch_a.send_packets(PK_B, packets, T0 + 1)
    sent = wire(single_a)
    assert wire(batch_a) == sent
    assert state(batch_a, PK_B) == state(single_a, PK_B)

    one_by_one = deliver(single_b, EP_A, sent)
    together = batch_b.receive_datagrams([(d, EP_A) for d in sent], T0)
    assert received(together) == received(one_by_one)
    assert all(isinstance(e, PacketsReceived) for e in together)
    assert state(batch_b, PK_A) == state(single_b, PK_A)


@pytest.mark.parametrize("mtu", [1420, 1280, 100, 17, 0])
def test_transport_padding_is_wireguards(mtu: int) -> None:
    a, _ = established(mtu=mtu)
    sizes = list(range(0, 70)) + list(range(mtu - 20, mtu + 40)) + [2 * mtu + 5, 3000]
    a.send_packets(PK_B, [bytes(n) for n in sizes if n >= 0], T0)
    lengths = [len(d) for d in wire(a)]
    assert lengths == [32 + padded_plaintext_length(n, mtu) for n in sizes if n >= 0]


def test_empty_batches_change_nothing() -> None:
    a, b = established()
    before_a, before_b = state(a, PK_B), state(b, PK_A)
    a.send_packets(PK_B, [], T0 + 1)
    assert b.receive_datagrams([], T0 + 1) == []
    assert a.datagrams_to_send() == []
    assert (state(a, PK_B), state(b, PK_A)) == (before_a, before_b)


def test_a_batch_to_an_unknown_peer_is_counted_per_packet() -> None:
    a, _ = established()
    a.send_packets(PK_C, [ipv4(), ipv4()], T0)
    assert a.dropped[DropReason.UNKNOWN_PEER] == 2
    assert a.datagrams_to_send() == []


def test_counters_advance_per_packet_and_replays_inside_a_batch_are_dropped() -> None:
    a, b = established()
    keypair = a.peers[PK_B].keypairs.current
    assert keypair is not None
    start = keypair.send_counter
    packets = [ipv4(bytes([i])) for i in range(3)]
    a.send_packets(PK_B, packets, T0)
    assert keypair.send_counter == start + 3
    d0, d1, d2 = wire(a)
    assert [int.from_bytes(d[8:16], "little") for d in (d0, d1, d2)] == [start, start + 1, start + 2]

    events = b.receive_datagrams([(d1, EP_A), (d0, EP_A), (d1, EP_A), (d2, EP_A), (d0, EP_A)], T0)
    assert received(events) == [packets[1], packets[0], packets[2]]  # reordered is fine, repeated is not
    assert b.dropped[DropReason.REPLAY] == 2
    assert b.peers[PK_A].stats.rx_packets == 3


def test_a_counter_older_than_the_replay_window_is_refused_after_a_large_batch() -> None:
    a, b = established()
    a.send_packet(PK_B, ipv4(b"first"), T0)
    (first,) = wire(a)
    a.send_packets(PK_B, [ipv4(b"x")] * (WINDOW_SIZE + 2), T0)
    later = wire(a)
    events = b.receive_datagrams([(d, EP_A) for d in later], T0)
    assert len(received(events)) == WINDOW_SIZE + 2
    assert len(events) == 1  # one run of one peer: one event
    assert b.receive_datagrams([(first, EP_A)], T0) == []
    assert b.dropped[DropReason.REPLAY] == 1


def test_a_batch_mixing_peers_and_keypairs() -> None:
    """A receives one batch holding B's packets under the old and the new keypair (the first under the new one
    completes the handshake), C's packets, and a replay; everything comes out once, in order, per peer."""
    a = device(SK_A, 1)
    b = device(SK_B, 2)
    c = device(SK_C, 3)
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), T0)
    a.add_peer(PeerConfig(PK_C, endpoint=EP_C), T0)
    b.add_peer(PeerConfig(PK_A, endpoint=EP_A), T0)
    c.add_peer(PeerConfig(PK_A, endpoint=EP_A), T0)
    for peer, pk, ep in ((b, PK_B, EP_B), (c, PK_C, EP_C)):
        peer.initiate_handshake(PK_A, T0)
        deliver(a, ep, wire(peer))
        deliver(peer, EP_A, wire(a))
        deliver(a, ep, wire(peer))
        assert a.peers[pk].keypairs.current is not None

    b_old = [ipv4(b"b-old-1", "10.0.0.2"), ipv4(b"b-old-2", "10.0.0.2")]
    b.send_packets(PK_A, b_old, T0)
    old_datagrams = wire(b)
    # B starts a new handshake; A answers, so A holds the new keypair as `next` until B uses it.
    later = T0 + 10
    b.initiate_handshake(PK_A, later)
    a.receive_datagrams([(d, EP_B) for d in wire(b)], later)
    b.receive_datagrams([(d, EP_A) for d in wire(a)], later)
    confirming_keepalive = wire(b)
    assert a.peers[PK_B].keypairs.next is not None
    b_new = [ipv4(b"b-new", "10.0.0.2")]
    b.send_packets(PK_A, b_new, later)
    new_datagrams = wire(b)
    c_packets = [ipv4(b"c-1", "10.0.0.3"), ipv4(b"c-2", "10.0.0.3")]
    c.send_packets(PK_A, c_packets, later)
    c1, c2 = wire(c)

    batch = [
        (old_datagrams[0], EP_B),
        (c1, EP_C),
        (old_datagrams[1], EP_B),
        (confirming_keepalive[0], EP_B),
        (new_datagrams[0], EP_B),
        (c2, EP_C),
        (old_datagrams[0], EP_B),  # replayed
    ]
    events = a.receive_datagrams(batch, later)
    assert events == [
        PacketsReceived(PK_B, b_old[:1]),
        PacketsReceived(PK_C, c_packets[:1]),
        PacketsReceived(PK_B, b_old[1:]),
        HandshakeCompleted(PK_B),
        PacketsReceived(PK_B, b_new),
        PacketsReceived(PK_C, c_packets[1:]),
    ]
    assert a.dropped == {DropReason.REPLAY: 1}
    assert a.peers[PK_B].keypairs.next is None  # promoted by the confirming keepalive
    assert a.peers[PK_B].stats.rx_packets == 3
    assert a.peers[PK_C].stats.rx_packets == 2


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_a_handshake_in_the_middle_of_a_batch_is_handled_as_one_by_one(envelope: str) -> None:
    single_a, single_b = established(envelope)
    batch_a, batch_b = established(envelope)
    datagrams: list[list[bytes]] = []
    for a in (single_a, batch_a):
        a.send_packets(PK_B, [ipv4(b"1"), ipv4(b"2")], T0 + 10)
        a.initiate_handshake(PK_B, T0 + 10)  # a rekey: the initiation follows the data
        a.send_packets(PK_B, [ipv4(b"3")], T0 + 10)
        datagrams.append(wire(a))
    assert datagrams[0] == datagrams[1]
    one_by_one = deliver(single_b, EP_A, datagrams[0])
    together = batch_b.receive_datagrams([(d, EP_A) for d in datagrams[1]], T0)
    assert received(together) == received(one_by_one) == [ipv4(b"1"), ipv4(b"2"), ipv4(b"3")]
    assert wire(batch_b) == wire(single_b)  # the same handshake response, byte for byte
    assert state(batch_b, PK_A) == state(single_b, PK_A)


def test_timers_run_once_per_batch() -> None:
    a, b = established()
    now = T0 + 1
    a.send_packets(PK_B, [ipv4()] * 5, now)
    timers = a.peers[PK_B].timers
    # data sent with no reply yet: a new handshake in keepalive + rekey timeout, unchanged by more data
    assert timers.new_handshake == pytest.approx(now + 15, abs=0.34)
    first_deadline = timers.new_handshake
    a.send_packets(PK_B, [ipv4()] * 5, now + 1)
    assert timers.new_handshake == first_deadline
    b.receive_datagrams([(d, EP_A) for d in wire(a)], now + 1)
    b_timers = b.peers[PK_A].timers
    assert b_timers.send_keepalive == now + 1 + 10  # one keepalive owed for the whole batch
    assert b_timers.new_handshake is None
    assert not b_timers.need_another_keepalive


def test_a_rekey_by_message_count_inside_a_batch_sends_one_initiation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wgp, "REKEY_AFTER_MESSAGES", 3)
    a, _ = established()
    a.send_packets(PK_B, [ipv4(bytes([i])) for i in range(5)], T0 + 6)  # past the initiation gap
    kinds = [int.from_bytes(d[:4], "little") for d in wire(a)]
    assert kinds == [MessageType.TRANSPORT] * 5 + [MessageType.INITIATION]


def test_packets_past_a_spent_counter_wait_for_the_next_keypair() -> None:
    a, b = established()
    keypair = a.peers[PK_B].keypairs.current
    assert keypair is not None
    keypair.send_counter = REJECT_AFTER_MESSAGES - 2
    packets = [ipv4(bytes([i])) for i in range(5)]
    a.send_packets(PK_B, packets, T0 + 6)
    sent = wire(a)
    assert [int.from_bytes(d[:4], "little") for d in sent] == [4, 4, 1]
    assert list(a.peers[PK_B].staged) == packets[2:]
    # the new handshake's keypair then carries the rest, in order
    events = b.receive_datagrams([(d, EP_A) for d in sent], T0 + 6)
    a.receive_datagrams([(d, EP_B) for d in wire(b)], T0 + 6)
    assert not a.peers[PK_B].staged
    events += b.receive_datagrams([(d, EP_A) for d in wire(a)], T0 + 6)
    assert received(events) == packets
    assert HandshakeCompleted(PK_A) in events


@EXAMPLES
@given(junk=st.lists(st.binary(max_size=200), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_junk_in_a_batch_is_counted_once_each_and_the_rest_still_arrives(
    junk: list[bytes], seed: int
) -> None:
    a, b = _shared_session()
    packets = [ipv4(bytes([i])) for i in range(4)]
    a.send_packets(PK_B, packets, T0)
    batch = [(d, EP_A) for d in wire(a)] + [(j, EP_A) for j in junk]
    random.Random(seed).shuffle(batch)
    before = sum(b.dropped.values())
    events = b.receive_datagrams(batch, T0)
    assert sorted(received(events)) == sorted(packets)
    assert sum(b.dropped.values()) - before == len(junk)


@cache
def _shared_session() -> tuple[WireGuardProtocol, WireGuardProtocol]:
    return established()


def test_the_single_packet_api_still_reports_packet_received() -> None:
    a, b = established()
    a.send_packet(PK_B, ipv4(b"one"), T0)
    (datagram,) = wire(a)
    assert b.receive_datagram(datagram, EP_A, T0) == [PacketReceived(PK_A, ipv4(b"one"))]


def test_a_roaming_peer_is_followed_inside_a_batch() -> None:
    a, b = established()
    a.send_packets(PK_B, [ipv4(b"1"), ipv4(b"2")], T0)
    d1, d2 = wire(a)
    moved = ("198.18.0.9", 40000)
    events = b.receive_datagrams([(d1, EP_A), (d2, moved)], T0)
    assert [type(e).__name__ for e in events] == ["PacketsReceived", "EndpointChanged", "PacketsReceived"]
    assert b.peers[PK_A].endpoint == moved


def test_byte_counters_count_every_datagram_on_the_wire() -> None:
    a, b = established()
    tx_before, rx_before = a.peers[PK_B].stats.tx_bytes, b.peers[PK_A].stats.rx_bytes
    a.send_packets(PK_B, [ipv4(b"x" * n) for n in (0, 1, 100, 1400)] + [b""], T0)
    sent = wire(a)
    assert a.peers[PK_B].stats.tx_bytes - tx_before == sum(map(len, sent))
    assert a.peers[PK_B].stats.tx_packets == 4  # the keepalive is no packet
    b.receive_datagrams([(d, EP_A) for d in sent] + [(sent[0], EP_A)], T0)  # the replay counts nowhere
    assert b.peers[PK_A].stats.rx_bytes - rx_before == sum(map(len, sent))
    assert b.peers[PK_A].stats.rx_packets == 4


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_every_authenticated_datagram_resets_the_peers_udp_window(envelope: str) -> None:
    a, b = established(envelope)
    a.send_packets(PK_B, [ipv4(b"small")] * 3, T0)
    sent = wire(a)
    window = b.peers[PK_A].window
    window.value = 5000
    b.receive_datagrams([(d, EP_A) for d in sent], T0)
    # back at the default, grown only by what the last datagram carried (amneziawg-go's endpoint reset)
    assert window.value <= 1500


def test_a_keypair_dropped_by_a_handshake_inside_the_batch_opens_nothing_after_it() -> None:
    a, b = established()
    a.send_packets(PK_B, [ipv4(b"old-1"), ipv4(b"old-2")], T0)
    old_1, old_2 = wire(a)
    # A full rekey: B keeps the first keypair as `previous`.
    a.initiate_handshake(PK_B, T0 + 6)
    for to, source in ((b, EP_A), (a, EP_B), (b, EP_A)):
        to.receive_datagrams([(d, source) for d in wire(b if to is a else a)], T0 + 6)
    old_keypair = b.peers[PK_A].keypairs.previous
    assert old_keypair is not None
    # Another initiation: B, as responder, installs a `next` keypair and lets `previous` go.
    a.initiate_handshake(PK_B, T0 + 12)
    (initiation,) = wire(a)
    events = b.receive_datagrams([(old_1, EP_A), (initiation, EP_A), (old_2, EP_A)], T0 + 12)
    assert received(events) == [ipv4(b"old-1")]
    assert b.dropped[DropReason.UNKNOWN_INDEX] == 1


def test_a_sealed_plaintext_too_short_for_an_ip_header_is_an_invalid_packet() -> None:
    a, b = established()
    keypair = a.peers[PK_B].keypairs.current
    assert keypair is not None
    # Another implementation need not pad: these decrypt, then fail as IP packets.
    hostile = [keypair.seal(4, plaintext) for plaintext in (b"\x45", b"\x45\x00\x00", b"\x60" + bytes(30))]
    events = b.receive_datagrams([(d, EP_A) for d in hostile if d is not None], T0)
    assert events == []
    assert b.dropped == {DropReason.INVALID_PACKET: 3}
    assert b.peers[PK_A].timers.send_keepalive is not None  # still data from the peer: a keepalive is owed
