"""The data folder on Windows (docs/WINDOWS.md, Data folder), against file security in memory that keeps
Windows' inheritance rules (security_fake.py): secrets written by the config code are readable by SYSTEM
and Administrators only, and a folder or file another user made first, or a link, is refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from security_fake import USER_SID, FakeSecurity

from awg_split_tunnel.core.config import ConfigManager
from awg_split_tunnel.platform.windows.data_folder import (
    DATA_SDDL,
    DataFolderError,
    Descriptor,
    ProtectedFolders,
)

pytestmark = pytest.mark.windows

SECRET_TUNNEL = {
    "id": "office",
    "type": "socks5",
    "server": "198.18.0.1:1080",
    "username": "u",
    "password": "pw",
}


def _readers(security: FakeSecurity, path: Path) -> set[str]:
    return {ace.trustee for ace in Descriptor.parse(security.security(path)).aces if ace.kind == "A"}


def _save_secret(folder: Path, security: FakeSecurity) -> Path:
    manager = ConfigManager(folder / "config.yaml", folder=ProtectedFolders(security))
    with manager.locked():
        manager.load(missing_ok=True)
        manager.add_tunnel(SECRET_TUNNEL)
    return manager.path


def test_a_new_data_folder_and_the_secrets_written_in_it_are_for_system_and_administrators_only(
    tmp_path: Path,
) -> None:
    security = FakeSecurity(tmp_path)
    config = _save_secret(tmp_path / "awg-split-tunnel", security)
    assert "pw" in config.read_text()
    assert security.security(config.parent) == DATA_SDDL
    assert _readers(security, config) == {"SY", "BA"}
    ProtectedFolders(security).check(config.parent)  # what every start does: nothing to refuse


def test_a_folder_a_standard_user_made_first_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    security = FakeSecurity(tmp_path)
    folder = tmp_path / "awg-split-tunnel"
    security.plant(folder, USER_SID, folder=True)
    with pytest.raises(DataFolderError, match=f"owned by {USER_SID}.*remove it"):
        _save_secret(folder, security)
    assert not (folder / "config.yaml").exists()


def test_a_config_a_standard_user_planted_in_the_folder_is_refused_at_start(tmp_path: Path) -> None:
    security = FakeSecurity(tmp_path)
    folder = tmp_path / "awg-split-tunnel"
    ProtectedFolders(security)(folder)
    security.plant(folder / "config.yaml", USER_SID, folder=False)
    with pytest.raises(DataFolderError, match=r"config\.yaml is owned by"):
        ProtectedFolders(security).check(folder)


def test_a_link_in_place_of_the_folder_or_a_file_is_refused(tmp_path: Path) -> None:
    security = FakeSecurity(tmp_path)
    folder = tmp_path / "awg-split-tunnel"
    ProtectedFolders(security)(folder)
    (folder / "nl.conf").write_text("[Interface]\n")
    security.reparse.add(folder / "nl.conf")
    with pytest.raises(DataFolderError, match=r"nl\.conf is a link"):
        ProtectedFolders(security).check(folder)
    security.reparse = {folder}
    with pytest.raises(DataFolderError, match="is a link"):
        _save_secret(folder, security)


def test_a_folder_an_administrator_made_with_a_plain_mkdir_is_closed_to_users(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    security = FakeSecurity(tmp_path)
    folder = tmp_path / "awg-split-tunnel"
    folder.mkdir()  # as the code before this change made it: inheriting Users' read access
    (folder / "config.yaml").write_text("tunnels: []\n")
    assert "BU" in _readers(security, folder / "config.yaml")
    with caplog.at_level(logging.WARNING):
        ProtectedFolders(security).check(folder)
    assert _readers(security, folder / "config.yaml") == {"SY", "BA"}
    assert "readable by other users" in caplog.text


def test_the_service_user_and_the_console_user_own_what_they_made(tmp_path: Path) -> None:
    security = FakeSecurity(tmp_path)
    security.user = USER_SID  # `run` from an elevated console whose objects are owned by the user
    folder = tmp_path / "awg-split-tunnel"
    security.plant(folder, USER_SID, folder=True)
    ProtectedFolders(security).check(folder)
    assert _readers(security, folder) == {"SY", "BA"}
