"""DPAPI with the machine's key: the `SecretProtection` (core/config.py) of `dpapi:` values on Windows.

`CryptProtectData` / `CryptUnprotectData` (crypt32.dll) with `CRYPTPROTECT_LOCAL_MACHINE`: any process on
this machine may decrypt — the LocalSystem service reads what an Administrator wrote — and no other
machine can. The file's DACL keeps other local users out (docs/WINDOWS.md, "Data folder"); DPAPI keeps the
secrets out of copies of the file (backups, support bundles, a disk read elsewhere without the machine's
own keys). `ENTROPY` ties the blobs to this program: another program's machine-scope blob does not
decrypt as ours, nor ours as its.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

CRYPTPROTECT_UI_FORBIDDEN = 0x1
CRYPTPROTECT_LOCAL_MACHINE = 0x4
ERROR_INVALID_DATA = 13
ENTROPY = b"awg-split-tunnel config secret v1"
"""The optional entropy of every blob: a fixed, product-specific byte string."""


class DataBlob(ctypes.Structure):
    """`DATA_BLOB` (wincrypt.h)."""

    _fields_ = [("cbData", ctypes.c_uint32), ("pbData", ctypes.POINTER(ctypes.c_char))]


@contextmanager
def _blob(data: bytes) -> Iterator[DataBlob]:
    buffer = ctypes.create_string_buffer(data, len(data))
    yield DataBlob(len(data), ctypes.cast(buffer, ctypes.POINTER(ctypes.c_char)))


class MachineDpapi:
    """`protect` / `unprotect` through crypt32.dll. Errors are OSError with the Windows error code
    (`ERROR_INVALID_DATA` for another machine's or a damaged blob), never the data. The DLLs and the
    last-error reader are given only by tests (Windows loads the real ones)."""

    def __init__(
        self,
        crypt32: Any = None,
        kernel32: Any = None,
        last_error: Callable[[], int] | None = None,
    ) -> None:
        if crypt32 is None:
            if sys.platform != "win32":
                raise OSError("DPAPI is Windows only")
            crypt32 = ctypes.WinDLL("crypt32", use_last_error=True)
            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
            last_error = ctypes.get_last_error  # type: ignore[attr-defined,unused-ignore]
        self._crypt32 = crypt32
        self._kernel32 = kernel32
        self._last_error = last_error or (lambda: 0)
        blob = ctypes.POINTER(DataBlob)
        for name in ("CryptProtectData", "CryptUnprotectData"):
            function = getattr(crypt32, name)
            function.argtypes = [
                blob,
                ctypes.c_void_p,
                blob,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_uint32,
                blob,
            ]
            function.restype = ctypes.c_int
        kernel32.LocalFree.argtypes = [ctypes.c_void_p]
        kernel32.LocalFree.restype = ctypes.c_void_p

    def protect(self, data: bytes) -> bytes:
        return self._call("CryptProtectData", data)

    def unprotect(self, blob: bytes) -> bytes:
        return self._call("CryptUnprotectData", blob)

    def _call(self, name: str, data: bytes) -> bytes:
        out = DataBlob()
        with _blob(data) as data_in, _blob(ENTROPY) as entropy:
            ok = getattr(self._crypt32, name)(
                ctypes.pointer(data_in),
                None,  # no description in, none wanted out
                ctypes.pointer(entropy),
                None,
                None,
                CRYPTPROTECT_UI_FORBIDDEN | CRYPTPROTECT_LOCAL_MACHINE,
                ctypes.pointer(out),
            )
        if not ok:
            code = self._last_error()
            raise OSError(code, f"Windows error {code} from {name}")
        try:
            return ctypes.string_at(out.pbData, out.cbData)
        finally:
            # The output buffer is allocated by DPAPI with LocalAlloc.
            self._kernel32.LocalFree(ctypes.cast(out.pbData, ctypes.c_void_p))
