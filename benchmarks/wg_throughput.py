"""Single-stream TCP throughput through our userspace WireGuard/AmneziaWG client vs wireguard-go.

Run as root: ``python3 benchmarks/wg_throughput.py [--seconds 5] [--profile] [--vnet-hdr]``.

In one lab (network namespaces, veths, 198.18.0.0/15 only), with iperf3 -s in ns web and the peer in
ns wg, it measures, one after the other in the same run (the machine is shared and noisy, so only ratios
within a run mean anything):

- ``wireguard-go``: wireguard-go as the client too (the baseline);
- ``ours/wg``: our ``tun`` client against the same wireguard-go peer;
- ``ours/awg2.0``: our client with an AmneziaWG 2.0 parameter set against amneziawg-go;
- ``amneziawg-go``: amneziawg-go as the client too, same parameters (the AmneziaWG baseline).

Each is measured upload (client → web) and download (``iperf3 -R``). ``--profile`` runs our client under
cProfile during one extra upload and one extra download and prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
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
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


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
    kwargs = {"host": CLIENT, "private_key": private, "peers": [peer], "listen_port": None}
    kwargs |= {"address": f"{TUNNEL_CLIENT_IP}/24", "routes": [f"{WEB_IP}/32"]}
    if awg is None:
        return start_wireguard_go(lab, **kwargs)  # type: ignore[arg-type]
    return start_amneziawg_go(lab, awg_params=awg, **kwargs)  # type: ignore[arg-type]


def print_profile(path: Path, title: str) -> None:
    print(f"\n--- cProfile of our client, {title} (top 18 by own time) ---")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(18)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--profile", action="store_true", help="also profile our client with cProfile")
    parser.add_argument("--skip-awg", action="store_true", help="WireGuard only")
    args = parser.parse_args()
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

    def ratio(a: str, b: str) -> None:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            up, down = ra.upload / rb.upload, ra.download / rb.download
            print(f"{ra.name} / {rb.name}: upload {up:.2f}, download {down:.2f}")

    print()
    ratio("ours", "wg-go")
    ratio("ours-awg", "ours")
    ratio("ours-awg", "awg-go")
    return 0


if __name__ == "__main__":
    sys.exit(main())
