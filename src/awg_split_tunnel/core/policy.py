"""The small vocabulary shared by the config, the rule engine, the registry and the router."""

from __future__ import annotations

import enum

DIRECT = "direct"
"""Reserved tunnel id: send the flow unchanged (an exclusion when the default is a tunnel)."""

DROP = "drop"
"""Reserved tunnel id (only as ``default``): drop every unmatched flow."""

RESERVED_TUNNEL_IDS = frozenset({DIRECT, DROP})


class FallbackPolicy(enum.StrEnum):
    """What happens to a rule's flows when its tunnel is not UP (docs/DESIGN.md: Fallback policies)."""

    ALLOW_DIRECT = "allow_direct"
    BLOCK = "block"
    DROP = "drop"


class TunnelState(enum.StrEnum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"
    ERROR = "error"


class TunnelType(enum.StrEnum):
    AMNEZIAWG = "amneziawg"
    WIREGUARD = "wireguard"
    SOCKS5 = "socks5"
    HTTP = "http"

    @property
    def is_packet_tunnel(self) -> bool:
        return self in (TunnelType.AMNEZIAWG, TunnelType.WIREGUARD)
