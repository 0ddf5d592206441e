"""EventBus: a slow or failing subscriber cannot block or break the publisher or the other subscribers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from awg_split_tunnel.core import events
from awg_split_tunnel.core.events import ConfigChanged, Event, EventBus, TunnelStateChanged
from awg_split_tunnel.core.policy import TunnelState


@dataclass(frozen=True, slots=True)
class Tick(Event):
    n: int


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def test_a_slow_subscriber_neither_blocks_publish_nor_delays_the_others() -> None:
    async def scenario() -> None:
        bus = EventBus()
        release = asyncio.Event()
        slow_seen: list[int] = []
        fast_seen: list[int] = []

        async def slow(event: Tick) -> None:
            await release.wait()
            slow_seen.append(event.n)

        bus.subscribe(Tick, slow)
        bus.subscribe(Tick, lambda e: fast_seen.append(e.n))
        await bus.start()

        started = time.monotonic()
        for n in range(1000):
            bus.publish(Tick(n))
        assert time.monotonic() - started < 1.0
        await until(lambda: len(fast_seen) == 1000)
        assert slow_seen == []

        release.set()
        await until(lambda: len(slow_seen) == 1000)
        assert slow_seen == list(range(1000))  # it catches up, in order
        await bus.stop()

    run(scenario)


def test_a_failing_subscriber_is_logged_and_keeps_receiving(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        bus = EventBus()
        attempts: list[int] = []
        others: list[int] = []

        def failing(event: Tick) -> None:
            attempts.append(event.n)
            raise RuntimeError("handler bug")

        async def failing_async(event: Tick) -> None:
            raise ValueError("async handler bug")

        bus.subscribe(Tick, failing)
        bus.subscribe(Tick, failing_async)
        bus.subscribe(Tick, lambda e: others.append(e.n))
        await bus.start()
        for n in range(3):
            bus.publish(Tick(n))  # must not raise
        await until(lambda: len(attempts) == 3 and len(others) == 3)
        await bus.stop()

    with caplog.at_level(logging.ERROR, logger="awg_split_tunnel.core"):
        run(scenario)
    assert sum("handler bug" in (r.exc_text or "") for r in caplog.records) >= 3
    assert all(r.getMessage().startswith("[Core]") for r in caplog.records)


def test_a_handler_whose_await_is_cancelled_keeps_its_subscription() -> None:
    """A handler may see CancelledError from something it awaited; that must not end its subscription."""

    async def scenario() -> None:
        bus = EventBus()
        seen: list[int] = []

        async def handler(event: Tick) -> None:
            seen.append(event.n)
            if event.n == 0:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                future.cancel()
                await future

        bus.subscribe(Tick, handler)
        await bus.start()
        bus.publish(Tick(0))
        bus.publish(Tick(1))
        await until(lambda: seen == [0, 1])
        await bus.stop()

    run(scenario)


def test_subscribers_get_only_their_event_type() -> None:
    async def scenario() -> None:
        bus = EventBus()
        states: list[Event] = []
        everything: list[Event] = []
        bus.subscribe(TunnelStateChanged, states.append)
        bus.subscribe(Event, everything.append)
        await bus.start()
        change = TunnelStateChanged("wg", TunnelState.DOWN, TunnelState.UP, "", 1.0)
        bus.publish(ConfigChanged("reload"))
        bus.publish(change)
        await until(lambda: len(everything) == 2)
        assert states == [change]
        await bus.stop()

    run(scenario)


def test_events_published_before_start_are_delivered_after() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.subscribe(Tick, lambda e: seen.append(e.n))
    bus.publish(Tick(1))
    bus.publish(Tick(2))

    async def scenario() -> None:
        await bus.start()
        await until(lambda: seen == [1, 2])
        await bus.stop()

    run(scenario)


def test_publish_from_another_thread() -> None:
    async def scenario() -> None:
        bus = EventBus()
        seen: list[int] = []
        bus.subscribe(Tick, lambda e: seen.append(e.n))
        await bus.start()
        thread = threading.Thread(target=lambda: [bus.publish(Tick(n)) for n in range(100)])
        thread.start()
        await until(lambda: len(seen) == 100)
        thread.join()
        assert seen == list(range(100))
        await bus.stop()

    run(scenario)


def test_a_subscriber_that_falls_too_far_behind_loses_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "QUEUE_LIMIT", 10)

    async def scenario() -> None:
        bus = EventBus()
        release = asyncio.Event()
        seen: list[int] = []

        async def slow(event: Tick) -> None:
            await release.wait()
            seen.append(event.n)

        bus.subscribe(Tick, slow)
        await bus.start()
        bus.publish(Tick(0))
        await asyncio.sleep(0)  # the handler takes event 0 and waits
        for n in range(1, 26):
            bus.publish(Tick(n))
        release.set()
        await until(lambda: seen[-1:] == [25])
        assert seen == [0, *range(16, 26)]
        assert [s.dropped for s in bus._subscribers] == [15]
        await bus.stop()

    run(scenario)


def test_publish_after_the_loop_is_gone_does_not_raise_and_a_new_loop_resumes() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.subscribe(Tick, lambda e: seen.append(e.n))

    async def first() -> None:
        await bus.start()
        bus.publish(Tick(1))
        await until(lambda: seen == [1])
        # No stop(): the loop ends under the bus.

    run(first)
    bus.publish(Tick(2))  # the bus's loop is closed now

    async def second() -> None:
        await bus.start()
        bus.publish(Tick(3))
        await until(lambda: 3 in seen)
        await bus.stop()

    run(second)
    assert seen == [1, 2, 3]


def test_settled_waits_until_every_published_event_was_handled() -> None:
    # The daemon waits for this before it says a tunnel is UP: the router must have been told first.
    handled: list[str] = []

    async def slow(event: TunnelStateChanged) -> None:
        await asyncio.sleep(0.05)
        handled.append(event.tunnel_id)

    async def main() -> None:
        bus = EventBus()
        bus.subscribe(TunnelStateChanged, slow)
        await bus.start()
        for tunnel in ("a", "b", "c"):
            bus.publish(TunnelStateChanged(tunnel, TunnelState.CONNECTING, TunnelState.UP, "probe", 0.0))
        await asyncio.wait_for(bus.settled(), 5.0)
        assert handled == ["a", "b", "c"]
        await bus.stop()

    asyncio.run(main())
