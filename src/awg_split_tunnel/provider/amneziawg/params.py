"""The AmneziaWG parameter set (1.0, 1.5, 2.0 and 3.x keys) and its validation.

Validation has two levels. `validate()` lists what makes the tunnel fail: everything current amneziawg-go
refuses, what it accepts but then crashes or misbehaves on, and 1.0 values whose meaning differs between
generations. `warnings()` lists what works but deserves a look (hazards of the receive classifier,
keys and tags only older peers knew).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.amneziawg.tags import TagTemplate, TemplateError, parse_template
from awg_split_tunnel.provider.wireguard.envelope import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MIN_TRANSPORT_SIZE,
    RESPONSE_SIZE,
)
from awg_split_tunnel.provider.wireguard.value_range import Range

U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
HEADER_PROTECTION_KEY_SIZE = 32
# The keystream nonce is the first 12 bytes of the datagram, so every prefix must be at least that long.
HEADER_PROTECTION_MIN_PREFIX = 12
# Linux StdNetBind sends the I-packets, the junk and the initiation in one batch of at most 128 messages.
MAX_BATCH = 128
MAX_DATAGRAM = 65535
UNSET = Range(0, 0)
DEFAULT_HEADERS = (Range(1, 1), Range(2, 2), Range(3, 3), Range(4, 4))

TIMER_KEYS = (
    "rekey_after_time",
    "rekey_timeout",
    "reject_after_time",
    "keepalive_timeout",
    "max_handshake_attempts",
)
# WireGuard's values for the timer keys, in seconds (attempts: a count); 0 in a config means these.
TIMER_DEFAULTS = {
    "rekey_after_time": 120,
    "rekey_timeout": 5,
    "reject_after_time": 180,
    "keepalive_timeout": 10,
    "max_handshake_attempts": 18,
}
INT_KEYS = ("jc", "jmin", "jmax", "s1", "s2", "s3", "s4")
HEADER_KEYS = ("h1", "h2", "h3", "h4")
TEMPLATE_KEYS = ("i1", "i2", "i3", "i4", "i5")
RANGE_KEYS = (*HEADER_KEYS, "content_padding_addition", *TIMER_KEYS)
BOOL_KEYS = ("random_trailers", "disable_cookies")
# AmneziaWG 1.5 only ("controlled junk" and its timer); 2.0+ tools and peers refuse them.
LEGACY_KEYS = ("j1", "j2", "j3", "itime")

# How users see the keys in `.conf` files; messages name keys this way.
CONF_NAMES = {
    "jc": "Jc",
    "jmin": "Jmin",
    "jmax": "Jmax",
    **{f"s{n}": f"S{n}" for n in range(1, 5)},
    **{f"h{n}": f"H{n}" for n in range(1, 5)},
    **{f"i{n}": f"I{n}" for n in range(1, 6)},
    **{f"j{n}": f"J{n}" for n in range(1, 4)},
    "itime": "Itime",
    "header_protection_key": "HeaderProtectionKey",
    "content_padding_addition": "ContentPaddingAddition",
    "rekey_after_time": "RekeyAfterTime",
    "rekey_timeout": "RekeyTimeout",
    "reject_after_time": "RejectAfterTime",
    "keepalive_timeout": "KeepaliveTimeout",
    "max_handshake_attempts": "MaxHandshakeAttempts",
    "random_trailers": "RandomTrailers",
    "disable_cookies": "DisableCookies",
}
# `.conf` spellings (HeaderProtectionKey) and UAPI ones (header_protection_key) lead to the same key.
_CANONICAL = {name.replace("_", ""): name for name in CONF_NAMES}
_DECIMAL = re.compile(r"-?[0-9]+")
_TRUE = {"1", "on", "true", "t", "yes"}
_FALSE = {"0", "off", "false", "f", "no"}


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation finding: the lower-case key it concerns and a message a user can act on."""

    key: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class AmneziaParams:
    """Every AmneziaWG device setting. All unset is WireGuard on the wire.

    Ranges are inclusive; `Range(0, 0)` means unset for the content padding and the timers. Templates are
    kept as written; `i_packets` parses them. `header_protection_key` of all zeros (or empty) is off.
    """

    jc: int = 0
    jmin: int = 0
    jmax: int = 0
    s1: int = 0
    s2: int = 0
    s3: int = 0
    s4: int = 0
    h1: Range = DEFAULT_HEADERS[0]
    h2: Range = DEFAULT_HEADERS[1]
    h3: Range = DEFAULT_HEADERS[2]
    h4: Range = DEFAULT_HEADERS[3]
    i1: str | None = None
    i2: str | None = None
    i3: str | None = None
    i4: str | None = None
    i5: str | None = None
    header_protection_key: bytes = field(default=b"", repr=False)
    content_padding_addition: Range = UNSET
    rekey_after_time: Range = UNSET
    rekey_timeout: Range = UNSET
    reject_after_time: Range = UNSET
    keepalive_timeout: Range = UNSET
    max_handshake_attempts: Range = UNSET
    random_trailers: bool = False
    disable_cookies: bool = False
    # AmneziaWG 1.5 keys (J1–J3, Itime) that were present and are ignored.
    ignored_legacy_keys: tuple[str, ...] = field(default=())
    # Which H keys the config set; unset ones keep 1..4 and are written that way in messages.
    explicit_headers: frozenset[str] = field(default=frozenset())

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, file: str | None = None) -> AmneziaParams:
        """Build from UAPI/.conf names (case-insensitive): ints or decimal strings, `Range`s or `N`/`A-B`,
        template strings, the key as 32 bytes, 64 hex digits or base64, booleans or on/off/1/0.
        Raises `ConfigError` naming the key for a value of the wrong form; call `check()` for the rest."""
        kwargs: dict[str, object] = {}
        legacy: list[str] = []
        for raw_key, value in values.items():
            key = _CANONICAL.get(raw_key.strip().lower().replace("_", ""), raw_key.strip().lower())
            try:
                if key in INT_KEYS:
                    kwargs[key] = _to_int(value)
                elif key in RANGE_KEYS:
                    kwargs[key] = _to_range(value)
                elif key in TEMPLATE_KEYS:
                    kwargs[key] = _to_template(value)
                elif key == "header_protection_key":
                    kwargs[key] = _to_key(value)
                elif key in BOOL_KEYS:
                    kwargs[key] = _to_bool(value)
                elif key in LEGACY_KEYS:
                    legacy.append(key)
                else:
                    raise ValueError("not an AmneziaWG setting")
            except (ValueError, TypeError) as exc:
                name = CONF_NAMES.get(key, raw_key)
                raise ConfigError(f"{name}: {exc}", file=file, key=key) from None
        headers = frozenset(k for k in HEADER_KEYS if k in kwargs)
        return cls(**kwargs, ignored_legacy_keys=tuple(legacy), explicit_headers=headers)  # type: ignore[arg-type]

    # -- derived views ------------------------------------------------------------------------------

    @property
    def headers(self) -> tuple[Range, Range, Range, Range]:
        return (self.h1, self.h2, self.h3, self.h4)

    @property
    def prefixes(self) -> tuple[int, int, int, int]:
        return (self.s1, self.s2, self.s3, self.s4)

    @property
    def templates(self) -> tuple[str | None, ...]:
        return (self.i1, self.i2, self.i3, self.i4, self.i5)

    @property
    def header_protection(self) -> bool:
        return any(self.header_protection_key)

    @property
    def i_packets(self) -> tuple[TagTemplate, ...]:
        """The defined I-packets in I1..I5 order (templates without tags are disabled). Raises
        `TemplateError` on a bad template: validate first. `<c>` is accepted (1.5 configs)."""
        parsed = (parse_template(t, allow_counter=True) for t in self.templates if t is not None)
        return tuple(p for p in parsed if p is not None)

    @property
    def is_plain(self) -> bool:
        """True when the set puts WireGuard on the wire exactly (the timer keys and `disable_cookies` do
        not change the wire format)."""
        return (
            self.jc == 0
            and self.prefixes == (0, 0, 0, 0)
            and self.headers == DEFAULT_HEADERS
            and not self.header_protection
            and self.content_padding_addition == UNSET
            and not self.random_trailers
            and not self._defined_templates()
        )

    @property
    def generation(self) -> str:
        """The oldest AmneziaWG generation that understands this set: "wireguard", "1.0", "1.5", "2.0" or
        "3.x" (used for messages and logs)."""
        if self.header_protection or self.random_trailers or self.content_padding_addition != UNSET:
            return "3.x"
        if any(getattr(self, k) != UNSET for k in TIMER_KEYS) or self.disable_cookies:
            return "3.x"
        if self.ignored_legacy_keys or any("<c" in (t or "") for t in self.templates):
            return "1.5"
        if self.s3 or self.s4 or self._defined_templates() or any(h.lo != h.hi for h in self.headers):
            return "2.0"
        return "wireguard" if self.is_plain else "1.0"

    def _defined_templates(self) -> bool:
        for text in self.templates:
            if text is None:
                continue
            try:
                if parse_template(text, allow_counter=True) is not None:
                    return True
            except TemplateError:
                return True
        return False

    def _header_explicit(self, index: int) -> bool:
        return HEADER_KEYS[index] in self.explicit_headers or self.headers[index] != DEFAULT_HEADERS[index]

    def _header_name(self, index: int) -> str:
        suffix = "" if self._header_explicit(index) else " (default)"
        return f"{CONF_NAMES[HEADER_KEYS[index]]} {self.headers[index]}{suffix}"

    # -- validation ---------------------------------------------------------------------------------

    def problems(self) -> list[Problem]:
        """Every error, in key order."""
        out: list[Problem] = []
        self._check_junk(out)
        self._check_prefixes(out)
        self._check_headers(out)
        self._check_templates(out)
        self._check_protection(out)
        self._check_ranges(out)
        return out

    def validate(self) -> list[str]:
        """Messages for every error; empty when the set is usable."""
        return [p.message for p in self.problems()]

    def check(self, *, file: str | None = None, line: int | None = None) -> None:
        """Raise `ConfigError` (key = the first offending key) listing every error."""
        found = self.problems()
        if found:
            raise ConfigError("; ".join(p.message for p in found), file=file, line=line, key=found[0].key)

    def _check_junk(self, out: list[Problem]) -> None:
        for key in ("jc", "jmin", "jmax"):
            value = getattr(self, key)
            if value < 0:
                out.append(Problem(key, f"{CONF_NAMES[key]} must not be negative (got {value})"))
        if self.jmax > MAX_DATAGRAM:
            out.append(Problem("jmax", f"Jmax {self.jmax} exceeds the largest UDP datagram ({MAX_DATAGRAM})"))
        if self.jc > 0 and self.jmax < self.jmin:
            out.append(
                Problem(
                    "jmax",
                    f"Jmax ({self.jmax}) is below Jmin ({self.jmin}); amneziawg-go crashes on that: "
                    "set Jmax >= Jmin",
                )
            )
        try:
            defined = len(self.i_packets)
        except TemplateError:
            defined = 0
        if self.jc > 0 and self.jc + defined + 1 > MAX_BATCH:
            out.append(
                Problem(
                    "jc",
                    f"Jc {self.jc} plus {defined} I-packet(s) plus the initiation exceed the {MAX_BATCH} "
                    "datagrams amneziawg-go can send in one batch (it crashes): "
                    f"keep Jc <= {MAX_BATCH - 1 - defined}",
                )
            )

    def _check_prefixes(self, out: list[Problem]) -> None:
        sizes = (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE, MIN_TRANSPORT_SIZE)
        for n, (prefix, size) in enumerate(zip(self.prefixes, sizes, strict=True), start=1):
            key = f"s{n}"
            if prefix < 0:
                out.append(Problem(key, f"S{n} must not be negative (got {prefix})"))
            elif prefix > U16_MAX:
                out.append(
                    Problem(key, f"S{n} {prefix} is above {U16_MAX}, the largest value AmneziaWG accepts")
                )
            elif prefix + size > MAX_DATAGRAM:
                out.append(Problem(key, f"S{n} {prefix} makes the datagram larger than {MAX_DATAGRAM} bytes"))

    def _check_headers(self, out: list[Problem]) -> None:
        for n, header in enumerate(self.headers, start=1):
            key = f"h{n}"
            if header.hi > U32_MAX:
                out.append(Problem(key, f"H{n} {header} does not fit in 32 bits (max {U32_MAX})"))
            elif header.lo == 0 and header.hi == U32_MAX:
                out.append(
                    Problem(
                        key,
                        f"H{n} {header} is the full 32-bit range, which amneziawg-go 2.0 crashes on and 3.x "
                        "turns into a single value; use a narrower range",
                    )
                )
        for i in range(4):
            for j in range(i + 1, 4):
                if self.headers[i].overlaps(self.headers[j]):
                    explicit = [self._header_explicit(k) for k in range(4)]
                    hint = (
                        "; unset H keys default to 1, 2, 3, 4, so set all four" if not all(explicit) else ""
                    )
                    out.append(
                        Problem(
                            HEADER_KEYS[j] if explicit[j] else HEADER_KEYS[i],
                            f"{self._header_name(i)} overlaps {self._header_name(j)}: the four header "
                            f"ranges must be disjoint{hint}",
                        )
                    )
        if self.generation == "1.0":
            # AmneziaWG 1.0 reads an H of 0-4 as "the WireGuard default"; 2.0+ sends it as written.
            for n, header in enumerate(self.headers, start=1):
                if header.hi <= 4 and header.lo != n:
                    out.append(
                        Problem(
                            f"h{n}",
                            f"H{n} = {header}: AmneziaWG 1.0 peers read values 0-4 as the default {n} while "
                            f"2.0 and later send {header.lo}; use {n} or a value above 4 on both peers",
                        )
                    )

    def _check_templates(self, out: list[Problem]) -> None:
        for n, text in enumerate(self.templates, start=1):
            if text is None:
                continue
            try:
                parse_template(text, allow_counter=True)
            except TemplateError as exc:
                for problem in exc.problems:
                    out.append(Problem(f"i{n}", f"I{n}: {problem}"))

    def _check_protection(self, out: list[Problem]) -> None:
        key = self.header_protection_key
        if len(key) not in (0, HEADER_PROTECTION_KEY_SIZE):
            out.append(
                Problem(
                    "header_protection_key",
                    f"HeaderProtectionKey must be {HEADER_PROTECTION_KEY_SIZE} bytes (got {len(key)})",
                )
            )
        if self.header_protection:
            for n, prefix in enumerate(self.prefixes, start=1):
                if 0 <= prefix < HEADER_PROTECTION_MIN_PREFIX:
                    out.append(
                        Problem(
                            f"s{n}",
                            f"S{n} is {prefix}; header protection needs every S1-S4 to be at least "
                            f"{HEADER_PROTECTION_MIN_PREFIX} (the prefix seeds the mask)",
                        )
                    )

    def _check_ranges(self, out: list[Problem]) -> None:
        for key in ("content_padding_addition", *TIMER_KEYS):
            value: Range = getattr(self, key)
            if value.hi > U32_MAX:
                out.append(Problem(key, f"{CONF_NAMES[key]} {value} does not fit in 32 bits"))
        for key in TIMER_KEYS:
            value = getattr(self, key)
            if value != UNSET and value.lo < 1:
                out.append(
                    Problem(
                        key,
                        f"{CONF_NAMES[key]} {value} starts at 0; a pick of 0 silently skips the timer in "
                        "amneziawg-go: start the range at 1 or more (0 alone means the WireGuard default)",
                    )
                )
        if self.content_padding_addition.hi > MAX_DATAGRAM:
            out.append(
                Problem(
                    "content_padding_addition",
                    f"ContentPaddingAddition {self.content_padding_addition} exceeds {MAX_DATAGRAM} bytes",
                )
            )

    def warnings(self) -> list[str]:
        """Settings that work but are likely not what the user wants: classifier hazards, keys and tags
        only old peers knew."""
        out: list[str] = []
        for key in self.ignored_legacy_keys:
            out.append(
                f"{CONF_NAMES[key]} is an AmneziaWG 1.5 setting that 2.0 and later dropped; it is ignored "
                "(I1-I5 are sent before every initiation)"
            )
        for n, text in enumerate(self.templates, start=1):
            try:
                template = parse_template(text, allow_counter=True) if text is not None else None
            except TemplateError:
                continue
            if template is not None and template.uses_counter:
                out.append(
                    f"I{n} uses <c>, which only AmneziaWG 1.5 knew; it is sent as an 8-byte counter here, "
                    "but amneziawg-go 2.0+ refuses the template"
                )
        if self.jc > 0 and self.jmax == 0:
            out.append(f"Jc is {self.jc} with Jmin = Jmax = 0: the junk datagrams are empty")
        if self.generation == "1.0" and self.s2 == self.s1 + 56:
            out.append(
                f"S2 = S1 + 56 ({self.s2}): AmneziaWG 1.0 peers refuse this pair (initiation and response "
                "datagrams would have the same size)"
            )
        for n, header in enumerate(self.headers, start=1):
            if header.lo != header.hi and header.lo <= 4:
                out.append(f"H{n} {header} starts at or below 4: amneziawg-go 2.0.15 replaces it with {n}")
        # A transport datagram can be mistaken for a handshake message when the word the classifier reads
        # at S_i is a constant field of the transport header (receiver index, counter halves).
        protected = self.header_protection
        constant_words = {4: "the receiver index", 8: "the counter's low half", 12: "the counter's high half"}
        for n, (prefix, size) in enumerate(
            zip(self.prefixes[:3], (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE), strict=True), start=1
        ):
            delta = prefix - self.s4
            if protected or delta not in constant_words:
                continue
            if delta == 12 and 0 not in self.headers[n - 1]:
                continue  # the counter's high half stays 0 for the first 2^32 packets
            unaligned = self.random_trailers or self.content_padding_addition != UNSET
            if unaligned or (size - MIN_TRANSPORT_SIZE + delta) % 16 == 0:
                out.append(
                    f"S{n} = S4 + {delta}: the receiver reads {constant_words[delta]} of some transport "
                    f"datagrams as a type; one in H{n} loses those packets. Change S{n} or S4"
                )
        rekey, reject = self.rekey_after_time, self.reject_after_time
        rekey_hi = rekey.hi if rekey != UNSET else TIMER_DEFAULTS["rekey_after_time"]
        reject_lo = reject.lo if reject != UNSET else TIMER_DEFAULTS["reject_after_time"]
        if rekey_hi >= reject_lo:
            out.append(
                f"RekeyAfterTime reaches {rekey_hi} s, not below RejectAfterTime {reject_lo} s: sessions "
                "expire before they are renewed"
            )
        return out


