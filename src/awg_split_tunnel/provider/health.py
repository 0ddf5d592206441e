"""Health of a stream tunnel: a probe loop that reports UP/DOWN through a callback.

A probe connects to the tunnel's server and completes its greeting (SOCKS5 method negotiation, or the
HTTP proxy's CONNECT to a check target / its TCP accept). After a successful probe the connection is kept
open and watched: a server that dies or restarts closes it, so the loss is noticed at once rather than at
the next periodic probe. TCP keepalive on it catches a server that vanishes silently.

Timing (defaults): re-probe every ``interval_up`` (5 s) while UP, every ``interval_down`` (1 s) while
DOWN, and at once after a flow failed to open (``flow_failed``); DOWN after ``failures_to_down`` (2)
failed probes ``confirm_delay`` (0.2 s) apart, each bounded by ``probe_timeout`` (0.9 s). A server
killed is reported DOWN well within 2 s; one that comes back is UP within ``interval_down`` plus a probe.

A failure caused by a shortage on this machine (out of descriptors or buffer memory: EMFILE, ENFILE,
ENOBUFS, ENOMEM anywhere in the exception's chain) says nothing about the server: it neither counts
toward DOWN nor wakes the loop, and is logged at warning at most once per ``LOCAL_ERROR_LOG_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
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
LOCAL_ERROR_LOG_INTERVAL = 60.0
"""Seconds between two warnings about failures caused by a local resource shortage."""

LOCAL_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors of this machine running out of something, not of the tunnel's server."""


def local_resource_error(exc: BaseException | None) -> OSError | None:
    """The OSError in ``exc``'s chain (itself, its causes and contexts) that reports a local resource
    shortage, or None when the failure may be the server's."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in LOCAL_RESOURCE_ERRNOS:
            return exc
        if exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            exc = None if exc.__suppress_context__ else exc.__context__
    return None


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
        self.local_failures = 0
        """Failed probes and flows that were this machine's fault (not counted in ``failures``)."""
        self._local_logged_at: float | None = None
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
        """A flow could not be opened through the tunnel: probe now instead of at the next period.

        Not when the flow failed for want of local resources: a probe would tell nothing new."""
        local = local_resource_error(exc)
        if local is not None:
            self._local_failure(local)
            return
        self._wake.set()

    async def check_once(self) -> bool:
        """One probe, outside the loop; True when the server completed its handshake."""
        pair, _, _ = await self._probe()
        if pair is not None:
            abort_stream(pair[1])
        return pair is not None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        consecutive = 0
        while True:
            started = loop.time()
            self._wake.clear()
            pair, error, local = await self._probe()
            if local is not None:
                # Neither a success nor a failure of the server: try again later, state unchanged.
                self._local_failure(local)
                await self._sleep(max(self.interval_down, self.min_probe_gap), wakeable=True)
                continue
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

    async def _probe(self) -> tuple[StreamPair | None, str, OSError | None]:
        """The open probe connection, or why there is none; the last item is the local resource error
        when the probe failed for want of resources on this machine (then it is no failure at all)."""
        self.probes += 1
        try:
            async with asyncio.timeout(self.probe_timeout):
                pair = await self.provider.probe_connection()
        except TimeoutError:
            self.failures += 1
            kind = self.provider.kind
            return None, f"{kind} did not complete a handshake within {self.probe_timeout:g} s", None
        except (AwgSplitTunnelError, OSError) as exc:
            local = local_resource_error(exc)
            if local is not None:
                return None, str(exc), local
            self.failures += 1
            if isinstance(exc, OSError):
                return None, f"{self.provider.kind}: {describe_os_error(exc)}", None
            return None, str(exc), None
        _enable_keepalive(pair[1])
        return pair, "", None

    def _local_failure(self, exc: OSError) -> None:
        """Count a failure that was this machine's fault; warn at most once per LOCAL_ERROR_LOG_INTERVAL."""
        self.local_failures += 1
        now = time.monotonic()
        if self._local_logged_at is not None and now - self._local_logged_at < LOCAL_ERROR_LOG_INTERVAL:
            return
        self._local_logged_at = now
        log.warning(
            "[Proxy] %s: a connection failed for want of local resources (%s); not held against the "
            "server, state stays %s (%d such failures so far)",
            self.tunnel_id,
            describe_os_error(exc),
            self.state.value.upper() if self.state is not None else "unknown",
            self.local_failures,
        )

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
