"""RuleEngine: which tunnel and fallback policy a process's new flows get (docs/DESIGN.md).

Rules are tried in order and the first match wins, whatever the pattern kinds. Matching does not scan every
rule: exact exe names are a hash lookup, directories a walk down a tree of path components, and only the
wildcard, glob and regex rules are tried one by one, in rule order — wildcards and globs only when the
subject contains a fragment of their literal text (``_LiteralIndex``). Each part stops at the best rule
index found so far, and the answer is the smallest index any of them finds, which keeps first-match
semantics exact. Results are cached per exe path until the rules change.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from awg_split_tunnel.core.policy import DIRECT, DROP, FallbackPolicy, TunnelState
from awg_split_tunnel.net.nat import FlowVerdict
from awg_split_tunnel.process.matcher import ExePath, Pattern, PatternKind, Platform, compile_pattern

CACHE_SIZE = 65_536
"""Exe paths whose decisions are remembered; the cache is emptied when full (cheaper than LRU upkeep)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of the config's ``rules``: processes matching ``process`` go through ``tunnel``."""

    process: str
    tunnel: str
    fallback: FallbackPolicy = FallbackPolicy.ALLOW_DIRECT
    system_dns: bool = False
    """A rule of ``dns.system`` (``dns.route.system_rules``): the local resolver's port-53 flows into the
    tunnel are sent to that tunnel's DNS servers (docs/DNS.md)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a process's new flows go; ``rule_index`` is None when no rule matched (the default)."""

    tunnel: str
    fallback: FallbackPolicy
    rule_index: int | None
    system_dns: bool = False
    """From a rule of ``dns.system`` (``Rule.system_dns``)."""


def resolve(decision: Decision, tunnel_state: TunnelState | None) -> FlowVerdict:
    """Apply the fallback table (docs/DESIGN.md) to a decision and its tunnel's current state.

    ``direct`` passes and ``drop`` drops whatever the policy; policy ``drop`` drops even when the tunnel
    is UP (the table's first column); otherwise an UP tunnel carries the flow, and a tunnel in any other
    state (or unknown: ``None``) passes it for ``allow_direct`` and drops it for ``block``.
    """
    if decision.tunnel == DIRECT:
        return FlowVerdict.PASS
    if decision.tunnel == DROP or decision.fallback is FallbackPolicy.DROP:
        return FlowVerdict.DROP
    if tunnel_state is TunnelState.UP:
        return FlowVerdict.TUNNEL
    return FlowVerdict.PASS if decision.fallback is FallbackPolicy.ALLOW_DIRECT else FlowVerdict.DROP


@dataclass(slots=True)
class _DirectoryNode:
    children: dict[str, _DirectoryNode] = field(default_factory=dict)
    rule_index: int | None = None


FRAGMENT = 3
"""Length of the text fragments wildcard and glob patterns are indexed by."""

_Candidate = tuple[int, re.Pattern[str]]
# What separates the literal runs of a glob; ``**/`` matches zero directories, so its ``/`` is optional.
_WILDCARDS = re.compile(r"\*\*/|[*?]+")


