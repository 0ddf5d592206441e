"""WireGuardDevice over loopback: two of our devices talk, route by AllowedIPs, filter sources, roam, and
report state; plus the TUN offload arithmetic the device relies on when attached to a TUN."""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.core.events import EventBus, TunnelStateChanged
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.platform.linux import tun
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.conf import parse_conf
from awg_split_tunnel.provider.wireguard.device import (
    DatagramSocket,
    DeviceSettings,
    PeerSettings,
    WireGuardDevice,
    normalize_endpoint,
)
from awg_split_tunnel.provider.wireguard.timers import TimerSettings
from awg_split_tunnel.provider.wireguard.tun_client import plan_routes, run_tun_client
from awg_split_tunnel.provider.wireguard.value_range import Range

CLIENT_NET = ipaddress.ip_network("198.19.0.2/32")
SERVER_NET = ipaddress.ip_network("198.19.0.0/24")


def udp_packet(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    total = 28 + len(payload)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, b"", b""))
    header[12:16] = ipaddress.IPv4Address(src).packed
    header[16:20] = ipaddress.IPv4Address(dst).packed
    header[10:12] = tun.checksum(header).to_bytes(2, "big")
    return bytes(header) + struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload


class Pair:
    """A client device (initiator, knows the endpoint) and a server device (responder) on loopback."""

    def __init__(self, amnezia: AmneziaParams | None = None, timers: TimerSettings | None = None) -> None:
        self.client_key = crypto.generate_private_key()
        self.server_key = crypto.generate_private_key()
        self.received_by_server: list[bytes] = []
        self.received_by_client: list[bytes] = []
        self.bus = EventBus()
        self.states: list[TunnelStateChanged] = []
        self.bus.subscribe(TunnelStateChanged, self.states.append)
        self.server = WireGuardDevice(
            DeviceSettings(
                self.server_key,
                (PeerSettings(crypto.public_key(self.client_key), (CLIENT_NET,)),),
                amnezia=amnezia,
            ),
            tunnel_id="server",
            on_packets=self.received_by_server.extend,
            bind_host="127.0.0.1",
            timers=timers,
        )
        self.amnezia = amnezia
        self.timers = timers
        self.client: WireGuardDevice | None = None

    async def start(self, server_port: int | None = None) -> WireGuardDevice:
        await self.bus.start()
        await self.server.start()
        port = self.server.port if server_port is None else server_port
        self.client = WireGuardDevice(
            DeviceSettings(
                self.client_key,
                (
                    PeerSettings(
                        crypto.public_key(self.server_key), (SERVER_NET,), endpoint=("127.0.0.1", port)
                    ),
                ),
                amnezia=self.amnezia,
            ),
            tunnel_id="client",
            bus=self.bus,
            on_packets=self.received_by_client.extend,
            bind_host="127.0.0.1",
            timers=self.timers,
        )
        await self.client.start()
        return self.client

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
        await self.server.stop()
        await asyncio.sleep(0)
        await self.bus.stop()


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 20))


def test_packet_crosses_after_handshake_and_state_goes_up() -> None:
    async def scenario() -> None:
        pair = Pair()
        client = await pair.start()
        try:
            packet = udp_packet("198.19.0.2", "198.19.0.1", b"first")
            client.send_packets([packet])  # queued until the handshake completes, then sent
            await wait_for(lambda: pair.received_by_server == [packet])
            assert client.state is TunnelState.UP
            await wait_for(lambda: any(s.new is TunnelState.UP for s in pair.states))
            reply = udp_packet("198.19.0.1", "198.19.0.2", b"reply")
            pair.server.send_packets([reply])
            await wait_for(lambda: pair.received_by_client == [reply])
            stats = {p.public_key: p for p in client.peer_statistics()}
            peer = stats[crypto.public_key(pair.server_key)]
            assert peer.last_handshake is not None
            assert peer.endpoint == ("127.0.0.1", pair.server.port)
            assert peer.tx_packets >= 1 and peer.rx_packets == 1
            totals = client.statistics()
            assert totals.rx_bytes == peer.rx_bytes > 0 and totals.tx_bytes == peer.tx_bytes > 0
        finally:
            await pair.stop()
        assert client.state is TunnelState.DOWN

    run(scenario)


