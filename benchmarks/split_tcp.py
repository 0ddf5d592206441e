"""TCP through the daemon's stream tunnels: throughput and connect latency, against baselines of the same run.

Run as root: ``python3 benchmarks/split_tcp.py [--size-mb 200] [--runs 3] [--connects 200]``.

It builds its own lab (web server with ``/bytes/N``, iperf3 server, dante SOCKS5) and measures, first
without the daemon and then with ``python -m awg_split_tunnel.daemon`` running in ns client, once per data
path (``dataplane: divert``, then ``dataplane: kernel``; ``--dataplane`` picks one):

- bulk download with curl (``/bytes/N``): the same curl binary under three names —
  ``curl-socks`` routed into the SOCKS5 tunnel *transparently* by the daemon, ``curl-explicit`` using the
  SOCKS5 server itself (``--socks5``, no daemon), and ``curl-direct`` (no rule);
- bulk TCP with iperf3 (upload and download): a non-tunnelled copy with the daemon running vs not, and a
  tunnelled copy (iperf3 has no SOCKS support, so it only runs transparently);
- TCP connect latency (p50/p99 of ``--connects`` connects, and of connect + one HTTP request): direct
  without the daemon, direct with it (the router holds each SYN until its process is known) and through
  the SOCKS5 tunnel.

Figures are medians of ``--runs`` runs (the baselines without the daemon are run before and after it,
``--runs`` times each); the ratios at the end are what to compare across machines.
The web server is Python, so curl's direct baseline is capped by it; iperf3 shows the kernel's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from awg_split_tunnel.lab import (
    CLIENT,
    SOCKS_IP,
    SOCKS_PORT,
    WEB_IP,
    Lab,
    make_app,
    start_dante,
    start_iperf3,
    start_web,
)
from awg_split_tunnel.lab.topology import python_path

IPERF_PORT = 5201
DATAPLANES = ("divert", "kernel")
EXPLICIT = "curl --socks5 explicit, no daemon"

LATENCY_CLIENT = """
import socket, sys, time
host, count = sys.argv[1], int(sys.argv[2])
connects, requests = [], []
for _ in range(count):
    started = time.perf_counter()
    s = socket.create_connection((host, 80), timeout=5)
    connected = time.perf_counter()
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n")
    while s.recv(4096):
        pass
    done = time.perf_counter()
    s.close()
    connects.append((connected - started) * 1e3)
    requests.append((done - started) * 1e3)
print(" ".join(f"{c:.4f}" for c in connects))
print(" ".join(f"{r:.4f}" for r in requests))
"""

CONFIG = f"""\
log_level: warning
dataplane: {{dataplane}}
default: direct
tunnels:
  - id: socks
    type: socks5
    server: {SOCKS_IP}:{SOCKS_PORT}
rules:
  - process: curl-socks
    tunnel: socks
  - process: iperf3-socks
    tunnel: socks
  - process: lat-socks
    tunnel: socks
"""


def copy_tool(lab: Lab, tool: str, name: str) -> Path:
    """``tool`` (curl, iperf3) copied under the exe name ``name``: what the daemon's rules match."""
    source = shutil.which(tool)
    if source is None:
        raise SystemExit(f"{tool} is not installed")
    folder = lab.tmpdir / "apps"
    folder.mkdir(exist_ok=True)
    path = folder / name
    shutil.copy2(source, path)
    return path


