"""``service:`` rules on Windows (docs/WINDOWS.md, "Rules by service"): a service's process found through
the Service Control Manager, matched by pid in the router; ``dns.system`` applied to Dnscache that way.

The SCM here is a table in memory that answers as psutil documents ``win_service_get``: a
``WindowsService`` whose ``pid()`` is None while the service is not running, ``psutil.NoSuchProcess``
for a name no service has, ``psutil.AccessDenied`` when the caller may not ask.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import psutil
import pytest

from awg_split_tunnel.core.config import parse_config
from awg_split_tunnel.core.packet_router import PacketAction, PacketRouter, TunnelRoute
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.daemon import Daemon
from awg_split_tunnel.net.packet import IPPROTO_UDP, build_packet
from awg_split_tunnel.platform.windows.services import DNSCACHE_SERVICE, service_pids
from awg_split_tunnel.process.matcher import Platform

pytestmark = pytest.mark.windows

SVCHOST = r"C:\Windows\System32\svchost.exe"


class FakeService:
    def __init__(self, scm: FakeScm, name: str) -> None:
        self._scm, self._name = scm, name

    def pid(self) -> int | None:
        pid = self._scm.running.get(self._name)
        return pid or None  # the SCM says 0 for a stopped service; psutil gives None


class FakeScm:
    """Services by name (case-insensitive, as the SCM's): the pid running each, 0 while stopped."""

    def __init__(self, running: dict[str, int]) -> None:
        self.running = {name.lower(): pid for name, pid in running.items()}
        self.denied = False

    def win_service_get(self, name: str) -> FakeService:
        if self.denied:
            raise psutil.AccessDenied(msg=f"OpenService {name}")
        if name.lower() not in self.running:
            raise psutil.NoSuchProcess(pid=None, msg=f"service {name!r} does not exist")
        return FakeService(self, name.lower())


def test_a_running_service_gives_its_process_a_stopped_or_unknown_one_none() -> None:
    scm = FakeScm({"Dnscache": 1234, "wuauserv": 0})
    assert service_pids("Dnscache", scm.win_service_get) == {1234}
    assert service_pids("dnscache", scm.win_service_get) == {1234}
    assert service_pids("wuauserv", scm.win_service_get) == frozenset()  # stopped
    assert service_pids("NoSuchService", scm.win_service_get) == frozenset()
    scm.denied = True
    assert service_pids("Dnscache", scm.win_service_get) == frozenset()  # never raises into the router


def test_the_router_sends_dnscaches_lookups_through_dns_system_and_other_svchosts_their_own_way() -> None:
    scm = FakeScm({"Dnscache": 1234, "BITS": 1300})
    from awg_split_tunnel.dns.route import system_rules

    rules = [*system_rules([f"service:{DNSCACHE_SERVICE}"], "socks"), Rule("svchost.exe", "direct")]
    router = PacketRouter(
        RuleEngine(rules, "direct", Platform.WINDOWS),
        {"socks": TunnelState.DOWN}.get,
        {"socks": TunnelRoute(15001, 15002)},
        own_pids={999},
        exe_of={1234: SVCHOST, 1300: SVCHOST}.get,
        os_lookup=None,
        owns=None,
        service_pids=lambda name: service_pids(name, scm.win_service_get),
    )
    server = ipaddress.ip_address("198.18.0.53").packed
    client = ipaddress.ip_address("198.18.0.1").packed

    def lookup(pid: int, sport: int) -> PacketAction:
        router.connect_event(IPPROTO_UDP, server, 53, pid, 1.0)
        packet = build_packet(client, server, IPPROTO_UDP, sport, 53, b"query")
        return router.route(packet, len(packet), 1.0, lambda: None)

    # socks is down and dns.system blocks: Dnscache's lookup is dropped, never sent directly...
    assert lookup(1234, 50000) is PacketAction.DROP
    assert lookup(1300, 50001) is PacketAction.REINJECT  # ...while BITS's svchost goes its own way


def test_dns_system_on_windows_is_a_rule_for_the_dnscache_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "tunnels:\n  - {id: vpn, type: socks5, server: '198.18.0.1:1080'}\ndns:\n  system: vpn\n"
    config = parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path)
    daemon = Daemon(tmp_path / "config.yaml", serve_api=False, check_privileges=False, handles=tuple)
    monkeypatch.setattr(sys, "platform", "win32")
    (rule,) = daemon._router_rules(config)
    assert rule == Rule("service:Dnscache", "vpn", FallbackPolicy.BLOCK, system_dns=True)
