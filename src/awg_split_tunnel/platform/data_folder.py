"""The platform's data-folder seam (core/config.py's `MakeFolder`): where keys and passwords live.

POSIX: an ordinary directory; the files holding secrets are created 0600 and exposed ones are warned about
(core/config.py). Windows: a folder with a protected DACL, checked at every start
(platform/windows/data_folder.py, docs/WINDOWS.md), and secrets in the YAML optionally DPAPI-encrypted
(`dpapi:` values, platform/windows/dpapi.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from awg_split_tunnel.core.config import MakeFolder, SecretProtection, make_folder


def data_folder() -> MakeFolder:
    """How the config code creates the folder it writes to on this platform."""
    if sys.platform == "win32":
        from awg_split_tunnel.platform.windows.data_folder import ProtectedFolders

        return ProtectedFolders()
    return make_folder


def check_data_folder(folder: Path) -> None:
    """At every start: DataFolderError when the folder or a file in it cannot be trusted (Windows: owner,
    reparse points; too-wide DACLs are repaired). POSIX: nothing beyond the config's own warnings."""
    if sys.platform == "win32" and folder.is_dir():
        from awg_split_tunnel.platform.windows.data_folder import ProtectedFolders

        ProtectedFolders().check(folder)


def secret_protection() -> SecretProtection | None:
    """What reads and writes `dpapi:` secrets here: DPAPI on Windows; None elsewhere (such a value is a
    ConfigError naming its key)."""
    if sys.platform == "win32":
        from awg_split_tunnel.platform.windows.dpapi import MachineDpapi

        return MachineDpapi()
    return None
