"""The `tun` command: our WireGuard/AmneziaWG device on a Linux TUN, a standalone userspace client like
wireguard-go + wg-quick.

It creates the interface, sets its addresses and MTU, adds a route for every AllowedIPs prefix (a
default route the way wg-quick does it: a separate table, a fwmark on our own UDP socket and two policy
rules, so the encrypted datagrams themselves do not loop into the tunnel), runs until SIGINT/SIGTERM and
then removes everything it added. While it runs, `wg` (`awg` for an AmneziaWG device) shows and changes
the device through its control socket named after the interface (docs/UAPI.md). `Table = off` skips
routes; `Table = N` puts them in table N. DNS and the Pre/PostUp hooks are not applied (the daemon
handles DNS; hooks are never executed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from awg_split_tunnel.errors import ConfigError, TunnelError
from awg_split_tunnel.platform.linux import tun as linux_tun
from awg_split_tunnel.provider.wireguard.conf import WgConf, parse_conf
from awg_split_tunnel.provider.wireguard.device import WireGuardDevice, settings_from_conf
from awg_split_tunnel.provider.wireguard.timers import TimerSettings
from awg_split_tunnel.provider.wireguard.uapi_socket import UapiSocket, serve_uapi

log = logging.getLogger("awg_split_tunnel.wireguard")

DEFAULT_IFNAME = "awg0"
DEFAULT_TABLE = 51820  # wg-quick's choice: the table and the fwmark of the default-route setup
TUN_READ_BATCH = 64


@dataclass(slots=True)
class RoutePlan:
    """What routing the interface needs: plain routes, and default routes through policy routing."""

    routes: list[linux_tun.Network] = field(default_factory=list)
    default_families: list[int] = field(default_factory=list)
    table: str | None = None
    fwmark: int = 0


def plan_routes(conf: WgConf) -> RoutePlan:
    """The routes for the AllowedIPs of every peer, as wg-quick would add them."""
    iface = conf.interface
    plan = RoutePlan()
    table = (iface.table or "").strip().lower()
    if table == "off":
        return plan
    if table and table != "auto":
        plan.table = table
    seen: set[linux_tun.Network] = set()
    for peer in conf.peers:
        for network in peer.allowed_ips:
            if network in seen:
                continue
            seen.add(network)
            if network.prefixlen == 0 and plan.table is None:
                plan.default_families.append(network.version)
            else:
                plan.routes.append(network)
    # Most specific first, like wg-quick (it sorts by prefix length, longest first).
    plan.routes.sort(key=lambda n: n.prefixlen, reverse=True)
    if plan.default_families:
        plan.fwmark = iface.fwmark or DEFAULT_TABLE
    return plan


class TunClient:
    """One `tun` session: interface, device and routes; `run` returns after `stop()` or a signal."""

    def __init__(
        self,
        conf: WgConf,
        ifname: str = DEFAULT_IFNAME,
        *,
        file: str | None = None,
        vnet_hdr: bool = True,
        timers: TimerSettings | None = None,
    ) -> None:
        self.conf = conf
        self.ifname = ifname
        self.file = file
        self.vnet_hdr = vnet_hdr
        self.timers = timers
        self.plan = plan_routes(conf)
        self.device: WireGuardDevice | None = None
        self.tun: linux_tun.Tun | None = None
        self.uapi: UapiSocket | None = None
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._stop: asyncio.Event | None = None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self, ready: Callable[[TunClient], None] | None = None) -> None:
        """Bring everything up, wait for `stop()`, tear everything down (also on errors)."""
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        settings = settings_from_conf(self.conf, file=self.file)
        if self.plan.fwmark and not settings.fwmark:
            settings = dataclasses.replace(settings, fwmark=self.plan.fwmark)
        try:
            # The vnet header lets decrypted TCP segments reach the kernel merged (one write per run);
            # reads stay MTU-size, as cutting TSO super-packets in Python costs more than reading.
            self.tun = linux_tun.Tun.open(self.ifname, vnet_hdr=self.vnet_hdr, read_offload=False)
            self._undo.append(("close the TUN", self.tun.close))
            tun = self.tun
            device = self.device = WireGuardDevice(
                settings, tunnel_id=self.ifname, on_packets=self._write_packets, timers=self.timers
            )
            linux_tun.set_link(tun.name, mtu=settings.mtu, up=True)
            for address in self.conf.interface.addresses:
                linux_tun.add_address(tun.name, address)
            self._add_routes()
            await device.start()
            self.uapi = await serve_uapi(device, tun.name, amnezia=settings.amnezia is not None)
            loop.add_reader(tun.fd, self._on_tun_readable)
            self._undo.append(("stop reading the TUN", functools.partial(_remove_reader, loop, tun.fd)))
            log.info(
                "%s %s up: %s, listening on UDP %d, public key %s",
                device.log_tag,
                tun.name,
                ", ".join(str(a) for a in self.conf.interface.addresses) or "no address",
                device.port,
                _b64(device.public_key),
            )
            if ready is not None:
                ready(self)
            await self._stop.wait()
        finally:
            if self.uapi is not None:
                await self.uapi.stop()
                self.uapi = None
            if self.device is not None:
                await self.device.stop()
            self._teardown()

    def _write_packets(self, packets: list[bytes]) -> None:
        if self.tun is not None:
            self.tun.write_packets(packets)

    def _on_tun_readable(self) -> None:
        tun, device = self.tun, self.device
        if tun is None or device is None:
            return
        packets = tun.read_packets(TUN_READ_BATCH)
        if packets:
            device.send_packets(packets)

    def _add_routes(self) -> None:
        plan = self.plan
        name = self.ifname
        for network in plan.routes:
            try:
                linux_tun.add_route(name, network, table=plan.table)
            except TunnelError as exc:
                # An existing identical route (another interface's) is the usual cause: keep going, as the
                # rest of the tunnel still works, and say so.
                log.warning("[WG] %s: route %s not added: %s", name, network, exc)
                continue
            self._undo.append(
                (
                    f"remove route {network}",
                    _quiet(functools.partial(linux_tun.delete_route, name, network, table=plan.table)),
                )
            )
        for version in plan.default_families:
            family = "-4" if version == 4 else "-6"
            default = "0.0.0.0/0" if version == 4 else "::/0"
            table, mark = str(DEFAULT_TABLE), str(plan.fwmark)
            linux_tun.ip_command(family, "route", "add", default, "dev", name, "table", table)
            rule_mark = (family, "rule", "add", "not", "fwmark", mark, "table", table)
            linux_tun.ip_command(*rule_mark)
            self._undo.append(("remove fwmark rule", _quiet(functools.partial(_delete_rule, rule_mark))))
            rule_main = (family, "rule", "add", "table", "main", "suppress_prefixlength", "0")
            linux_tun.ip_command(*rule_main)
            self._undo.append(("remove suppress rule", _quiet(functools.partial(_delete_rule, rule_main))))

    def _teardown(self) -> None:
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # teardown continues whatever one step says
                log.warning("[WG] %s: could not %s: %s", self.ifname, what, exc)
        self._undo.clear()
        self.tun = None


def _remove_reader(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    loop.remove_reader(fd)


def _delete_rule(rule: tuple[str, ...]) -> None:
    linux_tun.ip_command(*[("del" if part == "add" else part) for part in rule])


def _quiet(action: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with contextlib.suppress(TunnelError):
            action()

    return run


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def run_tun_client(conf_path: str | os.PathLike[str], ifname: str = DEFAULT_IFNAME) -> int:
    """The `tun` command: returns the exit code (0 after a clean SIGINT/SIGTERM, 1 on an error, with a
    message on stderr naming what to fix)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    path = Path(conf_path)
    try:
        if sys.platform != "linux":
            raise TunnelError("the tun command needs Linux (/dev/net/tun)")
        if os.geteuid() != 0:
            raise TunnelError("the tun command needs root (creating an interface needs CAP_NET_ADMIN)")
        if not os.path.exists(linux_tun.TUN_PATH):
            raise TunnelError(f"{linux_tun.TUN_PATH} does not exist: load the 'tun' kernel module")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
        conf = parse_conf(text, file=str(path))
        if not conf.peers:
            raise ConfigError("no [Peer] section: nothing to connect to", file=str(path))
        client = TunClient(conf, ifname, file=str(path))
        asyncio.run(_run_until_signalled(client))
    except (ConfigError, TunnelError) as exc:
        print(f"awg-split-tunnel tun: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_until_signalled(client: TunClient) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, client.stop)
    try:
        await client.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        device = client.device
        if device is not None:
            for peer in device.peer_statistics():
                log.info(
                    "[WG] %s: peer %s rx %d B, tx %d B",
                    client.ifname,
                    _b64(peer.public_key),
                    peer.rx_bytes,
                    peer.tx_bytes,
                )
            stats = device.stats
            log.info(
                "[WG] %s: %d datagrams in, %d out (%d GSO writes); dropped %s",
                client.ifname,
                stats.datagrams_in,
                stats.datagrams_out,
                stats.gso_sends,
                device.dropped or "nothing",
            )


def main(argv: list[str] | None = None) -> int:
    """`python -m awg_split_tunnel.provider.wireguard.tun_client FILE.conf [--ifname NAME]`."""
    parser = argparse.ArgumentParser(description="Run a WireGuard/AmneziaWG .conf on a TUN interface.")
    parser.add_argument("conf")
    parser.add_argument("--ifname", default=DEFAULT_IFNAME)
    args = parser.parse_args(argv)
    return run_tun_client(args.conf, args.ifname)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["DEFAULT_IFNAME", "RoutePlan", "TunClient", "main", "plan_routes", "run_tun_client"]
