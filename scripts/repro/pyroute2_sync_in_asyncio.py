"""pyroute2 0.9's synchronous sockets cannot be used from inside a running asyncio loop.

Shows: ``Conntrack().entry("del", ...)`` (and every other call of the sync API) called from a callback
of a running event loop raises ``RuntimeError: This event loop is already running`` — the sync API runs
its own coroutine with ``run_until_complete`` on the thread's loop. The same call from a plain thread
works. Consequence: ``platform.linux.conntrack.ConntrackTable`` makes its pyroute2 calls on a worker
thread of its own. Run as root (any network namespace): python3 scripts/repro/pyroute2_sync_in_asyncio.py
"""

from __future__ import annotations

import asyncio
import socket
import threading

from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple


def delete_absent_entry() -> str:
    entry = NFCTAttrTuple(family=socket.AF_INET, saddr="127.0.0.1", daddr="127.0.0.1", proto=17)
    entry.sport, entry.dport = 9, 9
    try:
        with Conntrack() as ct:
            ct.entry("del", tuple_orig=entry)
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"
    except Exception as exc:  # the expected outcome: no such entry
        return f"{type(exc).__name__}: {exc}"
    return "deleted"


async def main() -> None:
    print("inside a running loop:", delete_absent_entry())
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(delete_absent_entry()))
    worker.start()
    worker.join()
    print("on a plain thread:    ", result[0])


if __name__ == "__main__":
    asyncio.run(main())
