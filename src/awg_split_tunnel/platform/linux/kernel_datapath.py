"""The kernel data path (Linux): Python decides a flow's first packet, the kernel carries the rest.

A new outbound TCP/UDP flow's first packet is queued (NFQUEUE, no bypass) to the router process. There
the same ``PacketRouter`` as on the divert path finds its process (SOCKET/FLOW events, held until the
event arrives, then the OS tables) and its rule, and the packet is accepted with the flow's class in its
mark (``kernel_rules``); nftables copies the mark to the flow's conntrack entry and, from it, lets direct
flows go, redirects stream-tunnel flows to the tunnel's local proxy (which reads ``SO_ORIGINAL_DST``) and
rejects blocked ones — no later packet of the flow reaches Python (docs/DATAPATHS.md).

Fail-closed: the table and the gate outlive the process. If the router process or the daemon dies, the
queue has no listener and new flows wait; blocked flows stay blocked; redirected flows meet a closed
proxy port. A clean stop (``stop`` message) removes the gate and the table; ``remove_kernel_state`` does
the same by hand (``awg-split-tunnel cleanup``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from awg_split_tunnel.core.packet_router import (
    ConnectEvent,
    ConnectEventLike,
    EventPort,
    PacketRouter,
    RouterSettings,
    TunnelRoute,
    Verdict,
    apply_router_message,
    configure_process_logging,
    pending_events,
    process_router,
)
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.errors import AwgSplitTunnelError, TunnelError
from awg_split_tunnel.net.nat import FlowVerdict, NatEntry, app_key
from awg_split_tunnel.net.packet import IPPROTO_TCP, PacketView
from awg_split_tunnel.platform.linux.conntrack import ConntrackTable
from awg_split_tunnel.platform.linux.kernel_rules import (
    BLOCK,
    DIRECT,
    GATE_CHAIN,
    MARK_MASK,
    QUEUE_NUM,
    STREAM_BASE,
    STREAM_SLOTS,
    TABLE,
    KernelRuleset,
    StreamRedirect,
    gate_rules,
    local_route_commands,
    mark_value,
    removal_text,
)
from awg_split_tunnel.platform.linux.nftables import Nftables, NftablesError

log = logging.getLogger("awg_split_tunnel.router")

QUEUE_MAX_LEN = 4096
"""First packets the kernel keeps queued before it drops new ones (fail-closed, never a bypass)."""


class KernelSupportError(AwgSplitTunnelError):
    """The kernel data path cannot run here; the message names what is missing and how to get it."""


class QueuedPacket(Protocol):
    """A packet held in the kernel's queue (``netfilterqueue.Packet``)."""

    def get_payload(self) -> bytes: ...
    def get_mark(self) -> int: ...
    def set_mark(self, mark: int) -> None: ...
    def accept(self) -> None: ...


# -- the firewall: our table and the gate ----------------------------------------------------------------


def _iptables_commands() -> tuple[str, str]:
    """The iptables-nft front ends (the xtables NFQUEUE target on nf_tables)."""
    for v4, v6 in (("iptables-nft", "ip6tables-nft"), ("iptables", "ip6tables")):
        path4, path6 = shutil.which(v4), shutil.which(v6)
        if path4 and path6:
            return path4, path6
    raise KernelSupportError(
        "the kernel has no nft 'queue' and iptables-nft is missing for the first-packet gate: "
        "apt-get install iptables (or set `dataplane: divert`)"
    )


