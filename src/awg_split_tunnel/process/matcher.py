"""Process patterns: how a rule's ``process`` names the executables it covers (docs/DESIGN.md).

Six kinds, told apart by their text:

- ``firefox.exe`` — exact exe name (no separator, no wildcard);
- ``*telegram*`` — wildcard on the exe name (``*`` any run, ``?`` one character);
- ``C:\\Games\\`` or ``/opt/tools/**`` — directory: every exe below it, at any depth;
- ``/opt/tools/*/bin/curl`` — glob on the full path: ``*`` and ``?`` never cross a separator, ``**`` as a
  whole component spans zero or more directories;
- ``re:<regex>`` — a Python regex *searched* in the full path;
- ``service:<name>`` — Windows only: the processes hosting that Windows service (``service:Dnscache``),
  found by process id through the Service Control Manager, not by exe (a service often runs in a
  ``svchost.exe`` shared with others). Names are case-insensitive, as the SCM's are. It matches no exe
  path here: the router matches it by pid (``core/packet_router.py``, docs/WINDOWS.md).

Platform semantics: on Windows matching is case-insensitive, ``\\`` and ``/`` are the same separator,
``\\\\?\\`` prefixes are ignored and a trailing ``.exe`` is optional on both sides: ``firefox`` and
``firefox.exe`` are the same name, in name patterns, path globs and the exe paths matched against them.
On POSIX matching is case-sensitive and only ``/`` separates.

Decisions this module takes where docs/DESIGN.md is silent:

- A directory or glob pattern that is relative (``tools/``, ``bin/curl``) matches at any depth, as if it
  started with ``**/``; on Windows one without a drive (``\\Games\\``) matches on any drive. They compile
  to path globs (``**/tools/**``, ``**/bin/curl``, ``?:/games/**``), as do directories with wildcards.
- A regex on Windows sees the normalised path (lower case, ``/`` separators), with the ``IGNORECASE``
  flag; an escaped backslash ``\\\\`` in the regex is rewritten to ``/`` so that regexes written for
  native Windows paths keep working.
- ``[`` and ``]`` are literal in name and path patterns: only ``*`` and ``?`` are wildcards.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field

REGEX_PREFIX = "re:"
SERVICE_PREFIX = "service:"
WINDOWS_EXE_SUFFIX = ".exe"

_WINDOWS_VERBATIM_PREFIXES = ("//?/", "/??/", "//./")
_DRIVE = re.compile(r"[a-z]:")
_REPEATED_SEPARATORS = re.compile(r"/{2,}")


class Platform(enum.Enum):
    """Which operating system's path semantics to match with."""

    WINDOWS = "windows"
    POSIX = "posix"

    @classmethod
    def current(cls) -> Platform:
        return cls.WINDOWS if os.name == "nt" else cls.POSIX


class PatternKind(enum.Enum):
    EXE_NAME = "exe_name"
    EXE_WILDCARD = "exe_wildcard"
    DIRECTORY = "directory"
    PATH_GLOB = "path_glob"
    REGEX = "regex"
    SERVICE = "service"


def normalise_path(path: str, platform: Platform) -> str:
    """The form every path and pattern is compared in.

    Windows: ``\\`` becomes ``/``, lower case, ``\\\\?\\``/``\\??\\`` prefixes dropped, repeated separators
    collapsed (a leading ``//`` of a UNC path is kept). POSIX: repeated separators collapsed.
    """
    if platform is Platform.WINDOWS:
        path = path.replace("\\", "/").lower()
        for prefix in _WINDOWS_VERBATIM_PREFIXES:
            if path.startswith(prefix):
                path = path[len(prefix) :]
                break
        if path.startswith("//"):
            return "/" + _REPEATED_SEPARATORS.sub("/", path[1:])
    if "//" in path:
        path = _REPEATED_SEPARATORS.sub("/", path)
    return path


@dataclass(frozen=True, slots=True)
class ExePath:
    """An executable's path, normalised once and cut into what patterns look at.

    ``bare_name`` is the name as exact-name patterns are keyed: without its ``.exe`` on Windows.
    """

    path: str
    name: str
    bare_name: str

    @classmethod
    def parse(cls, exe_path: str, platform: Platform) -> ExePath:
        path = normalise_path(exe_path, platform)
        name = path.rpartition("/")[2]
        return cls(path, name, _without_exe(name, platform))


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled process pattern: its kind and normalised key.

    ``key`` is the normalised exe name (EXE_NAME, EXE_WILDCARD), the normalised directory without its
    trailing separator (DIRECTORY), the normalised glob (PATH_GLOB), the regex as searched (REGEX) or the
    service name in lower case (SERVICE).
    """

    source: str
    kind: PatternKind
    key: str
    platform: Platform
    regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @property
    def components(self) -> tuple[str, ...]:
        """A DIRECTORY's path components, as ``str.split("/")`` cuts a normalised path."""
        return tuple(self.key.split("/"))

    def matches(self, exe_path: str) -> bool:
        """Whether this pattern covers the executable at ``exe_path`` (a full path or a bare name)."""
        return self.matches_exe(ExePath.parse(exe_path, self.platform))

    def matches_exe(self, exe: ExePath) -> bool:
        kind = self.kind
        if kind is PatternKind.EXE_NAME:
            return exe.bare_name == self.key
        if kind is PatternKind.SERVICE:
            return False  # matched by process id, never by path
        if kind is PatternKind.DIRECTORY:
            return exe.path.startswith(self.key + "/")
        assert self.regex is not None
        if kind is PatternKind.REGEX:
            return self.regex.search(exe.path) is not None
        subject = exe.name if kind is PatternKind.EXE_WILDCARD else exe.path
        return self.regex.fullmatch(subject) is not None


