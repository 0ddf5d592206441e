"""Process patterns, kind by kind, on Windows-style and POSIX-style paths (docs/DESIGN.md)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.process.matcher import (
    ExePath,
    PatternKind,
    Platform,
    compile_pattern,
    glob_to_regex,
    normalise_path,
)

W = Platform.WINDOWS
P = Platform.POSIX


def matches(pattern: str, path: str, platform: Platform) -> bool:
    return compile_pattern(pattern, platform).matches(path)


class TestNormalisePath:
    def test_windows_lowercases_and_uses_forward_slashes(self) -> None:
        assert (
            normalise_path(r"C:\Program Files\Mozilla\FireFox.EXE", W)
            == "c:/program files/mozilla/firefox.exe"
        )

    def test_windows_drops_verbatim_prefixes_and_repeated_separators(self) -> None:
        assert normalise_path(r"\\?\C:\Games\\x.exe", W) == "c:/games/x.exe"
        assert normalise_path(r"\??\C:\Games\x.exe", W) == "c:/games/x.exe"

    def test_windows_keeps_the_unc_double_slash(self) -> None:
        assert normalise_path(r"\\Server\Share\\app.exe", W) == "//server/share/app.exe"

    def test_posix_is_case_sensitive_and_backslash_is_a_character(self) -> None:
        assert normalise_path("/Opt//Tools/a\\b", P) == "/Opt/Tools/a\\b"

    def test_exe_path_cuts_name_and_optional_exe(self) -> None:
        exe = ExePath.parse(r"C:\Apps\Telegram.exe", W)
        assert (exe.path, exe.name, exe.bare_name) == ("c:/apps/telegram.exe", "telegram.exe", "telegram")
        assert ExePath.parse("/usr/bin/app.exe", P).bare_name == "app.exe"


class TestExeName:
    def test_kind_and_key(self) -> None:
        pattern = compile_pattern("FireFox.exe", W)
        assert (pattern.kind, pattern.key) == (PatternKind.EXE_NAME, "firefox")
        assert compile_pattern("FireFox.exe", P).key == "FireFox.exe"

    @pytest.mark.parametrize(
        ("pattern", "path"),
        [
            ("firefox.exe", r"C:\Program Files\Mozilla Firefox\firefox.exe"),
            ("firefox", r"C:\Program Files\Mozilla Firefox\firefox.exe"),
            ("FIREFOX.EXE", "c:/program files/mozilla firefox/Firefox.exe"),
            ("firefox", "firefox.exe"),
        ],
    )
    def test_windows_matches_case_insensitively_with_exe_optional(self, pattern: str, path: str) -> None:
        assert matches(pattern, path, W)

    @pytest.mark.parametrize(
        "path",
        [r"C:\Mozilla\firefox-esr.exe", r"C:\firefox.exe\other.exe", r"C:\Mozilla\firefox.exe.bak"],
    )
    def test_windows_needs_the_whole_name(self, path: str) -> None:
        assert not matches("firefox", path, W)

    def test_windows_exe_suffix_is_optional_on_the_path_too(self) -> None:
        # `match firefox` on the command line finds the rule written `firefox.exe`.
        assert matches("firefox.exe", "firefox", W)
        assert not matches("firefox.exe", r"C:\firefox.exe.exe", W)

    def test_posix_is_case_sensitive_and_exact(self) -> None:
        assert matches("curl", "/usr/bin/curl", P)
        assert not matches("Curl", "/usr/bin/curl", P)
        assert not matches("curl", "/usr/bin/curl.exe", P)
        assert not matches("curl.exe", "/usr/bin/curl", P)

    def test_posix_backslash_is_part_of_a_name(self) -> None:
        pattern = compile_pattern(r"odd\name", P)
        assert pattern.kind is PatternKind.EXE_NAME
        assert pattern.matches(r"/opt/odd\name")


class TestExeWildcard:
    def test_kind(self) -> None:
        assert compile_pattern("*telegram*", W).kind is PatternKind.EXE_WILDCARD

    @pytest.mark.parametrize(
        ("pattern", "path", "expected"),
        [
            ("*telegram*", r"C:\Users\a\AppData\Roaming\Telegram Desktop\Telegram.exe", True),
            ("*gram", r"C:\Apps\Telegram.exe", True),
            ("tele?ram.exe", r"C:\Apps\TELEGRAM.EXE", True),
            ("*.exe", r"C:\Apps\Telegram.exe", True),
            ("*telegram*", r"C:\Telegram\Updater.exe", False),
            ("tele?ram", r"C:\Apps\teleram.exe", False),
        ],
    )
    def test_windows(self, pattern: str, path: str, expected: bool) -> None:
        assert matches(pattern, path, W) is expected

    @pytest.mark.parametrize(
        ("pattern", "path", "expected"),
        [
            ("*telegram*", "/opt/telegram/telegram-desktop", True),
            ("python3.?", "/usr/bin/python3.11", False),
            ("python3.??", "/usr/bin/python3.11", True),
            ("*Telegram*", "/opt/telegram/telegram-desktop", False),
            ("*telegram*", "/opt/telegram/updater", False),
        ],
    )
    def test_posix(self, pattern: str, path: str, expected: bool) -> None:
        assert matches(pattern, path, P) is expected

    def test_brackets_are_literal(self) -> None:
        assert matches("app[1]*", "/opt/app[1]-x", P)
        assert not matches("app[1]*", "/opt/app1-x", P)


class TestDirectory:
    @pytest.mark.parametrize("source", ["C:\\Games\\", "c:/games/", "C:\\Games\\**", "C:/GAMES/**"])
    def test_windows_spellings_are_one_directory(self, source: str) -> None:
        pattern = compile_pattern(source, W)
        assert (pattern.kind, pattern.key) == (PatternKind.DIRECTORY, "c:/games")

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            (r"C:\Games\doom.exe", True),
            (r"C:\Games\Steam\steamapps\common\x\game.exe", True),
            ("c:/games/a.exe", True),
            (r"C:\GamesExtra\a.exe", False),
            (r"D:\Games\a.exe", False),
            (r"C:\Other\Games\a.exe", False),
        ],
    )
    def test_windows_covers_every_exe_below_at_any_depth(self, path: str, expected: bool) -> None:
        assert matches("C:\\Games\\", path, W) is expected

    def test_posix(self) -> None:
        assert matches("/opt/tools/", "/opt/tools/x/y/z", P)
        assert matches("/opt/tools/**", "/opt/tools/curl", P)
        assert not matches("/opt/tools/", "/opt/toolsbox/curl", P)
        assert not matches("/opt/Tools/", "/opt/tools/curl", P)

    def test_root_covers_everything(self) -> None:
        assert matches("/", "/usr/bin/curl", P)

    def test_relative_directory_matches_at_any_depth(self) -> None:
        pattern = compile_pattern("tools/", P)
        assert (pattern.kind, pattern.key) == (PatternKind.PATH_GLOB, "**/tools/**")
        assert pattern.matches("/opt/tools/curl")
        assert pattern.matches("/home/a/tools/x/y")
        assert not pattern.matches("/opt/mytools/curl")

    def test_windows_directory_without_drive_matches_any_drive(self) -> None:
        pattern = compile_pattern("\\Games\\", W)
        assert pattern.matches(r"D:\Games\x.exe")
        assert pattern.matches(r"c:\games\a\b.exe")
        assert not pattern.matches(r"C:\Other\Games\x.exe")

    def test_wildcards_in_a_directory_make_it_a_glob(self) -> None:
        pattern = compile_pattern("/home/*/bin/", P)
        assert pattern.kind is PatternKind.PATH_GLOB
        assert pattern.matches("/home/alice/bin/deep/tool")
        assert not pattern.matches("/home/alice/src/bin/tool")

    def test_unc_share(self) -> None:
        assert matches("\\\\server\\share\\", r"\\SERVER\Share\apps\tool.exe", W)


class TestPathGlob:
    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/opt/tools/v1/bin/curl", True),
            ("/opt/tools/v1/extra/bin/curl", False),  # * never crosses a separator
            ("/opt/tools/bin/curl", False),
            ("/opt/tools/v1/bin/curl2", False),
            ("/OPT/tools/v1/bin/curl", False),
        ],
    )
    def test_posix_star_stays_in_one_component(self, path: str, expected: bool) -> None:
        assert matches("/opt/tools/*/bin/curl", path, P) is expected

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/opt/bin/curl", True),  # ** spans zero directories
            ("/opt/a/bin/curl", True),
            ("/opt/a/b/c/bin/curl", True),
            ("/opt/a/bin/wget", False),
        ],
    )
    def test_double_star_spans_directories(self, path: str, expected: bool) -> None:
        assert matches("/opt/**/bin/curl", path, P) is expected

    def test_question_mark_is_one_character_not_a_separator(self) -> None:
        assert matches("/opt/v?/curl", "/opt/v1/curl", P)
        assert not matches("/opt/v?/curl", "/opt/v/curl", P)
        assert not matches("/opt/v?/curl", "/opt/v12/curl", P)
        assert not matches("/opt/a?b/curl", "/opt/a/b/curl", P)

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            (r"C:\Tools\v2\bin\curl.exe", True),
            ("c:/tools/v2/bin/CURL.EXE", True),
            (r"C:\Tools\v2\bin\curl", True),
            (r"C:\Tools\v2\x\bin\curl.exe", False),
        ],
    )
    def test_windows_glob(self, path: str, expected: bool) -> None:
        assert matches(r"C:\tools\*\bin\curl", path, W) is expected

    def test_relative_glob_matches_as_a_path_suffix(self) -> None:
        assert matches("bin/curl", "/usr/local/bin/curl", P)
        assert not matches("bin/curl", "/usr/local/sbin/curl", P)

    def test_glob_to_regex(self) -> None:
        regex = re.compile(glob_to_regex("/a/**/b*/?.x"))
        assert regex.fullmatch("/a/b/c.x")
        assert regex.fullmatch("/a/q/r/bee/c.x")
        assert not regex.fullmatch("/a/q/r/bee/cc.x")


class TestRegex:
    def test_searches_the_full_path_posix(self) -> None:
        assert matches(r"re:/steam(webhelper)?$", "/home/a/.steam/steamwebhelper", P)
        assert matches(r"re:bin/c", "/usr/bin/curl", P)  # searched, not anchored
        assert not matches(r"re:^bin/c", "/usr/bin/curl", P)
        assert not matches(r"re:/STEAM$", "/home/a/steam", P)

    def test_windows_regex_written_for_backslashes(self) -> None:
        pattern = compile_pattern("re:.*\\\\steam(webhelper)?\\.exe$", W)
        assert pattern.kind is PatternKind.REGEX
        assert pattern.matches(r"C:\Program Files (x86)\Steam\steamwebhelper.exe")
        assert pattern.matches("c:/program files (x86)/steam/Steam.exe")
        assert not pattern.matches(r"C:\Steam\notsteam.exe")

    def test_windows_regex_with_forward_slashes_and_classes(self) -> None:
        assert matches(r"re:^c:/users/[^\\]+/appdata/", r"C:\Users\Alice\AppData\Local\x.exe", W)
        assert not matches(r"re:^c:/users/[^\\]+/appdata/", r"C:\Users\Alice\x\AppData\y.exe", W)


class TestInvalidPatterns:
    @pytest.mark.parametrize("source", ["", "   "])
    def test_empty(self, source: str) -> None:
        with pytest.raises(ValueError, match="empty process pattern"):
            compile_pattern(source, P)

    def test_empty_regex(self) -> None:
        with pytest.raises(ValueError, match="empty regular expression"):
            compile_pattern("re:", P)

    def test_bad_regex_names_the_pattern(self) -> None:
        with pytest.raises(
            ValueError, match=r"invalid regular expression in process pattern 're:\(unclosed'"
        ):
            compile_pattern("re:(unclosed", W)


def test_default_platform_is_this_machine() -> None:
    assert compile_pattern("x").platform is Platform.current()


# No "e": a generated name never ends in ".exe" itself.
names = st.text(alphabet="abcXYZ.-_1", min_size=1, max_size=12)


@settings(max_examples=200)
@given(name=names, directory=st.lists(names, max_size=4))
def test_windows_exact_name_matches_whatever_the_case_and_exe_suffix(name: str, directory: list[str]) -> None:
    path = "C:\\" + "\\".join([*directory, name.upper() + ".EXE"])
    assert matches(name.lower(), path, W)
    assert matches(name.lower() + ".exe", path, W)


@settings(max_examples=200)
@given(directory=st.lists(names, min_size=1, max_size=3), below=st.lists(names, min_size=1, max_size=4))
def test_directory_covers_every_path_below_it(directory: list[str], below: list[str]) -> None:
    root = "/" + "/".join(directory)
    assert matches(root + "/", "/".join([root, *below]), P)
    assert matches(root + "/**", "/".join([root, *below]), P)
    assert not matches(root + "/", root + "x/" + below[-1], P)


def test_a_service_pattern_names_a_windows_service_and_matches_no_exe_path() -> None:
    pattern = compile_pattern("service: Dnscache", W)
    assert (pattern.kind, pattern.key) == (PatternKind.SERVICE, "dnscache")  # the SCM's names ignore case
    assert not pattern.matches(r"C:\Windows\System32\svchost.exe")  # matched by pid, in the router
    with pytest.raises(ValueError, match="service's name"):
        compile_pattern("service:", W)


def test_a_service_pattern_is_refused_outside_windows_with_what_to_write_instead() -> None:
    with pytest.raises(ValueError, match="Windows only; name the service's executable"):
        compile_pattern("service:Dnscache", P)