class _LiteralIndex:
    """Wildcard or glob patterns, found through a piece of literal text each of them must contain.

    A pattern can only fullmatch a subject that contains every literal run of its text (the parts between
    ``*``, ``?`` and ``**/``), and a path glob only a path that has each of its literal directory
    components (``/opt/*/bin/x``: ``opt`` and ``bin``) as a whole component. So each pattern is filed
    under one such component, or else one ``FRAGMENT``-character piece of a literal run — whichever the
    fewest patterns share — and a lookup tries only the patterns filed under the components or fragments
    of its subject. Patterns with neither (``*``, ``a?b*``) are tried for every subject.
    """

    __slots__ = ("by_component", "by_fragment", "unindexed")

    def __init__(self, patterns: list[tuple[int, Pattern]], *, by_component: bool) -> None:
        self.by_component: dict[str, list[_Candidate]] = {}
        self.by_fragment: dict[str, list[_Candidate]] = {}
        self.unindexed: list[_Candidate] = []
        keys_of = [(index, pattern, _index_keys(pattern.key, by_component)) for index, pattern in patterns]
        # Text most patterns share (a common directory, say) would bring them all up for most subjects.
        shared_by = Counter(key for _, _, keys in keys_of for key in keys)
        for index, pattern, keys in keys_of:
            assert pattern.regex is not None
            if not keys:
                self.unindexed.append((index, pattern.regex))
                continue
            kind, text = min(keys, key=lambda k: (shared_by[k], len(self._table(k[0]).get(k[1], ())), k))
            self._table(kind).setdefault(text, []).append((index, pattern.regex))

    def _table(self, kind: str) -> dict[str, list[_Candidate]]:
        return self.by_component if kind == "component" else self.by_fragment

    def first(self, subject: str, components: Sequence[str], best: int | None) -> int | None:
        """The smallest index below ``best`` of a pattern fullmatching ``subject``, else ``best``.

        ``components`` is ``subject.split("/")`` (passed in because the caller has it already).
        """
        if self.by_component:
            best = self._first_in(self.by_component, components, subject, best)
        if self.by_fragment:
            fragments = [subject[i : i + FRAGMENT] for i in range(len(subject) - FRAGMENT + 1)]
            best = self._first_in(self.by_fragment, fragments, subject, best)
        for index, regex in self.unindexed:
            if best is not None and index >= best:
                break
            if regex.fullmatch(subject) is not None:
                return index
        return best

    @staticmethod
    def _first_in(
        table: dict[str, list[_Candidate]], keys: Sequence[str], subject: str, best: int | None
    ) -> int | None:
        for key in keys:
            candidates = table.get(key)
            if candidates is None:
                continue
            for index, regex in candidates:  # in rule order
                if best is not None and index >= best:
                    break
                if regex.fullmatch(subject) is not None:
                    best = index
                    break
        return best


def _index_keys(glob: str, by_component: bool) -> set[tuple[str, str]]:
    keys = {
        ("fragment", run[i : i + FRAGMENT])
        for run in _WILDCARDS.split(glob)
        for i in range(len(run) - FRAGMENT + 1)
    }
    if by_component:
        # Every component but the last is followed by a ``/`` in any path the glob matches, and preceded
        # by one or by the start: a literal one is a whole component of the path.
        keys.update(
            ("component", component)
            for component in glob.split("/")[:-1]
            if component and "*" not in component and "?" not in component
        )
    return keys


class _RuleIndex:
    """The compiled rules, indexed by pattern kind."""

    __slots__ = ("directories", "exact_names", "name_wildcards", "path_globs", "regexes")

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        self.exact_names: dict[str, int] = {}
        self.directories = _DirectoryNode()
        names: list[tuple[int, Pattern]] = []
        globs: list[tuple[int, Pattern]] = []
        self.regexes: list[tuple[int, re.Pattern[str]]] = []
        for index, pattern in enumerate(patterns):
            kind = pattern.kind
            if kind is PatternKind.EXE_NAME:
                self.exact_names.setdefault(pattern.key, index)
            elif kind is PatternKind.DIRECTORY:
                node = self.directories
                for component in pattern.components:
                    node = node.children.setdefault(component, _DirectoryNode())
                if node.rule_index is None:
                    node.rule_index = index
            elif kind is PatternKind.EXE_WILDCARD:
                names.append((index, pattern))
            elif kind is PatternKind.PATH_GLOB:
                globs.append((index, pattern))
            elif kind is PatternKind.SERVICE:
                continue  # matched by process id (``RuleEngine.services``), never by exe
            else:
                assert pattern.regex is not None
                self.regexes.append((index, pattern.regex))
        self.name_wildcards = _LiteralIndex(names, by_component=False)
        self.path_globs = _LiteralIndex(globs, by_component=True)

    def first_match(self, exe: ExePath) -> int | None:
        """The smallest index of a rule matching ``exe``, or None."""
        best = self.exact_names.get(exe.bare_name)

        node = self.directories
        components = exe.path.split("/")
        for component in components[:-1]:
            child = node.children.get(component)
            if child is None:
                break
            node = child
            if node.rule_index is not None:
                # No early exit: a deeper directory may come from an earlier rule.
                best = _smaller(best, node.rule_index)

        best = self.name_wildcards.first(exe.name, (), best)
        best = self.path_globs.first(exe.path, components, best)

        for index, regex in self.regexes:
            if best is not None and index >= best:
                break
            if regex.search(exe.path) is not None:
                return index
        return best


