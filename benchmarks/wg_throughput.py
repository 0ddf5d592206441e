"""TCP throughput and CPU cost of our userspace WireGuard/AmneziaWG device vs the Go reference clients.

Run as root: ``python3 benchmarks/wg_throughput.py [--seconds 5] [--profile] [--skip-awg] [--skip-kernel]``.

In one lab (network namespaces, veths, 198.18.0.0/15 only), with iperf3 -s in ns web and the peer in
ns wg, it measures, one after the other in the same run (the machine is shared and noisy, so only ratios
within a run mean anything), each contender as the client in ns client:

- ``wireguard-go``: wireguard-go (the Debian package) as the client (the baseline);
- ``ours/wg``: our ``tun`` client against the same wireguard-go peer;
- ``kernel/wg``: our device as a tunnel of the daemon's kernel data path (the router process as ``run``
  builds it, ``benchmarks/split_wg.py``'s ``--serve``), iperf3 under a name a rule sends into the tunnel;
- ``amneziawg-go``: amneziawg-go as the client, AmneziaWG 2.0 parameters, against amneziawg-go;
- ``ours/awg2.0`` and ``kernel/awg2.0``: ours with the same parameters against the same peer;
- ``awg-go/plain`` and ``ours/plain``: amneziawg-go with no parameters as the peer, i.e. WireGuard from the
  current wireguard-go code base (GSO/GRO, TUN offloads), which the Debian ``wireguard-go`` predates:
  amneziawg-go as the client, then ours.

Each is measured upload (client → web) and download (``iperf3 -R``), with one TCP stream and with four
(``iperf3 -P 4``), and reports the client's CPU seconds per GB of TCP payload: the user+system time
(/proc/PID/stat, every thread, children included for the daemon's router process) that the client
process spent during the iperf3 run, divided by the bytes iperf3 moved (its omitted first second
included). The kernel's own softirq work on the UDP and TUN paths is in nobody's process and not counted.
``--profile`` runs our client under cProfile during one extra upload and one extra download and prints
where its time goes.

``--micro`` (no root needed) measures on loopback instead: the per-packet cost of each step of our data
path (TUN-style read, segmenting, padding, encrypt, header and counter, UDP send, UDP receive, decrypt,
replay check, coalescing, TUN-style write, event-loop wakeup), how fast one asyncio wakeup drains a UDP
socket through a ``DatagramProtocol`` vs ``loop.add_reader`` with a ``recvfrom`` loop (why the device
uses the latter), and packets per second through two of our devices (encrypt, UDP, decrypt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import pstats
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from awg_split_tunnel.lab import Lab
from awg_split_tunnel.lab.servers import (
    LabServer,
    WireGuardPeer,
    WireGuardServer,
    generate_keypair,
    start_amneziawg_go,
    start_iperf3,
    start_wireguard_go,
)
from awg_split_tunnel.lab.topology import CLIENT, TUNNEL_CLIENT_IP, WEB_IP
from awg_split_tunnel.platform.linux import tun as linux_tun
from awg_split_tunnel.provider.amneziawg.envelope import envelope_for
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.allowed_ips import AllowedIPs
from awg_split_tunnel.provider.wireguard.device import (
    DatagramSocket,
    DeviceSettings,
    PeerSettings,
    WireGuardDevice,
)
from awg_split_tunnel.provider.wireguard.protocol import PacketsReceived, PeerConfig, WireGuardProtocol
from awg_split_tunnel.provider.wireguard.replay import ReplayWindow

sys.path.insert(0, str(Path(__file__).resolve().parent))
import split_wg  # the daemon's kernel data path as a benchmark client

AWG_PARAMS: dict[str, str | int] = {
    "jc": 3,
    "jmin": 50,
    "jmax": 60,
    "s1": 37,
    "s2": 61,
    "s3": 11,
    "s4": 7,
    "h1": "100-199",
    "h2": "200-299",
    "h3": "300-399",
    "h4": "400-499",
}
AWG_CONF_NAMES = {"jc": "Jc", "jmin": "Jmin", "jmax": "Jmax"}


STREAMS = (1, 4)
DIRECTIONS = (("up", False), ("down", True))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Run:
    """One iperf3 run: Mbit/s (iperf3's own figure, first second omitted) and the client's CPU s/GB."""

    mbit: float
    cpu_per_gb: float | None


@dataclass(slots=True)
class Result:
    name: str
    runs: dict[tuple[str, int], Run]  # (direction, streams)

    def mbit(self, direction: str, streams: int) -> float | None:
        run = self.runs.get((direction, streams))
        return run.mbit if run is not None else None


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of `pid` and its living descendants."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)
        for task in tasks:
            with contextlib.suppress(OSError):
                pending += [int(child) for child in (task / "children").read_text().split()]
    return total


def iperf(
    lab: Lab, seconds: float, reverse: bool, streams: int = 1, exe: str = "iperf3", cpu_pid: int | None = None
) -> Run:
    """One TCP iperf3 run from ns client to the web host, with the CPU `cpu_pid`'s process tree spent."""
    argv = [exe, "-c", WEB_IP, "-t", str(seconds), "-J", "-O", "1", "-P", str(streams)]
    if reverse:
        argv.append("-R")
    cpu_before = process_tree_cpu(cpu_pid) if cpu_pid is not None else 0.0
    done = lab.run(CLIENT, argv, timeout=seconds + 30)
    cpu = process_tree_cpu(cpu_pid) - cpu_before if cpu_pid is not None else None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {"error": f"no JSON: {done.stdout[-300:]} {done.stderr[-300:]}"}
    total = report.get("end", {}).get("sum_received")
    if done.returncode != 0 or "error" in report or total is None:
        raise RuntimeError(f"iperf3 failed: {report.get('error', 'no sum_received in its report')}")
    moved = sum(int(interval["sum"]["bytes"]) for interval in report.get("intervals", ()))
    per_gb = cpu / (moved / 1e9) if cpu is not None and moved else None
    return Run(float(total["bits_per_second"]) / 1e6, per_gb)


def measure(
    lab: Lab, iperf_server: LabServer, name: str, seconds: float, cpu_pid: int, exe: str = "iperf3"
) -> Result:
    """Upload and download, one stream and four; one line printed per stream count.

    The iperf3 server starts afresh for each contender: a test whose last control message died with the
    previous client's tunnel would leave the server "busy running a test" for good."""
    iperf_server.restart()
    result = Result(name, {})
    for streams in STREAMS:
        cells = []
        for direction, reverse in DIRECTIONS:
            try:
                run = iperf(lab, seconds, reverse, streams, exe, cpu_pid)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                cells.append(f"{direction} FAILED ({str(exc)[:80]})")
                continue
            result.runs[(direction, streams)] = run
            cpu = f"{run.cpu_per_gb:5.1f}" if run.cpu_per_gb is not None else "  n/a"
            cells.append(f"{direction} {run.mbit:6.0f} Mbit/s {cpu} CPU s/GB")
        print(f"{name:14s} -P {streams}  " + "   ".join(cells), flush=True)
    return result


def our_conf(private: str, server: WireGuardServer, awg: dict[str, str | int] | None) -> str:
    lines = ["[Interface]", f"PrivateKey = {private}", f"Address = {TUNNEL_CLIENT_IP}/24"]
    for key, value in (awg or {}).items():
        lines.append(f"{AWG_CONF_NAMES.get(key, key.upper())} = {value}")
    lines += ["", "[Peer]", f"PublicKey = {server.public_key}", f"Endpoint = {server.endpoint}"]
    lines += [f"AllowedIPs = {WEB_IP}/32"]
    return "\n".join(lines) + "\n"


class OurClient:
    """Our `tun` command in ns client, optionally under cProfile."""

    def __init__(self, lab: Lab, conf: str, name: str, profile: Path | None = None) -> None:
        self.lab = lab
        self.conf = lab.tmpdir / f"{name}.conf"
        self.conf.write_text(conf)
        self.log = lab.tmpdir / f"{name}.log"
        self.ifname = lab.new_ifname("b")
        argv = [sys.executable]
        if profile is not None:
            argv += ["-m", "cProfile", "-o", str(profile)]
        argv += [
            "-m",
            "awg_split_tunnel.provider.wireguard.tun_client",
            str(self.conf),
            "--ifname",
            self.ifname,
        ]
        with open(self.log, "wb") as out:
            self.process = lab.spawn(CLIENT, argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while " up: " not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"our client did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def go_client(
    lab: Lab, private: str, server: WireGuardServer, awg: dict[str, str | int] | None
) -> WireGuardServer:
    peer = WireGuardPeer(server.public_key, [f"{WEB_IP}/32"], endpoint=server.endpoint)
    address, routes = f"{TUNNEL_CLIENT_IP}/24", [f"{WEB_IP}/32"]
    if awg is None:
        return start_wireguard_go(
            lab,
            host=CLIENT,
            private_key=private,
            peers=[peer],
            listen_port=None,
            address=address,
            routes=routes,
        )
    return start_amneziawg_go(
        lab,
        host=CLIENT,
        private_key=private,
        peers=[peer],
        listen_port=None,
        address=address,
        routes=routes,
        awg_params=awg,
    )


def print_profile(path: Path, title: str) -> None:
    print(f"\n--- cProfile of our client, {title} (top 18 by own time) ---")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(18)


# -- loopback micro-benchmarks -------------------------------------------------------------------------


def _receive_rate(mode: str, count: int = 100_000) -> float:
    """Datagrams per second one receiver takes from a blasting thread, through `mode`."""
    payload = b"x" * 1400

    async def run() -> float:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        received = 0

        def got_one() -> None:
            nonlocal received
            received += 1
            if received == count and not done.done():
                done.set_result(None)

        if mode == "protocol":

            class Receiver(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                    got_one()

            transport, _ = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
            sock = transport.get_extra_info("socket")
            close = transport.close
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)

            def drain() -> None:
                for _ in range(256):
                    try:
                        sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    got_one()

            loop.add_reader(sock.fileno(), drain)

            def close() -> None:
                loop.remove_reader(sock.fileno())
                sock.close()

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        port = sock.getsockname()[1]
        stop = threading.Event()

        def blast() -> None:
            out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.connect(("127.0.0.1", port))
            while not stop.is_set():
                for _ in range(64):
                    with contextlib.suppress(OSError):
                        out.send(payload)
                time.sleep(0)
            out.close()

        thread = threading.Thread(target=blast)
        start = time.perf_counter()
        thread.start()
        try:
            await asyncio.wait_for(done, 60)
        finally:
            stop.set()
            thread.join()
            close()
        return count / (time.perf_counter() - start)

    return asyncio.run(run())


def _udp_packet(src: str, dst: str, size: int) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0, b"", b""))
    header[12:16] = ipaddress.IPv4Address(src).packed
    header[16:20] = ipaddress.IPv4Address(dst).packed
    return bytes(header) + struct.pack("!HHHH", 1, 2, size - 20, 0) + bytes(size - 28)


