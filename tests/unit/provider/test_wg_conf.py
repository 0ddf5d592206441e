"""`.conf` files are read the way awg / awg-quick read them, and written back without loss."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.wireguard.conf import (
    Endpoint,
    InterfaceSection,
    PeerSection,
    WgConf,
    awg_params,
    check_setting,
    conf_from_settings,
    parse_conf,
    setting_key,
)
from awg_split_tunnel.provider.wireguard.keys import decode_key, encode_key
from awg_split_tunnel.provider.wireguard.value_range import Range

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PRIV = "6CdQe86Cs3tZ0ID+nggfniHK8Vqpp5eSNZX9uE0ULnE="
PUB = "oP3QOUULQ2V1yaO/xysn6ztKjnsYMDmWi6np6TLO2XM="
PSK = "cjuHK6BX+TfMJhw5dFqY2bdVb8ha1x1yW9iDPDI3sPA="
HPK = "KJUYC0fDmlRHM2QpSbQYjr2RVkTClRZJe82u9S9of00="
PUB2 = "My1onjES3f92IY8R+oVfyLAEyUqDNwnC5q6zcrGpwTc="


def minimal(extra_interface: str = "", extra_peer: str = "") -> str:
    return f"[Interface]\nPrivateKey = {PRIV}\n{extra_interface}\n[Peer]\nPublicKey = {PUB}\n{extra_peer}\n"


def conf_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_conf(text, file="vpn.conf")
    return caught.value


# -- every key, typed ---------------------------------------------------------------------------------

AMNEZIA_EXPORT = f"""\
[Interface]
PrivateKey = {PRIV}
Address = 10.8.0.2/32, fd42:42:42::2/128
Address = 10.9.0.2/24
DNS = 1.1.1.1, 2606:4700:4700::1111, corp.example
MTU = 1380
ListenPort = 51821
FwMark = 0x1234
Table = off
PreUp = echo pre up
PostUp = iptables -A FORWARD -i %i -j ACCEPT
PostUp = echo second
PreDown = echo pre down
PostDown = echo post down
SaveConfig = true
Jc = 4
Jmin = 40
Jmax = 70
S1 = 15
S2 = 68
S3 = 17
S4 = 8
H1 = 1811432321-1811432400
H2 = 2045118820
H3 = 1236479110-1236479200
H4 = 994002200-994002300
I1 = <b 0xc0ffee0001020304> <r 10> <t>
I2 = <r 20>
I3 =
I4 =
I5 =
HeaderProtectionKey = {HPK}
ContentPaddingAddition = 10-20
RekeyAfterTime = 100-110
RekeyTimeout = 4
RejectAfterTime = 170-180
KeepaliveTimeout = 9-11
MaxHandshakeAttempts = 15-20
RandomTrailers = on
DisableCookies = 0

[Peer]
PublicKey = {PUB}
PresharedKey = {PSK}
Endpoint = vpn.example.net:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25

