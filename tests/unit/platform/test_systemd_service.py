"""`awg-split-tunnel service install|uninstall|status` with a fake systemctl: where the unit goes, the
systemctl calls in order, undo on failure, and a clear error where systemd does not run."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from awg_split_tunnel import cli
from awg_split_tunnel.platform.linux.systemd import (
    SYSTEMD_RUNNING,
    UNIT_MARK,
    ServiceError,
    SystemctlResult,
    SystemdService,
    unit_text,
)

UNIT = "awg-split-tunnel.service"


class FakeSystemctl:
    """Records each call; `fail` names the first argument (a verb) that fails."""

    def __init__(self, fail: str | None = None, output: str = "") -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.output = output

    def __call__(self, args: Sequence[str]) -> SystemctlResult:
        self.calls.append(list(args))
        if args and args[0] == self.fail:
            return SystemctlResult(1, f"Job for {UNIT} failed because the control process exited")
        return SystemctlResult(0, self.output)


def booted(tmp_path: Path) -> Path:
    (tmp_path / SYSTEMD_RUNNING).mkdir(parents=True)
    return tmp_path


def test_install_writes_the_unit_then_reloads_enables_and_starts_it(tmp_path: Path) -> None:
    systemctl = FakeSystemctl()
    service = SystemdService(systemctl, booted(tmp_path))
    unit = unit_text(Path("/etc/awg-split-tunnel/config.yaml"))
    service.install(unit)
    path = tmp_path / "etc/systemd/system" / UNIT
    assert path.read_text() == unit and path.stat().st_mode & 0o777 == 0o644
    assert "Restart=on-failure" in unit and "run -c /etc/awg-split-tunnel/config.yaml" in unit
    assert systemctl.calls == [["daemon-reload"], ["enable", UNIT], ["restart", UNIT]]


def test_uninstall_stops_disables_and_removes_everything_install_added(tmp_path: Path) -> None:
    root = booted(tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    systemctl = FakeSystemctl()
    service = SystemdService(systemctl, root)
    service.install(unit_text(Path("/etc/c.yaml")))
    systemctl.calls.clear()
    service.uninstall()
    assert systemctl.calls == [["disable", "--now", UNIT], ["daemon-reload"], ["reset-failed", UNIT]]
    # The directories install created may stay (systemd's own); no file of ours does.
    assert [p for p in root.rglob("*") if p.is_file()] == []
    assert set(before) <= {p.relative_to(root) for p in root.rglob("*")}


def test_a_failed_start_undoes_the_install(tmp_path: Path) -> None:
    systemctl = FakeSystemctl(fail="restart")
    service = SystemdService(systemctl, booted(tmp_path))
    with pytest.raises(ServiceError, match=r"systemctl restart awg-split-tunnel.service failed: Job for"):
        service.install(unit_text(Path("/etc/c.yaml")))
    assert not service.unit_path.exists()
    assert systemctl.calls[-2:] == [["disable", "--now", UNIT], ["daemon-reload"]]


def test_without_systemd_running_nothing_is_written_and_the_error_says_why(tmp_path: Path) -> None:
    systemctl = FakeSystemctl()
    service = SystemdService(systemctl, tmp_path)
    for attempt in (lambda: service.install("x"), service.uninstall, service.status):
        with pytest.raises(ServiceError, match="systemd is not running on this machine"):
            attempt()
    assert systemctl.calls == [] and list(tmp_path.iterdir()) == []


def test_a_unit_of_someone_else_is_never_overwritten_or_removed(tmp_path: Path) -> None:
    service = SystemdService(FakeSystemctl(), booted(tmp_path))
    service.unit_path.parent.mkdir(parents=True)
    service.unit_path.write_text("[Service]\nExecStart=/usr/local/bin/mine\n")
    with pytest.raises(ServiceError, match="not written by awg-split-tunnel"):
        service.install(unit_text(Path("/etc/c.yaml")))
    with pytest.raises(ServiceError, match="not written by awg-split-tunnel"):
        service.uninstall()
    assert service.unit_path.read_text().startswith("[Service]")
    assert unit_text(Path("/etc/c.yaml")).startswith(UNIT_MARK)


def test_status_says_installed_enabled_and_active(tmp_path: Path) -> None:
    service = SystemdService(FakeSystemctl(output="active"), booted(tmp_path))
    assert "not installed" in service.status()[0]
    service.install(unit_text(Path("/etc/c.yaml")))
    assert service.status()[1:] == ["enabled: active", "active: active"]


@pytest.mark.skipif(sys.platform != "linux", reason="the service command is for Linux")
def test_the_cli_installs_with_the_default_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("default: direct\n")
    monkeypatch.setenv("AWG_SPLIT_TUNNEL_CONFIG", str(config))
    monkeypatch.setattr("os.geteuid", lambda: 0)
    systemctl = FakeSystemctl()
    root = booted(tmp_path / "root")
    monkeypatch.setattr(cli, "_service", lambda: SystemdService(systemctl, root))
    result = CliRunner().invoke(cli.app, ["service", "install"])
    assert result.exit_code == 0, result.output
    assert f"run -c {config.resolve()}" in (root / "etc/systemd/system" / UNIT).read_text()
    assert ["restart", UNIT] in systemctl.calls
    # A config that cannot start is refused before anything is installed.
    config.write_text("default: nowhere\n")
    systemctl.calls.clear()
    (root / "etc/systemd/system" / UNIT).unlink()
    result = CliRunner().invoke(cli.app, ["service", "install"])
    assert result.exit_code == 1 and "unknown tunnel 'nowhere'" in result.output
    assert systemctl.calls == [] and not (root / "etc/systemd/system" / UNIT).exists()
