"""The deterministic handshake of docs/PROTOCOL.md (Test vectors), reproduced byte for byte."""

from __future__ import annotations

import pytest

from awg_split_tunnel.provider.wireguard import noise
from awg_split_tunnel.provider.wireguard.cookie import CookieChecker, CookieGenerator
from awg_split_tunnel.provider.wireguard.messages import HandshakeInitiation, HandshakeResponse
from awg_split_tunnel.provider.wireguard.noise import (
    Handshake,
    HandshakeRejected,
    HandshakeState,
    StaticIdentity,
)
from awg_split_tunnel.provider.wireguard.session import Keypair
from awg_split_tunnel.provider.wireguard.tai64n import tai64n

SK_I = bytes.fromhex("0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60")
SK_R = bytes.fromhex("2022232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40")
E_I = bytes.fromhex("4042434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f60")
E_R = bytes.fromhex("6062636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f40")
INITIATION = bytes.fromhex(
    "010000004433221164b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466158a0e4ca242d151"
    "ca97ab90159a98b67e616625e68b4065d357376b6598e644ad7d678c0295d22de4cb43d5135581ed36346bfa7cf42a12"
    "2139f8939935ec574414e91f3b457e447709b4db0277480586ab0a99b2d78cf74bf0acad00000000000000000000000000000000"
)
RESPONSE = bytes.fromhex(
    "020000008877665544332211244fe3b963e899dd295baffce248d3530f3a9a7479ba063002680ebfe7adad49"
    "36a16256cac715dd8d77c7c69c6b3e630257f648b5a4d2a003cfe7cf85afaab400000000000000000000000000000000"
)
I_SEND = "c5f330b6dc92c8bd4124800733b33cd9d7e5dd2ac8c782e1b558f9b2b60804d8"
I_RECEIVE = "df0e53eac779a4c1ab023907c8dda549efdbf8ca9a4ce931ba1d27a2a8be73f9"

INITIATOR = StaticIdentity.from_private(SK_I)
RESPONDER = StaticIdentity.from_private(SK_R)


def test_static_public_keys() -> None:
    assert INITIATOR.public.hex() == "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
    assert RESPONDER.public.hex() == "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b"


def _initiate(type_value: int = 1) -> tuple[Handshake, bytes]:
    hs = Handshake.for_peer(INITIATOR, RESPONDER.public, bytes(32))
    msg = noise.create_initiation(hs, INITIATOR, E_I, 0x11223344, tai64n(1700000000.0), type_value)
    return hs, CookieGenerator.for_public_key(RESPONDER.public).add_macs(msg.pack(), 0.0)


def _respond(initiation: bytes, now: float = 0.0) -> tuple[Handshake, bytes]:
    hs = Handshake.for_peer(RESPONDER, INITIATOR.public, bytes(32))
    msg = HandshakeInitiation.parse(initiation)
    assert msg is not None
    noise.consume_initiation(msg, RESPONDER, lambda key: hs if key == INITIATOR.public else None, now)
    response = noise.create_response(hs, E_R, 0x55667788, 2)
    return hs, CookieGenerator.for_public_key(INITIATOR.public).add_macs(response.pack(), now)


def test_initiation_matches_the_vector_byte_for_byte() -> None:
    hs, message = _initiate()
    assert message == INITIATION
    assert hs.chaining_key.hex() == "643693a7636a42b588f115bc0aae9a1db8432634b2e8d96ed67d308e74e132f5"
    assert hs.hash.hex() == "f329d39804679a0611ff46c323a279602fa4e27a0efeee68d75d2a2ec0f5896e"
    assert hs.state is HandshakeState.INITIATION_CREATED


def test_type_value_is_covered_by_mac1_only() -> None:
    _, message = _initiate(type_value=123456)
    assert message[:4] == bytes.fromhex("40e20100")
    assert message[4:116] == INITIATION[4:116]
    assert message[116:132].hex() == "ddd623954f9540acc10ba6c2d23f8722"
    assert CookieChecker.for_public_key(RESPONDER.public).check_mac1(message)
    assert not CookieChecker.for_public_key(RESPONDER.public).check_mac1(INITIATION[:4] + message[4:])


