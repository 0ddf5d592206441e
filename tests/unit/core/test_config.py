"""The YAML config: what it accepts, how it points at mistakes, and how ConfigManager edits it safely."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
from types import SimpleNamespace

import pytest
from config_editors import add_one_rule
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.core import config as config_module
from awg_split_tunnel.core.config import (
    ENV_CONFIG,
    Config,
    ConfigManager,
    HttpTunnel,
    PacketTunnel,
    RuleConfig,
    Socks5Tunnel,
    default_config_location,
    default_config_path,
    load_config,
    parse_config,
    tunnel_id_from_name,
    tunnel_wg_conf,
)
from awg_split_tunnel.core.events import ConfigChanged, EventBus
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelType
from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.wireguard.conf import awg_params, parse_conf
from awg_split_tunnel.provider.wireguard.value_range import Range

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PRIV = "uBVb7BgiQu3I9IGxEbuNZBCyUTR65p2hmfrLegea7no="
PUB = "4IkawFdbfgAQnoja09g3HcOgyUci8migFw4QdA3NDmg="

AWG_EXPORT = """\
[Interface]
PrivateKey = 6CdQe86Cs3tZ0ID+nggfniHK8Vqpp5eSNZX9uE0ULnE=
Address = 10.8.0.2/32, fd42:42:42::2/128
DNS = 1.1.1.1
MTU = 1380
Jc = 4
Jmin = 40
Jmax = 70
S1 = 15
S2 = 68
S3 = 17
S4 = 8
H1 = 1811432321-1811432400
H2 = 2045118820-2045118900
H3 = 1236479110-1236479200
H4 = 994002200-994002300
I1 = <b 0xc0ffee0001020304> <r 10>
I2 =

[Peer]
PublicKey = oP3QOUULQ2V1yaO/xysn6ztKjnsYMDmWi6np6TLO2XM=
PresharedKey = cjuHK6BX+TfMJhw5dFqY2bdVb8ha1x1yW9iDPDI3sPA=
Endpoint = 198.18.0.1:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
"""

BASE = """\
# Split tunnel config
log_level: info   # how chatty
default: direct

tunnels:
  # the office proxy
  - id: office
    type: socks5
    server: 198.18.0.5:1080

  # the corporate HTTP proxy
  - id: corp
    type: http
    server: proxy.corp.example:3128

rules:    # first match wins
  # browsers
  - process: firefox
    tunnel: office
    fallback: block
  # build tools
  - process: "/opt/tools/*/bin/curl"
    tunnel: corp
  # games last
  - process: steam
    tunnel: direct
# end of rules
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value


def assert_located(error: ConfigError, file: Path | str, line: int | None, key: str | None) -> None:
    assert (error.file, error.line, error.key) == (str(file), line, key)
    message = str(error)
    assert message.startswith(f"{file}:{line}" if line else str(file))
    if key:
        assert f"key '{key}'" in message


# -- what a valid config gives ----------------------------------------------------------------------


def test_example_config_loads_with_every_feature() -> None:
    config = load_config(EXAMPLES / "config.yaml")
    assert config.log_level == "info" and config.default == "direct"
    kinds = {t.id: t.tunnel_type for t in config.tunnels}
    assert kinds == {
        "nl-awg": TunnelType.AMNEZIAWG,
        "home-wg": TunnelType.WIREGUARD,
        "de-awg": TunnelType.AMNEZIAWG,
        "office": TunnelType.SOCKS5,
        "corp": TunnelType.HTTP,
    }
    nl = config.tunnel("nl-awg")
    assert isinstance(nl, PacketTunnel)
    assert nl.wg_conf == parse_conf((EXAMPLES / "nl.conf").read_text())
    assert nl.conf_path == EXAMPLES / "nl.conf"
    home = config.tunnel("home-wg")
    assert isinstance(home, PacketTunnel) and home.lan_bypass is False and not home.wg_conf.is_amneziawg
    inline = config.tunnel("de-awg")
    assert isinstance(inline, PacketTunnel)
    assert inline.wg_conf.interface.h1 == Range(100, 199)
    assert inline.wg_conf.interface.i1 == "<b 0xc0ffee><r 5><t>"
    assert inline.wg_conf.peers[0].persistent_keepalive == Range(25, 25)
    office = config.tunnel("office")
    assert isinstance(office, Socks5Tunnel) and office.udp is True and office.username == "alice"
    assert (office.endpoint.host, office.endpoint.port) == ("203.0.113.5", 1080)
    corp = config.tunnel("corp")
    assert isinstance(corp, HttpTunnel) and corp.udp == "drop"
    assert config.rules[0] == RuleConfig(
        process="firefox.exe", tunnel="nl-awg", fallback=FallbackPolicy.BLOCK
    )
    assert config.rules[4].fallback is FallbackPolicy.DROP
    assert config.rules[5].tunnel == "direct"