def test_many_packets_arrive_in_order_and_complete() -> None:
    async def scenario() -> None:
        pair = Pair()
        client = await pair.start()
        try:
            client.connect()
            await wait_for(lambda: client.state is TunnelState.UP)
            packets = [udp_packet("198.19.0.2", "198.19.0.1", bytes([i]) * 1300) for i in range(200)]
            for i in range(0, 200, 40):
                client.send_packets(packets[i : i + 40])
                await asyncio.sleep(0.01)
            await wait_for(lambda: len(pair.received_by_server) == 200)
            assert pair.received_by_server == packets
        finally:
            await pair.stop()

    run(scenario)


def test_packets_without_a_route_or_with_a_foreign_source_are_dropped() -> None:
    async def scenario() -> None:
        pair = Pair()
        client = await pair.start()
        try:
            client.connect()
            await wait_for(lambda: client.state is TunnelState.UP)
            client.send_packets([udp_packet("198.19.0.2", "198.18.5.5")])  # outside every AllowedIPs
            assert client.stats.dropped_no_route == 1
            # The client may reach 198.19.0.0/24, but the server only accepts 198.19.0.2 as its source.
            client.send_packets([udp_packet("198.19.0.3", "198.19.0.1")])
            await wait_for(lambda: pair.server.stats.dropped_source == 1)
            assert pair.received_by_server == []
        finally:
            await pair.stop()

    run(scenario)


def test_server_follows_a_roaming_client() -> None:
    async def scenario() -> None:
        pair = Pair()
        client = await pair.start()
        try:
            client.connect()
            await wait_for(lambda: client.state is TunnelState.UP)
            first = client.port
            # The client's socket changes (a new network, NAT rebinding): same keys, new source port.
            await client.stop()
            await client.start()
            assert client.port != first
            client.send_packets([udp_packet("198.19.0.2", "198.19.0.1", b"moved")])
            await wait_for(lambda: len(pair.received_by_server) == 1)
            pair.server.send_packets([udp_packet("198.19.0.1", "198.19.0.2", b"found you")])
            await wait_for(lambda: len(pair.received_by_client) == 1)
            (server_view,) = pair.server.peer_statistics()
            assert server_view.endpoint == ("127.0.0.1", client.port)
        finally:
            await pair.stop()

    run(scenario)


def test_unanswered_handshakes_take_the_tunnel_down() -> None:
    async def scenario() -> None:
        quick = TimerSettings(
            rekey_timeout=Range.single(1), max_handshake_attempts=Range.single(1), jitter_max=0.0
        )
        pair = Pair(timers=quick)
        # Nobody listens where the client sends its initiations.
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        client = await pair.start(server_port=silent.getsockname()[1])
        try:
            client.connect()
            assert client.state is TunnelState.CONNECTING
            await wait_for(lambda: client.state is TunnelState.DOWN, timeout=8)
            silent.setblocking(False)
            initiations = 0
            while True:
                try:
                    silent.recv(2048)
                except BlockingIOError:
                    break
                initiations += 1
            assert initiations >= 2  # first try plus retransmissions
            await wait_for(lambda: pair.states[-1].new is TunnelState.DOWN)
        finally:
            silent.close()
            await pair.stop()

    run(scenario)


