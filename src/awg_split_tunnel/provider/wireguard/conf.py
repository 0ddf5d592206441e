"""WireGuard / AmneziaWG `.conf` files, read exactly as `awg setconf` and `awg-quick` read them.

Lexing (amneziawg-tools `config.c`, `wg-quick`): everything from `#` is a comment; section headers and
keys are case-insensitive; every `[Peer]` starts a new peer; all whitespace is removed from a line except
on lines that start in column 0 with `I1`…`I5`, where only the whitespace around the key, the `=` and at
the ends of the value goes (`<b 0x…>` needs its inner space). The awg-quick keys (Address, DNS, MTU,
Table, Pre/PostUp/Down, SaveConfig) keep their inner spaces too, as wg-quick reads them from the raw line.

This module checks syntax only: numbers and their bounds, ranges with lo ≤ hi, base64 keys, addresses.
Whether AmneziaWG parameters make sense together (H ranges disjoint, S vs. header protection, templates)
is `provider.amneziawg.params`'s job. PreUp/PostUp/PreDown/PostDown and SaveConfig are read and written
back, never executed.

Error messages name file, line and key but never repeat what could be a key: a malformed line is named by
its key name only, and values echoed by a parser have anything shaped like a key hidden.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.wireguard.keys import decode_key, encode_key, hide_keys
from awg_split_tunnel.provider.wireguard.value_range import Range

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Section = Literal["interface", "peer"]

U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
MIN_MTU = 68  # the IPv4 minimum; `ip link` refuses less
# C isspace(): what `config.c` strips.
_SPACE = " \t\n\r\v\f"
_SPACE_RE = re.compile(r"[ \t\n\r\v\f]+")
_LIST_SEPARATORS = re.compile(r"[,\s]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_TEMPLATE_KEYS = ("i1", "i2", "i3", "i4", "i5")

AWG_PARAMETERS = (
    "jc",
    "jmin",
    "jmax",
    "s1",
    "s2",
    "s3",
    "s4",
    "h1",
    "h2",
    "h3",
    "h4",
    "i1",
    "i2",
    "i3",
    "i4",
    "i5",
    "header_protection_key",
    "content_padding_addition",
    "rekey_after_time",
    "rekey_timeout",
    "reject_after_time",
    "keepalive_timeout",
    "max_handshake_attempts",
    "random_trailers",
    "disable_cookies",
)
"""AmneziaWG's parameters, by their UAPI (lower-case) names, in the order the tools write them."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A peer's address as written: a host name or IP literal and a UDP port. Resolution is the device's
    job (wg resolves once, when the config is applied)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse `host:port` or `[v6]:port`; ValueError with a clear message otherwise."""
        text = text.strip()
        if "@" in text:
            # `user:password@host:port`: the message must not repeat it.
            raise ValueError(
                "expected host:port or [IPv6]:port; credentials ('user:password@') cannot be part of "
                "an address (the value is not shown)"
            )
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError(f"no closing ']' in {text!r}")
            host, rest = text[1:close], text[close + 1 :]
            if not rest.startswith(":"):
                raise ValueError(f"no ':port' after ']' in {text!r}")
            port_text = rest[1:]
            _check_ipv6(host, text)
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"expected host:port or [IPv6]:port, got {text!r}")
            if ":" in host:
                # wg takes the last ':' as the port separator, so a bare IPv6 literal works there too.
                _check_ipv6(host, text)
            elif not _HOSTNAME.fullmatch(host):
                raise ValueError(f"{host!r} is not a host name or IP address")
        if not (port_text.isdigit() and port_text.isascii()) or not 1 <= int(port_text) <= U16_MAX:
            raise ValueError(f"port must be a number from 1 to {U16_MAX}, got {port_text!r}")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _check_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None


@dataclass(frozen=True, slots=True)
class InterfaceSection:
    """`[Interface]`. None means the key was absent; tuples are empty when absent."""

    private_key: bytes = field(repr=False)
    addresses: tuple[IPInterface, ...] = ()
    dns: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    mtu: int | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    table: str | None = None
    pre_up: tuple[str, ...] = ()
    post_up: tuple[str, ...] = ()
    pre_down: tuple[str, ...] = ()
    post_down: tuple[str, ...] = ()
    save_config: bool = False
    jc: int | None = None
    jmin: int | None = None
    jmax: int | None = None
    s1: int | None = None
    s2: int | None = None
    s3: int | None = None
    s4: int | None = None
    h1: Range | None = None
    h2: Range | None = None
    h3: Range | None = None
    h4: Range | None = None
    i1: str | None = None
    i2: str | None = None
    i3: str | None = None
    i4: str | None = None
    i5: str | None = None
    header_protection_key: bytes | None = field(default=None, repr=False)
    content_padding_addition: Range | None = None
    rekey_after_time: Range | None = None
    rekey_timeout: Range | None = None
    reject_after_time: Range | None = None
    keepalive_timeout: Range | None = None
    max_handshake_attempts: Range | None = None
    random_trailers: bool | None = None
    disable_cookies: bool | None = None


@dataclass(frozen=True, slots=True)
class PeerSection:
    """One `[Peer]`. `persistent_keepalive` None means off (`off`, `0` or absent); the preshared key None
    means none (32 zero bytes on the wire)."""

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: Range | None = None
    advanced_security: bool | None = None


@dataclass(frozen=True, slots=True)
class WgConf:
    """A parsed `.conf`: one interface and its peers, in file order."""

    interface: InterfaceSection
    peers: tuple[PeerSection, ...] = ()

    @property
    def is_amneziawg(self) -> bool:
        """Whether the file sets any AmneziaWG parameter (a plain WireGuard file sets none)."""
        return bool(awg_params(self))

    def to_text(self) -> str:
        """The file as awg-quick reads it; `parse_conf(conf.to_text()) == conf`. ValueError for a value
        no `.conf` can hold (a `#` or a line break in a template or command)."""
        lines = ["[Interface]", *_format_section(self.interface, _INTERFACE_KEYS)]
        for peer in self.peers:
            lines += ["", "[Peer]", *_format_section(peer, _PEER_KEYS)]
        return "\n".join(lines) + "\n"


def awg_params(conf: WgConf) -> dict[str, object]:
    """The AmneziaWG parameters the file sets, by lower-case name (`jc`, `h1`, `i1`, `random_trailers`…);
    values are ints, `Range`s, template strings, the 32-byte key or bools."""
    iface = conf.interface
    return {name: value for name in AWG_PARAMETERS if (value := getattr(iface, name)) is not None}


# -- value parsers: text → typed value, ValueError with a message a user can act on --------------------


def _decimal(text: str, what: str, limit: int) -> int:
    if not (text.isdigit() and text.isascii()):
        raise ValueError(f"{what} must be a decimal number from 0 to {limit}, got {text!r}")
    value = int(text)
    if value > limit:
        raise ValueError(f"{what} must be at most {limit}, got {value}")
    return value


def _u16(what: str) -> Callable[[str], int]:
    return lambda text: _decimal(text, what, U16_MAX)


def _range(what: str, limit: int) -> Callable[[str], Range]:
    def parse(text: str) -> Range:
        try:
            value = Range.parse(text)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if value.hi > limit:
            # The tools carry these in 16 (or 32) bits and would silently truncate larger values.
            raise ValueError(f"{what} must lie within 0-{limit}, got {text!r}")
        return value

    return parse


def _key(what: str) -> Callable[[str], bytes]:
    return lambda text: decode_key(text, what=what)


def _mtu(text: str) -> int:
    value = _decimal(text, "MTU", U16_MAX)
    if value < MIN_MTU:
        raise ValueError(f"MTU must be at least {MIN_MTU}, got {value}")
    return value


def _listen_port(text: str) -> int:
    if not (text.isdigit() and text.isascii()):
        raise ValueError(f"ListenPort must be a port number (0-{U16_MAX}), got {text!r}")
    return _decimal(text, "ListenPort", U16_MAX)


def _fwmark(text: str) -> int:
    if text.lower() == "off":
        return 0
    try:
        value = int(text[2:], 16) if len(text) > 2 and text.startswith("0x") else int(text, 10)
    except ValueError:
        value = -1
    if not text[:1].isdigit() or not 0 <= value <= U32_MAX or not text.isascii():
        raise ValueError(f"FwMark must be off, a decimal or 0x-hex number up to 0xffffffff, got {text!r}")
    return value


def _save_config(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"SaveConfig must be true or false, got {text!r}")
    return lowered == "true"


def _on_off(what: str) -> Callable[[str], bool]:
    def parse(text: str) -> bool:
        lowered = text.lower()
        if lowered in ("on", "off"):
            return lowered == "on"
        if text.isdigit() and text.isascii():
            return int(text) != 0
        raise ValueError(f"{what} must be on, off or a number (0 = off), got {text!r}")

    return parse


def _addresses(text: str) -> tuple[IPInterface, ...]:
    found: list[IPInterface] = []
    for item in _split_list(text):
        try:
            found.append(ipaddress.ip_interface(item))
        except ValueError:
            raise ValueError(f"Address {item!r} is not an IP address with an optional /prefix") from None
    return tuple(found)


def _dns(text: str) -> tuple[IPAddress | str, ...]:
    found: list[IPAddress | str] = []
    for item in _split_list(text):
        try:
            found.append(ipaddress.ip_address(item))
            continue
        except ValueError:
            pass
        # wg-quick takes anything of digits and dots, or with a ':', for a server address.
        if re.fullmatch(r"[0-9.]+", item) or ":" in item or not _HOSTNAME.fullmatch(item):
            raise ValueError(f"DNS entry {item!r} is neither an IP address nor a search domain")
        found.append(item)
    return tuple(found)


def _allowed_ips(text: str) -> tuple[IPNetwork, ...]:
    found: list[IPNetwork] = []
    for item in (part for part in text.split(",") if part.strip()):
        item = item.strip()
        _, slash, prefix = item.partition("/")
        if slash and not (prefix.isdigit() and prefix.isascii()):
            raise ValueError(f"AllowedIPs entry {item!r} has a bad prefix length")
        try:
            # A host part is allowed (wg warns and masks it), so not strict.
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"AllowedIPs entry {item!r} is not an IP address or network") from None
    return tuple(found)


def _persistent_keepalive(text: str) -> Range | None:
    # `off` is what 2.0 tools wrote (3.x tools refuse it); 0 means off too. Written back as a number.
    if text.lower() == "off":
        return None
    value = _range("PersistentKeepalive", U16_MAX)(text)
    return None if value == Range(0, 0) else value


def _template(text: str) -> str | None:
    # AmneziaVPN exports carry empty I2…I5 lines; the Android client treats them as unset, so do we.
    return text or None


def _command(text: str) -> tuple[str]:
    return (text,)


def _split_list(text: str) -> list[str]:
    return [item for item in _LIST_SEPARATORS.split(text) if item]


# -- value formatters: typed value → text -------------------------------------------------------------


def _join(values: Iterable[object]) -> str:
    return ", ".join(str(v) for v in values)


def _format_key(value: Any) -> str:
    return encode_key(value)


def _format_on_off(value: Any) -> str:
    return "on" if value else "off"


# -- the key table ------------------------------------------------------------------------------------

Lexing = Literal["compact", "raw", "template"]


@dataclass(frozen=True, slots=True)
class _Key:
    name: str  # canonical spelling, as the tools write it
    field: str  # attribute of the section dataclass
    parse: Callable[[str], Any]
    format: Callable[[Any], str] = str
    lexing: Lexing = "compact"  # compact: all whitespace removed (awg); raw: ends trimmed (wg-quick)
    repeated: bool = False  # every line adds to a tuple instead of replacing
    empty: Literal["error", "unset", "nothing"] = "error"
    written_as_lines: bool = False  # one line per tuple item when writing


def _interface_keys() -> tuple[_Key, ...]:
    keys = [
        _Key("PrivateKey", "private_key", _key("PrivateKey"), _format_key),
        _Key("Address", "addresses", _addresses, _join, "raw", repeated=True, empty="nothing"),
        _Key("DNS", "dns", _dns, _join, "raw", repeated=True, empty="nothing"),
        _Key("MTU", "mtu", _mtu),
        _Key("ListenPort", "listen_port", _listen_port),
        _Key("FwMark", "fwmark", _fwmark, lambda v: "off" if v == 0 else str(v)),
        _Key("Table", "table", str, str, "raw"),
        *(
            _Key(name, attr, _command, str, "raw", repeated=True, written_as_lines=True)
            for name, attr in (
                ("PreUp", "pre_up"),
                ("PostUp", "post_up"),
                ("PreDown", "pre_down"),
                ("PostDown", "post_down"),
            )
        ),
        _Key("SaveConfig", "save_config", _save_config, lambda v: "true" if v else "false"),
        *(_Key(name, name.lower(), _u16(name)) for name in ("Jc", "Jmin", "Jmax", "S1", "S2", "S3", "S4")),
        *(_Key(f"H{n}", f"h{n}", _range(f"H{n}", U32_MAX)) for n in range(1, 5)),
        *(_Key(f"I{n}", f"i{n}", _template, str, "template", empty="unset") for n in range(1, 6)),
        _Key("HeaderProtectionKey", "header_protection_key", _key("HeaderProtectionKey"), _format_key),
        *(
            _Key(name, attr, _range(name, U16_MAX))
            for name, attr in (
                ("ContentPaddingAddition", "content_padding_addition"),
                ("RekeyAfterTime", "rekey_after_time"),
                ("RekeyTimeout", "rekey_timeout"),
                ("RejectAfterTime", "reject_after_time"),
                ("KeepaliveTimeout", "keepalive_timeout"),
                ("MaxHandshakeAttempts", "max_handshake_attempts"),
            )
        ),
        _Key("RandomTrailers", "random_trailers", _on_off("RandomTrailers"), _format_on_off),
        _Key("DisableCookies", "disable_cookies", _on_off("DisableCookies"), _format_on_off),
    ]
    return tuple(keys)


_INTERFACE_KEYS = _interface_keys()
_PEER_KEYS = (
    _Key("PublicKey", "public_key", _key("PublicKey"), _format_key),
    _Key("PresharedKey", "preshared_key", _key("PresharedKey"), _format_key),
    _Key("Endpoint", "endpoint", Endpoint.parse),
    _Key("AllowedIPs", "allowed_ips", _allowed_ips, _join, repeated=True, empty="nothing"),
    _Key("PersistentKeepalive", "persistent_keepalive", _persistent_keepalive),
    _Key("AdvancedSecurity", "advanced_security", _on_off("AdvancedSecurity"), _format_on_off),
)
_KEYS: dict[Section, dict[str, _Key]] = {
    "interface": {k.name.lower(): k for k in _INTERFACE_KEYS},
    "peer": {k.name.lower(): k for k in _PEER_KEYS},
}
_REQUIRED: dict[Section, str] = {"interface": "PrivateKey", "peer": "PublicKey"}
_SECTION_TITLES: dict[Section, str] = {"interface": "[Interface]", "peer": "[Peer]"}


def _format_section(section: InterfaceSection | PeerSection, keys: Sequence[_Key]) -> list[str]:
    lines: list[str] = []
    for key in keys:
        value = getattr(section, key.field)
        if isinstance(section, InterfaceSection) and key.field == "dns":
            value = (*section.dns, *section.dns_search)
        if value is None or value == () or (key.field == "save_config" and not value):
            continue
        texts = [str(item) for item in value] if key.written_as_lines else [key.format(value)]
        for text in texts:
            # A '#' would start a comment and a line break a new line: the file would mean something else.
            if "#" in text or "\n" in text or "\r" in text:
                raise ValueError(f"{key.name} value {text!r} cannot be written to a .conf file")
            lines.append(f"{key.name} = {text}")
    return lines


# -- parsing ------------------------------------------------------------------------------------------


class _SectionBuilder:
    """Collects one section's values; later lines replace earlier ones, as in awg, except repeated keys."""

    def __init__(self, kind: Section, line: int) -> None:
        self.kind = kind
        self.line = line
        self.values: dict[str, Any] = {}

    def set(self, key: _Key, text: str) -> None:
        if text == "" and key.empty != "error":
            if key.empty == "unset":
                self.values.pop(key.field, None)
            else:
                self.values.setdefault(key.field, ())
            return
        if text == "":
            raise ValueError(f"{key.name} has no value")
        value = key.parse(text)
        if key.repeated:
            self.values[key.field] = (*self.values.get(key.field, ()), *value)
        elif value is None:
            self.values.pop(key.field, None)
        else:
            self.values[key.field] = value

    def build(self, file: str | None) -> InterfaceSection | PeerSection:
        required = _REQUIRED[self.kind]
        if _KEYS[self.kind][required.lower()].field not in self.values:
            title = _SECTION_TITLES[self.kind]
            raise ConfigError(f"{title} has no {required}", file=file, line=self.line, key=required)
        if self.kind == "peer":
            return PeerSection(**self.values)
        values = dict(self.values)
        entries = values.pop("dns", ())
        values["dns"] = tuple(e for e in entries if not isinstance(e, str))
        values["dns_search"] = tuple(e for e in entries if isinstance(e, str))
        return InterfaceSection(**values)


