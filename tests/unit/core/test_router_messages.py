"""The messages between the control plane and the router process cross a pipe intact, and the flows of a
``ConnectionsPage`` become the rows ``connections`` shows."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import multiprocessing
import pickle
import threading
import time
import typing
from types import SimpleNamespace
from typing import Any

import pytest

from awg_split_tunnel.core.packet_router import PacketRouter, TunnelRoute, flow_row
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.router_messages import (
    Alive,
    ChangeDevices,
    ConnectionsPage,
    ConnectionsRequest,
    DeviceStateChanged,
    FlowForgotten,
    FlowRow,
    FlowTunnelled,
    FromRouter,
    Heartbeat,
    Ready,
    RouterStatus,
    SetRoutes,
    SetRules,
    SetTunnelState,
    StartFailed,
    StatusRequest,
    Stop,
    ToRouter,
)
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.daemon import Daemon
from awg_split_tunnel.net.nat import FlowVerdict, NatEntry
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP
from awg_split_tunnel.process.matcher import Platform
from awg_split_tunnel.router.process import RouterProcess, RouterSettings, apply_router_message
from awg_split_tunnel.tunnel_runtimes import RouterReport, report_packet_tunnel

APP = ipaddress.ip_address("198.18.0.1").packed
WEB = ipaddress.ip_address("198.18.0.10").packed
WEB6 = ipaddress.ip_address("2001:db8::10").packed
WG = PacketTunnelRoute(ipaddress.ip_address("10.8.0.2").packed, mtu=1420)


def build_device() -> None:
    """Stands in for a device factory: module-level, so it pickles (by reference)."""


ROW = FlowRow(IPPROTO_TCP, "198.18.0.1", 40000, "198.18.0.10", 443, "TUNNEL", "wg", 100, "/usr/bin/app", 7, 5)

MESSAGES: list[Any] = [
    SetTunnelState("socks", TunnelState.DOWN),
    SetRoutes({"socks": TunnelRoute(1080, 1081), "wg": WG}),
    SetRules((Rule("app-socks", "socks", FallbackPolicy.BLOCK),), "direct", FallbackPolicy.ALLOW_DIRECT),
    ChangeDevices({"socks": TunnelRoute(1080), "wg": WG}, {"wg": build_device}, ("old-wg",)),
    StatusRequest(1),
    ConnectionsRequest(2, 7, 1000, 1000),
    Heartbeat(3),
    Stop(),
    Ready(),
    StartFailed("cannot open the divert handle: permission denied"),
    FlowTunnelled(IPPROTO_UDP, APP + b"\x9c\x40", WEB, 53, APP, 40000, "socks", 100, "/usr/bin/app", True),
    FlowForgotten(IPPROTO_TCP, APP + b"\x9c\x40"),
    RouterStatus(1, {"packets": 12, "packet_tunnels": {"wg": {"rx_bytes": 3}}}, 1, {"wg": 1}),
    ConnectionsPage(2, 7, 1000, 1001, (ROW,)),
    Alive(3),
    DeviceStateChanged("wg", TunnelState.UP, "handshake completed"),
    ROW,
]


def test_every_message_type_is_covered_here() -> None:
    kinds = {*typing.get_args(ToRouter), *typing.get_args(FromRouter), FlowRow}
    assert {type(m) for m in MESSAGES} == kinds


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_pickles_round_trip(message: Any) -> None:
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(message, protocol)) == message


def test_messages_cross_a_multiprocessing_pipe_intact() -> None:
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    with ours, theirs:
        for message in MESSAGES:
            ours.send(message)
            assert theirs.recv() == message


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        ROW.pid = 1  # type: ignore[misc]


def _entry(dst: bytes, verdict: FlowVerdict, tunnel_id: str | None) -> NatEntry:
    entry = NatEntry(IPPROTO_TCP, APP, 40000, dst, 443, verdict, tunnel_id, pid=100, exe="/usr/bin/app")
    entry.packets_out, entry.packets_in = 7, 5
    entry.bytes_out, entry.bytes_in = 900, 3000
    entry.created = time.monotonic() - 30.0  # seen by the router half a minute ago
    return entry


def test_flow_row_names_the_flow_as_the_router_keeps_it() -> None:
    entry = _entry(WEB, FlowVerdict.TUNNEL, "wg")
    assert flow_row(entry) == dataclasses.replace(ROW, bytes_out=900, bytes_in=3000, created=entry.created)


def test_flow_rows_serve_connections_and_status_as_the_daemon_reads_them() -> None:
    rows = (flow_row(_entry(WEB, FlowVerdict.TUNNEL, "wg")), flow_row(_entry(WEB6, FlowVerdict.PASS, None)))
    page: concurrent.futures.Future[ConnectionsPage] = concurrent.futures.Future()
    page.set_result(ConnectionsPage(1, 5, 0, 2, rows))
    router = SimpleNamespace(request_connections=lambda listing, offset: page)
    daemon = SimpleNamespace(_router=router, _dns=None, dataplane="divert")
    answer = asyncio.run(Daemon._api_connections(daemon, {}))  # type: ignore[arg-type]
    for flow in answer["flows"]:
        assert 30.0 <= flow["age"] < 40.0  # the router's clock is the daemon's: monotonic
        flow["age"] = 30.0
    assert answer == {
        "flows": [
            {
                "proto": "tcp",
                "pid": 100,
                "exe": "/usr/bin/app",
                "src": "198.18.0.1:40000",
                "dst": "198.18.0.10:443",
                "route": "tunnel",
                "tunnel": "wg",
                "out": 7,
                "in": 5,
                "bytes_out": 900,
                "bytes_in": 3000,
                "age": 30.0,
            },
            {
                "proto": "tcp",
                "pid": 100,
                "exe": "/usr/bin/app",
                "src": "198.18.0.1:40000",
                "dst": "[2001:db8::10]:443",
                "route": "pass",
                "tunnel": None,
                "out": 7,
                "in": 5,
                "bytes_out": 900,
                "bytes_in": 3000,
                "age": 30.0,
            },
        ],
        "total": 2,
        "next": None,
    }
    status = [{"id": "wg"}, {"id": "socks"}]
    report = RouterReport({"wg": {"rx_bytes": 3, "tx_bytes": 4}}, {"wg": 1})
    for row in status:
        report_packet_tunnel(row, report)
    assert status == [{"id": "wg", "rx_bytes": 3, "tx_bytes": 4, "flows": 1}, {"id": "socks"}]


def test_status_request_is_answered_with_counts_that_reach_the_control_plane() -> None:
    ours, theirs = multiprocessing.Pipe()
    states: dict[str, TunnelState] = {}
    router = PacketRouter(RuleEngine([], "direct", Platform.POSIX), states.get, {})
    assert router.table.add(b"flow", _entry(WEB, FlowVerdict.TUNNEL, "wg"))
    process = RouterProcess(RouterSettings((), "direct", {}, {}), tuple)
    process.attach(ours)

    def router_process() -> None:
        while not isinstance(request := theirs.recv(), StatusRequest):
            pass  # heartbeats
        assert apply_router_message(router, states, theirs, request)

    answering = threading.Thread(target=router_process)
    answering.start()
    status = process.status(timeout=5.0)
    answering.join()
    process.kill()
    theirs.close()
    assert status is not None
    assert (status.flows, status.flows_by_tunnel) == (1, {"wg": 1})
    assert status.stats == dataclasses.asdict(router.stats)