def test_amneziawg_devices_talk_with_obfuscation() -> None:
    params = AmneziaParams.from_mapping(
        {
            "Jc": 3,
            "Jmin": 50,
            "Jmax": 60,
            "S1": 37,
            "S2": 61,
            "S3": 11,
            "S4": 7,
            "H1": "100-199",
            "H2": "200-299",
            "H3": "300-399",
            "H4": "400-499",
            "I1": "<b 0xc0ffee><r 5><t>",
        }
    )

    async def scenario() -> None:
        pair = Pair(amnezia=params)
        client = await pair.start()
        try:
            packet = udp_packet("198.19.0.2", "198.19.0.1", b"obfuscated")
            client.send_packets([packet])
            await wait_for(lambda: pair.received_by_server == [packet])
        finally:
            await pair.stop()

    run(scenario)


def test_hostile_datagrams_are_counted_not_raised() -> None:
    async def scenario() -> None:
        pair = Pair()
        await pair.start()
        try:
            attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for junk in (b"", b"\x01", b"\x01\x00\x00\x00" + bytes(144), b"\x04\x00\x00\x00" + bytes(60)):
                attacker.sendto(junk, ("127.0.0.1", pair.server.port))
            attacker.close()
            await wait_for(lambda: sum(pair.server.core.dropped.values()) >= 3)
            assert pair.received_by_server == []
        finally:
            await pair.stop()

    run(scenario)


def test_gso_batch_reaches_the_receiver_as_separate_datagrams() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2)
    sender = DatagramSocket.bind(0, "127.0.0.1")
    try:
        target = ("127.0.0.1", receiver.getsockname()[1])
        datagrams = [(bytes([i]) * 1000, target) for i in range(10)] + [(b"tail", target)]
        sent, dropped = sender.send_batch(datagrams)
        assert (sent, dropped) == (11, 0)
        got = [receiver.recv(4096) for _ in range(11)]
        assert got == [d for d, _ in datagrams]
    finally:
        sender.close()
        receiver.close()


def test_gro_receive_splits_a_coalesced_batch_back_into_datagrams() -> None:
    receiver = DatagramSocket.bind(0, "127.0.0.1")
    sender = DatagramSocket.bind(0, "127.0.0.1")
    try:
        target = ("127.0.0.1", receiver.port)
        datagrams = [(bytes([i]) * 1200, target) for i in range(20)] + [(b"last", target)]
        assert sender.send_batch(datagrams) == (21, 0)
        got: list[bytes] = []
        deadline = time.monotonic() + 2
        while len(got) < 21 and time.monotonic() < deadline:
            got += [data for data, _ in receiver.receive_batch()]
        assert got == [d for d, _ in datagrams]
        assert receiver.receive_batch() == []
    finally:
        sender.close()
        receiver.close()


def test_ipv4_mapped_sources_are_reported_as_ipv4() -> None:
    assert normalize_endpoint(("::ffff:198.18.0.1", 51820, 0, 0)) == ("198.18.0.1", 51820)
    assert normalize_endpoint(("2001:2::1", 51820, 0, 0)) == ("2001:2::1", 51820)


# --- the `tun` command's error paths (provider/wireguard/tun_client.py) ------------------------------


