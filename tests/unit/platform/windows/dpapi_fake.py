"""DPAPI with a machine key, in memory (the `SecretProtection` of core/config.py): as Microsoft documents
`CryptProtectData`/`CryptUnprotectData` with CRYPTPROTECT_LOCAL_MACHINE, a blob decrypts on the machine
that made it and fails with ERROR_INVALID_DATA anywhere else or when damaged; the same data never gives
the same blob twice."""

from __future__ import annotations

import hashlib
import hmac
import os

ERROR_INVALID_DATA = 13


class FakeDpapi:
    def __init__(self, machine: bytes = b"this machine") -> None:
        self._key = hashlib.sha256(machine).digest()
        self.calls: list[str] = []

    def _stream(self, nonce: bytes, size: int) -> bytes:
        out = b""
        counter = 0
        while len(out) < size:
            out += hmac.digest(self._key, nonce + counter.to_bytes(4, "big"), "sha256")
            counter += 1
        return out[:size]

    def protect(self, data: bytes) -> bytes:
        self.calls.append("protect")
        nonce = os.urandom(16)
        sealed = bytes(a ^ b for a, b in zip(data, self._stream(nonce, len(data)), strict=True))
        return nonce + sealed + hmac.digest(self._key, nonce + sealed, "sha256")

    def unprotect(self, blob: bytes) -> bytes:
        self.calls.append("unprotect")
        nonce, sealed, tag = blob[:16], blob[16:-32], blob[-32:]
        if len(blob) < 48 or not hmac.compare_digest(tag, hmac.digest(self._key, nonce + sealed, "sha256")):
            raise OSError(ERROR_INVALID_DATA, "The data is invalid")
        return bytes(a ^ b for a, b in zip(sealed, self._stream(nonce, len(sealed)), strict=True))
