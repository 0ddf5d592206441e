"""The YAML configuration (docs/DESIGN.md: Config): models, loading, and `ConfigManager` for validated edits.

Loading never shows a traceback for bad input: YAML syntax errors, unknown keys, wrong types, duplicate
tunnel ids, references to unknown tunnels, unreadable or malformed `.conf` files all become a
`ConfigError` naming the file, the line and the key (`tunnels[1].server`). Lines come from the ruamel.yaml
round-trip document, which is also what `ConfigManager` edits, so a user's comments and key order survive
every change.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import ipaddress
import itertools
import logging
import os
import re
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePath, PureWindowsPath
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, MarkedYAMLError, YAMLError
from ruamel.yaml.tokens import CommentToken

from awg_split_tunnel.core.events import ConfigChanged, EventBus
from awg_split_tunnel.core.policy import DIRECT, DROP, RESERVED_TUNNEL_IDS, FallbackPolicy, TunnelType
from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.process.matcher import compile_pattern
from awg_split_tunnel.provider.amneziawg.params import CONF_NAMES, AmneziaParams
from awg_split_tunnel.provider.wireguard.conf import (
    AWG_PARAMETERS,
    Endpoint,
    WgConf,
    awg_params,
    check_setting,
    conf_from_settings,
    parse_conf,
)
from awg_split_tunnel.provider.wireguard.keys import HIDDEN, hide_keys

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

log = logging.getLogger("awg_split_tunnel.core")

ENV_CONFIG = "AWG_SPLIT_TUNNEL_CONFIG"
TUNNEL_ID_RE = re.compile(r"[a-z0-9_-]+")
TUNNEL_TYPES = tuple(t.value for t in TunnelType)
DEFAULT_ALLOWED_IPS = "0.0.0.0/0, ::/0"
"""What an inline peer routes when `allowed_ips` is not given: everything the router sends it."""

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
RELOAD_SETTLE = 0.05
"""Seconds between `ConfigManager.reload`'s two reads of the file: a file still being written differs."""
LOCK_SUFFIX = ".lock"
"""The edit lock of `config.yaml` is the file `config.yaml.lock` beside it."""


class ConfigUnsettled(ConfigError):
    """The config file changed while it was read (it is being written): not an error in the file; the
    reader tries again once it settles."""


def default_config_path() -> Path:
    """`%ProgramData%\\awg-split-tunnel\\config.yaml` on Windows, `/etc/awg-split-tunnel/config.yaml`
    elsewhere; the environment variable `AWG_SPLIT_TUNNEL_CONFIG` overrides both."""
    return Path(default_config_location(sys.platform, os.environ))


def default_config_location(platform: str, environ: Mapping[str, str]) -> PurePath:
    """`default_config_path` for a given platform and environment (testable anywhere)."""
    override = environ.get(ENV_CONFIG)
    if override:
        return Path(override).expanduser()
    if platform == "win32":
        base = environ.get("ProgramData") or r"C:\ProgramData"
        return PureWindowsPath(base, "awg-split-tunnel", "config.yaml")
    return Path("/etc/awg-split-tunnel/config.yaml")


# -- models -------------------------------------------------------------------------------------------


class _Model(BaseModel):
    # Numbers where text is expected (a numeric password, `h1: 5`) are taken as their text.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


def _setting_text(value: object) -> object:
    """Inline WireGuard values in `.conf` syntax: lists joined with commas, booleans as on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            raise ValueError("expected a list of addresses")
        return ", ".join(str(v) for v in value)
    return value


DPAPI_PREFIX = "dpapi:"
"""A secret value written `dpapi:BASE64` is DPAPI-encrypted (Windows, machine scope; docs/WINDOWS.md)."""
SECRETS_CONTEXT = "secrets"
"""The validation context's key for the `SecretProtection` that reads `dpapi:` values (None: none here)."""


class SecretProtection(Protocol):
    """Encrypts secrets of the config for this machine (Windows: DPAPI, platform/windows/dpapi.py).
    `unprotect` raises OSError for a blob it cannot decrypt (another machine's, or damaged)."""

    def protect(self, data: bytes) -> bytes: ...

    def unprotect(self, blob: bytes) -> bytes: ...


