"""Test apps that differ only by exe name/path, because that is what split-tunnel rules match.

:func:`make_app` copies the Python interpreter to ``<lab tmp>/apps/<name>``; run with the app client
(:mod:`awg_split_tunnel.lab.app_client`), ``/proc/<pid>/exe`` of the running app is that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from awg_split_tunnel.lab import app_client
from awg_split_tunnel.lab.netns import LabError
from awg_split_tunnel.lab.topology import CLIENT, AppResult

if TYPE_CHECKING:
    from awg_split_tunnel.lab.topology import Lab

APP_CLIENT_SCRIPT = Path(app_client.__file__).resolve()


def _interpreter() -> Path:
    # The real binary, not a pyenv shim or a venv symlink, so the copy is a working interpreter.
    return Path(os.path.realpath(sys.executable))


def _works(path: Path) -> bool:
    done = subprocess.run(
        [str(path), "-S", "-c", "import socket, argparse"], capture_output=True, timeout=30, check=False
    )
    return done.returncode == 0


def make_app(lab: Lab, name: str, directory: Path | None = None) -> Path:
    """Create test app ``name`` (a copy of the interpreter) and return its path.

    ``directory`` defaults to ``<lab tmp>/apps``; give another one to test directory or path rules.
    A copy that does not start (an interpreter needing files next to it) falls back to a hard link.
    """
    if not name or "/" in name:
        raise ValueError(f"an app name is a file name: {name!r}")
    folder = directory or lab.tmpdir / "apps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        _install_interpreter(path)
    lab.apps[name] = path
    return path


def _install_interpreter(path: Path) -> None:
    source = _interpreter()
    shutil.copy2(source, path)
    if _works(path):
        return
    path.unlink()
    try:
        os.link(source, path)
    except OSError as exc:
        raise LabError(
            f"cannot make test app {path.name}: copy of {source} does not run, link failed: {exc}"
        ) from exc
    if not _works(path):
        path.unlink()
        raise LabError(f"cannot make test app {path.name}: neither a copy nor a link of {source} runs")


def app_path(lab: Lab, name: str) -> Path:
    """Path of test app ``name``: the one :func:`make_app` made, else a new one in the lab's apps dir."""
    return lab.apps.get(name) or make_app(lab, name)


def app_argv(lab: Lab, name: str, args: Sequence[str] = ()) -> list[str]:
    """Command line running the app client as test app ``name`` (``args`` go to the app client)."""
    return [str(app_path(lab, name)), str(APP_CLIENT_SCRIPT), *args]


def app_client_args(
    *,
    udp: bool = False,
    v6: bool = False,
    host: str | None = None,
    port: int | None = None,
    timeout: float = 5.0,
    delay: float = 0.0,
) -> list[str]:
    """Arguments of the app client (:mod:`awg_split_tunnel.lab.app_client`) for these options."""
    args = ["--timeout", str(timeout)]
    if udp:
        args.append("--udp")
    if v6:
        args.append("-6")
    if host is not None:
        args += ["--host", host]
    if port is not None:
        args += ["--port", str(port)]
    if delay:
        args += ["--delay", str(delay)]
    return args


def spawn_app(lab: Lab, name: str, args: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Start test app ``name`` in the client namespace without waiting (e.g. with ``--delay``).

    stdout and stderr are text pipes; the process is killed when the lab closes.
    """
    argv = app_argv(lab, name, args)
    process: subprocess.Popen[str] = lab.spawn(
        CLIENT, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process


SPAWN_CHILD = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
"""What a parent test app runs to start its child and pass on the child's exit code."""


def run_app(
    lab: Lab, name: str, args: Sequence[str] = (), timeout: float = 10.0, parent: str | None = None
) -> AppResult:
    """Run test app ``name`` in the client namespace and return what the web server saw; with ``parent``,
    as the child of test app ``parent`` (which only starts it and waits)."""
    argv = app_argv(lab, name, args)
    if parent is not None:
        argv = [str(app_path(lab, parent)), "-c", SPAWN_CHILD, *argv]
    try:
        done = lab.run(CLIENT, argv, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return AppResult(app_client.EXIT_TIMEOUT, "", "", _text(exc.stdout), _text(exc.stderr))
    lines = done.stdout.splitlines()
    ok = done.returncode == 0 and len(lines) >= 2
    return AppResult(
        done.returncode, lines[0] if ok else "", lines[1] if ok else "", done.stdout, done.stderr
    )


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
