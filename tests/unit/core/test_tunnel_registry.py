"""TunnelRegistry: states with when and why, change events, counters, and the status snapshot."""

from __future__ import annotations

import asyncio
import json

import pytest

from awg_split_tunnel.core.events import Event, EventBus, TunnelStateChanged
from awg_split_tunnel.core.policy import TunnelState, TunnelType
from awg_split_tunnel.core.tunnel_registry import TunnelRegistry, TunnelStats


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingBus(EventBus):
    """An EventBus that also keeps what was published, for synchronous assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[Event] = []

    def publish(self, event: Event) -> None:
        self.published.append(event)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
def registry(bus: RecordingBus, clock: FakeClock) -> TunnelRegistry:
    registry = TunnelRegistry(bus, clock=clock)
    registry.register("nl-awg", TunnelType.AMNEZIAWG)
    registry.register("office", TunnelType.SOCKS5)
    return registry


def test_a_new_tunnel_is_down(registry: TunnelRegistry) -> None:
    assert registry.state("nl-awg") is TunnelState.DOWN
    assert registry.ids() == ["nl-awg", "office"]
    assert "office" in registry


def test_unknown_tunnels(registry: TunnelRegistry) -> None:
    assert registry.state("nope") is None
    assert registry.info("nope") is None
    with pytest.raises(KeyError, match="nope"):
        registry.set_state("nope", TunnelState.UP)


def test_registering_an_id_twice_is_refused(registry: TunnelRegistry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register("office", TunnelType.HTTP)


def test_a_state_change_is_recorded_and_published(
    registry: TunnelRegistry, bus: RecordingBus, clock: FakeClock
) -> None:
    clock.now = 1005.0
    assert registry.set_state("nl-awg", TunnelState.UP, "handshake complete") is True
    info = registry.info("nl-awg")
    assert info is not None
    assert (info.state, info.since, info.reason) == (TunnelState.UP, 1005.0, "handshake complete")
    assert bus.published == [
        TunnelStateChanged("nl-awg", TunnelState.DOWN, TunnelState.UP, "handshake complete", 1005.0)
    ]


def test_setting_the_same_state_again_publishes_nothing_and_keeps_since(
    registry: TunnelRegistry, bus: RecordingBus, clock: FakeClock
) -> None:
    registry.set_state("nl-awg", TunnelState.UP, "first")
    clock.now += 30
    assert registry.set_state("nl-awg", TunnelState.UP, "again") is False
    info = registry.info("nl-awg")
    assert info is not None
    assert (info.since, info.reason) == (1000.0, "first")
    assert len(bus.published) == 1


def test_unregistering_an_up_tunnel_reports_it_down_first(
    registry: TunnelRegistry, bus: RecordingBus
) -> None:
    registry.set_state("office", TunnelState.UP)
    registry.unregister("office")
    assert registry.state("office") is None
    last = bus.published[-1]
    assert isinstance(last, TunnelStateChanged)
    assert (last.tunnel_id, last.new, last.reason) == ("office", TunnelState.DOWN, "removed")
    registry.unregister("office")  # twice is harmless


def test_traffic_counters(registry: TunnelRegistry, clock: FakeClock) -> None:
    registry.add_traffic("nl-awg", rx=1500, tx=100, rx_packets=1, tx_packets=1)
    registry.add_traffic("nl-awg", rx=500, rx_packets=1)
    registry.set_last_handshake("nl-awg", 990.0)
    registry.flow_opened("nl-awg")
    registry.flow_opened("nl-awg")
    registry.flow_closed("nl-awg")
    info = registry.info("nl-awg")
    assert info is not None
    assert info.stats == TunnelStats(
        rx_bytes=2000, tx_bytes=100, rx_packets=2, tx_packets=1, last_handshake=990.0, flows=1
    )
    office = registry.info("office")
    assert office is not None and office.stats == TunnelStats()


def test_info_is_a_copy(registry: TunnelRegistry) -> None:
    before = registry.info("office")
    registry.add_traffic("office", rx=10)
    assert before is not None and before.stats.rx_bytes == 0


def test_counters_of_a_removed_tunnel_are_ignored(registry: TunnelRegistry) -> None:
    registry.unregister("office")
    registry.add_traffic("office", rx=10)
    registry.flow_opened("office")
    registry.set_last_handshake("office", 1.0)
    assert registry.info("office") is None


def test_flows_never_go_negative(registry: TunnelRegistry) -> None:
    registry.flow_closed("office")
    info = registry.info("office")
    assert info is not None and info.stats.flows == 0


def test_snapshot_is_json_ready_with_ages(registry: TunnelRegistry, clock: FakeClock) -> None:
    registry.set_state("nl-awg", TunnelState.UP, "handshake complete")
    registry.set_last_handshake("nl-awg", 1000.0)
    registry.add_traffic("nl-awg", rx=42, tx=7, rx_packets=1, tx_packets=1)
    clock.now = 1012.5
    rows = json.loads(json.dumps(registry.snapshot()))
    assert rows == [
        {
            "id": "nl-awg",
            "type": "amneziawg",
            "state": "up",
            "reason": "handshake complete",
            "state_age": 12.5,
            "handshake_age": 12.5,
            "rx_bytes": 42,
            "tx_bytes": 7,
            "rx_packets": 1,
            "tx_packets": 1,
            "last_handshake": 1000.0,
            "flows": 0,
        },
        {
            "id": "office",
            "type": "socks5",
            "state": "down",
            "reason": "registered",
            "state_age": 12.5,
            "handshake_age": None,
            "rx_bytes": 0,
            "tx_bytes": 0,
            "rx_packets": 0,
            "tx_packets": 0,
            "last_handshake": None,
            "flows": 0,
        },
    ]


def test_subscribers_on_a_real_bus_see_each_change_once() -> None:
    async def scenario() -> list[TunnelStateChanged]:
        bus = EventBus()
        seen: list[TunnelStateChanged] = []
        bus.subscribe(TunnelStateChanged, seen.append)
        await bus.start()
        registry = TunnelRegistry(bus)
        registry.register("wg", TunnelType.WIREGUARD)
        registry.set_state("wg", TunnelState.CONNECTING)
        registry.set_state("wg", TunnelState.CONNECTING)
        registry.set_state("wg", TunnelState.UP)
        for _ in range(5):
            await asyncio.sleep(0)
        await bus.stop()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert [(e.old, e.new) for e in seen] == [
        (TunnelState.DOWN, TunnelState.CONNECTING),
        (TunnelState.CONNECTING, TunnelState.UP),
    ]