def test_tun_command_needs_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text("[Interface]\nPrivateKey = " + base64.b64encode(bytes(32)).decode() + "\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_tun_client(conf, "wgtest0") == 1
    assert "needs root" in capsys.readouterr().err


def test_tun_command_names_the_file_and_line_of_a_bad_conf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[Interface]\nPrivateKey = not-a-key\n")
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    assert run_tun_client(conf, "wgtest0") == 1
    err = capsys.readouterr().err
    assert "bad.conf:2" in err and "PrivateKey" in err


def test_routes_follow_allowed_ips_like_wg_quick() -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    conf = parse_conf(
        f"[Interface]\nPrivateKey = {key}\n[Peer]\nPublicKey = {key}\n"
        "AllowedIPs = 198.19.0.0/24, 0.0.0.0/0, 198.19.0.7/32, ::/0\n"
    )
    plan = plan_routes(conf)
    assert [str(n) for n in plan.routes] == ["198.19.0.7/32", "198.19.0.0/24"]
    assert plan.default_families == [4, 6] and plan.fwmark == 51820
    off = parse_conf(
        f"[Interface]\nPrivateKey = {key}\nTable = off\n[Peer]\nPublicKey = {key}\nAllowedIPs = ::/0\n"
    )
    assert plan_routes(off).routes == [] and plan_routes(off).default_families == []


# --- TUN offload arithmetic (platform/linux/tun.py) ------------------------------------------------


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_valid(segment: bytes, version: int) -> bool:
    if version == 4:
        ihl = (segment[0] & 0x0F) * 4
        pseudo = segment[12:20] + struct.pack("!BBH", 0, 6, len(segment) - ihl)
        if reference_checksum(segment[:ihl]) not in (0, 0xFFFF):
            return False
    else:
        ihl = 40
        pseudo = segment[8:40] + struct.pack("!IxxxB", len(segment) - 40, 6)
    return reference_checksum(pseudo + segment[ihl:]) in (0, 0xFFFF)


def tcp_super_packet(payload: bytes, version: int, flags: int = 0x19) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 0xFFFFFF00, 7, 5 << 4, flags, 65535, 0, 0)
    if version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0xFFFE, 0x4000, 64, 6, 0, b"", b"")
        ip = ip[:12] + bytes([198, 18, 0, 1, 198, 19, 0, 1])
    else:
        ip = struct.pack("!IHBB", 0x60000000, 20 + len(payload), 6, 64)
        ip += ipaddress.IPv6Address("2001:2::1").packed + ipaddress.IPv6Address("2001:2::2").packed
    return ip + tcp + payload


