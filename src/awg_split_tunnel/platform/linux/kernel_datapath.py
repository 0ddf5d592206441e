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

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from awg_split_tunnel.core.packet_router import ConnectEvent, PacketAction, PacketRouter, TunnelRoute
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.errors import AwgSplitTunnelError, TunnelError
from awg_split_tunnel.net.nat import FlowVerdict, NatEntry, app_key
from awg_split_tunnel.net.packet import IPPROTO_TCP, PacketView
from awg_split_tunnel.platform.linux.conntrack import ConntrackTable
from awg_split_tunnel.platform.linux.dns_redirect import remove_redirect
from awg_split_tunnel.platform.linux.kernel_rules import (
    BLOCK,
    DIRECT,
    GATE_CHAIN,
    MARK_MASK,
    PACKET_BASE,
    PACKET_RULE_PRIORITY,
    PACKET_SLOTS,
    PACKET_TABLE_BASE,
    QUEUE_NUM,
    STREAM_BASE,
    STREAM_SLOTS,
    SYSTEM_DNS,
    TABLE,
    KernelRuleset,
    PacketTunnelRules,
    StreamRedirect,
    gate_rules,
    local_route_commands,
    mark_value,
    packet_ifname,
    packet_route_commands,
    packet_table,
    removal_text,
)
from awg_split_tunnel.platform.linux.nftables import Nftables, NftablesError
from awg_split_tunnel.platform.linux.sockets import destroy_tcp
from awg_split_tunnel.router.divert_loop import ConnectEventLike, EventPort, pending_events
from awg_split_tunnel.router.process import RouterSettings, configure_process_logging, process_router

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


def support_problem() -> str | None:
    """What this host lacks for the kernel data path (a sentence naming the package), or None."""
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return (
            "the Python package NetfilterQueue is missing (apt-get install libnetfilter-queue-dev gcc "
            "python3-dev && pip install NetfilterQueue)"
        )
    # Found, not imported: the daemon asks, and only the router process uses it (~10 MB once imported).
    if importlib.util.find_spec("pyroute2") is None:
        return "the Python package pyroute2 is missing (pip install pyroute2)"
    try:
        firewall = KernelFirewall()
    except AwgSplitTunnelError as exc:
        return str(exc)
    firewall.nft.close()
    if not os.path.exists("/proc/net/nf_conntrack") and not os.path.isdir("/proc/sys/net/netfilter"):
        return "the kernel has no connection tracking (nf_conntrack)"
    return None


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
        add_routes(local_route_commands("add"), "the loopback route of stream tunnels")
        self.nft.run(ruleset.table_text())
        if not self.nft_queue:
            for command in self._iptables:
                _ensure_gate_chain(command, ruleset.queue_num)

    def remove(self) -> list[str]:
        """Everything the kernel data path added (``remove_kernel_state``); what was removed."""
        return remove_kernel_state(self.nft)


def add_routes(commands: Iterable[list[str]], what: str) -> None:
    """Run ``ip`` add commands; one already there is fine (re-adding must not open a gap in which packets
    route normally). KernelSupportError naming ``what`` on any other refusal."""
    from awg_split_tunnel.platform.linux.tun import ip_command

    for args in commands:
        try:
            ip_command(*args)
        except TunnelError as exc:
            if "File exists" not in str(exc):
                raise KernelSupportError(f"cannot add {what}: {exc}") from None


def delete_routes(commands: Iterable[list[str]]) -> list[str]:
    """Run ``ip`` del commands, skipping what is not there; the ones that removed something."""
    from awg_split_tunnel.platform.linux.tun import ip_command

    removed = []
    for args in commands:
        try:
            ip_command(*args)
        except TunnelError:
            continue
        removed.append("ip " + " ".join(args))
    return removed


