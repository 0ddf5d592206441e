"""The kernel data path's rules as text: one nftables table and the first-packet gate (no I/O here).

A new outbound TCP/UDP flow's first packet is queued (NFQUEUE) to the router process, which decides it
and gives the packet a **mark** in our bits of the packet mark (``MARK_MASK``; other programs' bits are
left alone); the table copies it to the flow's conntrack mark, and every later packet of the flow is
handled by the kernel from that ct mark alone (docs/DATAPATHS.md):

- ``DIRECT``: nothing more — the flow is the kernel's.
- ``STREAM_BASE + k``: to stream tunnel k's local proxy. TCP by TPROXY: the packets get the ``LOCAL_ROUTE``
  bit, a policy rule (``LOCAL_TABLE``: ``local default dev lo``) loops them back through loopback, and
  prerouting hands them to the proxy's transparent listener on loopback — no NAT, so the connection keeps
  its 4-tuple (two connections from one app port to two servers, which Linux hands out under load, stay
  apart) and the proxy reads the original destination as its own address. UDP by ``redirect`` (nat) to
  the proxy's UDP port: one app socket reaches one destination through a stream tunnel at a time.
- ``PACKET_BASE + k``: into WireGuard/AmneziaWG tunnel k's TUN (``packet_ifname(k)``): the mark routes
  it (``packet_table(k)``: the TUN, and behind it an unreachable route, so a vanished TUN never lets the
  flow fall through to the main table), it leaves masqueraded to the tunnel's address with its MSS
  clamped to the TUN's MTU, and a guard drops it on any other interface. Replies from the TUN get the
  mark back, so strict reverse-path filtering finds them valid (``src_valid_mark`` on the TUN).
- ``SYSTEM_DNS`` (a bit beside the class, in the first packet's mark only): the local resolver's own lookup
  into packet tunnel k under ``dns.system`` — the ``system_dns`` chain DNATs it to tunnel k's DNS server
  (``PacketTunnelRules.dns_v4`` / ``dns_v6``), port 53 kept; conntrack carries the NAT for the flow's
  later packets and un-NATs the answers, so the resolver sees them come from the server it asked.
- ``BLOCK``: TCP answered with a reset, anything else dropped, in the kernel (retransmits never reach
  Python, and the verdict outlives the daemon).
- ``INBOUND``: set on new inbound flows (servers on this host) so their replies are never queued.

Where the kernel has nft ``queue`` the gate is a rule of the table; where it has not (``CONFIG_NFT_QUEUE``
unset, seen on Debian kernels' cloud builds) it is the xtables NFQUEUE target through iptables-nft, in a
chain of our own (``GATE_CHAIN``) jumped to from mangle OUTPUT. Either way the gate has no bypass: while
no router listens, new flows wait (fail-closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TABLE = "awg_split_tunnel"
"""``table inet awg_split_tunnel``: everything of ours in nftables."""
GATE_CHAIN = "AWG_SPLIT_TUNNEL"
"""The iptables-nft chain of the gate (mangle table, both families) when nft has no ``queue``."""
QUEUE_NUM = 4711
"""The NFQUEUE number (per network namespace)."""
MARK_SHIFT = 16
MARK_MASK = 0xFF << MARK_SHIFT
"""Our bits of the packet and conntrack marks."""

DIRECT = 0x01
BLOCK = 0x02
INBOUND = 0x03
STREAM_BASE = 0x10
STREAM_SLOTS = 0x60
"""Stream tunnels get classes 0x10..0x6f."""
PACKET_BASE = 0x80
PACKET_SLOTS = 0x80
"""WireGuard/AmneziaWG tunnels get classes 0x80..0xff."""
PACKET_TABLE_BASE = 52100
PACKET_RULE_PRIORITY = 5202

LOCAL_ROUTE = 0x01000000
"""The packet-mark bit that sends a stream tunnel's TCP packets back through loopback (to TPROXY)."""
LOCAL_TABLE = 52001
"""The routing table of ``LOCAL_ROUTE`` packets (``local default dev lo``, both families)."""
SYSTEM_DNS = 0x02000000
"""The packet-mark bit the gate adds to the first packet of a flow the router sends to its tunnel's DNS
server instead (``NatEntry.dns_server``: ``dns.system``, docs/DNS.md). Only NAT looks at it, and NAT
decides on a flow's first packet alone."""
RULE_PRIORITY = 5201
"""Our ip rules' priority (before ``main`` at 32766)."""

PRIORITY_MANGLE = -150


def mark_value(flow_class: int) -> int:
    """A flow class (``DIRECT``, ``STREAM_BASE + k``, …) as the bits of a mark."""
    return (flow_class & 0xFF) << MARK_SHIFT


@dataclass(frozen=True, slots=True)
class StreamRedirect:
    """Where a stream tunnel's flows go: its proxy's TCP and UDP ports (None: not carried, dropped)."""

    tcp_port: int | None
    udp_port: int | None


