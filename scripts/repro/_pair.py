"""A throw-away pair of network namespaces for the pydivert reproductions (run as root).

``client`` (198.18.200.1/24, 2001:2:0:c8::1/64) ── veth ── ``server`` (198.18.200.2/24, 2001:2:0:c8::2/64).
Everything is removed on exit, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

CLIENT_IP, SERVER_IP = "198.18.200.1", "198.18.200.2"
CLIENT_IP6, SERVER_IP6 = "2001:2:0:c8::1", "2001:2:0:c8::2"


@dataclass
class Pair:
    client: str
    server: str

    def nsenter(self, ns: str, *argv: str) -> list[str]:
        """A command line running ``argv`` in ``ns`` without remounting /sys (keeps the SOCKET layer)."""
        return ["nsenter", f"--net=/run/netns/{ns}", *argv]

    def run(self, ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.nsenter(ns, *argv), check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True)


@contextlib.contextmanager
def namespace_pair() -> Iterator[Pair]:
    if os.geteuid() != 0:
        sys.exit("run as root")
    tag = f"rp{os.getpid() % 100000}"
    pair = Pair(f"{tag}c", f"{tag}s")
    try:
        _ip("netns", "add", pair.client)
        _ip("netns", "add", pair.server)
        _ip(
            "link",
            "add",
            f"{tag}a",
            "netns",
            pair.client,
            "type",
            "veth",
            "peer",
            f"{tag}b",
            "netns",
            pair.server,
        )
        for ns, dev, ip4, ip6 in (
            (pair.client, f"{tag}a", CLIENT_IP, CLIENT_IP6),
            (pair.server, f"{tag}b", SERVER_IP, SERVER_IP6),
        ):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{ip4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        yield pair
    finally:
        for ns in (pair.client, pair.server):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def inside(
    pair: Pair, ns: str, script: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``script --inside ARGS`` in namespace ``ns`` (via nsenter) and return its output."""
    return subprocess.run(
        pair.nsenter(ns, sys.executable, script, "--inside", *args),
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def run_cases(script: str, cases: Sequence[str], inside_case: Callable[[str], None]) -> None:
    """The ``__main__`` of a repro with several cases: as ``script --inside CASE`` call ``inside_case``;
    otherwise build a pair and run ``script --inside CASE`` in ns client for each case, printing what it
    printed."""
    if "--inside" in sys.argv:
        inside_case(sys.argv[2])
        return
    with namespace_pair() as pair:
        for case in cases:
            done = inside(pair, pair.client, script, case)
            print(done.stdout.strip() or done.stderr[-800:])


def serve_tcp(pair: Pair, port: int) -> subprocess.Popen[bytes]:
    """A TCP server in ns server on ``port`` that accepts and closes; kill it when done."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
        f"s.bind(('::', {port})); s.listen(128)\n"
        "while True:\n    c, _ = s.accept(); c.close()\n"
    )
    return subprocess.Popen(pair.nsenter(pair.server, sys.executable, "-c", code))


def sniffed(handle: Any, seconds: float = 2.0, quiet: float = 0.2) -> Iterator[Any]:
    """What a sniffing divert ``handle`` receives, until ``seconds`` have passed or nothing came for
    ``quiet`` seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            yield handle.recv(timeout=quiet)
        except TimeoutError:
            return
