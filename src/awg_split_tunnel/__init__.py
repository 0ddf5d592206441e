"""AWG Split Tunnel: a multi-tunnel VPN client with per-process split tunnelling."""

__version__ = "0.1.0"