def curl_mbit(lab: Lab, curl: Path, size: int, *extra: str) -> float:
    url = f"http://{WEB_IP}/bytes/{size}"
    done = lab.run(
        CLIENT,
        [curl, "-s", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", *extra, url],
        timeout=120,
    )
    speed, got = done.stdout.split()
    if done.returncode != 0 or int(float(got)) != size:
        raise RuntimeError(f"{curl.name}: download failed ({done.returncode}): {done.stderr}")
    return float(speed) * 8 / 1e6


def iperf_mbit(lab: Lab, iperf: Path, seconds: float, reverse: bool) -> float:
    argv: list[str | Path] = [iperf, "-c", WEB_IP, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    done = lab.run(CLIENT, argv, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"{iperf.name}: {done.stdout[-500:]} {done.stderr}")
    result = json.loads(done.stdout)
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6


def latencies(lab: Lab, app: Path, count: int) -> tuple[list[float], list[float]]:
    done = lab.run(CLIENT, [app, "-c", LATENCY_CLIENT, WEB_IP, str(count)], timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{app.name}: {done.stderr}")
    connects, requests = done.stdout.splitlines()[:2]
    return [float(x) for x in connects.split()], [float(x) for x in requests.split()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_daemon(lab: Lab, dataplane: str) -> subprocess.Popen[bytes]:
    config = lab.tmpdir / "config.yaml"
    config.write_text(CONFIG.format(dataplane=dataplane))
    log = lab.tmpdir / "daemon.log"
    with open(log, "wb") as out:
        daemon: subprocess.Popen[bytes] = lab.spawn(
            CLIENT,
            [
                sys.executable,
                "-m",
                "awg_split_tunnel.daemon",
                "-c",
                config,
                "--control",
                lab.tmpdir / "c.sock",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": python_path()},
        )
    deadline = time.monotonic() + 40
    while "running" not in log.read_text(errors="replace"):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return daemon


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(15)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200, help="bytes per curl download, MB")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--connects", type=int, default=200, help="connects per latency figure")
    parser.add_argument("--seconds", type=float, default=2.0, help="iperf3 duration")
    parser.add_argument("--dataplane", choices=DATAPLANES, action="append", help="only this data path")
    args = parser.parse_args()
    dataplanes = args.dataplane or list(DATAPLANES)
    if os.geteuid() != 0:
        print("needs root (network namespaces, eBPF)", file=sys.stderr)
        return 1
    size = args.size_mb * 1_000_000
    started = time.monotonic()
    with Lab() as lab:
        start_web(lab)
        start_dante(lab)
        start_iperf3(lab, port=IPERF_PORT)
        curl = {name: copy_tool(lab, "curl", name) for name in ("curl-direct", "curl-explicit", "curl-socks")}
        iperf = {name: copy_tool(lab, "iperf3", name) for name in ("iperf3-direct", "iperf3-socks")}
        lat = {name: make_app(lab, name) for name in ("lat-direct", "lat-socks")}
        socks = ["--socks5", f"{SOCKS_IP}:{SOCKS_PORT}"]
        runs = args.runs

        print(
            f"curl download of {args.size_mb} MB, iperf3 {args.seconds:g} s; medians of {runs} runs "
            "(baselines: before and after the daemon)",
            flush=True,
        )
        samples: dict[str, list[float]] = {}

        def measure(name: str, one_run: Callable[[], float]) -> None:
            samples.setdefault(name, []).extend(one_run() for _ in range(runs))

        lat_none: tuple[list[float], list[float]] = ([], [])

        def without_daemon() -> None:
            # Run before and after the daemon, so slow drift of a shared machine hits both sides alike.
            measure("curl direct, no daemon", partial(curl_mbit, lab, curl["curl-direct"], size))
            measure(EXPLICIT, partial(curl_mbit, lab, curl["curl-explicit"], size, *socks))
            for reverse in (False, True):
                way = "download" if reverse else "upload"
                one = partial(iperf_mbit, lab, iperf["iperf3-direct"], args.seconds, reverse)
                measure(f"iperf3 {way} direct, no daemon", one)
            connects, requests = latencies(lab, lat["lat-direct"], args.connects)
            lat_none[0].extend(connects)
            lat_none[1].extend(requests)

        lat_daemon: dict[str, tuple[list[float], list[float]]] = {}

        def with_daemon(dataplane: str) -> None:
            daemon = start_daemon(lab, dataplane)
            try:
                # The tunnel is probed UP within a second of start; wait for it before measuring.
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    done = lab.run(CLIENT, [curl["curl-socks"], "-s", "-m", "2", f"http://{WEB_IP}/"])
                    if done.stdout.startswith(SOCKS_IP):
                        break
                    time.sleep(0.2)
                else:
                    raise RuntimeError("the SOCKS5 tunnel did not come UP")
                tag = f"[{dataplane}]"
                measure(f"curl direct, daemon {tag}", partial(curl_mbit, lab, curl["curl-direct"], size))
                measure(f"curl transparent SOCKS5 {tag}", partial(curl_mbit, lab, curl["curl-socks"], size))
                for reverse in (False, True):
                    way = "download" if reverse else "upload"
                    direct = partial(iperf_mbit, lab, iperf["iperf3-direct"], args.seconds, reverse)
                    measure(f"iperf3 {way} direct, daemon {tag}", direct)
                    tunnelled = partial(iperf_mbit, lab, iperf["iperf3-socks"], args.seconds, reverse)
                    measure(f"iperf3 {way} transparent SOCKS5 {tag}", tunnelled)
                lat_daemon[f"direct, daemon {tag}"] = latencies(lab, lat["lat-direct"], args.connects)
                lat_daemon[f"SOCKS5 tunnel {tag}"] = latencies(lab, lat["lat-socks"], args.connects)
            finally:
                stop_daemon(daemon)

        without_daemon()
        for dataplane in dataplanes:
            with_daemon(dataplane)
        without_daemon()

    figures = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in figures.items():
        print(f"{name:40s} {value:9.0f} Mbit/s")
    print(f"\nlatency over {args.connects} connects (ms)      connect p50   p99    connect+GET p50   p99")
    for name, (connects, requests) in {"direct, no daemon": lat_none, **lat_daemon}.items():
        print(
            f"{name:40s} {percentile(connects, 0.5):7.3f} {percentile(connects, 0.99):7.3f}"
            f"        {percentile(requests, 0.5):7.3f} {percentile(requests, 0.99):7.3f}"
        )

    def ratio(label: str, a: str, b: str) -> None:
        print(f"{label:64s} {figures[a] / figures[b]:.2f}")

    for dataplane in dataplanes:
        tag = f"[{dataplane}]"
        print(f"\nratios (same run), {dataplane} data path")
        ratio("transparent / explicit SOCKS5 (curl)", f"curl transparent SOCKS5 {tag}", EXPLICIT)
        ratio(
            "transparent SOCKS5 / direct (curl)", f"curl transparent SOCKS5 {tag}", "curl direct, no daemon"
        )
        ratio(
            "non-tunnelled app, daemon / no daemon (curl)",
            f"curl direct, daemon {tag}",
            "curl direct, no daemon",
        )
        for way in ("upload", "download"):
            baseline = f"iperf3 {way} direct, no daemon"
            ratio(
                f"non-tunnelled app, daemon / no daemon (iperf3 {way})",
                f"iperf3 {way} direct, daemon {tag}",
                baseline,
            )
            ratio(
                f"transparent SOCKS5 / direct (iperf3 {way})",
                f"iperf3 {way} transparent SOCKS5 {tag}",
                baseline,
            )
        passed, tunnelled = lat_daemon[f"direct, daemon {tag}"], lat_daemon[f"SOCKS5 tunnel {tag}"]
        for q in (0.5, 0.99):
            added = percentile(passed[0], q) - percentile(lat_none[0], q)
            print(f"{f'added connect latency p{int(q * 100)}, non-tunnelled app (ms)':64s} {added:.3f}")
        req50 = percentile(lat_none[1], 0.5)
        print(
            f"{'connect+GET p50, SOCKS5 tunnel / no daemon':64s} {percentile(tunnelled[1], 0.5) / req50:.2f}"
        )
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
