"""The daemon and its router process: one writer on the pipe, a daemon loop that a stopped router process
never blocks, a watchdog that fails closed, `status` from flow counts and `connections` by pages."""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from awg_split_tunnel.core.packet_router import PacketRouter
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.router_messages import (
    Alive,
    ConnectionsRequest,
    Heartbeat,
    Ready,
    SetRules,
    StatusRequest,
    Stop,
)
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.daemon import Daemon
from awg_split_tunnel.net.nat import FlowVerdict, NatEntry
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP
from awg_split_tunnel.process.matcher import Platform
from awg_split_tunnel.router.process import (
    WATCHDOG_DEADLINE,
    RouterProcess,
    RouterSettings,
    apply_router_message,
)

from test_daemon_apply_config import config, wg_tunnel  # isort: skip

APP = bytes([198, 18, 0, 1])
WEB = bytes([198, 18, 0, 10])
MANY_RULES = "".join(
    f"\n  - process: app-{i:05d}-{'x' * 40}\n    tunnel: wg\n    fallback: block" for i in range(800)
)


def _router_body(settings: RouterSettings, open_handles: Any, conn: Any, flows: int = 200_000) -> None:
    """A router process body that answers what every data path answers, with ``flows`` flows (a quarter
    of them through ``wg``); module-level, so it pickles into the spawned process."""
    states: dict[str, TunnelState] = {}
    router = PacketRouter(RuleEngine([], "direct", Platform.POSIX), states.get, {})
    for i in range(flows):
        proto, port = IPPROTO_TCP if i % 2 else IPPROTO_UDP, 443 + i // 50_000
        entry = NatEntry(proto, APP, 1024 + i % 50_000, WEB, port, FlowVerdict.PASS)
        entry.tunnel_id = "wg" if i % 4 == 0 else None
        router.table.add(i.to_bytes(4, "big"), entry)
    from awg_split_tunnel.router.reports import FlowListings

    listings = FlowListings(router)
    conn.send(Ready())
    while not isinstance(message := conn.recv(), Stop):
        apply_router_message(router, states, conn, message, listings)


def _started_router(flows: int = 200_000) -> RouterProcess:
    body = functools.partial(_router_body, flows=flows)
    router = RouterProcess(RouterSettings((), "direct", {}, {}), tuple, serve=body)
    router.start(timeout=60)
    return router


