"""`awg-split-tunnel cleanup` on Windows frees the apps a dead daemon's kill switch holds, and refuses
while a daemon runs (docs/WINDOWS.md, Kill switch). The Base Filtering Engine is the in-memory one."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner
from wfp_fake import FakeWfp

from awg_split_tunnel import cli
from awg_split_tunnel.api import control
from awg_split_tunnel.cli import app
from awg_split_tunnel.platform.windows import kill_switch
from awg_split_tunnel.platform.windows.kill_switch import KillSwitch
from awg_split_tunnel.platform.windows.wfp import FWPM_LAYER_ALE_AUTH_CONNECT_V4, Action

pytestmark = pytest.mark.windows

APP = r"C:\Games\game.exe"


def _crashed_daemon(monkeypatch: pytest.MonkeyPatch) -> FakeWfp:
    bfe = FakeWfp()
    KillSwitch(bfe).start({APP})
    bfe.process_ended()
    monkeypatch.setattr(kill_switch, "windows_filter_engine", lambda: bfe)
    monkeypatch.setattr(cli, "sys", _WindowsSys())  # the CLI's view only: the interpreter stays as it is
    return bfe


class _WindowsSys:
    platform = "win32"

    def __getattr__(self, name: str) -> object:
        return getattr(sys, name)


def test_cleanup_removes_the_kill_switch_of_a_dead_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    bfe = _crashed_daemon(monkeypatch)

    def nobody_answers(*args: object, **kwargs: object) -> object:
        raise control.TunnelError("the daemon is not running")

    monkeypatch.setattr(control, "request", nobody_answers)
    result = CliRunner().invoke(app, ["cleanup"])
    assert result.exit_code == 0, result.output
    assert "removed 4 kill-switch filters" in result.output
    assert bfe.decision(APP, FWPM_LAYER_ALE_AUTH_CONNECT_V4) is None


def test_cleanup_refuses_while_a_daemon_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    bfe = _crashed_daemon(monkeypatch)
    monkeypatch.setattr(control, "request", lambda *args, **kwargs: {"tunnels": []})
    result = CliRunner().invoke(app, ["cleanup"])
    assert result.exit_code == 1 and "a daemon is running" in result.output
    assert bfe.decision(APP, FWPM_LAYER_ALE_AUTH_CONNECT_V4) is Action.BLOCK
