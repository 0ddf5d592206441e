"""The Windows kill switch (docs/WINDOWS.md, Kill switch), against a Base Filtering Engine in memory that
keeps WFP's object lifetimes (wfp_fake.py): `block` and `drop` apps are permitted while the daemon runs,
blocked once it is gone (crash, kill, reboot), and free again after a clean stop or `cleanup`."""

from __future__ import annotations

import pytest
from wfp_fake import FakeWfp

from awg_split_tunnel.core.policy import FallbackPolicy
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.platform.windows.kill_switch import (
    KillSwitch,
    blocked_apps,
    cleanup_kill_switch,
    refresh_apps,
    remove_kill_switch,
)
from awg_split_tunnel.platform.windows.wfp import ALE_LAYERS, FWPM_LAYER_ALE_AUTH_CONNECT_V4, Action
from awg_split_tunnel.process.matcher import Platform

pytestmark = pytest.mark.windows

CONNECT = FWPM_LAYER_ALE_AUTH_CONNECT_V4
FIREFOX = r"C:\Program Files\Mozilla Firefox\firefox.exe"
GAME = r"D:\Games\Quake\quake.exe"
EDITOR = r"C:\Tools\editor.exe"
DAEMON = r"C:\Python311\python.exe"


def _engine(*rules: tuple[str, FallbackPolicy], default: str = "direct") -> RuleEngine:
    return RuleEngine([Rule(p, "vpn", f) for p, f in rules], default, Platform.WINDOWS)


def _running(bfe: FakeWfp, apps: set[str]) -> KillSwitch:
    switch = KillSwitch(bfe)
    switch.start(apps)
    return switch


def test_a_block_app_is_permitted_while_the_daemon_runs_and_blocked_after_a_crash() -> None:
    bfe = FakeWfp()
    _running(bfe, {FIREFOX})
    assert all(bfe.decision(FIREFOX, layer) is Action.PERMIT for layer in ALE_LAYERS)
    bfe.process_ended()
    assert all(bfe.decision(FIREFOX, layer) is Action.BLOCK for layer in ALE_LAYERS)
    assert bfe.decision(EDITOR, CONNECT) is None


def test_the_block_survives_a_reboot_until_the_next_start_or_cleanup() -> None:
    bfe = FakeWfp()
    _running(bfe, {FIREFOX})
    bfe.process_ended()
    bfe.reboot()
    assert bfe.decision(FIREFOX, CONNECT) is Action.BLOCK
    session = bfe.open(dynamic=False)
    assert remove_kill_switch(session) == len(ALE_LAYERS)
    assert bfe.decision(FIREFOX, CONNECT) is None
    assert not bfe.providers and not bfe.sublayers and not bfe.filters


def test_a_clean_stop_removes_everything_and_a_failure_stop_keeps_the_block() -> None:
    bfe = FakeWfp()
    _running(bfe, {FIREFOX}).stop(keep_blocks=False)
    assert not bfe.providers and not bfe.sublayers and not bfe.filters and not bfe.open_sessions
    _running(bfe, {FIREFOX}).stop(keep_blocks=True)
    assert bfe.decision(FIREFOX, CONNECT) is Action.BLOCK


def test_a_start_after_a_crash_replaces_what_the_dead_daemon_left() -> None:
    bfe = FakeWfp()
    _running(bfe, {FIREFOX, GAME})
    bfe.process_ended()
    _running(bfe, {GAME})  # the rule for firefox was removed meanwhile
    assert bfe.decision(FIREFOX, CONNECT) is None
    assert bfe.decision(GAME, CONNECT) is Action.PERMIT


def test_rules_changing_while_running_add_and_remove_apps() -> None:
    bfe = FakeWfp()
    switch = _running(bfe, {FIREFOX})
    switch.update({GAME})
    bfe.process_ended()
    assert bfe.decision(GAME, CONNECT) is Action.BLOCK
    assert bfe.decision(FIREFOX, CONNECT) is None


def test_an_app_whose_file_is_gone_is_skipped_not_fatal() -> None:
    bfe = FakeWfp(missing_files=frozenset({GAME}))
    switch = _running(bfe, {FIREFOX, GAME})
    assert switch.apps == {FIREFOX}
    bfe.process_ended()
    assert bfe.decision(FIREFOX, CONNECT) is Action.BLOCK


def test_apps_come_from_full_path_rules_and_matching_processes_first_rule_winning() -> None:
    engine = _engine(
        (EDITOR, FallbackPolicy.ALLOW_DIRECT),
        (FIREFOX, FallbackPolicy.BLOCK),
        ("*quake*", FallbackPolicy.DROP),
        (r"C:\Tools\\", FallbackPolicy.BLOCK),
        (r"C:\Apps\*\app.exe", FallbackPolicy.BLOCK),
    )
    seen = {GAME, EDITOR, r"C:\Tools\other.exe", r"C:\Windows\notepad.exe", DAEMON}
    assert blocked_apps(engine, seen, exempt=[DAEMON]) == {FIREFOX, GAME, r"C:\Tools\other.exe"}


def test_the_daemons_own_interpreter_is_never_blocked() -> None:
    engine = _engine(("python.exe", FallbackPolicy.BLOCK))
    assert blocked_apps(engine, {DAEMON}, exempt=[DAEMON.upper()]) == set()


def test_a_drop_default_covers_every_seen_app() -> None:
    engine = _engine(default="drop")
    assert blocked_apps(engine, {EDITOR}) == {EDITOR}


def test_refresh_covers_apps_started_later_and_keeps_those_seen_before() -> None:
    bfe = FakeWfp()
    engine = _engine(("quake.exe", FallbackPolicy.BLOCK), ("firefox.exe", FallbackPolicy.BLOCK))
    switch = _running(bfe, set())
    refresh_apps(switch, engine, exempt=[DAEMON], executables=lambda: {GAME, EDITOR})
    refresh_apps(switch, engine, exempt=[DAEMON], executables=lambda: {FIREFOX})  # quake has exited
    bfe.process_ended()
    assert bfe.decision(GAME, CONNECT) is Action.BLOCK
    assert bfe.decision(FIREFOX, CONNECT) is Action.BLOCK
    assert bfe.decision(EDITOR, CONNECT) is None


def test_cleanup_frees_the_apps_a_dead_daemon_left_blocked() -> None:
    bfe = FakeWfp()
    _running(bfe, {FIREFOX, GAME})
    bfe.process_ended()
    assert cleanup_kill_switch(bfe) == 2 * len(ALE_LAYERS)
    assert bfe.decision(FIREFOX, CONNECT) is None and not bfe.providers and not bfe.open_sessions
    assert cleanup_kill_switch(bfe) == 0


def test_a_restart_never_lets_a_still_blocked_app_out() -> None:
    bfe = FakeWfp()
    _running(bfe, {FIREFOX, GAME})
    bfe.process_ended()
    seen: list[Action | None] = []
    bfe.on_change = lambda: seen.append(bfe.decision(FIREFOX, CONNECT))
    _running(bfe, {FIREFOX})
    assert seen and None not in seen
    assert bfe.decision(GAME, CONNECT) is None  # its rule is gone: the dead run's block is deleted


def test_an_app_seen_under_another_spelling_keeps_its_filters() -> None:
    bfe = FakeWfp()
    switch = _running(bfe, {FIREFOX})
    switch.update({FIREFOX.upper()})  # the same file (Windows paths ignore case)
    bfe.process_ended()
    assert bfe.decision(FIREFOX, CONNECT) is Action.BLOCK