def compile_pattern(source: str, platform: Platform | None = None) -> Pattern:
    """Compile a rule's ``process`` text once; ValueError names what is wrong with it."""
    platform = platform or Platform.current()
    if not source or source.isspace():
        raise ValueError("empty process pattern")
    if source.startswith(REGEX_PREFIX):
        return _compile_regex(source, platform)
    if source.startswith(SERVICE_PREFIX):
        return _compile_service(source, platform)

    separators = "/\\" if platform is Platform.WINDOWS else "/"
    if not any(sep in source for sep in separators):
        key = _without_exe(normalise_path(source, platform), platform)
        if "*" in key or "?" in key:
            regex = _fullmatch_regex(key, platform)
            return Pattern(source, PatternKind.EXE_WILDCARD, key, platform, regex)
        return Pattern(source, PatternKind.EXE_NAME, key, platform)

    normalised = normalise_path(source, platform)
    directory: str | None = None
    if normalised.endswith("/**"):
        directory = normalised[: -len("/**")]
    elif normalised.endswith("/"):
        directory = normalised[:-1]

    if platform is Platform.WINDOWS and normalised.startswith("/") and not normalised.startswith("//"):
        anchor = "?:"  # a path without a drive: on any drive
    elif _is_absolute(normalised, platform):
        anchor = ""
    else:
        anchor = "" if normalised.startswith("**") else "**/"

    if directory is not None and not anchor and "*" not in directory and "?" not in directory:
        return Pattern(source, PatternKind.DIRECTORY, directory, platform)
    glob = anchor + (directory + "/**" if directory is not None else _without_exe(normalised, platform))
    return Pattern(source, PatternKind.PATH_GLOB, glob, platform, _fullmatch_regex(glob, platform))


def _without_exe(name: str, platform: Platform) -> str:
    if platform is Platform.WINDOWS and name.endswith(WINDOWS_EXE_SUFFIX):
        return name[: -len(WINDOWS_EXE_SUFFIX)]
    return name


def _fullmatch_regex(glob: str, platform: Platform) -> re.Pattern[str]:
    # On Windows the key has lost any trailing ``.exe``; the subject may have one.
    suffix = r"(?:\.exe)?" if platform is Platform.WINDOWS else ""
    return re.compile(glob_to_regex(glob) + suffix)


def glob_to_regex(glob: str) -> str:
    """Translate a normalised glob to a regex for ``fullmatch``.

    ``*`` and ``?`` stay within a path component; ``**`` as a whole component matches zero or more
    directories (or, last, everything below); ``**`` inside a component matches across separators.
    """
    components = glob.split("/")
    out: list[str] = []
    last = len(components) - 1
    for i, component in enumerate(components):
        if component == "**":
            out.append("(?s:.*)" if i == last else "(?s:.*/)?")
            continue
        out.append(_component_to_regex(component))
        if i != last:
            out.append("/")
    return "".join(out)


def _component_to_regex(component: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(component):
        char = component[i]
        if component.startswith("**", i):
            out.append("(?s:.*)")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _is_absolute(normalised: str, platform: Platform) -> bool:
    if normalised.startswith("/"):
        return True
    return platform is Platform.WINDOWS and _DRIVE.match(normalised) is not None


def _compile_service(source: str, platform: Platform) -> Pattern:
    if platform is not Platform.WINDOWS:
        raise ValueError(
            "service: rules name Windows services and work on Windows only; name the service's "
            "executable here instead (a path or an exe name)"
        )
    name = source[len(SERVICE_PREFIX) :].strip()
    if not name or any(c in name for c in "/\\"):
        raise ValueError("service: needs a Windows service's name (e.g. service:Dnscache, no slashes)")
    return Pattern(source, PatternKind.SERVICE, name.lower(), platform)


def _compile_regex(source: str, platform: Platform) -> Pattern:
    expression = source[len(REGEX_PREFIX) :]
    if not expression:
        raise ValueError(f"empty regular expression in process pattern {source!r}")
    flags = 0
    if platform is Platform.WINDOWS:
        expression = _backslash_to_slash(expression)
        flags = re.IGNORECASE
    try:
        regex = re.compile(expression, flags)
    except re.error as exc:
        raise ValueError(f"invalid regular expression in process pattern {source!r}: {exc}") from None
    return Pattern(source, PatternKind.REGEX, expression, platform, regex)


def _backslash_to_slash(expression: str) -> str:
    """Rewrite each escaped backslash ``\\\\`` to ``/``: the Windows paths it is searched in use ``/``."""
    out: list[str] = []
    i = 0
    while i < len(expression):
        if expression[i] == "\\" and i + 1 < len(expression):
            pair = expression[i : i + 2]
            out.append("/" if pair == "\\\\" else pair)
            i += 2
        else:
            out.append(expression[i])
            i += 1
    return "".join(out)
