"""Per-app TCP throughput through our split tunnel, on both data paths, vs our own device as a plain `tun`
client and the Go reference clients, all as full tunnels on the same peer.

Run as root: ``python3 benchmarks/split_wg.py [--seconds 5] [--skip-awg] [--dataplane kernel]``.

One lab (network namespaces, 198.18.0.0/15 only), iperf3 -s in ns web, wireguard-go (then the reference
amneziawg-go) as the peer in ns wg. Measured one after the other in the same run (the machine is shared
and noisy: only ratios within a run mean anything), single-stream TCP, upload and download
(``iperf3 -R``):

- ``split/wg [divert|kernel]``: the daemon's router process as ``run`` uses it on that data path, with the
  WireGuard device inside it, and iperf3 copied to an exe name that a rule sends into the tunnel;
- ``split/direct [divert|kernel]``: the same, iperf3 under a name routed ``direct``;
- ``tun``: our own device as a plain full-tunnel client (``awg-split-tunnel tun``, a route to the web
  host only) — what the kernel data path is measured against (routing should add nothing);
- ``wireguard-go``: wireguard-go as a full-tunnel client in ns client (kernel TUN, no per-app routing);
- ``split/awg [...]``, ``tun/awg``, ``amneziawg-go``: the same with AmneziaWG 2.0 (junk packets, S1-S4
  padding, H1-H4 header ranges, an I1 packet) against amneziawg-go.

Prints each figure and the ratios split ÷ tun, split ÷ the Go client and split/direct ÷ plain (no daemon).
A failed iperf3 run prints why and leaves its ratios out.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

from awg_split_tunnel.lab import Lab
from awg_split_tunnel.lab.netns import LabUnavailable
from awg_split_tunnel.lab.servers import (
    WireGuardPeer,
    WireGuardServer,
    generate_keypair,
    start_amneziawg_go,
    start_iperf3,
    start_wireguard_go,
)
from awg_split_tunnel.lab.topology import (
    AWG_PORT,
    AWG_TUNNEL_CLIENT_IP,
    AWG_TUNNEL_SERVER_IP,
    CLIENT,
    CLIENT_IP,
    TUNNEL_CLIENT_IP,
    WEB_IP,
)

CLIENT_PORT = 51930
DATAPLANES = ("divert", "kernel")
# AmneziaWG 2.0: the set tests/e2e/test_awg_interop.py checks on the wire (PARAMETER_SETS["2.0"]), as our
# conf names them; ``awg set`` takes the same keys in lower case.
AWG_PARAMS: dict[str, str] = {
    "Jc": "3", "Jmin": "50", "Jmax": "60", "S1": "37", "S2": "61", "S3": "11", "S4": "7",
    "H1": "100-199", "H2": "200-299", "H3": "300-399", "H4": "400-499",
    "I1": "<b 0xc0ffee><r 5><t>",
}  # fmt: skip


def serve(conf_text: str, tunnel: str, dataplane: str) -> None:
    """The daemon's packet path in ns client: RouterProcess with the device inside, on ``dataplane``;
    stops at stdin EOF.

    iperf3 copied as ``iperf-<tunnel>`` goes into the tunnel, as ``iperf-direct`` direct.
    """
    import logging

    from awg_split_tunnel.core.policy import TunnelState
    from awg_split_tunnel.core.rule_engine import Rule
    from awg_split_tunnel.packet_tunnels import packet_tunnel_devices
    from awg_split_tunnel.platform.divert import event_handles, router_handles
    from awg_split_tunnel.provider.wireguard.conf import parse_conf
    from awg_split_tunnel.router.process import RouterProcess, RouterSettings

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conf = parse_conf(conf_text)
    # The routes and devices as the daemon builds them for this data path (packet_tunnels.py).
    routes, devices = packet_tunnel_devices([_tunnel_settings(tunnel, conf_text)], Path("/"), dataplane)
    up = threading.Event()

    def on_state(tunnel_id: str, state: TunnelState, reason: str) -> None:
        if state is TunnelState.UP:
            up.set()

    serve_body = None
    if dataplane == "kernel":
        from awg_split_tunnel.platform.linux.kernel_datapath import serve_kernel_gate

        serve_body = serve_kernel_gate
    del conf
    process = RouterProcess(
        RouterSettings(
            (Rule(f"iperf-{tunnel}", tunnel), Rule("iperf-direct", "direct")),
            "direct",
            dict(routes),
            {tunnel: TunnelState.CONNECTING},
            log_level=logging.WARNING,
            devices=devices,
            dataplane=dataplane,
        ),
        cast(Any, event_handles if dataplane == "kernel" else router_handles),
        serve=serve_body,
    )
    process.on_tunnel_state = on_state
    process.start()
    if not up.wait(10):
        print("the tunnel did not come up", flush=True)
        process.stop()
        return
    print("ready", flush=True)
    sys.stdin.read()
    status = process.status()
    process.stop()
    stats = {} if status is None else status.stats
    print(json.dumps(stats, default=str), flush=True)


def _tunnel_settings(tunnel: str, conf_text: str) -> Any:
    """The config's tunnel entry for ``conf_text`` (written beside the process, 0600)."""
    import tempfile

    from awg_split_tunnel.core.config import parse_config

    folder = Path(tempfile.mkdtemp(prefix="split-wg-"))
    conf = folder / f"{tunnel}.conf"
    conf.write_text(conf_text)
    conf.chmod(0o600)
    kind = "amneziawg" if tunnel == "awg" else "wireguard"
    text = f"tunnels:\n  - id: {tunnel}\n    type: {kind}\n    config_file: {conf}\n"
    return parse_config(text, file=str(folder / "config.yaml"), base_dir=folder).tunnels[0]


