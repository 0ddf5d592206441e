"""Why a flow went the way it did, as the dashboard says it, for every way a flow can go."""

from __future__ import annotations

import pytest

from awg_split_tunnel.core.policy import FallbackPolicy
from awg_split_tunnel.core.rule_engine import Decision
from awg_split_tunnel.ui.views import app_name, connection_rows, route_reason

BLOCK = Decision("nl-awg", FallbackPolicy.BLOCK, 0)
ALLOW = Decision("socks", FallbackPolicy.ALLOW_DIRECT, 1)
DROPPING = Decision("socks", FallbackPolicy.DROP, 3)
DIRECT_DEFAULT = Decision("direct", FallbackPolicy.ALLOW_DIRECT, None)
DROP_DEFAULT = Decision("drop", FallbackPolicy.DROP, None)


@pytest.mark.parametrize(
    ("verdict", "decision", "states", "reason"),
    [
        ("tunnel", BLOCK, {"nl-awg": "up"}, "rule #0"),
        ("pass", DIRECT_DEFAULT, {}, "default: direct"),
        ("pass", ALLOW, {"socks": "down"}, "rule #1: socks down, fallback allow_direct"),
        ("pass", ALLOW, {"socks": "up"}, "rule #1: LAN destination bypasses socks"),
        ("drop", BLOCK, {"nl-awg": "connecting"}, "rule #0: nl-awg connecting, fallback block"),
        ("drop", DROPPING, {"socks": "up"}, "rule #3: fallback drop"),
        ("drop", DROP_DEFAULT, {}, "default: drop"),
        ("reset", BLOCK, {"nl-awg": "down"}, "its tunnel went down: reset"),
        ("drop", None, {}, ""),
    ],
)
def test_route_reason(verdict: str, decision: Decision | None, states: dict[str, str], reason: str) -> None:
    assert route_reason(verdict, decision, states) == reason


@pytest.mark.parametrize(
    ("path", "name"),
    [("/usr/bin/firefox", "firefox"), ("C:\\Program Files\\App\\app.exe", "app.exe"), (None, "?"), ("", "?")],
)
def test_app_name_is_the_exe_name_of_a_windows_or_posix_path(path: str | None, name: str) -> None:
    assert app_name(path) == name


def test_rows_keep_the_full_path_and_name_routes_as_users_do() -> None:
    flows = [{"exe": "/opt/app-x", "route": "pass", "pid": 7, "dst": "198.18.0.10:80", "out": 2, "in": 1}]
    [row] = connection_rows(flows, lambda path: DIRECT_DEFAULT, {})
    assert (row["app"], row["path"], row["route"], row["reason"]) == (
        "app-x", "/opt/app-x", "direct", "default: direct"
    )  # fmt: skip
    [unknown] = connection_rows([{"exe": None, "route": "drop"}], None, {})
    assert (unknown["app"], unknown["route"], unknown["reason"]) == ("?", "dropped", "")