def _lex(raw: str) -> tuple[str, str, str] | None:
    """One physical line → (compact, key, value), or None for a blank/comment line.

    `compact` is the line without comment and whitespace (what awg matches keys against); `value` is
    lexed per key later, so it is returned raw (comment removed) here.
    """
    stripped = raw.split("#", 1)[0]
    compact = _SPACE_RE.sub("", stripped)
    if not compact:
        return None
    key, sep, value = stripped.partition("=")
    return compact, _SPACE_RE.sub("", key) if sep else "", value if sep else ""


def parse_conf(text: str, *, file: str | None = None) -> WgConf:
    """Parse a `.conf`; ConfigError naming file, line and key for anything awg/awg-quick would refuse."""
    text = text.removeprefix("\ufeff")  # Windows editors save a BOM the C parser would choke on
    interface: _SectionBuilder | None = None
    peers: list[_SectionBuilder] = []
    current: _SectionBuilder | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        lexed = _lex(raw)
        if lexed is None:
            continue
        compact, key_text, raw_value = lexed
        if compact.startswith("["):
            title = compact.lower()
            if title == "[interface]":
                # A second [Interface] continues the first, as in awg.
                interface = interface or _SectionBuilder("interface", number)
                current = interface
            elif title == "[peer]":
                current = _SectionBuilder("peer", number)
                peers.append(current)
            else:
                shown = compact if _SECTION_TITLE.fullmatch(compact) else "header (not shown)"
                raise ConfigError(
                    f"unknown section {shown}; expected [Interface] or [Peer]", file=file, line=number
                )
            continue
        if not key_text or not _KEY_NAME.fullmatch(key_text):
            message, key = _malformed_line(raw)
            raise ConfigError(message, file=file, line=number, key=key)
        if current is None:
            raise ConfigError(
                f"{key_text} appears before any [Interface] or [Peer] section",
                file=file,
                line=number,
                key=key_text,
            )
        spec = _KEYS[current.kind].get(key_text.lower())
        if spec is None:
            raise ConfigError(
                _unknown_key_message(key_text, current.kind), file=file, line=number, key=key_text
            )
        try:
            current.set(spec, _lex_value(spec, raw, raw_value))
        except ValueError as exc:
            raise ConfigError(hide_keys(str(exc)), file=file, line=number, key=spec.name) from None
    if interface is None:
        raise ConfigError("no [Interface] section", file=file, key="Interface")
    built_interface = interface.build(file)
    assert isinstance(built_interface, InterfaceSection)
    built_peers = [p.build(file) for p in peers]
    return WgConf(built_interface, tuple(p for p in built_peers if isinstance(p, PeerSection)))


