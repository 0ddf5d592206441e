"""DPAPI with a machine key, in memory (the `SecretProtection` of core/config.py): as Microsoft documents
`CryptProtectData`/`CryptUnprotectData` with CRYPTPROTECT_LOCAL_MACHINE, a blob decrypts on the machine
that made it and fails with ERROR_INVALID_DATA anywhere else or when damaged; the same data never gives
the same blob twice. `FakeCrypt32` serves it as the DLL functions `platform/windows/dpapi.py` calls."""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

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


class FakeCrypt32:
    """crypt32.dll's `CryptProtectData` / `CryptUnprotectData` and kernel32's `LocalFree`, called through
    ctypes as Windows would be: `DATA_BLOB`s in and out, the flags and the optional entropy recorded, the
    output buffer allocated until freed, a failure reported as the thread's last error."""

    def __init__(self, dpapi: FakeDpapi) -> None:
        self.dpapi = dpapi
        self.flags: list[int] = []
        self.entropy: list[bytes] = []
        self.allocated: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.error = 0
        self.CryptProtectData = self._function(dpapi.protect)
        self.CryptUnprotectData = self._function(dpapi.unprotect)

        def local_free(memory: ctypes.c_void_p) -> None:
            del self.allocated[memory.value or 0]

        self.LocalFree = local_free

    def _function(self, operation: Callable[[bytes], bytes]) -> Callable[..., int]:
        def call(
            data_in: Any,
            description: object,
            entropy: Any,
            reserved: object,
            prompt: object,
            flags: int,
            data_out: Any,
        ) -> int:
            assert description is None and reserved is None and prompt is None
            self.flags.append(flags)
            self.entropy.append(ctypes.string_at(entropy.contents.pbData, entropy.contents.cbData))
            try:
                result = operation(ctypes.string_at(data_in.contents.pbData, data_in.contents.cbData))
            except OSError as exc:
                self.error = exc.errno
                return 0
            buffer = ctypes.create_string_buffer(result, len(result))
            self.allocated[ctypes.addressof(buffer)] = buffer
            data_out.contents.cbData = len(result)
            data_out.contents.pbData = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_char))
            return 1

        return call

    def last_error(self) -> int:
        return self.error
