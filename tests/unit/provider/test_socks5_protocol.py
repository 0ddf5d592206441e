"""SOCKS5 negotiation (RFC 1928/1929) and the UDP header codec, from byte vectors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.errors import ConfigError, ProtocolError, TunnelError
from awg_split_tunnel.provider.socks5.protocol import (
    Authenticated,
    Command,
    Established,
    FragmentedDatagram,
    Method,
    Socks5AuthError,
    Socks5Client,
    Socks5ReplyError,
    decode_udp_datagram,
    encode_address,
    encode_udp_datagram,
)

SERVER = "198.18.0.20:1080"
REPLY_OK_V4 = b"\x05\x00\x00\x01\xc6\x12\x00\x14\x04\x38"  # bound 198.18.0.20:1080


def ready_client(**creds: str) -> Socks5Client:
    client = Socks5Client(SERVER, **creds)
    client.outgoing()
    method = Method.USERNAME_PASSWORD if creds else Method.NO_AUTHENTICATION_REQUIRED
    client.receive(bytes((5, method)))
    if creds:
        client.outgoing()
        client.receive(b"\x01\x00")
    assert client.ready
    return client


def connecting_client(host: str = "198.18.0.10", port: int = 80) -> Socks5Client:
    client = ready_client()
    client.request(Command.CONNECT, host, port)
    client.outgoing()
    return client


# --- greeting and authentication ---------------------------------------------------------------------


def test_greeting_offers_no_auth_only_without_credentials() -> None:
    assert Socks5Client(SERVER).outgoing() == b"\x05\x01\x00"


def test_greeting_offers_username_password_when_configured() -> None:
    assert Socks5Client(SERVER, username="alice", password="secret").outgoing() == b"\x05\x02\x00\x02"


def test_no_auth_method_makes_the_client_ready() -> None:
    client = Socks5Client(SERVER)
    client.outgoing()
    assert client.receive(b"\x05\x00") == [Authenticated(Method.NO_AUTHENTICATION_REQUIRED)]
    assert client.ready and client.outgoing() == b""


def test_username_password_subnegotiation_success() -> None:
    client = Socks5Client(SERVER, username="alice", password="secret")
    client.outgoing()
    assert client.receive(b"\x05\x02") == []
    assert client.outgoing() == b"\x01\x05alice\x06secret"
    assert client.receive(b"\x01\x00") == [Authenticated(Method.USERNAME_PASSWORD)]
    assert client.ready


def test_rejected_credentials_are_a_clear_tunnel_error() -> None:
    client = Socks5Client(SERVER, username="alice", password="wrong")
    client.outgoing()
    client.receive(b"\x05\x02")
    with pytest.raises(Socks5AuthError, match=r"198\.18\.0\.20:1080 rejected the username/password"):
        client.receive(b"\x01\x01")


def test_server_wanting_auth_we_lack_says_to_set_credentials() -> None:
    client = Socks5Client(SERVER)
    client.outgoing()
    with pytest.raises(Socks5AuthError, match="requires authentication; set username and password"):
        client.receive(b"\x05\xff")


def test_server_choosing_a_method_not_offered_is_a_protocol_error() -> None:
    client = Socks5Client(SERVER)
    client.outgoing()
    with pytest.raises(ProtocolError, match="not offered"):
        client.receive(b"\x05\x02")


@pytest.mark.parametrize("reply", [b"\x04\x00", b"HTTP/1.1 400 Bad Request\r\n", b"\x00\x00"])
def test_a_non_socks5_server_is_a_protocol_error(reply: bytes) -> None:
    client = Socks5Client(SERVER)
    client.outgoing()
    with pytest.raises(ProtocolError, match="is it a SOCKS5 server"):
        client.receive(reply)


def test_data_before_a_request_is_a_protocol_error() -> None:
    client = Socks5Client(SERVER)
    client.outgoing()
    with pytest.raises(ProtocolError, match="before a request"):
        client.receive(b"\x05\x00junk")


def test_overlong_username_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="username"):
        Socks5Client(SERVER, username="a" * 256, password="x")


# --- requests and replies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "wire"),
    [
        ("198.18.0.10", 80, b"\x05\x01\x00\x01\xc6\x12\x00\x0a\x00\x50"),
        (
            "2001:2::10",
            443,
            b"\x05\x01\x00\x04" + bytes.fromhex("20010002" + "0" * 20 + "0010") + b"\x01\xbb",
        ),
        ("web.example", 8080, b"\x05\x01\x00\x03\x0bweb.example\x1f\x90"),
    ],
)
def test_connect_request_encodes_ipv4_ipv6_and_names(host: str, port: int, wire: bytes) -> None:
    client = ready_client()
    client.request(Command.CONNECT, host, port)
    assert client.outgoing() == wire


def test_successful_reply_establishes_with_the_bound_address() -> None:
    client = connecting_client()
    assert client.receive(REPLY_OK_V4) == [Established(Command.CONNECT, ("198.18.0.20", 1080), b"")]
    assert client.done


@pytest.mark.parametrize(
    ("bound", "expected"),
    [
        (b"\x04" + bytes(15) + b"\x01" + b"\x00\x35", ("::1", 53)),
        (b"\x03\x05relay\x00\x35", ("relay", 53)),
    ],
)
def test_reply_with_ipv6_or_name_bound_address(bound: bytes, expected: tuple[str, int]) -> None:
    client = connecting_client()
    [event] = client.receive(b"\x05\x00\x00" + bound)
    assert isinstance(event, Established) and event.bound == expected


def test_bytes_after_the_reply_belong_to_the_tunnel() -> None:
    client = connecting_client()
    [event] = client.receive(REPLY_OK_V4 + b"SSH-2.0-banner\r\n")
    assert isinstance(event, Established) and event.leftover == b"SSH-2.0-banner\r\n"


def test_bytes_needed_reads_exactly_one_reply() -> None:
    client = Socks5Client(SERVER)
    client.outgoing()
    assert client.bytes_needed() == 2
    client.receive(b"\x05\x00")
    client.request(Command.CONNECT, "web.example", 80)
    assert client.bytes_needed() == 5
    client.receive(b"\x05\x00\x00\x03\x05")  # domain of 5 bytes follows, then the port
    assert client.bytes_needed() == 5 + 2
    client.receive(b"relay\x00\x50")
    assert client.done and client.bytes_needed() == 0


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0x01, "general SOCKS server failure"),
        (0x02, "connection not allowed by ruleset"),
        (0x03, "network unreachable"),
        (0x04, "host unreachable"),
        (0x05, "connection refused"),
        (0x06, "TTL expired"),
        (0x07, "command not supported"),
        (0x08, "address type not supported"),
        (0x09, "unknown reply"),
        (0xFF, "unknown reply"),
    ],
)
def test_every_reply_code_is_a_clear_error(code: int, text: str) -> None:
    client = connecting_client()
    with pytest.raises(Socks5ReplyError) as caught:
        client.receive(bytes((5, code, 0, 1)) + bytes(6))
    assert caught.value.reply == code
    assert str(caught.value) == (
        f"SOCKS5 server {SERVER} refused CONNECT 198.18.0.10:80: {text} (reply 0x{code:02x})"
    )
    assert isinstance(caught.value, TunnelError)


def test_udp_associate_refusal_names_the_command() -> None:
    client = ready_client()
    client.request(Command.UDP_ASSOCIATE, "0.0.0.0", 0)
    with pytest.raises(
        Socks5ReplyError, match=r"refused UDP ASSOCIATE: command not supported \(reply 0x07\)"
    ):
        client.receive(b"\x05\x07\x00\x01" + bytes(6))


def test_truncated_reply_waits_for_more() -> None:
    client = connecting_client()
    assert client.receive(REPLY_OK_V4[:7]) == []
    assert client.bytes_needed() == 3 and not client.done


def test_unknown_address_type_in_reply_is_a_protocol_error() -> None:
    client = connecting_client()
    with pytest.raises(ProtocolError, match="address type 0x09"):
        client.receive(b"\x05\x00\x00\x09\x00")


def test_reply_with_wrong_version_is_a_protocol_error() -> None:
    client = connecting_client()
    with pytest.raises(ProtocolError, match="version 4"):
        client.receive(b"\x04\x5a\x00\x01" + bytes(6))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=12))
def test_reply_split_anywhere_gives_the_same_result(cuts: list[int]) -> None:
    stream = REPLY_OK_V4 + b"payload"
    client = connecting_client()
    events = []
    pos = 0
    for size in [*cuts, len(stream)]:
        if pos >= len(stream) or client.done:
            break
        events += client.receive(stream[pos : pos + size])
        pos += size
    assert len(events) == 1 and isinstance(events[0], Established)
    assert events[0].bound == ("198.18.0.20", 1080)
    assert events[0].leftover + stream[pos:] == b"payload"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["method", "auth", "reply"]))
def test_garbage_from_the_server_never_crashes(data: bytes, stage: str) -> None:
    if stage == "method":
        client = Socks5Client(SERVER)
    elif stage == "auth":
        client = Socks5Client(SERVER, username="u", password="p")
        client.receive(b"\x05\x02")
    else:
        client = connecting_client()
    try:
        client.receive(data)
    except (ProtocolError, TunnelError):
        return
    assert client.bytes_needed() >= 0


# --- addresses and UDP -------------------------------------------------------------------------------


def test_destination_name_longer_than_255_bytes_is_refused() -> None:
    with pytest.raises(TunnelError, match="does not fit"):
        encode_address("a" * 256, 80)


def test_port_out_of_range_is_refused() -> None:
    with pytest.raises(TunnelError, match="out of range"):
        encode_address("198.18.0.10", 70000)


_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}\.){0,3}[a-z]{2,6}", fullmatch=True),
)


@settings(max_examples=120, deadline=None)
@given(_hosts, st.integers(min_value=0, max_value=65535), st.binary(max_size=200))
def test_udp_datagram_round_trip(host: str, port: int, payload: bytes) -> None:
    decoded = decode_udp_datagram(encode_udp_datagram(payload, host, port))
    assert (decoded.host, decoded.port, decoded.payload) == (host, port, payload)


def test_udp_datagram_wire_format() -> None:
    assert encode_udp_datagram(b"hi", "198.18.0.10", 53) == b"\x00\x00\x00\x01\xc6\x12\x00\x0a\x00\x35hi"


def test_fragmented_udp_datagram_is_refused() -> None:
    with pytest.raises(FragmentedDatagram):
        decode_udp_datagram(b"\x00\x00\x01\x01\xc6\x12\x00\x0a\x00\x35hi")


@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"\x00\x00\x00\x01\xc6\x12", b"\x00\x00\x00\x07abcdef"])
def test_truncated_or_garbled_udp_header_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_udp_datagram(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=40))
def test_udp_decoder_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_udp_datagram(data)