def _device_rate(count: int = 100_000, size: int = 1420) -> tuple[float, float]:
    """IP packets per second from one of our devices to another on loopback: (sender side alone,
    end to end including the receiver's decryption)."""

    async def run() -> tuple[float, float]:
        a_key, b_key = crypto.generate_private_key(), crypto.generate_private_key()
        received = 0
        done = asyncio.get_running_loop().create_future()

        def sink(packets: list[bytes]) -> None:
            nonlocal received
            received += len(packets)
            if received >= count * 0.95 and not done.done():
                done.set_result(None)

        b = WireGuardDevice(
            DeviceSettings(
                b_key, (PeerSettings(crypto.public_key(a_key), (ipaddress.ip_network("10.9.0.1/32"),)),)
            ),
            on_packets=sink,
            bind_host="127.0.0.1",
        )
        await b.start()
        a = WireGuardDevice(
            DeviceSettings(
                a_key,
                (
                    PeerSettings(
                        crypto.public_key(b_key),
                        (ipaddress.ip_network("10.9.0.2/32"),),
                        endpoint=("127.0.0.1", b.port),
                    ),
                ),
            ),
            bind_host="127.0.0.1",
        )
        await a.start()
        a.connect()
        while a.state != "up":
            await asyncio.sleep(0.01)
        packet = _udp_packet("10.9.0.1", "10.9.0.2", size)
        batch = [packet] * 64
        start = time.perf_counter()
        sent = 0
        while sent < count:
            a.send_packets(batch)
            sent += len(batch)
            await asyncio.sleep(0)  # let the receiver drain its socket
        send_time = time.perf_counter() - start
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, 30)
        total_time = time.perf_counter() - start
        await a.stop()
        await b.stop()
        return sent / send_time, received / total_time

    return asyncio.run(run())