def test_response_and_transport_keys_match_the_vector() -> None:
    hs_i, initiation = _initiate()
    hs_r, response = _respond(initiation)
    assert response == RESPONSE
    r = HandshakeResponse.parse(response)
    assert r is not None
    h2 = HandshakeResponse(67543, r.sender, r.receiver, r.ephemeral, r.encrypted_nothing)
    assert (
        CookieGenerator.for_public_key(INITIATOR.public).add_macs(h2.pack(), 0)[60:76].hex()
        == "8cc68d4555532a0b48e768a5b28b8055"
    )
    noise.consume_response(r, INITIATOR, hs_i)
    keys_i = noise.derive_transport_keys(hs_i)
    keys_r = noise.derive_transport_keys(hs_r)
    assert (keys_i.send.hex(), keys_i.receive.hex()) == (I_SEND, I_RECEIVE)
    assert (keys_r.receive.hex(), keys_r.send.hex()) == (I_SEND, I_RECEIVE)
    assert keys_i.is_initiator and not keys_r.is_initiator
    assert (keys_i.remote_index, keys_r.remote_index) == (0x55667788, 0x11223344)
    # secrets are dropped once the session is derived
    assert hs_i.state is HandshakeState.ZEROED and hs_i.chaining_key == bytes(32)


def test_transport_messages_match_the_vector() -> None:
    keypair = Keypair(bytes.fromhex(I_SEND), bytes.fromhex(I_RECEIVE), 0x11223344, 0x55667788, True, 0.0)
    keepalive = keypair.seal(4, b"")
    assert keepalive is not None
    assert keepalive.hex() == "04000000887766550000000000000000fd3ffdf38f1bfad20a6fdb169d83d3d3"
    assert keypair.seal(32345, b"")[:4].hex() == "597e0000"  # type: ignore[index]
    keypair.send_counter = 1
    plaintext = bytes.fromhex("450000140000000040000000c0a80001c0a80002") + bytes(12)
    assert keypair.seal(4, plaintext) == bytes.fromhex(
        "04000000887766550100000000000000d2b860536b829cdfcbec09c8d6be7c48"
        "83941e8785f1021f84a5bd949932dac0d133bd278cf7ebb6b97f3be744ac42da"
    )
    receiver = Keypair(bytes.fromhex(I_RECEIVE), bytes.fromhex(I_SEND), 0x55667788, 0x11223344, False, 0.0)
    assert receiver.open(keepalive) == b""
    assert receiver.accept_counter(keepalive)
    assert not receiver.accept_counter(keepalive)


def test_replayed_or_too_fast_initiations_are_rejected() -> None:
    hs = Handshake.for_peer(RESPONDER, INITIATOR.public, bytes(32))
    msg = HandshakeInitiation.parse(INITIATION)
    assert msg is not None
    noise.consume_initiation(msg, RESPONDER, lambda key: hs, 10.0)
    with pytest.raises(HandshakeRejected, match="replayed"):
        noise.consume_initiation(msg, RESPONDER, lambda key: hs, 20.0)
    ini = Handshake.for_peer(INITIATOR, RESPONDER.public, bytes(32))
    later = noise.create_initiation(ini, INITIATOR, E_I, 1, tai64n(1700000001.0), 1)
    with pytest.raises(HandshakeRejected, match="flood"):
        noise.consume_initiation(later, RESPONDER, lambda key: hs, 10.015)
    noise.consume_initiation(later, RESPONDER, lambda key: hs, 10.025)


def test_unknown_peer_and_tampering_are_rejected() -> None:
    msg = HandshakeInitiation.parse(INITIATION)
    assert msg is not None
    with pytest.raises(HandshakeRejected, match="unknown peer"):
        noise.consume_initiation(msg, RESPONDER, lambda key: None, 0.0)
    tampered = HandshakeInitiation.parse(INITIATION[:50] + bytes([INITIATION[50] ^ 1]) + INITIATION[51:])
    assert tampered is not None
    with pytest.raises(HandshakeRejected):
        noise.consume_initiation(tampered, RESPONDER, lambda key: None, 0.0)


def test_preshared_key_mismatch_fails_the_response() -> None:
    hs_i = Handshake.for_peer(INITIATOR, RESPONDER.public, b"\x01" * 32)
    msg = noise.create_initiation(hs_i, INITIATOR, E_I, 7, tai64n(1.0), 1)
    hs_r = Handshake.for_peer(RESPONDER, INITIATOR.public, bytes(32))
    noise.consume_initiation(msg, RESPONDER, lambda key: hs_r, 0.0)
    response = noise.create_response(hs_r, E_R, 9, 2)
    with pytest.raises(HandshakeRejected, match="decrypt"):
        noise.consume_response(response, INITIATOR, hs_i)
