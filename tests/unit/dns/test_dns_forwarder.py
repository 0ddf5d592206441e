"""The forwarder's answers as an app gets them: its route, the cache, SERVFAIL while down, TCP after TC.

No lab: the app's owner and exe are given, and the tunnel is a fake SOCKS5-like provider whose UDP
channel and TCP connections reach an in-process DNS server (TCP on loopback).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from awg_split_tunnel.core.config import parse_config
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.dns_forwarder import DnsForwarder
from awg_split_tunnel.process.lookup import ExeResolver
from awg_split_tunnel.provider.interface import Address, QueuedUdpChannel, StreamPair, StreamProvider

APP_PID, BLOCKED_PID, UNKNOWN_PID = 9_000_001, 9_000_002, 9_000_003
EXES = {APP_PID: "/usr/bin/app-socks", BLOCKED_PID: "/usr/bin/app-dead"}
SERVER = "192.0.2.53"
CONFIG = f"""
tunnels:
  - {{id: socks, type: socks5, server: "192.0.2.1:1080", dns: [{SERVER}]}}
  - {{id: dead, type: socks5, server: "192.0.2.2:1080", dns: [{SERVER}]}}
rules:
  - {{process: app-socks, tunnel: socks, fallback: block}}
  - {{process: app-dead, tunnel: dead, fallback: block}}
