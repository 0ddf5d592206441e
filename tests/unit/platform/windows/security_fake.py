"""Windows file security in memory over a real directory tree (docs/WINDOWS.md, Data folder): an object
created without a descriptor of its own inherits its parent's inheritable ACEs (OI for files, CI for
folders) and is owned by its creator; a protected DACL inherits nothing; SetNamedSecurityInfo re-applies
inheritance below. The tree's root stands for %ProgramData%: SYSTEM and Administrators full control,
Users read, CREATOR OWNER full control of what it creates."""

from __future__ import annotations

import re
from pathlib import Path

PROGRAM_DATA_SDDL = (
    "O:SYD:(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICIIO;GA;;;CO)(A;OICI;0x1200a9;;;BU)(A;CI;DCLCRPCR;;;BU)"
)
ADMIN = "BA"  # what an elevated administrator's new objects are owned by
USER_SID = "S-1-5-21-1-2-3-1001"
_ACE = re.compile(r"\(([^;()]*);([^;()]*);([^;()]*);([^;()]*);([^;()]*);([^;()]*)\)")


class FakeSecurity:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.explicit: dict[Path, str] = {root: PROGRAM_DATA_SDDL}
        self.owners: dict[Path, str] = {}
        self.reparse: set[Path] = set()
        self.creator = ADMIN
        self.user = "SY"

    def create_directory(self, path: Path, sddl: str) -> None:
        if path.exists():
            raise FileExistsError(183, "exists", str(path))
        path.mkdir()
        self.explicit[path] = sddl

    def plant(self, path: Path, owner: str, *, folder: bool) -> None:
        """Another user creates `path` (inheriting as Windows would)."""
        if folder:
            path.mkdir()
        else:
            path.write_text("tunnels: []\n")
        self.owners[path] = owner

    def security(self, path: Path) -> str:
        if path in self.explicit:
            return self.explicit[path]
        owner = self.owners.get(path, self.creator)
        parent = Path(self.security(path.parent))
        flag = "CI" if path.is_dir() else "OI"
        inherited = []
        for kind, flags, rights, _, _, trustee in _ACE.findall(str(parent).split("D:", 1)[1]):
            if flag in flags:
                trustee = owner if trustee == "CO" else trustee
                inherited.append(f"({kind};{flags.replace('IO', '')}ID;{rights};;;{trustee})")
        return f"O:{owner}D:" + "".join(inherited)

    def set_security(self, path: Path, sddl: str) -> None:
        self.explicit[path] = sddl
        self.owners.pop(path, None)

    def is_reparse_point(self, path: Path) -> bool:
        return path in self.reparse

    def current_user(self) -> str:
        return self.user
