"""The data folder on Windows (`%ProgramData%\\awg-split-tunnel`): keys and passwords readable by SYSTEM and
Administrators only (docs/WINDOWS.md, Data folder).

POSIX file modes mean nothing on Windows, and a folder made with a plain mkdir under ProgramData inherits
"Users: read" (and "Users: create files"). So:

- the folder is created with a **protected DACL** (``DATA_SDDL``: SYSTEM and Administrators, inherited by
  everything created inside, nothing inherited from ProgramData); files written in it inherit that;
- at every start, and whenever the config code is about to write there, the folder and the files in it
  are **checked**: a reparse point (symlink, junction: a write would land elsewhere) or an owner that is
  not SYSTEM, Administrators or this process's own user (a standard user made it first, and may have
  planted its content) is refused with what to do; a DACL that grants anyone else is replaced by the
  protected one (with a warning) — its owner proves an administrator made it.

The Win32 calls go through `SecurityApi` (`AdvApi32Security` on Windows), so this runs on Linux against a
fake that keeps Windows' inheritance rules.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from awg_split_tunnel.errors import AwgSplitTunnelError
from awg_split_tunnel.platform.windows.security_descriptor import (
    SDDL_REVISION_1,
    last_error,
    security_attributes,
    security_descriptor,
)

log = logging.getLogger("awg_split_tunnel.platform")

DATA_SDDL = "O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"
"""Owner Administrators; protected DACL: SYSTEM and Administrators full control, inherited by the files
and folders inside; nothing from the parent."""

TRUSTED = frozenset({"SY", "BA"})
"""SYSTEM and BUILTIN\\Administrators, as SDDL names them."""

_ACE = re.compile(r"\(([^;()]*);([^;()]*);([^;()]*);([^;()]*);([^;()]*);([^;()]*)\)")


class DataFolderError(AwgSplitTunnelError):
    """The data folder or a file in it cannot be trusted; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Ace:
    kind: str
    """``A`` allow, ``D`` deny (SDDL ace_type)."""
    flags: str
    rights: str
    trustee: str


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An object's owner and DACL, parsed from SDDL."""

    owner: str
    protected: bool
    aces: tuple[Ace, ...]

    @classmethod
    def parse(cls, sddl: str) -> Descriptor:
        owner = re.search(r"O:(S-[0-9-]+|[A-Z]{2})", sddl)
        dacl = re.search(r"D:([A-Z]*)((?:\([^)]*\))*)", sddl)
        if dacl is None:
            return cls(owner[1] if owner else "", False, ())
        aces = tuple(Ace(m[1], m[2], m[3], m[6]) for m in _ACE.finditer(dacl[2]))
        return cls(owner[1] if owner else "", "P" in dacl[1], aces)


class SecurityApi(Protocol):
    """The Win32 calls the data folder needs; OSError on failure."""

    def create_directory(self, path: Path, sddl: str) -> None:
        """CreateDirectoryW with this security descriptor; FileExistsError when it exists."""

    def security(self, path: Path) -> str:
        """The owner and DACL of `path` as SDDL (GetNamedSecurityInfoW)."""

    def set_security(self, path: Path, sddl: str) -> None:
        """Owner and protected DACL from `sddl` (SetNamedSecurityInfoW, which re-applies inheritance to
        what is inside)."""

    def is_reparse_point(self, path: Path) -> bool: ...

    def current_user(self) -> str:
        """This process's user SID (``S-1-5-18`` for the service, LocalSystem)."""


def problem(descriptor: Descriptor, trusted: frozenset[str]) -> str | None:
    """Why an object with this owner cannot be trusted at all (None: it can)."""
    if descriptor.owner not in trusted:
        return f"owned by {descriptor.owner or 'nobody'}, not by SYSTEM or Administrators"
    return None


def too_wide(descriptor: Descriptor, trusted: frozenset[str]) -> bool:
    """Whether the DACL lets anyone but `trusted` in (ACEs inherited from a parent included)."""
    return any(a.kind == "A" and a.trustee not in trusted for a in descriptor.aces)


