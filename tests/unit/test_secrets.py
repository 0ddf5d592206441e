"""Secrets never in output: private and preshared keys, passwords and `user:password@` never appear in a
repr()/str() of an object, in an error message, in a log record or in what the CLI prints."""

from __future__ import annotations

import base64
import random
import string
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from awg_split_tunnel.cli import app
from awg_split_tunnel.core.config import (
    ConfigManager,
    InlinePeer,
    PacketTunnel,
    Socks5Tunnel,
    parse_config,
    tunnel_wg_conf,
)
from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard import noise
from awg_split_tunnel.provider.wireguard.conf import parse_conf
from awg_split_tunnel.provider.wireguard.cookie import CookieChecker, CookieGenerator
from awg_split_tunnel.provider.wireguard.device import DeviceSettings, PeerSettings
from awg_split_tunnel.provider.wireguard.keys import encode_key
from awg_split_tunnel.provider.wireguard.messages import HandshakeInitiation, HandshakeResponse
from awg_split_tunnel.provider.wireguard.noise import Handshake, StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import PeerConfig, WireGuardProtocol
from awg_split_tunnel.provider.wireguard.tai64n import tai64n

SK_I = bytes(range(1, 33))
SK_R = bytes(range(101, 133))
PSK = bytes(range(201, 233))
EPHEMERAL_I = bytes(range(33, 65))
EPHEMERAL_R = bytes(range(65, 97))
PASSWORD = "S3cretPw-9x"


def forms(secret: bytes) -> list[str]:
    """The ways raw key bytes could be printed."""
    return [repr(secret)[2:-1], secret.hex(), base64.b64encode(secret).decode()]


def assert_hidden(obj: object, *secrets: bytes) -> None:
    for shown in (repr(obj), str(obj)):
        for secret in secrets:
            for form in forms(secret):
                assert form not in shown, f"{type(obj).__name__} shows a secret: {shown}"


def test_repr_of_key_material_hides_the_secret_bytes() -> None:
    initiator, responder = StaticIdentity.from_private(SK_I), StaticIdentity.from_private(SK_R)
    assert_hidden(initiator, initiator.private)

    hs_i = Handshake.for_peer(initiator, responder.public, PSK)
    hs_r = Handshake.for_peer(responder, initiator.public, PSK)
    initiation = noise.create_initiation(hs_i, initiator, EPHEMERAL_I, 1, tai64n(1.7e9), 1)
    assert_hidden(hs_i, PSK, hs_i.precomputed_static_static, hs_i.chaining_key, EPHEMERAL_I)
    parsed = HandshakeInitiation.parse(initiation.pack())
    assert parsed is not None
    noise.consume_initiation(parsed, responder, lambda key: hs_r, 0.0)
    response = noise.create_response(hs_r, EPHEMERAL_R, 2, 2)
    assert_hidden(hs_r, PSK, hs_r.precomputed_static_static, hs_r.chaining_key, EPHEMERAL_R)
    parsed_response = HandshakeResponse.parse(response.pack())
    assert parsed_response is not None
    noise.consume_response(parsed_response, initiator, hs_i)
    keys = noise.derive_transport_keys(hs_i)
    assert_hidden(keys, keys.send, keys.receive)

    checker = CookieChecker.for_public_key(responder.public)
    checker.cookie_for(b"\x01" * 6, 0.0)
    assert_hidden(checker, checker.secret)
    generator = CookieGenerator.for_public_key(responder.public)
    generator.cookie = bytes(range(16))
    assert_hidden(generator, generator.cookie)

    assert_hidden(PeerConfig(responder.public, preshared_key=PSK), PSK)
    wg = WireGuardProtocol(SK_I, rng=random.Random(1))
    peer = wg.add_peer(PeerConfig(responder.public, preshared_key=PSK), 0.0)
    assert_hidden(peer, PSK, SK_I)
    assert_hidden(wg.identity, wg.identity.private)

    settings = DeviceSettings(SK_I, peers=(PeerSettings(responder.public, preshared_key=PSK),))
    assert_hidden(settings, SK_I, PSK)
    assert_hidden(AmneziaParams(header_protection_key=PSK), PSK)


