"""AmneziaEnvelope on the wire, generation by generation, as docs/PROTOCOL.md describes it (the AmneziaWG
sections, and Test vectors: envelope sizes, header protection, runs against the reference peer)."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable, Iterator, Mapping

import pytest

from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.amneziawg.envelope import AmneziaEnvelope, envelope_for, header_keystream
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard.envelope import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    Envelope,
    MessageType,
    PlainEnvelope,
    UdpWindow,
)
from awg_split_tunnel.provider.wireguard.value_range import Range

SIZES = {
    MessageType.INITIATION: INITIATION_SIZE,
    MessageType.RESPONSE: RESPONSE_SIZE,
    MessageType.COOKIE_REPLY: COOKIE_REPLY_SIZE,
}
KEY = bytes(range(0x80, 0xA0))

# Test vectors: the deterministic initiation (type 1, mac2 zero) and the initiator's first keepalive.
INITIATION = bytes.fromhex(
    "010000004433221164b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466158a0e4ca242d151"
    "ca97ab90159a98b67e616625e68b4065d357376b6598e644ad7d678c0295d22de4cb43d5135581ed36346bfa7cf42a12"
    "2139f8939935ec574414e91f3b457e447709b4db0277480586ab0a99b2d78cf74bf0acad00000000000000000000000000000000"
)
KEEPALIVE = bytes.fromhex("04000000887766550000000000000000fd3ffdf38f1bfad20a6fdb169d83d3d3")

RUN_D = {
    "jc": 3,
    "jmin": 50,
    "jmax": 60,
    "s1": 37,
    "s2": 61,
    "s3": 11,
    "s4": 7,
    "h1": "100-199",
    "h2": "200-299",
    "h3": "300-399",
    "h4": "400-499",
    "i1": "<b 0xc0ffee><r 5><t>",
}
# Runs A-C: S 20/30/25/16, H 100000-100999 …, Jc 2, Jmin 40, Jmax 50, the same I1, a 32-byte key.
RUNS_ABC = {
    "jc": 2,
    "jmin": 40,
    "jmax": 50,
    "s1": 20,
    "s2": 30,
    "s3": 25,
    "s4": 16,
    "h1": "100000-100999",
    "h2": "200000-200999",
    "h3": "300000-300999",
    "h4": "400000-400999",
    "i1": "<b 0xc0ffee><r 5><t>",
    "header_protection_key": KEY.hex(),
}
MTU = 1420


def make(
    values: Mapping[str, object], seed: int = 1, urandom: Callable[[int], bytes] | None = None
) -> AmneziaEnvelope:
    rng = random.Random(seed)
    return AmneziaEnvelope(
        AmneziaParams.from_mapping(values),
        rng=rng,
        urandom=urandom or rng.randbytes,
        unix_clock=lambda: 1_700_000_000.5,
    )


def handshake(envelope: AmneziaEnvelope, msg_type: MessageType, seed: int = 0) -> bytes:
    """A handshake message as the core builds it: the envelope's type value, then (random) fields."""
    body = random.Random(seed).randbytes(SIZES[msg_type] - 4)
    return struct.pack("<I", envelope.type_value(msg_type)) + body


def transport(envelope: AmneziaEnvelope, ip_len: int, window: UdpWindow, seed: int = 0) -> bytes:
    """A sealed transport message for an IP packet of ip_len bytes: header, ciphertext, tag."""
    plaintext = envelope.transport_plaintext_length(ip_len, MTU, window)
    rest = random.Random(seed).randbytes(12 + plaintext + 16)
    return struct.pack("<I", envelope.type_value(MessageType.TRANSPORT)) + rest


def u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


# -- 1.0 ---------------------------------------------------------------------------------------------

V10 = {
    "jc": 4,
    "jmin": 40,
    "jmax": 70,
    "s1": 15,
    "s2": 68,
    "h1": 1020325451,
    "h2": 3288052141,
    "h3": 1766607858,
    "h4": 2356934485,
}