class KernelFirewall:
    """Our nftables table (replaced atomically on every change) and the first-packet gate."""

    def __init__(self, nft: Nftables | None = None) -> None:
        self.nft = nft or Nftables()
        self.nft_queue = self._probe_nft_queue()
        self._iptables = () if self.nft_queue else _iptables_commands()

    def _probe_nft_queue(self) -> bool:
        probe = (
            "table inet awg_split_tunnel_probe\n"
            "add chain inet awg_split_tunnel_probe gate { type filter hook output priority 0; }\n"
            f"add rule inet awg_split_tunnel_probe gate queue num {QUEUE_NUM}\n"
        )
        try:
            self.nft.run(probe, dry_run=True)
        except NftablesError:
            return False
        return True

    def apply(self, ruleset: KernelRuleset) -> None:
        """Routes first, then our table (one transaction), then the gate: each piece exists before
        anything that leads packets to it."""
        add_local_route()
        self.nft.run(ruleset.table_text())
        if not self.nft_queue:
            for command in self._iptables:
                _ensure_gate_chain(command, ruleset.queue_num)

    def remove(self) -> list[str]:
        """Remove the gate first (no flow is queued to nobody), then the table, then the routes; what was
        removed."""
        removed = remove_gate_chains()
        if _table_exists(self.nft):
            self.nft.run(removal_text())
            removed.append(f"nftables table inet {TABLE}")
        return removed + remove_local_route()


def add_local_route() -> None:
    """The policy rule and loopback route that take stream tunnels' TCP to TPROXY; already there is fine
    (re-adding must not open a gap in which packets route normally)."""
    from awg_split_tunnel.platform.linux.tun import ip_command

    for args in local_route_commands("add"):
        try:
            ip_command(*args)
        except TunnelError as exc:
            if "File exists" not in str(exc):
                raise KernelSupportError(f"cannot add the loopback route of stream tunnels: {exc}") from None


def remove_local_route() -> list[str]:
    from awg_split_tunnel.platform.linux.tun import ip_command

    removed = []
    for args in local_route_commands("del"):
        try:
            ip_command(*args)
        except TunnelError:
            continue
        removed.append("ip " + " ".join(args))
    return removed


def _run(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, check=False)


def _ensure_gate_chain(command: str, queue_num: int) -> None:
    """Our chain in mangle OUTPUT, with exactly the gate's rules. Left untouched when it already holds
    them (the next ``run`` after a crash must not open a window where flows pass ungated)."""
    wanted = [f"-A {GATE_CHAIN} " + " ".join(rule) for rule in gate_rules(queue_num)]
    listed = _run([command, "-w", "-t", "mangle", "-S", GATE_CHAIN])
    if listed.returncode != 0:
        _check(_run([command, "-w", "-t", "mangle", "-N", GATE_CHAIN]), command)
        current: list[str] = []
    else:
        current = [line for line in listed.stdout.splitlines() if line.startswith("-A ")]
    if [_normalise(line) for line in current] != [_normalise(line) for line in wanted]:
        _check(_run([command, "-w", "-t", "mangle", "-F", GATE_CHAIN]), command)
        for rule in gate_rules(queue_num):
            _check(_run([command, "-w", "-t", "mangle", "-A", GATE_CHAIN, *rule]), command)
    if _run([command, "-w", "-t", "mangle", "-C", "OUTPUT", "-j", GATE_CHAIN]).returncode != 0:
        _check(_run([command, "-w", "-t", "mangle", "-I", "OUTPUT", "1", "-j", GATE_CHAIN]), command)


def _normalise(rule: str) -> list[str]:
    # iptables -S prints the mark as 0x0/0xff0000 and the conntrack state as NEW; compare loosely.
    words = rule.replace("--ctstate", "--state").split()
    return sorted(w.lower().replace("0x0/", "0/").replace("0x00ff0000", "0xff0000") for w in words)


def _check(result: subprocess.CompletedProcess[str], command: str) -> None:
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise KernelSupportError(
            f"{os.path.basename(command)} refused the first-packet gate: {reason[0] if reason else '?'} "
            "(the kernel needs nf_tables with xt NFQUEUE and conntrack; or set `dataplane: divert`)"
        )


def _table_exists(nft: Nftables) -> bool:
    try:
        nft.run(f"list table inet {TABLE}")
    except NftablesError:
        return False
    return True


