"""Single-stream TCP throughput through our userspace WireGuard/AmneziaWG client vs wireguard-go.

Run as root: ``python3 benchmarks/wg_throughput.py [--seconds 5] [--profile] [--skip-awg]``.

In one lab (network namespaces, veths, 198.18.0.0/15 only), with iperf3 -s in ns web and the peer in
ns wg, it measures, one after the other in the same run (the machine is shared and noisy, so only ratios
within a run mean anything):

- ``wireguard-go``: wireguard-go as the client too (the baseline);
- ``ours/wg``: our ``tun`` client against the same wireguard-go peer;
- ``ours/awg2.0``: our client with an AmneziaWG 2.0 parameter set against amneziawg-go;
- ``amneziawg-go``: amneziawg-go as the client too, same parameters (the AmneziaWG baseline);
- ``awg-go/plain``: amneziawg-go pair with no parameters, i.e. WireGuard from the current wireguard-go code
  base (with its GSO/GRO offloads), which the Debian ``wireguard-go`` package predates.

Each is measured upload (client → web) and download (``iperf3 -R``). ``--profile`` runs our client under
cProfile during one extra upload and one extra download and prints where its time goes.

``--micro`` (no root needed) measures on loopback instead: how fast one asyncio wakeup drains a UDP
socket through a ``DatagramProtocol`` vs ``loop.add_reader`` with a ``recvfrom`` loop (why the device uses
the latter), and packets per second through two of our devices (encrypt, UDP, decrypt), per direction.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import pstats
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from awg_split_tunnel.lab import Lab
from awg_split_tunnel.lab.servers import (
    WireGuardPeer,
    WireGuardServer,
    generate_keypair,
    start_amneziawg_go,
    start_iperf3,
    start_wireguard_go,
)
from awg_split_tunnel.lab.topology import CLIENT, TUNNEL_CLIENT_IP, WEB_IP
from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.device import DeviceSettings, PeerSettings, WireGuardDevice

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


@dataclass(slots=True)
class Result:
    name: str
    upload: float
    download: float


def iperf(lab: Lab, seconds: float, reverse: bool) -> float:
    """Mbit/s of one single-stream TCP iperf3 run from ns client to the web host."""
    argv = ["iperf3", "-c", WEB_IP, "-t", str(seconds), "-J", "-O", "1"]
    if reverse:
        argv.append("-R")
    done = lab.run(CLIENT, argv, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    report = json.loads(done.stdout)
    total = report.get("end", {}).get("sum_received")
    if "error" in report or total is None:
        raise RuntimeError(f"iperf3 gave no result: {report.get('error', 'no sum_received in its report')}")
    return float(total["bits_per_second"]) / 1e6


def measure(lab: Lab, name: str, seconds: float) -> Result:
    up = iperf(lab, seconds, reverse=False)
    down = iperf(lab, seconds, reverse=True)
    result = Result(name, up, down)
    print(f"{name:14s} upload {up:8.0f} Mbit/s   download {down:8.0f} Mbit/s", flush=True)
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


def micro() -> None:
    protocol = _receive_rate("protocol")
    reader = _receive_rate("reader")
    print(f"UDP receive, DatagramProtocol      {protocol / 1000:8.0f} kpps")
    print(f"UDP receive, add_reader + drain     {reader / 1000:8.0f} kpps   ratio {reader / protocol:.1f}")
    sent, through = _device_rate()
    print(
        f"our device, 1420-byte packets: sender {sent / 1000:.0f} kpps, end to end {through / 1000:.0f} kpps"
    )
    print(f"  = {through * 1420 * 8 / 1e6:.0f} Mbit/s of IP packets on one core pair (loopback, no TUN)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--profile", action="store_true", help="also profile our client with cProfile")
    parser.add_argument("--skip-awg", action="store_true", help="WireGuard only")
    parser.add_argument("--micro", action="store_true", help="loopback micro-benchmarks only (no root)")
    args = parser.parse_args()
    if args.micro:
        micro()
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    results: dict[str, Result] = {}
    with Lab() as lab:
        start_iperf3(lab)
        client_private, client_public = generate_keypair()
        server_peer = [WireGuardPeer(client_public, [f"{TUNNEL_CLIENT_IP}/32"])]

        server = start_wireguard_go(lab, peers=server_peer)
        go = go_client(lab, client_private, server, None)
        results["wg-go"] = measure(lab, "wireguard-go", args.seconds)
        go.stop()
        ours = OurClient(lab, our_conf(client_private, server, None), "ours-wg")
        results["ours"] = measure(lab, "ours/wg", args.seconds)
        ours.stop()
        if args.profile:
            for reverse, title in ((False, "upload"), (True, "download")):
                profile = lab.tmpdir / f"profile-{title}.out"
                ours = OurClient(lab, our_conf(client_private, server, None), f"prof-{title}", profile)
                iperf(lab, args.seconds, reverse)
                ours.stop()
                print_profile(profile, title)
        server.stop()

        if not args.skip_awg:
            awg_server = start_amneziawg_go(lab, peers=server_peer, awg_params=AWG_PARAMS)
            ours = OurClient(lab, our_conf(client_private, awg_server, AWG_PARAMS), "ours-awg")
            results["ours-awg"] = measure(lab, "ours/awg2.0", args.seconds)
            ours.stop()
            awg_go = go_client(lab, client_private, awg_server, AWG_PARAMS)
            results["awg-go"] = measure(lab, "amneziawg-go", args.seconds)
            awg_go.stop()
            awg_server.stop()
            # amneziawg-go with no parameters is WireGuard on the wire, built from the current
            # wireguard-go code base (UDP GSO/GRO, TUN offloads): the modern WireGuard baseline.
            modern_server = start_amneziawg_go(lab, peers=server_peer, awg_params={})
            modern = go_client(lab, client_private, modern_server, {})
            results["modern-go"] = measure(lab, "awg-go/plain", args.seconds)
            modern.stop()
            modern_server.stop()

    def ratio(a: str, b: str) -> None:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            up, down = ra.upload / rb.upload, ra.download / rb.download
            print(f"{ra.name} / {rb.name}: upload {up:.2f}, download {down:.2f}")

    print()
    ratio("ours", "wg-go")
    ratio("ours-awg", "ours")
    ratio("ours-awg", "awg-go")
    ratio("ours", "modern-go")
    return 0


if __name__ == "__main__":
    sys.exit(main())