def test_1_0_sends_junk_then_prefixed_handshakes_and_bare_cookie_and_transport() -> None:
    envelope = make(V10)
    window = UdpWindow()
    junk = envelope.before_initiation(now=0.0)
    assert len(junk) == 4 and all(40 <= len(j) <= 69 for j in junk)
    initiation = envelope.wrap_handshake(
        MessageType.INITIATION, handshake(envelope, MessageType.INITIATION), window
    )
    assert len(initiation) == 15 + 148 and u32(initiation, 15) == 1020325451
    response = envelope.wrap_handshake(
        MessageType.RESPONSE, handshake(envelope, MessageType.RESPONSE), window
    )
    assert len(response) == 68 + 92 and u32(response, 68) == 3288052141
    cookie = envelope.wrap_handshake(
        MessageType.COOKIE_REPLY, handshake(envelope, MessageType.COOKIE_REPLY), window
    )
    assert len(cookie) == 64 and u32(cookie, 0) == 1766607858
    keepalive = envelope.wrap_transport(transport(envelope, 0, window), window)
    assert len(keepalive) == 32 and u32(keepalive, 0) == 2356934485


def test_the_handshake_message_is_sent_unchanged_after_the_prefix_so_its_macs_still_verify() -> None:
    envelope = make(V10)
    message = handshake(envelope, MessageType.INITIATION)
    datagram = envelope.wrap_handshake(MessageType.INITIATION, message, UdpWindow())
    assert datagram[15:] == message
    assert envelope.unwrap(datagram) == (MessageType.INITIATION, message)


def test_prefix_bytes_are_fresh_for_every_datagram() -> None:
    envelope = make(V10)
    message = handshake(envelope, MessageType.INITIATION)
    prefixes = {envelope.wrap_handshake(MessageType.INITIATION, message, UdpWindow())[:15] for _ in range(10)}
    assert len(prefixes) == 10


# -- 1.5 ---------------------------------------------------------------------------------------------


def test_1_5_sends_defined_i_packets_in_order_then_junk() -> None:
    envelope = make(
        {"i1": "<b 0x01><c>", "i2": "", "i3": "<b 0x03><t>", "i5": "<b 0x05>", "jc": 2, "jmin": 8, "jmax": 8}
    )
    first = envelope.before_initiation(now=0.0)
    assert [len(p) for p in first] == [9, 5, 1, 8, 8]
    assert first[0] == b"\x01" + (0).to_bytes(8, "big")
    assert first[1] == b"\x03" + struct.pack(">I", 1_700_000_000)
    assert first[2] == b"\x05"
    second = envelope.before_initiation(now=5.0)
    # The 1.5 counter counts every datagram the envelope produced.
    assert int.from_bytes(second[0][1:], "big") == 5


# -- 2.0 (envelope sizes, run D) --------------------------------------------------------------------------


def test_run_d_sizes_on_the_wire() -> None:
    envelope = make(RUN_D)
    window = UdpWindow()
    burst = envelope.before_initiation(now=0.0)
    assert len(burst) == 4
    assert (
        len(burst[0]) == 12
        and burst[0][:3] == b"\xc0\xff\xee"
        and burst[0][8:] == struct.pack(">I", 1_700_000_000)
    )
    assert all(50 <= len(junk) <= 59 for junk in burst[1:])
    sizes = {
        t: len(envelope.wrap_handshake(t, handshake(envelope, t), window))
        for t in (MessageType.INITIATION, MessageType.RESPONSE, MessageType.COOKIE_REPLY)
    }
    assert sizes == {MessageType.INITIATION: 185, MessageType.RESPONSE: 153, MessageType.COOKIE_REPLY: 75}
    assert len(envelope.wrap_transport(transport(envelope, 84, window), window)) == 135
    assert len(envelope.wrap_transport(transport(envelope, 0, window), window)) == 39