def remove_gate_chains() -> list[str]:
    """Remove the gate's chain and its jump from mangle OUTPUT in both families (if there). A mangle
    table left with nothing in it (iptables-nft created it for the gate) is removed too: empty, it does
    nothing, and the host's ruleset is then as it was before."""
    removed: list[str] = []
    for command, family in (("iptables", "ip"), ("ip6tables", "ip6")):
        path = shutil.which(f"{command}-nft") or shutil.which(command)
        if path is None:
            continue
        while _run([path, "-w", "-t", "mangle", "-D", "OUTPUT", "-j", GATE_CHAIN]).returncode == 0:
            pass
        if _run([path, "-w", "-t", "mangle", "-S", GATE_CHAIN]).returncode == 0:
            _run([path, "-w", "-t", "mangle", "-F", GATE_CHAIN])
            _run([path, "-w", "-t", "mangle", "-X", GATE_CHAIN])
            removed.append(f"{command} mangle chain {GATE_CHAIN}")
            listed = _run([path, "-w", "-t", "mangle", "-S"])
            lines = listed.stdout.splitlines()
            if listed.returncode == 0 and all(
                line.startswith("-P ") and line.endswith(" ACCEPT") for line in lines
            ):
                with contextlib.suppress(NftablesError), Nftables() as nft:
                    nft.run(f"delete table {family} mangle")
    return removed


def remove_kernel_state() -> list[str]:
    """Everything the kernel data path adds (gate chains, our table), removed; what was there.
    ``awg-split-tunnel cleanup`` after a daemon that died (its rules hold every new flow meanwhile)."""
    removed = remove_gate_chains()
    try:
        nft = Nftables()
    except NftablesError:
        return removed + remove_local_route()
    with nft:
        if _table_exists(nft):
            nft.run(removal_text())
            removed.append(f"nftables table inet {TABLE}")
    return removed + remove_local_route()


# -- the gate: first packets → marks ---------------------------------------------------------------------


class StreamSlots:
    """Stream tunnel id → its slot in the ruleset (its mark class is ``STREAM_BASE + slot``); slots of
    removed tunnels are given to new ones."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}

    def update(self, routes: Mapping[str, object]) -> dict[int, StreamRedirect]:
        """Slots for the stream tunnels of ``routes`` (others forgotten); their redirects by slot."""
        streams = {tid: r for tid, r in routes.items() if isinstance(r, TunnelRoute)}
        self._slots = {tid: slot for tid, slot in self._slots.items() if tid in streams}
        used = set(self._slots.values())
        for tunnel_id in streams:
            if tunnel_id not in self._slots:
                free = next((s for s in range(STREAM_SLOTS) if s not in used), None)
                if free is None:
                    log.error("[Router] more than %d stream tunnels: %s gets none", STREAM_SLOTS, tunnel_id)
                    continue
                self._slots[tunnel_id] = free
                used.add(free)
        redirects = {}
        for tunnel_id, slot in self._slots.items():
            redirects[slot] = StreamRedirect(streams[tunnel_id].tcp_port, streams[tunnel_id].udp_port)
        return redirects

    def get(self, tunnel_id: str | None) -> int | None:
        return None if tunnel_id is None else self._slots.get(tunnel_id)


class KernelGate:
    """Each queued first packet goes through the ``PacketRouter`` and leaves the queue with its flow's
    class in our mark bits; packets the router holds (owner not known yet) leave when it decides."""

    def __init__(self, router: PacketRouter, slots: StreamSlots) -> None:
        self.router = router
        self.slots = slots
        self._view = PacketView()
        self.released = 0

    def packet(self, packet: QueuedPacket, now: float) -> None:
        data = bytearray(packet.get_payload())
        view = self._view
        if not view.parse(data, len(data)) or not view.has_ports:
            self.release(packet, DIRECT)  # not a flow we route (the router would pass it too)
            return
        proto, key = view.proto, app_key(view)
        verdict = self.router.route(data, len(data), now, lambda: packet)
        if verdict is Verdict.HOLD:
            return
        if verdict is Verdict.REINJECT:
            self.release(packet, DIRECT)
        elif verdict is Verdict.INJECT_INBOUND:
            self.release(packet, self._class_of(self.router.table.flows(proto).get(key)))
        else:  # DROP, or a packet-tunnel flow (not on this data path yet): blocked in the kernel
            self.release(packet, BLOCK)

    def decided(self, entry: NatEntry, packets: list[object]) -> None:
        """``PacketRouter.on_decided``: a held flow's owner is known (or given up on)."""
        flow_class = self._class_of(entry)
        for packet in packets:
            self.release(packet, flow_class)  # type: ignore[arg-type]

    def _class_of(self, entry: NatEntry | None) -> int:
        if entry is None:
            return BLOCK
        if entry.verdict is FlowVerdict.PASS:
            return DIRECT
        if entry.verdict is FlowVerdict.TUNNEL and entry.proxy_port:
            slot = self.slots.get(entry.tunnel_id)
            return BLOCK if slot is None else STREAM_BASE + slot
        return BLOCK

    def release(self, packet: QueuedPacket, flow_class: int) -> None:
        packet.set_mark((packet.get_mark() & ~MARK_MASK) | mark_value(flow_class))
        packet.accept()
        self.released += 1


