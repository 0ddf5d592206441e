"""TunnelRegistry: the tunnels that exist, their states, and their traffic counters.

Providers report state changes (``set_state``) and traffic (``add_traffic``, ``set_last_handshake``,
``flow_opened``/``flow_closed``); the router asks ``state`` for each new flow; the status command reads
``snapshot``. A real state change is published on the EventBus as ``TunnelStateChanged``. The registry
belongs to the control-plane event loop: call it from that loop's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from awg_split_tunnel.core.events import EventBus, TunnelStateChanged
from awg_split_tunnel.core.policy import TunnelState, TunnelType

REMOVED_REASON = "removed"


@dataclass(slots=True)
class TunnelStats:
    """Traffic through one tunnel since it was registered. Times are on the registry's clock."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    last_handshake: float | None = None
    flows: int = 0


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """One tunnel as seen at one moment (a copy: later changes do not show through)."""

    id: str
    type: TunnelType
    state: TunnelState
    since: float
    reason: str
    stats: TunnelStats


@dataclass(slots=True)
class _Tunnel:
    type: TunnelType
    state: TunnelState
    since: float
    reason: str
    stats: TunnelStats = field(default_factory=TunnelStats)


class TunnelRegistry:
    """The tunnels, their states (with when and why they last changed) and their counters."""

    def __init__(self, bus: EventBus, clock: Callable[[], float] = time.monotonic) -> None:
        self._bus = bus
        self._clock = clock
        self._tunnels: dict[str, _Tunnel] = {}

    def __contains__(self, tunnel_id: object) -> bool:
        return tunnel_id in self._tunnels

    def ids(self) -> list[str]:
        """Registered tunnel ids, in registration order."""
        return list(self._tunnels)

    def register(self, tunnel_id: str, tunnel_type: TunnelType) -> None:
        """Add a tunnel, DOWN. ValueError if the id is taken."""
        if tunnel_id in self._tunnels:
            raise ValueError(f"tunnel {tunnel_id!r} is already registered")
        self._tunnels[tunnel_id] = _Tunnel(tunnel_type, TunnelState.DOWN, self._clock(), "registered")

    def unregister(self, tunnel_id: str) -> None:
        """Remove a tunnel; one that was not DOWN is first reported DOWN so its flows get closed."""
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            return
        if tunnel.state is not TunnelState.DOWN:
            self.set_state(tunnel_id, TunnelState.DOWN, REMOVED_REASON)
        del self._tunnels[tunnel_id]

    def state(self, tunnel_id: str) -> TunnelState | None:
        """The tunnel's state, None for an unknown id."""
        tunnel = self._tunnels.get(tunnel_id)
        return None if tunnel is None else tunnel.state

    def set_state(self, tunnel_id: str, state: TunnelState, reason: str = "") -> bool:
        """Record a new state; publish TunnelStateChanged and return True only if it really changed.

        KeyError for an unknown id.
        """
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            raise KeyError(f"unknown tunnel {tunnel_id!r}")
        if tunnel.state is state:
            return False
        old = tunnel.state
        now = self._clock()
        tunnel.state, tunnel.since, tunnel.reason = state, now, reason
        self._bus.publish(TunnelStateChanged(tunnel_id, old, state, reason, now))
        return True

    def info(self, tunnel_id: str) -> TunnelInfo | None:
        """State, since when, why, and a copy of the counters; None for an unknown id."""
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            return None
        return TunnelInfo(
            tunnel_id, tunnel.type, tunnel.state, tunnel.since, tunnel.reason, replace(tunnel.stats)
        )

    # Counters are bumped from data paths, so an unknown id (a tunnel removed while a relay was still
    # finishing) is ignored rather than raised.

    def add_traffic(
        self, tunnel_id: str, *, rx: int = 0, tx: int = 0, rx_packets: int = 0, tx_packets: int = 0
    ) -> None:
        """Count bytes (and, for packet tunnels, packets) received from and sent into the tunnel."""
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            return
        stats = tunnel.stats
        stats.rx_bytes += rx
        stats.tx_bytes += tx
        stats.rx_packets += rx_packets
        stats.tx_packets += tx_packets

    def set_last_handshake(self, tunnel_id: str, at: float) -> None:
        """Record when the tunnel last completed a handshake (registry clock)."""
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is not None:
            tunnel.stats.last_handshake = at

    def flow_opened(self, tunnel_id: str) -> None:
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is not None:
            tunnel.stats.flows += 1

    def flow_closed(self, tunnel_id: str) -> None:
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is not None and tunnel.stats.flows > 0:
            tunnel.stats.flows -= 1

    def snapshot(self) -> list[dict[str, Any]]:
        """Every tunnel as a JSON-ready dict, for ``status``.

        Times on the registry's clock mean nothing to another process, so ages in seconds are given:
        ``state_age`` (since the last state change) and ``handshake_age`` (None: no handshake yet).
        """
        now = self._clock()
        rows: list[dict[str, Any]] = []
        for tunnel_id, tunnel in self._tunnels.items():
            handshake = tunnel.stats.last_handshake
            rows.append(
                {
                    "id": tunnel_id,
                    "type": tunnel.type.value,
                    "state": tunnel.state.value,
                    "reason": tunnel.reason,
                    "state_age": max(0.0, now - tunnel.since),
                    "handshake_age": None if handshake is None else max(0.0, now - handshake),
                    **asdict(tunnel.stats),
                }
            )
        return rows