def test_the_time_tag_is_wall_clock_unix_seconds_not_the_monotonic_now() -> None:
    params = AmneziaParams.from_mapping({"i1": "<t>"})
    envelope = AmneziaEnvelope(params, unix_clock=lambda: 1_800_000_000.7)
    assert envelope.before_initiation(now=12.5) == [struct.pack(">I", 1_800_000_000)]
    (packet,) = AmneziaEnvelope(params).before_initiation(now=12.5)
    assert abs(struct.unpack(">I", packet)[0] - time.time()) < 5


def test_junk_sizes_never_reach_jmax_as_in_amneziawg_go_3() -> None:
    envelope = make({"jc": 120, "jmin": 50, "jmax": 52})
    assert {len(j) for j in envelope.before_initiation(0.0)} == {50, 51}
    assert {len(j) for j in make({"jc": 2, "jmin": 45, "jmax": 45}).before_initiation(0.0)} == {45}


def test_type_values_are_drawn_per_message_from_the_whole_inclusive_range() -> None:
    envelope = make({"h1": "10-12", "h2": 13, "h3": 14, "h4": "15-16"})
    assert {envelope.type_value(MessageType.INITIATION) for _ in range(200)} == {10, 11, 12}
    assert {envelope.type_value(MessageType.TRANSPORT) for _ in range(200)} == {15, 16}
    assert envelope.type_value(MessageType.RESPONSE) == 13


def test_transport_padding_is_wireguards_with_the_prefix_in_front() -> None:
    envelope = make(RUN_D)
    window = UdpWindow()
    assert envelope.transport_plaintext_length(84, MTU, window) == 96
    assert envelope.transport_plaintext_length(1419, MTU, window) == 1420
    message = transport(envelope, 84, window)
    datagram = envelope.wrap_transport(message, window)
    assert datagram[7:] == message
    assert envelope.unwrap(datagram) == (MessageType.TRANSPORT, message)


CLASSIFIER = {
    "s1": 15,
    "s2": 18,
    "s3": 20,
    "s4": 25,
    "h1": "123456-123500",
    "h2": "1000-1100",
    "h3": "2000-2100",
    "h4": "32345-32350",
}


def _datagram(size: int, words: dict[int, bytes]) -> bytes:
    data = bytearray(size)
    for offset, word in words.items():
        data[offset : offset + 4] = word
    return bytes(data)


def test_classifier_vectors_of_6_3() -> None:
    envelope = make(CLASSIFIER)
    initiation = _datagram(163, {15: bytes.fromhex("40e20100")})
    result = envelope.unwrap(initiation)
    assert result is not None and result[0] is MessageType.INITIATION and result[1] == initiation[15:]
    assert envelope.unwrap(_datagram(162, {15: bytes.fromhex("40e20100")})) is None
    shifted = envelope.unwrap(_datagram(162, {15: bytes.fromhex("40e20100"), 25: bytes.fromhex("597e0000")}))
    assert shifted is not None and shifted[0] is MessageType.TRANSPORT
    keepalive = envelope.unwrap(_datagram(57, {25: bytes.fromhex("597e0000")}))
    assert keepalive is not None and keepalive[0] is MessageType.TRANSPORT and len(keepalive[1]) == 32
    assert envelope.stats.unclassified == 1


def test_a_longer_initiation_is_accepted_only_with_our_own_trailers_on() -> None:
    longer = _datagram(170, {15: bytes.fromhex("40e20100")})
    assert make(CLASSIFIER).unwrap(longer) is None
    with_trailers = make({**CLASSIFIER, "random_trailers": "on"}).unwrap(longer)
    assert with_trailers is not None and with_trailers == (MessageType.INITIATION, longer[15:163])


