"""The messages between the control plane (``RouterProcess``) and the router process, one type each.

They cross a ``multiprocessing`` pipe (the ``spawn`` start method), so every one pickles: frozen, slotted
dataclasses of plain values, routes, rules, enums and picklable device factories. A receiver dispatches
with one ``match`` statement over ``ToRouter`` or ``FromRouter``.

Down (``ToRouter``): ``SetTunnelState``, ``SetRoutes``, ``SetRules``, ``ChangeDevices``,
``StatusRequest``, ``ConnectionsRequest``, ``Heartbeat``, ``Stop``. Up (``FromRouter``): ``Ready`` or
``StartFailed`` first, then ``FlowTunnelled`` / ``FlowForgotten`` (the NAT mirror ``nat_lookup`` answers
from), ``RouterStatus`` and ``ConnectionsPage`` (the answers, by ``request_id``), ``Alive`` (the answer to
``Heartbeat``) and ``DeviceStateChanged`` (a packet tunnel's device, which lives in the router process).
``FlowRow`` is one flow of a ``ConnectionsPage``, as ``connections`` shows it.

``status`` never lists flows: the router keeps its flow counts as flows come and go, so ``RouterStatus``
is small whatever the number of flows. ``connections`` goes by pages (``CONNECTIONS_PAGE`` rows at most),
each built by the router process between two batches of packets.
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


CONNECTIONS_PAGE = 1000
"""Most flows in one ``ConnectionsPage`` (about 200 KiB pickled, and as JSON on the control socket)."""


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Ask for the router's counters and flow counts; answered by ``RouterStatus`` of the same id."""

    request_id: int


@dataclass(frozen=True, slots=True)
class ConnectionsRequest:
    """Ask for a page of flows; answered by ``ConnectionsPage`` of the same id. ``listing`` 0 starts a new
    listing (the flows as they are now); the next pages name the listing a page answered with and ``offset``
    the number of flows already received."""

    request_id: int
    listing: int = 0
    offset: int = 0
    limit: int = CONNECTIONS_PAGE


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Are you there? Answered by ``Alive`` with the same ``seq`` as soon as the router process's loop
    reads it (ahead of any control message waiting to be applied): the control plane's watchdog."""

    seq: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Close the handles, stop the devices and end the router process."""


ToRouter = (
    SetTunnelState
    | SetRoutes
    | SetRules
    | ChangeDevices
    | StatusRequest
    | ConnectionsRequest
    | Heartbeat
    | Stop
)
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
    dns_server: bytes | None = None
    """``NatEntry.dns_server``: the proxy connects there instead of ``dst_addr`` (``dns.system``)."""


@dataclass(frozen=True, slots=True)
class FlowForgotten:
    """A tunnelled flow the router no longer keeps (``nat_withdrawal``)."""

    proto: int
    key: bytes


@dataclass(frozen=True, slots=True)
class FlowRow:
    """One flow for ``connections``: who sent it, where to, and how it was routed."""

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
    bytes_out: int = 0
    bytes_in: int = 0
    """IP bytes the router saw each way (on the kernel data path only the first packet's: the kernel carries
    the rest)."""
    created: float = 0.0
    """When the router first saw the flow, on the router's clock (``time.monotonic``, shared by the
    processes of one machine)."""


@dataclass(frozen=True, slots=True)
class RouterStatus:
    """The answer to ``StatusRequest``: the router's counters (with ``packet_tunnels``, per device, where
    the router process runs devices) and how many flows it keeps, in all and by tunnel."""

    request_id: int
    stats: dict[str, Any]
    flows: int
    flows_by_tunnel: dict[str, int]


@dataclass(frozen=True, slots=True)
class ConnectionsPage:
    """The answer to ``ConnectionsRequest``: flows ``offset`` to ``offset + len(flows)`` of listing
    ``listing`` (of ``total``); ``listing`` 0 when the listing asked for is unknown or expired."""

    request_id: int
    listing: int
    offset: int
    total: int
    flows: tuple[FlowRow, ...]

    @property
    def done(self) -> bool:
        return self.listing == 0 or self.offset + len(self.flows) >= self.total


@dataclass(frozen=True, slots=True)
class Alive:
    """The answer to ``Heartbeat``."""

    seq: int


@dataclass(frozen=True, slots=True)
class DeviceStateChanged:
    """A packet tunnel's device in the router process changed state (or was started or stopped)."""

    tunnel_id: str
    state: TunnelState
    reason: str


FromRouter = (
    Ready
    | StartFailed
    | FlowTunnelled
    | FlowForgotten
    | RouterStatus
    | ConnectionsPage
    | Alive
    | DeviceStateChanged
)
"""Every message the router process sends the control plane."""
