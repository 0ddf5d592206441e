"""`AmneziaEnvelope`: the AmneziaWG wire format around WireGuard messages (1.0, 1.5, 2.0 and 3.x).

What it adds around the messages the WireGuard core builds, as amneziawg-go 3.1 does (device/send.go,
receive.go, obf*.go):

- a type value drawn per message from H1..H4 (inclusive ranges; single values for 1.0 configs);
- S1..S4 fresh random prefix bytes in front of initiation, response, cookie reply and transport;
- I1..I5 packets, then Jc junk datagrams of Jmin..Jmax-1 bytes, before every initiation;
- 3.x header protection: ChaCha20 keystream keyed by `header_protection_key`, nonce = the first 12 bytes of
  the datagram (the random prefix); handshake messages masked whole, transport only its 16-byte header;
- 3.x random trailers (random bytes after handshake messages, zeros inside transport plaintexts, both
  filling datagrams up to the peer's UDP window) and content padding (replacing the pad-to-16);
- the receiver's classification: initiation, response, cookie reply, transport, in that order, on size and
  unmasked type range; everything else (junk, I-packets, noise) is counted and dropped.

Nothing here does I/O; randomness is injected (`rng` for picks, `urandom` for bytes on the wire).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from awg_split_tunnel.provider.amneziawg.params import AmneziaParams, timer_overrides
from awg_split_tunnel.provider.wireguard.envelope import (
    COOKIE_REPLY_SIZE,
    DEFAULT_UDP_WINDOW,
    INITIATION_SIZE,
    MIN_TRANSPORT_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    Envelope,
    MessageType,
    PlainEnvelope,
    TransportForm,
    UdpWindow,
    padded_plaintext_length,
)
from awg_split_tunnel.provider.wireguard.value_range import Range

__all__ = ["AmneziaEnvelope", "UnwrapStats", "envelope_for", "header_keystream", "timer_overrides"]

NONCE_SIZE = 12
NOISE_POOL = 4096  # random prefix bytes fetched from `urandom` at a time for transport messages
_COUNTER_ZERO = bytes(4)
_HANDSHAKES = (
    (MessageType.INITIATION, INITIATION_SIZE),
    (MessageType.RESPONSE, RESPONSE_SIZE),
    (MessageType.COOKIE_REPLY, COOKIE_REPLY_SIZE),
)


def header_keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    """IETF ChaCha20 keystream (block counter 0) for header protection: `nonce` is the datagram's first
    12 bytes."""
    encryptor = Cipher(algorithms.ChaCha20(key, _COUNTER_ZERO + nonce), mode=None).encryptor()
    return encryptor.update(bytes(length))


def _xor(data: bytes, keystream: bytes) -> bytes:
    n = len(data)
    return (int.from_bytes(data, "little") ^ int.from_bytes(keystream[:n], "little")).to_bytes(n, "little")


def _below(rng: random.Random, n: int) -> int:
    """Uniform in [0, n), 0 when n <= 0 (Go's fastrandn(0) is 0)."""
    return rng.randrange(n) if n > 0 else 0


@dataclass(slots=True)
class UnwrapStats:
    """Received datagrams the envelope dropped, by reason."""

    too_short: int = 0
    unclassified: int = 0


class AmneziaEnvelope:
    """The `Envelope` for an AmneziaWG parameter set; with every parameter unset it is WireGuard exactly.

    `params` must be valid (`AmneziaParams.check()` is called here and raises `ConfigError` otherwise).
    `rng` picks type values, junk sizes, trailer and padding lengths (amneziawg-go uses a
    non-cryptographic PRNG for these); `urandom` supplies the bytes that go on the wire (prefixes, junk,
    trailers, `<r>`-family tags). `<t>` tags carry Unix seconds from `unix_clock()`, not the monotonic
    `now` the core passes in.
    """

    def __init__(
        self,
        params: AmneziaParams,
        *,
        rng: random.Random | None = None,
        urandom: Callable[[int], bytes] = os.urandom,
        unix_clock: Callable[[], float] = time.time,
    ) -> None:
        params.check()
        self._unix_clock = unix_clock
        self.params = params
        self.stats = UnwrapStats()
        self._rng = rng if rng is not None else random.Random()
        self._urandom = urandom
        self._key = params.header_protection_key if params.header_protection else None
        self._i_packets = params.i_packets
        self._packets_sent = 0  # for the 1.5 `<c>` tag
        self._trailers = params.random_trailers
        self._padding = (
            params.content_padding_addition if params.content_padding_addition != Range(0, 0) else None
        )
        self._types = {
            MessageType.INITIATION: params.h1,
            MessageType.RESPONSE: params.h2,
            MessageType.COOKIE_REPLY: params.h3,
            MessageType.TRANSPORT: params.h4,
        }
        self._prefixes = {
            MessageType.INITIATION: params.s1,
            MessageType.RESPONSE: params.s2,
            MessageType.COOKIE_REPLY: params.s3,
            MessageType.TRANSPORT: params.s4,
        }
        self._s4 = params.s4
        self._h4 = (params.h4.lo, params.h4.hi)
        # (type, prefix, message size, lo, hi) in the receiver's order.
        self._classes = tuple(
            (msg_type, self._prefixes[msg_type], size, self._types[msg_type].lo, self._types[msg_type].hi)
            for msg_type, size in _HANDSHAKES
        )
        # Without header protection, trailers or content padding a transport datagram is a random prefix
        # and a WireGuard message with another type value: the core frames those itself.
        self._form: TransportForm | None = None
        if self._key is None and not self._trailers and self._padding is None:
            sizes = frozenset(prefix + size for _, prefix, size, _, _ in self._classes)
            self._form = TransportForm(self._s4, params.h4.lo, params.h4.hi, sizes)
        self._type_values = range(params.h4.lo, params.h4.hi + 1)
        self._noise = b""
        self._noise_at = 0

    # -- sending ------------------------------------------------------------------------------------

    def type_value(self, msg_type: MessageType) -> int:
        return self._types[msg_type].pick(self._rng)

    def before_initiation(self, now: float) -> list[bytes]:
        out = []
        unix_now = self._unix_clock() if self._i_packets else 0.0
        for template in self._i_packets:
            out.append(template.generate(unix_now, self._urandom, self._packets_sent))
            self._packets_sent += 1
        params = self.params
        for _ in range(params.jc):
            # amneziawg-go 3.x: Jmin + rnd(Jmax - Jmin), so Jmax itself is never sent (exactly Jmin if equal).
            out.append(self._urandom(params.jmin + _below(self._rng, params.jmax - params.jmin)))
            self._packets_sent += 1
        return out

    def wrap_handshake(self, msg_type: MessageType, message: bytes, window: UdpWindow) -> bytes:
        prefix = self._urandom(self._prefixes[msg_type])
        self._packets_sent += 1
        body = (
            message
            if self._key is None
            else _xor(message, header_keystream(self._key, prefix[:NONCE_SIZE], len(message)))
        )
        if not self._trailers:
            return prefix + body
        # Cookie replies are sent before a peer is known, so they fill up to the default window.
        limit = DEFAULT_UDP_WINDOW if msg_type is MessageType.COOKIE_REPLY else window.value
        trailer = self._urandom(_below(self._rng, limit - len(prefix) - len(message)))
        return prefix + body + trailer

    def transport_plaintext_length(self, ip_len: int, mtu: int, window: UdpWindow) -> int:
        bare = self._s4 + MIN_TRANSPORT_SIZE + ip_len
        if window.value < bare:
            window.value = bare
        if self._padding is not None:
            addition = self._padding.pick(self._rng)
            if mtu:
                last = ip_len % mtu if ip_len > mtu else ip_len
                addition = min(addition, mtu - last)
            return ip_len + addition
        if self._trailers:
            return ip_len + _below(self._rng, window.value - bare)
        return padded_plaintext_length(ip_len, mtu)

    def transport_form(self) -> TransportForm | None:
        return self._form

    def transport_randomness(self, count: int) -> tuple[list[int], bytes]:
        self._packets_sent += count
        values = self._type_values
        # `choices` draws one random() per pick: a batch draws what its messages one by one would.
        types = [values[0]] * count if len(values) == 1 else self._rng.choices(values, k=count)
        need = self._s4 * count
        pool, at = self._noise, self._noise_at
        if at + need > len(pool):
            pool = pool[at:]
            at = 0
            while len(pool) < need:  # whole pools only, so the bytes drawn do not depend on batch sizes
                pool += self._urandom(NOISE_POOL)
        self._noise, self._noise_at = pool, at + need
        return types, pool[at : at + need]

    def wrap_transport(self, message: bytes, window: UdpWindow) -> bytes:
        self._packets_sent += 1
        if self._key is None:
            return self._urandom(self._s4) + message if self._s4 else message
        prefix = self._urandom(self._s4)
        keystream = header_keystream(self._key, prefix[:NONCE_SIZE], TRANSPORT_HEADER_SIZE)
        return prefix + _xor(message[:TRANSPORT_HEADER_SIZE], keystream) + message[TRANSPORT_HEADER_SIZE:]

    # -- receiving ----------------------------------------------------------------------------------

    def unwrap(self, datagram: bytes) -> tuple[MessageType, bytes] | None:
        """Classify as amneziawg-go 3.1 does: initiation, response, cookie reply, transport, each on
        size and the unmasked u32 at its prefix offset lying in its H range. Never raises."""
        size = len(datagram)
        if size < MIN_TRANSPORT_SIZE:
            self.stats.too_short += 1
            return None
        keystream = b""
        mask = 0
        if self._key is not None:
            keystream = header_keystream(self._key, bytes(datagram[:NONCE_SIZE]), INITIATION_SIZE)
            mask = int.from_bytes(keystream[:4], "little")
        trailers = self._trailers
        for msg_type, prefix, length, lo, hi in self._classes:
            expected = prefix + length
            if size == expected or (trailers and size > expected):
                value = int.from_bytes(datagram[prefix : prefix + 4], "little") ^ mask
                if lo <= value <= hi:
                    message = bytes(datagram[prefix : prefix + length])
                    return msg_type, message if not keystream else _xor(message, keystream)
        prefix = self._s4
        if size >= prefix + MIN_TRANSPORT_SIZE:
            value = int.from_bytes(datagram[prefix : prefix + 4], "little") ^ mask
            lo, hi = self._h4
            if lo <= value <= hi:
                if not keystream:
                    return MessageType.TRANSPORT, bytes(datagram[prefix:]) if prefix else bytes(datagram)
                end = prefix + TRANSPORT_HEADER_SIZE
                return MessageType.TRANSPORT, _xor(bytes(datagram[prefix:end]), keystream) + bytes(
                    datagram[end:]
                )
        self.stats.unclassified += 1
        return None

    def note_received(self, window: UdpWindow, plaintext_len: int) -> None:
        """`plaintext_len` is the whole decrypted plaintext, padding included (amneziawg-go grows the window
        before trimming to the IP length)."""
        seen = self._s4 + TRANSPORT_HEADER_SIZE + plaintext_len
        if window.value < seen:
            window.value = seen

    def is_keepalive(self, plaintext: bytes) -> bool:
        # amneziawg-go 3.x: padded keepalives are all zeros, and no IP packet starts with a zero byte.
        return len(plaintext) == 0 or plaintext[0] == 0


def envelope_for(
    params: AmneziaParams,
    *,
    rng: random.Random | None = None,
    urandom: Callable[[int], bytes] = os.urandom,
    unix_clock: Callable[[], float] = time.time,
) -> Envelope:
    """`PlainEnvelope` when the set is WireGuard on the wire, else an `AmneziaEnvelope` (raises
    `ConfigError` for an invalid set either way)."""
    if params.is_plain:
        params.check()
        return PlainEnvelope()
    return AmneziaEnvelope(params, rng=rng, urandom=urandom, unix_clock=unix_clock)