def test_a_transport_datagram_sized_like_a_handshake_is_taken_for_one_as_go_does() -> None:
    # Classification: the order is initiation first, so a transport whose word at S1 falls in H1 is lost.
    envelope = make(CLASSIFIER)
    confusing = _datagram(163, {15: bytes.fromhex("40e20100"), 25: bytes.fromhex("597e0000")})
    result = envelope.unwrap(confusing)
    assert result is not None and result[0] is MessageType.INITIATION


def test_junk_and_short_datagrams_are_dropped_and_counted() -> None:
    envelope = make(RUN_D)
    for junk in envelope.before_initiation(0.0):
        assert envelope.unwrap(junk) is None
    assert envelope.unwrap(b"\x04" + bytes(30)) is None
    assert envelope.stats.too_short >= 2  # the 12-byte I1 and the 31-byte datagram


def test_keepalives_are_empty_or_start_with_a_zero_byte() -> None:
    envelope = make(RUN_D)
    assert envelope.is_keepalive(b"")
    assert envelope.is_keepalive(bytes(13))
    assert not envelope.is_keepalive(b"\x45" + bytes(19))


# -- 3.x: header protection and its vectors -------------------------------------------------------------


def _fixed(*chunks: bytes) -> Callable[[int], bytes]:
    it: Iterator[bytes] = iter(chunks)

    def urandom(n: int) -> bytes:
        chunk = next(it)
        assert len(chunk) == n
        return chunk

    return urandom


VECTOR_PARAMS = {
    "s1": 15,
    "s2": 12,
    "s3": 12,
    "s4": 16,
    "h1": 123456,
    "h2": 5,
    "h3": 6,
    "h4": 400000,
    "header_protection_key": KEY.hex(),
}
PLAIN_KEEPALIVE = (400000).to_bytes(4, "little") + KEEPALIVE[4:]
PLAIN_INITIATION = (
    (123456).to_bytes(4, "little")
    + INITIATION[4:116]
    + bytes.fromhex("ddd623954f9540acc10ba6c2d23f8722")
    + bytes(16)
)
PROTECTED_KEEPALIVE = bytes.fromhex(
    "a0a1a2a3a4a5a6a7a8a9aaabacadaeafe8ada420b2356cbefe52eb5303682929fd3ffdf38f1bfad20a6fdb169d83d3d3"
)
PROTECTED_INITIATION = bytes.fromhex(
    "b0b1b2b3b4b5b6b7b8b9babbbcbdbe5737fb9089878bdf91780fb334ea03cf024a3217f772d5e3b0a113ebe7260d6f49"
    "59b06390833b756ff1832f85251008876ef5a9039e488981b2a7e587843e36179d995c5314cb0501dc9ae0ec9e1e3f24"
    "93c3dd92e313fbc7e877abbff0d55d5c079e60fb6601f9f64ae4c3f4291a19f6f7210ed304f309b7225fdd64d45387b5"
    "61c1984dbb5834d1d1af56583ea217af40ad40"
)


def test_the_header_protection_keystream_vectors() -> None:
    assert header_keystream(KEY, bytes(range(0xA0, 0xAC)), 16).hex() == "68b7a2203a420aebfe52eb5303682929"
    assert header_keystream(KEY, bytes(range(0xB0, 0xBC)), 16).hex() == "17d5fa90cdb4a9cef5c90e02e4545948"


def test_a_protected_keepalive_masks_only_the_header() -> None:
    envelope = make(VECTOR_PARAMS, urandom=_fixed(bytes(range(0xA0, 0xB0))))
    assert envelope.wrap_transport(PLAIN_KEEPALIVE, UdpWindow()) == PROTECTED_KEEPALIVE


def test_a_protected_initiation_is_masked_whole() -> None:
    envelope = make(VECTOR_PARAMS, urandom=_fixed(bytes(range(0xB0, 0xBF))))
    assert (
        envelope.wrap_handshake(MessageType.INITIATION, PLAIN_INITIATION, UdpWindow()) == PROTECTED_INITIATION
    )