def _run_in_thread(scenario: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    """Run ``scenario`` on an event loop in a thread; fail (not hang) if it does not finish in time."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(asyncio.run(scenario()))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the daemon's event loop is blocked (on the router process's pipe)"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def test_every_sender_only_queues_and_one_writer_keeps_each_message_whole() -> None:
    ours, theirs = __import__("multiprocessing").Pipe()
    process = RouterProcess(RouterSettings((), "direct", {}, {}), tuple)
    process.heartbeat_interval = 3600  # only the test's messages in the pipe
    process.attach(ours)
    rules = tuple(Rule(f"app-{i}-{'x' * 60}", "wg", FallbackPolicy.BLOCK) for i in range(300))

    def send(worker: int) -> None:
        for n in range(20):
            process.set_rules(rules, f"w{worker}-{n}")

    # Nobody reads the pipe (as when the router process is stopped): ~20 KiB per message fills it after a
    # few, yet every caller returns at once.
    workers = [threading.Thread(target=send, args=(w,), daemon=True) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert not any(w.is_alive() for w in workers), "a caller blocked on the router process's pipe"
    received = [theirs.recv() for _ in range(80)]
    assert all(isinstance(m, SetRules) and m.rules == rules for m in received)
    for w in range(4):
        assert [m.default for m in received if m.default.startswith(f"w{w}-")] == [
            f"w{w}-{n}" for n in range(20)
        ]
    process.kill()
    theirs.close()


def test_a_stopped_router_process_never_blocks_the_daemons_loop_and_the_watchdog_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("awg_split_tunnel.tunnel_runtimes.PACKET_TUNNEL_UP_WAIT", 0.1)
    monkeypatch.setattr("awg_split_tunnel.daemon.ROUTER_ANSWER_TIMEOUT", 0.2)  # status gives up sooner
    router = _started_router(flows=1000)
    held: list[str] = []

    class Holding:
        def close(self) -> None:
            held.append("released")

    def hold_packets() -> Holding:
        held.append("held")
        return Holding()

    daemon = Daemon(
        tmp_path / "config.yaml",
        serve_api=False,
        check_privileges=False,
        handles=tuple,
        hold_packets=hold_packets,
    )
    daemon._started = True
    router.on_unresponsive = daemon._router_unresponsive
    router.on_exit = daemon._router_died
    first, many = config(tmp_path, wg_tunnel()), config(tmp_path, wg_tunnel(), MANY_RULES)
    daemon._config = first

    async def scenario() -> tuple[float, dict[str, Any], list[str]]:
        loop = asyncio.get_running_loop()
        daemon._event_loop = loop
        daemon._router = router
        await daemon._apply_config(config(tmp_path), first)
        assert (await daemon._api_status({}))["router"]["flows"] == 1000
        longest = 0.0

        async def probe() -> None:
            nonlocal longest
            while True:
                before = loop.time()
                await asyncio.sleep(0.005)
                longest = max(longest, loop.time() - before - 0.005)

        probing = loop.create_task(probe())
        router.watchdog_deadline = 30.0  # first what the daemon does meanwhile, then the watchdog
        os.kill(router.pid or 0, signal.SIGSTOP)
        try:
            for n in range(8):  # large rules updates, each ~80 KiB: the pipe holds 64 KiB
                await daemon._apply_config(*((first, many) if n % 2 == 0 else (many, first)))
                await daemon._api_status({})
                await daemon._api_tunnel({"id": "wg", "action": "down" if n % 2 == 0 else "up"})
            await asyncio.sleep(0)
            stall = longest
            router.watchdog_deadline = WATCHDOG_DEADLINE
            # The watchdog: no answer for WATCHDOG_DEADLINE, then the router process is killed, packets held.
            for _ in range(100):
                if daemon.failed_closed is not None and not held[1:]:
                    break
                await asyncio.sleep(0.05)
            status = await daemon._api_status({})
        finally:
            probing.cancel()
        return stall, status, list(held)

    try:
        stall, status, holding = _run_in_thread(scenario, 60)
    finally:
        if router.pid is not None:
            os.kill(router.pid, signal.SIGCONT)
        router.kill()
    assert stall < 0.1, f"the daemon's loop stalled {stall * 1000:.0f} ms"
    assert holding == ["held"]
    assert "stopped answering" in status["failed_closed"]
    assert not router.alive, "the frozen router process is killed"
    assert daemon.exit_code == 1


def test_status_counts_flows_without_rows_and_connections_pages_200k_flows() -> None:
    router = _started_router()
    try:
        status = router.status(timeout=10)
        assert status is not None
        assert (status.flows, status.flows_by_tunnel) == (200_000, {"wg": 50_000})
        assert len(pickle.dumps(status)) < 4096, "status carries counts, not rows"
        rows = router.connections(timeout=10)
        assert rows is not None and len(rows) == 200_000
        assert len({(r.proto, r.app_port, r.tunnel) for r in rows[:8]}) == 8
    finally:
        router.stop()


def test_flow_counts_follow_adds_replacements_and_removals() -> None:
    states: dict[str, TunnelState] = {}
    router = PacketRouter(RuleEngine([], "direct", Platform.POSIX), states.get, {})
    entries = [
        NatEntry(IPPROTO_TCP, APP, 1000 + i, WEB, 443, FlowVerdict.PASS, "wg" if i % 2 else None)
        for i in range(6)
    ]
    for i, entry in enumerate(entries):
        router.table.add(bytes([i]), entry)
    assert router.flow_counts() == (6, {"wg": 3})
    replacement = NatEntry(IPPROTO_TCP, APP, 1001, WEB, 443, FlowVerdict.DROP, "socks")
    router.table.add(bytes([1]), replacement)  # the port reused by another connection
    router.table.add(bytes([1]), replacement)  # the same entry again counts once
    assert router.flow_counts() == (6, {"wg": 2, "socks": 1})
    for entry in [*entries, replacement]:
        router.table.remove(entry)
    router.table.remove(entries[3])  # twice: no effect
    assert router.flow_counts() == (0, {})


def test_heartbeat_is_answered_and_unknown_listing_gets_an_empty_page() -> None:
    ours, theirs = __import__("multiprocessing").Pipe()
    states: dict[str, TunnelState] = {}
    router = PacketRouter(RuleEngine([], "direct", Platform.POSIX), states.get, {})
    from awg_split_tunnel.router.reports import FlowListings

    listings = FlowListings(router)
    assert apply_router_message(router, states, theirs, Heartbeat(5), listings)
    assert ours.recv() == Alive(5)
    assert apply_router_message(
        router, states, theirs, ConnectionsRequest(9, listing=42, offset=1000), listings
    )
    page = ours.recv()
    assert (page.request_id, page.listing, page.flows, page.done) == (9, 0, (), True)
    assert apply_router_message(router, states, theirs, StatusRequest(3), listings)
    assert ours.recv().flows == 0
    ours.close()
    theirs.close()
    time.sleep(0)


def test_cli_connections_retrieves_200k_flows_page_by_page_through_the_control_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    from awg_split_tunnel.api.control import ControlServer
    from awg_split_tunnel.cli import app

    router = _started_router()
    daemon = Daemon(tmp_path / "config.yaml", serve_api=False, check_privileges=False, handles=tuple)
    daemon._router = router
    answers: list[int] = []
    ready, done = threading.Event(), threading.Event()
    socket_path = tmp_path / "control.sock"

    async def connections(request: Any) -> Any:
        result = await daemon._api_connections(request)
        answers.append(len(json.dumps(result)))
        return result

    async def serve() -> None:
        server = ControlServer({"connections": connections}, socket_path)
        await server.start()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await server.stop()

    serving = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    serving.start()
    try:
        assert ready.wait(10)
        monkeypatch.setenv("AWG_SPLIT_TUNNEL_CONTROL", str(socket_path))
        result = CliRunner().invoke(app, ["connections", "--json"])
        assert result.exit_code == 0, result.output[-2000:]
        flows = json.loads(result.output)["flows"]
        assert len(flows) == 200_000
        assert len({(f["proto"], f["src"], f["dst"]) for f in flows}) == 200_000, "each flow once"
        assert max(answers) < 1024 * 1024, "each page is bounded"
        table = CliRunner().invoke(app, ["connections"])
        assert table.exit_code == 0, table.output[-2000:]
        assert table.output.count("198.18.0.10:") == 200_000
    finally:
        done.set()
        serving.join(10)
        router.stop()


def test_nat_lookup_finds_a_flow_whose_announcement_is_still_in_the_pipe() -> None:
    from awg_split_tunnel.core.router_messages import FlowTunnelled

    ours, theirs = __import__("multiprocessing").Pipe()
    process = RouterProcess(RouterSettings((), "direct", {}, {}), tuple)
    process.heartbeat_interval = 3600
    process.attach(ours)
    found = []
    for port in range(40000, 40050):
        key = WEB + port.to_bytes(2, "big")
        theirs.send(FlowTunnelled(IPPROTO_TCP, key, WEB, 443, APP, port, "socks", 7, "/usr/bin/app", True))
        entry = process.nat_lookup("tcp", "198.18.0.10", port)  # at once, as a proxy that just accepted
        found.append(entry is not None and entry.orig_dst_port == 443 and entry.app_port == port)
    process.kill()
    theirs.close()
    assert all(found)


def test_nat_lookup_waits_for_an_announcement_the_reader_has_taken_off_the_pipe_but_not_applied() -> None:
    # The router process announces a flow, then injects its first packet; the proxy accepts it and
    # looks the flow up. If the pipe's reader has just read the announcement (the pipe is empty again)
    # but not yet counted or applied it — it was descheduled while unpickling, on a loaded machine —
    # the lookup must wait for it, not miss at once (a UDP app's only datagram, dropped).
    import multiprocessing
    import threading

    from awg_split_tunnel.core.router_messages import FlowTunnelled

    ours, theirs = multiprocessing.Pipe()
    reading, release = threading.Event(), threading.Event()

    class SlowReceive:
        """The real connection, whose ``recv`` stalls after taking the message off the pipe."""

        def __getattr__(self, name: str) -> object:
            return getattr(ours, name)

        def recv(self) -> object:
            message = ours.recv()
            reading.set()
            release.wait(5)
            return message

    process = RouterProcess(RouterSettings((), "direct", {}, {}), tuple)
    process.heartbeat_interval = 3600
    process.attach(SlowReceive())
    key = WEB + (40000).to_bytes(2, "big")
    theirs.send(FlowTunnelled(IPPROTO_TCP, key, WEB, 443, APP, 40000, "socks", 7, "/usr/bin/app", True))
    assert reading.wait(5)
    assert not ours.poll(0)  # the announcement is off the pipe
    threading.Timer(0.1, release.set).start()
    entry = process.nat_lookup("tcp", "198.18.0.10", 40000)
    process.kill()
    theirs.close()
    assert entry is not None and entry.orig_dst_port == 443


def test_tunnels_reported_down_while_the_router_process_stops_are_no_error() -> None:
    # The router process stops its devices as it stops; their DOWN reaches the daemon's handlers while
    # ``stop`` is still under way, and telling the stopping router must not raise (an ERROR traceback in
    # the log of every clean stop).
    router = _started_router(flows=0)
    router.stop()
    router.tunnel_state_changed("wg", TunnelState.DOWN)
