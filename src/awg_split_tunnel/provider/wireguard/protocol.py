"""The WireGuard device as a sans-I/O state machine: peers, index table, handshakes, keypairs, timers.

Datagrams go in through `receive_datagrams` (or `receive_datagram`), IP packets through `send_packets` (or
`send_packet`); datagrams to send come out of `datagrams_to_send`, events out of the calls. The batch entry
points do per-packet only what must be per packet (AEAD, counters, replay window, envelope calls) and the
timer and rekey bookkeeping once per run of packets of one peer, as wireguard-go does per batch. Time is
passed in (`now`, monotonic seconds); the wall clock used only for TAI64N timestamps and the random sources
are injectable. Every message is built and classified through an `Envelope`, so AmneziaWG reuses all of
this. Nothing raises out of `receive_datagrams`: bad input is counted in `dropped` and discarded.

AllowedIPs: the device owns the routing table. Pass `allowed_source(peer_public_key, ip_packet)`; a
decrypted packet whose source it rejects is dropped and counted as `bad_source`. The default accepts all.
"""

from __future__ import annotations

import enum
import os
import random
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag

from awg_split_tunnel.errors import ProtocolError
from awg_split_tunnel.provider.wireguard import crypto, noise
from awg_split_tunnel.provider.wireguard.cookie import CookieChecker, CookieGenerator, source_bytes
from awg_split_tunnel.provider.wireguard.envelope import (
    DEFAULT_UDP_WINDOW,
    MIN_TRANSPORT_SIZE,
    PADDING_MULTIPLE,
    TRANSPORT_HEADER_SIZE,
    Envelope,
    MessageType,
    PlainEnvelope,
    UdpWindow,
)
from awg_split_tunnel.provider.wireguard.messages import CookieReply, HandshakeInitiation, HandshakeResponse
from awg_split_tunnel.provider.wireguard.noise import (
    Handshake,
    HandshakeRejected,
    StaticIdentity,
)
from awg_split_tunnel.provider.wireguard.ratelimit import HandshakeRateLimiter
from awg_split_tunnel.provider.wireguard.session import (
    COUNTER,
    REJECT_AFTER_MESSAGES,
    TRANSPORT_HEADER,
    Keypair,
    Keypairs,
)
from awg_split_tunnel.provider.wireguard.session import REKEY_AFTER_MESSAGES as _REKEY_AFTER_MESSAGES
from awg_split_tunnel.provider.wireguard.tai64n import tai64n
from awg_split_tunnel.provider.wireguard.timers import UNDER_LOAD_AFTER_TIME, PeerTimers, Rng, TimerSettings
from awg_split_tunnel.provider.wireguard.value_range import Range

Endpoint = tuple[str, int]
DEFAULT_MTU = 1420
QUEUE_STAGED_SIZE = 128  # packets waiting for a handshake, per peer (wireguard-go QueueStagedSize)
UNDER_LOAD_HANDSHAKES = 128  # handshake messages per second that mean "under load" (1024 / 8)

# Module-level so tests can lower it to force a rekey by message count.
REKEY_AFTER_MESSAGES = _REKEY_AFTER_MESSAGES

_PAD_MASK = PADDING_MULTIPLE - 1
_ZERO_PADDING = bytes(PADDING_MULTIPLE)
_NO_MTU = 1 << 62  # MTU 0 means "no cap on the padding"
_MALFORMED_ERRORS = (ProtocolError, ValueError, IndexError, struct.error)


class DropReason(enum.StrEnum):
    MALFORMED = "malformed"
    BAD_MAC1 = "bad_mac1"
    BAD_MAC2 = "bad_mac2"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_PEER = "unknown_peer"
    UNKNOWN_INDEX = "unknown_index"
    HANDSHAKE_FAILED = "handshake_failed"
    STALE_TIMESTAMP = "stale_timestamp"
    INITIATION_FLOOD = "initiation_flood"
    UNEXPECTED_RESPONSE = "unexpected_response"
    BAD_COOKIE = "bad_cookie"
    EXPIRED_KEYPAIR = "expired_keypair"
    DECRYPT_FAILED = "decrypt_failed"
    REPLAY = "replay"
    INVALID_PACKET = "invalid_packet"
    BAD_SOURCE = "bad_source"
    NO_ENDPOINT = "no_endpoint"
    QUEUE_FULL = "queue_full"


_REJECTION_REASONS = {
    "replayed initiation timestamp": DropReason.STALE_TIMESTAMP,
    "initiation flood": DropReason.INITIATION_FLOOD,
    "initiation from an unknown peer": DropReason.UNKNOWN_PEER,
    "response without a pending initiation": DropReason.UNEXPECTED_RESPONSE,
}


