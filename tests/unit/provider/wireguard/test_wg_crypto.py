"""Known answers for every WireGuard primitive (docs/PROTOCOL.md: Primitives, Test vectors)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.errors import ProtocolError
from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.noise import INITIAL_CHAINING_KEY, INITIAL_HASH

SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
    b"sunscreen would be it."
)
KEY_80 = bytes(range(0x80, 0xA0))
AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")


def _hmac_reference(key: bytes, data: bytes) -> bytes:
    """RFC 2104 written out, independent of the `hmac` module."""
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\x00")
    inner = hashlib.blake2s(bytes(b ^ 0x36 for b in key) + data).digest()
    return hashlib.blake2s(bytes(b ^ 0x5C for b in key) + inner).digest()


def test_hash_is_blake2s_256_rfc7693() -> None:
    assert crypto.hash_(b"abc").hex() == "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    assert crypto.hash_(b"a", b"bc") == crypto.hash_(b"abc")


def test_mac_is_keyed_blake2s_with_16_byte_output() -> None:
    # BLAKE2s keyed known answer (blake2s-kat.txt, key 00..1f, empty input), truncated by the digest size
    # parameter rather than by slicing: the 16-byte keyed output differs from the 32-byte one's prefix.
    key = bytes(range(32))
    assert (
        hashlib.blake2s(b"", key=key).hexdigest()
        == "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"
    )
    out = crypto.mac(key, b"")
    assert len(out) == 16
    assert out != hashlib.blake2s(b"", key=key).digest()[:16]
    assert out == hashlib.blake2s(b"", key=key, digest_size=16).digest()


@settings(max_examples=50)
@given(st.binary(max_size=100), st.binary(max_size=200))
def test_hmac_blake2s_matches_rfc2104(key: bytes, data: bytes) -> None:
    assert crypto.hmac_blake2s(key, data) == _hmac_reference(key, data)


@pytest.mark.parametrize(
    ("key", "data", "t1", "t2", "t3"),
    [
        (
            "746573742d6b6579",
            "746573742d696e707574",
            "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
            "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
            "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
        ),
        (
            "776972656775617264",
            "776972656775617264",
            "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
            "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
            "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
        ),
        (
            "",
            "",
            "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
            "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
            "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
        ),
    ],
)
def test_kdf_vectors_from_wireguard_go(key: str, data: str, t1: str, t2: str, t3: str) -> None:
    k, d = bytes.fromhex(key), bytes.fromhex(data)
    assert [x.hex() for x in crypto.kdf3(k, d)] == [t1, t2, t3]
    assert [x.hex() for x in crypto.kdf2(k, d)] == [t1, t2]
    assert crypto.kdf1(k, d).hex() == t1


def test_noise_initial_constants() -> None:
    assert INITIAL_CHAINING_KEY.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert INITIAL_HASH.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


def test_x25519_rfc7748_vector() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_pub = crypto.public_key(alice)
    bob_pub = crypto.public_key(bob)
    assert alice_pub.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert bob_pub.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert crypto.dh(alice, bob_pub).hex() == shared
    assert crypto.dh(bob, alice_pub).hex() == shared


@pytest.mark.parametrize(
    "low_order_point",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_x25519_refuses_the_all_zero_shared_secret(low_order_point: bytes) -> None:
    with pytest.raises(ProtocolError):
        crypto.dh(crypto.generate_private_key(), low_order_point)


def test_generated_private_keys_are_clamped() -> None:
    key = crypto.generate_private_key()
    assert key[0] & 7 == 0 and key[31] & 0x80 == 0 and key[31] & 0x40
    assert crypto.clamp(b"\xff" * 32) == b"\xf8" + b"\xff" * 30 + b"\x7f"


def test_chacha20poly1305_rfc8439_vector() -> None:
    nonce = bytes.fromhex("070000004041424344454647")
    sealed = crypto.chacha20poly1305_seal(KEY_80, nonce, SUNSCREEN, AAD)
    assert sealed.hex() == (
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
        "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
        "1ae10b594f09e26a7e902ecbd0600691"
    )
    assert crypto.chacha20poly1305_open(KEY_80, nonce, sealed, AAD) == SUNSCREEN
    with pytest.raises(crypto.InvalidTag):
        crypto.chacha20poly1305_open(KEY_80, nonce, sealed, AAD + b"x")


def test_wireguard_aead_nonce_is_four_zero_bytes_then_counter_le() -> None:
    nonce = bytes(4) + (0x0102030405060708).to_bytes(8, "little")
    assert crypto.aead_seal(KEY_80, 0x0102030405060708, b"hi", b"") == crypto.chacha20poly1305_seal(
        KEY_80, nonce, b"hi", b""
    )


def test_hchacha20_draft_vector() -> None:
    out = crypto.hchacha20(bytes(range(32)), bytes.fromhex("000000090000004a0000000031415927"))
    assert out.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"


def test_xchacha20poly1305_draft_vector() -> None:
    nonce = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555657")
    sealed = crypto.xaead_seal(KEY_80, nonce, SUNSCREEN, AAD)
    assert sealed.hex() == (
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39"
        "ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49"
    )
    assert crypto.xaead_open(KEY_80, nonce, sealed, AAD) == SUNSCREEN
    with pytest.raises(crypto.InvalidTag):
        crypto.xaead_open(KEY_80, nonce[:23] + b"\x00", sealed, AAD)