def _tcp_segments(count: int, mss: int = 1380) -> list[bytes]:
    """`count` consecutive full-size segments of one IPv4 TCP flow 10.9.0.1 → 10.9.0.2 (ACK set)."""
    out = []
    for i in range(count):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + mss, 0, 0x4000, 64, 6, 0, bytes([10, 9, 0, 1]), b"")
        ip = ip[:16] + bytes([10, 9, 0, 2])
        tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000 + i * mss, 1, 5 << 4, 0x10, 512, 0, 0)
        out.append(ip + tcp + bytes(mss))
    return out


def _per_item(work: Callable[[], int], seconds: float = 0.7, spells: int = 7) -> float:
    """µs per item of `work` (which returns how many items it did), the best of `spells` timed spells
    (the best, so that other processes taking the CPU for a moment do not count)."""
    best = float("inf")
    for _ in range(spells):
        items, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / spells:
            items += work()
        best = min(best, elapsed / items * 1e6)
    return best


def _protocol_pair(awg: bool) -> tuple[WireGuardProtocol, WireGuardProtocol, bytes]:
    """Two sans-I/O cores with a completed handshake, the first the sender: (sender, receiver, the
    receiver's public key)."""
    keys = crypto.generate_private_key(), crypto.generate_private_key()

    def core(key: bytes) -> WireGuardProtocol:
        envelope = None
        if awg:
            envelope = envelope_for(AmneziaParams.from_mapping(dict(AWG_PARAMS)))
        return WireGuardProtocol(key, envelope=envelope)

    a, b = core(keys[0]), core(keys[1])
    pa, pb = crypto.public_key(keys[0]), crypto.public_key(keys[1])
    a.add_peer(PeerConfig(pb, endpoint=("127.0.0.2", 2)), 0.0)
    b.add_peer(PeerConfig(pa, endpoint=("127.0.0.1", 1)), 0.0)
    a.initiate_handshake(pb, 1.0)
    b.receive_datagrams(a.datagrams_to_send(), 1.0)
    a.receive_datagrams(b.datagrams_to_send(), 1.0)
    if a.peers[pb].keypairs.current is None:
        raise RuntimeError("the in-memory handshake did not complete")
    return a, b, pb