def test_repr_of_config_models_hides_keys_and_passwords() -> None:
    proxy = Socks5Tunnel(
        id="office", type="socks5", server="198.18.0.5:1080", username="u", password=PASSWORD
    )
    assert PASSWORD not in repr(proxy) and PASSWORD not in str(proxy)
    tunnel = PacketTunnel(
        id="wg",
        type="wireguard",
        private_key=encode_key(SK_I),
        address="10.0.0.2/32",
        header_protection_key=encode_key(SK_R),
        peer=InlinePeer(
            public_key=encode_key(StaticIdentity.from_private(SK_R).public),
            preshared_key=encode_key(PSK),
            endpoint="198.18.0.1:51820",
        ),
    )
    assert_hidden(tunnel, SK_I, SK_R, PSK)
    assert_hidden(tunnel_wg_conf(tunnel), SK_I, SK_R, PSK)
    conf = parse_conf(
        f"[Interface]\nPrivateKey = {encode_key(SK_I)}\n[Peer]\nPublicKey = {encode_key(SK_R)}\n"
        f"PresharedKey = {encode_key(PSK)}\n"
    )
    assert_hidden(conf, SK_I, PSK)


# -- fuzzed files: the secret appears in no error, log record or CLI output --------------------------------

KEYS = st.binary(min_size=32, max_size=32).map(encode_key)
PASSWORDS = st.text(
    alphabet=string.ascii_letters + string.digits + "!*&%$^_-.~", min_size=10, max_size=24
).filter(lambda p: any(c.isalpha() for c in p) and any(c.isdigit() for c in p))
JUNK = st.text(alphabet=string.printable.replace("\n", "").replace("\r", ""), max_size=30)
PUB = encode_key(StaticIdentity.from_private(SK_R).public)

CONF_LINES = (
    "[Interface]",
    "[Peer]",
    "[interface]",
    "Address = 10.0.0.2/32",
    "DNS = 1.1.1.1",
    "MTU = 1420",
    "Jc = 4",
    "H1 = 5-10",
    "I1 = <b 0xc0ffee>",
    f"PublicKey = {PUB}",
    "Endpoint = 198.18.0.1:51820",
    "AllowedIPs = 0.0.0.0/0",
    "# a comment",
    "",
)
CONF_SECRET_NAMES = (
    "PrivateKey",
    "PresharedKey",
    "HeaderProtectionKey",
    "privatekey",
    "Private Key",
    "Key",
    "",
)
CONF_VALUE_NAMES = ("MTU", "Endpoint", "Address", "DNS", "AllowedIPs", "H1", "FwMark", "Jc")
SEPARATORS = (" = ", "=", ": ", ":", " ", "\t", " == ", " := ", "")
TAILS = ("", " # mine", " extra", ",", ":51820", "/32", "=")


@st.composite
def conf_with_secret(draw: st.DrawFn, secret: str) -> str:
    """A `.conf`-like text, mostly plausible, with `secret` somewhere: as a key's value (under any
    separator), as the value of a key that wants something else, inside another line, or alone."""
    lines = draw(st.lists(st.one_of(st.sampled_from(CONF_LINES), JUNK), max_size=12))
    name = draw(st.sampled_from(CONF_SECRET_NAMES + CONF_VALUE_NAMES))
    separator, tail = draw(st.sampled_from(SEPARATORS)), draw(st.sampled_from(TAILS))
    placed = draw(
        st.one_of(
            st.just(f"{name}{separator}{secret}{tail}"),
            st.just(secret),
            st.sampled_from(CONF_LINES).flatmap(
                lambda line: st.integers(0, len(line)).map(lambda i: line[:i] + secret + line[i:])
            ),
        )
    )
    lines.insert(draw(st.integers(0, len(lines))), placed)
    if draw(st.booleans()):
        lines.insert(0, "[Interface]")
    return "\n".join(lines) + "\n"


