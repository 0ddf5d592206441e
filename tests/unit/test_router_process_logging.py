"""The router process's log at debug level: our records, not every netlink message of pyroute2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys
from awg_split_tunnel.router.process import configure_process_logging
configure_process_logging(logging.DEBUG, sys.argv[1])
import pyroute2  # resets the pyroute2 logger's level when first imported
logging.getLogger("pyroute2.netlink.core").debug("await data on queue")
logging.getLogger("pyroute2.netlink.core").warning("netlink socket closed")
logging.getLogger("asyncio").debug("Using selector: EpollSelector")
logging.getLogger("awg_split_tunnel.router").debug("[Router] decided a flow")
"""


def test_a_debug_log_keeps_our_lines_and_library_warnings_but_not_netlink_chatter(tmp_path: Path) -> None:
    log_file = tmp_path / "router.log"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log_file)], capture_output=True, text=True, timeout=60, check=True
    )
    for text in (done.stderr, log_file.read_text()):
        assert "[Router] decided a flow" in text
        assert "netlink socket closed" in text
        assert "await data on" not in text
        assert "Using selector" not in text
