"""Where one app's lookup goes: the same fate as the app's flows (its rule, its tunnel's state, the
fallback policy), so that a ``block`` app whose tunnel is down gets an error, never a direct lookup."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from awg_split_tunnel.core.policy import DIRECT, DROP, FallbackPolicy, TunnelState
from awg_split_tunnel.core.rule_engine import Decision, Rule, resolve
from awg_split_tunnel.dns.message import REFUSED, SERVFAIL
from awg_split_tunnel.net.nat import FlowVerdict


@dataclass(frozen=True, slots=True)
class DnsRoute:
    """A lookup's route: ``via`` is ``direct`` (the local resolver, as without the daemon) or a tunnel id;
    ``rcode`` set means answer with that error and send nothing."""

    via: str
    rcode: int | None = None

    @property
    def refused(self) -> bool:
        return self.rcode is not None


STUB = DnsRoute(DIRECT)


def dns_route(decision: Decision, state: TunnelState | None) -> DnsRoute:
    """The route of a lookup by an app with this rule decision, its tunnel in ``state``.

    ``drop`` (as a tunnel or a policy) is answered REFUSED; a ``block`` app whose tunnel is not UP gets
    SERVFAIL, as a resolver that cannot reach its upstream would answer."""
    verdict = resolve(decision, state)
    if verdict is FlowVerdict.PASS:
        return STUB
    if verdict is FlowVerdict.TUNNEL:
        return DnsRoute(decision.tunnel)
    refused = decision.tunnel == DROP or decision.fallback is FallbackPolicy.DROP
    return DnsRoute(decision.tunnel, REFUSED if refused else SERVFAIL)


def exe_rule_pattern(exe: str) -> str:
    """A rule pattern matching exactly the executable at ``exe`` (a local resolver found by its socket)."""
    return f"re:^{re.escape(exe)}$"


def system_rules(resolver_processes: Iterable[str], system: str | None) -> list[Rule]:
    """``dns.system``: rules, put before the config's, that send the local resolver's own flows (its
    upstream lookups) into ``system`` (a tunnel id, ``block`` when it is down; or ``direct``), its port-53
    flows to that tunnel's DNS servers (``Rule.system_dns``). ``resolver_processes``
    are rule patterns: the resolver's exes (``exe_rule_pattern``) on Linux, ``service:Dnscache`` on
    Windows. None: no rule of its own, the resolver follows its rule or ``default`` like any process."""
    if system is None:
        return []
    fallback = FallbackPolicy.ALLOW_DIRECT if system == DIRECT else FallbackPolicy.BLOCK
    return [Rule(process, system, fallback, system_dns=True) for process in dict.fromkeys(resolver_processes)]
