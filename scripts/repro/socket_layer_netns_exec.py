"""`ip netns exec` breaks pydivert's SOCKET layer; `nsenter --net=` does not.

Shows: opening a SOCKET-layer handle in a process started with `ip netns exec NS` fails ("Layer SOCKET is
not supported on this system": ip netns exec remounts /sys, hiding the cgroup v2 mount the SOCKET hooks
attach to), while the same code started with `nsenter --net=/run/netns/NS` opens it.
Consequence: platform/divert.py turns the failure into an error that names the fix; the daemon, the lab
and the tests start processes in namespaces with nsenter.
Run as root: python3 scripts/repro/socket_layer_netns_exec.py
"""

from __future__ import annotations

import subprocess
import sys

import _pair

CODE = """
import pydivert
flags = pydivert.Flag.SNIFF | pydivert.Flag.RECV_ONLY
try:
    with pydivert.Divert("tcp", layer=pydivert.Layer.SOCKET, flags=flags):
        print("opened")
except Exception as exc:
    print(f"failed: {type(exc).__name__}: {exc}")
"""

if __name__ == "__main__":
    with _pair.namespace_pair() as pair:
        for label, argv in (
            ("ip netns exec", ["ip", "netns", "exec", pair.client]),
            ("nsenter --net ", ["nsenter", f"--net=/run/netns/{pair.client}"]),
        ):
            done = subprocess.run(
                [*argv, sys.executable, "-c", CODE], capture_output=True, text=True, check=False
            )
            print(f"{label}: {done.stdout.strip() or done.stderr.strip()[-300:]}")
