"""The command line as a user meets it: clear output, exit codes, never a traceback for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from awg_split_tunnel.cli import app
from awg_split_tunnel.provider.wireguard.keys import generate_private_key, public_key

runner = CliRunner()

CONFIG = """\
# my split tunnel
default: direct
tunnels:
  - id: office            # the office proxy
    type: socks5
    server: 198.18.0.20:1080
rules:
  - process: firefox.exe
    tunnel: office
    fallback: block
  - process: "*telegram*"
    tunnel: office
  - process: "C:\\\\Games\\\\"
    tunnel: office
    fallback: drop
  - process: /opt/tools/**
    tunnel: direct
"""

WG_CONF = """\
[Interface]
PrivateKey = {private}
Address = 198.19.0.2/32
Jc = 3
Jmin = 50
Jmax = 60
H1 = 100-199
H2 = 200-299
H3 = 300-399
H4 = 400-499
I1 = <b 0xc0ffee><r 5>

[Peer]
PublicKey = {peer}
Endpoint = 198.18.0.40:51820
AllowedIPs = 0.0.0.0/0
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=input)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        f"crashed: {result.exception!r}"
    )
    return result.exit_code, result.stdout, result.stderr


def test_check_prints_tunnels_and_rules(config: Path) -> None:
    code, stdout, _ = invoke("check", "-c", str(config))
    assert code == 0
    assert "office" in stdout and "socks5" in stdout and "198.18.0.20:1080" in stdout
    assert "firefox.exe" in stdout and "*telegram*" in stdout and "block" in stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default: direct\nbogus: 1\n", ":2"),
        ("tunnels:\n  - id: a\n    type: socks5\n    server: 198.18.0.20:1080\n    colour: red\n", "colour"),
        ("rules:\n  - process: a.exe\n    tunnel: nowhere\n", "nowhere"),
        ("rules:\n  - process: a.exe\n    tunnel: direct\n    fallback: sometimes\n", "fallback"),
        ("default: [unclosed\n", "config.yaml"),
    ],
)
def test_check_reports_bad_config_without_traceback(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    code, stdout, stderr = invoke("check", "-c", str(path))
    assert code == 1
    assert "Traceback" not in stdout + stderr
    assert "config.yaml" in stderr and expected in stderr


def test_check_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    code, _, stderr = invoke("check", "-c", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "nope.yaml" in stderr


@pytest.mark.parametrize(
    ("process", "platform", "expected"),
    [
        ("firefox.exe", "posix", {"tunnel": "office", "fallback": "block", "rule_index": 0}),
        (
            r"C:\Program Files\Mozilla\FIREFOX.EXE",
            "windows",
            {"tunnel": "office", "fallback": "block", "rule_index": 0},
        ),
        (
            "/usr/bin/FIREFOX.EXE",
            "posix",
            {"tunnel": "direct", "fallback": "allow_direct", "rule_index": None},
        ),
        (
            "/usr/bin/telegram-desktop",
            "posix",
            {"tunnel": "office", "fallback": "allow_direct", "rule_index": 1},
        ),
        ("c:/games/steam/game.exe", "windows", {"tunnel": "office", "fallback": "drop", "rule_index": 2}),
        ("/opt/tools/x/bin/curl", "posix", {"tunnel": "direct", "fallback": "allow_direct", "rule_index": 3}),
    ],
)
def test_match_json(config: Path, process: str, platform: str, expected: dict[str, object]) -> None:
    code, stdout, _ = invoke("match", process, "-c", str(config), "--json", "--platform", platform)
    assert code == 0
    assert json.loads(stdout) == expected


def test_match_human_output_names_the_rule(config: Path) -> None:
    code, stdout, _ = invoke("match", "/usr/bin/telegram-desktop", "-c", str(config))
    assert code == 0
    assert "office" in stdout and "#1" in stdout and "*telegram*" in stdout


def test_match_rejects_unknown_platform(config: Path) -> None:
    code, _, stderr = invoke("match", "x", "-c", str(config), "--platform", "amiga")
    assert code == 1 and "--platform" in stderr


def test_genkey_pubkey_round_trip() -> None:
    code, private, _ = invoke("genkey")
    assert code == 0
    code, public, _ = invoke("pubkey", input=private)
    assert code == 0
    assert public.strip() == public_key(private.strip())


def test_pubkey_rejects_garbage() -> None:
    code, _, stderr = invoke("pubkey", input="not a key\n")
    assert code == 1 and stderr


def test_import_adds_an_amneziawg_tunnel_and_keeps_comments(config: Path, tmp_path: Path) -> None:
    conf = tmp_path / "Netherlands 1.conf"
    peer = public_key(generate_private_key())
    conf.write_text(WG_CONF.format(private=generate_private_key(), peer=peer))
    code, stdout, stderr = invoke("import", str(conf), "--id", "nl", "-c", str(config))
    assert code == 0, stderr
    text = config.read_text()
    assert "# my split tunnel" in text and "# the office proxy" in text
    assert "id: nl" in text and "type: amneziawg" in text
    code, stdout, _ = invoke("check", "-c", str(config))
    assert code == 0 and "nl" in stdout and "amneziawg" in stdout
    code, _, stderr = invoke("import", str(conf), "--id", "nl", "-c", str(config))
    assert code == 1 and "nl" in stderr


def test_rule_add_and_remove_apply_to_match(config: Path) -> None:
    code, _, stderr = invoke("rule", "add", "curl", "--tunnel", "office", "--index", "0", "-c", str(config))
    assert code == 0, stderr
    code, stdout, _ = invoke("match", "/usr/bin/curl", "-c", str(config), "--json")
    assert json.loads(stdout)["rule_index"] == 0
    assert "# my split tunnel" in config.read_text()
    code, _, _ = invoke("rule", "remove", "0", "-c", str(config))
    assert code == 0
    code, stdout, _ = invoke("match", "/usr/bin/curl", "-c", str(config), "--json")
    assert json.loads(stdout)["rule_index"] is None


def test_rule_add_to_unknown_tunnel_fails_and_leaves_file(config: Path) -> None:
    before = config.read_text()
    code, _, stderr = invoke("rule", "add", "curl", "--tunnel", "nowhere", "-c", str(config))
    assert code == 1 and "nowhere" in stderr
    assert config.read_text() == before


def test_the_systemd_unit_runs_this_installation_with_the_config_and_restarts_within_a_second(
    tmp_path: Path,
) -> None:
    import sys

    config = tmp_path / "config.yaml"
    result = runner.invoke(app, ["systemd-unit", "-c", str(config)])
    assert result.exit_code == 0, result.output
    [exec_start] = [line for line in result.output.splitlines() if line.startswith("ExecStart=")]
    script = Path(sys.executable).parent / "awg-split-tunnel"
    runs = str(script) if script.is_file() else f"{sys.executable} -m awg_split_tunnel"
    assert exec_start == f"ExecStart={runs} run -c {config.resolve()}"
    assert "Restart=on-failure" in result.output and "RestartSec=500ms" in result.output
