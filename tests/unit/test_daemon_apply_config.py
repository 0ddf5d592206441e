"""Config edits while the daemon runs: packet tunnels added, changed and removed reach the router process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from awg_split_tunnel.core.config import Config, parse_config
from awg_split_tunnel.core.events import ConfigChanged, TunnelStateChanged
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.daemon import Daemon

PRIVATE = "sBNwFJb6ivq6uSe9jD9UN3AvBGq1QiV/rEhSXPcTrGY="
PEER = "LJUHPeQzoI/YHM5fQjNJhCoPbKQ4ISrYPzE8O+jgbUU="


def config(tmp_path: Path, tunnels: str = "", rules: str = "") -> Config:
    text = f"log_level: info\ndefault: direct\ntunnels:{tunnels or ' []'}\nrules:{rules or ' []'}\n"
    return parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path)


def wg_tunnel(address: str = "198.19.0.2/32", endpoint: str = "198.18.0.40:51820") -> str:
    return f"""
  - id: wg
    type: wireguard
    private_key: {PRIVATE}
    address: {address}
    peer:
      public_key: {PEER}
      endpoint: {endpoint}
"""


RULE = "\n  - process: app-wg\n    tunnel: wg\n    fallback: block\n"


class FakeRouter:
    """``RouterProcess`` as the daemon calls it; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def change_devices(self, tunnels: Any, started: Any, stopped: Any) -> None:
        self.calls.append(("devices", dict(tunnels), dict(started), tuple(stopped)))

    def set_tunnels(self, tunnels: Any) -> None:
        self.calls.append(("tunnels", dict(tunnels)))

    def set_rules(self, rules: Any, default: str, fallback: Any = None) -> None:
        self.calls.append(("rules", tuple(r.process for r in rules)))

    def tunnel_state_changed(self, tunnel_id: str, state: TunnelState) -> None:
        self.calls.append(("state", tunnel_id, state))

    def request_status(self) -> concurrent.futures.Future[Any]:
        """Answered at once (the daemon waits for an answer to know the router applied what came before)."""
        answered: concurrent.futures.Future[Any] = concurrent.futures.Future()
        answered.set_result(None)
        return answered


def daemon_with(tmp_path: Path, running: Config) -> tuple[Daemon, FakeRouter]:
    daemon = Daemon(tmp_path / "config.yaml", serve_api=False, check_privileges=False, handles=tuple)
    router = FakeRouter()
    daemon._router = router  # type: ignore[assignment]
    daemon._config = running
    return daemon, router


def test_packet_tunnel_added_while_running_starts_a_device_in_the_router_process(tmp_path: Path) -> None:
    old, new = config(tmp_path), config(tmp_path, wg_tunnel(), RULE)
    daemon, router = daemon_with(tmp_path, old)
    asyncio.run(daemon._apply_config(old, new))
    devices = [c for c in router.calls if c[0] == "devices"]
    ((_, routes, started, stopped),) = devices
    assert list(started) == ["wg"] and stopped == ()
    assert routes["wg"] == PacketTunnelRoute(bytes([198, 19, 0, 2]), None, 1420)
    assert started["wg"].keywords["tunnel_id"] == "wg" and started["wg"].args[0].peers[0].endpoint == (
        "198.18.0.40",
        51820,
    )
    # The rules go first: the device takes a while to start, and until it is UP the rule's fallback holds.
    assert [c[0] for c in router.calls] == ["rules", "devices"] and router.calls[0][1] == ("app-wg",)
    assert daemon.registry.state("wg") is TunnelState.CONNECTING
    assert not [c for c in router.calls if c[0] == "tunnels"], "the devices message carries the routes"


def test_packet_tunnel_changed_is_replaced_and_removed_is_stopped(tmp_path: Path) -> None:
    first = config(tmp_path, wg_tunnel(), RULE)
    changed = config(tmp_path, wg_tunnel(address="198.19.7.2/32"), RULE)
    removed = config(tmp_path)
    daemon, router = daemon_with(tmp_path, config(tmp_path))
    asyncio.run(daemon._apply_config(daemon._config, first))  # type: ignore[arg-type]
    router.calls.clear()
    asyncio.run(daemon._apply_config(first, changed))
    ((_, routes, started, stopped),) = [c for c in router.calls if c[0] == "devices"]
    assert list(started) == ["wg"] and stopped == ("wg",)
    assert routes["wg"].address_v4 == bytes([198, 19, 7, 2])
    router.calls.clear()
    asyncio.run(daemon._apply_config(changed, removed))
    ((_, routes, started, stopped),) = [c for c in router.calls if c[0] == "devices"]
    assert (routes, started, stopped) == ({}, {}, ("wg",))
    assert "wg" not in daemon.registry and daemon.runtimes == {}


