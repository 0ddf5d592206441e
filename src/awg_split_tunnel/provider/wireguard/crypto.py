"""WireGuard's primitives: HASH, MAC, HMAC, KDF1-3, AEAD, XAEAD and X25519 (docs/PROTOCOL.md: Primitives)."""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from awg_split_tunnel.errors import ProtocolError

KEY_SIZE = 32
TAG_SIZE = 16
MAC_SIZE = 16
ZERO_NONCE = bytes(12)
_ZERO_KEY = bytes(KEY_SIZE)
_SIGMA = b"expand 32-byte k"

__all__ = [
    "KEY_SIZE",
    "MAC_SIZE",
    "TAG_SIZE",
    "InvalidTag",
    "aead_open",
    "aead_seal",
    "chacha20poly1305_open",
    "chacha20poly1305_seal",
    "clamp",
    "dh",
    "generate_private_key",
    "hash_",
    "hchacha20",
    "hmac_blake2s",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "public_key",
    "xaead_open",
    "xaead_seal",
]


def hash_(*parts: bytes) -> bytes:
    """HASH(p1 ‖ p2 ‖ …): unkeyed BLAKE2s-256."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): BLAKE2s in its own keyed mode, 16-byte output (not HMAC)."""
    return hashlib.blake2s(data, digest_size=MAC_SIZE, key=key).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """RFC 2104 HMAC over BLAKE2s-256 (block size 64)."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = hmac_blake2s(key, data)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    return t1, hmac_blake2s(prk, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    return t1, t2, hmac_blake2s(prk, t2 + b"\x03")


def chacha20poly1305_seal(key: bytes, nonce12: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """IETF ChaCha20-Poly1305 (RFC 8439): ciphertext ‖ 16-byte tag."""
    return ChaCha20Poly1305(key).encrypt(nonce12, plaintext, ad)


def chacha20poly1305_open(key: bytes, nonce12: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Inverse of `chacha20poly1305_seal`; raises InvalidTag when the ciphertext does not authenticate."""
    return ChaCha20Poly1305(key).decrypt(nonce12, ciphertext, ad)


def aead_seal(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """WireGuard's AEAD: ChaCha20-Poly1305 with nonce = 4 zero bytes ‖ counter (u64 LE)."""
    return chacha20poly1305_seal(key, _nonce(counter), plaintext, ad)


def aead_open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    return chacha20poly1305_open(key, _nonce(counter), ciphertext, ad)


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2), derived from one ChaCha20 keystream block.

    A ChaCha20 block is rounds(state) + state; with `cryptography`'s 16-byte nonce being state words
    12-15, subtracting the known input words 0-3 and 12-15 leaves HChaCha20's output words.
    """
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    out = bytearray(32)
    init = _SIGMA + nonce16
    for i, word in enumerate((0, 1, 2, 3, 12, 13, 14, 15)):
        k = 4 * word
        b = int.from_bytes(block[k : k + 4], "little")
        s = int.from_bytes(init[4 * i : 4 * i + 4], "little")
        out[4 * i : 4 * i + 4] = ((b - s) & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(out)


def xaead_seal(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305: HChaCha20 subkey, then ChaCha20-Poly1305 with 0000 ‖ nonce[16:24]."""
    subkey = hchacha20(key, nonce24[:16])
    return chacha20poly1305_seal(subkey, b"\x00\x00\x00\x00" + nonce24[16:24], plaintext, ad)


def xaead_open(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    return chacha20poly1305_open(subkey, b"\x00\x00\x00\x00" + nonce24[16:24], ciphertext, ad)


def clamp(private: bytes) -> bytes:
    """X25519 clamping, as WireGuard applies it when loading and generating private keys."""
    k = bytearray(private)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private_key() -> bytes:
    return clamp(os.urandom(KEY_SIZE))


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def dh(private: bytes, peer_public: bytes) -> bytes:
    """X25519; an all-zero shared secret (a low-order peer key) is a ProtocolError."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # `cryptography` refuses the all-zero result itself
        raise ProtocolError("X25519 produced the all-zero shared secret") from exc
    if hmac.compare_digest(shared, _ZERO_KEY):
        raise ProtocolError("X25519 produced the all-zero shared secret")
    return shared
