"""The daemon runs the kill switch (docs/WINDOWS.md, Kill switch): a `block` app is covered from the
start, a rule added while running covers its app, a clean stop frees the apps and a failure keeps them
blocked. The Base Filtering Engine is the in-memory one of wfp_fake.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from wfp_fake import FakeWfp

from awg_split_tunnel.core.config import Config, parse_config
from awg_split_tunnel.daemon import EXIT_FAILURE, Daemon
from awg_split_tunnel.platform.windows.wfp import FWPM_LAYER_ALE_AUTH_CONNECT_V4, Action

pytestmark = pytest.mark.windows

APP = "/opt/apps/browser"  # a full path on this machine's path semantics


def _config(tmp_path: Path, fallback: str) -> Config:
    text = (
        "default: direct\ntunnels:\n  - id: vpn\n    type: socks5\n    server: 198.18.0.1:1080\n"
        f"rules:\n  - process: {APP}\n    tunnel: vpn\n    fallback: {fallback}\n"
    )
    return parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path)


async def _started(tmp_path: Path, bfe: FakeWfp, config: Config) -> Daemon:
    daemon = Daemon(
        tmp_path / "config.yaml", serve_api=False, check_privileges=False, handles=tuple, filter_engine=bfe
    )
    await daemon._start_kill_switch(config)
    daemon._started = True
    daemon._config = config
    return daemon


@pytest.mark.parametrize(("code", "after"), [(0, None), (EXIT_FAILURE, Action.BLOCK)])
def test_the_block_outlives_a_failed_daemon_and_not_a_clean_stop(
    tmp_path: Path, code: int, after: Action | None
) -> None:
    async def scenario() -> None:
        bfe = FakeWfp()
        daemon = await _started(tmp_path, bfe, _config(tmp_path, "block"))
        assert bfe.decision(APP, FWPM_LAYER_ALE_AUTH_CONNECT_V4) is Action.PERMIT
        daemon.exit_code = code
        await daemon.stop()
        assert bfe.decision(APP, FWPM_LAYER_ALE_AUTH_CONNECT_V4) is after

    asyncio.run(scenario())


def test_a_rule_changed_to_block_while_running_covers_its_app(tmp_path: Path) -> None:
    async def scenario() -> None:
        bfe = FakeWfp()
        old, new = _config(tmp_path, "allow_direct"), _config(tmp_path, "block")
        daemon = await _started(tmp_path, bfe, old)
        assert bfe.decision(APP, FWPM_LAYER_ALE_AUTH_CONNECT_V4) is None
        await daemon._apply_config(old, new)
        bfe.process_ended()  # the daemon is killed
        assert bfe.decision(APP, FWPM_LAYER_ALE_AUTH_CONNECT_V4) is Action.BLOCK

    asyncio.run(scenario())
