"""RuleEngine: first match wins across pattern kinds, the default for the rest, the fallback table."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.rule_engine import Decision, Rule, RuleEngine, resolve
from awg_split_tunnel.net.nat import FlowVerdict
from awg_split_tunnel.process.matcher import Platform, compile_pattern

W = Platform.WINDOWS
P = Platform.POSIX
ALLOW = FallbackPolicy.ALLOW_DIRECT
BLOCK = FallbackPolicy.BLOCK
DROP_POLICY = FallbackPolicy.DROP

WINDOWS_RULES = [
    Rule("firefox.exe", "nl-awg", BLOCK),
    Rule("*telegram*", "office"),
    Rule("C:\\Games\\", "nl-awg"),
    Rule("C:/Tools/*/bin/curl", "corp"),
    Rule("re:.*\\\\steam(webhelper)?\\.exe$", "office", DROP_POLICY),
]

POSIX_RULES = [
    Rule("firefox", "nl-awg", BLOCK),
    Rule("*telegram*", "office"),
    Rule("/opt/games/", "nl-awg"),
    Rule("/opt/tools/*/bin/curl", "corp"),
    Rule("re:/steam(webhelper)?$", "office", DROP_POLICY),
]


class TestEachKindOnWindows:
    engine = RuleEngine(WINDOWS_RULES, "direct", W)

    @pytest.mark.parametrize(
        ("path", "tunnel", "index"),
        [
            (r"C:\Program Files\Mozilla Firefox\firefox.exe", "nl-awg", 0),
            ("FIREFOX", "nl-awg", 0),
            (r"C:\Users\a\AppData\Roaming\Telegram Desktop\Telegram.exe", "office", 1),
            (r"C:\Games\Doom\doom.exe", "nl-awg", 2),
            ("c:/games/a/b/c/d.exe", "nl-awg", 2),
            (r"C:\Tools\v8\bin\curl.exe", "corp", 3),
            (r"C:\Program Files (x86)\Steam\steamwebhelper.exe", "office", 4),
            (r"C:\Windows\notepad.exe", "direct", None),
        ],
    )
    def test_match(self, path: str, tunnel: str, index: int | None) -> None:
        decision = self.engine.match(path)
        assert (decision.tunnel, decision.rule_index) == (tunnel, index)

    def test_decision_carries_the_rules_fallback(self) -> None:
        assert self.engine.match(r"C:\Steam\steam.exe") == Decision("office", DROP_POLICY, 4)
        assert self.engine.match("firefox.exe") == Decision("nl-awg", BLOCK, 0)


class TestEachKindOnPosix:
    engine = RuleEngine(POSIX_RULES, "direct", P)

    @pytest.mark.parametrize(
        ("path", "tunnel", "index"),
        [
            ("/usr/lib/firefox/firefox", "nl-awg", 0),
            ("/usr/lib/firefox/Firefox", "direct", None),
            ("/opt/telegram/telegram-desktop", "office", 1),
            ("/opt/games/quake/bin/quake", "nl-awg", 2),
            ("/opt/gamesx/quake", "direct", None),
            ("/opt/tools/v8/bin/curl", "corp", 3),
            ("/opt/tools/v8/x/bin/curl", "direct", None),
            ("/home/a/.steam/steam", "office", 4),
        ],
    )
    def test_match(self, path: str, tunnel: str, index: int | None) -> None:
        decision = self.engine.match(path)
        assert (decision.tunnel, decision.rule_index) == (tunnel, index)


class TestFirstMatchWins:
    def test_an_earlier_wildcard_beats_a_later_exact_name(self) -> None:
        engine = RuleEngine([Rule("*fox*", "a"), Rule("firefox", "b")], "direct", P)
        assert engine.match("/usr/bin/firefox").tunnel == "a"

    def test_an_earlier_deep_directory_beats_a_later_shallow_one(self) -> None:
        engine = RuleEngine([Rule("/opt/tools/", "a"), Rule("/opt/", "b")], "direct", P)
        assert engine.match("/opt/tools/x").tunnel == "a"
        assert engine.match("/opt/other/x").tunnel == "b"

    def test_an_earlier_shallow_directory_beats_a_later_deep_one(self) -> None:
        engine = RuleEngine([Rule("/opt/", "a"), Rule("/opt/tools/", "b")], "direct", P)
        assert engine.match("/opt/tools/x").tunnel == "a"

    def test_an_earlier_regex_beats_later_names_and_directories(self) -> None:
        engine = RuleEngine([Rule("re:curl", "a"), Rule("curl", "b"), Rule("/usr/", "c")], "direct", P)
        assert engine.match("/usr/bin/curl").tunnel == "a"
        assert engine.match("/usr/bin/wget").tunnel == "c"

    def test_an_exclusion_before_a_tunnel_default(self) -> None:
        engine = RuleEngine([Rule("steam.exe", "direct")], "nl-awg", W)
        assert engine.match(r"C:\Steam\steam.exe").tunnel == "direct"
        assert engine.match(r"C:\Apps\other.exe") == Decision("nl-awg", ALLOW, None)

    def test_duplicate_patterns_keep_the_first(self) -> None:
        engine = RuleEngine(
            [Rule("curl", "a"), Rule("curl", "b"), Rule("/x/", "c"), Rule("/x/", "d")], "direct", P
        )
        assert engine.match("/bin/curl").tunnel == "a"
        assert engine.match("/x/y").tunnel == "c"


class TestDefault:
    def test_drop_default(self) -> None:
        engine = RuleEngine([], "drop", P)
        assert engine.match("/usr/bin/anything") == Decision("drop", DROP_POLICY, None)
        assert resolve(engine.match("/usr/bin/anything"), None) is FlowVerdict.DROP

    def test_tunnel_default_with_a_chosen_fallback(self) -> None:
        engine = RuleEngine([], "nl-awg", P, default_fallback=BLOCK)
        assert engine.match("/bin/x") == Decision("nl-awg", BLOCK, None)

    def test_empty_default_is_refused(self) -> None:
        with pytest.raises(ValueError, match="default"):
            RuleEngine([], "", P)


class TestCache:
    def test_replace_rules_forgets_cached_decisions(self) -> None:
        engine = RuleEngine([Rule("curl", "a")], "direct", P)
        assert engine.match("/bin/curl").tunnel == "a"
        assert engine.cached_paths == 1
        engine.replace_rules([Rule("curl", "b")], "drop")
        assert engine.cached_paths == 0
        assert engine.match("/bin/curl").tunnel == "b"
        assert engine.match("/bin/wget").tunnel == "drop"

    def test_cache_stays_bounded_and_answers_stay_right(self) -> None:
        engine = RuleEngine([Rule("/opt/", "a")], "direct", P, cache_size=8)
        for i in range(100):
            assert engine.match(f"/opt/app{i}").tunnel == "a"
            assert engine.match(f"/usr/app{i}").tunnel == "direct"
            assert engine.cached_paths <= 8

    def test_cache_can_be_disabled(self) -> None:
        engine = RuleEngine([Rule("curl", "a")], "direct", P, cache_size=0)
        assert engine.match("/bin/curl").tunnel == "a"
        assert engine.cached_paths == 0

    def test_bad_rule_names_its_index_and_keeps_the_old_rules(self) -> None:
        engine = RuleEngine([Rule("curl", "a")], "direct", P)
        with pytest.raises(ValueError, match=r"rule 1: invalid regular expression"):
            engine.replace_rules([Rule("wget", "b"), Rule("re:[", "c")], "direct")
        assert engine.match("/bin/curl").tunnel == "a"
        assert [r.process for r in engine.rules] == ["curl"]


class TestResolve:
    """The fallback table (docs/DESIGN.md: Fallback policies)."""

    @pytest.mark.parametrize(
        ("policy", "state", "action"),
        [
            (ALLOW, TunnelState.UP, FlowVerdict.TUNNEL),
            (ALLOW, TunnelState.DOWN, FlowVerdict.PASS),
            (ALLOW, TunnelState.CONNECTING, FlowVerdict.PASS),
            (ALLOW, TunnelState.ERROR, FlowVerdict.PASS),
            (ALLOW, None, FlowVerdict.PASS),
            (BLOCK, TunnelState.UP, FlowVerdict.TUNNEL),
            (BLOCK, TunnelState.DOWN, FlowVerdict.DROP),
            (BLOCK, TunnelState.CONNECTING, FlowVerdict.DROP),
            (BLOCK, None, FlowVerdict.DROP),
            (DROP_POLICY, TunnelState.UP, FlowVerdict.DROP),
            (DROP_POLICY, TunnelState.DOWN, FlowVerdict.DROP),
        ],
    )
    def test_tunnel_rule(
        self, policy: FallbackPolicy, state: TunnelState | None, action: FlowVerdict
    ) -> None:
        assert resolve(Decision("nl-awg", policy, 0), state) is action

    @pytest.mark.parametrize("policy", list(FallbackPolicy))
    def test_direct_always_passes(self, policy: FallbackPolicy) -> None:
        assert resolve(Decision("direct", policy, 0), None) is FlowVerdict.PASS

    @pytest.mark.parametrize("state", [*TunnelState, None])
    def test_drop_default_always_drops(self, state: TunnelState | None) -> None:
        assert resolve(Decision("drop", ALLOW, None), state) is FlowVerdict.DROP

    def test_available_on_the_engine(self) -> None:
        engine = RuleEngine(POSIX_RULES, "direct", P)
        assert engine.resolve(engine.match("/usr/bin/firefox"), TunnelState.DOWN) is FlowVerdict.DROP


# --- The index agrees with a plain first-match scan -------------------------------------------------

# Few components, so that generated patterns and paths overlap and nest often.
COMPONENTS = ["opt", "tools", "Tools", "bin", "curl", "app.exe", "App.EXE", "a.b"]
component = st.sampled_from(COMPONENTS)
directory_component = st.sampled_from(["opt", "tools", "Tools", "bin"])


def windows_root() -> st.SearchStrategy[str]:
    return st.sampled_from(["C:\\", "c:/", "D:\\", "\\\\srv\\share\\", "\\"])


@st.composite
def paths(draw: st.DrawFn, platform: Platform) -> str:
    parts = [*draw(st.lists(directory_component, max_size=4)), draw(component)]
    if draw(st.integers(0, 9)) == 0:
        return parts[-1]  # a bare exe name, as `match` accepts
    if platform is Platform.WINDOWS:
        separator = draw(st.sampled_from(["\\", "/"]))
        return draw(windows_root()) + separator.join(parts)
    return "/" + "/".join(parts)


@st.composite
def wildcarded(draw: st.DrawFn) -> str:
    text = draw(component)
    chars = [draw(st.sampled_from([c, c, "?", "*"])) for c in text]
    return "".join(chars)


@st.composite
def patterns(draw: st.DrawFn, platform: Platform) -> str:
    separator = "\\" if platform is Platform.WINDOWS and draw(st.booleans()) else "/"
    root = draw(windows_root()) if platform is Platform.WINDOWS else "/"
    if draw(st.integers(0, 5)) == 0:
        root = ""  # relative
    kind = draw(st.sampled_from(["name", "wildcard", "directory", "directory", "glob", "glob", "regex"]))
    if kind == "name":
        return draw(component)
    if kind == "wildcard":
        return draw(wildcarded())
    directories = draw(st.lists(directory_component, min_size=1, max_size=3))
    if kind == "directory":
        end = draw(st.sampled_from([separator, separator + "**"]))
        return root + separator.join(directories) + end
    if kind == "glob":
        parts = [draw(st.one_of(component, wildcarded(), st.just("**"))) for _ in directories]
        return root + separator.join([*parts, draw(st.one_of(component, wildcarded()))])
    body = draw(st.sampled_from(["curl$", "^/opt/t", "tools?/c", "app\\.exe$", "[ab]\\.", "^c:/", "bin/cu"]))
    return "re:" + body


def first_match_scan(rules: list[Rule], default: str, platform: Platform, path: str) -> int | None:
    """What the engine must answer, written as plainly as possible."""
    for index, rule in enumerate(rules):
        if compile_pattern(rule.process, platform).matches(path):
            return index
    return None


@pytest.mark.parametrize("platform", [W, P])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_indexed_engine_agrees_with_a_first_match_scan(platform: Platform, data: st.DataObject) -> None:
    sources = data.draw(st.lists(patterns(platform), min_size=4, max_size=30), label="patterns")
    rules = [Rule(source, f"t{i}") for i, source in enumerate(sources)]
    engine = RuleEngine(rules, "direct", platform)
    for path in data.draw(st.lists(paths(platform), min_size=1, max_size=20), label="paths"):
        expected = first_match_scan(rules, "direct", platform, path)
        assert engine.match(path).rule_index == expected, path
        assert engine.match(path).rule_index == expected, "cached answer differs"