def _tun_costs(batch: int = 64) -> dict[str, float]:
    """µs per packet of TUN reads and writes on a real TUN (vnet header on, as the `tun` client opens
    it), in a network namespace of its own: run as ``unshare -n`` by `breakdown`."""
    dev = linux_tun.Tun.open("bench0", vnet_hdr=True, read_offload=False)
    linux_tun.set_link(dev.name, mtu=1420, up=True)
    linux_tun.add_address(dev.name, ipaddress.ip_interface("10.9.0.2/24"))
    os.set_blocking(dev.fd, False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    out.connect(("10.9.0.1", 9))
    payload = bytes(1420 - 28)
    read_time = 0.0
    read_packets = 0
    for _ in range(200):
        for _ in range(batch):
            out.send(payload)  # routed into the TUN: one 1420-byte packet waits for us each
        start = time.perf_counter()
        got = dev.read_packets(batch)
        read_time += time.perf_counter() - start
        read_packets += len(got)
    segments = _tcp_segments(batch)
    # Addressed to us: the kernel takes them up to TCP (no socket there: it answers with a RST).
    inbound = [p[:12] + bytes([10, 9, 0, 1, 10, 9, 0, 2]) + p[20:] for p in segments]
    inbound = [p[:10] + linux_tun.checksum(p[:20]).to_bytes(2, "big") + p[12:] for p in inbound]
    costs = {"tun_read": read_time / read_packets * 1e6}
    coalesced = linux_tun.coalesce_tcp(inbound)
    costs["coalesce"] = _per_item(lambda: len(linux_tun.coalesce_tcp(inbound)) and len(inbound))

    def write_merged() -> int:
        for header, packet in coalesced:
            os.writev(dev.fd, [header, packet])
        return len(inbound)

    def write_single() -> int:
        for packet in inbound:
            dev.write_packet(packet)
        return len(inbound)

    costs["tun_write_merged"] = _per_item(write_merged)
    costs["tun_write_single"] = _per_item(write_single)
    dev.close()
    return costs


def _udp_costs(batch: int = 64, size: int = 1452) -> dict[str, float]:
    """µs per datagram of UDP sends (one by one, and as one GSO write) and receives (one by one, and
    as GRO super-datagrams split in Python), on loopback through our `DatagramSocket`."""
    receiver = DatagramSocket.bind(0, "127.0.0.1")
    sender = DatagramSocket.bind(0, "127.0.0.1")
    endpoint = ("127.0.0.1", receiver.port)
    datagrams = [(bytes(size), endpoint)] * batch
    costs: dict[str, float] = {}
    for mode in ("single", "gso"):
        sender.gso = mode == "gso"
        send_time = receive_time = 0.0
        sent = received = 0
        for _ in range(300):
            start = time.perf_counter()
            sender.send_batch(datagrams)
            middle = time.perf_counter()
            got = receiver.receive_batch(4 * batch)
            receive_time += time.perf_counter() - middle
            send_time += middle - start
            sent += batch
            received += len(got)
        costs[f"udp_send_{mode}"] = send_time / sent * 1e6
        costs[f"udp_receive_{mode}"] = receive_time / max(received, 1) * 1e6
    receiver.close()
    sender.close()
    return costs


def _loop_wakeup_cost() -> float:
    """µs per `loop.add_reader` wakeup of asyncio's selector loop (dispatch, epoll, one 1-byte read and
    write to stay readable)."""

    async def run() -> float:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        left.setblocking(False)
        right.send(b"x")
        count, total = 0, 20_000
        done = loop.create_future()

        def readable() -> None:
            nonlocal count
            left.recv(1)
            count += 1
            if count == total:
                done.set_result(None)
            else:
                right.send(b"x")

        loop.add_reader(left.fileno(), readable)
        start = time.perf_counter()
        await done
        elapsed = time.perf_counter() - start
        loop.remove_reader(left.fileno())
        left.close()
        right.close()
        return elapsed / total * 1e6

    return asyncio.run(run())


def _core_costs(segments: list[bytes], awg: bool) -> tuple[float, float]:
    """µs per packet through the sans-I/O core: sending (pad, encrypt, frame, counters, timers) and
    receiving (classify, decrypt, replay window, checks, events), 64 packets per call."""
    a, b, pb = _protocol_pair(awg)
    now = 2.0

    def core_send() -> int:
        a.send_packets(pb, segments, now)
        a.datagrams_to_send()
        return len(segments)

    send = _per_item(core_send)
    a.send_packets(pb, segments, now)
    b.receive_datagrams(a.datagrams_to_send()[:1], now)  # the first message confirms b's keypair
    (peer,) = b.peers.values()
    keypair = peer.keypairs.current
    assert keypair is not None
    runs = []
    for _ in range(100):
        a.send_packets(pb, segments, now)
        runs.append(a.datagrams_to_send())
    best = float("inf")
    for _ in range(7):  # the same datagrams each spell, the replay window emptied before it
        keypair.replay.reset()
        start = time.perf_counter()
        delivered = 0
        for run in runs:
            events = b.receive_datagrams(run, now)
            delivered += sum(len(e.ip_packets) for e in events if isinstance(e, PacketsReceived))
        best = min(best, (time.perf_counter() - start) / delivered * 1e6)
    return send, best


def breakdown() -> dict[str, float]:
    """µs per packet of each step of our data path (1420-byte IP packets, 64 per batch)."""
    costs: dict[str, float] = {}
    segments = _tcp_segments(64)
    key, nonce, counter = os.urandom(32), bytearray(12), 0
    aead = ChaCha20Poly1305(key)
    plaintext = segments[0]
    sealed = aead.encrypt(bytes(nonce), plaintext, None)
    out = bytearray(len(sealed))
    costs["encrypt"] = _per_item(lambda: [aead.encrypt(nonce, plaintext, None) for _ in range(64)] and 64)
    costs["encrypt_into"] = _per_item(
        lambda: [aead.encrypt_into(nonce, plaintext, None, out) for _ in range(64)] and 64
    )
    view = memoryview(sealed)
    costs["decrypt"] = _per_item(lambda: [aead.decrypt(nonce, view, None) for _ in range(64)] and 64)
    window = ReplayWindow()

    def replay() -> int:
        nonlocal counter
        validate = window.validate
        for c in range(counter, counter + 64):
            validate(c, 1 << 63)
        counter += 64
        return 64

    costs["replay"] = _per_item(replay)
    header = linux_tun.VNET_HDR.pack(0, linux_tun.VIRTIO_NET_HDR_GSO_TCPV4, 40, 1380, 20, 16)
    big = bytearray(segments[0][:40]) + bytes(1380 * 40)
    struct.pack_into("!H", big, 2, len(big))
    super_packet = memoryview(header + bytes(big))
    costs["segment"] = _per_item(lambda: len(linux_tun.offload_segments(super_packet)))
    table: AllowedIPs[bytes] = AllowedIPs()
    table.insert(ipaddress.ip_network("10.9.0.0/24"), b"peer")
    costs["route_lookup"] = _per_item(lambda: len(table.lookup_destinations(segments)))
    for awg in (False, True):
        tag = "awg" if awg else "wg"
        costs[f"core_send_{tag}"], costs[f"core_receive_{tag}"] = _core_costs(segments, awg)
    costs.update(_udp_costs())
    costs["loop_wakeup"] = _loop_wakeup_cost()
    if os.geteuid() == 0 and shutil.which("unshare"):
        code = "import json, wg_throughput; print(json.dumps(wg_throughput._tun_costs()))"
        done = subprocess.run(
            ["unshare", "-n", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parent,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            check=False,
        )
        if done.returncode == 0:
            costs.update(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            print(f"TUN costs not measured: {done.stderr.strip()[-300:]}")
    return costs


def print_breakdown(costs: dict[str, float], batch: int = 64) -> None:
    """The per-packet table, and what one core's worth of each direction adds up to."""
    rows = [
        ("TUN read (readv, one packet per call)", "tun_read"),
        ("TUN read offload: cutting a TSO super-packet, per segment", "segment"),
        ("AllowedIPs lookup of a batch (destinations or sources)", "route_lookup"),
        ("encrypt, ChaCha20Poly1305.encrypt 1420 B", "encrypt"),
        ("encrypt_into a preallocated buffer", "encrypt_into"),
        ("core send per packet, WireGuard (encrypt + header, counter, padding, timers)", "core_send_wg"),
        ("core send per packet, AmneziaWG 2.0", "core_send_awg"),
        ("UDP send, one sendto per datagram", "udp_send_single"),
        ("UDP send, one GSO sendmsg per 64 datagrams", "udp_send_gso"),
        ("UDP receive, one recvmsg per datagram", "udp_receive_single"),
        ("UDP receive, GRO super-datagram split in Python", "udp_receive_gso"),
        ("decrypt, ChaCha20Poly1305.decrypt 1436 B", "decrypt"),
        ("replay window check", "replay"),
        ("core receive per packet, WireGuard (decrypt + replay + checks + events)", "core_receive_wg"),
        ("core receive per packet, AmneziaWG 2.0", "core_receive_awg"),
        ("TCP coalescing (userspace GRO) per segment", "coalesce"),
        ("TUN write, coalesced super-packet, per segment", "tun_write_merged"),
        ("TUN write, one packet per writev", "tun_write_single"),
        ("event-loop wakeup (add_reader dispatch), per wakeup", "loop_wakeup"),
    ]
    print("| step | µs per packet |")
    print("|---|---|")
    for label, key in rows:
        value = costs.get(key)
        print(f"| {label} | {value:.2f} |" if value is not None else f"| {label} | n/a |")
    derived = (
        (
            "header, counter, padding, framing, timers (core send − encrypt), WireGuard",
            "core_send_wg",
            "encrypt",
        ),
        ("the same, AmneziaWG 2.0", "core_send_awg", "encrypt"),
        (
            "classify, header, endpoint, IP checks, events (core receive − decrypt − replay), WireGuard",
            "core_receive_wg",
            "decrypt",
        ),
        ("the same, AmneziaWG 2.0", "core_receive_awg", "decrypt"),
    )
    for label, total, part in derived:
        value = costs[total] - costs[part] - (costs["replay"] if "receive" in total else 0.0)
        print(f"| {label} | {value:.2f} |")
    wakeup = costs["loop_wakeup"] / batch
    lookup = costs["route_lookup"]
    for tag in ("wg", "awg"):
        up = costs.get("tun_read", 0.0) + lookup + costs[f"core_send_{tag}"] + costs["udp_send_gso"] + wakeup
        down = (
            costs["udp_receive_gso"]
            + costs[f"core_receive_{tag}"]
            + lookup  # the source check against AllowedIPs
            + costs["coalesce"]
            + costs.get("tun_write_merged", 0.0)
            + wakeup
        )
        for name, total in (("upload", up), ("download", down)):
            ceiling = 1e6 / total * 1380 * 8 / 1e6
            print(
                f"{tag} {name}: {total:.2f} µs per data packet -> at most {ceiling:.0f} Mbit/s of TCP "
                "payload on one core (before the other direction's ACKs and the kernel's own work)"
            )


def micro() -> None:
    print_breakdown(breakdown())
    print()
    protocol = _receive_rate("protocol")
    reader = _receive_rate("reader")
    print(f"UDP receive, DatagramProtocol      {protocol / 1000:8.0f} kpps")
    print(f"UDP receive, add_reader + drain     {reader / 1000:8.0f} kpps   ratio {reader / protocol:.1f}")
    sent, through = _device_rate()
    print(
        f"our device, 1420-byte packets: sender {sent / 1000:.0f} kpps, end to end {through / 1000:.0f} kpps"
    )
    print(f"  = {through * 1420 * 8 / 1e6:.0f} Mbit/s of IP packets on one core pair (loopback, no TUN)")


class KernelPathClient:
    """Our device as a tunnel of the daemon's kernel data path, in ns client (split_wg.py's ``--serve``):
    iperf3 copied under the name the rule sends into the tunnel."""

    def __init__(self, lab: Lab, conf: str, tunnel: str) -> None:
        self.process = split_wg.start_daemon(lab, conf, tunnel, "kernel")
        self.exe = str(lab.tmpdir / f"iperf-{tunnel}")
        if not os.path.exists(self.exe):
            shutil.copy2(shutil.which("iperf3") or "iperf3", self.exe)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        split_wg.stop_daemon(self.process)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--profile", action="store_true", help="also profile our client with cProfile")
    parser.add_argument("--skip-awg", action="store_true", help="WireGuard only")
    parser.add_argument("--skip-kernel", action="store_true", help="leave out the daemon's kernel data path")
    parser.add_argument("--micro", action="store_true", help="loopback micro-benchmarks only (no root)")
    args = parser.parse_args()
    if args.micro:
        micro()
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    results: dict[str, Result] = {}
    seconds = args.seconds
    with Lab() as lab:
        iperf_server = start_iperf3(lab)
        client_private, client_public = generate_keypair()
        # Every client initiates: the peer learns each one's endpoint from its handshake.
        server_peer = [WireGuardPeer(client_public, [f"{TUNNEL_CLIENT_IP}/32"])]

        server = start_wireguard_go(lab, peers=server_peer, log_level="error")
        go = go_client(lab, client_private, server, None)
        results["wg-go"] = measure(lab, iperf_server, "wireguard-go", seconds, _pid(go))
        go.stop()
        ours = OurClient(lab, our_conf(client_private, server, None), "ours-wg")
        results["ours"] = measure(lab, iperf_server, "ours/wg", seconds, ours.pid)
        ours.stop()
        if not args.skip_kernel:
            kernel = KernelPathClient(lab, split_wg.conf_text(client_private, server), "wg")
            results["kernel"] = measure(lab, iperf_server, "kernel/wg", seconds, kernel.pid, kernel.exe)
            kernel.stop()
        if args.profile:
            for reverse, title in ((False, "upload"), (True, "download")):
                profile = lab.tmpdir / f"profile-{title}.out"
                ours = OurClient(lab, our_conf(client_private, server, None), f"prof-{title}", profile)
                iperf(lab, seconds, reverse)
                ours.stop()
                print_profile(profile, title)
        server.stop()

        if not args.skip_awg:
            awg_server = start_amneziawg_go(lab, peers=server_peer, awg_params=AWG_PARAMS, log_level="error")
            awg_go = go_client(lab, client_private, awg_server, AWG_PARAMS)
            results["awg-go"] = measure(lab, iperf_server, "amneziawg-go", seconds, _pid(awg_go))
            awg_go.stop()
            ours = OurClient(lab, our_conf(client_private, awg_server, AWG_PARAMS), "ours-awg")
            results["ours-awg"] = measure(lab, iperf_server, "ours/awg2.0", seconds, ours.pid)
            ours.stop()
            if not args.skip_kernel:
                conf = split_wg.conf_text(client_private, awg_server, awg=_conf_params(AWG_PARAMS))
                kernel = KernelPathClient(lab, conf, "awg")
                results["kernel-awg"] = measure(
                    lab, iperf_server, "kernel/awg2.0", seconds, kernel.pid, kernel.exe
                )
                kernel.stop()
            awg_server.stop()
            # amneziawg-go with no parameters is WireGuard on the wire, built from the current
            # wireguard-go code base (UDP GSO/GRO, TUN offloads): the modern WireGuard baseline.
            modern_server = start_amneziawg_go(lab, peers=server_peer, awg_params={}, log_level="error")
            modern = go_client(lab, client_private, modern_server, {})
            results["modern-go"] = measure(lab, iperf_server, "awg-go/plain", seconds, _pid(modern))
            modern.stop()
            ours = OurClient(lab, our_conf(client_private, modern_server, None), "ours-plain")
            results["ours-plain"] = measure(lab, iperf_server, "ours/plain", seconds, ours.pid)
            ours.stop()
            modern_server.stop()

    print()
    print_table(results)
    print()
    for ours_key, go_key in (
        ("ours", "wg-go"),
        ("kernel", "wg-go"),
        ("ours-awg", "awg-go"),
        ("kernel-awg", "awg-go"),
        ("ours-plain", "modern-go"),
    ):
        print_ratio(results, ours_key, go_key)
    return 0


def _pid(server: WireGuardServer) -> int:
    pid = server.server.pid
    if pid is None:
        raise RuntimeError(f"{server.server.name} is not running")
    return pid


def _conf_params(params: dict[str, str | int]) -> dict[str, str]:
    return {AWG_CONF_NAMES.get(key, key.upper()): str(value) for key, value in params.items()}


def print_table(results: dict[str, Result]) -> None:
    """Markdown table: Mbit/s and CPU s/GB per contender, direction and stream count."""
    columns = [(d, n) for n in STREAMS for d, _ in DIRECTIONS]
    head = " | ".join(f"{d} -P{n} Mbit/s (CPU s/GB)" for d, n in columns)
    print(f"| contender | {head} |")
    print("|---" * (len(columns) + 1) + "|")
    for result in results.values():
        cells = []
        for column in columns:
            run = result.runs.get(column)
            if run is None:
                cells.append("failed")
            else:
                cpu = f"{run.cpu_per_gb:.1f}" if run.cpu_per_gb is not None else "n/a"
                cells.append(f"{run.mbit:.0f} ({cpu})")
        print(f"| {result.name} | " + " | ".join(cells) + " |")


def print_ratio(results: dict[str, Result], a: str, b: str) -> None:
    if a not in results or b not in results:
        return
    ra, rb = results[a], results[b]
    parts = []
    for streams in STREAMS:
        for direction, _ in DIRECTIONS:
            x, y = ra.mbit(direction, streams), rb.mbit(direction, streams)
            parts.append(f"{direction} -P{streams} " + (f"{x / y:.2f}" if x and y else "n/a"))
    print(f"{ra.name} / {rb.name}: " + ", ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