@settings(max_examples=40, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=9000),
    mss=st.integers(min_value=500, max_value=1460),
    version=st.sampled_from([4, 6]),
)
def test_tso_super_packets_become_valid_mss_segments(payload: bytes, mss: int, version: int) -> None:
    packet = tcp_super_packet(payload, version)
    gso_type = tun.VIRTIO_NET_HDR_GSO_TCPV4 if version == 4 else tun.VIRTIO_NET_HDR_GSO_TCPV6
    ip_len = 20 if version == 4 else 40
    header = tun.VNET_HDR.pack(tun.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, ip_len + 20, mss, ip_len, 16)
    segments = tun.offload_segments(memoryview(header + packet))
    assert len(segments) == -(-len(payload) // mss)
    assert b"".join(s[ip_len + 20 :] for s in segments) == payload
    for i, segment in enumerate(segments):
        assert tcp_valid(segment, version)
        seq = struct.unpack_from("!I", segment, ip_len + 4)[0]
        assert seq == (0xFFFFFF00 + i * mss) & 0xFFFFFFFF  # sequence numbers wrap like TCP's
        flags = segment[ip_len + 13]
        last = i == len(segments) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last  # FIN, PSH only at the end
        if version == 4:
            assert struct.unpack_from("!H", segment, 2)[0] == len(segment)
            assert struct.unpack_from("!H", segment, 4)[0] == (0xFFFE + i) & 0xFFFF
        else:
            assert struct.unpack_from("!H", segment, 4)[0] == len(segment) - 40


def test_partial_checksum_is_completed() -> None:
    packet = bytearray(tcp_super_packet(b"abc" * 100, 4, flags=0x18))
    # What the kernel hands over with CHECKSUM_PARTIAL: the pseudo-header sum in the checksum field.
    pseudo = bytes(packet[12:20]) + struct.pack("!BBH", 0, 6, len(packet) - 20)
    partial = ~reference_checksum(pseudo) & 0xFFFF
    packet[36:38] = partial.to_bytes(2, "big")
    packet[10:12] = reference_checksum(bytes(packet[:20])).to_bytes(2, "big")
    header = tun.VNET_HDR.pack(tun.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    (done,) = tun.offload_segments(memoryview(header + bytes(packet)))
    assert tcp_valid(done, 4)


def test_unsupported_offload_is_refused() -> None:
    header = tun.VNET_HDR.pack(0, 3, 28, 1000, 20, 6)  # UDP fragmentation offload: never enabled by us
    with pytest.raises(ValueError):
        tun.offload_segments(memoryview(header + udp_packet("198.18.0.1", "198.18.0.2")))


def tcp_stream(payload: bytes, mss: int, version: int, psh_every: int = 0) -> list[bytes]:
    """The MSS-size segments a sender would put on the wire for `payload` (valid checksums)."""
    segments = []
    for i, offset in enumerate(range(0, len(payload), mss)):
        chunk = payload[offset : offset + mss]
        flags = 0x10 | (0x08 if psh_every and (i + 1) % psh_every == 0 else 0)
        seg = bytearray(tcp_super_packet(chunk, version, flags=flags))
        ip_len = 20 if version == 4 else 40
        struct.pack_into("!I", seg, ip_len + 4, (0xFFFFFF00 + offset) & 0xFFFFFFFF)
        if version == 4:
            struct.pack_into("!H", seg, 4, (0xFFFE + i) & 0xFFFF)
            seg[10:12] = reference_checksum(bytes(seg[:20])).to_bytes(2, "big")
            pseudo = bytes(seg[12:20]) + struct.pack("!BBH", 0, 6, len(seg) - 20)
        else:
            pseudo = bytes(seg[8:40]) + struct.pack("!IxxxB", len(seg) - 40, 6)
        seg[ip_len + 16 : ip_len + 18] = reference_checksum(pseudo + bytes(seg[ip_len:])).to_bytes(2, "big")
        segments.append(bytes(seg))
    return segments


@settings(max_examples=30, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=12000),
    mss=st.integers(min_value=500, max_value=1400),
    version=st.sampled_from([4, 6]),
    psh_every=st.sampled_from([0, 3]),
)
def test_gro_merges_a_tcp_run_that_segments_back_to_the_same_packets(
    payload: bytes, mss: int, version: int, psh_every: int
) -> None:
    segments = tcp_stream(payload, mss, version, psh_every)
    assert all(tcp_valid(s, version) for s in segments)
    merged = tun.coalesce_tcp(segments)
    if not psh_every:
        per_run = (65535 - (40 if version == 4 else 60)) // mss  # a super-packet is one IP packet
        assert len(merged) == -(-len(segments) // per_run)
    rebuilt: list[bytes] = []
    for header, packet in merged:
        rebuilt += tun.offload_segments(memoryview(header + packet))
    assert rebuilt == segments


def test_gro_keeps_other_packets_in_place_and_separate_flows_apart() -> None:
    a = tcp_stream(b"a" * 3000, 1000, 4)
    other = udp_packet("198.18.0.1", "198.18.0.2")
    b = tcp_stream(b"b" * 2000, 1000, 6)
    merged = tun.coalesce_tcp([a[0], a[1], other, a[2], *b])
    assert [len(tun.offload_segments(memoryview(h + p))) for h, p in merged] == [2, 1, 1, 2]
    assert merged[1] == (bytes(tun.VNET_HDR_SIZE), other)


def test_a_conf_file_builds_the_device_it_describes() -> None:
    key = base64.b64encode(crypto.generate_private_key()).decode()
    peer = base64.b64encode(crypto.public_key(crypto.generate_private_key())).decode()
    plain = parse_conf(
        f"[Interface]\nPrivateKey = {key}\nListenPort = 51999\nMTU = 1380\n"
        f"[Peer]\nPublicKey = {peer}\nEndpoint = localhost:51820\nAllowedIPs = 198.19.0.0/24\n"
        "PersistentKeepalive = 0\n"
    )
    device = WireGuardDevice.from_conf(plain)
    (settings,) = device.settings.peers
    assert settings.endpoint in {("127.0.0.1", 51820), ("::1", 51820)}  # resolved once, as wg does
    assert settings.persistent_keepalive is None  # 0 = off
    assert device.settings.listen_port == 51999 and device.core.mtu == 1380
    assert device.log_tag == "[WG]"
    assert device.allowed_ips.lookup("198.19.0.77") == settings.public_key
    amnezia = parse_conf(
        f"[Interface]\nPrivateKey = {key}\nJc = 3\nJmin = 50\nJmax = 60\nS1 = 37\nS2 = 61\nH1 = 100-199\n"
        f"[Peer]\nPublicKey = {peer}\nAllowedIPs = ::/0\n"
    )
    assert WireGuardDevice.from_conf(amnezia).log_tag == "[AWG]"


def test_a_conf_with_an_unworkable_amneziawg_set_is_refused() -> None:
    key = base64.b64encode(crypto.generate_private_key()).decode()
    peer = base64.b64encode(crypto.public_key(crypto.generate_private_key())).decode()
    broken = parse_conf(
        f"[Interface]\nPrivateKey = {key}\nH1 = 5\nH2 = 5\n[Peer]\nPublicKey = {peer}\nAllowedIPs = ::/0\n"
    )
    with pytest.raises(ConfigError):
        WireGuardDevice.from_conf(broken)


class PathLimitedSocket:
    """A loopback UDP socket behind a path that carries `limit` bytes of UDP payload in one packet, as the
    kernel treats it (scripts/repro/udp_gso_bigger_than_mtu.py): a GSO write of bigger segments fails
    with EMSGSIZE and sends nothing; a plain send of any size goes (the kernel fragments it)."""

    def __init__(self, inner: socket.socket, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def sendmsg(self, buffers: list[bytes], ancdata: list[tuple[int, int, bytes]], *rest: Any) -> int:
        for level, kind, data in ancdata:
            if (level, kind) == (socket.SOL_UDP, 103) and struct.unpack("H", data)[0] > self.limit:
                self.refused += 1
                raise OSError(errno.EMSGSIZE, "Message too long")
        return int(self.inner.sendmsg(buffers, ancdata, *rest))


def test_datagrams_bigger_than_the_path_go_fragmented_one_by_one_and_the_mtu_is_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A tunnel MTU too big for the path (a PPPoE or mobile uplink, or AmneziaWG's S4 on top of 1420):
    every packet still arrives, in order — before, each GSO batch was refused whole and dropped, so only
    the handshake got through — and the log says once to lower the MTU."""
    sockets: list[PathLimitedSocket] = []
    bind = DatagramSocket.bind.__func__  # type: ignore[attr-defined]

    def limited(cls: type[DatagramSocket], *args: Any, **kwargs: Any) -> DatagramSocket:
        real = bind(cls, *args, **kwargs)
        sockets.append(PathLimitedSocket(real.sock, 1400))
        return cls(sockets[-1])  # type: ignore[arg-type]

    monkeypatch.setattr(DatagramSocket, "bind", classmethod(limited))

    async def scenario() -> None:
        pair = Pair()
        client = await pair.start()
        try:
            client.connect()
            await wait_for(lambda: client.state is TunnelState.UP)
            # 1408-byte IP packets: 1440-byte transport datagrams, 40 bytes over the path.
            packets = [udp_packet("198.19.0.2", "198.19.0.1", bytes([i]) * 1380) for i in range(60)]
            with caplog.at_level(logging.WARNING, logger="awg_split_tunnel.wireguard"):
                client.send_packets(packets[:30])
                await asyncio.sleep(0.05)
                client.send_packets(packets[30:])
                await wait_for(lambda: len(pair.received_by_server) == 60)
            assert pair.received_by_server == packets
            assert client.statistics().dropped_send_error == 0
            warnings = [r.getMessage() for r in caplog.records if "bigger than the network path" in r.message]
            assert len(warnings) == 1 and "1440 bytes" in warnings[0] and "MTU (now 1420)" in warnings[0]
            assert sockets[-1].refused == 1  # GSO was tried once for that size, then no more
        finally:
            await pair.stop()

    run(scenario)
