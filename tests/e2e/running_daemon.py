"""The real daemon as the end-to-end tests run it: ``python -m awg_split_tunnel.daemon`` in ns client."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from awg_split_tunnel.lab import CLIENT, Lab
from awg_split_tunnel.lab.topology import python_path

START_TIMEOUT = 40.0


class RunningDaemon:
    """The daemon process and where its output goes."""

    def __init__(self, lab: Lab, config: Path) -> None:
        self.lab = lab
        self.config = config
        self.control = lab.tmpdir / "control.sock"
        self.stdout = lab.tmpdir / "daemon.out"
        self.stderr = lab.tmpdir / "daemon.err"
        env = {**os.environ, "PYTHONPATH": python_path()}
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process: subprocess.Popen[bytes] = lab.spawn(
                CLIENT,
                [sys.executable, "-m", "awg_split_tunnel.daemon", "-c", config, "--control", self.control],
                stdout=out,
                stderr=err,
                env=env,
            )

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def wait_running(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "running" in self.stdout.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                pytest.fail(f"daemon exited ({self.process.returncode}) at start:\n{self.output()}")
            time.sleep(0.1)
        pytest.fail(f"daemon printed no status line within {timeout:.0f}s:\n{self.output()}")


# An app holding a connection open: it prints "connected", then waits for a line on stdin (then finishes
# its request and prints what the server saw), for data or a close from the server, or for 10 s.
OPEN_REQUEST = """
import select, socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n")  # incomplete: the server waits
print("connected", flush=True)
ready, _, _ = select.select([s, sys.stdin], [], [], 10)
try:
    if s in ready:
        print("data" if s.recv(100) else "closed", flush=True)
    elif ready:
        sys.stdin.readline()
        s.sendall(b"\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print("answered", data.partition(b"\\r\\n\\r\\n")[2].split()[0].decode(), flush=True)
    else:
        print("timeout", flush=True)
except (ConnectionResetError, ConnectionAbortedError):
    print("reset", flush=True)
"""


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready else "(nothing)"


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    """Stop a daemon as a user's Ctrl-C would (SIGTERM, up to 15 s to restore the network); kill it if it
    hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
