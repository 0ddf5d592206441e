"""I1–I5 tag templates: the grammar of amneziawg-go's `device/obf*.go` and the packets they produce.

A template is text with tags in angle brackets; text outside the brackets is ignored:

    <b 0xHEX>  literal bytes        <t>      u32 big-endian Unix seconds
    <r N>      N random bytes       <rc N>   N random letters a-zA-Z
    <rd N>     N random digits      <d> <ds> <dz N>  data placeholders (empty payload: 0, 0, N zero bytes)

`<c>` (a big-endian packet counter) existed only in AmneziaWG 1.5 and early 2.0; current peers reject it.
It is accepted here only when the caller asks for it (`allow_counter=True`), producing 8 bytes as 1.5 did.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = b"0123456789"
# The largest UDP payload over IPv4; a larger I-packet fails the whole send batch, initiation included.
MAX_PACKET_SIZE = 65507

_HEX = re.compile(r"[0-9a-fA-F]*")
# Go's strconv.Atoi: optional sign, ASCII decimal digits.
_GO_INT = re.compile(r"[+-]?[0-9]+")


class TagKind(enum.Enum):
    BYTES = "b"
    TIMESTAMP = "t"
    RANDOM = "r"
    RANDOM_LETTERS = "rc"
    RANDOM_DIGITS = "rd"
    DATA = "d"
    DATA_STRING = "ds"
    DATA_SIZE = "dz"
    COUNTER = "c"  # AmneziaWG 1.5 only


_COUNTED = {TagKind.RANDOM, TagKind.RANDOM_LETTERS, TagKind.RANDOM_DIGITS, TagKind.DATA_SIZE}


@dataclass(frozen=True, slots=True)
class Tag:
    """One parsed tag: its kind, literal bytes (`<b>`) or byte count (`<r>`, `<rc>`, `<rd>`, `<dz>`)."""

    kind: TagKind
    data: bytes = b""
    count: int = 0

    @property
    def size(self) -> int:
        if self.kind is TagKind.BYTES:
            return len(self.data)
        if self.kind is TagKind.TIMESTAMP:
            return 4
        if self.kind is TagKind.COUNTER:
            return 8
        if self.kind in _COUNTED:
            return self.count
        return 0  # <d>, <ds>: an I-packet carries no payload


class TemplateError(ValueError):
    """A template that does not parse; `problems` lists every error found, in template order."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True)
class TagTemplate:
    """A parsed I-packet template with at least one tag."""

    source: str
    tags: tuple[Tag, ...]

    @property
    def size(self) -> int:
        """Length of every packet this template generates."""
        return sum(tag.size for tag in self.tags)

    @property
    def uses_counter(self) -> bool:
        return any(tag.kind is TagKind.COUNTER for tag in self.tags)

    def generate(self, now: float, urandom: Callable[[int], bytes], counter: int = 0) -> bytes:
        """A fresh packet: `now` is Unix time for `<t>`, `urandom` the random source, `counter` for `<c>`."""
        out = bytearray()
        for tag in self.tags:
            kind = tag.kind
            if kind is TagKind.BYTES:
                out += tag.data
            elif kind is TagKind.TIMESTAMP:
                out += struct.pack(">I", int(now) & 0xFFFFFFFF)
            elif kind is TagKind.RANDOM:
                out += urandom(tag.count)
            elif kind is TagKind.RANDOM_LETTERS:
                out += bytes(LETTERS[b % 52] for b in urandom(tag.count))
            elif kind is TagKind.RANDOM_DIGITS:
                out += bytes(DIGITS[b % 10] for b in urandom(tag.count))
            elif kind is TagKind.DATA_SIZE:
                out += bytes(tag.count)  # the big-endian length of an empty payload
            elif kind is TagKind.COUNTER:
                out += struct.pack(">Q", counter & 0xFFFFFFFFFFFFFFFF)
            # <d>, <ds>: nothing
        return bytes(out)


def _count(name: str, arg: str) -> tuple[int, str | None]:
    if not _GO_INT.fullmatch(arg):
        return (
            0,
            f"<{name}> needs a decimal byte count, got {arg!r}" if arg else f"<{name}> needs a byte count",
        )
    value = int(arg)
    if value < 0:
        return 0, f"<{name} {arg}>: the byte count must not be negative"
    if value > MAX_PACKET_SIZE:
        return 0, f"<{name} {arg}>: the byte count exceeds the largest UDP datagram ({MAX_PACKET_SIZE})"
    return value, None


def _build(name: str, arg: str, allow_counter: bool) -> tuple[Tag | None, str | None]:
    if name == "b":
        # Only a lower-case 0x is a prefix (Go's strings.TrimPrefix); "0X12" fails as hex.
        digits = arg.removeprefix("0x")
        if not digits:
            return None, "<b> needs hex bytes, e.g. <b 0xc0ffee>"
        if len(digits) % 2:
            return None, f"<b {arg}>: odd number of hex digits"
        if not _HEX.fullmatch(digits):
            return None, f"<b {arg}>: not hexadecimal (only a lower-case 0x prefix is allowed)"
        return Tag(TagKind.BYTES, data=bytes.fromhex(digits)), None
    if name == "t":
        return Tag(TagKind.TIMESTAMP), None
    if name in ("d", "ds"):
        return Tag(TagKind(name)), None
    if name in ("r", "rc", "rd", "dz"):
        count, error = _count(name, arg)
        return (None, error) if error else (Tag(TagKind(name), count=count), None)
    if name == "c" and allow_counter:
        return Tag(TagKind.COUNTER), None
    if name == "c":
        return None, "unknown tag <c> (the packet counter was removed in AmneziaWG 2.0)"
    return None, f"unknown tag <{name}>"


def parse_template(text: str, *, allow_counter: bool = False) -> TagTemplate | None:
    """Parse an I-packet template. None when it holds no tag (the packet is disabled, as in amneziawg-go);
    `TemplateError` listing every problem when any tag is wrong."""
    tags: list[Tag] = []
    problems: list[str] = []
    rest = text
    while (start := rest.find("<")) != -1:
        end = rest.find(">", start)
        if end == -1:
            problems.append(f"missing enclosing > after {rest[start : start + 20]!r}")
            break
        words = rest[start + 1 : end].split()
        rest = rest[end + 1 :]
        if not words:
            problems.append("empty tag <>")
            continue
        tag, error = _build(words[0], words[1] if len(words) > 1 else "", allow_counter)
        if error is not None:
            problems.append(error)
        elif tag is not None:
            tags.append(tag)
    if problems:
        raise TemplateError(problems)
    if not tags:
        return None
    template = TagTemplate(text, tuple(tags))
    if template.size > MAX_PACKET_SIZE:
        raise TemplateError(
            [f"the packet would be {template.size} bytes, above the UDP limit {MAX_PACKET_SIZE}"]
        )
    return template
