"""`dpapi:` secrets outside Windows (docs/WINDOWS.md, "Data folder"): DPAPI exists only there, so such a
value is a clear error naming file, line and key, and `protect-secrets` says it is Windows-only."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from awg_split_tunnel.cli import app
from awg_split_tunnel.core.config import ConfigManager, load_config
from awg_split_tunnel.errors import ConfigError

BLOB = "dpapi:AQAAANCMnd8BFdERjHoAwE/Cl+sBAAAA"
CONFIG = f"""\
tunnels:
  - id: office
    type: socks5
    server: 198.18.0.1:1080
    username: alice
    password: {BLOB}
"""


def test_dpapi_value_off_windows_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    error = raised.value
    assert (error.file, error.line, error.key) == (str(path), 6, "tunnels[0].password")
    assert "DPAPI values can only be read on Windows" in error.reason
    assert BLOB.removeprefix("dpapi:") not in str(error)


def test_dpapi_value_off_windows_fails_the_config_manager_too(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigError, match="only be read on Windows"):
        ConfigManager(path).load()


def test_protect_secrets_command_is_windows_only(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    text = CONFIG.replace(BLOB, "S3cretPw-9x")
    path.write_text(text)

    result = CliRunner().invoke(app, ["protect-secrets", "-c", str(path)])

    assert result.exit_code == 1
    assert "Windows only" in result.output
    assert path.read_text() == text
