"""Curve25519 keys as WireGuard tools write them: 32 bytes, standard base64 (44 characters).

`generate_private_key` and `public_key` do what `wg genkey` and `wg pubkey` do; `decode_key` is the strict
reader every config path uses (wg rejects anything that is not exactly 32 bytes in canonical base64).
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_SIZE = 32
KEY_BASE64_LENGTH = 44
HIDDEN = "<hidden>"
"""What stands in a message for text that may be a key."""

# A key's 43 significant characters, with or without its '=' padding, also when pasted into other text
# (a mistyped line echoes the value the parser saw, not only the key).
_KEY_LIKE = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")


def clamp(private: bytes) -> bytes:
    """Clamp a scalar as Curve25519 requires (and as `wg genkey` stores it)."""
    if len(private) != KEY_SIZE:
        raise ValueError(f"a private key has {KEY_SIZE} bytes, got {len(private)}")
    clamped = bytearray(private)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return bytes(clamped)


def encode_key(key: bytes) -> str:
    """The 44-character base64 form of a 32-byte key."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"a key has {KEY_SIZE} bytes, got {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str, *, what: str) -> bytes:
    """Decode a base64 key; ValueError naming ``what`` unless it is canonical base64 of exactly 32 bytes.

    The value itself is never echoed: it may be a private key.
    """
    candidate = text.strip()
    problem = f"{what} must be {KEY_BASE64_LENGTH} characters of base64 encoding {KEY_SIZE} bytes"
    if len(candidate) != KEY_BASE64_LENGTH or not candidate.endswith("="):
        raise ValueError(f"{problem} (got {len(candidate)} characters)")
    try:
        raw = base64.b64decode(candidate, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{problem} (it contains characters outside base64)") from None
    # wg refuses a last character whose unused low bits are set; such a string is not the key's encoding.
    if len(raw) != KEY_SIZE or base64.b64encode(raw).decode("ascii") != candidate:
        raise ValueError(f"{problem} (it is not the canonical encoding of a key)")
    return raw


def hide_keys(text: str) -> str:
    """`text` with everything shaped like a base64 key (40 or more base64 characters in a row) replaced,
    for messages that echo a value from a file that holds private keys."""
    return _KEY_LIKE.sub(HIDDEN, text)


def generate_private_key() -> str:
    """A new random private key, clamped, in base64 (like `wg genkey`)."""
    return encode_key(clamp(X25519PrivateKey.generate().private_bytes_raw()))


def public_key_bytes(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamping is part of X25519, so unclamped works)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def public_key(private_b64: str) -> str:
    """The public key of a base64 private key, in base64 (like `wg pubkey`)."""
    return encode_key(public_key_bytes(decode_key(private_b64, what="private key")))