def remove_routes() -> list[str]:
    """The loopback route of stream tunnels and every packet tunnel's policy rule and table (those a dead
    daemon left too: found by their priority and table numbers), both families."""
    import re

    removed = delete_routes(local_route_commands("del"))
    ip = shutil.which("ip")
    if ip is None:
        return removed
    for family in ("-4", "-6"):
        rule = [ip, family, "rule", "del", "pref", str(PACKET_RULE_PRIORITY)]
        while _run(rule).returncode == 0:
            removed.append(f"ip {family} rule pref {PACKET_RULE_PRIORITY}")
        listed = _run([ip, family, "route", "show", "table", "all"]).stdout
        tables = {int(t) for t in re.findall(r"\btable (\d+)", listed)}
        for table in sorted(t for t in tables if PACKET_TABLE_BASE <= t < PACKET_TABLE_BASE + PACKET_SLOTS):
            if _run([ip, family, "route", "flush", "table", str(table)]).returncode == 0:
                removed.append(f"ip {family} routes of table {table}")
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


def remove_kernel_state(nft: Nftables | None = None) -> list[str]:
    """Everything the kernel data path adds, removed: the gate first (no flow is queued to nobody), then
    our table, then the routes; what was there. A clean stop, and ``awg-split-tunnel cleanup`` after a
    daemon that died (its rules hold every new flow meanwhile)."""
    removed = remove_gate_chains() + remove_redirect()
    try:
        context = contextlib.nullcontext(nft) if nft is not None else Nftables()
    except NftablesError:
        return removed + remove_routes()
    with context as table:
        if _table_exists(table):
            table.run(removal_text())
            removed.append(f"nftables table inet {TABLE}")
    return removed + remove_routes()


# -- the gate: first packets → marks ---------------------------------------------------------------------


class TunnelSlots:
    """Tunnel id → its slot in the ruleset: stream tunnels' classes are ``STREAM_BASE + slot``, packet
    tunnels' ``PACKET_BASE + slot`` (their TUN and routing table are numbered by it too). Slots of removed
    tunnels are given to new ones."""

    def __init__(self) -> None:
        self.streams: dict[str, int] = {}
        self.packets: dict[str, int] = {}

    def update(
        self, routes: Mapping[str, object]
    ) -> tuple[dict[int, StreamRedirect], dict[int, PacketTunnelRules]]:
        """Slots for the tunnels of ``routes`` (others forgotten): stream redirects and packet tunnels'
        rules by slot."""
        streams = {tid: r for tid, r in routes.items() if isinstance(r, TunnelRoute)}
        packets = {tid: r for tid, r in routes.items() if isinstance(r, PacketTunnelRoute)}
        self._assign(self.streams, streams, STREAM_SLOTS)
        self._assign(self.packets, packets, PACKET_SLOTS)
        redirects = {}
        for tunnel_id, slot in self.streams.items():
            redirects[slot] = StreamRedirect(streams[tunnel_id].tcp_port, streams[tunnel_id].udp_port)
        rules = {}
        for tunnel_id, slot in self.packets.items():
            route = packets[tunnel_id]
            v4, v6 = route.dns_server(4), route.dns_server(6)
            rules[slot] = PacketTunnelRules(
                route.mtu,
                None if v4 is None else str(ipaddress.ip_address(v4)),
                None if v6 is None else str(ipaddress.ip_address(v6)),
            )
        return redirects, rules

    @staticmethod
    def _assign(slots: dict[str, int], tunnels: Mapping[str, object], limit: int) -> None:
        for gone in [tid for tid in slots if tid not in tunnels]:
            del slots[gone]
        used = set(slots.values())
        for tunnel_id in tunnels:
            if tunnel_id in slots:
                continue
            free = next((s for s in range(limit) if s not in used), None)
            if free is None:
                log.error("[Router] more than %d tunnels of a kind: %s gets no slot", limit, tunnel_id)
                continue
            slots[tunnel_id] = free
            used.add(free)

    def class_of(self, tunnel_id: str | None, *, packet: bool) -> int | None:
        if tunnel_id is None:
            return None
        slot = (self.packets if packet else self.streams).get(tunnel_id)
        if slot is None:
            return None
        return (PACKET_BASE if packet else STREAM_BASE) + slot


