"""SOCKET-layer events are host-wide: a handle opened in namespace A reports connects made in namespace B.

Shows: a SOCKET handle opened in ns client sees the CONNECT of a process running in ns server (to the
server's own loopback). Consequence: the router keeps only events whose pid lives in its own network
namespace (/proc/PID/ns/net inode, process/lookup.py NamespaceFilter).
Run as root: python3 scripts/repro/socket_events_host_wide.py
"""

from __future__ import annotations

import subprocess
import sys
import time

import _pair


def inside(port: str) -> None:
    import pydivert

    flags = pydivert.Flag.SNIFF | pydivert.Flag.RECV_ONLY
    with pydivert.Divert("tcp", layer=pydivert.Layer.SOCKET, flags=flags) as h:
        print("open", flush=True)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                p = h.recv(timeout=0.2)
            except TimeoutError:
                continue
            s = p.wd_addr.Socket
            if p.wd_addr.Event == 4 and s.RemotePort == int(port):
                ns = "?"
                try:
                    import os

                    ns = (
                        "same"
                        if os.stat(f"/proc/{s.ProcessId}/ns/net").st_ino
                        == os.stat("/proc/self/ns/net").st_ino
                        else "OTHER"
                    )
                except OSError:
                    ns = "gone"
                print(f"CONNECT from pid {s.ProcessId} (network namespace: {ns}) to port {port}", flush=True)
                return
        print("no event from the other namespace", flush=True)


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside(sys.argv[2])
    else:
        with _pair.namespace_pair() as pair:
            watcher = subprocess.Popen(
                pair.nsenter(pair.client, sys.executable, __file__, "--inside", "8181"),
                stdout=subprocess.PIPE,
                text=True,
            )
            assert watcher.stdout is not None
            watcher.stdout.readline()
            # A process in ns server connects to a listener of its own namespace.
            code = (
                "import socket,time\nl=socket.socket();l.bind(('127.0.0.1',8181));l.listen()\n"
                "c=socket.create_connection(('127.0.0.1',8181));time.sleep(0.5)"
            )
            subprocess.run(pair.nsenter(pair.server, sys.executable, "-c", code), check=True)
            print(watcher.communicate(timeout=10)[0])
