"""Where a lookup goes: the app's rule, its tunnel's state and the fallback policy, as for its flows."""

from __future__ import annotations

from pathlib import Path

import pytest

from awg_split_tunnel.core.policy import DIRECT, DROP, FallbackPolicy, TunnelState
from awg_split_tunnel.core.rule_engine import Decision
from awg_split_tunnel.dns.message import REFUSED, SERVFAIL
from awg_split_tunnel.dns.route import STUB, DnsRoute, dns_route
from awg_split_tunnel.dns.upstream import nameservers, route_servers, system_upstream_servers

BLOCK, ALLOW, DROP_POLICY = FallbackPolicy.BLOCK, FallbackPolicy.ALLOW_DIRECT, FallbackPolicy.DROP


@pytest.mark.parametrize(
    ("tunnel", "fallback", "state", "route"),
    [
        ("wg", BLOCK, TunnelState.UP, DnsRoute("wg")),
        ("wg", ALLOW, TunnelState.UP, DnsRoute("wg")),
        ("wg", BLOCK, TunnelState.DOWN, DnsRoute("wg", SERVFAIL)),
        ("wg", BLOCK, TunnelState.CONNECTING, DnsRoute("wg", SERVFAIL)),
        ("wg", BLOCK, None, DnsRoute("wg", SERVFAIL)),
        ("wg", ALLOW, TunnelState.DOWN, STUB),
        ("wg", DROP_POLICY, TunnelState.UP, DnsRoute("wg", REFUSED)),
        (DROP, ALLOW, None, DnsRoute(DROP, REFUSED)),
        (DIRECT, BLOCK, None, STUB),
    ],
)
def test_a_lookup_has_the_fate_of_the_apps_flows(
    tunnel: str, fallback: FallbackPolicy, state: TunnelState | None, route: DnsRoute
) -> None:
    assert dns_route(Decision(tunnel, fallback, 0), state) == route


def test_resolv_conf_names_upstream_servers_without_loopback_stubs_or_scopes() -> None:
    text = "# c\nnameserver 127.0.0.53\nnameserver 1.1.1.1\nnameserver fe80::1%eth0\nnameserver bogus\n"
    text += "search lan\nnameserver 1.1.1.1\nnameserver ::1\n"
    assert nameservers(text) == ["1.1.1.1", "fe80::1"]


def test_the_system_servers_come_from_the_first_file_that_names_any(tmp_path: Path) -> None:
    stub, real = tmp_path / "stub.conf", tmp_path / "real.conf"
    stub.write_text("nameserver 127.0.0.53\n")
    real.write_text("nameserver 9.9.9.9\n")
    assert system_upstream_servers([tmp_path / "missing", stub, real]) == ["9.9.9.9"]
    assert system_upstream_servers([stub]) == []


def test_a_tunnel_without_servers_asks_the_systems_through_itself() -> None:
    assert route_servers(["10.8.0.1"], ["9.9.9.9"]) == ["10.8.0.1"]
    assert route_servers([], ["9.9.9.9"]) == ["9.9.9.9"]


def test_dns_system_gives_the_local_resolver_a_rule_of_its_own_before_the_others() -> None:
    from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
    from awg_split_tunnel.dns.route import exe_rule_pattern, system_rules
    from awg_split_tunnel.process.matcher import Platform

    exe = "/usr/lib/systemd/systemd-resolved"
    resolvers = [exe_rule_pattern(e) for e in (exe, exe, "/usr/sbin/dnsmasq")]
    assert system_rules(resolvers, None) == []
    rules = system_rules(resolvers, "nl-awg")
    assert [r.tunnel for r in rules] == ["nl-awg", "nl-awg"] and rules[0].fallback is BLOCK
    engine = RuleEngine([*rules, Rule("systemd-resolved", "direct")], "direct", Platform.POSIX)
    # Marked as dns.system's: its lookups into a packet tunnel go to that tunnel's DNS servers.
    assert engine.match(exe) == Decision("nl-awg", BLOCK, 0, system_dns=True)
    assert engine.match("/opt/other/systemd-resolved") == Decision("direct", ALLOW, 2)  # the exact exe only
    assert system_rules(resolvers, DIRECT)[0].fallback is ALLOW