def headers_of(payload: bytes) -> bytearray:
    """The queued packet as the router can parse it. NetfilterQueue hands over at most 4016 bytes of a
    packet (``scripts/repro/netfilterqueue_copy_limit.py``): a bigger first packet (a large datagram, a
    UDP GSO batch) arrives cut, its length field larger than what came. Only its headers decide the flow
    and the payload is never re-injected, so the length field of this copy is set to what arrived."""
    data = bytearray(payload)
    if len(data) >= 40 and data[0] >> 4 == 6:
        if int.from_bytes(data[4:6], "big") > len(data) - 40:
            data[4:6] = (len(data) - 40).to_bytes(2, "big")
    elif len(data) >= 20 and data[0] >> 4 == 4 and int.from_bytes(data[2:4], "big") > len(data):
        data[2:4] = len(data).to_bytes(2, "big")
    return data


class KernelGate:
    """Each queued first packet goes through the ``PacketRouter`` and leaves the queue with its flow's
    class in our mark bits; packets the router holds (owner not known yet) leave when it decides."""

    def __init__(self, router: PacketRouter, slots: TunnelSlots) -> None:
        self.router = router
        self.slots = slots
        self._view = PacketView()

    def packet(self, packet: QueuedPacket, now: float) -> None:
        data = headers_of(packet.get_payload())
        view = self._view
        if not view.parse(data, len(data)) or not view.has_ports:
            # Only new TCP/UDP flows of this host are queued: one that cannot be read is blocked (a flow
            # let through here would keep that verdict for all its packets).
            self.router.stats.malformed += 1
            self.release(packet, BLOCK)
            return
        proto, key = view.proto, app_key(view)
        verdict = self.router.route(data, len(data), now, lambda: packet)
        if verdict is PacketAction.HOLD:
            return
        if verdict is PacketAction.REINJECT:
            self.release(packet, DIRECT)
        elif verdict is PacketAction.INJECT_INBOUND or verdict is PacketAction.TO_TUNNEL:
            entry = self.router.table.flows(proto).get(key)
            self.release(packet, self._class_of(entry), system_dns=self._system_dns(entry))
        else:  # DROP: blocked in the kernel (a TCP reset for the app, retransmits never come here)
            self.release(packet, BLOCK)

    def decided(self, entry: NatEntry, packets: list[object]) -> None:
        """``PacketRouter.on_decided``: a held flow's owner is known (or given up on)."""
        flow_class, system_dns = self._class_of(entry), self._system_dns(entry)
        for packet in packets:
            self.release(packet, flow_class, system_dns=system_dns)  # type: ignore[arg-type]

    def _class_of(self, entry: NatEntry | None) -> int:
        if entry is None:
            return BLOCK
        if entry.verdict is FlowVerdict.PASS:
            return DIRECT
        if entry.verdict is FlowVerdict.TUNNEL:
            flow_class = self.slots.class_of(entry.tunnel_id, packet=entry.to_packet_tunnel)
            return BLOCK if flow_class is None else flow_class
        return BLOCK

    @staticmethod
    def _system_dns(entry: NatEntry | None) -> bool:
        """Whether the flow goes to its tunnel's DNS server (``dns.system``): the ``SYSTEM_DNS`` bit."""
        return entry is not None and entry.dns_server is not None and entry.to_packet_tunnel

    def release(self, packet: QueuedPacket, flow_class: int, *, system_dns: bool = False) -> None:
        mark = (packet.get_mark() & ~(MARK_MASK | SYSTEM_DNS)) | mark_value(flow_class)
        packet.set_mark(mark | SYSTEM_DNS if system_dns else mark)
        packet.accept()


def kernel_peer_key(entry: NatEntry) -> bytes:
    """How a tunnel proxy sees a flow the kernel sent it: the app's own address and port, and for TCP
    (TPROXY, no NAT) the original destination, the proxy's own address of the connection."""
    key = entry.app_addr + entry.app_port.to_bytes(2, "big")
    if entry.proto == IPPROTO_TCP:
        key += entry.orig_dst_addr + entry.orig_dst_port.to_bytes(2, "big")
    return key


TICK = 0.2
"""Seconds between the router's timer runs when nothing is due sooner."""
TUN_READ_BATCH = 64


