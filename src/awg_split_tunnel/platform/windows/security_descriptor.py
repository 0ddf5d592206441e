"""Security descriptors from SDDL text for the Win32 calls that create objects (named pipes, folders)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SDDL_REVISION_1 = 1


class SECURITY_ATTRIBUTES(ctypes.Structure):
    _fields_ = (
        ("nLength", ctypes.c_uint32),
        ("lpSecurityDescriptor", ctypes.c_void_p),
        ("bInheritHandle", ctypes.c_int32),
    )


def last_error(call: str) -> OSError:
    """The OSError of the Win32 call that just failed (ctypes' saved GetLastError)."""
    code: int = ctypes.get_last_error()  # type: ignore[attr-defined,unused-ignore]
    return OSError(code, f"{call} failed (Windows error {code})")


@contextmanager
def security_descriptor(advapi32: Any, kernel32: Any, sddl: str) -> Iterator[ctypes.c_void_p]:
    """A self-relative security descriptor made from `sddl` (ConvertStringSecurityDescriptorTo…), freed
    with LocalFree at the end of the block."""
    descriptor = ctypes.c_void_p()
    if not advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(
        ctypes.c_wchar_p(sddl), SDDL_REVISION_1, ctypes.byref(descriptor), None
    ):
        raise last_error("ConvertStringSecurityDescriptorToSecurityDescriptorW")
    try:
        yield descriptor
    finally:
        kernel32.LocalFree(descriptor)


@contextmanager
def security_attributes(advapi32: Any, kernel32: Any, sddl: str) -> Iterator[SECURITY_ATTRIBUTES]:
    """SECURITY_ATTRIBUTES carrying the descriptor of `sddl`, for CreateNamedPipeW, CreateDirectoryW."""
    with security_descriptor(advapi32, kernel32, sddl) as descriptor:
        yield SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), descriptor, 0)