def test_unchanged_packet_tunnel_is_left_alone_by_a_rule_edit(tmp_path: Path) -> None:
    before = config(tmp_path, wg_tunnel())
    after = config(tmp_path, wg_tunnel(), RULE)
    daemon, router = daemon_with(tmp_path, before)
    asyncio.run(daemon._apply_config(before, after))
    assert [c[0] for c in router.calls] == ["rules", "tunnels"]


def test_packet_tunnel_whose_endpoint_does_not_resolve_is_reported_and_the_running_config_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unresolvable(*args: object, **kwargs: object) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    old = config(tmp_path)
    new = config(tmp_path, wg_tunnel(endpoint="vpn.example.net:51820"), RULE)
    daemon, router = daemon_with(tmp_path, old)
    daemon.manager = SimpleNamespace(config=new)  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="awg_split_tunnel.core"):
        asyncio.run(daemon._on_config_changed(ConfigChanged("reload")))
    assert "config change ignored, the running config stays" in caplog.text
    assert (
        "tunnel 'wg'" in caplog.text
        and "vpn.example.net" in caplog.text
        and "does not resolve" in caplog.text
    )
    assert router.calls == [] and "wg" not in daemon.registry
    assert daemon._config is old, "the next edit is compared with what runs"


def test_packet_tunnel_down_by_hand_stays_down_and_its_removal_stops_no_device(tmp_path: Path) -> None:
    old, new = config(tmp_path), config(tmp_path, wg_tunnel(), RULE)
    daemon, router = daemon_with(tmp_path, old)

    async def scenario() -> None:
        await daemon._apply_config(old, new)
        router.calls.clear()
        answer = await daemon._api_tunnel({"id": "wg", "action": "down"})
        assert answer == {"id": "wg", "state": "down"}
        ((_, routes, started, stopped),) = router.calls
        assert list(routes) == ["wg"] and started == {} and stopped == ("wg",)
        daemon._device_state("wg", TunnelState.DOWN, "device stopped")
        daemon._device_state("wg", TunnelState.UP, "a late handshake")
        assert daemon.registry.info("wg").reason == "taken down by hand"  # type: ignore[union-attr]
        router.calls.clear()
        await daemon._apply_config(new, old)

    asyncio.run(scenario())
    assert [c[0] for c in router.calls] == ["rules", "tunnels"], "its device is stopped already"
    assert daemon.runtimes == {} and "wg" not in daemon.registry


def test_a_config_caught_while_being_written_is_read_again_once_it_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watcher saw the file mid-write (ConfigUnsettled); the writer then finished within the same
    # modification-time tick and size, so the file's stamp does not change again: it must still be read.
    from awg_split_tunnel.core.config import ConfigUnsettled

    path = tmp_path / "config.yaml"
    path.write_text("log_level: info\n")
    daemon = Daemon(path, serve_api=False, check_privileges=False, handles=tuple, watch_interval=0.01)
    daemon._file_stamp = None
    reloads: list[str] = []

    def reload() -> bool:
        reloads.append("read")
        if len(reloads) == 1:
            raise ConfigUnsettled("the file changed while it was read", file=str(path))
        raise asyncio.CancelledError  # read a second time: the watcher did not wait for a new stamp

    monkeypatch.setattr(daemon.manager, "reload", reload)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(asyncio.wait_for(daemon._watch_config(), 5.0))
    assert reloads == ["read", "read"]


def test_status_says_up_only_once_the_router_process_was_told(tmp_path: Path) -> None:
    # A script (or a test) that waits for `status` to say UP, then starts a block app, must not have the
    # app refused by a router process that has not heard of the UP yet.
    old, new = config(tmp_path), config(tmp_path, wg_tunnel(), RULE)
    daemon, router = daemon_with(tmp_path, old)
    told_when_asked: list[bool] = []
    answer_at_once = router.request_status

    def request_status() -> concurrent.futures.Future[Any]:
        told_when_asked.append(("state", "wg", TunnelState.UP) in router.calls)
        return answer_at_once()

    router.request_status = request_status  # type: ignore[method-assign]

    async def scenario() -> dict[str, Any]:
        daemon.bus.subscribe(TunnelStateChanged, daemon._on_tunnel_state)
        await daemon.bus.start()
        try:
            await daemon._apply_config(old, new)
            daemon._device_state("wg", TunnelState.UP, "handshake completed")
            return await daemon._api_status({})
        finally:
            await daemon.bus.stop()

    answer = asyncio.run(scenario())
    assert [row["state"] for row in answer["tunnels"] if row["id"] == "wg"] == ["up"]
    assert told_when_asked == [True]
