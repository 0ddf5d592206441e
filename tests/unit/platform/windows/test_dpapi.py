"""Secrets of the YAML encrypted with DPAPI (docs/WINDOWS.md, "Data folder"), against DPAPI in memory
(dpapi_fake.py): `protect-secrets` rewrites each plain key and password as `dpapi:BASE64` with the
comments kept, the daemon reads the same config as before, and a blob this machine cannot decrypt is an
error naming its key, never its value."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path

import pytest
from dpapi_fake import ERROR_INVALID_DATA, FakeCrypt32, FakeDpapi
from typer.testing import CliRunner

from awg_split_tunnel.cli import app
from awg_split_tunnel.core.config import ConfigManager, load_config
from awg_split_tunnel.daemon import Daemon
from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.platform.windows.dpapi import (
    CRYPTPROTECT_LOCAL_MACHINE,
    CRYPTPROTECT_UI_FORBIDDEN,
    ENTROPY,
    MachineDpapi,
)

pytestmark = pytest.mark.windows

PASSWORD = "S3cretPw-9x"
PRIVATE = base64.b64encode(bytes(range(1, 33))).decode()
PRESHARED = base64.b64encode(bytes(range(201, 233))).decode()
PUBLIC = base64.b64encode(bytes(range(101, 133))).decode()
FILE_PRIVATE = base64.b64encode(bytes(range(41, 73))).decode()

CONFIG = f"""\
# my tunnels
tunnels:
  - id: office   # the office proxy
    type: socks5
    server: 198.18.0.1:1080
    username: alice
    password: {PASSWORD}   # rotated monthly
  - id: home
    type: wireguard
    private_key: {PRIVATE}
    address: 10.0.0.2/32
    peer:
      public_key: {PUBLIC}
      preshared_key: "{PRESHARED}"
      endpoint: 198.18.0.2:51820
  - id: file
    type: wireguard
    config_file: file.conf
rules:
  - process: firefox.exe   # the browser
    tunnel: office
"""

CONF = f"""\
[Interface]
PrivateKey = {FILE_PRIVATE}
Address = 10.0.1.2/32

[Peer]
PublicKey = {PUBLIC}
Endpoint = 198.18.0.3:51820
AllowedIPs = 0.0.0.0/0
"""


def _write(folder: Path, text: str = CONFIG) -> Path:
    (folder / "file.conf").write_text(CONF)
    path = folder / "config.yaml"
    path.write_text(text)
    return path


def test_protect_secrets_encrypts_each_plain_secret_and_keeps_comments(tmp_path: Path) -> None:
    path = _write(tmp_path)
    dpapi = FakeDpapi()
    before = ConfigManager(path, secrets=dpapi).load()
    manager = ConfigManager(path, secrets=dpapi)
    manager.load()

    done = manager.protect_secrets(dpapi)

    assert done == ["tunnels[0].password", "tunnels[1].private_key", "tunnels[1].peer.preshared_key"]
    text = path.read_text()
    for secret in (PASSWORD, PRIVATE, PRESHARED):
        assert secret not in text
    assert text.count("dpapi:") == 3
    for comment in ("# my tunnels", "# the office proxy", "# rotated monthly", "# the browser"):
        assert comment in text
    assert (tmp_path / "file.conf").read_text() == CONF  # config_file is left alone
    assert load_config(path, dpapi) == before  # the daemon runs the same config as before
    assert manager.protect_secrets(dpapi) == []  # nothing left to protect
    assert path.read_text() == text


def test_dpapi_blob_of_another_machine_names_the_key_never_the_value(tmp_path: Path) -> None:
    path = _write(tmp_path)
    manager = ConfigManager(path, secrets=FakeDpapi(b"the admin's laptop"))
    manager.load()
    manager.protect_secrets(FakeDpapi(b"the admin's laptop"))

    with pytest.raises(ConfigError) as raised:
        load_config(path, FakeDpapi(b"this machine"))

    error = raised.value
    assert (error.file, error.line, error.key) == (str(path), 7, "tunnels[0].password")
    assert "cannot decrypt" in error.reason and "another machine" in error.reason
    blob = path.read_text().split("password: ", 1)[1].split()[0]
    for shown in (PASSWORD, blob, blob.removeprefix("dpapi:")):
        assert shown not in str(error)


def test_damaged_dpapi_value_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG.replace(PASSWORD, "dpapi:not*base64"))
    with pytest.raises(ConfigError, match="not base64") as raised:
        load_config(path, FakeDpapi())
    assert raised.value.key == "tunnels[0].password"
    assert "not*base64" not in str(raised.value)


def test_protect_secrets_command_rewrites_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path)
    dpapi = FakeDpapi()
    monkeypatch.setattr("awg_split_tunnel.platform.data_folder.secret_protection", lambda: dpapi)

    result = CliRunner().invoke(app, ["protect-secrets", "-c", str(path)])

    assert result.exit_code == 0, result.output
    assert "protected tunnels[1].peer.preshared_key" in result.output
    assert PASSWORD not in path.read_text()
    assert load_config(path, dpapi).tunnel("office").password == PASSWORD  # type: ignore[union-attr]


def test_machine_dpapi_calls_crypt32_with_machine_scope_and_the_entropy() -> None:
    crypt32 = FakeCrypt32(FakeDpapi())
    dpapi = MachineDpapi(crypt32, crypt32, crypt32.last_error)

    blob = dpapi.protect(PASSWORD.encode())

    assert PASSWORD.encode() not in blob
    assert dpapi.unprotect(blob) == PASSWORD.encode()
    assert crypt32.flags == [CRYPTPROTECT_LOCAL_MACHINE | CRYPTPROTECT_UI_FORBIDDEN] * 2
    assert crypt32.entropy == [ENTROPY] * 2
    assert crypt32.allocated == {}  # each output freed with LocalFree


def test_machine_dpapi_reports_another_machines_blob_as_the_windows_error() -> None:
    blob = MachineDpapi(*_dlls(b"another machine")).protect(PASSWORD.encode())
    crypt32 = FakeCrypt32(FakeDpapi(b"this machine"))

    with pytest.raises(OSError) as raised:
        MachineDpapi(crypt32, crypt32, crypt32.last_error).unprotect(blob)

    assert raised.value.errno == ERROR_INVALID_DATA
    assert raised.value.strerror == "Windows error 13 from CryptUnprotectData"
    assert crypt32.allocated == {}


def _dlls(machine: bytes) -> tuple[FakeCrypt32, FakeCrypt32, Callable[[], int]]:
    crypt32 = FakeCrypt32(FakeDpapi(machine))
    return crypt32, crypt32, crypt32.last_error


def test_the_daemon_and_its_dashboard_read_dpapi_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dpapi = FakeDpapi()
    path = _write(tmp_path, CONFIG + "ui: {listen: 127.0.0.1:0}\n")
    manager = ConfigManager(path, secrets=dpapi)
    manager.load()
    manager.protect_secrets(dpapi)
    monkeypatch.setattr("awg_split_tunnel.daemon.secret_protection", lambda: dpapi)
    daemon = Daemon(path, check_privileges=False)

    config = daemon.manager.load()
    assert config.tunnel("office").password == PASSWORD  # type: ignore[union-attr]

    async def dashboard_rules() -> object:
        await daemon._start_dashboard(config)
        try:
            return (await daemon._dashboard.loaded())._current_config()
        finally:
            await daemon._dashboard.stop()

    assert asyncio.run(dashboard_rules()) == config