class WireGuardEvent:
    """Base of what the protocol reports; every event has `peer`, the peer's static public key."""

    __slots__ = ()
    peer: bytes


# Not frozen: one is built per received packet, and a frozen dataclass costs twice as much to build.
@dataclass(slots=True)
class PacketReceived(WireGuardEvent):
    peer: bytes
    ip_packet: bytes


@dataclass(slots=True)
class PacketsReceived(WireGuardEvent):
    """IP packets from one peer, in arrival order: what `receive_datagrams` reports for consecutive data
    packets of one peer (no other event between them)."""

    peer: bytes
    ip_packets: list[bytes]


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(WireGuardEvent):
    peer: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged(WireGuardEvent):
    peer: bytes
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class PeerUnreachable(WireGuardEvent):
    """Handshakes kept failing for max_handshake_attempts × rekey_timeout; queued packets were dropped."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: Endpoint | None = None
    persistent_keepalive: Range | None = None


@dataclass(slots=True)
class PeerStats:
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    last_handshake: float | None = None
    endpoint: Endpoint | None = None


@dataclass(slots=True)
class Peer:
    """Everything the device keeps for one peer."""

    public_key: bytes
    handshake: Handshake
    cookies: CookieGenerator
    endpoint: Endpoint | None
    persistent_keepalive: Range | None
    keypairs: Keypairs = field(default_factory=Keypairs)
    timers: PeerTimers = field(default_factory=PeerTimers)
    window: UdpWindow = field(default_factory=UdpWindow)
    staged: deque[bytes] = field(default_factory=lambda: deque(maxlen=QUEUE_STAGED_SIZE))
    stats: PeerStats = field(default_factory=PeerStats)
    last_sent_initiation: float | None = None


class WireGuardProtocol:
    """A WireGuard device without I/O: one local static key, any number of peers."""

    def __init__(
        self,
        private_key: bytes,
        *,
        envelope: Envelope | None = None,
        timers: TimerSettings | None = None,
        mtu: int = DEFAULT_MTU,
        rng: Rng | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        new_ephemeral: Callable[[], bytes] = crypto.generate_private_key,
        wall_clock: Callable[[], float] = time.time,
        allowed_source: Callable[[bytes, bytes], bool] | None = None,
        under_load_handshakes: int = UNDER_LOAD_HANDSHAKES,
        disable_cookies: bool = False,
    ) -> None:
        self.identity = StaticIdentity.from_private(private_key)
        self.envelope: Envelope = envelope if envelope is not None else PlainEnvelope()
        self.settings = timers if timers is not None else TimerSettings()
        self._reject_after = self.settings.reject_after  # read per packet: keep it a plain float
        self.mtu = mtu
        self.rng: Rng = rng if rng is not None else random.SystemRandom()
        self.new_ephemeral = new_ephemeral
        self.wall_clock = wall_clock
        self.allowed_source = allowed_source
        self.under_load_handshakes = under_load_handshakes
        self.disable_cookies = disable_cookies
        self._random_bytes = random_bytes
        self.cookie_checker = CookieChecker.for_public_key(self.identity.public, random_bytes)
        self.peers: dict[bytes, Peer] = {}
        self.dropped: Counter[str] = Counter()
        self._indices: dict[int, tuple[Peer, Keypair | None]] = {}
        self._outgoing: list[tuple[bytes, Endpoint]] = []
        self._load_window_start = 0.0
        self._load_count = 0
        self._under_load_until: float | None = None
        self.rate_limiter = HandshakeRateLimiter()
        """Answers to handshakes while under load, per source (IPv4 address, IPv6 /64)."""
        self._up = False

    # -- configuration -------------------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self.identity.public

    def add_peer(self, config: PeerConfig, now: float) -> Peer:
        """Add a peer; raises ProtocolError for a public key no handshake could ever use."""
        if config.public_key in self.peers:
            raise ProtocolError("peer already added")
        psk = config.preshared_key if config.preshared_key is not None else bytes(32)
        peer = Peer(
            public_key=config.public_key,
            handshake=Handshake.for_peer(self.identity, config.public_key, psk),
            cookies=CookieGenerator.for_public_key(config.public_key),
            endpoint=config.endpoint,
            persistent_keepalive=config.persistent_keepalive,
        )
        peer.stats.endpoint = config.endpoint
        peer.timers.max_attempts = self.settings.max_handshake_attempts.pick(self.rng)
        self.peers[config.public_key] = peer
        if self._up and peer.persistent_keepalive is not None:
            self._send_keepalive(peer, now)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            self._zero_key_material(peer)
            peer.timers.stop_all()

    def update_peer(
        self,
        public_key: bytes,
        now: float,
        *,
        preshared_key: bytes | None = None,
        endpoint: Endpoint | None = None,
        persistent_keepalive: Range | None = None,
        keepalive_off: bool = False,
    ) -> None:
        """Change a running peer (what `wg set ... peer` does): a new pre-shared key applies from the next
        handshake, a new endpoint to the next datagram; a persistent keepalive turned on sends one now."""
        peer = self.peers.get(public_key)
        if peer is None:
            raise ProtocolError("no such peer")
        if preshared_key is not None:
            peer.handshake.preshared_key = preshared_key
        if endpoint is not None:
            peer.endpoint = endpoint
            peer.stats.endpoint = endpoint
        if keepalive_off:
            peer.persistent_keepalive = None
            peer.timers.persistent_keepalive = None
        elif persistent_keepalive is not None:
            was_off = peer.persistent_keepalive is None
            peer.persistent_keepalive = persistent_keepalive
            if was_off and self._up:
                self._send_keepalive(peer, now)

    def set_private_key(self, private_key: bytes, now: float) -> None:
        """A new static key (`wg set ... private-key`): every peer's sessions and handshake start over
        under it (their counters and settings stay); a peer whose key is the new public key is removed,
        as wireguard-go does."""
        identity = StaticIdentity.from_private(private_key)
        if identity.public == self.identity.public:
            return
        kept = [
            (PeerConfig(p.public_key, p.handshake.preshared_key, p.endpoint, p.persistent_keepalive), p.stats)
            for p in self.peers.values()
            if p.public_key != identity.public
        ]
        for key in list(self.peers):
            self.remove_peer(key)
        self.identity = identity
        self.cookie_checker = CookieChecker.for_public_key(identity.public, self._random_bytes)
        for config, stats in kept:
            self.add_peer(config, now).stats = stats

    def start(self, now: float) -> None:
        """The interface came up: peers with a persistent keepalive send one at once."""
        self._up = True
        for peer in self.peers.values():
            if peer.persistent_keepalive is not None:
                self._send_keepalive(peer, now)

    def set_under_load(self, now: float, duration: float = UNDER_LOAD_AFTER_TIME) -> None:
        """Treat the device as under load until `now + duration` (tests, or an adapter that knows)."""
        self._under_load_until = now + duration

    # -- outputs -------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self._outgoing = self._outgoing, []
        return out

    def next_timer_deadline(self) -> float | None:
        found: float | None = None
        for peer in self.peers.values():
            t = peer.timers.earliest()
            if t is not None and (found is None or t < found):
                found = t
        return found

    # -- sending -------------------------------------------------------------------------------

    def send_packet(self, peer_key: bytes, ip_packet: bytes, now: float) -> None:
        """Encrypt `ip_packet` to the peer, or queue it and start a handshake if no keypair is usable."""
        self.send_packets(peer_key, (ip_packet,), now)

    def send_packets(self, peer_key: bytes, ip_packets: Sequence[bytes], now: float) -> None:
        """Encrypt `ip_packets` to the peer, in order, with the timers and rekey check run once for the
        batch; or queue them and start a handshake if no keypair is usable."""
        peer = self.peers.get(peer_key)
        if peer is None:
            self.dropped[DropReason.UNKNOWN_PEER] += len(ip_packets)
            return
        if not ip_packets:
            return
        keypair = peer.keypairs.current
        if (
            not peer.staged
            and keypair is not None
            and keypair.send_counter < REJECT_AFTER_MESSAGES
            and now - keypair.created < self._reject_after
            and peer.endpoint is not None
        ):
            sealed = self._send_transport(peer, keypair, ip_packets)
            self._after_transport_sent(peer, keypair, True, now)
            if sealed == len(ip_packets):
                return
            ip_packets = ip_packets[sealed:]  # the keypair's counter ran out: the rest wait for a new one
        staged = peer.staged
        for packet in ip_packets:
            if len(staged) == QUEUE_STAGED_SIZE:
                self.dropped[DropReason.QUEUE_FULL] += 1  # deque drops the oldest
            staged.append(packet)
        self._send_staged(peer, now)

    def initiate_handshake(self, peer_key: bytes, now: float) -> None:
        """Start a handshake with the peer now (subject to the minimum gap between initiations)."""
        peer = self.peers.get(peer_key)
        if peer is not None:
            self._send_initiation(peer, now, is_retry=False)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _send_staged(self, peer: Peer, now: float) -> None:
        keypair = peer.keypairs.current
        if (
            keypair is None
            or keypair.send_counter >= REJECT_AFTER_MESSAGES
            or now - keypair.created >= self._reject_after
        ):
            self._send_initiation(peer, now, is_retry=False)
            return
        if peer.endpoint is None:
            return
        staged = peer.staged
        packets = list(staged)
        staged.clear()
        sealed = self._send_transport(peer, keypair, packets)
        if sealed < len(packets):
            staged.extendleft(reversed(packets[sealed:]))  # counter spent: they wait for the next keypair
        data_sent = any(packets[:sealed])
        self._after_transport_sent(peer, keypair, data_sent, now)

    def _send_transport(self, peer: Peer, keypair: Keypair, packets: Sequence[bytes]) -> int:
        """Pad, seal and frame `packets` under `keypair` into `_outgoing`; returns how many were sealed
        (fewer than all only when the keypair's counter runs out). Per packet only what must be: the
        envelope's padding, type value and wrapping, and the AEAD."""
        endpoint = peer.endpoint
        if endpoint is None:
            self.dropped[DropReason.NO_ENDPOINT] += 1
            return 0
        counter = keypair.send_counter
        room = REJECT_AFTER_MESSAGES - counter
        if room < len(packets):
            packets = packets[: max(room, 0)]
        envelope = self.envelope
        form = envelope.transport_form()
        window = peer.window
        mtu = self.mtu
        cap = mtu if mtu else _NO_MTU
        remote = keypair.remote_index
        encrypt = keypair.send_aead.encrypt
        nonce = keypair.seal_nonce
        pack_nonce = COUNTER.pack_into
        pack_header = TRANSPORT_HEADER.pack
        append = self._outgoing.append
        tx_bytes = tx_packets = 0
        if form is not None:
            types, noise = envelope.transport_randomness(len(packets))
            prefix = form.prefix
        else:
            types, noise, prefix = [0] * len(packets), b"", 0
        at = 0
        for packet, type_value in zip(packets, types, strict=True):
            n = len(packet)
            if form is not None:
                # padded_plaintext_length inlined: pad the last MTU-sized piece to 16, never past the MTU
                # (wireguard-go send.go).
                last = n if n <= cap else n % cap
                pad = -last & _PAD_MASK
                if last + pad > cap:
                    pad = cap - last
                if pad:
                    packet = packet + _ZERO_PADDING[:pad]
                pack_nonce(nonce, 4, counter)
                header = pack_header(type_value, remote, counter)
                if prefix:
                    end = at + prefix
                    datagram = b"".join((noise[at:end], header, encrypt(nonce, packet, None)))
                    at = end
                else:
                    datagram = header + encrypt(nonce, packet, None)
            else:
                padded = envelope.transport_plaintext_length(n, mtu, window)
                if padded > n:
                    packet = packet + bytes(padded - n)
                type_value = envelope.type_value(MessageType.TRANSPORT)
                pack_nonce(nonce, 4, counter)
                message = pack_header(type_value, remote, counter) + encrypt(nonce, packet, None)
                datagram = envelope.wrap_transport(message, window)
            counter += 1
            append((datagram, endpoint))
            tx_bytes += len(datagram)
            if n:
                tx_packets += 1
        keypair.send_counter = counter
        stats = peer.stats
        stats.tx_bytes += tx_bytes
        stats.tx_packets += tx_packets
        return len(packets)

    def _after_transport_sent(self, peer: Peer, keypair: Keypair, data_sent: bool, now: float) -> None:
        timers = peer.timers
        if peer.persistent_keepalive is not None:
            self._authenticated_packet_traversal(peer, now)
        timers.send_keepalive = None  # any authenticated packet sent
        if data_sent and timers.new_handshake is None:
            timers.new_handshake = now + self.settings.new_handshake_delay(self.rng)
        # keep the key fresh (sending side)
        if keypair.send_counter > REKEY_AFTER_MESSAGES or (
            keypair.is_initiator and now - keypair.created > self.settings.rekey_after_time.pick(self.rng)
        ):
            self._send_initiation(peer, now, is_retry=False)

    def _send_initiation(self, peer: Peer, now: float, *, is_retry: bool) -> None:
        timers = peer.timers
        if not is_retry:
            timers.handshake_attempts = 0
            timers.max_attempts = self.settings.max_handshake_attempts.pick(self.rng)
        last = peer.last_sent_initiation
        if last is not None and now - last < self.settings.min_initiation_gap:
            return
        if peer.endpoint is None:
            self.dropped[DropReason.NO_ENDPOINT] += 1
            return
        peer.last_sent_initiation = now
        hs = peer.handshake
        self._free_index(hs.local_index, None)
        index = self._new_index(peer, None)
        envelope = self.envelope
        try:
            msg = noise.create_initiation(
                hs,
                self.identity,
                self.new_ephemeral(),
                index,
                tai64n(self.wall_clock()),
                envelope.type_value(MessageType.INITIATION),
            )
        except HandshakeRejected:
            self._indices.pop(index, None)
            return
        message = peer.cookies.add_macs(msg.pack(), now)
        for datagram in envelope.before_initiation(now):
            self._outgoing.append((datagram, peer.endpoint))
        self._emit_handshake(peer, MessageType.INITIATION, message)
        self._authenticated_packet_traversal(peer, now)
        timers.send_keepalive = None
        timers.retransmit_handshake = now + self.settings.retransmit_delay(self.rng)

    def _emit_handshake(self, peer: Peer, kind: MessageType, message: bytes) -> None:
        assert peer.endpoint is not None
        datagram = self.envelope.wrap_handshake(kind, message, peer.window)
        self._outgoing.append((datagram, peer.endpoint))
        peer.stats.tx_bytes += len(datagram)

    # -- receiving -----------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> list[WireGuardEvent]:
        """Process one received UDP payload; never raises on bad input (it is counted and dropped).
        A data packet comes out as `PacketReceived`."""
        events = self.receive_datagrams(((data, source),), now)
        for i, event in enumerate(events):
            if type(event) is PacketsReceived:
                events[i] = PacketReceived(event.peer, event.ip_packets[0])  # one datagram, one packet
        return events

    def receive_datagrams(
        self, datagrams: Iterable[tuple[bytes, Endpoint]], now: float
    ) -> list[WireGuardEvent]:
        """Process received UDP payloads in order; never raises on bad input (it is counted and dropped).

        Data packets come out as `PacketsReceived`, one per run of consecutive packets of one peer. The
        per-packet work is the envelope's, the AEAD, the replay window and the endpoint; the receive-side
        timers and the rekey check run once per run of transport messages of one peer, as wireguard-go
        runs them once per batch."""
        events: list[WireGuardEvent] = []
        envelope = self.envelope
        plain = type(envelope) is PlainEnvelope
        form = envelope.transport_form()
        # The form's transport datagrams are recognised here; everything else goes through `unwrap`.
        prefix, type_lo, type_hi, handshake_sizes = 0, 1, 0, frozenset[int]()  # nothing matches
        if form is not None:
            prefix, type_lo, type_hi, handshake_sizes = (
                form.prefix,
                form.type_lo,
                form.type_hi,
                form.handshake_sizes,
            )
        min_size = prefix + MIN_TRANSPORT_SIZE
        unwrap = envelope.unwrap
        note_received = envelope.note_received
        is_keepalive = envelope.is_keepalive
        dropped = self.dropped
        indices = self._indices
        allowed_source = self.allowed_source
        reject_after = self._reject_after
        unpack_header = TRANSPORT_HEADER.unpack_from
        pack_nonce = COUNTER.pack_into
        transport = MessageType.TRANSPORT
        limit = REJECT_AFTER_MESSAGES
        default_window = DEFAULT_UDP_WINDOW
        # The keypair of the last transport message, so a run under one keypair looks it up once.
        # Bound below before first use: no index equals -1.
        cached_index = -1
        peer: Peer
        keypair: Keypair
        decrypt: Callable[[bytearray, memoryview, None], bytes]
        validate: Callable[[int, int], bool]
        nonce: bytearray
        window: UdpWindow
        pending_next = False  # whether that keypair is the peer's `next`, waiting for its first message
        # The run being accumulated: its peer's timers and counters are brought up to date at its end.
        run_peer: Peer | None = None
        run_bytes = run_packets = 0
        run_data = False
        # The last event while it is a PacketsReceived: the next packet of its peer joins it.
        delivered: PacketsReceived | None = None
        delivered_peer: Peer | None = None
        for data, source in datagrams:
            try:
                size = len(data)
                if (
                    size >= min_size
                    and type_lo <= int.from_bytes(data[prefix : prefix + 4], "little") <= type_hi
                    and size not in handshake_sizes
                ):
                    message = memoryview(data)[prefix:] if prefix else data  # `unwrap`'s common case
                else:
                    try:
                        classified = unwrap(data)
                    except Exception:  # a hostile datagram must never escape into the event loop
                        classified = None
                    if classified is None:
                        dropped[DropReason.MALFORMED] += 1
                        continue
                    kind, message = classified
                    if kind != transport:
                        if run_peer is not None:
                            self._transport_run_received(run_peer, run_bytes, run_packets, run_data, now)
                            run_peer = None
                        cached_index = -1  # a handshake may replace keypairs and free their indices
                        delivered = None
                        self._receive_control(kind, message, source, now, size, events)
                        continue
                    if len(message) < MIN_TRANSPORT_SIZE:
                        dropped[DropReason.MALFORMED] += 1
                        continue
                _, index, counter = unpack_header(message)
                if index != cached_index:
                    entry = indices.get(index)
                    if entry is None or (found := entry[1]) is None:
                        dropped[DropReason.UNKNOWN_INDEX] += 1
                        continue
                    peer, keypair = entry[0], found
                    if now - keypair.created >= reject_after:
                        dropped[DropReason.EXPIRED_KEYPAIR] += 1
                        continue
                    cached_index = index
                    decrypt = keypair.receive_aead.decrypt
                    validate = keypair.replay.validate
                    nonce = keypair.open_nonce
                    window = peer.window
                    pending_next = keypair is peer.keypairs.next
                pack_nonce(nonce, 4, counter)
                try:
                    plaintext = decrypt(nonce, memoryview(message)[TRANSPORT_HEADER_SIZE:], None)
                except InvalidTag:
                    dropped[DropReason.DECRYPT_FAILED] += 1
                    continue
                if not validate(counter, limit):
                    dropped[DropReason.REPLAY] += 1
                    continue
                # Authentic and fresh.
                if peer is not run_peer:
                    if run_peer is not None:
                        self._transport_run_received(run_peer, run_bytes, run_packets, run_data, now)
                    run_peer, run_bytes, run_packets, run_data = peer, 0, 0, False
                # The endpoint and the envelope's window follow every authenticated datagram (see
                # `_update_endpoint`).
                window.value = default_window
                endpoint = peer.endpoint
                if endpoint is not source and endpoint != source:
                    peer.endpoint = source
                    peer.stats.endpoint = source
                    events.append(EndpointChanged(peer.public_key, source))
                if form is None:
                    note_received(window, len(plaintext))
                if pending_next:
                    # First message under the responder's new keypair: the packets before it keep their
                    # order with the handshake's completion.
                    pending_next = False
                    self._transport_run_received(peer, run_bytes, run_packets, run_data, now)
                    run_bytes, run_packets, run_data = 0, 0, False
                    for old in peer.keypairs.received_with(keypair) or ():
                        self._free_index(old.local_index, old)
                    self._handshake_complete(peer, now, events)
                    self._send_staged_if_any(peer, now)
                run_bytes += size
                if not plaintext if plain else is_keepalive(plaintext):
                    continue
                run_data = True
                # The IP packet inside, padding removed; anything that is not IPv4/IPv6 is dropped.
                n = len(plaintext)
                version = plaintext[0] >> 4
                if version == 4 and n >= 20:
                    length = (plaintext[2] << 8) | plaintext[3]
                    if length < 20 or length > n:
                        dropped[DropReason.INVALID_PACKET] += 1
                        continue
                elif version == 6 and n >= 40:
                    length = ((plaintext[4] << 8) | plaintext[5]) + 40
                    if length > n:
                        dropped[DropReason.INVALID_PACKET] += 1
                        continue
                else:
                    dropped[DropReason.INVALID_PACKET] += 1
                    continue
                if length != n:
                    plaintext = plaintext[:length]
                if allowed_source is not None and not allowed_source(peer.public_key, plaintext):
                    dropped[DropReason.BAD_SOURCE] += 1
                    continue
                run_packets += 1
                if delivered_peer is peer and delivered is not None and events[-1] is delivered:
                    delivered.ip_packets.append(plaintext)
                else:
                    delivered = PacketsReceived(peer.public_key, [plaintext])
                    delivered_peer = peer
                    events.append(delivered)
            except _MALFORMED_ERRORS:
                dropped[DropReason.MALFORMED] += 1
        if run_peer is not None:
            try:
                self._transport_run_received(run_peer, run_bytes, run_packets, run_data, now)
            except _MALFORMED_ERRORS:  # as inside the loop: nothing escapes into the event loop
                dropped[DropReason.MALFORMED] += 1
        return events

    def _transport_run_received(
        self, peer: Peer, rx_bytes: int, rx_packets: int, data_received: bool, now: float
    ) -> None:
        """The timers and counters for a run of authentic transport messages from `peer`."""
        timers = peer.timers
        if not timers.sent_last_minute_handshake:
            self._keep_key_fresh_receiving(peer, now)
        if peer.persistent_keepalive is not None:
            self._authenticated_packet_traversal(peer, now)
        timers.new_handshake = None  # any authenticated packet received
        if data_received:
            if timers.send_keepalive is None:
                timers.send_keepalive = now + self.settings.keepalive_timeout.pick(self.rng)
            else:
                timers.need_another_keepalive = True
        stats = peer.stats
        stats.rx_bytes += rx_bytes
        stats.rx_packets += rx_packets

    def _receive_control(
        self,
        kind: MessageType,
        message: bytes,
        source: Endpoint,
        now: float,
        size: int,
        events: list[WireGuardEvent],
    ) -> None:
        """A handshake message or cookie reply."""
        try:
            if kind == MessageType.INITIATION or kind == MessageType.RESPONSE:
                events.extend(self._receive_handshake(kind, message, source, now, size))
                return
            if kind == MessageType.COOKIE_REPLY:
                self._receive_cookie_reply(message, now)
                return
        except _MALFORMED_ERRORS:
            pass
        self.dropped[DropReason.MALFORMED] += 1

    def _send_staged_if_any(self, peer: Peer, now: float) -> None:
        if peer.staged:
            self._send_staged(peer, now)

    def _receive_handshake(
        self, kind: MessageType, message: bytes, source: Endpoint, now: float, size: int
    ) -> list[WireGuardEvent]:
        checker = self.cookie_checker
        under_load = self._is_under_load(now)  # counts every handshake message, as a queue length would
        if not checker.check_mac1(message):
            self.dropped[DropReason.BAD_MAC1] += 1
            return []
        if under_load:
            src = source_bytes(source)
            if not checker.check_mac2(message, src, now):
                self.dropped[DropReason.BAD_MAC2] += 1
                if not self.disable_cookies:
                    reply = checker.create_reply(
                        message, src, self.envelope.type_value(MessageType.COOKIE_REPLY), now
                    )
                    window = UdpWindow()
                    self._outgoing.append(
                        (self.envelope.wrap_handshake(MessageType.COOKIE_REPLY, reply.pack(), window), source)
                    )
                return []
            if not self.rate_limiter.allow(source[0], now):
                self.dropped[DropReason.RATE_LIMITED] += 1
                return []
        try:
            if kind == MessageType.INITIATION:
                return self._receive_initiation(message, source, now, size)
            return self._receive_response(message, source, now, size)
        except HandshakeRejected as exc:
            self.dropped[_REJECTION_REASONS.get(exc.reason, DropReason.HANDSHAKE_FAILED)] += 1
            return []

    def _receive_initiation(
        self, message: bytes, source: Endpoint, now: float, size: int
    ) -> list[WireGuardEvent]:
        msg = HandshakeInitiation.parse(message)
        if msg is None:
            self.dropped[DropReason.MALFORMED] += 1
            return []

        def find(static: bytes) -> Handshake | None:
            found = self.peers.get(static)
            return found.handshake if found is not None else None

        hs = noise.consume_initiation(msg, self.identity, find, now)
        peer = self.peers[hs.remote_static]
        events: list[WireGuardEvent] = []
        peer.stats.rx_bytes += size
        self._update_endpoint(peer, source, events)
        self._authenticated_packet_traversal(peer, now)
        peer.timers.new_handshake = None
        # respond
        self._free_index(hs.local_index, None)
        index = self._new_index(peer, None)
        response = noise.create_response(
            hs, self.new_ephemeral(), index, self.envelope.type_value(MessageType.RESPONSE)
        )
        out = peer.cookies.add_macs(response.pack(), now)
        keys = noise.derive_transport_keys(hs)
        self._install_keypair(peer, keys, now)
        self._emit_handshake(peer, MessageType.RESPONSE, out)
        self._authenticated_packet_traversal(peer, now)
        peer.timers.send_keepalive = None
        return events

    def _receive_response(
        self, message: bytes, source: Endpoint, now: float, size: int
    ) -> list[WireGuardEvent]:
        msg = HandshakeResponse.parse(message)
        if msg is None:
            self.dropped[DropReason.MALFORMED] += 1
            return []
        entry = self._indices.get(msg.receiver)
        if entry is None or entry[1] is not None:
            self.dropped[DropReason.UNKNOWN_INDEX] += 1
            return []
        peer = entry[0]
        noise.consume_response(msg, self.identity, peer.handshake)
        events: list[WireGuardEvent] = []
        peer.stats.rx_bytes += size
        self._update_endpoint(peer, source, events)
        self._authenticated_packet_traversal(peer, now)
        peer.timers.new_handshake = None
        keys = noise.derive_transport_keys(peer.handshake)
        self._install_keypair(peer, keys, now)
        self._handshake_complete(peer, now, events)
        # The responder only trusts the new session once something arrives on it (PROTOCOL.md: Handshake).
        self._send_keepalive(peer, now)
        return events

    def _receive_cookie_reply(self, message: bytes, now: float) -> None:
        reply = CookieReply.parse(message)
        if reply is None:
            self.dropped[DropReason.MALFORMED] += 1
            return
        entry = self._indices.get(reply.receiver)
        if entry is None:
            self.dropped[DropReason.UNKNOWN_INDEX] += 1
            return
        if not entry[0].cookies.consume_reply(reply, now):
            self.dropped[DropReason.BAD_COOKIE] += 1

    # -- state changes -------------------------------------------------------------------------

    def _install_keypair(self, peer: Peer, keys: noise.TransportKeys, now: float) -> None:
        keypair = Keypair(
            keys.send, keys.receive, keys.local_index, keys.remote_index, keys.is_initiator, now
        )
        self._indices[keys.local_index] = (peer, keypair)
        for old in peer.keypairs.install(keypair):
            self._free_index(old.local_index, old)
        # session derived: erase keys if nothing renews them
        peer.timers.zero_key_material = now + 3 * self._reject_after

    def _handshake_complete(self, peer: Peer, now: float, events: list[WireGuardEvent]) -> None:
        timers = peer.timers
        timers.retransmit_handshake = None
        timers.handshake_attempts = 0
        timers.max_attempts = self.settings.max_handshake_attempts.pick(self.rng)
        timers.sent_last_minute_handshake = False
        peer.stats.last_handshake = now
        events.append(HandshakeCompleted(peer.public_key))

    def _keep_key_fresh_receiving(self, peer: Peer, now: float) -> None:
        timers = peer.timers
        if timers.sent_last_minute_handshake:
            return
        keypair = peer.keypairs.current
        if keypair is None or not keypair.is_initiator:
            return
        if now - keypair.created > self.settings.rekey_on_receive_age(self.rng):
            timers.sent_last_minute_handshake = True
            self._send_initiation(peer, now, is_retry=False)

    def _authenticated_packet_traversal(self, peer: Peer, now: float) -> None:
        interval = peer.persistent_keepalive
        if interval is not None:
            peer.timers.persistent_keepalive = now + interval.pick(self.rng)

    def _update_endpoint(self, peer: Peer, source: Endpoint, events: list[WireGuardEvent]) -> None:
        """After every authenticated datagram. amneziawg-go resets the trailer window whenever it sets the
        peer's endpoint from a packet, and on Linux every received datagram carries a fresh endpoint
        object, so the window is back at its start after each authenticated receive."""
        peer.window.value = DEFAULT_UDP_WINDOW
        if peer.endpoint != source:
            peer.endpoint = source
            peer.stats.endpoint = source
            events.append(EndpointChanged(peer.public_key, source))

    def _zero_key_material(self, peer: Peer) -> None:
        for keypair in peer.keypairs.clear():
            self._free_index(keypair.local_index, keypair)
        hs = peer.handshake
        self._free_index(hs.local_index, None)
        hs.clear()

    def _new_index(self, peer: Peer, keypair: Keypair | None) -> int:
        while True:
            index = self.rng.getrandbits(32)
            if index not in self._indices:
                self._indices[index] = (peer, keypair)
                return index

    def _free_index(self, index: int, keypair: Keypair | None) -> None:
        entry = self._indices.get(index)
        if entry is not None and entry[1] is keypair:
            del self._indices[index]

    # -- load ----------------------------------------------------------------------------------

    def _is_under_load(self, now: float) -> bool:
        if now - self._load_window_start >= 1.0:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count >= self.under_load_handshakes:
            until = now + UNDER_LOAD_AFTER_TIME
            if self._under_load_until is None or until > self._under_load_until:
                self._under_load_until = until
        return self._under_load_until is not None and now < self._under_load_until

    # -- timers --------------------------------------------------------------------------------

    def handle_timers(self, now: float) -> list[WireGuardEvent]:
        """Run every peer timer that is due; returns the events they produced (PeerUnreachable)."""
        events: list[WireGuardEvent] = []
        for peer in list(self.peers.values()):
            timers = peer.timers
            if timers.retransmit_handshake is not None and timers.retransmit_handshake <= now:
                timers.retransmit_handshake = None
                self._expired_retransmit(peer, now, events)
            if timers.new_handshake is not None and timers.new_handshake <= now:
                timers.new_handshake = None
                self._send_initiation(peer, now, is_retry=False)
            if timers.send_keepalive is not None and timers.send_keepalive <= now:
                timers.send_keepalive = None
                self._send_keepalive(peer, now)
                if timers.need_another_keepalive:
                    timers.need_another_keepalive = False
                    timers.send_keepalive = now + self.settings.keepalive_timeout.pick(self.rng)
            if timers.persistent_keepalive is not None and timers.persistent_keepalive <= now:
                timers.persistent_keepalive = None
                if peer.persistent_keepalive is not None:
                    self._send_keepalive(peer, now)
            if timers.zero_key_material is not None and timers.zero_key_material <= now:
                timers.zero_key_material = None
                self._zero_key_material(peer)
        return events

    def _expired_retransmit(self, peer: Peer, now: float, events: list[WireGuardEvent]) -> None:
        timers = peer.timers
        if timers.handshake_attempts > timers.max_attempts:
            timers.send_keepalive = None
            peer.staged.clear()
            if timers.zero_key_material is None:
                timers.zero_key_material = now + 3 * self._reject_after
            events.append(PeerUnreachable(peer.public_key))
            return
        timers.handshake_attempts += 1
        self._send_initiation(peer, now, is_retry=True)