def test_protected_datagrams_unmask_to_the_plain_messages() -> None:
    envelope = make(VECTOR_PARAMS)
    assert envelope.unwrap(PROTECTED_KEEPALIVE) == (MessageType.TRANSPORT, PLAIN_KEEPALIVE)
    assert envelope.unwrap(PROTECTED_INITIATION) == (MessageType.INITIATION, PLAIN_INITIATION)
    assert envelope.unwrap(PROTECTED_INITIATION + bytes(7)) is None
    trailers = make({**VECTOR_PARAMS, "random_trailers": "on"})
    assert trailers.unwrap(PROTECTED_INITIATION + bytes(7)) == (MessageType.INITIATION, PLAIN_INITIATION)


def test_without_the_key_protected_datagrams_are_noise() -> None:
    unprotected = {k: v for k, v in VECTOR_PARAMS.items() if k != "header_protection_key"}
    assert make(unprotected).unwrap(PROTECTED_INITIATION) is None


def test_run_c_sizes_protection_without_trailers() -> None:
    envelope = make(RUNS_ABC)
    window = UdpWindow()
    burst = envelope.before_initiation(0.0)
    assert len(burst[0]) == 12 and all(40 <= len(j) <= 49 for j in burst[1:])
    assert burst[0][:3] == b"\xc0\xff\xee"  # I-packets are never masked
    initiation = envelope.wrap_handshake(
        MessageType.INITIATION, handshake(envelope, MessageType.INITIATION), window
    )
    assert len(initiation) == 168
    assert (
        len(envelope.wrap_handshake(MessageType.RESPONSE, handshake(envelope, MessageType.RESPONSE), window))
        == 122
    )
    assert len(envelope.wrap_transport(transport(envelope, 0, window), window)) == 48
    assert len(envelope.wrap_transport(transport(envelope, 84, window), window)) == 144
    assert len(envelope.wrap_transport(transport(envelope, 1420, window), window)) == 1468


def test_masked_type_words_leave_every_h_range() -> None:
    envelope = make(RUNS_ABC)
    window = UdpWindow()
    ranges = [Range(100000, 100999), Range(200000, 200999), Range(300000, 300999), Range(400000, 400999)]
    for seed in range(50):
        datagram = envelope.wrap_handshake(
            MessageType.INITIATION, handshake(envelope, MessageType.INITIATION, seed), window
        )
        assert not any(u32(datagram, 20) in r for r in ranges)
        datagram = envelope.wrap_transport(transport(envelope, 40, window, seed), window)
        assert not any(u32(datagram, 16) in r for r in ranges)


# -- 3.x: trailers and content padding (runs A and B) -------------------------------------------------------


def test_run_a_content_padding_and_trailers() -> None:
    envelope = make({**RUNS_ABC, "random_trailers": "on", "content_padding_addition": "10-20"})
    keepalives, pings, big = set(), set(), set()
    initiations = set()
    for seed in range(300):
        window = UdpWindow()
        message = handshake(envelope, MessageType.INITIATION, seed)
        initiations.add(len(envelope.wrap_handshake(MessageType.INITIATION, message, window)))
        keepalives.add(len(envelope.wrap_transport(transport(envelope, 0, window, seed), window)))
        pings.add(len(envelope.wrap_transport(transport(envelope, 84, window, seed), window)))
        big.add(len(envelope.wrap_transport(transport(envelope, 1420, window, seed), window)))
    assert keepalives == set(range(58, 69))
    assert pings == set(range(142, 153))
    assert big == {1468}  # the addition is capped at the MTU
    assert min(initiations) >= 168 and max(initiations) <= 499 and len(initiations) > 100