def _lex_value(spec: _Key, raw: str, raw_value: str) -> str:
    if spec.lexing == "raw":
        return raw_value.strip(_SPACE)
    if spec.lexing == "template":
        value = raw_value.strip(_SPACE)
        # awg keeps inner spaces only when the line starts in column 0; an indented line loses them
        # (`<b 0x…>` becomes `<b0x…>`, an unknown tag), so refuse it here with the reason.
        if raw[:2].lower() not in _TEMPLATE_KEYS and _SPACE_RE.search(value):
            raise ValueError(
                f"{spec.name} must start in the first column: on an indented line awg removes the "
                "spaces inside the value"
            )
        return value
    return _SPACE_RE.sub("", raw_value)


# What a key name looks like; anything else left of the '=' is not shown (it may be a key pasted onto the
# wrong line, or a `PrivateKey: <key>` line whose '=' is the key's base64 padding).
_KEY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_LEADING_NAME = re.compile(r"[ \t]*([A-Za-z][A-Za-z0-9_]{0,31})(?=[ \t:=]|$)")
_SECTION_TITLE = re.compile(r"\[[A-Za-z0-9_.-]{1,32}\]")


def _malformed_line(raw: str) -> tuple[str, str | None]:
    """The message (and key) for a line that is not `Key = Value`. The line itself is never echoed: its
    value may be a private key. A known key name it starts with is named and becomes the error's key."""
    match = _LEADING_NAME.match(raw.split("#", 1)[0])
    name = match.group(1) if match else None
    if name is None:
        return "expected 'Key = Value' (the line is not shown: it may hold a key)", None
    spec = _KEYS["interface"].get(name.lower()) or _KEYS["peer"].get(name.lower())
    if spec is None:
        return f"expected 'Key = Value'; the line starts with {name} (the rest is not shown)", None
    return (
        f"expected '{spec.name} = value' with '=' right after the key name (the value is not shown)",
        spec.name,
    )


