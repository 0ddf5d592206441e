"""A divert handle does not cover network interfaces created after it was opened.

Shows: a sniffing handle for `outbound and udp.DstPort == 9999` is opened in ns client; then a new veth
pair appears there and a datagram leaves through it. The old handle does not see it; a handle opened
after the interface appeared does.
Consequence: NetworkHandle.refresh() (called by the router loop every 2 s) reopens the handle when the
set of interfaces grew — the new handle first, at the other priority, then the old one closes.
Run as root: python3 scripts/repro/new_interface.py
"""

from __future__ import annotations

import socket
import subprocess
import sys

import _pair


def saw(handle: object) -> bool:
    try:
        handle.recv(timeout=0.5)  # type: ignore[attr-defined]
        return True
    except TimeoutError:
        return False


def inside() -> None:
    import pydivert

    flags = pydivert.Flag.SNIFF
    with pydivert.Divert("outbound and udp.DstPort == 9999", priority=1, flags=flags) as before:
        subprocess.run(["ip", "link", "add", "rpnew0", "type", "veth", "peer", "rpnew1"], check=True)
        subprocess.run(["ip", "addr", "add", "198.18.201.1/24", "dev", "rpnew0"], check=True)
        subprocess.run(["ip", "link", "set", "rpnew0", "up"], check=True)
        subprocess.run(["ip", "link", "set", "rpnew1", "up"], check=True)
        subprocess.run(
            ["ip", "neigh", "add", "198.18.201.2", "lladdr", "02:00:00:00:00:02", "dev", "rpnew0"], check=True
        )
        with pydivert.Divert("outbound and udp.DstPort == 9999", priority=2, flags=flags) as after:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("198.18.201.2", 9999))
            print(f"handle opened before the interface appeared saw the packet: {saw(before)}")
            print(f"handle opened after the interface appeared saw the packet:  {saw(after)}")


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside()
    else:
        with _pair.namespace_pair() as pair:
            done = _pair.inside(pair, pair.client, __file__)
            print(done.stdout, done.stderr[-2000:])
