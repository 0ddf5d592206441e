"""Wiring of the WireGuard/AmneziaWG tunnels of a config into the router (used by the daemon).

Each packet tunnel becomes a `PacketTunnelRoute` (the addresses its peer knows us by, its MTU) and a
factory for its `WireGuardDevice`; the router process builds the devices itself, next to its divert
handles, so packets never cross a process boundary (router/divert_loop.py explains why). The daemon
builds them at start and for every packet tunnel added or changed while it runs (``packet_tunnel_devices``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path

from awg_split_tunnel.core.config import AnyTunnel, PacketTunnel, tunnel_wg_conf
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.platform.linux.kernel_rules import DIRECT, mark_value
from awg_split_tunnel.provider.wireguard.device import WireGuardDevice, settings_from_conf
from awg_split_tunnel.router.process import DeviceFactory

DIVERT_SAFE_UDP_GSO = False
"""eBPFDivert workaround: with the divert handles open in the sending namespace, UDP GSO sends (several
datagrams in one sendmsg) from the device's own socket were lost — never counted as dropped anywhere,
although the capture filter excludes that port. Always while the filter has the IPv4 fragment clause
(``ip.FragOff > 0``): tests/e2e/test_split_wg.py's concurrent test failed 3 of 3 runs with GSO, passed
3 of 3 without; and now and then without the clause (the concurrent daemon test stalled TCP flows in 6
of 8 runs). A SNIFF handle never sees those batches and a plain veth delivers them, so the loss is inside
the backend (``scripts/repro/fragment_clause_with_port.py`` shows the port exclusion itself holds). So
devices that share a namespace with the router send one datagram per call (the `tun` command keeps
GSO)."""


OWN_TRAFFIC_MARK = mark_value(DIRECT)
"""On the kernel data path the daemon's own sockets — the devices' UDP sockets, the proxies' upstream
connections — carry the DIRECT class in their mark: never queued, never routed into a tunnel."""


def packet_tunnel_devices(
    tunnels: Iterable[AnyTunnel], base_dir: Path, dataplane: str = "divert"
) -> tuple[dict[str, PacketTunnelRoute], dict[str, DeviceFactory]]:
    """Routes and device factories for the amneziawg/wireguard tunnels among `tunnels` (the others are
    skipped): at start, and for tunnels added or changed while running. Resolves endpoints (blocking);
    ConfigError naming the tunnel's file and key when its settings cannot make a working device.

    On the kernel data path the devices send with UDP GSO (the divert backend's loss of GSO batches does
    not apply: nothing is diverted) and mark their datagrams DIRECT."""
    routes: dict[str, PacketTunnelRoute] = {}
    devices: dict[str, DeviceFactory] = {}
    for tunnel in tunnels:
        if not isinstance(tunnel, PacketTunnel):
            continue
        conf = tunnel_wg_conf(tunnel)
        source = str(base_dir / tunnel.config_file) if tunnel.config_file else None
        try:
            settings = settings_from_conf(conf, file=source)
        except ConfigError as exc:
            # Name the tunnel: an inline tunnel's error has no file to point at.
            raise ConfigError(
                f"tunnel '{tunnel.id}': {exc.reason}", file=exc.file or source, line=exc.line, key=exc.key
            ) from None
        routes[tunnel.id] = PacketTunnelRoute.from_addresses(
            [str(a) for a in conf.interface.addresses],
            settings.mtu,
            lan_bypass=tunnel.lan_bypass,
            listen_port=settings.listen_port,
            dns_servers=[str(address) for address in conf.interface.dns],
        )
        gso = DIVERT_SAFE_UDP_GSO
        if dataplane == "kernel":
            settings = dataclasses.replace(settings, fwmark=settings.fwmark | OWN_TRAFFIC_MARK)
            gso = True
        devices[tunnel.id] = functools.partial(WireGuardDevice, settings, tunnel_id=tunnel.id, udp_gso=gso)
    return routes, devices