def start_tun_client(lab: Lab, conf: str, name: str) -> subprocess.Popen[str]:
    """Our device as a plain client (the `tun` command) in ns client, routing the web host only."""
    path = lab.tmpdir / f"{name}.conf"
    path.write_text(conf.replace("AllowedIPs = 0.0.0.0/0", f"AllowedIPs = {WEB_IP}/32"))
    path.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    argv = [
        sys.executable,
        "-m",
        "awg_split_tunnel.provider.wireguard.tun_client",
        str(path),
        "--ifname",
        name,
    ]
    process = lab.spawn(CLIENT, argv, stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(100):
        if lab.run(CLIENT, ["ip", "route", "get", WEB_IP]).stdout.find(f"dev {name}") >= 0:
            return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"our tun client did not come up: {process.communicate()[1][-500:]}")


def stop_tun_client(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def iperf(lab: Lab, exe: str, seconds: float, reverse: bool) -> float:
    """Mbit/s of one single-stream TCP iperf3 run from ns client to the web host, as ``exe``."""
    argv = [exe, "-c", WEB_IP, "-t", str(seconds), "-J", "-O", "1"]
    if reverse:
        argv.append("-R")
    try:
        done = lab.run(CLIENT, argv, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"iperf3 did not finish within {seconds + 30:.0f}s") from None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    # With -J iperf3 reports its errors in the JSON ("error"), often with an empty stderr.
    total = report.get("end", {}).get("sum_received") if isinstance(report, dict) else None
    if done.returncode != 0 or total is None:
        why = report.get("error") if isinstance(report, dict) else None
        if not why and done.returncode == 0:
            why = "no end.sum_received in its report"
        why = why or f"{done.stderr.strip()[-300:]} {done.stdout.strip()[-300:]}".strip() or "no output"
        raise RuntimeError(f"iperf3 {'-R ' if reverse else ''}failed (exit {done.returncode}): {why}")
    return float(total["bits_per_second"]) / 1e6


def measure(lab: Lab, name: str, exe: str, seconds: float) -> tuple[float, float] | None:
    """Upload and download Mbit/s, printed; None (with the reason printed) when an iperf3 run failed."""
    try:
        up = iperf(lab, exe, seconds, reverse=False)
        down = iperf(lab, exe, seconds, reverse=True)
    except RuntimeError as exc:
        print(f"{name:14s} FAILED: {exc}", flush=True)
        return None
    print(f"{name:14s} upload {up:8.0f} Mbit/s   download {down:8.0f} Mbit/s", flush=True)
    return up, down


def conf_text(
    private: str, server: WireGuardServer, address: str = TUNNEL_CLIENT_IP, awg: dict[str, str] | None = None
) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in (awg or {}).items())
    return (
        f"[Interface]\nPrivateKey = {private}\nAddress = {address}/24\nListenPort = {CLIENT_PORT}\n{extra}"
        f"\n[Peer]\nPublicKey = {server.public_key}\nEndpoint = {server.endpoint}\nAllowedIPs = 0.0.0.0/0\n"
    )