def _smaller(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


class RuleEngine:
    """Matches executables to rules; first match wins, ``default`` for the rest.

    ``default`` is ``direct``, ``drop`` or a tunnel id; unmatched processes get it with
    ``default_fallback`` (``drop`` for the ``drop`` default). ``cache_size=0`` disables the cache.
    Rules are swapped atomically by ``replace_rules``: a ``match`` running meanwhile answers from the
    rules it started with.
    """

    resolve = staticmethod(resolve)

    def __init__(
        self,
        rules: Sequence[Rule],
        default: str,
        platform: Platform | None = None,
        *,
        default_fallback: FallbackPolicy = FallbackPolicy.ALLOW_DIRECT,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.platform = platform or Platform.current()
        self._cache_size = cache_size
        self._install(rules, default, default_fallback)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        """The compiled pattern of each rule, in rule order."""
        return self._patterns

    @property
    def default(self) -> Decision:
        return self._default

    @property
    def services(self) -> tuple[tuple[str, Decision], ...]:
        """The ``service:`` rules (Windows): each service's name (lower case) and its rule's decision, in
        rule order. ``match`` never returns them: the router matches them by process id."""
        return self._services

    @property
    def cached_paths(self) -> int:
        """How many exe paths have a cached decision."""
        return len(self._state[0])

    def replace_rules(
        self, rules: Sequence[Rule], default: str, *, default_fallback: FallbackPolicy | None = None
    ) -> None:
        """Install new rules (and default); cached decisions are forgotten. ValueError on a bad pattern."""
        self._install(rules, default, default_fallback or self._default_fallback)

    def match(self, exe_path: str) -> Decision:
        """The decision for the executable at ``exe_path`` (a full path, or a bare exe name)."""
        cache, index, decisions, default = self._state
        decision = cache.get(exe_path)
        if decision is None:
            rule_index = index.first_match(ExePath.parse(exe_path, self.platform))
            decision = default if rule_index is None else decisions[rule_index]
            if self._cache_size:
                if len(cache) >= self._cache_size:
                    cache.clear()
                cache[exe_path] = decision
        return decision

    def match_uncached(self, exe_path: str) -> Decision:
        """``match`` without the cache (for dry runs and measurements)."""
        _, index, decisions, default = self._state
        rule_index = index.first_match(ExePath.parse(exe_path, self.platform))
        return default if rule_index is None else decisions[rule_index]

    def _install(self, rules: Sequence[Rule], default: str, default_fallback: FallbackPolicy) -> None:
        patterns: list[Pattern] = []
        for i, rule in enumerate(rules):
            try:
                patterns.append(compile_pattern(rule.process, self.platform))
            except ValueError as exc:
                raise ValueError(f"rule {i}: {exc}") from None
        if not default:
            raise ValueError("empty default tunnel")
        index = _RuleIndex(patterns)
        decisions = [Decision(rule.tunnel, rule.fallback, i, rule.system_dns) for i, rule in enumerate(rules)]
        fallback = FallbackPolicy.DROP if default == DROP else default_fallback
        self._rules = tuple(rules)
        self._patterns = tuple(patterns)
        self._default_fallback = default_fallback
        self._default = Decision(default, fallback, None)
        self._services = tuple(
            (pattern.key, decisions[i])
            for i, pattern in enumerate(patterns)
            if pattern.kind is PatternKind.SERVICE
        )
        # One tuple, swapped in one assignment: readers never see new rules with an old cache.
        self._state: tuple[dict[str, Decision], _RuleIndex, list[Decision], Decision] = (
            {},
            index,
            decisions,
            self._default,
        )
