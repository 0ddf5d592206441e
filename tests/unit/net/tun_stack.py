"""A real Linux stack to check our packets against: a fresh network namespace with a TUN device whose
file descriptor the test holds (root only; the namespace is removed afterwards)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from awg_split_tunnel.lab.netns import call_in_netns

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


@contextlib.contextmanager
def tun_in_netns(tag: str) -> Iterator[tuple[str, int]]:
    """A fresh namespace with a TUN device (198.18.0.1/24, 2001:2::1/64, MTU 1500) whose fd we hold."""
    name = f"awgst-{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    fd = -1
    try:

        def open_tun() -> int:
            tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", b"tun-test", IFF_TUN | IFF_NO_PI))
            return tun

        fd = call_in_netns(name, open_tun)
        for args in (
            ["link", "set", "tun-test", "mtu", "1500", "up"],
            ["addr", "add", "198.18.0.1/24", "dev", "tun-test"],
            ["addr", "add", "2001:2::1/64", "dev", "tun-test", "nodad"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)
        yield name, fd
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["ip", "netns", "del", name], check=False)


def read_packet(fd: int, wanted: Callable[[bytes], bool], timeout: float = 3.0) -> bytearray:
    """The first packet the stack sends into the TUN that ``wanted`` accepts (skipping MLD/RS noise)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 65535)
            if wanted(data):
                return bytearray(data)
    raise AssertionError("the stack sent no such packet")
