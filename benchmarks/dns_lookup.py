"""Lookup latency through the local resolver with the daemon answering per app, against the stub alone.

Run as root: ``python3 benchmarks/dns_lookup.py [--lookups 200] [--dataplane kernel|divert]``.

It builds its own lab (the DNS server in ns web, a stub resolver on 127.0.0.53 in ns client, dante) and
times ``--lookups`` lookups of new names (no cache answers them) from one app process, p50 and p99:

- ``stub alone``: no daemon (the baseline, measured before and after the daemon runs);
- ``direct app``: the daemon redirects the query to itself, finds the app, and asks the stub (whose own
  query upstream, a new flow each time, waits for the data path's first-packet decision);
- ``stub, daemon, per_app off``: the same with the daemon running but ``dns: {per_app: false}``: what
  the data path alone costs (the stub's upstream query is a new flow each time);
- ``SOCKS5 app``: the daemon asks the DNS server through dante (a UDP association per lookup).

Only ratios against the baseline of the same run mean anything (shared, busy machines).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from awg_split_tunnel.lab import CLIENT, SOCKS_IP, WEB_IP, Lab, make_app, start_dante
from awg_split_tunnel.lab.dns_server import STUB_ADDRESS, start_dns, start_dns_stub
from awg_split_tunnel.lab.topology import python_path

TIMER = """
import json, secrets, socket, sys, time
import dns.message
server, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(5)
times = []
for _ in range(count):
    wire = dns.message.make_query(f"{secrets.token_hex(6)}.whoami.lab.", "TXT").to_wire()
    started = time.perf_counter()
    s.send(wire)
    s.recv(65535)
    times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def timed(lab: Lab, app: str, count: int, server: str = STUB_ADDRESS) -> list[float]:
    done = lab.run(CLIENT, [lab.apps[app], "-c", TIMER, server, str(count)], timeout=120, check=True)
    times: list[float] = json.loads(done.stdout)
    return times


def summary(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.99) - 1] * 1000


def run_daemon(lab: Lab, config: Path) -> subprocess.Popen[bytes]:
    """The daemon in ns client, once its status line is printed (and the SOCKS5 tunnel probed)."""
    out = config.with_suffix(".out")
    argv = [
        sys.executable,
        "-m",
        "awg_split_tunnel.daemon",
        "-c",
        config,
        "--control",
        config.with_suffix(".sock"),
    ]
    with open(out, "wb") as sink:
        daemon = lab.spawn(
            CLIENT,
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": python_path()},
        )
    deadline = time.monotonic() + 40
    while "running" not in out.read_text(errors="replace"):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(out.read_text(errors="replace"))
        time.sleep(0.1)
    time.sleep(2.0)
    return daemon


def stop(daemon: subprocess.Popen[bytes]) -> None:
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--dataplane", choices=("kernel", "divert"), default="kernel")
    args = parser.parse_args()
    with Lab() as lab:
        start_dns(lab)
        start_dante(lab)
        for app in ("dns-direct", "dns-socks", "lab-resolver"):
            make_app(lab, app)
        start_dns_stub(lab, WEB_IP, "lab-resolver")
        baseline = timed(lab, "dns-direct", args.lookups)
        settings = (
            f"dataplane: {args.dataplane}\ndefault: direct\ntunnels:\n"
            f"  - {{id: socks, type: socks5, server: '{SOCKS_IP}:1080', dns: [{WEB_IP}]}}\n"
            "rules:\n  - {process: dns-socks, tunnel: socks, fallback: block}\n"
        )
        plain = lab.tmpdir / "plain.yaml"
        plain.write_text(settings + "dns: {per_app: false}\n")
        daemon = run_daemon(lab, plain)
        gated = timed(lab, "dns-direct", args.lookups)
        stop(daemon)
        per_app = lab.tmpdir / "per-app.yaml"
        per_app.write_text(settings)
        daemon = run_daemon(lab, per_app)
        direct = timed(lab, "dns-direct", args.lookups)
        socks = timed(lab, "dns-socks", args.lookups)
        stop(daemon)
        baseline += timed(lab, "dns-direct", args.lookups)
    base50, base99 = summary(baseline)
    print(
        f"{args.lookups} lookups each, {args.dataplane} data path; p50 / p99 in ms, ratio to the stub alone"
    )
    print(f"  stub alone (no daemon)     {base50:6.2f} / {base99:6.2f}")
    rows = (
        ("stub, daemon, per_app off", gated),
        ("direct app via daemon", direct),
        ("SOCKS5 app via daemon", socks),
    )
    for name, times in rows:
        p50, p99 = summary(times)
        print(f"  {name:26} {p50:6.2f} / {p99:6.2f}   x{p50 / base50:.1f} / x{p99 / base99:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
