"""glibc's getaddrinfo connects a UDP socket to each address it sorts: SOCKET CONNECT events whose packet
never comes.

Shows: one ``getaddrinfo`` of a name with two addresses (port 443, SOCK_STREAM asked), made while a
SOCKET-layer handle sniffs UDP, and the CONNECT events it raised: one per address, with the port, from
the resolving process (RFC 6724 sorting: glibc learns each source address by connecting a UDP socket
and reading its name; it sends nothing, as ``strace -e trace=connect,sendto`` of the same call shows).
Consequence: a waiting CONNECT older than ``STALE_EVENT_AGE`` is confirmed against the OS before a flow
takes it, so another app's QUIC flow to that server does not go the resolving app's way
(``process/lookup.py`` ``ConnectEvents.claim``).
The name comes from a hosts file bind-mounted over /etc/hosts in a mount namespace of the script's own.
Run as root: python3 scripts/repro/getaddrinfo_udp_connect.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import _pair

NAME = "two-addresses.repro"


def inside() -> None:
    import pydivert

    with pydivert.Divert(
        "udp", layer=pydivert.Layer.SOCKET, flags=pydivert.Flag.SNIFF | pydivert.Flag.RECV_ONLY
    ) as h:
        found = socket.getaddrinfo(NAME, 443, type=socket.SOCK_STREAM)
        connects = []
        for p in _pair.sniffed(h):
            a = p.wd_addr
            if a.Event == 4 and a.Socket.RemotePort == 443:  # CONNECT
                mine = a.Socket.ProcessId == os.getpid()
                connects.append(f"port {a.Socket.RemotePort}, {'this process' if mine else 'another pid'}")
        print(f"getaddrinfo gave {sorted({f[4][0] for f in found})}; UDP CONNECT events: {connects}")


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside()
    else:
        with _pair.namespace_pair() as pair, tempfile.NamedTemporaryFile("w", suffix=".hosts") as hosts:
            hosts.write(f"127.0.0.1 localhost\n{_pair.SERVER_IP} {NAME}\n198.18.200.3 {NAME}\n")
            hosts.flush()
            command = " ".join(pair.nsenter(pair.client, sys.executable, __file__, "--inside"))
            done = subprocess.run(
                ["unshare", "-m", "sh", "-c", f"mount --bind {hosts.name} /etc/hosts && {command}"],
                text=True,
                capture_output=True,
                timeout=30,
                check=False,
            )
            print(done.stdout, done.stderr[-2000:])
