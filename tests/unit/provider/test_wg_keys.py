"""Keys behave like `wg genkey` / `wg pubkey`, and malformed keys are refused with a clear reason."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.wireguard.keys import (
    clamp,
    decode_key,
    encode_key,
    generate_private_key,
    public_key,
)


def b64(hex_text: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_text)).decode()


# RFC 7748 §6.1 (X25519 Diffie-Hellman test vector).
RFC7748_ALICE = (
    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
)
RFC7748_BOB = (
    "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
)
# The deterministic handshake's static keys (docs/PROTOCOL.md: Test vectors).
SPEC_INITIATOR = (
    "0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60",
    "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c",
)
SPEC_RESPONDER = (
    "2022232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40",
    "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b",
)


@pytest.mark.parametrize("private, public", [RFC7748_ALICE, RFC7748_BOB, SPEC_INITIATOR, SPEC_RESPONDER])
def test_public_key_matches_known_answers(private: str, public: str) -> None:
    assert public_key(b64(private)) == b64(public)


def test_all_zero_private_key_is_the_clamped_scalar_two_to_the_254() -> None:
    # Clamping turns 32 zero bytes into 2^254; X25519 clamps internally, so both give one public key.
    zero = "A" * 43 + "="
    assert public_key(zero) == public_key(encode_key(clamp(bytes(32))))
    assert public_key(zero) == "L+V9o0fNYkMVKNqsX7spBzD/9oSvxM/C7ZCZX1jLO3Q="


def test_generated_private_keys_are_clamped_and_distinct() -> None:
    keys = {generate_private_key() for _ in range(8)}
    assert len(keys) == 8
    for key in keys:
        raw = decode_key(key, what="private key")
        assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
        assert clamp(raw) == raw


def test_pubkey_of_an_unclamped_key_equals_that_of_its_clamped_form() -> None:
    raw = bytes(range(1, 33))
    assert public_key(encode_key(raw)) == public_key(encode_key(clamp(raw)))


@given(st.binary(min_size=32, max_size=32))
@settings(max_examples=50)
def test_encode_decode_round_trip(raw: bytes) -> None:
    assert decode_key(encode_key(raw), what="key") == raw


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "got 0 characters"),
        ("abc=", "got 4 characters"),
        (base64.b64encode(bytes(33)).decode(), "got 44 characters"),  # 33 bytes, no '=' padding
        ("A" * 42 + "==", "canonical"),  # 31 bytes
        ("A" * 42 + "B=", "canonical"),  # low bits of the last character set: wg refuses it
        ("A" * 42 + "*=", "outside base64"),
    ],
)
def test_decode_key_refuses_anything_but_32_bytes_of_base64(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        decode_key(text, what="PresharedKey")
    assert "PresharedKey must be 44 characters of base64" in str(caught.value)


def test_decode_key_never_echoes_the_secret() -> None:
    secret = generate_private_key()[:-2] + "!="
    with pytest.raises(ValueError) as caught:
        decode_key(secret, what="private key")
    assert secret not in str(caught.value)


def test_surrounding_whitespace_is_ignored_like_wg_pubkey_reading_stdin() -> None:
    key = generate_private_key()
    assert decode_key(f"  {key}\n", what="key") == decode_key(key, what="key")