YAML_PROXY = """\
log_level: info
default: direct
tunnels:
  - id: office
    type: socks5
    server: 198.18.0.5:1080
    username: alice
    {password}
  - id: corp
    type: http
    server: {server}
  - id: wg
    type: wireguard
    {private_key}
    address: 10.0.0.2/32
    peer:
      public_key: {pub}
      {preshared_key}
      endpoint: 198.18.0.1:51820
rules:
  - process: firefox
    tunnel: office
"""
SECRET_SPELLINGS = (
    "{name}: {value}",
    "{name}: '{value}'",
    '{name}: "{value}"',
    "{name}: *{value}",
    "{name}: !{value}",
    "{name}: &{value}",
    "{name}: !!binary {value}",
    "{name}: [{value}]",
    "{name}: {{a: {value}}}",
    "{name} = {value}",
    "{name} {value}",
    "{name}:{value}",
    "{name}: {value} # mine",
    "{name}s: {value}",
    "{name}: '{value}",
    "  {name}: {value}",
    "{name}:\n      {value}",
)
SERVER_SPELLINGS = (
    "alice:{value}@proxy.example:3128",
    "'alice:{value}@proxy.example:3128'",
    "http://alice:{value}@proxy.example:3128",
    "[alice:{value}@proxy.example:3128]",
    ":{value}@proxy.example:3128",
)


@st.composite
def yaml_with_secrets(draw: st.DrawFn, password: str, key: str) -> str:
    """The config above with the password, the private key and a preshared key each written in some
    (often wrong) spelling, and its lines then shuffled a little: dropped, re-indented, junk inserted."""

    def spelled(name: str, value: str) -> str:
        return draw(st.sampled_from(SECRET_SPELLINGS)).format(name=name, value=value)

    text = YAML_PROXY.format(
        password=spelled("password", password),
        server=draw(st.sampled_from(SERVER_SPELLINGS)).format(value=password),
        private_key=spelled("private_key", key),
        preshared_key=spelled("preshared_key", key),
        pub=PUB,
    )
    lines = text.splitlines()
    for _ in range(draw(st.integers(0, 3))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(("drop", "indent", "dedent", "junk", "flow")))
        if action == "drop":
            del lines[index]
        elif action == "indent":
            lines[index] = "  " + lines[index]
        elif action == "dedent":
            lines[index] = lines[index][2:]
        elif action == "junk":
            lines.insert(index, draw(JUNK))
        elif action == "flow":
            lines[index] = lines[index].replace(": ", ":")
        if not lines:
            lines = ["{}"]
    return "\n".join(lines) + "\n"


def assert_never_shown(secrets: tuple[str, ...], *texts: str) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"secret shown in: {text}"


def shown_by(action: Callable[[], object]) -> list[str]:
    """What `action` lets a user see: its result's repr() and str(), or its error; warnings it raised."""
    shown: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = action()
            shown += [repr(result), str(result)]
        except ConfigError as exc:
            shown += [str(exc), repr(exc), exc.key or ""]
    return shown + [str(w.message) for w in caught]


def check_output(config: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """What a user can see when the config is loaded and checked: errors, warnings, log records, CLI
    output."""
    shown = shown_by(ConfigManager(config).load)
    result = CliRunner().invoke(app, ["check", "-c", str(config)])
    assert result.exit_code in (0, 1), result.exception
    shown += [result.stdout, result.stderr]
    shown += [record.getMessage() for record in caplog.records]
    return shown


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data(), key=KEYS)
def test_a_key_anywhere_in_a_conf_file_is_never_shown(
    data: st.DataObject, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    text = data.draw(conf_with_secret(key))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            conf = parse_conf(text, file="fuzz.conf")
        except ConfigError as exc:
            shown = [str(exc), repr(exc), exc.key or ""]
        else:
            # The key may have landed where it is no secret (an I1 template, a DNS search domain); what
            # the file holds as a secret stays hidden.
            iface = conf.interface
            secrets = [iface.private_key, iface.header_protection_key, *(p.preshared_key for p in conf.peers)]
            assert_hidden(conf, *(s for s in secrets if s is not None))
            shown = []
    shown += [str(w.message) for w in caught]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "wg.conf").write_text(text)
        config = Path(tmp) / "config.yaml"
        config.write_text("tunnels:\n  - {id: wg, type: wireguard, config_file: wg.conf}\n")
        shown += check_output(config, caplog)
    assert_never_shown((key, key.rstrip("=")), *shown)


@FUZZ
@given(data=st.data(), password=PASSWORDS, key=KEYS)
def test_a_password_or_key_anywhere_in_a_yaml_config_is_never_shown(
    data: st.DataObject, password: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    text = data.draw(yaml_with_secrets(password, key))
    shown = shown_by(lambda: parse_config(text, file="fuzz.yaml", base_dir=Path(".")))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        shown += check_output(path, caplog)
    assert_never_shown((password, key, key.rstrip("=")), *shown)