[Peer]
PublicKey = {PUB2}
Endpoint = [2001:2::1]:443
AllowedIPs = 198.18.0.0/15
AllowedIPs = 2001:2::/48
PersistentKeepalive = 20-30
AdvancedSecurity = off
"""


def test_every_key_is_read_into_a_typed_value() -> None:
    conf = parse_conf(AMNEZIA_EXPORT, file="nl.conf")
    iface = conf.interface
    assert iface.private_key == decode_key(PRIV, what="k")
    assert iface.addresses == (
        ipaddress.ip_interface("10.8.0.2/32"),
        ipaddress.ip_interface("fd42:42:42::2/128"),
        ipaddress.ip_interface("10.9.0.2/24"),
    )
    assert iface.dns == (ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("2606:4700:4700::1111"))
    assert iface.dns_search == ("corp.example",)
    assert (iface.mtu, iface.listen_port, iface.fwmark, iface.table) == (1380, 51821, 0x1234, "off")
    assert iface.pre_up == ("echo pre up",)
    assert iface.post_up == ("iptables -A FORWARD -i %i -j ACCEPT", "echo second")
    assert (iface.pre_down, iface.post_down, iface.save_config) == (
        ("echo pre down",),
        ("echo post down",),
        True,
    )
    assert (iface.jc, iface.jmin, iface.jmax) == (4, 40, 70)
    assert (iface.s1, iface.s2, iface.s3, iface.s4) == (15, 68, 17, 8)
    assert iface.h1 == Range(1811432321, 1811432400)
    assert iface.h2 == Range(2045118820, 2045118820)
    assert iface.i1 == "<b 0xc0ffee0001020304> <r 10> <t>"
    assert iface.i2 == "<r 20>"
    assert (iface.i3, iface.i4, iface.i5) == (None, None, None)  # empty lines of AmneziaVPN exports
    assert iface.header_protection_key == decode_key(HPK, what="k")
    assert iface.content_padding_addition == Range(10, 20)
    assert iface.rekey_after_time == Range(100, 110)
    assert iface.rekey_timeout == Range(4, 4)
    assert iface.reject_after_time == Range(170, 180)
    assert iface.keepalive_timeout == Range(9, 11)
    assert iface.max_handshake_attempts == Range(15, 20)
    assert (iface.random_trailers, iface.disable_cookies) == (True, False)

    first, second = conf.peers
    assert first.public_key == decode_key(PUB, what="k")
    assert first.preshared_key == decode_key(PSK, what="k")
    assert first.endpoint == Endpoint("vpn.example.net", 51820)
    assert first.allowed_ips == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert first.persistent_keepalive == Range(25, 25)
    assert second.endpoint == Endpoint("2001:2::1", 443)
    assert second.allowed_ips == (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:2::/48"))
    assert second.persistent_keepalive == Range(20, 30)
    assert second.advanced_security is False
    assert second.preshared_key is None


def test_round_trip_of_a_full_file_keeps_every_value() -> None:
    conf = parse_conf(AMNEZIA_EXPORT)
    assert parse_conf(conf.to_text()) == conf


def test_values_a_conf_cannot_hold_are_refused_when_writing() -> None:
    conf = parse_conf(minimal())
    for bad in (
        dataclasses.replace(conf.interface, i1="<r 5> # not a comment"),
        dataclasses.replace(conf.interface, post_up=("echo a\nrm -rf /",)),
    ):
        with pytest.raises(ValueError, match="cannot be written"):
            WgConf(bad, conf.peers).to_text()


def test_private_keys_do_not_appear_in_repr() -> None:
    conf = parse_conf(AMNEZIA_EXPORT)
    shown = repr(conf)
    for secret in (
        conf.interface.private_key,
        conf.interface.header_protection_key,
        conf.peers[0].preshared_key,
    ):
        assert repr(secret) not in shown


def test_awg_params_lists_the_amneziawg_parameters_present() -> None:
    conf = parse_conf(AMNEZIA_EXPORT)
    params = awg_params(conf)
    assert list(params) == [
        "jc", "jmin", "jmax", "s1", "s2", "s3", "s4", "h1", "h2", "h3", "h4", "i1", "i2",
        "header_protection_key", "content_padding_addition", "rekey_after_time", "rekey_timeout",
        "reject_after_time", "keepalive_timeout", "max_handshake_attempts", "random_trailers",
        "disable_cookies",
    ]  # fmt: skip
    assert params["h1"] == Range(1811432321, 1811432400)
    assert params["i1"] == "<b 0xc0ffee0001020304> <r 10> <t>"
    assert conf.is_amneziawg


def test_plain_wireguard_file_has_no_amneziawg_parameters() -> None:
    conf = parse_conf((EXAMPLES / "wg.conf").read_text())
    assert awg_params(conf) == {}
    assert not conf.is_amneziawg
    # One AmneziaWG key is enough to make it an AmneziaWG file.
    assert parse_conf(minimal("Jc = 0")).is_amneziawg


def test_example_files_parse() -> None:
    nl = parse_conf((EXAMPLES / "nl.conf").read_text(), file="nl.conf")
    assert nl.is_amneziawg and nl.interface.i1 == "<b 0xc0ffee0001020304> <r 10> <t>"
    assert nl.interface.h4 == Range(994002200, 994002300)
    assert parse_conf(nl.to_text()) == nl


# -- lexing -------------------------------------------------------------------------------------------


def test_sections_and_keys_are_case_insensitive_and_whitespace_is_removed() -> None:
    text = (
        f"[INTERFACE]\n  privatekey=   {PRIV}\n\tjC = 4\n"
        f"[pEeR]\nPUBLICKEY = {PUB}\nallowedips = 10.0.0.0/8 , 10.1.0.0/16\n"
    )
    conf = parse_conf(text)
    assert conf.interface.jc == 4
    assert conf.peers[0].allowed_ips == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("10.1.0.0/16"),
    )


def test_comments_are_cut_everywhere_including_i_lines() -> None:
    conf = parse_conf(minimal("# a comment line\nJc = 4 # junk count\nI1 = <b 0x01> <r 2>   # signature"))
    assert conf.interface.jc == 4
    assert conf.interface.i1 == "<b 0x01> <r 2>"


def test_i_line_in_column_zero_keeps_inner_spaces_and_trims_the_ends() -> None:
    conf = parse_conf(minimal("i3   =    <b 0xc0ffee>  <r 10>   "))
    assert conf.interface.i3 == "<b 0xc0ffee>  <r 10>"


def test_indented_i_line_with_inner_spaces_is_refused_with_the_reason() -> None:
    error = conf_error(minimal("  I1 = <b 0xc0ffee> <r 10>"))
    assert (error.file, error.line, error.key) == ("vpn.conf", 3, "I1")
    assert "first column" in str(error)


def test_indented_i_line_without_inner_spaces_is_fine() -> None:
    assert parse_conf(minimal("    I1 = <t>")).interface.i1 == "<t>"


def test_empty_i_value_means_unset_even_after_a_value() -> None:
    assert parse_conf(minimal("I2 = <t>\nI2 =")).interface.i2 is None


def test_each_peer_section_starts_a_new_peer() -> None:
    text = minimal() + f"[Peer]\nPublicKey = {PSK}\n[Peer]\nPublicKey = {PRIV}\n"
    assert [encode_key(p.public_key) for p in parse_conf(text).peers] == [PUB, PSK, PRIV]


def test_windows_line_endings_and_bom_are_accepted() -> None:
    text = "\ufeff" + minimal("MTU = 1400").replace("\n", "\r\n")
    assert parse_conf(text).interface.mtu == 1400


def test_later_scalar_lines_replace_earlier_ones_as_in_awg() -> None:
    assert parse_conf(minimal("MTU = 1400\nMTU = 1300")).interface.mtu == 1300


@pytest.mark.parametrize(
    "value, expected",
    [("off", None), ("0", None), ("25", Range(25, 25)), ("5-7", Range(5, 7)), ("0-3", Range(0, 3))],
)
def test_persistent_keepalive_off_number_or_range(value: str, expected: Range | None) -> None:
    conf = parse_conf(minimal(extra_peer=f"PersistentKeepalive = {value}"))
    assert conf.peers[0].persistent_keepalive == expected
    # Written back as a number: 3.x tools refuse `off`.
    assert "= off" not in conf.to_text()


@pytest.mark.parametrize("value, expected", [("off", 0), ("0", 0), ("1234", 1234), ("0xff", 255)])
def test_fwmark_forms(value: str, expected: int) -> None:
    assert parse_conf(minimal(f"FwMark = {value}")).interface.fwmark == expected


@pytest.mark.parametrize(
    "text, host, port",
    [
        ("198.18.0.1:51820", "198.18.0.1", 51820),
        ("vpn.example.net:443", "vpn.example.net", 443),
        ("[2001:2::1]:51820", "2001:2::1", 51820),
        ("2001:2::1:51820", "2001:2::1", 51820),  # wg takes the last ':' as the separator
    ],
)
def test_endpoint_forms(text: str, host: str, port: int) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.host, endpoint.port) == (host, port)
    assert Endpoint.parse(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    "text",
    [
        "host",
        "host:",
        ":51820",
        "[2001:2::1:51820",
        "[2001:2::1]51820",
        "host:0",
        "host:65536",
        "host:port",
        "bad host:1",
        "[nothost]:1",
    ],
)
def test_bad_endpoints_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


@pytest.mark.parametrize(
    "value, allowed",
    [
        ("", ()),
        ("10.0.0.1", ("10.0.0.1/32",)),
        ("fd00::1", ("fd00::1/128",)),
        ("10.1.2.3/8", ("10.0.0.0/8",)),
    ],
)
def test_allowed_ips_bare_ips_empty_and_host_bits(value: str, allowed: tuple[str, ...]) -> None:
    conf = parse_conf(minimal(extra_peer=f"AllowedIPs = {value}"))
    assert conf.peers[0].allowed_ips == tuple(ipaddress.ip_network(a) for a in allowed)


@pytest.mark.parametrize(
    "value, expected", [("on", True), ("OFF", False), ("1", True), ("0", False), ("7", True)]
)
def test_booleans_on_off_or_number(value: str, expected: bool) -> None:
    assert parse_conf(minimal(f"RandomTrailers = {value}")).interface.random_trailers is expected


# -- errors name file, line and key -------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, line, key, reason",
    [
        ("Jc = 65536", 3, "Jc", "at most 65535"),
        ("Jc = -1", 3, "Jc", "decimal number"),
        ("S1 = ten", 3, "S1", "decimal number"),
        ("S4 =", 3, "S4", "no value"),
        ("H1 = 10-5", 3, "H1", "start above its end"),
        ("H2 = 4294967296", 3, "H2", "0-4294967295"),
        ("H3 = 1-2-3", 3, "H3", "N or A-B"),
        ("RekeyTimeout = 65000-70000", 3, "RekeyTimeout", "0-65535"),
        ("MTU = 20", 3, "MTU", "at least 68"),
        ("ListenPort = https", 3, "ListenPort", "port number"),
        ("FwMark = 0xZZ", 3, "FwMark", "FwMark must be"),
        ("Address = 10.0.0.300/32", 3, "Address", "not an IP address"),
        ("DNS = 1.2.3", 3, "DNS", "neither an IP address nor a search domain"),
        ("SaveConfig = yes", 3, "SaveConfig", "true or false"),
        ("RandomTrailers = true", 3, "RandomTrailers", "on, off or a number"),
        (f"HeaderProtectionKey = {PRIV[:-2]}", 3, "HeaderProtectionKey", "44 characters"),
        ("Endpoint = 198.18.0.1:1", 3, "Endpoint", "belongs in [Peer]"),
        ("Frobnicate = 1", 3, "Frobnicate", "unknown key Frobnicate in [Interface]"),
        ("J1 = <r 5>", 3, "J1", "AmneziaWG 1.5"),
        ("just words", 3, None, "Key = Value"),
    ],
)
def test_interface_errors(extra: str, line: int, key: str | None, reason: str) -> None:
    error = conf_error(minimal(extra))
    assert (error.file, error.line, error.key) == ("vpn.conf", line, key)
    assert reason in str(error)
    assert str(error).startswith(f"vpn.conf:{line}")
    if key:
        assert f"key '{key}'" in str(error)


@pytest.mark.parametrize(
    "extra, key, reason",
    [
        ("PresharedKey = not-a-key", "PresharedKey", "44 characters"),
        ("Endpoint = vpn.example.net", "Endpoint", "host:port"),
        ("AllowedIPs = 10.0.0.0/33", "AllowedIPs", "not an IP address or network"),
        ("AllowedIPs = 10.0.0.0/x", "AllowedIPs", "bad prefix length"),
        ("PersistentKeepalive = 70000", "PersistentKeepalive", "0-65535"),
        ("PersistentKeepalive = forever", "PersistentKeepalive", "N or A-B"),
        ("MTU = 1420", "MTU", "belongs in [Interface]"),
    ],
)
def test_peer_errors(extra: str, key: str, reason: str) -> None:
    error = conf_error(minimal(extra_peer=extra))
    assert (error.file, error.line, error.key) == ("vpn.conf", 6, key)
    assert reason in str(error)


@pytest.mark.parametrize(
    "line, key, reason",
    [
        (f"PrivateKey: {PRIV}", "PrivateKey", "expected 'PrivateKey = value'"),
        (f"privatekey {PRIV}", "PrivateKey", "expected 'PrivateKey = value'"),
        (f"PresharedKey:{PRIV}", "PresharedKey", "expected 'PresharedKey = value'"),
        (PRIV, None, "expected 'Key = Value'"),
        (PRIV[:-1], None, "expected 'Key = Value'"),
        (f"Secret {PRIV}", None, "the line starts with Secret"),
        (f"[{PRIV}]", None, "unknown section header"),
        (f"MTU = {PRIV}", "MTU", "decimal number"),
        (f"Address = 10.0.0.2/32, {PRIV}", "Address", "not an IP address"),
        (f"Table = x\nPostUp = a\n{PRIV} = 1", None, "expected 'Key = Value'"),
    ],
)
def test_a_malformed_line_is_named_by_its_key_never_by_its_value(
    line: str, key: str | None, reason: str
) -> None:
    error = conf_error(f"[Interface]\n{line}\n")
    assert error.key == key
    assert reason in str(error)
    for shown in (str(error), repr(error), error.key or ""):
        assert PRIV.rstrip("=") not in shown


def test_missing_required_keys_name_the_section_line() -> None:
    error = conf_error(f"# my vpn\n[Interface]\nPrivateKey = {PRIV}\n\n[Peer]\nEndpoint = 198.18.0.1:51820\n")
    assert (error.line, error.key) == (5, "PublicKey")
    assert "[Peer] has no PublicKey" in str(error)
    error = conf_error(f"[Interface]\nAddress = 10.0.0.2/32\n[Peer]\nPublicKey = {PUB}\n")
    assert (error.line, error.key) == (1, "PrivateKey")
    error = conf_error(f"[Peer]\nPublicKey = {PUB}\n")
    assert "no [Interface] section" in str(error)


def test_key_outside_a_section_and_unknown_sections() -> None:
    error = conf_error(f"PrivateKey = {PRIV}\n[Interface]\n")
    assert (error.line, error.key) == (1, "PrivateKey")
    assert "before any [Interface] or [Peer]" in str(error)
    error = conf_error(minimal() + "[Peers]\n")
    assert error.line == 7 and "unknown section [Peers]" in str(error)


def test_bad_key_error_does_not_echo_the_key() -> None:
    bad = PRIV[:-3] + "!!="
    error = conf_error(f"[Interface]\nPrivateKey = {bad}\n")
    assert bad not in str(error)


# -- inline settings (the YAML config uses these) -----------------------------------------------------


def test_settings_by_snake_case_name_build_the_same_conf() -> None:
    conf = conf_from_settings(
        {"private_key": PRIV, "address": "10.8.0.2/32, fd42::2/128", "h1": "5-10", "i1": " <b 0x01> <r 2> "},
        [{"public_key": PUB, "endpoint": "198.18.0.1:51820", "allowed_ips": "0.0.0.0/0"}],
    )
    text = f"""[Interface]