def start_daemon(lab: Lab, conf: str, tunnel: str, dataplane: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = lab.spawn(
        CLIENT,
        [sys.executable, __file__, "--serve", conf, tunnel, dataplane],
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
    parser.add_argument("--skip-awg", action="store_true", help="WireGuard only (no amneziawg-go half)")
    parser.add_argument("--dataplane", choices=DATAPLANES, action="append", help="only this data path")
    args = parser.parse_args()
    dataplanes = args.dataplane or list(DATAPLANES)
    if os.geteuid() != 0:
        print("needs root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    iperf3 = shutil.which("iperf3")
    if iperf3 is None or shutil.which("wireguard-go") is None:
        print("needs iperf3 and wireguard-go (Debian packages)", file=sys.stderr)
        return 2
    results: dict[str, tuple[float, float] | None] = {}
    with Lab() as lab:
        start_iperf3(lab)
        # Rules match exe names: the same iperf3 under several names.
        apps = {}
        for name in ("iperf-wg", "iperf-awg", "iperf-direct"):
            apps[name] = str(lab.tmpdir / name)
            shutil.copy2(iperf3, apps[name])
        private, public = generate_keypair()
        server = start_wireguard_go(
            lab,
            peers=[WireGuardPeer(public, [f"{TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{CLIENT_PORT}")],
            log_level="error",
        )
        results["plain"] = measure(lab, "plain", iperf3, args.seconds)
        for dataplane in dataplanes:
            daemon = start_daemon(lab, conf_text(private, server), "wg", dataplane)
            try:
                results[f"split-wg-{dataplane}"] = measure(
                    lab, f"split/wg [{dataplane}]", apps["iperf-wg"], args.seconds
                )
                results[f"split-direct-{dataplane}"] = measure(
                    lab, f"split/direct [{dataplane}]", apps["iperf-direct"], args.seconds
                )
            finally:
                stats = stop_daemon(daemon)
            print(f"router: {stats.strip()[:400]}")
        tun = start_tun_client(lab, conf_text(private, server), "benchwg")
        try:
            results["tun-wg"] = measure(lab, "tun", iperf3, args.seconds)
        finally:
            stop_tun_client(tun)
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
        if not args.skip_awg:
            measure_awg(lab, private, public, apps["iperf-awg"], iperf3, args.seconds, results, dataplanes)

    def ratio(a: str, b: str, label: str) -> None:
        ra, rb = results.get(a), results.get(b)
        if a not in results or b not in results:
            return
        if ra is None or rb is None:
            print(f"{label}: n/a (a run failed, see above)")
            return
        (au, ad), (bu, bd) = ra, rb
        print(f"{label}: upload {au / bu:.2f}, download {ad / bd:.2f}")

    print()
    for dataplane in dataplanes:
        tag = f"[{dataplane}]"
        ratio(f"split-wg-{dataplane}", "tun-wg", f"split/wg {tag} / our tun client (full tunnel)")
        ratio(f"split-awg-{dataplane}", "tun-awg", f"split/awg {tag} / our tun client (AmneziaWG 2.0)")
        ratio(f"split-wg-{dataplane}", "wg-go", f"split/wg {tag} / wireguard-go (full tunnel)")
        ratio(f"split-awg-{dataplane}", "awg-go", f"split/awg {tag} / amneziawg-go (AmneziaWG 2.0)")
        ratio(f"split-direct-{dataplane}", "plain", f"split/direct {tag} / plain (no daemon)")
    ratio("tun-wg", "wg-go", "our tun client / wireguard-go")
    ratio("tun-awg", "awg-go", "our tun client / amneziawg-go (AmneziaWG 2.0)")
    return 0 if all(result is not None for result in results.values()) else 1


def measure_awg(
    lab: Lab,
    private: str,
    public: str,
    app: str,
    iperf3: str,
    seconds: float,
    results: dict[str, tuple[float, float] | None],
    dataplanes: list[str],
) -> None:
    """split/awg and amneziawg-go against the reference amneziawg-go peer in ns wg, same parameters."""
    awg_set = {key.lower(): value for key, value in AWG_PARAMS.items()}
    try:
        server = start_amneziawg_go(
            lab,
            peers=[
                WireGuardPeer(public, [f"{AWG_TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{CLIENT_PORT}")
            ],
            listen_port=AWG_PORT,
            address=f"{AWG_TUNNEL_SERVER_IP}/24",
            awg_params=awg_set,
            log_level="error",
        )
    except LabUnavailable as exc:
        print(f"AmneziaWG skipped: {exc}", flush=True)
        return
    conf = conf_text(private, server, AWG_TUNNEL_CLIENT_IP, AWG_PARAMS)
    try:
        for dataplane in dataplanes:
            name = f"split/awg [{dataplane}]"
            try:
                daemon = start_daemon(lab, conf, "awg", dataplane)
            except RuntimeError as exc:
                print(f"{name:14s} FAILED: {exc}", flush=True)
                results[f"split-awg-{dataplane}"] = None
                continue
            try:
                results[f"split-awg-{dataplane}"] = measure(lab, name, app, seconds)
            finally:
                stats = stop_daemon(daemon)
            print(f"router: {stats.strip()[:400]}")
        tun = start_tun_client(lab, conf, "benchawg")
        try:
            results["tun-awg"] = measure(lab, "tun/awg", iperf3, seconds)
        finally:
            stop_tun_client(tun)
        go = start_amneziawg_go(
            lab,
            host=CLIENT,
            private_key=private,
            peers=[WireGuardPeer(server.public_key, [f"{WEB_IP}/32"], endpoint=server.endpoint)],
            listen_port=None,
            address=f"{AWG_TUNNEL_CLIENT_IP}/24",
            routes=[f"{WEB_IP}/32"],
            awg_params=awg_set,
            log_level="error",
        )
        try:
            results["awg-go"] = measure(lab, "amneziawg-go", iperf3, seconds)
        finally:
            go.stop()
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
        sys.exit(0)
    sys.exit(main())
