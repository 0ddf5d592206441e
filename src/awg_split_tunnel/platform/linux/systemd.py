"""``awg-split-tunnel service install|uninstall|status``: the daemon as a systemd service.

The unit is ``data/awg-split-tunnel.service`` with this installation's paths filled in, written to
``/etc/systemd/system``; ``systemctl`` is reached through `Systemctl` (a seam: tests pass a fake and
check the files and the command sequence). Without a running systemd (a container, WSL without it)
``systemctl`` fails with "System has not been booted with systemd as init system (PID 1)"; that is
detected first and said plainly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from awg_split_tunnel.errors import AwgSplitTunnelError

UNIT_NAME = "awg-split-tunnel.service"
UNIT_DIR = Path("etc/systemd/system")
"""Where units written by the administrator go, below the root directory."""
UNIT_MARK = "# AWG Split Tunnel as a systemd service"
"""The first line of every unit this program writes: a file without it is someone else's."""
SYSTEMD_RUNNING = Path("run/systemd/system")
"""Exists (below the root directory) exactly when systemd is PID 1: what sd_booted(3) checks."""


class ServiceError(AwgSplitTunnelError):
    """The service cannot be installed, removed or asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class SystemctlResult:
    returncode: int
    output: str


Systemctl = Callable[[Sequence[str]], SystemctlResult]
"""Runs ``systemctl ARGS...`` and returns its exit code and output (stdout and stderr)."""


def run_systemctl(args: Sequence[str]) -> SystemctlResult:
    """The real ``systemctl``."""
    path = shutil.which("systemctl")
    if path is None:
        raise ServiceError("systemctl not found: this system does not use systemd")
    done = subprocess.run([path, *args], capture_output=True, text=True, check=False)
    return SystemctlResult(done.returncode, (done.stdout + done.stderr).strip())


def unit_text(config_path: Path) -> str:
    """The unit for this installation: its own script (a venv's, not the first one on PATH), else its
    interpreter with -m, running ``run -c CONFIG``."""
    template = files("awg_split_tunnel").joinpath("data/awg-split-tunnel.service").read_text()
    script = Path(sys.executable).parent / "awg-split-tunnel"
    exe = str(script) if script.is_file() else f"{sys.executable} -m awg_split_tunnel"
    return template.replace("@EXEC@", exe).replace("@CONFIG@", str(config_path))


class SystemdService:
    """Install, remove and ask the daemon's systemd unit; `root` is "/" except in tests."""

    def __init__(self, systemctl: Systemctl = run_systemctl, root: Path = Path("/")) -> None:
        self.systemctl = systemctl
        self.root = root

    @property
    def unit_path(self) -> Path:
        return self.root / UNIT_DIR / UNIT_NAME

    def require_systemd(self) -> None:
        """ServiceError unless systemd runs this machine."""
        if not (self.root / SYSTEMD_RUNNING).is_dir():
            raise ServiceError(
                "systemd is not running on this machine (it is not PID 1; a container or WSL without "
                "systemd): start the daemon with `awg-split-tunnel run` from your init system instead"
            )

    def install(self, unit: str) -> list[str]:
        """Write the unit, reload systemd, enable and start it; what was done, line by line. On a failure
        everything done so far is undone."""
        self.require_systemd()
        path = self.unit_path
        if path.exists() and not path.read_text(errors="replace").startswith(UNIT_MARK):
            raise ServiceError(f"{path} exists and was not written by awg-split-tunnel: remove it first")
        previous = path.read_text() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(unit)
        path.chmod(0o644)
        done = [f"wrote {path}"]
        enabled = False
        try:
            self._systemctl("daemon-reload")
            self._systemctl("enable", UNIT_NAME)
            enabled = True
            # restart, not start: a reinstalled unit's running daemon takes the new unit's settings
            self._systemctl("restart", UNIT_NAME)
        except ServiceError:
            if enabled:
                self.systemctl(["disable", "--now", UNIT_NAME])
            if previous is None:
                path.unlink()
            else:
                path.write_text(previous)
            self.systemctl(["daemon-reload"])
            raise
        done.append(f"enabled and started {UNIT_NAME} (restarted within a second if it fails)")
        return done

    def uninstall(self) -> list[str]:
        """Stop and disable the unit, remove its file, reload systemd; what was done."""
        self.require_systemd()
        path = self.unit_path
        if not path.exists():
            raise ServiceError(f"not installed ({path} does not exist)")
        if not path.read_text(errors="replace").startswith(UNIT_MARK):
            raise ServiceError(f"{path} was not written by awg-split-tunnel: left alone")
        self._systemctl("disable", "--now", UNIT_NAME)
        path.unlink()
        self._systemctl("daemon-reload")
        self.systemctl(["reset-failed", UNIT_NAME])  # only fails when it had not failed: nothing to do
        return [f"stopped and disabled {UNIT_NAME}", f"removed {path}"]

    def status(self) -> list[str]:
        """Whether the unit is installed, enabled and running."""
        self.require_systemd()
        if not self.unit_path.exists():
            return [f"not installed ({self.unit_path} does not exist): `awg-split-tunnel service install`"]
        enabled = self.systemctl(["is-enabled", UNIT_NAME]).output or "unknown"
        active = self.systemctl(["is-active", UNIT_NAME]).output or "unknown"
        return [f"installed: {self.unit_path}", f"enabled: {enabled}", f"active: {active}"]

    def _systemctl(self, *args: str) -> None:
        result = self.systemctl(args)
        if result.returncode != 0:
            detail = result.output.splitlines()[-1] if result.output else f"exit {result.returncode}"
            raise ServiceError(f"systemctl {' '.join(args)} failed: {detail}")
