"""Per-app TCP throughput through our split tunnel (router + userspace WireGuard) vs wireguard-go.

Run as root: ``python3 benchmarks/split_wg.py [--seconds 5]``.

One lab (network namespaces, 198.18.0.0/15 only), iperf3 -s in ns web, wireguard-go as the peer in ns
wg. Measured one after the other in the same run (the machine is shared and noisy: only ratios within a
run mean anything), single-stream TCP, upload and download (``iperf3 -R``):

- ``split/wg``: our daemon's packet path as ``run`` uses it — ``RouterProcess`` with the WireGuard
  device inside it — and iperf3 copied to an exe name that a rule sends into the tunnel;
- ``split/direct``: the same daemon, iperf3 under a name routed ``direct`` (divert + reinject only);
- ``wireguard-go``: wireguard-go as a full-tunnel client in ns client (kernel TUN, no per-app routing),
  the baseline.

Prints each figure and the ratios split/wg ÷ wireguard-go and split/direct ÷ plain (no daemon).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, cast

from awg_split_tunnel.lab import Lab
from awg_split_tunnel.lab.servers import (
    WireGuardPeer,
    WireGuardServer,
    generate_keypair,
    start_iperf3,
    start_wireguard_go,
)
from awg_split_tunnel.lab.topology import CLIENT, CLIENT_IP, TUNNEL_CLIENT_IP, WEB_IP

CLIENT_PORT = 51930


def serve(conf_text: str) -> None:
    """The daemon's packet path in ns client: RouterProcess with the device inside; stops at stdin EOF."""
    import logging

    from awg_split_tunnel.core.packet_router import RouterProcess, RouterSettings
    from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
    from awg_split_tunnel.core.policy import TunnelState
    from awg_split_tunnel.core.rule_engine import Rule
    from awg_split_tunnel.platform.divert import router_handles
    from awg_split_tunnel.provider.wireguard.conf import parse_conf
    from awg_split_tunnel.provider.wireguard.device import WireGuardDevice, settings_from_conf

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conf = parse_conf(conf_text)
    settings = settings_from_conf(conf)
    route = PacketTunnelRoute.from_addresses([str(a) for a in conf.interface.addresses], settings.mtu)
    up = threading.Event()

    def on_state(tunnel_id: str, state: TunnelState, reason: str) -> None:
        if state is TunnelState.UP:
            up.set()

    process = RouterProcess(
        RouterSettings(
            (Rule("iperf-wg", "wg"), Rule("iperf-direct", "direct")),
            "direct",
            {"wg": route},
            {"wg": TunnelState.CONNECTING},
            devices={"wg": functools.partial(WireGuardDevice, settings, tunnel_id="wg")},
        ),
        cast(Any, router_handles),
    )
    process.on_tunnel_state = on_state
    process.start()
    if not up.wait(10):
        print("the tunnel did not come up", flush=True)
        process.stop()
        return
    print("ready", flush=True)
    sys.stdin.read()
    snapshot = process.snapshot()
    process.stop()
    print(json.dumps(snapshot[0] if snapshot else {}, default=str), flush=True)


def iperf(lab: Lab, exe: str, seconds: float, reverse: bool) -> float:
    """Mbit/s of one single-stream TCP iperf3 run from ns client to the web host, as ``exe``."""
    argv = [exe, "-c", WEB_IP, "-t", str(seconds), "-J", "-O", "1"]
    if reverse:
        argv.append("-R")
    done = lab.run(CLIENT, argv, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    report = json.loads(done.stdout)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def measure(lab: Lab, name: str, exe: str, seconds: float) -> tuple[float, float]:
    up = iperf(lab, exe, seconds, reverse=False)
    down = iperf(lab, exe, seconds, reverse=True)
    print(f"{name:14s} upload {up:8.0f} Mbit/s   download {down:8.0f} Mbit/s", flush=True)
    return up, down


def conf_text(private: str, server: WireGuardServer) -> str:
    return (
        f"[Interface]\nPrivateKey = {private}\nAddress = {TUNNEL_CLIENT_IP}/24\nListenPort = {CLIENT_PORT}\n"
        f"\n[Peer]\nPublicKey = {server.public_key}\nEndpoint = {server.endpoint}\nAllowedIPs = 0.0.0.0/0\n"
    )


def start_daemon(lab: Lab, conf: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = lab.spawn(
        CLIENT,
        [sys.executable, __file__, "--serve", conf],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    line = process.stdout.readline() if ready else ""
    if line.strip() != "ready":
        process.kill()
        raise RuntimeError(f"the split-tunnel daemon did not start: {line!r}")
    return process


def stop_daemon(process: subprocess.Popen[str]) -> str:
    try:
        out, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    iperf3 = shutil.which("iperf3")
    if iperf3 is None or shutil.which("wireguard-go") is None:
        print("needs iperf3 and wireguard-go (Debian packages)", file=sys.stderr)
        return 2
    results: dict[str, tuple[float, float]] = {}
    with Lab() as lab:
        start_iperf3(lab)
        # Rules match exe names: the same iperf3 under two names.
        apps = {}
        for name in ("iperf-wg", "iperf-direct"):
            apps[name] = str(lab.tmpdir / name)
            shutil.copy2(iperf3, apps[name])
        private, public = generate_keypair()
        server = start_wireguard_go(
            lab,
            peers=[WireGuardPeer(public, [f"{TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{CLIENT_PORT}")],
            log_level="error",
        )
        results["plain"] = measure(lab, "plain", iperf3, args.seconds)
        daemon = start_daemon(lab, conf_text(private, server))
        try:
            results["split-wg"] = measure(lab, "split/wg", apps["iperf-wg"], args.seconds)
            results["split-direct"] = measure(lab, "split/direct", apps["iperf-direct"], args.seconds)
        finally:
            stats = stop_daemon(daemon)
        print(f"router: {stats.strip()[:600]}")
        go = start_wireguard_go(
            lab,
            host=CLIENT,
            private_key=private,
            peers=[WireGuardPeer(server.public_key, [f"{WEB_IP}/32"], endpoint=server.endpoint)],
            listen_port=None,
            address=f"{TUNNEL_CLIENT_IP}/24",
            routes=[f"{WEB_IP}/32"],
            log_level="error",
        )
        results["wg-go"] = measure(lab, "wireguard-go", iperf3, args.seconds)
        go.stop()
        server.stop()

    def ratio(a: str, b: str, label: str) -> None:
        (au, ad), (bu, bd) = results[a], results[b]
        print(f"{label}: upload {au / bu:.2f}, download {ad / bd:.2f}")

    print()
    ratio("split-wg", "wg-go", "split/wg / wireguard-go (full tunnel)")
    ratio("split-direct", "plain", "split/direct / plain (no daemon)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