def test_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        tunnels:
          - {id: s, type: socks5, server: "198.18.0.5:1080"}
          - {id: h, type: http, server: "[2001:2::5]:3128"}
        rules:
          - {process: curl, tunnel: h}
        """,
    )
    config = load_config(path)
    socks, http = config.tunnels
    assert isinstance(socks, Socks5Tunnel) and socks.udp is True and socks.lan_bypass is True
    assert isinstance(http, HttpTunnel) and http.udp == "drop" and http.endpoint.host == "2001:2::5"
    assert config.rules[0].fallback is FallbackPolicy.ALLOW_DIRECT
    assert (config.default, config.log_level) == ("direct", "info")


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing yet\n")) == Config()


def test_http_udp_may_be_sent_direct(tmp_path: Path) -> None:
    path = write(tmp_path, "tunnels:\n  - {id: h, type: http, server: 'p.example:3128', udp: direct}\n")
    tunnel = load_config(path).tunnels[0]
    assert isinstance(tunnel, HttpTunnel) and tunnel.udp == "direct"


def test_inline_tunnel_equals_the_same_settings_in_a_conf_file(tmp_path: Path) -> None:
    (tmp_path / "x.conf").write_text(
        f"[Interface]\nPrivateKey = {PRIV}\nAddress = 10.7.0.2/32\nJc = 3\nH1 = 5-9\n"
        f"[Peer]\nPublicKey = {PUB}\nEndpoint = 198.18.0.1:51820\nAllowedIPs = 0.0.0.0/0, ::/0\n"
    )
    path = write(
        tmp_path,
        f"""\
        tunnels:
          - id: from-file
            type: amneziawg
            config_file: x.conf
          - id: inline
            type: amneziawg
            private_key: {PRIV}
            address: 10.7.0.2/32
            jc: 3
            h1: 5-9
            peer:
              public_key: {PUB}
              endpoint: 198.18.0.1:51820
        """,
    )
    config = load_config(path)
    from_file, inline = config.tunnels
    assert isinstance(from_file, PacketTunnel) and isinstance(inline, PacketTunnel)
    # allowed_ips defaults to everything: the router decides what enters the tunnel.
    assert tunnel_wg_conf(inline) == tunnel_wg_conf(from_file)
    assert awg_params(inline.wg_conf) == {"jc": 3, "h1": Range(5, 9)}


def test_repr_hides_secrets() -> None:
    config = load_config(EXAMPLES / "config.yaml")
    shown = repr(config)
    assert "uBVb7BgiQu3I9IGxEbuNZBCyUTR65p2hmfrLegea7no=" not in shown
    assert "secret" not in shown


# -- errors: file, line, key --------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    error = config_error(tmp_path, "log_level: info\ntunnels:\n  - id: a\n   type: socks5\n")
    assert error.file == str(tmp_path / "config.yaml") and error.line == 4
    assert "YAML syntax" in str(error)


def test_duplicate_yaml_keys_are_an_error(tmp_path: Path) -> None:
    error = config_error(tmp_path, "default: direct\nlog_level: info\ndefault: drop\n")
    assert error.line == 3 and "duplicate" in str(error)


@pytest.mark.parametrize(
    "yaml, line, key, reason",
    [
        ("verbose: true\n", 1, "verbose", "unknown key 'verbose'"),
        ("log_level: loud\n", 1, "log_level", "'debug', 'info', 'warning' or 'error'"),
        (
            "tunnels:\n  - id: s\n    type: socks5\n    servr: a:1\n",
            2,
            "tunnels[0].server",
            "missing required",
        ),
        (
            "tunnels:\n  - id: s\n    type: socks5\n    server: a:1\n    colour: red\n",
            5,
            "tunnels[0].colour",
            "unknown key 'colour'",
        ),
        (
            "tunnels:\n  - id: s\n    type: socks5\n    server: a:1\n    udp: sometimes\n",
            5,
            "tunnels[0].udp",
            "boolean",
        ),
        ("tunnels:\n  - id: s\n    type: socks5\n    server: a\n", 4, "tunnels[0].server", "host:port"),
        (
            "tunnels:\n  - id: s\n    type: socks5\n    server: a:99999\n",
            4,
            "tunnels[0].server",
            "port must be",
        ),
        (
            "tunnels:\n  - id: s\n    type: http\n    server: a:1\n    udp: true\n",
            5,
            "tunnels[0].udp",
            "'drop' or",
        ),
        ("tunnels:\n  - id: s\n    type: openvpn\n", 3, "tunnels[0].type", "unknown tunnel type 'openvpn'"),
        ("tunnels:\n  - id: s\n    server: a:1\n", 2, "tunnels[0].type", "missing key 'type'"),
        ("tunnels:\n  - id: Bad.Id\n    type: socks5\n    server: a:1\n", 2, "tunnels[0].id", "a-z, 0-9"),
        ("tunnels:\n  - id: direct\n    type: socks5\n    server: a:1\n", 2, "tunnels[0].id", "reserved"),
        ("tunnels: {id: s}\n", 1, "tunnels", "expected a list"),
        (
            "tunnels:\n  - id: s\n    type: amneziawg\n    peer: 5\n",
            4,
            "tunnels[0].peer",
            "expected a mapping",
        ),
        ("rules:\n  - process: x\n", 2, "rules[0].tunnel", "missing required key 'tunnel'"),
        (
            "rules:\n  - process: x\n    tunnel: direct\n    fallback: never\n",
            4,
            "rules[0].fallback",
            "'block'",
        ),
        (
            "rules:\n  - process: 're:(unclosed'\n    tunnel: direct\n",
            2,
            "rules[0].process",
            "regular expression",
        ),
        ("default: nowhere\n", 1, "default", "unknown tunnel 'nowhere'"),
        ("dns:\n  system: nowhere\n", 2, "dns.system", "unknown tunnel 'nowhere'"),
        ("dns:\n  per_app: maybe\n", 2, "dns.per_app", "bool"),
        (
            "tunnels:\n  - id: s\n    type: socks5\n    server: a:1\n    dns: [resolver.lan]\n",
            5,
            "tunnels[0].dns",
            "'resolver.lan' is not an IP address",
        ),
    ],
)
def test_schema_errors(tmp_path: Path, yaml: str, line: int, key: str, reason: str) -> None:
    error = config_error(tmp_path, yaml)
    assert_located(error, tmp_path / "config.yaml", line, key)
    assert reason in str(error)


def test_duplicate_tunnel_ids_point_at_the_second(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        "tunnels:\n  - {id: a, type: socks5, server: 'x:1'}\n  - id: a\n    type: http\n    server: y:2\n",
    )
    assert_located(error, tmp_path / "config.yaml", 3, "tunnels[1].id")
    assert "duplicate tunnel id 'a'" in str(error)


def test_rule_naming_an_unknown_tunnel(tmp_path: Path) -> None:
    error = config_error(tmp_path, BASE.replace("tunnel: corp", "tunnel: crop"))
    assert_located(error, tmp_path / "config.yaml", 23, "rules[1].tunnel")
    assert "unknown tunnel 'crop'" in str(error) and "office, corp" in str(error)


def test_rule_cannot_use_drop_as_tunnel(tmp_path: Path) -> None:
    error = config_error(tmp_path, "rules:\n  - process: x\n    tunnel: drop\n")
    assert_located(error, tmp_path / "config.yaml", 3, "rules[0].tunnel")
    assert "fallback: drop" in str(error)


def test_several_errors_are_all_listed(tmp_path: Path) -> None:
    error = config_error(
        tmp_path, "log_level: loud\nverbose: 1\nrules:\n  - process: x\n    tunnel: direct\n    x: 1\n"
    )
    assert error.line == 1
    message = str(error)
    assert "also" in message and ":2, key 'verbose'" in message and ":6, key 'rules[0].x'" in message


SECRET = "S3cretPw"
PROXY_AT = "tunnels:\n  - id: office\n    type: socks5\n    server: 198.18.0.5:1080\n"
WG_AT = "tunnels:\n  - id: wg\n    type: wireguard\n"


@pytest.mark.parametrize(
    "yaml, line, key, reason",
    [
        (
            f"tunnels:\n  - id: office\n    type: socks5\n    server: alice:{SECRET}@proxy:1080\n",
            4,
            "tunnels[0].server",
            "give the user name and password as the keys username and password",
        ),
        (PROXY_AT + f"    password: *{SECRET}\n", 5, None, "put the value in quotes"),
        (PROXY_AT + f"    password: !{SECRET} x\n", 5, "tunnels[0].password", "valid string"),
        (PROXY_AT + f"    password: [{SECRET}]\n", 5, "tunnels[0].password", "valid string"),
        (PROXY_AT + f"    pasword: {SECRET}\n", 5, "tunnels[0].pasword", "unknown key"),
        (WG_AT + f"    private_key: {PRIV}x\n", 4, "tunnels[0].private_key", "44 characters"),
        (WG_AT + f"    private_key: *{PRIV}\n", 4, None, "put the value in quotes"),
        (f"tunnels:\n  - {{id: a, type: socks5, server: '{PRIV}:1'}}\n", 2, "tunnels[0].server", "host name"),
    ],
)
def test_errors_name_the_key_never_its_secret_value(
    tmp_path: Path, yaml: str, line: int, key: str | None, reason: str
) -> None:
    error = config_error(tmp_path, yaml)
    assert (error.line, error.key) == (line, key)
    assert reason in str(error)
    assert SECRET not in str(error) and PRIV.rstrip("=") not in str(error)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_files_with_keys_readable_by_others_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = tmp_path / "nl.conf"
    conf.write_text(AWG_EXPORT)
    path = write(tmp_path, "tunnels:\n  - id: nl\n    type: amneziawg\n    config_file: nl.conf\n")

    def warned_about(conf_mode: int, yaml_mode: int) -> set[str]:
        conf.chmod(conf_mode)
        path.chmod(yaml_mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="awg_split_tunnel.core"):
            ConfigManager(path).load()
        return {
            name
            for record in caplog.records
            for name in (str(conf), str(path))
            if "readable by other users" in record.getMessage() and name in record.getMessage()
        }

    assert warned_about(0o644, 0o644) == {str(conf)}  # the YAML itself holds no secret
    assert warned_about(0o640, 0o600) == {str(conf)}
    assert warned_about(0o600, 0o644) == set()
    path.write_text(path.read_text() + "  - {id: s, type: socks5, server: 'a:1', username: u, password: p}\n")
    assert warned_about(0o600, 0o644) == {str(path)}


def test_missing_config_file_is_located_at_its_key(tmp_path: Path) -> None:
    error = config_error(tmp_path, "tunnels:\n  - id: nl\n    type: amneziawg\n    config_file: nl.conf\n")
    assert_located(error, tmp_path / "config.yaml", 4, "tunnels[0].config_file")
    assert "cannot read" in str(error) and "nl.conf" in str(error)


def test_errors_inside_the_conf_keep_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "nl.conf").write_text(AWG_EXPORT.replace("S2 = 68", "S2 = sixty"))
    error = config_error(tmp_path, "tunnels:\n  - id: nl\n    type: amneziawg\n    config_file: nl.conf\n")
    assert_located(error, tmp_path / "nl.conf", 10, "S2")
    assert "tunnel 'nl'" in str(error)


@pytest.mark.parametrize(
    "settings, line, key",
    [
        ("private_key: c2hvcnQ=\n    address: 10.0.0.2/32", 4, "tunnels[0].private_key"),
        (f"private_key: {PRIV}\n    address: 10.0.0.300/32", 5, "tunnels[0].address"),
        (f"private_key: {PRIV}\n    address: 10.0.0.2/32\n    h1: 9-3", 6, "tunnels[0].h1"),
        (f"private_key: {PRIV}\n    address: 10.0.0.2/32\n    jc: 70000", 6, "tunnels[0].jc"),
    ],
)
def test_bad_inline_values(tmp_path: Path, settings: str, line: int, key: str) -> None:
    text = f"tunnels:\n  - id: w\n    type: amneziawg\n    {settings}\n    peer: {{public_key: '{PUB}'}}\n"
    error = config_error(tmp_path, text)
    assert_located(error, tmp_path / "config.yaml", line, key)


def test_bad_peer_key_is_located(tmp_path: Path) -> None:
    text = f"""\
    tunnels:
      - id: w
        type: wireguard
        private_key: {PRIV}
        address: 10.0.0.2/32
        peer:
          public_key: AAAA
          endpoint: 198.18.0.1:51820
    """
    error = config_error(tmp_path, text)
    assert_located(error, tmp_path / "config.yaml", 7, "tunnels[0].peer.public_key")
    assert "44 characters of base64" in str(error)


def test_config_file_and_inline_settings_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "nl.conf").write_text(AWG_EXPORT)
    text = f"tunnels:\n  - id: nl\n    type: amneziawg\n    config_file: nl.conf\n    private_key: {PRIV}\n"
    error = config_error(tmp_path, text)
    assert_located(error, tmp_path / "config.yaml", 4, "tunnels[0].config_file")
    assert "not both" in str(error) and "private_key" in str(error)


def test_inline_tunnel_needs_key_address_and_peer(tmp_path: Path) -> None:
    error = config_error(tmp_path, f"tunnels:\n  - id: w\n    type: wireguard\n    private_key: {PRIV}\n")
    assert_located(error, tmp_path / "config.yaml", 2, "tunnels[0].address")
    error = config_error(
        tmp_path,
        f"tunnels:\n  - id: w\n    type: wireguard\n    private_key: {PRIV}\n    address: 10.0.0.2/32\n"
        f"    peer: {{public_key: '{PUB}'}}\n",
    )
    assert_located(error, tmp_path / "config.yaml", 6, "tunnels[0].peer")
    assert "has no Endpoint" in str(error)


def test_wireguard_type_with_amneziawg_parameters_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nl.conf").write_text(AWG_EXPORT)
    error = config_error(tmp_path, "tunnels:\n  - id: nl\n    type: wireguard\n    config_file: nl.conf\n")
    assert_located(error, tmp_path / "config.yaml", 3, "tunnels[0].type")
    assert "use type: amneziawg" in str(error) and "jc" in str(error)


def test_top_level_must_be_a_mapping_and_text_utf8(tmp_path: Path) -> None:
    error = config_error(tmp_path, "- a\n- b\n")
    assert error.line == 1 and "mapping" in str(error)
    path = tmp_path / "config.yaml"
    path.write_bytes(b"default: \xff\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


yaml_text = st.text(
    alphabet=st.sampled_from(list("abcdefgilnoprstuy_:-[]{}#'\"\n 0123456789./*!&|>")), max_size=80
)
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.sampled_from(["socks5", "http", "amneziawg", "x:1", "direct"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["id", "type", "server", "tunnels", "rules", "process", "tunnel", "udp"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(yaml_text)
@settings(max_examples=150, deadline=None)
def test_arbitrary_text_gives_a_config_error_never_a_traceback(text: str) -> None:
    try:
        parse_config(text, file="fuzz.yaml", base_dir=Path("."))
    except ConfigError as error:
        assert str(error).startswith("fuzz.yaml")


@given(
    st.dictionaries(st.sampled_from(["tunnels", "rules", "default", "log_level"]), yaml_values, max_size=4)
)
@settings(max_examples=150, deadline=None)
def test_arbitrary_structures_give_a_config_error_never_a_traceback(data: dict[str, object]) -> None:
    import io

    from ruamel.yaml import YAML

    out = io.StringIO()
    YAML().dump(data, out)
    try:
        parse_config(out.getvalue(), file="fuzz.yaml", base_dir=Path("."))
    except ConfigError as error:
        assert error.file == "fuzz.yaml"


# -- ConfigManager ------------------------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> ConfigManager:
    path = write(tmp_path, BASE)
    path.chmod(0o644)
    m = ConfigManager(path)
    m.load()
    return m


def snapshot(m: ConfigManager) -> tuple[str, Config]:
    return m.path.read_text(), m.config


@pytest.mark.parametrize("index", [0, 1, 2, 3, None])
def test_adding_then_removing_a_rule_leaves_the_file_byte_identical(
    manager: ConfigManager, index: int | None
) -> None:
    original = manager.path.read_text()
    position = manager.add_rule({"process": "wget", "tunnel": "corp", "fallback": FallbackPolicy.DROP}, index)
    assert manager.list_rules()[position] == RuleConfig(
        process="wget", tunnel="corp", fallback=FallbackPolicy.DROP
    )
    assert load_config(manager.path).rules[position].process == "wget"
    manager.remove_rule(position)
    assert manager.path.read_text() == original


def test_added_rule_lands_in_order_and_comments_stay(manager: ConfigManager) -> None:
    manager.add_rule({"process": "ssh", "tunnel": "direct"}, 1)
    manager.add_rule({"process": "git", "tunnel": "corp"})
    text = manager.path.read_text()
    comments = [line.strip() for line in BASE.splitlines() if "#" in line]
    found = [line.strip() for line in text.splitlines() if "#" in line]
    assert found == comments
    assert [r.process for r in manager.list_rules()] == [
        "firefox",
        "ssh",
        "/opt/tools/*/bin/curl",
        "steam",
        "git",
    ]
    # The new last rule goes above the comment that ends the list.
    assert text.index("process: git") < text.index("# end of rules")
    # Key order inside the user's entries is untouched.
    assert text.index("process: firefox") < text.index("tunnel: office") < text.index("fallback: block")


def test_removing_a_rule_takes_its_own_comment_and_keeps_the_next(manager: ConfigManager) -> None:
    removed = manager.remove_rule(1)
    assert removed.process == "/opt/tools/*/bin/curl"
    text = manager.path.read_text()
    assert "# build tools" not in text
    assert "# games last" in text and "# browsers" in text and "# end of rules" in text
    manager.remove_rule(1)  # the last rule: the comment below the list stays
    assert "# end of rules" in manager.path.read_text()


def test_a_bad_change_leaves_file_and_memory_unchanged(manager: ConfigManager) -> None:
    before = snapshot(manager)
    attempts: list[Callable[[], object]] = [
        lambda: manager.add_rule({"process": "x", "tunnel": "nowhere"}),
        lambda: manager.add_rule({"process": "x", "tunnel": "corp", "fallback": "sometimes"}),
        lambda: manager.add_rule({"process": "x", "tunnel": "corp"}, 9),
        lambda: manager.add_tunnel({"id": "office", "type": "socks5", "server": "a:1"}),
        lambda: manager.add_tunnel({"id": "new", "type": "socks5"}),
        lambda: manager.update_tunnel("corp", {"server": "no-port"}),
        lambda: manager.update_tunnel("ghost", {"server": "a:1"}),
        lambda: manager.remove_rule(7),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError) as caught:
            attempt()
        assert caught.value.file == str(manager.path)
        assert snapshot(manager) == before


def test_rejected_change_names_the_key(manager: ConfigManager) -> None:
    with pytest.raises(ConfigError) as caught:
        manager.add_tunnel({"id": "new", "type": "socks5", "server": "a:1", "udp": "maybe"})
    assert caught.value.key == "tunnels[2].udp"
    assert "change rejected" in str(caught.value)


def test_remove_tunnel_refused_while_a_rule_or_the_default_uses_it(manager: ConfigManager) -> None:
    with pytest.raises(ConfigError) as caught:
        manager.remove_tunnel("office")
    assert_located(caught.value, manager.path, 19, "rules[0].tunnel")
    assert "used by rule 0 (firefox)" in str(caught.value)

    manager.remove_rule(0)
    text = manager.path.read_text().replace("default: direct", "default: office")
    manager.path.write_text(text)
    manager.reload()
    with pytest.raises(ConfigError, match="is the default") as caught:
        manager.remove_tunnel("office")
    assert caught.value.key == "default"


def test_remove_unused_tunnel_keeps_the_others_comments(manager: ConfigManager) -> None:
    manager.add_tunnel({"id": "spare", "type": "socks5", "server": "198.18.0.9:1080", "udp": False})
    assert isinstance(manager.config.tunnel("spare"), Socks5Tunnel)
    manager.remove_tunnel("spare")
    assert manager.path.read_text() == BASE


def test_update_tunnel_sets_and_removes_keys(manager: ConfigManager) -> None:
    manager.update_tunnel("corp", {"udp": "direct", "username": "bob", "password": "pw"})
    corp = manager.config.tunnel("corp")
    assert isinstance(corp, HttpTunnel) and (corp.udp, corp.username) == ("direct", "bob")
    manager.update_tunnel("corp", {"username": None, "password": None})
    corp = load_config(manager.path).tunnel("corp")
    assert isinstance(corp, HttpTunnel) and corp.username is None and corp.udp == "direct"


def test_import_of_an_amneziawg_conf_keeps_every_value(manager: ConfigManager, tmp_path: Path) -> None:
    source = tmp_path / "downloads" / "NL Amsterdam #1.conf"
    source.parent.mkdir()
    source.write_text(AWG_EXPORT)
    tunnel_id = manager.import_conf(source)
    assert tunnel_id == "nl-amsterdam-1"
    tunnel = manager.config.tunnel(tunnel_id)
    assert isinstance(tunnel, PacketTunnel) and tunnel.tunnel_type is TunnelType.AMNEZIAWG
    copied = manager.path.parent / "nl-amsterdam-1.conf"
    assert tunnel.config_file == "nl-amsterdam-1.conf"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert copied.read_text() == AWG_EXPORT
    conf = tunnel.wg_conf
    assert conf == parse_conf(AWG_EXPORT)
    assert conf.interface.i1 == "<b 0xc0ffee0001020304> <r 10>"
    assert conf.interface.h1 == Range(1811432321, 1811432400)
    assert conf.interface.h4 == Range(994002200, 994002300)
    assert (conf.interface.jc, conf.interface.s4) == (4, 8)
    # The saved YAML gives the same tunnel to a fresh reader.
    reread = load_config(manager.path).tunnel(tunnel_id)
    assert isinstance(reread, PacketTunnel) and reread.wg_conf == conf


def test_import_of_plain_wireguard_and_by_reference(manager: ConfigManager) -> None:
    tunnel_id = manager.import_conf(EXAMPLES / "wg.conf", "home", copy=False)
    tunnel = manager.config.tunnel(tunnel_id)
    assert isinstance(tunnel, PacketTunnel) and tunnel.tunnel_type is TunnelType.WIREGUARD
    assert tunnel.config_file == str((EXAMPLES / "wg.conf").resolve())
    assert not (manager.path.parent / "home.conf").exists()


def test_import_refuses_duplicates_and_bad_files(manager: ConfigManager, tmp_path: Path) -> None:
    source = tmp_path / "office.conf"
    source.write_text(AWG_EXPORT)
    with pytest.raises(ConfigError, match="already exists"):
        manager.import_conf(source)  # the id 'office' is taken
    broken = tmp_path / "broken.conf"
    broken.write_text(AWG_EXPORT.replace("Jc = 4", "Jc = many"))
    before = snapshot(manager)
    with pytest.raises(ConfigError) as caught:
        manager.import_conf(broken)
    assert_located(caught.value, broken, 6, "Jc")
    assert snapshot(manager) == before


def test_import_removes_its_copy_when_the_change_is_rejected(manager: ConfigManager, tmp_path: Path) -> None:
    source = tmp_path / "src" / "bad.conf"
    source.parent.mkdir()
    source.write_text(AWG_EXPORT.replace("Address = 10.8.0.2/32, fd42:42:42::2/128\n", ""))  # no Address
    with pytest.raises(ConfigError, match="no Address"):
        manager.import_conf(source)
    assert not (manager.path.parent / "bad.conf").exists()
    assert manager.config.tunnel("bad") is None


def test_save_is_atomic_when_the_write_fails(manager: ConfigManager, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(manager)
    files_before = sorted(os.listdir(manager.path.parent))

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ConfigError, match="No space left") as caught:
        manager.add_rule({"process": "x", "tunnel": "corp"})
    assert caught.value.file == str(manager.path)
    assert snapshot(manager) == before
    # No temp file left behind (the edit lock beside the config stays; it holds nothing).
    files_after = [f for f in sorted(os.listdir(manager.path.parent)) if f != "config.yaml.lock"]
    assert files_after == files_before


def test_files_with_secrets_are_written_0600(manager: ConfigManager) -> None:
    manager.add_rule({"process": "x", "tunnel": "corp"})
    assert stat.S_IMODE(manager.path.stat().st_mode) == 0o644  # nothing secret: mode kept
    manager.add_tunnel(
        {
            "id": "inline",
            "type": "wireguard",
            "private_key": PRIV,
            "address": ["10.7.0.2/32"],
            "peer": {"public_key": PUB, "endpoint": "198.18.0.1:51820"},
        }
    )
    assert stat.S_IMODE(manager.path.stat().st_mode) == 0o600
    tunnel = load_config(manager.path).tunnel("inline")
    assert (
        isinstance(tunnel, PacketTunnel) and tunnel.wg_conf.interface.addresses[0].ip.exploded == "10.7.0.2"
    )


def test_password_makes_the_file_private_too(manager: ConfigManager) -> None:
    manager.update_tunnel("office", {"username": "alice", "password": "hunter2"})
    assert stat.S_IMODE(manager.path.stat().st_mode) == 0o600


def test_changes_are_published_on_the_bus(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    bus = EventBus()
    seen: list[ConfigChanged] = []
    bus.subscribe(ConfigChanged, seen.append)
    m = ConfigManager(path, bus)
    m.load()
    m.add_rule({"process": "x", "tunnel": "corp"}, 0)
    m.remove_rule(0)
    m.add_tunnel({"id": "t", "type": "socks5", "server": "a:1"})
    m.update_tunnel("t", {"udp": False})
    m.remove_tunnel("t")
    path.write_text(path.read_text().replace("log_level: info", "log_level: debug"))
    assert m.reload() is True
    assert m.reload() is False  # nothing changed: nothing published

    async def deliver() -> None:
        await bus.start()
        for _ in range(5):
            await asyncio.sleep(0)
        await bus.stop()

    asyncio.run(deliver())
    assert [e.what for e in seen] == [
        "rule.add",
        "rule.remove",
        "tunnel.add",
        "tunnel.update",
        "tunnel.remove",
        "reload",
    ]
    assert seen[0].detail == {"index": 0, "process": "x"}
    assert seen[2].detail == {"id": "t"}
    assert m.config.log_level == "debug"


def test_reload_of_a_broken_file_keeps_the_running_config(manager: ConfigManager) -> None:
    before = manager.config
    manager.path.write_text("tunnels: [\n")
    with pytest.raises(ConfigError, match="YAML syntax"):
        manager.reload()
    assert manager.config == before


def test_an_empty_file_never_replaces_a_running_config(manager: ConfigManager) -> None:
    """An editor that truncates the file and writes it again a moment later: the daemon may reload in
    between, and must not run with no tunnels and no rules meanwhile."""
    original, before = manager.path.read_text(), manager.config
    seen: list[ConfigChanged] = []
    manager.bus = EventBus()
    manager.bus.subscribe(ConfigChanged, seen.append)
    for text in ("", "\n  \n", "# being rewritten\n"):
        manager.path.write_text(text)
        with pytest.raises(ConfigError, match=r"no settings.*running config stays"):
            manager.reload()
        assert manager.config == before
    manager.path.write_text(original)
    assert manager.reload() is False
    manager.add_rule({"process": "x", "tunnel": "corp"})  # the manager still edits the file it knows
    manager.path.write_text("tunnels: []\n")  # removing everything on purpose is still possible
    assert manager.reload() is True
    assert manager.config == Config()


def test_reload_waits_for_a_file_that_is_still_being_written(
    manager: ConfigManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, before = manager.path.read_text(), manager.config
    edited = original.replace("log_level: info", "log_level: debug")
    # The first part of the new file is valid YAML on its own: the rules are missing.
    manager.path.write_text(edited[: edited.index("rules:")])

    def writer_finishes(seconds: float) -> None:
        manager.path.write_text(edited)

    monkeypatch.setattr(config_module, "time", SimpleNamespace(sleep=writer_finishes))
    with pytest.raises(ConfigError, match="changed while it was read"):
        manager.reload()
    assert manager.config == before
    monkeypatch.setattr(config_module, "time", SimpleNamespace(sleep=lambda seconds: None))
    assert manager.reload() is True
    assert manager.config.log_level == "debug" and manager.config.rules == before.rules


@pytest.mark.skipif(os.name != "posix", reason="the edit lock is tested with fcntl")
def test_concurrent_edits_are_each_applied_or_refused_never_lost(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    before = len(load_config(path).rules)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(8), context.Queue()
    editors = [
        context.Process(target=add_one_rule, args=(str(path), f"app{i}", start, results)) for i in range(8)
    ]
    for editor in editors:
        editor.start()
    outcomes = dict(results.get(timeout=120) for _ in editors)
    for editor in editors:
        editor.join(timeout=60)
    rules = load_config(path).rules
    landed = {rule.process for rule in rules}
    for process, error in outcomes.items():
        if error is None:
            assert process in landed, f"{process}: reported applied, but the file lost it"
        else:
            assert "changed on disk" in error and process not in landed
    assert len(rules) == before + sum(error is None for error in outcomes.values())


@pytest.mark.skipif(os.name != "posix", reason="the edit lock is tested with fcntl")
def test_concurrent_rule_adds_from_the_cli_all_land(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    before = len(load_config(path).rules)
    env = {**os.environ, "PYTHONPATH": str(Path(config_module.__file__).parents[2])}
    commands = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "awg_split_tunnel",
                "rule",
                "add",
                f"app{i}",
                "-t",
                "direct",
                "-c",
                str(path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    for command in commands:
        _, stderr = command.communicate(timeout=120)
        assert command.returncode == 0, stderr
    rules = load_config(path).rules
    assert {r.process for r in rules[before:]} == {f"app{i}" for i in range(8)}


def test_missing_file_can_be_started_and_saved(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "awg-split-tunnel" / "config.yaml"
    m = ConfigManager(path)
    assert m.load(missing_ok=True) == Config()
    m.import_conf(EXAMPLES / "nl.conf")
    config = load_config(path)
    assert config.tunnel_ids == ("nl",)
    assert stat.S_IMODE((path.parent / "nl.conf").stat().st_mode) == 0o600


def test_example_config_round_trips_through_the_manager(tmp_path: Path) -> None:
    for name in ("config.yaml", "nl.conf", "wg.conf"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    m = ConfigManager(tmp_path / "config.yaml")
    m.load()
    original = m.path.read_text()
    m.add_rule({"process": "x", "tunnel": "direct"}, 3)
    m.remove_rule(3)
    assert m.path.read_text() == original
    m.save()
    assert m.path.read_text() == original


# -- small helpers ------------------------------------------------------------------------------------


@given(st.text(max_size=30))
@settings(max_examples=100)
def test_tunnel_id_from_any_file_name_is_valid(name: str) -> None:
    tunnel_id = tunnel_id_from_name(name)
    path_text = f"tunnels:\n  - {{id: '{tunnel_id}', type: socks5, server: 'a:1'}}\n"
    assert parse_config(path_text, file="c.yaml", base_dir=Path(".")).tunnel_ids == (tunnel_id,)


def test_default_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    if os.name == "posix":
        assert default_config_path() == Path("/etc/awg-split-tunnel/config.yaml")
    windows = default_config_location("win32", {"ProgramData": r"D:\ProgramData"})
    assert windows == PureWindowsPath(r"D:\ProgramData\awg-split-tunnel\config.yaml")
    monkeypatch.setenv(ENV_CONFIG, str(tmp_path / "mine.yaml"))
    assert default_config_path() == tmp_path / "mine.yaml"


def test_a_change_made_behind_the_managers_back_is_not_overwritten(manager: ConfigManager) -> None:
    edited = manager.path.read_text().replace("log_level: info", "log_level: debug")
    manager.path.write_text(edited)
    with pytest.raises(ConfigError, match="changed on disk"):
        manager.add_rule({"process": "x", "tunnel": "corp"})
    assert manager.path.read_text() == edited
    manager.reload()
    manager.add_rule({"process": "x", "tunnel": "corp"})
    assert "log_level: debug" in manager.path.read_text()


def test_comments_of_a_file_without_keys_survive_the_first_change(tmp_path: Path) -> None:
    path = write(tmp_path, "# my settings\n# (none yet)\n")
    m = ConfigManager(path)
    m.load()
    m.add_tunnel({"id": "s", "type": "socks5", "server": "198.18.0.5:1080"})
    text = path.read_text()
    assert text.startswith("# my settings\n# (none yet)\n")
    assert load_config(path).tunnel_ids == ("s",)


# -- AmneziaWG parameters are checked as amneziawg-go would (and where it would crash) ------------------


def test_inline_amneziawg_parameters_are_checked_at_load(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        f"""\
        tunnels:
          - id: nl
            type: amneziawg
            private_key: {PRIV}
            address: 198.19.0.2/32
            jc: 3
            jmin: 60
            jmax: 50
            peer:
              public_key: {PUB}
              endpoint: 198.18.0.40:51820
        """,
    )
    assert error.line == 8 and error.key == "tunnels[0].jmax"
    assert "Jmin" in error.reason


def test_amneziawg_conf_with_overlapping_headers_names_the_conf_file(tmp_path: Path) -> None:
    conf = AWG_EXPORT.replace("H2 = 2045118820-2045118900", "H2 = 1811432399-1811432500")
    (tmp_path / "nl.conf").write_text(conf)
    error = config_error(tmp_path, "tunnels:\n  - id: nl\n    type: amneziawg\n    config_file: nl.conf\n")
    assert error.file == str(tmp_path / "nl.conf")
    assert "overlap" in error.reason and "nl" in error.reason


# -- editing rules in place and moving them (the dashboard's rule editor) -----------------------------


def test_editing_a_rule_changes_only_that_rule_and_keeps_every_comment(manager: ConfigManager) -> None:
    manager.update_rule(1, {"process": "wget", "tunnel": "office", "fallback": "drop"})
    text = manager.path.read_text()
    comments = [line.strip() for line in BASE.splitlines() if "#" in line]
    assert [line.strip() for line in text.splitlines() if "#" in line] == comments
    assert manager.list_rules()[1] == RuleConfig(
        process="wget", tunnel="office", fallback=FallbackPolicy.DROP
    )
    assert text.index("# build tools") < text.index("wget") < text.index("# games last")
    # A key left out returns to its default: the line goes.
    manager.update_rule(0, {"process": "firefox", "tunnel": "office"})
    assert "fallback: block" not in manager.path.read_text()
    assert manager.list_rules()[0].fallback is FallbackPolicy.ALLOW_DIRECT


@pytest.mark.parametrize(("index", "to"), [(2, 1), (1, 2), (2, 0), (0, 2)])
def test_moving_a_rule_reorders_the_rules_and_keeps_every_comment(
    manager: ConfigManager, index: int, to: int
) -> None:
    processes = [r.process for r in manager.list_rules()]
    manager.move_rule(index, to)
    processes.insert(to, processes.pop(index))
    assert [r.process for r in manager.list_rules()] == processes
    assert [r.process for r in load_config(manager.path).rules] == processes
    text = manager.path.read_text()
    assert sorted(line.strip() for line in text.splitlines() if "#" in line) == sorted(
        line.strip() for line in BASE.splitlines() if "#" in line
    )
    assert text.index("# end of rules") > text.index("tunnel: direct")


@pytest.mark.parametrize(("index", "to"), [(2, 1), (1, 2), (2, 0), (0, 2), (1, 0), (0, 1)])
@pytest.mark.parametrize("heading", ["rules:    # first match wins", "rules:"])
def test_a_moved_rule_takes_its_comment_line_along(tmp_path: Path, index: int, to: int, heading: str) -> None:
    path = write(tmp_path, BASE.replace("rules:    # first match wins", heading))
    manager = ConfigManager(path)
    manager.load()
    original = path.read_text()
    manager.move_rule(index, to)
    text = path.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[lines.index("# browsers") + 1] == "- process: firefox"
    assert lines[lines.index("# build tools") + 1] == '- process: "/opt/tools/*/bin/curl"'
    assert lines[lines.index("# games last") + 1] == "- process: steam"
    assert text.splitlines()[-1] == "# end of rules" and heading in text
    assert load_config(path).rules == manager.config.rules
    manager.move_rule(to, index)
    assert path.read_text() == original


def test_a_bad_edit_or_move_is_refused_with_the_key_and_changes_nothing(manager: ConfigManager) -> None:
    before = snapshot(manager)
    for attempt, key in [
        (lambda: manager.update_rule(0, {"process": "x", "tunnel": "nowhere"}), "rules[0].tunnel"),
        (lambda: manager.update_rule(5, {"process": "x", "tunnel": "direct"}), "rules[5]"),
        (lambda: manager.move_rule(0, 3), "rules"),
        (lambda: manager.move_rule(-1, 0), "rules[-1]"),
    ]:
        with pytest.raises(ConfigError) as caught:
            attempt()
        assert caught.value.key == key
        assert snapshot(manager) == before


# -- the dashboard's `ui:` block --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("", "127.0.0.1:7799"),
        ("ui: off\n", None),
        ("ui: false\n", None),
        ("ui: on\n", "127.0.0.1:7799"),
        ("ui: {listen: 127.0.0.1:8080}\n", "127.0.0.1:8080"),
        ('ui: {listen: "[::1]:8080"}\n', "[::1]:8080"),
    ],
)
def test_ui_block_is_on_by_default_on_loopback_or_off(tmp_path: Path, text: str, listen: str | None) -> None:
    assert load_config(write(tmp_path, text)).ui.listen == listen


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:7799", "not a loopback address"),
        ("198.18.0.1:80", "not a loopback"),
        ("localhost", "IP:PORT"),
    ],
)
def test_ui_listen_off_loopback_is_refused_with_its_line(tmp_path: Path, listen: str, message: str) -> None:
    error = config_error(tmp_path, f"default: direct\nui:\n  listen: {listen}\n")
    assert error.line == 3 and error.key == "ui.listen"
    assert message in error.reason


def test_dns_settings_default_to_per_app_lookups_and_stream_tunnels_take_servers(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "log_level: info\n")).dns.per_app
    text = (
        "tunnels:\n  - id: s\n    type: socks5\n    server: a:1\n    dns: 9.9.9.9\n"
        "  - id: h\n    type: http\n    server: b:2\n    dns: [1.1.1.1, '2606:4700::1111']\n"
        "dns:\n  per_app: false\n  system: s\n"
    )
    config = load_config(write(tmp_path, text))
    assert [t.dns for t in config.tunnels] == [("9.9.9.9",), ("1.1.1.1", "2606:4700::1111")]
    assert (config.dns.per_app, config.dns.system) == (False, "s")


@pytest.mark.skipif(sys.platform == "win32", reason="service: rules are Windows' own")
def test_a_service_rule_is_refused_on_linux_naming_the_rule(tmp_path: Path) -> None:
    error = config_error(tmp_path, "rules:\n  - process: 'service:Dnscache'\n    tunnel: direct\n")
    assert error.key == "rules[0].process" and error.line == 2
    assert "Windows only" in str(error)