@dataclass(frozen=True, slots=True)
class PacketTunnelRules:
    """What the table needs of a WireGuard/AmneziaWG tunnel: its TUN's MTU (for the MSS clamp), and its
    first DNS server of each IP version (``SYSTEM_DNS`` flows are sent there)."""

    mtu: int
    dns_v4: str | None = None
    dns_v6: str | None = None


def packet_ifname(slot: int) -> str:
    """The TUN of packet tunnel slot ``slot``."""
    return f"awgst{slot}"


def packet_table(slot: int) -> int:
    """The routing table of packet tunnel slot ``slot``."""
    return PACKET_TABLE_BASE + slot


@dataclass(frozen=True, slots=True)
class KernelRuleset:
    """Everything the table depends on; ``table_text()`` is a function of it alone."""

    streams: Mapping[int, StreamRedirect] = field(default_factory=dict)
    """Stream tunnel slot (0..STREAM_SLOTS-1) → its proxy's ports."""
    packets: Mapping[int, PacketTunnelRules] = field(default_factory=dict)
    """Packet tunnel slot (0..PACKET_SLOTS-1) → its TUN's settings."""
    nft_queue: bool = False
    """Whether the gate is an nft ``queue`` rule (else the iptables-nft chain)."""
    queue_num: int = QUEUE_NUM

    def table_text(self) -> str:
        """One nft batch that replaces our table atomically (created empty first so ``delete`` cannot
        fail on a fresh host; the whole batch is one transaction)."""
        mask = f"0x{MARK_MASK:08x}"

        def is_class(flow_class: int) -> str:
            return f"ct mark and {mask} == 0x{mark_value(flow_class):08x}"

        classes = [DIRECT, BLOCK, *(STREAM_BASE + slot for slot in sorted(self.streams))]
        classes += [PACKET_BASE + slot for slot in sorted(self.packets)]
        save = "\n".join(
            f"    ct mark and {mask} == 0 meta mark and {mask} == 0x{mark_value(c):08x} "
            f"ct mark set ct mark or 0x{mark_value(c):08x}"
            for c in classes
        )
        redirects, not_carried, tproxy, reroute = [], [], [], []
        local = f"0x{LOCAL_ROUTE:08x}"
        for slot, ports in sorted(self.streams.items()):
            stream = is_class(STREAM_BASE + slot)
            if ports.tcp_port is not None:
                original = f"ct direction original {stream} meta l4proto tcp"
                reroute.append(f'    {original} oifname != "lo" meta mark set meta mark or {local}')
                tproxy.append(f"    {original} meta nfproto ipv4 tproxy ip to 127.0.0.1:{ports.tcp_port}")
                tproxy.append(f"    {original} meta nfproto ipv6 tproxy ip6 to [::1]:{ports.tcp_port}")
            else:
                not_carried.append(f"    {stream} meta l4proto tcp drop\n")
            if ports.udp_port is not None:
                redirects.append(f"    {stream} meta l4proto udp redirect to :{ports.udp_port}")
            else:
                not_carried.append(f"    {stream} meta l4proto udp drop\n")
        masquerade, guard, clamp_out, system_dns = [], [], [], []
        for slot, rules in sorted(self.packets.items()):
            packet, value, ifname = (
                is_class(PACKET_BASE + slot),
                mark_value(PACKET_BASE + slot),
                packet_ifname(slot),
            )
            reroute.append(f"    ct direction original {packet} meta mark set meta mark or 0x{value:08x}")
            guard.append(f'    ct direction original {packet} oifname != "{ifname}" drop')
            masquerade.append(f'    {packet} oifname "{ifname}" masquerade')
            for family, server in (("ip", rules.dns_v4), ("ip6", rules.dns_v6)):
                if server is not None:
                    nfproto = "ipv4" if family == "ip" else "ipv6"
                    system_dns.append(
                        f"    {packet} meta nfproto {nfproto} meta l4proto {{ tcp, udp }} th dport 53 "
                        f"dnat {family} to {server if family == 'ip' else f'[{server}]'}"
                    )
            clamp_out.append(f'    oifname "{ifname}" tcp flags syn tcp option maxseg size set rt mtu')
            tproxy.append(f'    iifname "{ifname}" meta mark set meta mark or 0x{value:08x}')
            for family, overhead in (("ipv4", 40), ("ipv6", 60)):
                mss = rules.mtu - overhead
                tproxy.append(
                    f'    iifname "{ifname}" meta nfproto {family} tcp flags syn '
                    f"tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
                )
        gate = ""
        if self.nft_queue:
            gate = (
                "  chain gate {\n"
                f"    type filter hook output priority {PRIORITY_MANGLE}; policy accept;\n"
                '    oifname "lo" accept\n'
                f"    ct state new meta l4proto {{ tcp, udp }} meta mark and {mask} == 0 "
                f"ct mark and {mask} == 0 queue num {self.queue_num}\n"
                "  }\n"
            )
        inbound = mark_value(INBOUND)
        # Every chain lets a direct flow's packets go at its first rule: most packets are theirs.
        return (
            f"table inet {TABLE}\n"
            f"delete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            "  chain inbound {\n"
            f"    type filter hook prerouting priority {PRIORITY_MANGLE}; policy accept;\n"
            f"    {is_class(DIRECT)} accept\n"
            + "".join(line + "\n" for line in tproxy)
            + f"    ct state new ct mark and {mask} == 0 ct mark set ct mark or 0x{inbound:08x}\n"
            "  }\n"
            f"{gate}"
            "  chain save {\n"
            f"    type filter hook output priority {PRIORITY_MANGLE + 1}; policy accept;\n"
            f"    ct mark and {mask} != 0 accept\n"
            f"{save}\n"
            "  }\n"
            "  chain reroute {\n"
            f"    type route hook output priority {PRIORITY_MANGLE + 2}; policy accept;\n"
            f"    {is_class(DIRECT)} accept\n" + "".join(line + "\n" for line in reroute) + "  }\n"
            "  chain to_proxy {\n"
            "    type nat hook output priority -100; policy accept;\n"
            + ("\n".join(redirects) + "\n" if redirects else "")
            + "  }\n"
            "  chain system_dns {\n"
            # Before to_proxy: both are NAT of locally generated packets, and only one may bind a flow.
            "    type nat hook output priority -101; policy accept;\n"
            f"    meta mark and 0x{SYSTEM_DNS:08x} == 0 accept\n"
            + "".join(line + "\n" for line in system_dns)
            + "  }\n"
            "  chain packet_tunnels {\n"
            "    type filter hook postrouting priority -1; policy accept;\n"
            f"    {is_class(DIRECT)} accept\n"
            + "".join(line + "\n" for line in [*guard, *clamp_out])
            + "  }\n"
            "  chain source_nat {\n"
            "    type nat hook postrouting priority 100; policy accept;\n"
            + "".join(line + "\n" for line in masquerade)
            + "  }\n"
            "  chain blocked {\n"
            "    type filter hook output priority 0; policy accept;\n"
            f"    {is_class(DIRECT)} accept\n"
            # Only the app's own packets: the reset that answers them belongs to the same conntrack entry
            # (reply direction) and must reach the app, which then fails at once ("connection refused").
            f"    ct direction original {is_class(BLOCK)} meta l4proto tcp reject with tcp reset\n"
            f"    ct direction original {is_class(BLOCK)} drop\n"
            f"{''.join(not_carried)}"
            "  }\n"
            "}\n"
        )


def gate_rules(queue_num: int = QUEUE_NUM) -> list[list[str]]:
    """The iptables-nft rules of ``GATE_CHAIN`` (arguments after ``-A GATE_CHAIN``), the same for both
    families: loopback is never gated; a new TCP/UDP flow whose packet and ct marks have none of our bits
    is queued, without bypass."""
    mask = f"0/0x{MARK_MASK:08x}"
    gated = ["-m", "conntrack", "--ctstate", "NEW", "-m", "mark", "--mark", mask, "-m", "connmark"]
    gated += ["--mark", mask, "-j", "NFQUEUE", "--queue-num", str(queue_num)]
    return [["-o", "lo", "-j", "RETURN"], ["-p", "tcp", *gated], ["-p", "udp", *gated]]


def local_route_commands(action: str) -> list[list[str]]:
    """``ip`` arguments that add (``action="add"``) or delete the loopback route of ``LOCAL_ROUTE``
    packets, both families."""
    mark = f"0x{LOCAL_ROUTE:x}/0x{LOCAL_ROUTE:x}"
    commands = []
    for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        commands.append(
            [family, "rule", action, "fwmark", mark, "lookup", str(LOCAL_TABLE), "pref", str(RULE_PRIORITY)]
        )
        commands.append([family, "route", action, "local", default, "dev", "lo", "table", str(LOCAL_TABLE)])
    return commands


def packet_route_commands(slot: int, action: str) -> list[list[str]]:
    """``ip`` arguments that add or delete packet tunnel ``slot``'s policy rule and the unreachable route
    behind its TUN, both families (the TUN's own default route comes and goes with the TUN)."""
    value, table = mark_value(PACKET_BASE + slot), str(packet_table(slot))
    mark = f"0x{value:x}/0x{MARK_MASK:x}"
    commands = []
    for family in ("-4", "-6"):
        commands.append(
            [family, "rule", action, "fwmark", mark, "lookup", table, "pref", str(PACKET_RULE_PRIORITY)]
        )
        commands.append([family, "route", action, "unreachable", "default", "metric", "4000", "table", table])
    return commands


def removal_text() -> str:
    """An nft batch that removes our table whether it exists or not."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n"