def _unknown_key_message(key: str, section: Section) -> str:
    other: Section = "peer" if section == "interface" else "interface"
    if key.lower() in _KEYS[other]:
        return f"{key} belongs in {_SECTION_TITLES[other]}, not in {_SECTION_TITLES[section]}"
    if key.lower() in ("j1", "j2", "j3", "itime"):
        return f"{key} is an AmneziaWG 1.5 key that 2.0 and later tools refuse"
    return f"unknown key {key} in {_SECTION_TITLES[section]}"


# -- settings given one by one (inline YAML) ----------------------------------------------------------


def setting_key(section: Section, name: str) -> str | None:
    """The canonical `.conf` spelling of a setting named in any case, with or without underscores
    (`private_key`, `PrivateKey`), or None if the section has no such key."""
    spec = _KEYS[section].get(name.replace("_", "").lower())
    return spec.name if spec else None


def check_setting(section: Section, name: str, text: str) -> None:
    """Validate one setting's value as the `.conf` parser would; ValueError with the reason."""
    spec = _KEYS[section].get(name.replace("_", "").lower())
    if spec is None:
        raise ValueError(f"unknown {_SECTION_TITLES[section]} setting {name}")
    try:
        _SectionBuilder(section, 0).set(spec, _lex_setting(spec, text))
    except ValueError as exc:
        raise ValueError(hide_keys(str(exc))) from None


