"""What the dashboard shows, from what the daemon's handlers answer (no I/O): connection rows with the
route a flow took and why, rule rows, config errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from awg_split_tunnel.core.config import Config
from awg_split_tunnel.core.policy import DIRECT, DROP, FallbackPolicy
from awg_split_tunnel.core.rule_engine import Decision
from awg_split_tunnel.errors import ConfigError

ROUTES = {"tunnel": "tunnel", "pass": "direct", "drop": "dropped", "reset": "dropped"}
"""A flow's verdict (``connections``' ``route``) as the dashboard names it."""


def app_name(path: str | None) -> str:
    """The exe name of a full path, Windows or POSIX."""
    if not path:
        return "?"
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or path


def _rule_name(decision: Decision) -> str:
    return "default" if decision.rule_index is None else f"rule #{decision.rule_index}"


def route_reason(verdict: str, decision: Decision | None, states: Mapping[str, str]) -> str:
    """Why a flow went the way it did, as the current rules explain it."""
    if verdict == "reset":
        return "its tunnel went down: reset"
    if decision is None:
        return ""
    rule, tunnel = _rule_name(decision), decision.tunnel
    state = states.get(tunnel, "down")
    if verdict == "tunnel":
        return rule
    if verdict == "pass":
        if tunnel == DIRECT:
            return f"{rule}: direct"
        if state != "up":
            return f"{rule}: {tunnel} {state}, fallback allow_direct"
        return f"{rule}: LAN destination bypasses {tunnel}"
    if tunnel == DROP:
        return f"{rule}: drop"
    if decision.fallback is FallbackPolicy.DROP:
        return f"{rule}: fallback drop"
    return f"{rule}: {tunnel} {state}, fallback {decision.fallback.value}"


def connection_rows(
    flows: Sequence[Mapping[str, Any]],
    decide: Callable[[str], Decision] | None,
    states: Mapping[str, str],
) -> list[dict[str, Any]]:
    """The daemon's ``connections`` flows as the dashboard's rows (``decide``: the current rules, None
    when the config cannot be read)."""
    rows: list[dict[str, Any]] = []
    for flow in flows:
        path = flow.get("exe")
        route = str(flow.get("route", ""))
        decision = decide(path) if decide is not None and path else None
        rows.append(
            {
                "app": app_name(path),
                "path": path or "",
                "pid": flow.get("pid"),
                "proto": flow.get("proto"),
                "src": flow.get("src"),
                "dst": flow.get("dst"),
                "route": ROUTES.get(route, route),
                "tunnel": flow.get("tunnel"),
                "reason": route_reason(route, decision, states),
                "out": flow.get("out", 0),
                "in": flow.get("in", 0),
                "bytes_out": flow.get("bytes_out", 0),
                "bytes_in": flow.get("bytes_in", 0),
                "age": flow.get("age"),
            }
        )
    return rows


def rules_view(config: Config) -> dict[str, Any]:
    """The rules in order, the default and where a rule may send an app."""
    return {
        "rules": [
            {"index": i, "process": r.process, "tunnel": r.tunnel, "fallback": r.fallback.value}
            for i, r in enumerate(config.rules)
        ],
        "default": config.default,
        "targets": [DIRECT, *config.tunnel_ids],
        "fallbacks": [f.value for f in FallbackPolicy],
        "error": None,
    }


def config_error(exc: ConfigError) -> dict[str, Any]:
    """A ConfigError as the page shows it: the whole message, and its file, line and key apart."""
    return {"message": str(exc), "reason": exc.reason, "file": exc.file, "line": exc.line, "key": exc.key}
