"""The UAPI protocol (docs/UAPI.md): what `wg`/`awg` send is parsed into requests, answers are built as
wireguard-go and amneziawg-go write them, and no input makes the parser raise."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard.uapi import (
    BadRequest,
    DeviceState,
    GetRequest,
    PeerChange,
    PeerState,
    SetRequest,
    UapiConnection,
    format_errno,
    format_get,
)
from awg_split_tunnel.provider.wireguard.value_range import Range

PRIVATE = bytes(range(1, 33))
PEER = bytes(range(0x40, 0x60))
PEER_HEX = PEER.hex()
PSK = bytes([7]) * 32


def requests(data: bytes) -> list[object]:
    return list(UapiConnection().receive(data))


# -- get ------------------------------------------------------------------------------------------------


def test_get_is_a_get_request() -> None:
    assert requests(b"get=1\n\n") == [GetRequest()]


def test_get_answer_matches_what_wireguard_go_writes() -> None:
    state = DeviceState(
        private_key=PRIVATE,
        listen_port=51820,
        fwmark=0,
        peers=(
            PeerState(
                public_key=PEER,
                preshared_key=PSK,
                endpoint=("198.18.0.40", 51820),
                last_handshake=1_700_000_000.25,
                rx_bytes=1234,
                tx_bytes=5678,
                persistent_keepalive=Range(25, 25),
                allowed_ips=(ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_network("2001:2::/48")),
            ),
        ),
    )
    assert (
        format_get(state)
        == (
            f"private_key={PRIVATE.hex()}\n"
            "listen_port=51820\n"
            f"public_key={PEER_HEX}\n"
            f"preshared_key={PSK.hex()}\n"
            "protocol_version=1\n"
            "endpoint=198.18.0.40:51820\n"
            "last_handshake_time_sec=1700000000\n"
            "last_handshake_time_nsec=250000000\n"
            "tx_bytes=5678\n"
            "rx_bytes=1234\n"
            "persistent_keepalive_interval=25\n"
            "allowed_ip=198.19.0.0/24\n"
            "allowed_ip=2001:2::/48\n"
            "errno=0\n\n"
        ).encode()
    )


def test_a_peer_without_handshake_psk_or_endpoint_reports_zeros() -> None:
    text = format_get(DeviceState(PRIVATE, peers=(PeerState(PEER),))).decode()
    assert f"preshared_key={'0' * 64}\n" in text
    assert "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n" in text
    assert "endpoint=" not in text and "listen_port=" not in text and "persistent_keepalive" not in text


def test_an_ipv6_endpoint_is_written_in_brackets() -> None:
    text = format_get(DeviceState(PRIVATE, peers=(PeerState(PEER, endpoint=("2001:2::40", 51820)),))).decode()
    assert "endpoint=[2001:2::40]:51820\n" in text


def test_an_amneziawg_device_reports_its_parameters_as_amneziawg_go_does() -> None:
    params = AmneziaParams.from_mapping(
        {"Jc": "3", "Jmin": "50", "Jmax": "60", "S1": "37", "S2": "61", "H1": "100-199", "H2": "200",
         "H3": "300", "H4": "400", "I1": "<b 0xc0ffee><r 5>", "RekeyTimeout": "3"}
    )  # fmt: skip
    text = format_get(DeviceState(PRIVATE, listen_port=1, amnezia=params)).decode()
    assert text.split("\n")[2:17] == [
        "jc=3", "jmin=50", "jmax=60", "s1=37", "s2=61", "h1=100-199", "h2=200", "h3=300", "h4=400",
        "i1=<b 0xc0ffee><r 5>", "rekey_timeout=3", "random_trailers=0", "disable_cookies=0", "errno=0", "",
    ]  # fmt: skip


def test_a_wireguard_device_reports_no_amneziawg_keys() -> None:
    text = format_get(DeviceState(PRIVATE)).decode()
    assert text == f"private_key={PRIVATE.hex()}\nerrno=0\n\n"


def test_keys_stay_out_of_reprs() -> None:
    assert PRIVATE.hex() not in repr(DeviceState(PRIVATE))
    assert repr(PRIVATE) not in repr(DeviceState(PRIVATE))
    assert repr(PSK) not in repr(PeerState(PEER, preshared_key=PSK))
    assert repr(PRIVATE) not in repr(SetRequest(private_key=PRIVATE))


# -- set ------------------------------------------------------------------------------------------------

WG_SET = (
    "set=1\n"
    f"private_key={PRIVATE.hex()}\n"
    "listen_port=51820\n"
    "fwmark=0\n"
    "replace_peers=true\n"
    f"public_key={PEER_HEX}\n"
    f"preshared_key={PSK.hex()}\n"
    "endpoint=[2001:2::40]:51820\n"
    "persistent_keepalive_interval=25\n"
    "replace_allowed_ips=true\n"
    "allowed_ip=198.19.0.0/24\n"
    "allowed_ip=-198.19.0.128/25\n"
    "\n"
).encode()


def test_set_as_wg_setconf_sends_it() -> None:
    assert requests(WG_SET) == [
        SetRequest(
            private_key=PRIVATE,
            listen_port=51820,
            fwmark=0,
            replace_peers=True,
            peers=(
                PeerChange(
                    PEER,
                    preshared_key=PSK,
                    endpoint=("2001:2::40", 51820),
                    persistent_keepalive=Range(25, 25),
                    replace_allowed_ips=True,
                    allowed_ips=(
                        (True, ipaddress.ip_network("198.19.0.0/24")),
                        (False, ipaddress.ip_network("198.19.0.128/25")),
                    ),
                ),
            ),
        )
    ]


def test_set_parses_the_same_whatever_the_chunks() -> None:
    connection = UapiConnection()
    out = []
    for byte in WG_SET + b"get=1\n\n":
        out += connection.receive(bytes([byte]))
    assert out == [*requests(WG_SET), GetRequest()]


def test_peer_blocks_keep_their_order_and_flags() -> None:
    other = bytes(32 * [9])
    data = (
        f"set=1\npublic_key={PEER_HEX}\nremove=true\npublic_key={other.hex()}\nupdate_only=true\n"
        "endpoint=198.18.0.41:51820\npersistent_keepalive_interval=0\n\n"
    ).encode()
    (request,) = requests(data)
    assert isinstance(request, SetRequest)
    assert request.peers == (
        PeerChange(PEER, remove=True),
        PeerChange(
            other, update_only=True, endpoint=("198.18.0.41", 51820), persistent_keepalive=Range(0, 0)
        ),
    )


def test_replace_allowed_ips_replaces_the_prefixes_given_before_it_too() -> None:
    data = f"set=1\npublic_key={PEER_HEX}\nallowed_ip=10.0.0.0/8\nreplace_allowed_ips=true\n\n".encode()
    (request,) = requests(data)
    assert isinstance(request, SetRequest)
    assert request.peers[0].allowed_ips == () and request.peers[0].replace_allowed_ips


def test_amneziawg_keys_are_kept_as_sent() -> None:
    data = b"set=1\njc=4\nh1=100-200\ni1=<b 0xc0ffee><r 5>\nrandom_trailers=1\n\n"
    (request,) = requests(data)
    assert isinstance(request, SetRequest)
    assert request.amnezia == (
        ("jc", "4"),
        ("h1", "100-200"),
        ("i1", "<b 0xc0ffee><r 5>"),
        ("random_trailers", "1"),
    )


# -- errors ---------------------------------------------------------------------------------------------


def test_errors_answer_the_errno_wireguard_go_answers_and_the_connection_goes_on() -> None:
    bad = {
        b"listen_port=70000": -22,
        b"listen_port=+5": -22,
        b"fwmark=-1": -22,
        b"replace_peers=false": -22,
        b"private_key=" + b"0" * 64: -22,
        b"private_key=" + PRIVATE.hex().upper().encode(): -22,
        b"no_such_key=1": -22,
        b"jc=many": -22,
        b"h1=5-1": -22,
        b"a line without an equals sign": -71,
        b"\xff\xfe=1": -22,
        f"public_key={PEER_HEX}\nendpoint=198.18.0.40".encode(): -22,
        f"public_key={PEER_HEX}\nendpoint=2001:2::40:51820".encode(): -22,
        f"public_key={PEER_HEX}\nendpoint=[198.18.0.40]:1".encode(): -22,
        f"public_key={PEER_HEX}\nendpoint=host.example:51820".encode(): -22,
        f"public_key={PEER_HEX}\nallowed_ip=198.19.0.0".encode(): -22,
        f"public_key={PEER_HEX}\nallowed_ip=198.19.0.0/33".encode(): -22,
        f"public_key={PEER_HEX}\nremove=yes".encode(): -22,
        f"public_key={PEER_HEX}\nprotocol_version=2".encode(): -22,
        f"public_key={PEER_HEX}\npersistent_keepalive_interval=70000".encode(): -22,
        f"public_key={PEER_HEX}\nlisten_port=1".encode(): -22,
        b"public_key=abc": -22,
    }
    for line, code in bad.items():
        connection = UapiConnection()
        got = connection.receive(b"set=1\n" + line + b"\nlisten_port=1\n\nget=1\n\n")
        assert got == [BadRequest(code, got[0].reason), GetRequest()], line  # type: ignore[union-attr]
        assert not connection.closed


def test_an_unknown_operation_is_answered_and_ends_the_connection() -> None:
    connection = UapiConnection()
    assert connection.receive(b"put=1\n\nget=1\n\n") == [
        BadRequest(-71, "unknown operation (expected get=1 or set=1)", fatal=True)
    ]
    assert connection.closed
    assert connection.receive(b"get=1\n\n") == []


def test_trailing_bytes_after_get_end_the_connection() -> None:
    connection = UapiConnection()
    (answer,) = connection.receive(b"get=1\nx\n")
    assert isinstance(answer, BadRequest) and answer.code == -22 and answer.fatal


def test_an_endless_line_is_refused_without_buffering_it() -> None:
    connection = UapiConnection(max_line=100)
    assert connection.receive(b"set=1\n" + b"x" * 50) == []
    (answer,) = connection.receive(b"x" * 60)
    assert isinstance(answer, BadRequest) and answer.code == -71 and answer.fatal


def test_a_set_request_of_too_many_lines_is_refused() -> None:
    connection = UapiConnection(max_set_lines=3)
    (answer,) = connection.receive(b"set=1\n" + b"listen_port=1\n" * 4)
    assert isinstance(answer, BadRequest) and answer.fatal


def test_errno_line() -> None:
    assert format_errno(0) == b"errno=0\n\n"
    assert format_errno(-22) == b"errno=-22\n\n"


def test_the_private_key_never_appears_in_an_error() -> None:
    for line in (f"private_key={PRIVATE.hex()}x", f"public_key={PEER_HEX}\npreshared_key={PSK.hex()}z"):
        (answer,) = requests(f"set=1\n{line}\n\n".encode())
        assert isinstance(answer, BadRequest)
        assert PRIVATE.hex() not in answer.reason and PSK.hex() not in answer.reason


# -- fuzz -----------------------------------------------------------------------------------------------

LINES = st.sampled_from(
    [b"get=1", b"set=1", b"", f"public_key={PEER_HEX}".encode(), b"endpoint=1.2.3.4:5",
     b"allowed_ip=10.0.0.0/8", b"jc=3", b"h1=1-2", b"remove=true", b"x", b"=", b"listen_port=99999",
     b"i1=<b 0x"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), LINES), max_size=30), st.data())
def test_no_input_makes_the_parser_raise_and_chunking_changes_nothing(
    parts: list[bytes], data: st.DataObject
) -> None:
    stream = b"\n".join(parts)
    whole = UapiConnection(max_line=64).receive(stream)
    for request in whole:
        assert isinstance(request, GetRequest | SetRequest | BadRequest)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunked = UapiConnection(max_line=64)
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += chunked.receive(stream[start:end])
    if not any(isinstance(r, BadRequest) and r.fatal for r in whole):
        assert out == whole
