"""The messages between the control plane (``RouterProcess``) and the router process, one type each.

They cross a ``multiprocessing`` pipe (the ``spawn`` start method), so every one pickles: frozen, slotted
dataclasses of plain values, routes, rules, enums and picklable device factories. A receiver dispatches
with one ``match`` statement over ``ToRouter`` or ``FromRouter``.

Down (``ToRouter``): ``SetTunnelState``, ``SetRoutes``, ``SetRules``, ``ChangeDevices``,
``SnapshotRequest``, ``Stop``. Up (``FromRouter``): ``Ready`` or ``StartFailed`` first, then
``FlowTunnelled`` / ``FlowForgotten`` (the NAT mirror ``nat_lookup`` answers from), ``Snapshot`` (the
answer to ``SnapshotRequest``) and ``DeviceStateChanged`` (a packet tunnel's device, which lives in the
router process). ``FlowRow`` is one flow of a ``Snapshot``, as ``status`` and ``connections`` show it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.rule_engine import Rule

if TYPE_CHECKING:
    # packet_router imports this module: its route type is for the annotations only.
    from awg_split_tunnel.core.packet_router import AnyTunnelRoute

# -- down: control plane → router process ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetTunnelState:
    """A tunnel's state as the control plane knows it (a device in the router process knows its own)."""

    tunnel_id: str
    state: TunnelState


@dataclass(frozen=True, slots=True)
class SetRoutes:
    """Every tunnel's route from now on (stream proxies' ports, packet tunnels' addresses and MTU)."""

    routes: Mapping[str, AnyTunnelRoute]


@dataclass(frozen=True, slots=True)
class SetRules:
    """The rule set new flows are decided by."""

    rules: tuple[Rule, ...]
    default: str
    default_fallback: FallbackPolicy


@dataclass(frozen=True, slots=True)
class ChangeDevices:
    """Packet tunnels added, changed or removed while running: stop the devices of ``stopped``, start
    those of ``started`` (replacing a running one of the same id), then route by ``routes``."""

    routes: Mapping[str, AnyTunnelRoute]
    started: Mapping[str, Callable[[], Any]]
    """Tunnel id → its device's picklable factory (``router.process.DeviceFactory``)."""
    stopped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Ask for the router's counters and flows; answered by ``Snapshot``."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Close the handles, stop the devices and end the router process."""


ToRouter = SetTunnelState | SetRoutes | SetRules | ChangeDevices | SnapshotRequest | Stop
"""Every message the control plane sends the router process."""


# -- up: router process → control plane --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The router process's handles are open: the first message of a process that started."""


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The router process could not start (instead of ``Ready``); it ends after sending this."""

    reason: str


@dataclass(frozen=True, slots=True)
class FlowTunnelled:
    """A new tunnelled flow, sent before its first packet goes on, so the proxy that accepts it finds it.
    ``key`` is the flow's peer as the proxy sees it (``nat_announcement``)."""

    proto: int
    key: bytes
    dst_addr: bytes
    dst_port: int
    app_addr: bytes
    app_port: int
    tunnel_id: str | None
    pid: int | None
    exe: str | None
    fail_closed: bool


@dataclass(frozen=True, slots=True)
class FlowForgotten:
    """A tunnelled flow the router no longer keeps (``nat_withdrawal``)."""

    proto: int
    key: bytes


@dataclass(frozen=True, slots=True)
class FlowRow:
    """One flow for ``status`` and ``connections``: who sent it, where to, and how it was routed."""

    proto: int
    app_ip: str
    app_port: int
    dst_ip: str
    dst_port: int
    verdict: str
    """The name of the flow's ``FlowVerdict`` (``TUNNEL``, ``PASS``, ...)."""
    tunnel: str | None
    pid: int | None
    exe: str | None
    packets_out: int
    packets_in: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The answer to ``SnapshotRequest``: the router's counters (with ``packet_tunnels``, per device, where
    the router process runs devices) and its flows."""

    stats: dict[str, Any]
    flows: tuple[FlowRow, ...]


@dataclass(frozen=True, slots=True)
class DeviceStateChanged:
    """A packet tunnel's device in the router process changed state (or was started or stopped)."""

    tunnel_id: str
    state: TunnelState
    reason: str


FromRouter = Ready | StartFailed | FlowTunnelled | FlowForgotten | Snapshot | DeviceStateChanged
"""Every message the router process sends the control plane."""