class ProtectedFolders:
    """The Windows `MakeFolder` (core/config.py) with the start-up check (module docstring)."""

    def __init__(self, api: SecurityApi | None = None) -> None:
        self._api = api

    @property
    def api(self) -> SecurityApi:
        if self._api is None:
            self._api = AdvApi32Security()
        return self._api

    def _trusted(self) -> frozenset[str]:
        user = self.api.current_user()
        # LocalSystem's SID is written SY in SDDL.
        return TRUSTED | {"SY" if user == "S-1-5-18" else user}

    def __call__(self, folder: Path) -> None:
        """Create `folder` protected, or check (and repair) the one that exists."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.api.create_directory(folder, DATA_SDDL)
        except FileExistsError:
            self.check(folder, files=False)

    def check(self, folder: Path, *, files: bool = True) -> None:
        """DataFolderError unless `folder` (and with `files`, every file in it) is trustworthy; a DACL
        that lets others in is replaced by the protected one."""
        trusted = self._trusted()
        targets = [folder]
        if files and folder.is_dir():
            targets += sorted(p for p in folder.iterdir())
        for path in targets:
            if self.api.is_reparse_point(path):
                raise DataFolderError(
                    f"{path} is a link (reparse point) and could send secrets elsewhere: remove it, as "
                    "Administrator, and start again"
                )
            descriptor = Descriptor.parse(self.api.security(path))
            why = problem(descriptor, trusted)
            if why is not None:
                raise DataFolderError(
                    f"{path} is {why}: another user may have made it first; remove it, as Administrator, "
                    "and start again"
                )
            if too_wide(descriptor, trusted):
                self.api.set_security(path, DATA_SDDL)
                log.warning("[Core] %s was readable by other users: now SYSTEM and Administrators only", path)


# -- advapi32 through ctypes (Windows) ------------------------------------------------------------------

SE_FILE_OBJECT = 1
OWNER_SECURITY_INFORMATION = 0x1
DACL_SECURITY_INFORMATION = 0x4
PROTECTED_DACL_SECURITY_INFORMATION = 0x80000000
TOKEN_QUERY = 0x8
TOKEN_USER_CLASS = 1
ERROR_ALREADY_EXISTS = 183


class AdvApi32Security:
    """`SecurityApi` on Windows."""

    def __init__(self) -> None:
        if sys.platform != "win32":
            raise OSError("Windows security descriptors are Windows only")
        self._adv: Any = ctypes.WinDLL("advapi32", use_last_error=True)
        self._k32: Any = ctypes.WinDLL("kernel32", use_last_error=True)
        # A pseudo-handle (-1): as a pointer-sized value, not ctypes' default C int.
        self._k32.GetCurrentProcess.restype = ctypes.c_void_p

    def create_directory(self, path: Path, sddl: str) -> None:
        with security_attributes(self._adv, self._k32, sddl) as attributes:
            if not self._k32.CreateDirectoryW(ctypes.c_wchar_p(str(path)), ctypes.byref(attributes)):
                error = last_error("CreateDirectoryW")
                if error.errno == ERROR_ALREADY_EXISTS:
                    raise FileExistsError(error.errno, "exists", str(path))
                raise error

    def security(self, path: Path) -> str:
        sd = ctypes.c_void_p()
        info = OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION
        result = self._adv.GetNamedSecurityInfoW(
            ctypes.c_wchar_p(str(path)), SE_FILE_OBJECT, info, None, None, None, None, ctypes.byref(sd)
        )
        if result:
            raise OSError(result, f"GetNamedSecurityInfoW failed on {path} (Windows error {result})")
        try:
            text = ctypes.c_wchar_p()
            if not self._adv.ConvertSecurityDescriptorToStringSecurityDescriptorW(
                sd, SDDL_REVISION_1, info, ctypes.byref(text), None
            ):
                raise last_error("ConvertSecurityDescriptorToStringSecurityDescriptorW")
            value = text.value or ""
            self._k32.LocalFree(text)
            return value
        finally:
            self._k32.LocalFree(sd)

    def set_security(self, path: Path, sddl: str) -> None:
        with security_descriptor(self._adv, self._k32, sddl) as sd:
            owner, dacl = ctypes.c_void_p(), ctypes.c_void_p()
            present, defaulted = ctypes.c_int32(), ctypes.c_int32()
            self._adv.GetSecurityDescriptorOwner(sd, ctypes.byref(owner), ctypes.byref(defaulted))
            self._adv.GetSecurityDescriptorDacl(
                sd, ctypes.byref(present), ctypes.byref(dacl), ctypes.byref(defaulted)
            )
            info = (
                OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION
            )
            result = self._adv.SetNamedSecurityInfoW(
                ctypes.c_wchar_p(str(path)), SE_FILE_OBJECT, info, owner, None, dacl, None
            )
        if result:
            raise OSError(result, f"SetNamedSecurityInfoW failed on {path} (Windows error {result})")

    def is_reparse_point(self, path: Path) -> bool:
        attributes: int = getattr(os.lstat(path), "st_file_attributes", 0)
        return bool(attributes & stat.FILE_ATTRIBUTE_REPARSE_POINT)

    def current_user(self) -> str:
        token = ctypes.c_void_p()
        process = ctypes.c_void_p(self._k32.GetCurrentProcess())
        if not self._adv.OpenProcessToken(process, TOKEN_QUERY, ctypes.byref(token)):
            raise last_error("OpenProcessToken")
        try:
            size = ctypes.c_uint32()
            self._adv.GetTokenInformation(token, TOKEN_USER_CLASS, None, 0, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            if not self._adv.GetTokenInformation(token, TOKEN_USER_CLASS, buffer, size, ctypes.byref(size)):
                raise last_error("GetTokenInformation")
            sid = ctypes.c_void_p.from_buffer(buffer)  # TOKEN_USER.User.Sid comes first
            text = ctypes.c_wchar_p()
            if not self._adv.ConvertSidToStringSidW(sid, ctypes.byref(text)):
                raise last_error("ConvertSidToStringSidW")
            value = text.value or ""
            self._k32.LocalFree(text)
            return value
        finally:
            self._k32.CloseHandle(token)
