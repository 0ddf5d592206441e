"""Editors of one config file running in other processes (spawned by test_config.py): each adds one rule
through its own ConfigManager and reports whether the change was applied or refused."""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from awg_split_tunnel.core import config
from awg_split_tunnel.errors import ConfigError

SLOW_DISK = 0.05
"""Seconds each write takes before it starts: the editors' writes overlap unless something orders them."""


def add_one_rule(path: str, process: str, start: Barrier, results: Queue[tuple[str, str | None]]) -> None:
    """Load, wait until every editor has loaded, then add a rule: the editors race to write."""
    write = config.write_file_atomic

    def slow_write(target: Path, data: bytes, mode: int) -> None:
        time.sleep(SLOW_DISK)
        write(target, data, mode)

    config.write_file_atomic = slow_write
    manager = config.ConfigManager(Path(path))
    try:
        manager.load()
        start.wait()
        manager.add_rule({"process": process, "tunnel": "direct"})
    except ConfigError as exc:
        results.put((process, str(exc)))
    else:
        results.put((process, None))
