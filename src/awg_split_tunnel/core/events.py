"""EventBus: typed publish/subscribe between the levels.

``publish`` never blocks and never raises: each subscriber has its own queue drained by its own task, so a
slow subscriber only delays itself and a failing one is logged and keeps receiving. Events published before
an event loop runs are delivered once ``start()`` is awaited inside one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from awg_split_tunnel.core.policy import TunnelState

log = logging.getLogger("awg_split_tunnel.core")

QUEUE_LIMIT = 10_000
"""Events a subscriber may fall behind by before the oldest are dropped (and counted)."""


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event on the bus."""


@dataclass(frozen=True, slots=True)
class ConfigChanged(Event):
    """The configuration changed; ``what`` is e.g. ``"rule.add"``, ``"tunnel.remove"``, ``"reload"``."""

    what: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TunnelStateChanged(Event):
    tunnel_id: str
    old: TunnelState
    new: TunnelState
    reason: str
    at: float


E = TypeVar("E", bound=Event)
Handler = Callable[[Any], Awaitable[None] | None]


class _Subscriber:
    __slots__ = ("dropped", "event_type", "handler", "queue", "task")

    def __init__(self, event_type: type[Event], handler: Handler) -> None:
        self.event_type = event_type
        self.handler = handler
        self.queue: asyncio.Queue[Event] | None = None
        self.task: asyncio.Task[None] | None = None
        self.dropped = 0


class EventBus:
    """Typed pub/sub. Handlers may be plain functions or coroutines."""

    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []
        self._pending: list[Event] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, event_type: type[E], handler: Callable[[E], Awaitable[None] | None]) -> None:
        sub = _Subscriber(event_type, handler)
        self._subscribers.append(sub)
        if self._loop is not None:
            self._start_subscriber(sub)

    async def start(self) -> None:
        """Bind the bus to the running loop and deliver events published before it."""
        self._loop = asyncio.get_running_loop()
        for sub in self._subscribers:
            # A task that is done belonged to a loop that ended without stop().
            if sub.task is None or sub.task.done():
                self._start_subscriber(sub)
        pending, self._pending = self._pending, []
        for event in pending:
            self.publish(event)

    async def stop(self) -> None:
        tasks = [s.task for s in self._subscribers if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self._subscribers:
            s.task = None
            s.queue = None
        self._loop = None

    async def settled(self) -> None:
        """Until every event published so far has been handled (each subscriber's queue drained)."""
        for sub in list(self._subscribers):
            if sub.queue is not None:
                await sub.queue.join()

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber of its type; never blocks, never raises."""
        loop = self._loop
        if loop is None:
            self._keep_pending(event)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(event)
            return
        try:
            loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:
            # The loop was closed without stop(): keep the event for the next start().
            self._loop = None
            self._keep_pending(event)

    def _keep_pending(self, event: Event) -> None:
        if len(self._pending) < QUEUE_LIMIT:
            self._pending.append(event)

    def _deliver(self, event: Event) -> None:
        for sub in self._subscribers:
            if sub.queue is None or not isinstance(event, sub.event_type):
                continue
            if sub.queue.full():
                sub.queue.get_nowait()
                sub.dropped += 1
            sub.queue.put_nowait(event)

    def _start_subscriber(self, sub: _Subscriber) -> None:
        old, sub.queue = sub.queue, asyncio.Queue(QUEUE_LIMIT)
        # Events still queued for a loop that ended without stop() are carried over.
        while old is not None and not old.empty():
            sub.queue.put_nowait(old.get_nowait())
        sub.task = asyncio.get_running_loop().create_task(self._run(sub))

    @staticmethod
    async def _run(sub: _Subscriber) -> None:
        assert sub.queue is not None
        while True:
            event = await sub.queue.get()
            try:
                result = sub.handler(event)
                if isinstance(result, Awaitable):
                    await result
            except asyncio.CancelledError:
                # Only our own cancellation (stop()) ends the subscription; a CancelledError the handler
                # let out of something it awaited is a failure of that handler like any other.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                log.error("[Core] event handler %r was cancelled on %r", sub.handler, event)
            except Exception:
                log.exception("[Core] event handler %r failed on %r", sub.handler, event)
            finally:
                sub.queue.task_done()