def conf_from_settings(
    interface: Mapping[str, str], peers: Sequence[Mapping[str, str]], *, file: str | None = None
) -> WgConf:
    """Build a `WgConf` from settings given by name (see `setting_key`) with `.conf`-syntax text values.
    ConfigError names the key (and ``file``) when a value is bad or a required key is missing."""
    built: list[InterfaceSection | PeerSection] = []
    sections: list[tuple[Section, Mapping[str, str]]] = [("interface", interface)]
    sections += [("peer", p) for p in peers]
    for section, settings in sections:
        builder = _SectionBuilder(section, 0)
        for name, text in settings.items():
            spec = _KEYS[section].get(name.replace("_", "").lower())
            if spec is None:
                raise ConfigError(f"unknown {_SECTION_TITLES[section]} setting", file=file, key=name)
            try:
                builder.set(spec, _lex_setting(spec, text))
            except ValueError as exc:
                raise ConfigError(hide_keys(str(exc)), file=file, key=name) from None
        try:
            built.append(builder.build(file))
        except ConfigError as exc:
            raise ConfigError(exc.reason, file=file, key=exc.key) from None
    first = built[0]
    assert isinstance(first, InterfaceSection)
    return WgConf(first, tuple(p for p in built[1:] if isinstance(p, PeerSection)))


def _lex_setting(spec: _Key, text: str) -> str:
    if spec.lexing == "compact":
        return _SPACE_RE.sub("", text)
    return text.strip(_SPACE)