class KernelIO:
    """The kernel data path's side of the router process (``router.service.RouterIO``), on asyncio: the
    queue of first packets, the SOCKET/FLOW event handles, our kernel rules, and one TUN per packet tunnel
    whose device (run by ``RouterService``) encrypts what the kernel routes into it."""

    def __init__(
        self,
        router: PacketRouter,
        events: Iterable[EventPort],
        accept_pid: Callable[[int], bool],
        firewall: KernelFirewall,
        slots: TunnelSlots,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.events = list(events)
        self.firewall = firewall
        self.slots = slots
        self.gate = KernelGate(router, slots)
        self.conntrack = ConntrackTable()
        self._accept_pid = accept_pid
        self._clock = clock
        self._routes: dict[str, Any] = dict(router.routes)
        self._queue: Any = None
        self._arrived: list[QueuedPacket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._devices: dict[str, Any] = {}
        """Packet tunnel id → its device (attached before ``start`` too: its TUN is made then)."""
        self._tuns: dict[str, tuple[Any, int]] = {}
        """Packet tunnel id → (its TUN, its slot)."""
        self._route_slots: set[int] = set()
        """Packet slots whose ip rules and unreachable routes are in place."""
        self._keep_rules = False
        router.event_source = self._pending_events

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Event handles, then the queue, then the rules: nothing is queued before its reader exists."""
        try:
            from netfilterqueue import COPY_PACKET, NetfilterQueue
        except ImportError as exc:
            raise KernelSupportError(
                f"the kernel data path needs NetfilterQueue ({exc}): apt-get install libnetfilter-queue-dev "
                "gcc python3-dev && pip install NetfilterQueue (or set `dataplane: divert`)"
            ) from None
        self._loop = asyncio.get_running_loop()
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
        self._apply_rules()
        self._fds = [self._queue.get_fd()]
        self._loop.add_reader(self._fds[0], self._on_queue)
        for handle in self.events:
            fd = handle.fileno()
            if fd is not None:
                self._loop.add_reader(fd, self._on_events)
                self._fds.append(fd)
        self._schedule(TICK)
        for tunnel_id in list(self._devices):
            self._open_tun(tunnel_id)
        log.info(
            "[Router] kernel data path: first packets queued (%s), the rest in the kernel",
            "nft queue" if self.firewall.nft_queue else "iptables-nft NFQUEUE",
        )

    async def stop(self) -> None:
        """A clean stop removes the rules (the network is as before); after the control plane was lost
        they stay, and every new flow waits for the next daemon (fail-closed)."""
        loop = self._loop
        if loop is not None:
            for fd in self._fds:
                loop.remove_reader(fd)
        self._fds = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for tunnel_id in list(self._devices):
            self.detach_device(tunnel_id)
        if not self._keep_rules:
            try:
                self.firewall.remove()
            except AwgSplitTunnelError as exc:
                log.error("[Router] removing the kernel rules failed: %s", exc)
            for packet in [*self.router.release_held(), *self._arrived]:
                with contextlib.suppress(Exception):
                    self.gate.release(packet, DIRECT)  # type: ignore[arg-type]
        if self._queue is not None:
            with contextlib.suppress(Exception):
                self._queue.unbind()
            self._queue = None
        for handle in self.events:
            with contextlib.suppress(Exception):
                handle.close()
        self.conntrack.close()
        self._loop = None
        log.info("[Router] stopped: %s", self.router.stats)

    def control_lost(self) -> None:
        self._keep_rules = True
        log.error("[Router] the kernel keeps holding new flows until the next `run` or `cleanup`")

    # -- RouterIO ----------------------------------------------------------------------------------------

    def routes_changed(self, routes: Mapping[str, Any]) -> None:
        """New routes: the rules for them exist before any flow is decided into them."""
        self._routes = dict(routes)
        if self._loop is not None:
            self._apply_rules()

    def attach_device(self, tunnel_id: str, device: Any) -> None:
        """Give the packet tunnel's device its TUN (now, or at ``start``): what the kernel routes there is
        encrypted, what the device decrypts is written back."""
        self.detach_device(tunnel_id)
        self._devices[tunnel_id] = device
        if self._loop is not None:
            self._open_tun(tunnel_id)

    def _open_tun(self, tunnel_id: str) -> None:
        from awg_split_tunnel.platform.linux import tun as linux_tun

        device = self._devices[tunnel_id]
        route = self._routes.get(tunnel_id)
        flow_class = self.slots.class_of(tunnel_id, packet=True)
        if not isinstance(route, PacketTunnelRoute) or flow_class is None or self._loop is None:
            log.error("[Router] packet tunnel %s has no route here: its flows are blocked", tunnel_id)
            return
        slot = flow_class - PACKET_BASE
        ifname = packet_ifname(slot)
        tun = linux_tun.Tun.open(ifname, vnet_hdr=True, read_offload=False)
        try:
            _configure_tun(ifname, route, slot)
        except (AwgSplitTunnelError, OSError):
            tun.close()
            raise
        self._tuns[tunnel_id] = (tun, slot)

        def read() -> None:
            packets = tun.read_packets(TUN_READ_BATCH)
            if packets:
                device.send_packets(packets)

        device.on_packets = tun.write_packets
        self._loop.add_reader(tun.fd, read)
        log.info("[Router] packet tunnel %s on %s (table %d)", tunnel_id, ifname, packet_table(slot))

    def device_ifname(self, tunnel_id: str) -> str | None:
        """The name of the TUN the tunnel's device reads (``awgstN``), while it has one."""
        entry = self._tuns.get(tunnel_id)
        return packet_ifname(entry[1]) if entry is not None else None

    def detach_device(self, tunnel_id: str) -> None:
        """The TUN goes (its routes with it; the unreachable route behind stays), and the flows the kernel
        routed into it are forgotten, so their next packets are decided again (reset, or direct)."""
        device = self._devices.pop(tunnel_id, None)
        if device is not None:
            device.on_packets = _discard
        entry = self._tuns.pop(tunnel_id, None)
        if entry is None:
            return
        tun, slot = entry
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(tun.fd)
        tun.close()
        self.conntrack.forget_marked(mark_value(PACKET_BASE + slot), MARK_MASK)

    def tunnel_state_changed(self, tunnel_id: str, state: TunnelState) -> None:
        self.router.tunnel_state_changed(tunnel_id, state)
        self.apply_now()
        flow_class = self.slots.class_of(tunnel_id, packet=True)
        if state is TunnelState.DOWN and flow_class is not None:
            # The kernel would keep sending these flows into the TUN (where the device drops them): the
            # next packet of each is decided again — reset for `block`/`drop`, and TCP anyway (its source
            # address was the tunnel's), a UDP flow of `allow_direct` goes direct. TCP connections the
            # router now holds reset are ended at once, not at the app's next send.
            self.conntrack.forget_marked(mark_value(flow_class), MARK_MASK)
            ended = [
                (e.app_addr, e.app_port, e.orig_dst_addr, e.orig_dst_port)
                for e in self.router.table.for_tunnel(tunnel_id)
                if e.proto == IPPROTO_TCP and e.verdict is FlowVerdict.RESET
            ]
            if ended and self._loop is not None:
                self._loop.run_in_executor(None, destroy_tcp, ended)
        elif state is TunnelState.UP:
            # Flows blocked while it was down (UDP keeps its ct mark for a while) are decided again.
            self.conntrack.forget_marked(mark_value(BLOCK), MARK_MASK)

    def apply_now(self) -> None:
        self.router.poll(self._clock())

    # -- packets and events ------------------------------------------------------------------------------

    def _arrive(self, packet: Any) -> None:
        packet.retain()  # the payload is read after the callback returns
        self._arrived.append(packet)

    def _on_queue(self) -> None:
        try:
            self._queue.run(block=False)
            now = self._clock()
            arrived, self._arrived = self._arrived, []
            for packet in arrived:
                self.gate.packet(packet, now)
            self._after()
        except Exception:
            log.exception("[Router] deciding queued packets failed")

    def _on_events(self) -> None:
        try:
            now = self._clock()
            for event in self._pending_events():
                self.router.connect_event(*event[:4], now, event[4])
            self._after()
        except Exception:
            log.exception("[Router] reading connect events failed")

    def _after(self) -> None:
        self.router.take_outgoing()  # the divert path's crafted RSTs: here the kernel rejects
        deadline = self.router.next_deadline()
        if deadline is not None:
            self._schedule(max(0.0, deadline - self._clock()))

    def _schedule(self, delay: float) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            if self._timer.when() <= self._loop.time() + delay:
                return
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._on_tick)

    def _on_tick(self) -> None:
        self._timer = None
        try:
            self.router.poll(self._clock())
            self.router.take_outgoing()
        except Exception:
            log.exception("[Router] router timers failed")
        deadline = self.router.next_deadline()
        self._schedule(TICK if deadline is None else max(0.0, min(TICK, deadline - self._clock())))

    def _pending_events(self) -> Iterator[ConnectEvent]:
        return pending_events(self.router, self.events, self._accept_pid, self._socket_closed)

    def _socket_closed(self, event: ConnectEventLike) -> None:
        # The verdict lives in the conntrack entry, which outlives the socket: the next socket given
        # this port (maybe another app's) must be decided afresh.
        self.conntrack.forget(event.proto, event.local_port, event.remote_addr, event.remote_port)

    def _apply_rules(self) -> None:
        streams, packets = self.slots.update(self._routes)
        for slot in sorted(set(packets) - self._route_slots):
            add_routes(packet_route_commands(slot, "add"), f"the routing of packet tunnel slot {slot}")
            self._route_slots.add(slot)
        self.firewall.apply(KernelRuleset(streams, packets, nft_queue=self.firewall.nft_queue))
        for slot in sorted(self._route_slots - set(packets)):
            delete_routes(packet_route_commands(slot, "del"))
            self._route_slots.discard(slot)


def _discard(packets: list[bytes]) -> None:
    """A detached device's decrypted packets go nowhere."""


def _configure_tun(ifname: str, route: PacketTunnelRoute, slot: int) -> None:
    """Addresses, MTU, the default route of the slot's table, and ``src_valid_mark`` (replies carry the
    slot's mark, so reverse-path filtering looks them up in that table and finds the TUN)."""
    import ipaddress

    from awg_split_tunnel.platform.linux.tun import ip_command, set_link

    set_link(ifname, mtu=route.mtu, up=True)
    with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv4/conf/{ifname}/src_valid_mark", "w") as f:
        f.write("1")
    table = str(packet_table(slot))
    if route.address_v4 is not None:
        ip_command("-4", "address", "add", f"{ipaddress.IPv4Address(route.address_v4)}/32", "dev", ifname)
        ip_command("-4", "route", "replace", "default", "dev", ifname, "table", table)
    if route.address_v6 is not None:
        address = ipaddress.IPv6Address(route.address_v6)
        ip_command("-6", "address", "add", f"{address}/128", "dev", ifname, "nodad")
        ip_command("-6", "route", "replace", "default", "dev", ifname, "table", table)


def serve_kernel_gate(settings: RouterSettings, open_events: Callable[..., Any], conn: Any) -> None:
    """The router process's body for ``dataplane: kernel`` (``RouterProcess(serve=...)``): the same
    ``RouterService`` as the divert path (devices, control messages, retries) around a ``KernelIO``."""
    from awg_split_tunnel.core.router_messages import StartFailed
    from awg_split_tunnel.router.service import run_with_devices

    configure_process_logging(settings.log_level, settings.log_file)
    states = dict(settings.states)
    slots = TunnelSlots()
    gate: list[KernelGate] = []
    try:
        router = process_router(
            settings,
            states,
            conn,
            peer_key=kernel_peer_key,
            reject_tcp=False,
            carries_packets=False,
            on_decided=lambda entry, packets: gate[0].decided(entry, packets),
        )
        firewall = KernelFirewall()
    except Exception as exc:
        known = isinstance(exc, AwgSplitTunnelError)
        conn.send(StartFailed(str(exc) if known else f"{type(exc).__name__}: {exc}"))
        return

    def make_io(router: Any, ports: list[int]) -> KernelIO:
        events, accept_pid = open_events()
        io = KernelIO(router, events, accept_pid, firewall, slots)
        gate.append(io.gate)
        return io

    run_with_devices(router, states, open_events, settings.devices, conn, make_io)
