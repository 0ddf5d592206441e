"""Health of a stream tunnel: a probe loop that reports UP/DOWN through a callback.

A probe connects to the tunnel's server and completes its greeting (SOCKS5 method negotiation, or the
HTTP proxy's CONNECT to a check target / its TCP accept). After a successful probe the connection is kept
open and watched: a server that dies or restarts closes it, so the loss is noticed at once rather than at
the next periodic probe. TCP keepalive on it catches a server that vanishes silently.

Timing (defaults): re-probe every ``interval_up`` (5 s) while UP, every ``interval_down`` (1 s) while
DOWN, and at once after a flow failed to open (``flow_failed``); DOWN after ``failures_to_down`` (2)
failed probes ``confirm_delay`` (0.2 s) apart, each bounded by ``probe_timeout`` (0.9 s). A server
killed is reported DOWN well within 2 s; one that comes back is UP within ``interval_down`` plus a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.errors import AwgSplitTunnelError
from awg_split_tunnel.provider.interface import StreamPair, StreamProvider, abort_stream, describe_os_error

log = logging.getLogger("awg_split_tunnel.proxy")

StateCallback = Callable[[str, TunnelState, str], None]
"""``on_state(tunnel_id, state, reason)``; e.g. ``TunnelRegistry.set_state``."""

PROBE_INTERVAL_UP = 5.0
PROBE_INTERVAL_DOWN = 1.0
PROBE_TIMEOUT = 0.9
CONFIRM_DELAY = 0.2
FAILURES_TO_DOWN = 2
MIN_PROBE_GAP = 0.5
"""No two probes closer than this, however often flows fail or the server drops the held connection."""


class _HoldEnded(Exception):
    """The held probe connection broke with an error (not a clean close)."""


class HealthMonitor:
    """Periodic probing of one stream tunnel's server; reports state changes to ``on_state``."""

    def __init__(
        self,
        tunnel_id: str,
        provider: StreamProvider,
        on_state: StateCallback,
        *,
        interval_up: float = PROBE_INTERVAL_UP,
        interval_down: float = PROBE_INTERVAL_DOWN,
        probe_timeout: float = PROBE_TIMEOUT,
        confirm_delay: float = CONFIRM_DELAY,
        failures_to_down: int = FAILURES_TO_DOWN,
        min_probe_gap: float = MIN_PROBE_GAP,
    ) -> None:
        self.tunnel_id = tunnel_id
        self.provider = provider
        self.interval_up = interval_up
        self.interval_down = interval_down
        self.probe_timeout = probe_timeout
        self.confirm_delay = confirm_delay
        self.failures_to_down = max(failures_to_down, 1)
        self.min_probe_gap = min_probe_gap
        self.state: TunnelState | None = None
        self.reason = ""
        self.probes = 0
        self.failures = 0
        self._on_state = on_state
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing (inside a running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"health-{self.tunnel_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def flow_failed(self, exc: BaseException | None = None) -> None:
        """A flow could not be opened through the tunnel: probe now instead of at the next period."""
        self._wake.set()

    async def check_once(self) -> bool:
        """One probe, outside the loop; True when the server completed its handshake."""
        pair, _ = await self._probe()
        if pair is not None:
            abort_stream(pair[1])
        return pair is not None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        consecutive = 0
        while True:
            started = loop.time()
            self._wake.clear()
            pair, error = await self._probe()
            if pair is not None:
                consecutive = 0
                self._report(TunnelState.UP, "server completed the handshake")
                try:
                    await self._hold(pair)
                except _HoldEnded as exc:
                    consecutive = 1  # counts as the first failure; one more probe confirms
                    error = str(exc)
                finally:
                    abort_stream(pair[1])
                gap = self.min_probe_gap - (loop.time() - started)
                delay = gap if consecutive == 0 else max(gap, self.confirm_delay)
                await self._sleep(max(delay, 0.0), wakeable=False)
                continue
            consecutive += 1
            if consecutive >= self.failures_to_down:
                self._report(TunnelState.DOWN, error)
                await self._sleep(self.interval_down - (loop.time() - started), wakeable=True)
            else:
                await self._sleep(self.confirm_delay, wakeable=False)

    async def _probe(self) -> tuple[StreamPair | None, str]:
        self.probes += 1
        try:
            async with asyncio.timeout(self.probe_timeout):
                pair = await self.provider.probe_connection()
        except TimeoutError:
            self.failures += 1
            return None, f"{self.provider.kind} did not complete a handshake within {self.probe_timeout:g} s"
        except AwgSplitTunnelError as exc:
            self.failures += 1
            return None, str(exc)
        except OSError as exc:
            self.failures += 1
            return None, f"{self.provider.kind}: {describe_os_error(exc)}"
        _enable_keepalive(pair[1])
        return pair, ""

    async def _hold(self, pair: StreamPair) -> None:
        """Watch the probe connection until it closes, ``interval_up`` passes, or a flow failure."""
        reader, _ = pair
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            async with asyncio.timeout(self.interval_up):
                while True:
                    read = asyncio.ensure_future(reader.read(4096))
                    done, _ = await asyncio.wait({read, wake}, return_when=asyncio.FIRST_COMPLETED)
                    if read not in done:
                        read.cancel()
                        return  # woken by a failed flow: re-probe now
                    try:
                        data = read.result()
                    except OSError as exc:
                        raise _HoldEnded(
                            f"{self.provider.kind} connection lost: {describe_os_error(exc)}"
                        ) from exc
                    if not data:
                        return  # closed by the server: a restart, an idle timeout, or death; re-probe
        except TimeoutError:
            return
        finally:
            wake.cancel()

    async def _sleep(self, seconds: float, *, wakeable: bool) -> None:
        if seconds <= 0:
            return
        if not wakeable:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    def _report(self, state: TunnelState, reason: str) -> None:
        if state is self.state:
            return
        self.state = state
        self.reason = reason
        level = logging.INFO if state is TunnelState.UP else logging.WARNING
        log.log(level, "[Proxy] %s is %s: %s", self.tunnel_id, state.value.upper(), reason)
        try:
            self._on_state(self.tunnel_id, state, reason)
        except Exception:
            log.exception("[Proxy] %s: state callback raised", self.tunnel_id)


def _enable_keepalive(writer: asyncio.StreamWriter) -> None:
    """Kernel keepalive on the held connection: a server that vanishes without a FIN is noticed in ~2 s."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 1)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)