def timer_overrides(params: AmneziaParams) -> dict[str, Range]:
    """The 3.x timer ranges that are set, by `TimerSettings` field name (unset ones keep WireGuard's)."""
    return {key: getattr(params, key) for key in TIMER_KEYS if getattr(params, key) != UNSET}


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError("expected a number, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return int(value.strip())
    raise ValueError(f"expected a decimal number, got {value!r}")


def _to_range(value: object) -> Range:
    if isinstance(value, Range):
        return value
    if isinstance(value, bool):
        raise TypeError("expected N or A-B, got a boolean")
    if isinstance(value, int):
        return Range.single(value)
    if isinstance(value, str):
        return Range.parse(value)
    raise ValueError(f"expected N or A-B, got {value!r}")


def _to_template(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected a tag template such as <b 0xc0ffee><r 16>, got {value!r}")


def _to_key(value: object) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 2 * HEADER_PROTECTION_KEY_SIZE:
            try:
                return bytes.fromhex(text)
            except ValueError:
                pass
        try:
            key = base64.b64decode(text, validate=True)
        except binascii.Error:
            key = b""
        if len(key) == HEADER_PROTECTION_KEY_SIZE:
            return key
    raise ValueError("expected 32 bytes as base64 (44 characters, like `awg genkey` prints) or 64 hex digits")


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if text.isdecimal():
            return int(text) != 0
    raise ValueError(f"expected on/off (or 1/0), got {value!r}")


PARAM_NAMES = tuple(
    f.name for f in fields(AmneziaParams) if f.name not in ("ignored_legacy_keys", "explicit_headers")
)
