"""The layers depend one way (docs/CONTRIBUTING.md): protocol cores are pure, core/ never imports adapters."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "awg_split_tunnel"

# Modules that do I/O or wire things together; nothing in core/ or a protocol core may import them.
ADAPTERS = (
    "awg_split_tunnel.cli",
    "awg_split_tunnel.daemon",
    "awg_split_tunnel.dns_forwarder",
    "awg_split_tunnel.dns_transport",
    "awg_split_tunnel.packet_tunnels",
    "awg_split_tunnel.tunnel_runtimes",
    "awg_split_tunnel.platform",
    "awg_split_tunnel.proxy",
    "awg_split_tunnel.lab",
    "awg_split_tunnel.router",
    "awg_split_tunnel.api",
    "awg_split_tunnel.ui",
    "awg_split_tunnel.provider.direct",
    "awg_split_tunnel.provider.health",
    "awg_split_tunnel.provider.socks5.provider",
    "awg_split_tunnel.provider.httpproxy.provider",
    "awg_split_tunnel.provider.wireguard.device",
    "awg_split_tunnel.provider.wireguard.tun_client",
    "awg_split_tunnel.provider.wireguard.uapi_socket",
)

PROTOCOL_CORES = (
    "provider/wireguard",
    "provider/amneziawg",
    "provider/socks5/protocol.py",
    "provider/httpproxy/protocol.py",
    "net",
)
# What a protocol core may import from the package: other protocol cores and the error types.
PROTOCOL_ALLOWED = (
    "awg_split_tunnel.errors",
    "awg_split_tunnel.provider.wireguard",
    "awg_split_tunnel.provider.amneziawg",
    "awg_split_tunnel.net",
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("awg_split_tunnel")}


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _files(sub: str) -> list[Path]:
    target = PACKAGE / sub
    if target.suffix == ".py":
        return [target] if target.exists() else []
    return sorted(target.rglob("*.py"))


def test_core_never_imports_adapters() -> None:
    offenders = {
        _module_name(f): sorted(n for n in _imports(f) if _is_under(n, ADAPTERS))
        for f in _files("core") + _files("dns")
    }
    assert {m: names for m, names in offenders.items() if names} == {}


def test_protocol_cores_import_only_protocol_code() -> None:
    offenders: dict[str, list[str]] = {}
    for sub in PROTOCOL_CORES:
        for f in _files(sub):
            module = _module_name(f)
            if _is_under(module, ADAPTERS):
                continue
            bad = sorted(n for n in _imports(f) if not _is_under(n, PROTOCOL_ALLOWED))
            if bad:
                offenders[module] = bad
    assert offenders == {}
