"""The Windows service (docs/WINDOWS.md, Service): `service install` registers the daemon as LocalSystem,
started at boot and restarted after a failure, with the firewall rule its proxies need; `uninstall` stops
it and removes both; the SCM's stop reaches the daemon as Ctrl-C does; console close, logoff and shutdown
stop the daemon before Windows ends the process. Against a Service Control Manager and console in memory."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from awg_split_tunnel.platform.windows.console import (
    CTRL_C_EVENT,
    CTRL_CLOSE_EVENT,
    CTRL_LOGOFF_EVENT,
    CTRL_SHUTDOWN_EVENT,
    ConsoleStop,
)
from awg_split_tunnel.platform.windows.service import (
    FIREWALL_RULE,
    SERVICE_NAME,
    ServiceError,
    ServiceRunner,
    ServiceSpec,
    service_action,
)

pytestmark = pytest.mark.windows

PYTHON = r"C:\Python311\python.exe"


class FakeScm:
    """Services as the Service Control Manager keeps them."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceSpec] = {}
        self.running: set[str] = set()

    def create(self, spec: ServiceSpec) -> None:
        if spec.name in self.services:
            raise OSError(1073, "CreateService", "The specified service already exists.")
        self.services[spec.name] = spec

    def delete(self, name: str) -> None:
        del self.services[name]

    def start(self, name: str) -> None:
        if name not in self.services:
            raise OSError(
                1060, "OpenService", "The specified service does not exist as an installed service."
            )
        self.running.add(name)

    def stop(self, name: str) -> None:
        self.running.discard(name)

    def exists(self, name: str) -> bool:
        return name in self.services


class FakeNetsh:
    def __init__(self, fail: bool = False) -> None:
        self.rules: dict[str, str] = {}
        self.fail = fail

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        fields = dict(a.split("=", 1) for a in args if "=" in a)
        if self.fail:
            return subprocess.CompletedProcess(
                list(args), 1, "The requested operation requires elevation.", ""
            )
        if "add" in args:
            self.rules[fields["name"]] = fields["program"]
        elif "delete" in args:
            self.rules.pop(fields["name"], None)
        return subprocess.CompletedProcess(list(args), 0, "Ok.", "")


def _act(action: str, scm: FakeScm, netsh: FakeNetsh, config: Path) -> str:
    return service_action(action, config, control=scm, run=netsh, program=PYTHON)


def test_install_registers_a_boot_time_localsystem_service_and_the_proxy_firewall_rule(
    tmp_path: Path,
) -> None:
    scm, netsh = FakeScm(), FakeNetsh()
    config = tmp_path / "config.yaml"
    _act("install", scm, netsh, config)
    spec = scm.services[SERVICE_NAME]
    assert spec.auto_start and spec.account is None and spec.restart_delay_ms > 0
    assert "-m awg_split_tunnel.platform.windows.service" in spec.command_line
    assert f'-c "{config.resolve()}"' in spec.command_line
    assert netsh.rules == {FIREWALL_RULE: PYTHON}
    _act("start", scm, netsh, config)
    assert SERVICE_NAME in scm.running


def test_uninstall_stops_the_service_and_removes_it_and_the_rule(tmp_path: Path) -> None:
    scm, netsh = FakeScm(), FakeNetsh()
    _act("install", scm, netsh, tmp_path / "config.yaml")
    _act("start", scm, netsh, tmp_path / "config.yaml")
    _act("uninstall", scm, netsh, tmp_path / "config.yaml")
    assert not scm.services and not scm.running and not netsh.rules


def test_a_refused_firewall_rule_leaves_no_half_installed_service(tmp_path: Path) -> None:
    scm = FakeScm()
    with pytest.raises(ServiceError, match="requires elevation"):
        _act("install", scm, FakeNetsh(fail=True), tmp_path / "config.yaml")
    assert not scm.services


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    scm, netsh = FakeScm(), FakeNetsh()
    with pytest.raises(ServiceError, match="known: install, uninstall, start, stop"):
        _act("restart", scm, netsh, tmp_path / "config.yaml")
    with pytest.raises(ServiceError, match="does not exist as an installed service"):
        _act("start", scm, netsh, tmp_path / "config.yaml")
    _act("install", scm, netsh, tmp_path / "config.yaml")
    with pytest.raises(ServiceError, match="installed already"):
        _act("install", scm, netsh, tmp_path / "config.yaml")


class FakeDaemon:
    def __init__(self) -> None:
        self.stop_requested = threading.Event()

    def request_stop(self) -> None:
        self.stop_requested.set()


def _fake_run_daemon(daemon: FakeDaemon) -> Any:
    def run_daemon(config: Path, *, log_file: Path, on_daemon: Any) -> int:
        import asyncio

        async def main() -> int:
            on_daemon(daemon)
            while not daemon.stop_requested.is_set():
                await asyncio.sleep(0.01)
            return 0

        assert log_file.parent == config.parent
        return asyncio.run(main())

    return run_daemon


@pytest.mark.parametrize("early", [False, True], ids=["running", "before-start"])
def test_the_scm_stop_request_stops_the_daemon(tmp_path: Path, early: bool) -> None:
    daemon = FakeDaemon()
    runner = ServiceRunner(tmp_path / "config.yaml", _fake_run_daemon(daemon))
    if early:
        runner.stop()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    if not early:
        deadline = time.monotonic() + 5
        while runner._daemon is None and time.monotonic() < deadline:
            time.sleep(0.01)
        runner.stop()
    thread.join(5)
    assert result == [0] and daemon.stop_requested.is_set()


class FakeConsole:
    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def __call__(self, handler: Any, add: bool) -> None:
        if add:
            self.handlers.append(handler)
        else:
            self.handlers.remove(handler)


@pytest.mark.parametrize("event", [CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT])
def test_closing_the_console_waits_for_the_daemon_to_stop(event: int) -> None:
    console, stopped, asked = FakeConsole(), threading.Event(), threading.Event()

    def request_stop() -> None:
        asked.set()
        threading.Timer(0.2, stopped.set).start()  # the daemon takes a moment to restore the network

    with ConsoleStop(request_stop, stopped, console, grace=5):
        (handler,) = console.handlers
        assert handler(event) is True
        # Windows ends the process when the handler returns: by then the stop has finished.
        assert asked.is_set() and stopped.is_set()
    assert console.handlers == []


def test_ctrl_c_asks_for_a_stop_and_returns_at_once() -> None:
    console, stopped, asked = FakeConsole(), threading.Event(), threading.Event()
    answers: list[bool] = []
    with ConsoleStop(asked.set, stopped, console, grace=600):  # the daemon never stops here
        thread = threading.Thread(target=lambda: answers.append(console.handlers[0](CTRL_C_EVENT)))
        thread.start()
        thread.join(60)
        assert answers == [True] and asked.is_set()
