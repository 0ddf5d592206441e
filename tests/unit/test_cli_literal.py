"""Text from users, configs and servers is printed by the CLI exactly as typed, never read as markup."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from awg_split_tunnel import cli
from awg_split_tunnel.api import control
from awg_split_tunnel.cli import app
from awg_split_tunnel.errors import TunnelError

runner = CliRunner()

NASTY = st.lists(
    st.sampled_from(
        [
            "[",
            "]",
            "/",
            "\\",
            "[/]",
            "[bold]",
            "[/bold]",
            "[red]",
            "[link=x]",
            ":smile:",
            "b",
            "old",
            "=",
            "#",
        ]
    ),
    min_size=1,
    max_size=12,
).map("".join)

FIXED = ["[bold]office[/]", "[/]", "a\\[red]b", "\\", "x\\", "[link=https://x]y[/link]", ":smile:"]


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consoles wide enough that no cell wraps, so a string shows on one line."""
    monkeypatch.setattr(cli, "out", Console(highlight=False, width=2000))
    monkeypatch.setattr(cli, "err", Console(stderr=True, highlight=False, width=2000))


def fake_request(answers: dict[str, Any]) -> Callable[..., Any]:
    def request(cmd: str, **args: Any) -> Any:
        answer = answers[cmd]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return request


def invoke(monkeypatch: pytest.MonkeyPatch, answers: dict[str, Any], *args: str) -> Any:
    request = fake_request(answers)
    with monkeypatch.context() as m:
        m.setattr(control, "request", request)
        m.setattr(control, "request_pages", lambda cmd, **args: iter([request(cmd, **args)]))
        return runner.invoke(app, list(args))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(text=NASTY)
def test_status_shows_daemon_text_literally(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    tunnel = {"id": text, "type": "socks5", "state": text, "reason": text, "flows": 1}
    result = invoke(monkeypatch, {"status": {"tunnels": [tunnel], "router": {text: 1}}}, "status")
    assert result.exit_code == 0, result.output
    assert result.output.count(text) >= 4


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(text=NASTY)
def test_connections_show_exe_and_tunnel_literally(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    flow = {"proto": "tcp", "pid": 7, "exe": text, "src": "a", "dst": "b", "route": "tunnel", "tunnel": text}
    result = invoke(monkeypatch, {"connections": {"flows": [flow]}}, "connections")
    assert result.exit_code == 0, result.output
    assert result.output.count(text) >= 2


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(text=NASTY)
def test_errors_and_answers_are_shown_literally(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    failed = invoke(monkeypatch, {"tunnel": TunnelError(text)}, "tunnel", "up", "office")
    assert failed.exit_code == 1
    assert f"error: {text}" in failed.output
    answered = invoke(monkeypatch, {"tunnel": {"state": text}}, "tunnel", "down", text)
    assert answered.exit_code == 0, answered.output
    assert f"{text}: {text}" in answered.output


@pytest.mark.parametrize("text", FIXED)
def test_config_patterns_are_shown_literally_by_check_and_rule_list(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(
            "default: direct\n"
            "tunnels:\n  - id: office\n    type: socks5\n    server: 198.18.0.20:1080\n"
            f"rules:\n  - process: {json.dumps(text)}\n    tunnel: office\n"
        )
        results = [
            runner.invoke(app, [cmd, *rest, "-c", str(config)])
            for cmd, *rest in (["check"], ["rule", "list"])
        ]
    for result in results:
        assert result.exit_code == 0, result.output
        assert text in result.output


@pytest.mark.parametrize("text", FIXED)
def test_fail_prints_the_message_literally(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    cli._fail(f"bad {text}")
    assert f"error: bad {text}" in capsys.readouterr().err


def test_status_shows_each_tunnels_dns_route_and_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    dns = {"servers": ["10.8.0.1"], "via": "from the tunnel address", "answered": 41, "cached": 7}
    tunnels = [
        {"id": "nl-awg", "type": "amneziawg", "state": "up", "dns": {**dns, "refused": 3, "failed": 0}}
    ]
    result = invoke(monkeypatch, {"status": {"tunnels": tunnels, "router": {}}}, "status")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "10.8.0.1" in line]
    cells = [cell.strip() for cell in line.split("│")[1:-1]]
    assert cells == ["nl-awg", "10.8.0.1", "from the tunnel address", "41", "7", "3", "0"]