def kernel_peer_key(entry: NatEntry) -> bytes:
    """How a tunnel proxy sees a flow the kernel sent it: the app's own address and port, and for TCP
    (TPROXY, no NAT) the original destination, the proxy's own address of the connection."""
    key = entry.app_addr + entry.app_port.to_bytes(2, "big")
    if entry.proto == IPPROTO_TCP:
        key += entry.orig_dst_addr + entry.orig_dst_port.to_bytes(2, "big")
    return key


class KernelGateLoop:
    """The router process of the kernel data path: the queue, the event handles, the control pipe."""

    def __init__(
        self,
        settings: RouterSettings,
        conn: Any,
        events: Iterable[EventPort],
        accept_pid: Callable[[int], bool],
        firewall: KernelFirewall,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.states = dict(settings.states)
        self.conn = conn
        self.events = list(events)
        self.firewall = firewall
        self._accept_pid = accept_pid
        self._clock = clock
        self.slots = StreamSlots()
        self.gate: KernelGate
        self.router = process_router(
            settings,
            self.states,
            conn,
            peer_key=kernel_peer_key,
            reject_tcp=False,
            on_decided=lambda entry, packets: self.gate.decided(entry, packets),
        )
        self.gate = KernelGate(self.router, self.slots)
        self.conntrack = ConntrackTable()
        self.router.event_source = self._pending_events
        self._routes = dict(settings.tunnels)
        self._queue: Any = None
        self._arrived: list[QueuedPacket] = []
        self._stop = False
        self._clean_stop = False

    def open(self) -> None:
        """Event handles, then the queue, then the rules: nothing is queued before its reader exists."""
        try:
            from netfilterqueue import COPY_PACKET, NetfilterQueue
        except ImportError as exc:
            raise KernelSupportError(
                f"the kernel data path needs NetfilterQueue ({exc}): apt-get install libnetfilter-queue-dev "
                "gcc python3-dev && pip install NetfilterQueue (or set `dataplane: divert`)"
            ) from None
        for handle in self.events:
            handle.open()
        self._queue = NetfilterQueue()
        try:
            self._queue.bind(QUEUE_NUM, self._arrive, max_len=QUEUE_MAX_LEN, mode=COPY_PACKET)
        except OSError as exc:
            raise KernelSupportError(
                f"cannot bind NFQUEUE {QUEUE_NUM} ({exc}): is another daemon running in this network "
                "namespace, or nfnetlink_queue missing from the kernel?"
            ) from None
        self.firewall.apply(self._ruleset(self._routes))
        log.info(
            "[Router] kernel data path: first packets queued (%s), the rest in the kernel",
            "nft queue" if self.firewall.nft_queue else "iptables-nft NFQUEUE",
        )

    def _arrive(self, packet: Any) -> None:
        packet.retain()  # the payload is read after the callback returns
        self._arrived.append(packet)

    def _ruleset(self, routes: Mapping[str, object]) -> KernelRuleset:
        return KernelRuleset(self.slots.update(routes), nft_queue=self.firewall.nft_queue)

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self._close()

    def _loop(self) -> None:
        router, queue = self.router, self._queue
        poller = select.poll()
        fds = [queue.get_fd(), self.conn.fileno(), *(h.fileno() for h in self.events)]
        for fd in fds:
            if fd is not None:
                poller.register(fd, select.POLLIN)
        while not self._stop:
            deadline = router.next_deadline()
            now = self._clock()
            timeout = 200 if deadline is None else max(0, min(200, int((deadline - now) * 1000) + 1))
            poller.poll(timeout)
            now = self._clock()
            self._drain_control()
            for event in self._pending_events():
                router.connect_event(*event[:4], now, event[4])
            queue.run(block=False)
            arrived, self._arrived = self._arrived, []
            for packet in arrived:
                self.gate.packet(packet, now)
            router.poll(now)
            router.take_outgoing()  # crafted RSTs of the divert path: here the kernel rejects

    def _pending_events(self) -> Iterator[ConnectEvent]:
        return pending_events(self.router, self.events, self._accept_pid, self._socket_closed)

    def _socket_closed(self, event: ConnectEventLike) -> None:
        # The verdict lives in the conntrack entry, which outlives the socket: the next socket given
        # this port (maybe another app's) must be decided afresh.
        self.conntrack.forget(
            event.proto, event.local_addr, event.local_port, event.remote_addr, event.remote_port
        )

    def _drain_control(self) -> None:
        try:
            while self.conn.poll(0):
                self._control(self.conn.recv())
        except (EOFError, OSError):
            # The daemon is gone: the rules stay (fail-closed) until the next `run` or `cleanup`.
            log.error("[Router] control connection lost: stopping, the kernel keeps blocking new flows")
            self._stop = True

    def _control(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "tunnels" or kind == "devices":
            routes = dict(message[1])
            # The proxies' redirects exist before any flow is decided for a new tunnel.
            self.firewall.apply(self._ruleset(routes))
            self._routes = routes
            self.router.set_tunnels(routes)
            for tunnel_id in message[2] if kind == "devices" else ():
                reason = "WireGuard/AmneziaWG tunnels are not carried by the kernel data path yet"
                self.conn.send(("tunnel_state", tunnel_id, TunnelState.DOWN, reason))
        elif kind == "stop":
            self._stop = True
            self._clean_stop = True
        else:
            apply_router_message(self.router, self.states, self.conn, message)
        self.router.poll(self._clock())

    def _close(self) -> None:
        if self._clean_stop:
            try:
                self.firewall.remove()
            except AwgSplitTunnelError as exc:
                log.error("[Router] removing the kernel rules failed: %s", exc)
            # The network is as before the daemon: held first packets go their way.
            for packet in [*self.router.release_held(), *self._arrived]:
                with contextlib.suppress(Exception):
                    self.gate.release(packet, DIRECT)  # type: ignore[arg-type]
        if self._queue is not None:
            with contextlib.suppress(Exception):
                self._queue.unbind()
        for handle in self.events:
            with contextlib.suppress(Exception):
                handle.close()
        self.conntrack.close()
        log.info("[Router] stopped: %s", self.router.stats)


def serve_kernel_gate(settings: RouterSettings, open_events: Callable[..., Any], conn: Any) -> None:
    """The router process's body for ``dataplane: kernel`` (``RouterProcess(serve=...)``)."""
    configure_process_logging(settings.log_level)
    try:
        events, accept_pid = open_events()
        loop = KernelGateLoop(settings, conn, events, accept_pid, KernelFirewall())
        loop.open()
    except Exception as exc:
        known = isinstance(exc, AwgSplitTunnelError)
        conn.send(("error", str(exc) if known else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    loop.run()
