"""From the validated config to the objects that route flows."""

from __future__ import annotations

from awg_split_tunnel.core.config import Config
from awg_split_tunnel.core.policy import DROP, FallbackPolicy
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.process.matcher import Platform


def engine_rules(config: Config) -> list[Rule]:
    return [Rule(r.process, r.tunnel, r.fallback) for r in config.rules]


def default_fallback(config: Config) -> FallbackPolicy:
    """Unmatched processes: `drop` as default drops; a tunnel default falls back like a plain rule."""
    return FallbackPolicy.DROP if config.default == DROP else FallbackPolicy.ALLOW_DIRECT


def engine_from_config(config: Config, platform: Platform | None = None) -> RuleEngine:
    """A RuleEngine for the config's rules and default."""
    return RuleEngine(
        engine_rules(config), config.default, platform, default_fallback=default_fallback(config)
    )


def update_engine(engine: RuleEngine, config: Config) -> None:
    """Swap a running engine's rules for the config's (cached decisions are dropped)."""
    engine.replace_rules(engine_rules(config), config.default, default_fallback=default_fallback(config))