"""
BIG_RECORDS = 20


def server_answer(wire: bytes, *, tcp: bool) -> bytes:
    """The upstream: ``big.test.`` does not fit 512 bytes (TC over UDP), every name gets one TXT."""
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    name = query.question[0].name
    count = BIG_RECORDS if name.to_text() == "big.test." else 1
    response.answer.append(
        dns.rrset.from_text(name, 60, "IN", "TXT", *(f'"r{i:02d}{"x" * 40}"' for i in range(count)))
    )
    if tcp:
        return bytes(response.to_wire())
    try:
        return bytes(response.to_wire(max_size=512))
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        return bytes(response.to_wire())


class Channel(QueuedUdpChannel):
    def __init__(self, sent: list[tuple[str, Address]]) -> None:
        super().__init__("fake")
        self._sent = sent

    def send_to(self, data: bytes, dst: Address) -> None:
        self._sent.append(("udp", dst))
        self._deliver(server_answer(data, tcp=False), dst)

    def close(self) -> None:
        self._shutdown("closed")


class Provider(StreamProvider):
    kind = "fake SOCKS5"

    def __init__(self, tcp_port: int) -> None:
        self.sent: list[tuple[str, Address]] = []
        self._tcp_port = tcp_port

    @property
    def server(self) -> Address:
        return ("192.0.2.1", 1080)

    @property
    def supports_udp(self) -> bool:
        return True

    async def open_udp(self) -> Channel:
        return Channel(self.sent)

    async def open_tcp(self, host: str, port: int) -> StreamPair:
        self.sent.append(("tcp", (host, port)))
        return await asyncio.open_connection("127.0.0.1", self._tcp_port)

    async def probe_connection(self) -> StreamPair:
        raise NotImplementedError


class Exes(ExeResolver):
    def exe(self, pid: int) -> str | None:
        return EXES.get(pid)

    def ancestors(self, pid: int) -> tuple[str, ...]:
        return ()


async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    length = struct.unpack("!H", await reader.readexactly(2))[0]
    answer = server_answer(await reader.readexactly(length), tcp=True)
    writer.write(struct.pack("!H", len(answer)) + answer)
    await writer.drain()
    writer.close()


def query(name: str, message_id: int = 0x2222, payload: int | None = None) -> bytes:
    message = dns.message.make_query(
        name, "TXT", use_edns=-1 if payload is None else 0, payload=payload or 512
    )
    message.id = message_id
    return bytes(message.to_wire())


Run = Callable[..., "dns.message.Message"]


@pytest.fixture
def forwarder(tmp_path: Path) -> Iterator[tuple[DnsForwarder, Provider, Run]]:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(serve_tcp, "127.0.0.1", 0))
    provider = Provider(server.sockets[0].getsockname()[1])
    states = {"socks": TunnelState.UP, "dead": TunnelState.DOWN}
    owners: dict[int, int | None] = {}
    scans: list[int] = []

    def owner_of(proto: int, addr: bytes, port: int, raddr: bytes, rport: int) -> int | None:
        scans.append(port)
        return owners.get(port)

    forwarder = DnsForwarder(
        states.get,
        lambda tunnel_id: provider if tunnel_id == "socks" else None,
        0,
        clock=lambda: 1000.0,
        owner_of=owner_of,
        owns=lambda pid, proto, port, raddr, rport: owners.get(port) == pid,
        exes=Exes(),
    )

    def config(text: str) -> None:
        forwarder.set_config(parse_config(text, file="config.yaml", base_dir=tmp_path))

    config(CONFIG)

    def run(
        pid: int | None, wire: bytes, *, tcp: bool = False, system: str | None = None
    ) -> dns.message.Message:
        if system is not None:
            config(CONFIG + f"dns: {{system: {system}}}\n")
        owners[40000] = pid
        answer = loop.run_until_complete(
            forwarder.answer(wire, ("127.0.0.1", 40000), "127.0.0.53", 6 if tcp else 17)
        )
        assert answer is not None
        return dns.message.from_wire(answer)

    run.scans = scans  # type: ignore[attr-defined]
    yield forwarder, provider, run
    server.close()
    loop.close()


def test_an_apps_lookup_goes_through_its_tunnel_and_the_next_asker_gets_it_from_the_cache(
    forwarder: tuple[DnsForwarder, Provider, Run],
) -> None:
    dnsf, provider, run = forwarder
    first = run(APP_PID, query("a.test.", 1))
    assert first.id == 1 and first.rcode() == dns.rcode.NOERROR and first.answer
    assert provider.sent == [("udp", (SERVER, 53))]
    again = run(APP_PID, query("a.test.", 2))
    assert again.id == 2 and again.answer[0] == first.answer[0]
    assert provider.sent == [("udp", (SERVER, 53))]  # nothing asked again
    assert (dnsf.counters["socks"].answered, dnsf.counters["socks"].cached) == (1, 1)
    assert dnsf.tunnel_report("socks")["servers"] == [SERVER]
    (row, _) = dnsf.lookups()
    assert (row["pid"], row["exe"], row["tunnel"], row["route"]) == (
        APP_PID,
        EXES[APP_PID],
        "socks",
        "tunnel",
    )


def test_a_block_app_whose_tunnel_is_down_gets_servfail_and_nothing_is_sent(
    forwarder: tuple[DnsForwarder, Provider, Run],
) -> None:
    dnsf, provider, run = forwarder
    answer = run(BLOCKED_PID, query("a.test."))
    assert answer.rcode() == dns.rcode.SERVFAIL and not answer.answer
    assert provider.sent == [] and dnsf.counters["dead"].refused == 1
    assert dnsf.lookups()[-1]["route"] == "drop"


def test_a_truncated_answer_is_asked_over_tcp_and_given_whole_when_it_fits_the_apps_size(
    forwarder: tuple[DnsForwarder, Provider, Run],
) -> None:
    _, provider, run = forwarder
    whole = run(APP_PID, query("big.test.", payload=4096))
    assert len(whole.answer[0]) == BIG_RECORDS and not whole.flags & dns.flags.TC
    assert provider.sent == [("udp", (SERVER, 53)), ("tcp", (SERVER, 53))]


def test_an_app_without_edns_gets_tc_and_its_tcp_retry_is_answered_from_the_cache(
    forwarder: tuple[DnsForwarder, Provider, Run],
) -> None:
    _, provider, run = forwarder
    truncated = run(APP_PID, query("big.test."))
    assert truncated.flags & dns.flags.TC and not truncated.answer
    asked = list(provider.sent)
    retry = run(APP_PID, query("big.test."), tcp=True)
    assert len(retry.answer[0]) == BIG_RECORDS and provider.sent == asked


def test_a_lookup_whose_app_is_unknown_follows_dns_system(
    forwarder: tuple[DnsForwarder, Provider, Run],
) -> None:
    _, provider, run = forwarder
    assert run(UNKNOWN_PID, query("a.test."), system="socks").answer
    assert provider.sent == [("udp", (SERVER, 53))]
    assert run(None, query("b.test."), system="dead").rcode() == dns.rcode.SERVFAIL


def test_what_is_not_a_query_gets_no_answer(forwarder: tuple[DnsForwarder, Provider, Run]) -> None:
    dnsf, provider, _ = forwarder
    loop = asyncio.new_event_loop()
    try:
        assert (
            loop.run_until_complete(dnsf.answer(b"\x00\x01junk", ("127.0.0.1", 1), "127.0.0.53", 17)) is None
        )
    finally:
        loop.close()
    assert dnsf.malformed == 1 and provider.sent == []


def test_a_process_that_asked_before_is_found_without_scanning_every_process(
    forwarder: tuple[DnsForwarder, Provider, Run],
) -> None:
    _, _, run = forwarder
    run(APP_PID, query("a.test."))
    run(APP_PID, query("b.test."))
    run(BLOCKED_PID, query("c.test."))
    assert run.scans == [40000, 40000]  # type: ignore[attr-defined]  # the first of each app only


def test_local_resolvers_are_found_by_their_sockets_on_loopback_port_53(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    import psutil

    from awg_split_tunnel.dns_forwarder import LocalResolver, find_local_resolvers

    def conn(
        ip: str, port: int, pid: int | None, remote: tuple[str, int] | tuple[()] = ()
    ) -> SimpleNamespace:
        return SimpleNamespace(laddr=SimpleNamespace(ip=ip, port=port), raddr=remote, pid=pid)

    sockets = [
        conn("127.0.0.53", 53, 500),  # systemd-resolved
        conn("127.0.0.54", 53, 500),
        conn("::1", 53, 600),  # dnsmasq on IPv6 loopback
        conn("0.0.0.0", 53, 700),  # a DNS server for the LAN, not a local stub
        conn("127.0.0.1", 5353, 800),  # another port
        conn("127.0.0.1", 53, 900, ("127.0.0.1", 40000)),  # a connected socket, not a listener
    ]
    monkeypatch.setattr(psutil, "net_connections", lambda kind: sockets)
    assert find_local_resolvers() == [
        LocalResolver("127.0.0.53", 500),
        LocalResolver("127.0.0.54", 500),
        LocalResolver("::1", 600),
    ]
