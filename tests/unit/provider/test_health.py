"""HealthMonitor: failures caused by a local resource shortage never mark a tunnel DOWN."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

import pytest

from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.provider.health import HealthMonitor, local_resource_error
from awg_split_tunnel.provider.interface import Address, StreamPair, StreamProvider

LOCAL_ERRNOS = [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM]


def wrapped(code: int) -> TunnelError:
    """A TunnelError as connect_to_server raises it: the OSError as its cause."""
    try:
        raise OSError(code, os.strerror(code))
    except OSError as exc:
        try:
            raise TunnelError(f"SOCKS5 198.18.0.20:1080 is unreachable: {os.strerror(code)}") from exc
        except TunnelError as tunnel_error:
            return tunnel_error


class FakeProvider(StreamProvider):
    """Its first probe succeeds (a socketpair stands in for the server), later ones raise ``fail()``."""

    kind = "SOCKS5"

    def __init__(self, fail: Callable[[], BaseException]) -> None:
        self.fail = fail
        self.calls = 0
        self._peers: list[socket.socket] = []

    @property
    def server(self) -> Address | None:
        return ("198.18.0.20", 1080)

    async def open_tcp(self, host: str, port: int) -> StreamPair:
        raise AssertionError("not used")

    async def probe_connection(self) -> StreamPair:
        self.calls += 1
        if self.calls > 1:
            raise self.fail()
        ours, theirs = socket.socketpair()
        self._peers.append(theirs)
        return await asyncio.open_connection(sock=ours)

    def close(self) -> None:
        for peer in self._peers:
            peer.close()


def run_monitor(
    fail: Callable[[], BaseException], probes: int = 8
) -> tuple[HealthMonitor, list[TunnelState]]:
    states: list[TunnelState] = []

    async def scenario() -> HealthMonitor:
        provider = FakeProvider(fail)
        monitor = HealthMonitor(
            "t1",
            provider,
            lambda _id, state, _reason: states.append(state),
            interval_up=0.02,
            interval_down=0.01,
            confirm_delay=0.005,
            min_probe_gap=0.0,
            probe_timeout=0.5,
        )
        monitor.start()
        try:
            while provider.calls < probes:
                await asyncio.sleep(0.005)
            for _ in range(probes):  # a few flows failing the same way
                monitor.flow_failed(fail())
            await asyncio.sleep(0.05)
        finally:
            await monitor.stop()
            provider.close()
        return monitor

    monitor = asyncio.run(asyncio.wait_for(scenario(), 10))
    return monitor, states


@pytest.mark.parametrize("code", LOCAL_ERRNOS, ids=errno.errorcode.get)
def test_local_resource_errors_keep_the_tunnel_up(code: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="awg_split_tunnel.proxy")
    monitor, states = run_monitor(lambda: wrapped(code))
    assert states == [TunnelState.UP]
    assert monitor.state is TunnelState.UP
    assert monitor.failures == 0
    assert monitor.local_failures >= 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per minute, however many failures
    assert os.strerror(code) in warnings[0]


@pytest.mark.parametrize("code", LOCAL_ERRNOS, ids=errno.errorcode.get)
def test_bare_local_os_errors_keep_the_tunnel_up(code: int) -> None:
    monitor, states = run_monitor(lambda: OSError(code, os.strerror(code)))
    assert states == [TunnelState.UP]
    assert monitor.failures == 0


def test_a_refusal_still_marks_the_tunnel_down() -> None:
    monitor, states = run_monitor(lambda: wrapped(errno.ECONNREFUSED), probes=4)
    assert states == [TunnelState.UP, TunnelState.DOWN]
    assert monitor.state is TunnelState.DOWN
    assert "Connection refused" in monitor.reason
    assert monitor.local_failures == 0


def test_local_resource_error_looks_through_the_chain() -> None:
    assert local_resource_error(wrapped(errno.EMFILE)) is not None
    assert local_resource_error(OSError(errno.ENOBUFS, "x")) is not None
    assert local_resource_error(wrapped(errno.ECONNREFUSED)) is None
    assert local_resource_error(TunnelError("refused")) is None
    assert local_resource_error(None) is None
