"""Network-namespace primitives for the lab: create, enter, list, clean up, capture.

Processes enter a namespace with ``nsenter --net=/run/netns/NAME``, never ``ip netns exec``: the latter
remounts ``/sys`` and hides the cgroup v2 mount that pydivert's SOCKET layer needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")
# Host-wide directory of control sockets; one per wireguard-go / amneziawg-go interface name.
WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")
AMNEZIAWG_SOCKET_DIR = Path("/var/run/amneziawg")
# Marker files recording which process owns a lab, so cleanup_stale() spares labs still in use.
OWNER_DIR = Path("/run/awg-split-tunnel-lab")

_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class LabError(RuntimeError):
    """The lab could not be built or a lab server did not come up; the message says what and why."""


class LabUnavailable(LabError):
    """Something the lab needs is missing here (root, a binary, the AmneziaWG peer); tests skip on it."""


def ns_path(name: str) -> Path:
    """Path of a named network namespace, as ``nsenter --net=`` wants it."""
    return NETNS_DIR / name


def nsenter_argv(name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs in namespace ``name`` (``nsenter`` execs it: same pid)."""
    return ["nsenter", f"--net={ns_path(name)}", "--", *argv]


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip [-n NETNS] ARGS``; on failure raise :class:`LabError` carrying ip's stderr."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def list_netns() -> list[str]:
    """Names of every named network namespace on this machine."""
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_pids(name: str) -> list[int]:
    """Pids of the processes whose network namespace is ``name``."""
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def kill_netns_processes(name: str, timeout: float = 2.0) -> None:
    """SIGTERM every process living in namespace ``name``, then SIGKILL what is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = netns_pids(name)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and netns_pids(name):
            time.sleep(0.05)


def delete_netns(name: str) -> None:
    """Kill the processes of namespace ``name`` and delete it (its veths go with it); idempotent."""
    if not ns_path(name).exists():
        return
    kill_netns_processes(name)
    ip("netns", "del", name, check=False)


def _owner_file(prefix: str) -> Path:
    return OWNER_DIR / f"{prefix}.owner"


def claim_prefix(prefix: str) -> None:
    """Record that this process owns the lab ``prefix`` (see :func:`cleanup_stale`).

    Raises :class:`LabError` when a live process already owns a lab of that prefix.
    """
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    if _owner_file(prefix).exists() and _owner_alive(prefix):
        raise LabError(f"lab prefix {prefix!r} is in use by a running process")
    _owner_file(prefix).write_text(f"{os.getpid()}\n")


def release_prefix(prefix: str) -> None:
    """Forget the owner record of lab ``prefix``."""
    with contextlib.suppress(FileNotFoundError):
        _owner_file(prefix).unlink()


def _owner_alive(lab_prefix: str) -> bool:
    try:
        pid = int(_owner_file(lab_prefix).read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LAB_NS = re.compile(r"^(?P<lab>[a-z0-9]+)-[a-z0-9]+$")


def cleanup_stale(prefix: str, *, force: bool = False) -> list[str]:
    """Delete leftovers of crashed labs whose prefix starts with ``prefix``; return the namespaces removed.

    A lab whose owning process is still alive is spared unless ``force`` is set, so parallel test runs
    on one machine do not tear down each other's labs.
    """
    removed: list[str] = []
    dead_labs: set[str] = set()
    for name in list_netns():
        match = _LAB_NS.match(name)
        if not name.startswith(prefix) or match is None:
            continue
        lab = match.group("lab")
        if not force and _owner_alive(lab):
            continue
        delete_netns(name)
        removed.append(name)
        dead_labs.add(lab)
    if OWNER_DIR.is_dir():
        for owner in OWNER_DIR.glob(f"{prefix}*.owner"):
            lab = owner.name.removesuffix(".owner")
            if force or not _owner_alive(lab):
                dead_labs.add(lab)
    for lab in dead_labs:
        remove_control_sockets(lab)
        release_prefix(lab)
    return removed


def remove_control_sockets(ifname_prefix: str) -> None:
    """Remove wireguard-go / amneziawg-go control sockets left behind by interfaces of a lab."""
    for directory in (WIREGUARD_SOCKET_DIR, AMNEZIAWG_SOCKET_DIR):
        if directory.is_dir():
            for sock in directory.glob(f"{ifname_prefix}*.sock"):
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into namespace ``name`` for good (a worker thread's initializer: what it
    runs afterwards, the threads and processes it starts, are all in ``name``)."""
    with open(ns_path(name), "rb") as handle:
        if _libc().setns(handle.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")


def call_in_netns(name: str, function: Callable[[], T]) -> T:
    """Call ``function`` on a helper thread that has entered namespace ``name``; return its result.

    setns() changes only the calling thread, so the rest of the process stays where it is. What the
    function creates keeps the namespace it was created in: sockets, TUN devices, netlink handles.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            enter_netns(name)
            result.append(function())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=enter_and_call, name=f"netns-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def socket_in_netns(
    name: str, family: socket.AddressFamily, kind: socket.SocketKind = socket.SOCK_STREAM
) -> socket.socket:
    """A socket created inside namespace ``name``; usable from any thread of this process afterwards."""
    return call_in_netns(name, lambda: socket.socket(family, kind))


def terminate_process(process: subprocess.Popen[Any]) -> bool:
    """SIGTERM the process group, then SIGKILL it if it lingers; False if it still has not exited (a
    process stuck in the kernel, e.g. closing a device that cannot be unregistered yet)."""
    if process.poll() is not None:
        return True
    try:
        own_group = os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        own_group = False
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
        if own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=wait)
            return True
        except subprocess.TimeoutExpired:
            continue
    return False


KERNEL_LOG_NOISE = re.compile(r"entered|left (allmulticast|promiscuous)|(blocking|forwarding|disabled) state")


def kernel_log_tail(lines: int = 15) -> str:
    """The kernel's latest messages without the bridge-port chatter of lab set-up (for failure messages:
    e.g. "unregister_netdevice: waiting for ... to become free"); empty if unreadable."""
    try:
        done = subprocess.run(["dmesg", "-T"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    kept = [line for line in done.stdout.splitlines() if not KERNEL_LOG_NOISE.search(line)]
    return "kernel log:\n" + "\n".join(kept[-lines:]) if kept else ""


def process_state(pid: int) -> str:
    """What the kernel says a process is doing (state and wait channel), for error messages."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError as exc:
        return f"unknown ({exc})"
    states = [line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("State:")]
    state = states[0] if states else "?"
    return f"state {state}, waiting in {wchan or '-'}"


