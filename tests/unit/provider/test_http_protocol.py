"""HTTP CONNECT negotiation, Basic auth and response parsing, from byte vectors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.errors import ProtocolError, TunnelError
from awg_split_tunnel.provider.httpproxy.protocol import (
    Established,
    HttpConnectClient,
    HttpProbe,
    HttpProxyRefused,
    basic_credentials,
)

SERVER = "198.18.0.30:3128"
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


def client(
    host: str = "198.18.0.10", port: int = 443, username: str | None = None, password: str | None = None
) -> HttpConnectClient:
    return HttpConnectClient(SERVER, host, port, username=username, password=password)


def test_request_without_credentials() -> None:
    assert client().outgoing() == b"CONNECT 198.18.0.10:443 HTTP/1.1\r\nHost: 198.18.0.10:443\r\n\r\n"


def test_request_is_sent_once() -> None:
    c = client()
    c.outgoing()
    assert c.outgoing() == b""


def test_ipv6_target_is_bracketed() -> None:
    assert client("2001:2::10", 443).outgoing().startswith(b"CONNECT [2001:2::10]:443 HTTP/1.1\r\n")


def test_basic_auth_header() -> None:
    request = client(username="alice", password="secret").outgoing()
    assert b"\r\nProxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n" in request
    assert basic_credentials("alice", "secret") == "Basic YWxpY2U6c2VjcmV0"


def test_target_with_header_injection_is_refused() -> None:
    with pytest.raises(TunnelError, match="not a valid host"):
        client("evil\r\nX-Injected: 1", 80)


def test_200_establishes_the_tunnel() -> None:
    c = client()
    [event] = c.receive(OK)
    assert event.response.status == 200 and event.leftover == b"" and c.done


def test_bytes_after_the_blank_line_belong_to_the_tunnel() -> None:
    [event] = client().receive(b"HTTP/1.0 200 OK\r\nVia: tinyproxy\r\n\r\n\x16\x03\x01server-first")
    assert event.leftover == b"\x16\x03\x01server-first"
    assert event.response.header("VIA") == "tinyproxy"


def test_any_2xx_is_success() -> None:
    [event] = client().receive(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert event.response.status == 204


def test_header_split_over_many_reads() -> None:
    c = client()
    for byte in OK[:-1]:
        assert c.receive(bytes((byte,))) == []
    assert len(c.receive(OK[-1:])) == 1


def test_bare_lf_line_endings_are_accepted() -> None:
    [event] = client().receive(b"HTTP/1.1 200 OK\nProxy-Agent: x\n\nrest")
    assert event.leftover == b"rest"


def test_interim_1xx_response_is_skipped() -> None:
    [event] = client().receive(b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"x")
    assert event.response.status == 200 and event.leftover == b"x"


def test_407_without_credentials_asks_for_them() -> None:
    with pytest.raises(HttpProxyRefused, match="requires authentication; set username and password") as e:
        client().receive(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n")
    assert e.value.status == 407


def test_407_with_credentials_says_they_were_rejected() -> None:
    with pytest.raises(HttpProxyRefused, match="rejected the credentials"):
        client(username="alice", password="x").receive(b"HTTP/1.1 407 Unauthorized\r\n\r\n")


@pytest.mark.parametrize(
    ("status", "shown"), [(b"403 Forbidden", "403 Forbidden"), (b"502 Bad Gateway", "502 Bad Gateway")]
)
def test_non_2xx_reply_names_the_status(status: bytes, shown: str) -> None:
    with pytest.raises(HttpProxyRefused) as caught:
        client().receive(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    assert str(caught.value) == f"HTTP proxy {SERVER} refused CONNECT 198.18.0.10:443: {shown}"


@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n",
    ],
)
def test_malformed_responses_are_protocol_errors(response: bytes) -> None:
    with pytest.raises(ProtocolError):
        client().receive(response)


def test_oversized_header_without_end_is_refused() -> None:
    c = HttpConnectClient(SERVER, "198.18.0.10", 443, max_header_bytes=1024)
    c.receive(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProtocolError, match="over 1024 bytes"):
        c.receive(b"X-Filler: " + b"a" * 2000)


def test_oversized_header_arriving_whole_is_refused() -> None:
    c = HttpConnectClient(SERVER, "198.18.0.10", 443, max_header_bytes=1024)
    with pytest.raises(ProtocolError, match="over 1024 bytes"):
        c.receive(b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 2000 + b"\r\n\r\n")


def test_too_many_header_lines_are_refused() -> None:
    with pytest.raises(ProtocolError, match="header lines"):
        client().receive(b"HTTP/1.1 200 OK\r\n" + b"A: 1\r\n" * 200 + b"\r\n")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=16), min_size=1, max_size=20))
def test_response_split_anywhere_keeps_the_tunnel_bytes(cuts: list[int]) -> None:
    stream = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: t\r\n\r\nTUNNEL-BYTES"
    c = client()
    events: list[Established] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        if pos >= len(stream) or c.done:
            break
        events += c.receive(stream[pos : pos + size])
        pos += size
    assert len(events) == 1
    assert events[0].leftover + stream[pos:] == b"TUNNEL-BYTES"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError, TunnelError):
        client().receive(data)


def test_probe_accepts_any_http_status_line() -> None:
    probe = HttpProbe(SERVER)
    assert probe.receive(b"HTTP/1.0 400 Ba") is False
    assert probe.receive(b"d Request\r\n") is True


def test_probe_refuses_a_non_http_server() -> None:
    with pytest.raises(ProtocolError, match="does not answer in HTTP"):
        HttpProbe(SERVER).receive(b"\x05\x00")


HOSTILE = (b"\x1b[31mEVIL\x1b[0m\x00\x07\r\x7f\x9b\xff" * 700)[:10_000]
"""A 10 kB reply text of control characters, ANSI escapes and high bytes (no line break)."""


def _assert_shown_safely(message: str, prefix: str) -> None:
    assert message.startswith(prefix)
    shown = message[len(prefix) :].strip('"')
    assert 0 < len(shown) <= 120
    assert shown.isprintable() and "\x1b" not in shown


def test_hostile_reason_phrase_is_cut_and_made_printable() -> None:
    with pytest.raises(HttpProxyRefused) as caught:
        client().receive(b"HTTP/1.1 403 " + HOSTILE + b"\r\n\r\n")
    _assert_shown_safely(str(caught.value), f"HTTP proxy {SERVER} refused CONNECT 198.18.0.10:443: 403 ")


def test_hostile_status_line_is_cut_and_made_printable() -> None:
    with pytest.raises(ProtocolError) as caught:
        client().receive(b"HTTP/1.1 " + HOSTILE + b"\r\n\r\n")
    _assert_shown_safely(str(caught.value), f"HTTP proxy {SERVER} sent a malformed status line: ")


def test_hostile_header_line_is_cut_and_made_printable() -> None:
    with pytest.raises(ProtocolError) as caught:
        client().receive(b"HTTP/1.1 200 OK\r\n" + HOSTILE + b"\r\n\r\n")
    _assert_shown_safely(str(caught.value), f"HTTP proxy {SERVER} sent a malformed header line: ")


def test_hostile_407_reason_is_cut_and_made_printable() -> None:
    with pytest.raises(HttpProxyRefused) as caught:
        client().receive(b"HTTP/1.1 407 " + HOSTILE + b"\r\n\r\n")
    message = str(caught.value)
    shown = message.split("(407 ", 1)[1].removesuffix(")")
    assert len(shown) <= 120 and shown.isprintable()