PrivateKey = {PRIV}
Address = 10.8.0.2/32, fd42::2/128
H1 = 5-10
I1 = <b 0x01> <r 2>
[Peer]
PublicKey = {PUB}
Endpoint = 198.18.0.1:51820
AllowedIPs = 0.0.0.0/0
"""
    assert conf == parse_conf(text)
    assert setting_key("interface", "header_protection_key") == "HeaderProtectionKey"
    assert setting_key("peer", "mtu") is None


def test_check_setting_reports_the_reason() -> None:
    check_setting("interface", "h2", "100-200")
    with pytest.raises(ValueError, match="start above its end"):
        check_setting("interface", "h2", "200-100")
    with pytest.raises(ValueError, match="unknown"):
        check_setting("peer", "jc", "1")


def test_conf_from_settings_names_the_bad_key() -> None:
    with pytest.raises(ConfigError) as caught:
        conf_from_settings({"private_key": PRIV, "s1": "x"}, [], file="inline")
    assert (caught.value.key, caught.value.file) == ("s1", "inline")
    with pytest.raises(ConfigError) as caught:
        conf_from_settings({"address": "10.0.0.1/32"}, [])
    assert "PrivateKey" in str(caught.value)


# -- round trip, property-based ---------------------------------------------------------------------


def ranges(limit: int, *, min_hi: int = 0) -> st.SearchStrategy[Range]:
    return st.integers(0, limit).flatmap(
        lambda lo: st.integers(max(lo, min_hi), max(limit, lo)).map(lambda hi: Range(lo, hi))
    )


keys = st.binary(min_size=32, max_size=32)
u16 = st.integers(0, 0xFFFF)
words = st.from_regex(r"[A-Za-z0-9_%./-]+( [A-Za-z0-9_%./-]+){0,3}", fullmatch=True)
templates = st.from_regex(
    r"<[a-z]{1,2}( [0-9a-fx]{1,8})?>( {0,2}<[a-z]{1,2}( [0-9a-fx]{1,8})?>){0,3}", fullmatch=True
)
domains = st.from_regex(r"[a-z]([a-z0-9-]{0,7}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True)


@st.composite
def interfaces(draw: st.DrawFn) -> InterfaceSection:
    def opt(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.none() | strategy)

    def address() -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        if draw(st.booleans()):
            return ipaddress.IPv4Interface((draw(st.ip_addresses(v=4)), draw(st.integers(0, 32))))
        return ipaddress.IPv6Interface((draw(st.ip_addresses(v=6)), draw(st.integers(0, 128))))

    return InterfaceSection(
        private_key=draw(keys),
        addresses=tuple(address() for _ in range(draw(st.integers(0, 3)))),
        dns=tuple(draw(st.lists(st.ip_addresses(), max_size=2))),
        dns_search=tuple(draw(st.lists(domains, max_size=2))),
        mtu=opt(st.integers(68, 0xFFFF)),
        listen_port=opt(u16),
        fwmark=opt(st.integers(0, 0xFFFFFFFF)),
        table=opt(words),
        pre_up=tuple(draw(st.lists(words, max_size=2))),
        post_up=tuple(draw(st.lists(words, max_size=2))),
        pre_down=tuple(draw(st.lists(words, max_size=1))),
        post_down=tuple(draw(st.lists(words, max_size=1))),
        save_config=draw(st.booleans()),
        **{name: opt(u16) for name in ("jc", "jmin", "jmax", "s1", "s2", "s3", "s4")},
        **{f"h{n}": opt(ranges(0xFFFFFFFF)) for n in range(1, 5)},
        **{f"i{n}": opt(templates) for n in range(1, 6)},
        header_protection_key=opt(keys),
        **{
            name: opt(ranges(0xFFFF))
            for name in (
                "content_padding_addition",
                "rekey_after_time",
                "rekey_timeout",
                "reject_after_time",
                "keepalive_timeout",
                "max_handshake_attempts",
            )
        },
        random_trailers=opt(st.booleans()),
        disable_cookies=opt(st.booleans()),
    )


endpoints = st.builds(
    Endpoint,
    st.one_of(st.ip_addresses().map(str), domains),
    st.integers(1, 0xFFFF),
)


@st.composite
def peers(draw: st.DrawFn) -> PeerSection:
    def network() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        address = draw(st.ip_addresses())
        prefix = draw(st.integers(0, address.max_prefixlen))
        return ipaddress.ip_network((address, prefix), strict=False)

    return PeerSection(
        public_key=draw(keys),
        preshared_key=draw(st.none() | keys),
        endpoint=draw(st.none() | endpoints),
        allowed_ips=tuple(network() for _ in range(draw(st.integers(0, 3)))),
        persistent_keepalive=draw(st.none() | ranges(0xFFFF, min_hi=1)),
        advanced_security=draw(st.none() | st.booleans()),
    )


confs = st.builds(WgConf, interfaces(), st.lists(peers(), max_size=3).map(tuple))


@given(confs)
@settings(max_examples=60, deadline=None)
def test_parse_of_to_text_is_the_identity(conf: WgConf) -> None:
    assert parse_conf(conf.to_text()) == conf


@given(confs, st.data())
@settings(max_examples=40, deadline=None)
def test_case_spacing_and_comments_do_not_change_the_meaning(conf: WgConf, data: st.DataObject) -> None:
    noisy: list[str] = []
    for line in conf.to_text().splitlines():
        if "=" in line:
            key, value = line.split(" = ", 1)
            key = "".join(c.upper() if data.draw(st.booleans()) else c.lower() for c in key)
            pad = data.draw(st.sampled_from(["", " ", "\t", "   "]))
            # I-lines must stay in column 0; every other line may be indented.
            indent = "" if key.lower() in ("i1", "i2", "i3", "i4", "i5") else pad
            line = f"{indent}{key}{pad}={pad}{value}{pad}"
        elif line.startswith("["):
            line = line.upper() if data.draw(st.booleans()) else line.lower()
        if data.draw(st.booleans()):
            line += "  # note"
        noisy.append(line)
    assert parse_conf("\n".join(noisy)) == conf


KEY_NAMES = ["PrivateKey", "Address", "DNS", "MTU", "ListenPort", "FwMark", "Table", "PostUp", "SaveConfig"]
KEY_NAMES += ["Jc", "S1", "H1", "I1", "HeaderProtectionKey", "RekeyTimeout", "RandomTrailers", "PublicKey"]
KEY_NAMES += ["PresharedKey", "Endpoint", "AllowedIPs", "PersistentKeepalive", "AdvancedSecurity", "[Peer]"]
values = st.text(
    alphabet=st.sampled_from(list("0123456789abcdefx:./-[]<> ,=#\t+AZ=\u0661\u00e9")), max_size=24
)


@given(st.lists(st.tuples(st.sampled_from(KEY_NAMES), values), max_size=8))
@settings(max_examples=200, deadline=None)
def test_hostile_files_give_a_config_error_never_a_crash(lines: list[tuple[str, str]]) -> None:
    text = f"[Interface]\nPrivateKey = {PRIV}\n" + "\n".join(
        k if k.startswith("[") else f"{k} = {v}" for k, v in lines
    )
    try:
        conf = parse_conf(text, file="f.conf")
    except ConfigError as error:
        assert error.file == "f.conf"
    else:
        assert parse_conf(conf.to_text()) == conf
