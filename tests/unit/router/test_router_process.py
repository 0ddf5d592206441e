"""The router process starts with only what routing needs: not the daemon's config, CLI and DNS stack,
whichever module the daemon was started as (each module loaded costs every process RSS)."""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import pytest

from awg_split_tunnel.core.router_messages import StartFailed
from awg_split_tunnel.router.process import RouterProcess, RouterSettings

CONTROL_PLANE_ONLY = (
    "awg_split_tunnel.core.config",
    "awg_split_tunnel.daemon",
    "pydantic",
    "ruamel",
    "typer",
    "rich",
)


def report_modules(settings: RouterSettings, open_handles: Any, conn: Any) -> None:
    """A router process body that answers with the control-plane modules it finds loaded."""
    loaded = [name for name in CONTROL_PLANE_ONLY if name in sys.modules]
    conn.send(StartFailed("loaded: " + " ".join(loaded)))


@pytest.mark.parametrize("main_module", ["awg_split_tunnel.daemon", "awg_split_tunnel.cli"])
def test_router_process_does_not_load_the_daemons_main_module(
    monkeypatch: pytest.MonkeyPatch, main_module: str
) -> None:
    # The daemon as `python -m awg_split_tunnel.daemon` (or the CLI): spawn would run it again in the child.
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.util.find_spec(main_module)
    monkeypatch.setitem(sys.modules, "__main__", main)
    process = RouterProcess(RouterSettings((), "direct", {}, {}), tuple, report_modules)
    with pytest.raises(RuntimeError) as failed:
        process.start(timeout=60)
    assert str(failed.value).endswith("loaded: ")
    assert sys.modules["__main__"] is main