def test_run_b_transport_trailers_fill_up_to_the_window() -> None:
    envelope = make({**RUNS_ABC, "random_trailers": "on"})
    keepalives, pings = set(), set()
    for seed in range(400):
        window = UdpWindow()
        keepalives.add(len(envelope.wrap_transport(transport(envelope, 0, window, seed), window)))
        pings.add(len(envelope.wrap_transport(transport(envelope, 84, window, seed), window)))
    assert min(keepalives) >= 48 and max(keepalives) <= 499 and len(keepalives) > 200
    assert min(pings) >= 132 and max(pings) <= 499
    window = UdpWindow()
    assert (
        len(envelope.wrap_transport(transport(envelope, 1028, window), window)) == 1076
    )  # B >= W: no trailer
    assert window.value == 1076  # the window grew to the largest datagram sent


def test_transport_trailers_are_zero_plaintext_unaligned_and_keepalives_stay_keepalives() -> None:
    envelope = make({**RUNS_ABC, "random_trailers": "on"})
    lengths = {envelope.transport_plaintext_length(45, MTU, UdpWindow()) for _ in range(200)}
    assert any(n % 16 for n in lengths) and min(lengths) >= 45
    keepalive_plaintext = bytes(envelope.transport_plaintext_length(0, MTU, UdpWindow()))
    assert envelope.is_keepalive(keepalive_plaintext)


def test_cookie_reply_trailers_fill_a_fixed_500_bytes_not_the_window() -> None:
    envelope = make({**RUNS_ABC, "random_trailers": "on"})
    window = UdpWindow(5000)
    sizes = {
        len(
            envelope.wrap_handshake(
                MessageType.COOKIE_REPLY, handshake(envelope, MessageType.COOKIE_REPLY), window
            )
        )
        for _ in range(300)
    }
    assert min(sizes) >= 89 and max(sizes) <= 499
    initiations = {
        len(
            envelope.wrap_handshake(
                MessageType.INITIATION, handshake(envelope, MessageType.INITIATION), window
            )
        )
        for _ in range(300)
    }
    assert max(initiations) > 499


def test_handshake_trailers_never_appear_when_the_window_is_already_full() -> None:
    envelope = make({**RUNS_ABC, "random_trailers": "on", "s1": 400})
    window = UdpWindow()
    assert (
        len(
            envelope.wrap_handshake(
                MessageType.INITIATION, handshake(envelope, MessageType.INITIATION), window
            )
        )
        == 548
    )


def test_received_transport_grows_the_window() -> None:
    envelope = make(RUNS_ABC)
    window = UdpWindow()
    envelope.note_received(window, 100)
    assert window.value == 500
    envelope.note_received(window, 1000)
    assert window.value == 16 + 16 + 1000


# -- unset is WireGuard ------------------------------------------------------------------------------------


def test_with_everything_unset_the_envelope_is_wireguard_on_the_wire() -> None:
    amnezia: Envelope = AmneziaEnvelope(AmneziaParams())
    plain: Envelope = PlainEnvelope()
    window = UdpWindow()
    assert amnezia.before_initiation(0.0) == []
    for msg_type in MessageType:
        assert amnezia.type_value(msg_type) == plain.type_value(msg_type)
    assert amnezia.wrap_handshake(MessageType.INITIATION, INITIATION, window) == INITIATION
    assert amnezia.wrap_transport(KEEPALIVE, window) == KEEPALIVE
    for ip_len in (0, 1, 20, 84, 1419, 1420, 1421, 3000):
        assert amnezia.transport_plaintext_length(ip_len, MTU, window) == plain.transport_plaintext_length(
            ip_len, MTU, window
        )
    assert amnezia.unwrap(INITIATION) == plain.unwrap(INITIATION) == (MessageType.INITIATION, INITIATION)
    assert isinstance(envelope_for(AmneziaParams()), PlainEnvelope)
    assert isinstance(envelope_for(AmneziaParams(jc=1, jmin=10, jmax=20)), AmneziaEnvelope)


def test_an_invalid_set_cannot_build_an_envelope() -> None:
    with pytest.raises(ConfigError):
        AmneziaEnvelope(AmneziaParams.from_mapping({"h1": "2"}))