def _unprotected(value: object, info: ValidationInfo) -> object:
    """A `dpapi:BASE64` secret decrypted; other values as they are. The messages never show the value."""
    if not isinstance(value, str) or not value.startswith(DPAPI_PREFIX):
        return value
    protection: SecretProtection | None = (info.context or {}).get(SECRETS_CONTEXT)
    if protection is None:
        raise ValueError(
            "DPAPI values can only be read on Windows: write the secret itself here (the value is not shown)"
        )
    try:
        blob = base64.b64decode(value[len(DPAPI_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the text after dpapi: is not base64 (the value is not shown)") from None
    try:
        return protection.unprotect(blob).decode("utf-8")
    except OSError as exc:
        raise ValueError(
            f"cannot decrypt this DPAPI value ({exc.strerror or 'invalid data'}): it was protected on "
            "another machine or is damaged; write the secret itself here and run protect-secrets again"
        ) from None
    except UnicodeDecodeError:
        raise ValueError("this DPAPI value does not decrypt to text (the value is not shown)") from None


Setting = Annotated[str | None, BeforeValidator(_setting_text)]
SecretSetting = Annotated[
    str | None, BeforeValidator(_setting_text), BeforeValidator(_unprotected), Field(repr=False)
]


class RuleConfig(_Model):
    """One line of `rules`: processes matching `process` go through `tunnel` (a tunnel id or `direct`)."""

    process: str
    tunnel: str
    fallback: FallbackPolicy = FallbackPolicy.ALLOW_DIRECT

    @field_validator("process")
    @classmethod
    def _pattern_compiles(cls, value: str) -> str:
        try:
            compile_pattern(value)
        except ValueError:
            raise  # it names what is wrong (bad regex, empty pattern)
        except Exception as exc:  # a pattern must never crash loading
            raise ValueError(f"invalid process pattern {value!r}: {exc}") from None
        return value


class _TunnelBase(_Model):
    id: str
    type: str
    lan_bypass: bool = True

    @field_validator("id")
    @classmethod
    def _id_syntax(cls, value: str) -> str:
        if not TUNNEL_ID_RE.fullmatch(value):
            raise ValueError(f"tunnel id {value!r} may contain only a-z, 0-9, '_' and '-'")
        if value in RESERVED_TUNNEL_IDS:
            raise ValueError(f"'{value}' is reserved (it means no tunnel); choose another id")
        return value

    @property
    def tunnel_type(self) -> TunnelType:
        return TunnelType(self.type)


def _dns_servers(value: object) -> object:
    """`dns:` of a stream tunnel: one address or a list of them, each an IP address."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of DNS server addresses")
    for item in items:
        try:
            ipaddress.ip_address(str(item))
        except ValueError:
            raise ValueError(f"DNS server {item!r} is not an IP address") from None
    return tuple(str(item) for item in items)


class _ProxyTunnel(_TunnelBase):
    server: str
    username: str | None = None
    password: Annotated[str | None, BeforeValidator(_unprotected), Field(repr=False)] = None
    dns: Annotated[tuple[str, ...], BeforeValidator(_dns_servers)] = ()
    """The resolvers this tunnel's apps' lookups are sent to (none: the system's, through the tunnel)."""

    @field_validator("server")
    @classmethod
    def _server_syntax(cls, value: str) -> str:
        if "@" in value:
            # `user:password@host:port`: refused without repeating it.
            raise ValueError(
                "server is host:port; give the user name and password as the keys username and "
                "password, not in the address (the value is not shown)"
            )
        Endpoint.parse(value)
        return value

    @property
    def endpoint(self) -> Endpoint:
        """The proxy's host and port."""
        return Endpoint.parse(self.server)


class Socks5Tunnel(_ProxyTunnel):
    """A SOCKS5 proxy; `udp` relays UDP through UDP ASSOCIATE."""

    type: Literal["socks5"]
    udp: bool = True


class HttpTunnel(_ProxyTunnel):
    """An HTTP CONNECT proxy. It cannot carry UDP: the apps' UDP is dropped (browsers fall back from QUIC
    to TCP) or, with `udp: direct`, sent directly."""

    type: Literal["http"]
    udp: Literal["drop", "direct"] = "drop"


_PEER_FIELDS = ("public_key", "preshared_key", "endpoint", "allowed_ips", "persistent_keepalive")


class InlinePeer(_Model):
    """The `peer:` of an inline packet tunnel (the keys of a `.conf` [Peer], in snake_case)."""

    public_key: Annotated[str, BeforeValidator(_setting_text)]
    preshared_key: SecretSetting = None
    endpoint: Setting = None
    allowed_ips: Setting = None
    persistent_keepalive: Setting = None

    @field_validator(*_PEER_FIELDS)
    @classmethod
    def _conf_syntax(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.field_name is not None:
            check_setting("peer", info.field_name, value)
        return value

    def settings(self) -> dict[str, str]:
        """The given settings by field name; `allowed_ips` defaults to everything."""
        values = {name: getattr(self, name) for name in _PEER_FIELDS}
        if values["allowed_ips"] is None:
            values["allowed_ips"] = DEFAULT_ALLOWED_IPS
        return {k: v for k, v in values.items() if v is not None}


_INTERFACE_FIELDS = ("private_key", "address", "dns", "mtu", "listen_port", *AWG_PARAMETERS)
_INLINE_SECRETS = ("private_key", "header_protection_key")
SECRET_KEYS = (*_INLINE_SECRETS, "preshared_key", "password")
"""The keys whose values are secrets (a tunnel's, or its peer's): the ones `protect-secrets` encrypts and
a `dpapi:` value may stand for."""


class PacketTunnel(_TunnelBase):
    """A WireGuard or AmneziaWG tunnel: `config_file` (a `.conf`, relative to the YAML file) or the same
    settings inline, never both. `wg_conf` holds the effective settings once loaded."""

    type: Literal["amneziawg", "wireguard"]
    config_file: str | None = None
    private_key: SecretSetting = None
    address: Setting = None
    dns: Setting = None
    mtu: Setting = None
    listen_port: Setting = None
    jc: Setting = None
    jmin: Setting = None
    jmax: Setting = None
    s1: Setting = None
    s2: Setting = None
    s3: Setting = None
    s4: Setting = None
    h1: Setting = None
    h2: Setting = None
    h3: Setting = None
    h4: Setting = None
    i1: Setting = None
    i2: Setting = None
    i3: Setting = None
    i4: Setting = None
    i5: Setting = None
    header_protection_key: SecretSetting = None
    content_padding_addition: Setting = None
    rekey_after_time: Setting = None
    rekey_timeout: Setting = None
    reject_after_time: Setting = None
    keepalive_timeout: Setting = None
    max_handshake_attempts: Setting = None
    random_trailers: Setting = None
    disable_cookies: Setting = None
    peer: InlinePeer | None = None

    _wg_conf: WgConf | None = PrivateAttr(default=None)
    _conf_path: Path | None = PrivateAttr(default=None)

    @field_validator(*_INTERFACE_FIELDS)
    @classmethod
    def _conf_syntax(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.field_name is not None:
            check_setting("interface", info.field_name, value)
        return value

    def inline_settings(self) -> dict[str, str]:
        """The inline `[Interface]` settings that are given, by field name."""
        return {name: value for name in _INTERFACE_FIELDS if (value := getattr(self, name)) is not None}

    @property
    def is_inline(self) -> bool:
        return self.peer is not None or bool(self.inline_settings())

    @property
    def wg_conf(self) -> WgConf:
        """The effective WireGuard/AmneziaWG settings (from `config_file` or inline)."""
        return tunnel_wg_conf(self)

    @property
    def conf_path(self) -> Path | None:
        """The resolved path of `config_file`, once loaded."""
        return self._conf_path


DEFAULT_UI_LISTEN = "127.0.0.1:7799"
"""Where the dashboard listens unless the config says otherwise (loopback only)."""


def _ui_setting(value: object) -> object:
    """``ui: off`` (or false) turns the dashboard off; ``ui: on`` (or true) is the default listener."""
    if value is False or (isinstance(value, str) and value.lower() == "off"):
        return {"listen": None}
    if value is True or (isinstance(value, str) and value.lower() == "on"):
        return {}
    return value


class UiConfig(_Model):
    """The local web dashboard (docs/DASHBOARD.md): ``listen`` is a loopback ``IP:PORT``; None: off."""

    listen: str | None = DEFAULT_UI_LISTEN

    @field_validator("listen")
    @classmethod
    def _loopback_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.rpartition(":")
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
            number = int(port)
        except ValueError:
            address, number = None, -1
        if address is None or not 0 <= number <= 65535:
            raise ValueError(f"expected a loopback IP:PORT such as {DEFAULT_UI_LISTEN}, got {value!r}")
        if not address.is_loopback:
            raise ValueError(
                f"{value!r} is not a loopback address: the dashboard is only served on this machine "
                "(127.0.0.1 or [::1])"
            )
        return value

    @property
    def host_port(self) -> tuple[str, int] | None:
        """The address and port to listen on; None when the dashboard is off."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)


AnyTunnel = Socks5Tunnel | HttpTunnel | PacketTunnel
"""Any tunnel model (for annotations and isinstance checks)."""
Tunnel = Annotated[AnyTunnel, Field(discriminator="type")]


class ProxyBounds(_Model):
    """`proxy:`: what each stream tunnel's proxy may hold (docs/ARCHITECTURE.md, "Proxy bounds"); a value
    left out follows the daemon's open-file limit (caps) or keeps its default (timeouts, in seconds)."""

    max_flows: PositiveInt | None = None
    max_flows_per_app: PositiveInt | None = None
    max_udp_associations: PositiveInt | None = None
    max_udp_associations_per_app: PositiveInt | None = None
    tcp_idle_timeout: PositiveFloat | None = None
    half_close_timeout: PositiveFloat | None = None
    udp_idle_timeout: PositiveFloat | None = None


class DnsSettings(_Model):
    """`dns:`: lookups follow the app (docs/DNS.md)."""

    per_app: bool = True
    """Answer apps' queries to the local resolver on loopback through each app's own route."""
    system: str | None = None
    """Where lookups that carry no app go (the local resolver's own): a tunnel id or `direct`; None: the
    resolver's own rule, else `default`."""


class Config(_Model):
    """The whole validated configuration."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    dataplane: Literal["kernel", "divert"] | None = None
    """How packets are carried (docs/DATAPATHS.md): ``kernel`` (Linux: the first packet of a flow is
    decided, nftables and policy routing carry the rest), ``divert`` (every packet through the router);
    None: the platform's default."""
    default: str = DIRECT
    tunnels: tuple[Tunnel, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    proxy: ProxyBounds = ProxyBounds()
    ui: Annotated[UiConfig, BeforeValidator(_ui_setting)] = UiConfig()
    """The dashboard: ``ui: {listen: 127.0.0.1:7799}`` (the default) or ``ui: off``."""
    dns: DnsSettings = DnsSettings()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def tunnel(self, tunnel_id: str) -> AnyTunnel | None:
        """The tunnel with this id, or None."""
        return next((t for t in self.tunnels if t.id == tunnel_id), None)

    @property
    def tunnel_ids(self) -> tuple[str, ...]:
        return tuple(t.id for t in self.tunnels)

    @property
    def holds_secrets(self) -> bool:
        """Whether the YAML itself carries private keys or passwords (then it is written 0600)."""
        for t in self.tunnels:
            if isinstance(t, PacketTunnel):
                peer_secret = t.peer is not None and t.peer.preshared_key is not None
                if peer_secret or any(getattr(t, name) is not None for name in _INLINE_SECRETS):
                    return True
            elif t.password is not None:
                return True
        return False


def tunnel_wg_conf(tunnel: PacketTunnel) -> WgConf:
    """The effective WireGuard settings of a packet tunnel, whether inline or from its `config_file`.

    Tunnels of a loaded `Config` carry them already; an inline tunnel built by hand is converted here.
    """
    if tunnel._wg_conf is not None:
        return tunnel._wg_conf
    if tunnel.config_file is not None:
        raise ConfigError(
            f"tunnel '{tunnel.id}': config_file is read when the config is loaded (use load_config)",
            key="config_file",
        )
    return _inline_wg_conf(tunnel)


def _inline_wg_conf(tunnel: PacketTunnel) -> WgConf:
    peers = [tunnel.peer.settings()] if tunnel.peer is not None else []
    return conf_from_settings(tunnel.inline_settings(), peers)


# -- reading: YAML → document → Config, errors located ------------------------------------------------


KeyPath = tuple[str | int, ...]


def _yaml(indent: tuple[int, int, int] = (2, 4, 2)) -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a user's long lines
    mapping, sequence, offset = indent
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def _guess_indent(text: str) -> tuple[int, int, int]:
    """The user's indentation as ruamel's (mapping, sequence, offset), so that saving does not re-indent
    the file: the first nested mapping key and the first block-sequence dash below a `key:` line tell."""
    mapping: int | None = None
    offset: int | None = None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for parent, child in itertools.pairwise(lines):
        head = parent.split("#", 1)[0].rstrip()
        if not head.endswith(":"):
            continue
        # A `- key:` line's mapping starts after the dash.
        parent_column = len(head) - len(head.lstrip(" -"))
        depth = len(child) - len(child.lstrip(" "))
        if depth < parent_column:
            continue
        step = depth - parent_column
        if child.lstrip(" ").startswith("- ") and offset is None:
            offset = step
        elif not child.lstrip(" ").startswith("- ") and mapping is None and step > 0:
            mapping = step
        if mapping is not None and offset is not None:
            break
    mapping = mapping or 2
    offset = 2 if offset is None else offset
    return (mapping, offset + 2, offset)


def _load_document(text: str, file: str) -> CommentedMap:
    # ruamel's messages quote what they tripped over (an alias name, a tag): keys are hidden here, the
    # other secrets of the text by `_without_secrets`. Its warnings (a reused anchor `&<password>`) quote
    # the line and would go to stderr as they are, so they are dropped.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            doc = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        name = _secret_key_on_line(text, line)
        if name is not None:
            reason += f"; if this is in the value of {name}, put the value in quotes"
        raise ConfigError(f"YAML syntax: {hide_keys(reason)}", file=file, line=line) from None
    except YAMLError as exc:
        raise ConfigError(f"YAML syntax: {hide_keys(str(exc))}", file=file) from None
    except Exception as exc:
        # ruamel.yaml itself trips over some malformed scalars (`-_` raises IndexError, `._` ValueError);
        # bad input must still end as a ConfigError.
        raise ConfigError(
            f"YAML syntax: cannot read a value ({type(exc).__name__}: {hide_keys(str(exc))})", file=file
        ) from None
    if doc is None:
        return CommentedMap()
    if not isinstance(doc, CommentedMap):
        raise ConfigError(
            "the config must be a mapping of keys (log_level, default, tunnels, rules)", file=file, line=1
        )
    return doc


# A key whose value is secret (`password:`, `private_key:`, `preshared_key:`, also misspelled or in
# `.conf` spelling), and the password of a `user:password@host` address.
_SECRET_KEY = re.compile(r"(?i)([A-Za-z_-]*(?:key|password|passwd|secret))['\"]?[ \t]*[:=][ \t]*")
_USERINFO = re.compile(r"[^\s@/'\",\[\]{}]*:([^\s@/'\",\[\]{}]+)@")
_NOT_SECRETS = {"null", "true", "false", "~"}
_SHORTEST_HIDDEN = 4  # shorter values would hide ordinary words of the message


def _secret_values(text: str) -> set[str]:
    """The values of secret keys and the passwords of `user:password@host` in YAML text, found line by line
    so that they are known even when the YAML does not parse."""
    found: set[str] = set()
    for line in text.splitlines():
        for match in _SECRET_KEY.finditer(line):
            rest = line[match.end() :].split(" #", 1)[0].strip()
            # Block style takes the rest of the line; flow style (`{password: x, id: y}`) ends at , } ]
            for value in (rest, re.split(r"[,}\]]", rest, maxsplit=1)[0].strip()):
                # ruamel names an alias or tag without its `*` or `!`.
                found.update((value, value.strip("'\""), value.lstrip("*&!|>").strip("'\"")))
        for match in _USERINFO.finditer(line):
            found.update((match.group(0)[:-1], match.group(1)))
    return {v for v in found if len(v) >= _SHORTEST_HIDDEN and v.lower() not in _NOT_SECRETS}


def _secret_key_on_line(text: str, line: int | None) -> str | None:
    """The name of the secret key on a line (1-based) of `text`, if there is one."""
    lines = text.splitlines()
    if line is None or not 0 < line <= len(lines):
        return None
    match = _SECRET_KEY.search(lines[line - 1])
    return match.group(1) if match else None


def _without_secrets(error: ConfigError, text: str) -> ConfigError:
    """`error` with every secret of the YAML `text` it was raised for hidden (a message may quote a value:
    an invalid one, or the spot a YAML syntax error points at)."""
    secrets = sorted(_secret_values(text), key=len, reverse=True)

    def hide(message: str | None) -> str | None:
        if message is None:
            return None
        for secret in secrets:
            message = message.replace(secret, HIDDEN)
        return message

    reason, key = hide(error.reason), hide(error.key)
    if reason == error.reason and key == error.key:
        return error
    return ConfigError(reason or "", file=error.file, line=error.line, key=key)


def _plain(node: object) -> object:
    """ruamel's round-trip nodes as plain Python values for pydantic."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node


def _locate(doc: CommentedMap, path: KeyPath) -> tuple[int | None, str]:
    """The line (1-based) of the deepest node of `path` present in the document, and the key as users
    read it (`tunnels[1].server`). Discriminator tags in pydantic locations are skipped."""
    node: object = doc
    line: int | None = None
    key = ""
    for step in path:
        if isinstance(node, CommentedSeq) and isinstance(step, int):
            key += f"[{step}]"
            if 0 <= step < len(node):
                line = node.lc.item(step)[0] + 1
                node = node[step]
            else:
                node = None
            continue
        if isinstance(node, CommentedMap) and isinstance(step, str):
            if step not in node and node.get("type") == step:
                continue  # pydantic names the union member it chose
            key += f".{step}" if key else step
            if step in node:
                line = node.lc.key(step)[0] + 1
                node = node[step]
            else:
                node = None
            continue
        if isinstance(step, str) and step in TUNNEL_TYPES:
            continue
        key += f"[{step}]" if isinstance(step, int) else (f".{step}" if key else step)
        node = None
    return line, key


@dataclass(frozen=True, slots=True)
class _Problem:
    line: int | None
    key: str
    message: str


_SECRET_WORDS = ("key", "password")


def _problem(error: Mapping[str, Any], doc: CommentedMap) -> _Problem:
    kind = error["type"]
    loc: KeyPath = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        loc = (*loc, "type")
    line, key = _locate(doc, loc)
    name = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        message = f"unknown key '{name}'"
    elif kind == "missing":
        message = f"missing required key '{name}'"
    elif kind == "union_tag_invalid":
        message = f"unknown tunnel type '{ctx.get('tag')}'; expected one of {', '.join(TUNNEL_TYPES)}"
    elif kind == "union_tag_not_found":
        message = f"missing key 'type' (one of {', '.join(TUNNEL_TYPES)})"
    elif kind in ("tuple_type", "list_type"):
        message = "expected a list (one '- ' line per item)"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected a mapping of keys"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    else:
        message = str(error["msg"])
        value = error.get("input")
        secret = any(word in name for word in _SECRET_WORDS)
        if isinstance(value, str | int | float | bool) and not secret:
            message += f", got {hide_keys(repr(value))}"[:120]
    return _Problem(line, key, hide_keys(message))


def _validation_error(exc: ValidationError, doc: CommentedMap, file: str) -> ConfigError:
    problems = [_problem(e, doc) for e in exc.errors(include_url=False)]
    problems.sort(key=lambda p: p.line or 0)
    first, rest = problems[0], problems[1:]
    message = first.message
    for p in rest:
        where = f"{file}:{p.line}" if p.line else file
        message += f"\n  also {where}, key '{p.key}': {p.message}"
    return ConfigError(message, file=file, line=first.line, key=first.key or None)


def _error_at(doc: CommentedMap, path: KeyPath, message: str, file: str) -> ConfigError:
    line, key = _locate(doc, path)
    return ConfigError(message, file=file, line=line, key=key)


def _check_references(config: Config, doc: CommentedMap, file: str) -> None:
    seen: dict[str, int] = {}
    for index, tunnel in enumerate(config.tunnels):
        if tunnel.id in seen:
            raise _error_at(
                doc,
                ("tunnels", index, "id"),
                f"duplicate tunnel id '{tunnel.id}' (also tunnels[{seen[tunnel.id]}])",
                file,
            )
        seen[tunnel.id] = index
    known = ", ".join(seen) or "none defined"
    if config.default not in (DIRECT, DROP) and config.default not in seen:
        raise _error_at(
            doc,
            ("default",),
            f"unknown tunnel '{config.default}'; expected direct, drop or a tunnel id ({known})",
            file,
        )
    system = config.dns.system
    if system is not None and system != DIRECT and system not in seen:
        message = f"unknown tunnel '{system}'; expected direct or a tunnel id ({known})"
        raise _error_at(doc, ("dns", "system"), message, file)
    for index, rule in enumerate(config.rules):
        if rule.tunnel == DROP:
            raise _error_at(
                doc,
                ("rules", index, "tunnel"),
                "a rule's tunnel is a tunnel id or direct; to block an app use a tunnel with fallback: drop",
                file,
            )
        if rule.tunnel != DIRECT and rule.tunnel not in seen:
            raise _error_at(
                doc,
                ("rules", index, "tunnel"),
                f"unknown tunnel '{rule.tunnel}'; expected direct or a tunnel id ({known})",
                file,
            )


def _resolve_packet_tunnels(config: Config, doc: CommentedMap, file: str, base_dir: Path) -> None:
    for index, tunnel in enumerate(config.tunnels):
        if not isinstance(tunnel, PacketTunnel):
            continue
        here = ("tunnels", index)
        if tunnel.config_file is not None:
            if tunnel.is_inline:
                given = ", ".join([*tunnel.inline_settings(), *(["peer"] if tunnel.peer else [])])
                raise _error_at(
                    doc,
                    (*here, "config_file"),
                    f"give either config_file or inline settings, not both (inline: {given})",
                    file,
                )
            conf, source = _read_conf_file(tunnel, base_dir, doc, here, file), tunnel.config_file
            tunnel._conf_path = base_dir / tunnel.config_file
        else:
            for required in ("private_key", "address", "peer"):
                if getattr(tunnel, required) is None:
                    raise _error_at(
                        doc,
                        (*here, required),
                        f"a {tunnel.type} tunnel needs config_file or inline {required}",
                        file,
                    )
            try:
                conf = _inline_wg_conf(tunnel)
            except ConfigError as exc:
                raise _error_at(doc, (*here, exc.key or ""), exc.reason, file) from None
            source = "the inline settings"
        _check_usable(tunnel, conf, source, doc, here, file, base_dir)
        tunnel._wg_conf = conf


def _read_conf_file(
    tunnel: PacketTunnel, base_dir: Path, doc: CommentedMap, here: KeyPath, file: str
) -> WgConf:
    assert tunnel.config_file is not None
    path = base_dir / tunnel.config_file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _error_at(doc, (*here, "config_file"), f"cannot read {path}: {reason}", file) from None
    try:
        return parse_conf(text, file=str(path))
    except ConfigError as exc:
        raise ConfigError(
            f"{exc.reason} (tunnel '{tunnel.id}')", file=exc.file, line=exc.line, key=exc.key
        ) from None


def _check_usable(
    tunnel: PacketTunnel,
    conf: WgConf,
    source: str,
    doc: CommentedMap,
    here: KeyPath,
    file: str,
    base_dir: Path,
) -> None:
    """What a client tunnel needs beyond syntax: an address, a peer with an endpoint, the right type."""
    key = "config_file" if tunnel.config_file is not None else None
    problem: tuple[str, str] | None = None
    if not conf.interface.addresses:
        problem = (key or "address", f"no Address in {source}: the tunnel needs its own address")
    elif not conf.peers:
        problem = (key or "peer", f"no [Peer] in {source}")
    elif any(p.endpoint is None for p in conf.peers):
        problem = (
            key or "peer",
            f"a peer in {source} has no Endpoint; a client must know where to connect",
        )
    elif tunnel.tunnel_type is TunnelType.WIREGUARD and conf.is_amneziawg:
        names = ", ".join(awg_params(conf))
        problem = (
            "type",
            f"type is wireguard but AmneziaWG parameters are set in {source} ({names}); use type: amneziawg",
        )
    if problem is not None:
        raise _error_at(doc, (*here, problem[0]), problem[1], file)
    if conf.is_amneziawg:
        _check_amneziawg(tunnel, conf, doc, here, file, base_dir)


def _check_amneziawg(
    tunnel: PacketTunnel, conf: WgConf, doc: CommentedMap, here: KeyPath, file: str, base_dir: Path
) -> None:
    """The rules amneziawg-go enforces (and the crashes it does not guard against), at load time."""
    try:
        AmneziaParams.from_mapping(awg_params(conf)).check()
    except ConfigError as exc:
        if tunnel.config_file is not None:
            conf_file = str(base_dir / tunnel.config_file)
            raise ConfigError(
                f"{exc.reason} (tunnel '{tunnel.id}')", file=conf_file, key=_conf_key(exc.key)
            ) from None
        raise _error_at(doc, (*here, exc.key or ""), exc.reason, file) from None


def _conf_key(key: str | None) -> str | None:
    return CONF_NAMES.get(key, key) if key is not None else None


def _validate_document(
    doc: CommentedMap, file: str, base_dir: Path, secrets: SecretProtection | None
) -> Config:
    try:
        config = Config.model_validate(_plain(doc), context={SECRETS_CONTEXT: secrets})
    except ValidationError as exc:
        raise _validation_error(exc, doc, file) from None
    _check_references(config, doc, file)
    _resolve_packet_tunnels(config, doc, file, base_dir)
    return config


def _parse_document(
    text: str, file: str, base_dir: Path, secrets: SecretProtection | None = None
) -> tuple[CommentedMap, Config]:
    """The round-trip document and the validated config of YAML text (`dpapi:` values decrypted by
    `secrets`). A ConfigError never repeats a secret of the text, even when the text does not parse."""
    try:
        doc = _load_document(text, file)
        return doc, _validate_document(doc, file, base_dir, secrets)
    except ConfigError as exc:
        raise _without_secrets(exc, text) from None


def parse_config(text: str, *, file: str, base_dir: Path, secrets: SecretProtection | None = None) -> Config:
    """Validate YAML text; `config_file`s are read relative to `base_dir`, `dpapi:` values decrypted by
    `secrets` (None: this platform has no DPAPI, and such a value is an error). Raises ConfigError."""
    return _parse_document(text, file, base_dir, secrets)[1]


def load_config(path: Path, secrets: SecretProtection | None = None) -> Config:
    """Read and validate a config file (see `parse_config`). Raises ConfigError."""
    return parse_config(_read_text(path), file=str(path), base_dir=path.parent, secrets=secrets)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config: {exc.strerror or exc}", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(path)) from None


# -- writing ------------------------------------------------------------------------------------------


MakeFolder = Callable[[Path], None]
"""Creates a folder (and its parents) for the config's files: the platform's data-folder seam. POSIX:
`make_folder` (the files themselves are created 0600); Windows: with a protected DACL
(platform/windows/data_folder.py, docs/WINDOWS.md)."""


def make_folder(folder: Path) -> None:
    """The POSIX `MakeFolder`: an ordinary directory; secrets in it are files created 0600."""
    folder.mkdir(parents=True, exist_ok=True)


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never a mix: a temp
    file in the same directory, fsync, rename over. The temp file is created with `mode` already, so a
    secret is never readable by others, not even for a moment (on Windows, where modes mean nothing, it
    inherits the DACL of its folder: see `MakeFolder`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":
        # The rename itself is only durable once the directory entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _to_node(value: object) -> object:
    """A user-supplied value as a round-trip node (None entries of mappings are left out)."""
    if isinstance(value, Mapping):
        node = CommentedMap()
        for k, v in value.items():
            if v is not None:
                node[str(k)] = _to_node(v)
        return node
    if isinstance(value, list | tuple):
        return CommentedSeq(_to_node(v) for v in value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, str):
        return str(value)  # StrEnum members (FallbackPolicy) as their plain value
    return value


def _last_comment_slot(node: object) -> tuple[Any, object, int] | None:
    """Where ruamel keeps the comment lines that follow `node`: the comment of its last scalar."""
    if isinstance(node, CommentedMap) and node:
        last = next(reversed(node))
        value = node[last]
        if isinstance(value, CommentedMap | CommentedSeq) and value:
            return _last_comment_slot(value)
        return node, last, 2
    if isinstance(node, CommentedSeq) and node:
        value = node[-1]
        if isinstance(value, CommentedMap | CommentedSeq) and value:
            return _last_comment_slot(value)
        return node, len(node) - 1, 0
    return None


def _take_following_comment(node: object) -> str:
    """Detach the comment lines after `node` (keeping its end-of-line comment) and return them."""
    slot = _last_comment_slot(node)
    if slot is None:
        return ""
    owner, key, position = slot
    entry = owner.ca.items.get(key)
    token = entry[position] if entry else None
    if not isinstance(token, CommentToken) or "\n" not in token.value:
        return ""
    eol, following = token.value.split("\n", 1)
    if eol:
        kept = copy.copy(token)
        kept.value = eol + "\n"
        entry[position] = kept
    else:
        entry[position] = None
    return following


def _give_following_comment(node: object, following: str) -> None:
    """Attach comment lines after `node` (the counterpart of `_take_following_comment`)."""
    slot = _last_comment_slot(node) if following else None
    if slot is None:
        return
    owner, key, position = slot
    entry = owner.ca.items.setdefault(key, [None, None, None, None])
    token = entry[position]
    if isinstance(token, CommentToken):
        token.value = token.value.rstrip("\n") + "\n" + following
    else:
        entry[position] = CommentToken("\n" + following, CommentMark(0), None)


class ConfigManager:
    """The config file as one validated, editable unit.

    Every change is applied to a copy of the round-trip document, the WHOLE resulting config is
    validated, and only then is the file replaced atomically and the change published as
    `ConfigChanged`. A rejected change raises ConfigError and leaves memory and file as they were.
    Editors in several processes (the CLI, the daemon) are ordered by an edit lock beside the file: each
    change is either applied or refused because the file changed on disk since it was loaded, never lost.
    """

    def __init__(
        self,
        path: Path,
        bus: EventBus | None = None,
        *,
        folder: MakeFolder = make_folder,
        secrets: SecretProtection | None = None,
    ) -> None:
        self.path = Path(path)
        self.bus = bus
        self._make_folder = folder
        self.secrets = secrets
        self._doc: CommentedMap | None = None
        self._config: Config | None = None
        self._indent: tuple[int, int, int] = (2, 4, 2)
        # The file as last read or written (None: absent), to notice edits made behind our back.
        self._on_disk: str | None = None
        # The text of a file with no keys yet (only comments): ruamel has no node to keep them on.
        self._preamble = ""
        self._lock_depth = 0

    # -- reading ----------------------------------------------------------------------------------------

    def load(self, *, missing_ok: bool = False) -> Config:
        """Read and validate the file. With `missing_ok`, a missing file is an empty config (created on the
        first change or `save()`). Raises ConfigError."""
        exists = not missing_ok or self.path.exists()
        text = _read_text(self.path) if exists else ""
        doc, config = _parse_document(text, str(self.path), self.path.parent, self.secrets)
        self._take(text if exists else None, doc, config)
        return config

    def reload(self) -> bool:
        """Re-read the file (a daemon calls this when it changed on disk); returns whether the config
        changed (and then publishes).

        The running config changes only for a complete, valid file. An editor may be writing it right now,
        or may have truncated it and be about to write it again: the file must read the same twice,
        `RELOAD_SETTLE` apart (else ``ConfigUnsettled``: read it again shortly), and a file without any
        settings (empty, or only comments) never replaces a config that has some. Otherwise ConfigError,
        and the current config stays.
        """
        old = self._config
        text = self._read_settled()
        doc, config = _parse_document(text, str(self.path), self.path.parent, self.secrets)
        if not doc and old is not None and old != Config():
            raise ConfigError(
                "the file has no settings (it is empty or only comments), so the running config stays; "
                "to really remove everything, write 'tunnels: []'",
                file=str(self.path),
            )
        self._take(text, doc, config)
        if config == old:
            return False
        self._publish("reload", {})
        return True

    @property
    def config(self) -> Config:
        """The validated config (loaded on first use)."""
        if self._config is None:
            return self.load()
        return self._config

    def list_rules(self) -> tuple[RuleConfig, ...]:
        return self.config.rules

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the edit lock of the config file (`config.yaml.lock` beside it) that every change takes
        before it compares the file with what was loaded and replaces it, so two editors (the CLI, the
        daemon) cannot both pass that check and one silently undo the other. Loading inside it too makes
        a whole read-modify-write that another editor waits for instead of being refused ("changed on
        disk"). Re-entrant within one manager."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with _file_lock(self.path.with_name(self.path.name + LOCK_SUFFIX), self._make_folder):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    # -- changes ----------------------------------------------------------------------------------------

    def add_tunnel(self, tunnel: Mapping[str, Any]) -> None:
        """Append a tunnel (the keys of docs/DESIGN.md, e.g. ``{"id": "office", "type": "socks5", ...}``)."""
        tunnel_id = str(tunnel.get("id", ""))
        if self.config.tunnel(tunnel_id) is not None:
            raise ConfigError(f"a tunnel with id '{tunnel_id}' already exists", file=str(self.path), key="id")

        def change(doc: CommentedMap) -> None:
            _append(_seq(doc, "tunnels"), _to_node(tunnel))

        self._apply(change, "tunnel.add", {"id": tunnel_id})

    def update_tunnel(self, tunnel_id: str, changes: Mapping[str, Any]) -> None:
        """Set keys of a tunnel; a value of None removes the key (e.g. to switch from inline settings to
        `config_file`)."""
        index = self._tunnel_index(tunnel_id)

        def change(doc: CommentedMap) -> None:
            node = doc["tunnels"][index]
            for key, value in changes.items():
                if value is None:
                    node.pop(key, None)
                else:
                    node[key] = _to_node(value)

        self._apply(change, "tunnel.update", {"id": tunnel_id, "keys": sorted(changes)})

    def remove_tunnel(self, tunnel_id: str) -> None:
        """Remove a tunnel; refused while `default` or a rule uses it. A `.conf` it used stays on disk."""
        index = self._tunnel_index(tunnel_id)
        config, doc = self.config, self._document()
        if config.default == tunnel_id:
            raise _error_at(
                doc,
                ("default",),
                f"tunnel '{tunnel_id}' is the default; change default first",
                str(self.path),
            )
        for i, rule in enumerate(config.rules):
            if rule.tunnel == tunnel_id:
                raise _error_at(
                    doc,
                    ("rules", i, "tunnel"),
                    f"tunnel '{tunnel_id}' is used by rule {i} ({rule.process}); "
                    "change or remove that rule first",
                    str(self.path),
                )
        self._apply(lambda d: _remove(d, "tunnels", index), "tunnel.remove", {"id": tunnel_id})

    def add_rule(self, rule: Mapping[str, Any], index: int | None = None) -> int:
        """Insert a rule before position `index` (append when None); returns its index. Rules are tried
        in order, first match wins."""
        count = len(self.config.rules)
        position = count if index is None else index
        if not 0 <= position <= count:
            raise ConfigError(
                f"rule index {index} is out of range (0-{count})", file=str(self.path), key="rules"
            )

        def change(doc: CommentedMap) -> None:
            rules = _seq(doc, "rules")
            _insert(rules, position, _to_node(rule))

        self._apply(change, "rule.add", {"index": position, "process": str(rule.get("process", ""))})
        return position

    def remove_rule(self, index: int) -> RuleConfig:
        """Remove and return the rule at `index`."""
        removed = self._rule(index)
        self._apply(
            lambda d: _remove(d, "rules", index), "rule.remove", {"index": index, "process": removed.process}
        )
        return removed

    def update_rule(self, index: int, rule: Mapping[str, Any]) -> RuleConfig:
        """Replace the rule at `index` with `rule` (its keys; None or absent: the default), in place: the
        comment lines around it stay. Returns the new rule."""
        self._rule(index)

        def change(doc: CommentedMap) -> None:
            node = doc["rules"][index]
            following = _take_following_comment(node)
            for key in [k for k in node if rule.get(k) is None]:
                del node[key]
            for key, value in rule.items():
                if value is not None:
                    node[str(key)] = _to_node(value)
            _give_following_comment(node, following)

        self._apply(change, "rule.update", {"index": index, "process": str(rule.get("process", ""))})
        return self.config.rules[index]

    def move_rule(self, index: int, to: int) -> None:
        """Move the rule at `index` so that it becomes rule `to` (first match wins: this changes which rule
        decides). The comment lines above each rule go with it."""
        self._rule(index)
        count = len(self.config.rules)
        if not 0 <= to < count:
            raise ConfigError(
                f"rule position {to} is out of range (0-{count - 1})", file=str(self.path), key="rules"
            )
        if to == index:
            return
        self._apply(lambda d: _move(d, "rules", index, to), "rule.move", {"index": index, "to": to})

    def _rule(self, index: int) -> RuleConfig:
        rules = self.config.rules
        if not 0 <= index < len(rules):
            raise ConfigError(
                f"no rule {index} (there are {len(rules)})", file=str(self.path), key=f"rules[{index}]"
            )
        return rules[index]

    def import_conf(self, conf_path: Path, tunnel_id: str | None = None, *, copy: bool = True) -> str:
        """Add a tunnel from a WireGuard/AmneziaWG `.conf`: type amneziawg when it sets AmneziaWG parameters,
        else wireguard; the id defaults to the file name made a valid id. With `copy` the file is copied next
        to the YAML as `<id>.conf` (mode 0600), else referenced where it is. Returns the tunnel id."""
        # Under the edit lock from the copy to the YAML change: a concurrent import of the same id must not
        # find the copy half-made or remove it.
        with self.locked():
            return self._import_conf(Path(conf_path), tunnel_id, copy=copy)

    def _import_conf(self, conf_path: Path, tunnel_id: str | None, *, copy: bool) -> str:
        text = _read_text(conf_path)
        conf = parse_conf(text, file=str(conf_path))
        new_id = tunnel_id if tunnel_id is not None else tunnel_id_from_name(conf_path.stem)
        if not TUNNEL_ID_RE.fullmatch(new_id) or new_id in RESERVED_TUNNEL_IDS:
            raise ConfigError(
                f"'{new_id}' is not a valid tunnel id (a-z, 0-9, '_', '-'; not direct/drop)", key="id"
            )
        if self.config.tunnel(new_id) is not None:
            raise ConfigError(
                f"a tunnel with id '{new_id}' already exists; pass another id", file=str(self.path), key="id"
            )
        created: Path | None = None
        if copy:
            target = self.path.parent / f"{new_id}.conf"
            if target.exists() and not _same_file(target, conf_path):
                raise ConfigError(f"{target} already exists; remove it or pass another id", key="id")
            if not target.exists():
                _write(target, text.encode("utf-8"), SECRET_MODE, self._make_folder)
                created = target
            reference = target.name
        else:
            reference = _reference(conf_path, self.path.parent)
        kind = TunnelType.AMNEZIAWG if conf.is_amneziawg else TunnelType.WIREGUARD
        entry = {"id": new_id, "type": kind.value, "config_file": reference}
        try:
            self._apply(
                lambda d: _append(_seq(d, "tunnels"), _to_node(entry)),
                "tunnel.add",
                {"id": new_id, "imported_from": str(conf_path)},
            )
        except BaseException:
            if created is not None:
                with suppress(OSError):
                    created.unlink()
            raise
        return new_id

    def save(self) -> None:
        """Write the current document (atomically; 0600 when it holds secrets)."""
        self._write_config(self._dump(self._document()), self.config)

    def protect_secrets(self, protection: SecretProtection) -> list[str]:
        """Rewrite every plain secret of the YAML (`SECRET_KEYS`) as `dpapi:BASE64`, comments kept; the
        `.conf` files of `config_file` are left as they are. Returns the keys rewritten
        (`tunnels[0].private_key`), none when there was nothing to protect."""
        with self.locked():
            plain = [
                where for where, node, key in _secret_nodes(self._document()) if _plain_secret(node[key])
            ]
            if not plain:
                return []

            def change(doc: CommentedMap) -> None:
                for where, node, key in _secret_nodes(doc):
                    text = _plain_secret(node[key])
                    if text is None:
                        continue
                    blob = protection.protect(text.encode("utf-8"))
                    if protection.unprotect(blob) != text.encode("utf-8"):
                        raise ConfigError("DPAPI did not give back what it encrypted", key=where)
                    node[key] = DPAPI_PREFIX + base64.b64encode(blob).decode("ascii")

            self._apply(change, "secrets.protect", {"keys": plain})
            return plain

    # -- internals --------------------------------------------------------------------------------------

    def _take(self, on_disk: str | None, doc: CommentedMap, config: Config) -> None:
        """Make a loaded file (`on_disk` None: absent) the current one."""
        text = on_disk or ""
        self._doc, self._config, self._indent = doc, config, _guess_indent(text)
        self._on_disk = on_disk
        self._preamble = "" if doc else text
        self._warn_if_exposed(config)

    def _read_settled(self) -> str:
        """The file's text, read twice `RELOAD_SETTLE` apart; ConfigError unless both reads and the
        file's identity, size and modification time agree (it is being written)."""
        before = _file_stamp(self.path)
        first = _read_text(self.path)
        time.sleep(RELOAD_SETTLE)
        second = _read_text(self.path)
        if second != first or _file_stamp(self.path) != before:
            raise ConfigUnsettled(
                "the file changed while it was read (is it still being written?); the running config "
                "stays until it is complete",
                file=str(self.path),
            )
        return second

    def _document(self) -> CommentedMap:
        if self._doc is None:
            self.load()
        assert self._doc is not None
        return self._doc

    def _tunnel_index(self, tunnel_id: str) -> int:
        for index, tunnel in enumerate(self.config.tunnels):
            if tunnel.id == tunnel_id:
                return index
        known = ", ".join(self.config.tunnel_ids) or "none defined"
        raise ConfigError(f"no tunnel '{tunnel_id}' (tunnels: {known})", file=str(self.path), key="tunnels")

    def _dump(self, doc: CommentedMap) -> str:
        preamble = (
            self._preamble if not self._preamble or self._preamble.endswith("\n") else self._preamble + "\n"
        )
        if not doc:
            return preamble
        out = io.StringIO()
        _yaml(self._indent).dump(doc, out)
        return preamble + out.getvalue()

    def _apply(self, change: Callable[[CommentedMap], None], what: str, detail: dict[str, Any]) -> None:
        draft = copy.deepcopy(self._document())
        change(draft)
        text = self._dump(draft)
        file = str(self.path)
        try:
            # Validate exactly what will be written; the re-read document also has fresh line numbers.
            doc, config = _parse_document(text, file, self.path.parent, self.secrets)
        except ConfigError as exc:
            if exc.file != file:
                raise  # a .conf file's own error keeps its file and line
            raise ConfigError(
                f"change rejected: {exc.reason}", file=file, line=exc.line, key=exc.key
            ) from None
        self._write_config(text, config)
        self._doc, self._config, self._preamble = doc, config, "" if doc else text
        self._publish(what, detail)

    def _write_config(self, text: str, config: Config) -> None:
        # The check and the write under one lock: otherwise two editors can both find the file as they
        # loaded it, and the second write silently drops the first one's change.
        with self.locked():
            self._refuse_if_changed_on_disk()
            try:
                current = stat.S_IMODE(self.path.stat().st_mode)
            except OSError:
                current = PUBLIC_MODE
            mode = (current & 0o700) | 0o600 if config.holds_secrets else current
            _write(self.path, text.encode("utf-8"), mode, self._make_folder)
            self._on_disk = text

    def _refuse_if_changed_on_disk(self) -> None:
        """Two editors (the CLI while the daemon runs, or a text editor) must not silently undo each other."""
        try:
            current: str | None = self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            current = None
        except OSError:
            return  # writing will report it
        if current != self._on_disk:
            raise ConfigError(
                "the file changed on disk since it was loaded; reload it and try again", file=str(self.path)
            )

    def _publish(self, what: str, detail: dict[str, Any]) -> None:
        if self.bus is not None:
            self.bus.publish(ConfigChanged(what=what, detail=detail))

    def _warn_if_exposed(self, config: Config) -> None:
        """Warn about the YAML (when it holds secrets) and each `.conf` it references (they always hold a
        private key) being readable by other users."""
        if os.name != "posix":
            return
        files = [self.path] if config.holds_secrets else []
        files += [t.conf_path for t in iter_packet_tunnels(config) if t.conf_path is not None]
        for path in dict.fromkeys(files):
            with suppress(OSError):
                if path.stat().st_mode & 0o077:
                    log.warning(
                        "[Core] %s holds private keys or passwords and is readable by other users "
                        "(chmod 600 it)",
                        path,
                    )


def _secret_nodes(doc: CommentedMap) -> Iterator[tuple[str, CommentedMap, str]]:
    """The secrets written in the YAML itself: (the key as users read it, its mapping, its name)."""
    tunnels = doc.get("tunnels")
    if not isinstance(tunnels, CommentedSeq):
        return
    for index, tunnel in enumerate(tunnels):
        if not isinstance(tunnel, CommentedMap):
            continue
        here = f"tunnels[{index}]"
        for name in SECRET_KEYS:
            if name in tunnel:
                yield f"{here}.{name}", tunnel, name
        peer = tunnel.get("peer")
        if isinstance(peer, CommentedMap):
            for name in SECRET_KEYS:
                if name in peer:
                    yield f"{here}.peer.{name}", peer, name


def _plain_secret(value: object) -> str | None:
    """A secret's text as the config reads it (numbers as text), unless it is already `dpapi:` or is not
    a secret's text at all (validation says what is wrong then)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value)
    return None if text.startswith(DPAPI_PREFIX) else text


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextmanager
def _file_lock(path: Path, folder: MakeFolder) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing), held until the block ends; waits for another
    holder. Closing the descriptor releases it, also when the process dies."""
    try:
        folder(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, SECRET_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot open the edit lock: {exc.strerror or exc}", file=str(path)) from None
    try:
        if sys.platform == "win32":
            # Locks one byte; LK_LOCK retries for about 10 s, then raises OSError.
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
            except OSError:
                raise ConfigError(
                    "another program is editing the config (it holds the edit lock); try again",
                    file=str(path),
                ) from None
            try:
                yield
            finally:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int, folder: MakeFolder) -> None:
    try:
        folder(path.parent)
        write_file_atomic(path, data, mode)
    except OSError as exc:
        raise ConfigError(f"cannot write the file: {exc.strerror or exc}", file=str(path)) from None


def _seq(doc: CommentedMap, key: str) -> CommentedSeq:
    value = doc.get(key)
    if not isinstance(value, CommentedSeq):
        value = CommentedSeq()
        doc[key] = value
    return value


def _insert(seq: CommentedSeq, index: int, node: object) -> None:
    """Insert keeping comments with the items they describe. ruamel stores the comment lines above an
    item as the tail of the item before it, so they move to the new item's tail."""
    following = _take_following_comment(seq[index - 1]) if index > 0 else ""
    seq.insert(index, node)
    if index > 0:
        _give_following_comment(seq[index], following)


def _append(seq: CommentedSeq, node: object) -> None:
    _insert(seq, len(seq), node)


def _remove(doc: CommentedMap, key: str, index: int) -> None:
    """Delete `doc[key][index]` with the comment lines above it; the lines above the next item (or below
    the list) stay."""
    seq = doc[key]
    following = _take_following_comment(seq[index])
    if index > 0:
        _take_following_comment(seq[index - 1])
    del seq[index]
    if index > 0:
        _give_following_comment(seq[index - 1], following)
    elif following:
        _give_list_heading(doc, key, following)


def _move(doc: CommentedMap, key: str, index: int, to: int) -> None:
    """Move `doc[key][index]` to position `to`; every item keeps the comment lines above it (the first
    item's hang on the list's key) and the lines below the list stay below it."""
    seq = doc[key]
    above = [_take_above(doc, key, i) for i in range(len(seq))]
    below = _take_following_comment(seq[-1])
    seq.insert(to, seq.pop(index))
    above.insert(to, above.pop(index))
    for i, lines in enumerate(above):
        if i > 0:
            _give_following_comment(seq[i - 1], lines)
        elif lines:
            _give_list_heading(doc, key, lines)
    _give_following_comment(seq[-1], below)


def _take_above(doc: CommentedMap, key: str, index: int) -> str:
    """Detach the comment lines above `doc[key][index]` and return them."""
    if index > 0:
        return _take_following_comment(doc[key][index - 1])
    entry = doc.ca.items.get(key)
    if not entry:
        return ""
    lines = ""
    token = entry[2]
    if isinstance(token, CommentToken) and "\n" in token.value:
        eol, lines = token.value.split("\n", 1)
        if eol:
            kept = copy.copy(token)
            kept.value = eol + "\n"
            entry[2] = kept
        else:
            entry[2] = None
    # Without a comment on the key's own line, ruamel keeps the lines as separate tokens.
    if len(entry) > 3 and isinstance(entry[3], list):
        lines += "".join(" " * t.column + t.value for t in entry[3] if isinstance(t, CommentToken))
        entry[3] = None
    return lines


def _give_list_heading(doc: CommentedMap, key: str, lines: str) -> None:
    """Attach comment lines above the first item of `doc[key]` (ruamel hangs them on the list's key)."""
    entry = doc.ca.items.setdefault(key, [None, None, None, None])
    token = entry[2]
    if isinstance(token, CommentToken):
        token.value = token.value.rstrip("\n") + "\n" + lines
    else:
        entry[2] = CommentToken("\n" + lines, CommentMark(0), None)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _reference(conf_path: Path, base_dir: Path) -> str:
    """How the YAML names a `.conf` it does not own: relative when it lies below the YAML's directory."""
    absolute = conf_path.resolve()
    try:
        return str(absolute.relative_to(base_dir.resolve()))
    except ValueError:
        return str(absolute)


def tunnel_id_from_name(name: str) -> str:
    """A valid tunnel id made from a file name: lower case, runs of other characters as one '-'."""
    candidate = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "tunnel"
    return f"{candidate}-1" if candidate in RESERVED_TUNNEL_IDS else candidate


def iter_packet_tunnels(config: Config) -> Iterator[PacketTunnel]:
    """The WireGuard/AmneziaWG tunnels of a config, in order."""
    return (t for t in config.tunnels if isinstance(t, PacketTunnel))