@dataclass(slots=True)
class PacketCapture:
    """A running ``tcpdump`` writing a pcap; count matching packets afterwards with :meth:`count`."""

    netns: str
    ifname: str
    bpf_filter: str
    pcap: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 5.0) -> None:
        """Start tcpdump and wait until it is listening (bounded by ``timeout``)."""
        # --immediate-mode: without it packets wait in the ring buffer and are lost when tcpdump stops.
        argv = ["tcpdump", "-i", self.ifname, "-n", "-U", "--immediate-mode", "-Z", "root"]
        argv += ["-w", str(self.pcap)]
        if self.bpf_filter:
            argv.append(self.bpf_filter)
        stderr_path = self.pcap.with_suffix(".stderr")
        with open(stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(
                nsenter_argv(self.netns, argv),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = stderr_path.read_text(errors="replace")
            if "listening on" in text:
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise LabError(f"tcpdump on {self.netns}/{self.ifname} did not start: {stderr_path.read_text()}")

    def stop(self) -> None:
        """Stop tcpdump, letting it flush the pcap."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def packets(self, bpf_filter: str = "") -> list[str]:
        """One-line summaries of the captured packets matching ``bpf_filter`` (all when empty)."""
        argv = ["tcpdump", "-r", str(self.pcap), "-n"]
        if bpf_filter:
            argv.append(bpf_filter)
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LabError(f"tcpdump -r {self.pcap} {bpf_filter!r}: {done.stderr.strip()}")
        return [line for line in done.stdout.splitlines() if line.strip()]

    def count(self, bpf_filter: str = "") -> int:
        """Number of captured packets matching ``bpf_filter``; call after the capture has stopped."""
        return len(self.packets(bpf_filter))

    def __enter__(self) -> PacketCapture:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
