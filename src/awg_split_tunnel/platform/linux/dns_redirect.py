"""Linux: apps' queries to the local resolver on loopback are redirected to the daemon's DNS listeners.

One nftables table of its own (``table inet awg_split_tunnel_dns``), the same on both data paths: a nat
rule in output sends UDP and TCP to ``<resolver address>:53`` to the listener of that address on
127.0.0.1 / ::1 (``redirect``: the listener sees the app's own address and port, and the reply goes back
un-NATed). Packets that carry any of our mark bits are left alone: the daemon's own queries to the local
resolver (direct apps' lookups, which go there as before) never come back to it (docs/DNS.md).

The table outlives a daemon that dies: apps' lookups then meet a closed port instead of leaving
directly (fail-closed, as the kernel data path's gate); ``awg-split-tunnel cleanup`` removes it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from awg_split_tunnel.platform.linux.kernel_rules import MARK_MASK
from awg_split_tunnel.platform.linux.nftables import Nftables, NftablesError

DNS_TABLE = "awg_split_tunnel_dns"
DNS_PORT = 53


def redirect_text(listeners: Mapping[str, int]) -> str:
    """One nft batch that replaces the table: queries to each resolver address (key) go to the daemon's
    listener port (value) on loopback of the same family."""
    lines = []
    for address, port in sorted(listeners.items()):
        family = "ip6" if ipaddress.ip_address(address).version == 6 else "ip"
        for proto in ("udp", "tcp"):
            lines.append(f"    {family} daddr {address} {proto} dport {DNS_PORT} redirect to :{port}")
    return (
        f"table inet {DNS_TABLE}\n"
        f"delete table inet {DNS_TABLE}\n"
        f"table inet {DNS_TABLE} {{\n"
        "  chain to_listener {\n"
        "    type nat hook output priority -100; policy accept;\n"
        f"    meta mark and 0x{MARK_MASK:08x} != 0 accept\n"
        + "".join(line + "\n" for line in lines)
        + "  }\n"
        "}\n"
    )


def removal_text() -> str:
    """An nft batch that removes the table whether it exists or not."""
    return f"table inet {DNS_TABLE}\ndelete table inet {DNS_TABLE}\n"


def install_redirect(listeners: Mapping[str, int]) -> None:
    """Apply ``redirect_text``; NftablesError naming nft's reason when refused."""
    with Nftables() as nft:
        nft.run(redirect_text(listeners))


def remove_redirect() -> list[str]:
    """Remove the table; what was removed (nothing when it was not there or nft cannot load)."""
    try:
        nft = Nftables()
    except NftablesError:
        return []
    with nft:
        try:
            nft.run(f"list table inet {DNS_TABLE}")
        except NftablesError:
            return []
        nft.run(removal_text())
    return [f"nftables table inet {DNS_TABLE}"]
