"""End to end: the kernel data path (``dataplane: kernel``) holds `block` across a crash and leaves nothing.

The daemon runs in the lab's client with a SOCKS5 tunnel (dante), a WireGuard tunnel (wireguard-go) and
four apps: ``app-block`` (through SOCKS5, fallback ``block``), ``app-wgblock`` (through WireGuard,
``block``), ``app-socks`` (through SOCKS5, ``allow_direct``) and ``app-direct``. A capture on the client's
uplink shows what leaves for the web server: after ``kill -9`` of the daemon, or of its router process,
no packet of a block app reaches it — neither a new connection nor its open connection's next send.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO
from polling import wait_for
from running_daemon import RunningDaemon, read_line

from awg_split_tunnel.lab import (
    CLIENT,
    CLIENT_IP,
    SOCKS_IP,
    TUNNEL_CLIENT_IP,
    TUNNEL_SERVER_IP,
    WEB_IP,
    WG_PORT,
    Lab,
    WireGuardPeer,
    generate_keypair,
    make_app,
    start_dante,
    start_web,
    start_wireguard_go,
)
from awg_split_tunnel.lab.topology import python_path

pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]
WG_CLIENT_PORT = 51940
CLIENT_ENDPOINT = f"{CLIENT_IP}:{WG_CLIENT_PORT}"
BLOCK_APPS = {"app-block": SOCKS_IP, "app-wgblock": TUNNEL_CLIENT_IP}

CONFIG = f"""\
dataplane: kernel
default: direct
tunnels:
  - id: socks
    type: socks5
    server: {SOCKS_IP}:1080
  - id: wg
    type: wireguard
    config_file: wg.conf
rules:
  - process: app-block
    tunnel: socks
    fallback: block
  - process: app-wgblock
    tunnel: wg
    fallback: block
  - process: app-socks
    tunnel: socks
"""

STATE_COMMANDS = {
    "nft list ruleset": ["nft", "list", "ruleset"],
    "ip rule": ["ip", "rule"],
    "ip -6 rule": ["ip", "-6", "rule"],
    "ip route show table all": ["ip", "route", "show", "table", "all"],
    "ip -6 route show table all": ["ip", "-6", "route", "show", "table", "all"],
    "ip link": ["ip", "-o", "link"],
}

# Everything of the block app and of the daemon's dead proxies towards the web server, on the uplink.
TO_WEB = f"ip dst host {WEB_IP}"

# An app with an open connection that sends again when told, whatever the other side did meanwhile.
SEND_LATER = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\n")  # incomplete: the server waits for the rest
print("connected", flush=True)
sys.stdin.readline()
try:
    for _ in range(5):
        s.sendall(b"X-Padding: " + b"x" * 1000 + b"\\r\\n")
    s.sendall(b"\\r\\n")
    reply = s.recv(4096)
    print("answered" if reply else "closed", flush=True)
except OSError as exc:
    print(type(exc).__name__, flush=True)
"""


def kernel_state(lab: Lab) -> dict[str, str]:
    """What the daemon may touch in ns client: the ruleset, the policy rules, every routing table, links."""
    state = {}
    for name, argv in STATE_COMMANDS.items():
        done = lab.run(CLIENT, argv)
        assert done.returncode == 0, done.stderr
        # Link counters and the order of dynamic fields change by themselves; names and flags do not.
        lines = [
            " ".join(line.split()[:3]) if name == "ip link" else line for line in done.stdout.splitlines()
        ]
        state[name] = "\n".join(lines)
    return state


@pytest.fixture
def kernel_lab() -> Iterator[Lab]:
    with Lab() as lab:
        start_web(lab)
        start_dante(lab)
        for name in ("app-block", "app-wgblock", "app-socks", "app-direct"):
            make_app(lab, name)
        private, public = generate_keypair()
        peer = start_wireguard_go(
            lab,
            peers=[
                WireGuardPeer(public, [f"{TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{WG_CLIENT_PORT}")
            ],
            listen_port=WG_PORT,
            address=f"{TUNNEL_SERVER_IP}/24",
            log_level="error",
        )
        conf = lab.tmpdir / "wg.conf"
        conf.write_text(
            f"[Interface]\nPrivateKey = {private}\nAddress = {TUNNEL_CLIENT_IP}/24\n"
            f"ListenPort = {WG_CLIENT_PORT}\n\n[Peer]\nPublicKey = {peer.public_key}\n"
            f"Endpoint = {peer.endpoint}\nAllowedIPs = 0.0.0.0/0\n"
        )
        conf.chmod(0o600)
        yield lab


def start(lab: Lab) -> RunningDaemon:
    config = lab.tmpdir / "config.yaml"
    config.write_text(CONFIG)
    running = RunningDaemon(lab, config)
    running.wait_running()
    for app, seen in BLOCK_APPS.items():
        wait_for(
            lambda app=app, seen=seen: lab.app(app, timeout=2.0).seen_ip == seen, 15.0, f"{app} tunnelled"
        )
    return running


def open_block_connection(lab: Lab, app: str) -> subprocess.Popen[str]:
    process = lab.spawn(
        CLIENT,
        [lab.apps[app], "-c", SEND_LATER, WEB_IP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert read_line(process, 5.0) == "connected"
    return process


def open_block_connections(lab: Lab) -> dict[str, subprocess.Popen[str]]:
    return {app: open_block_connection(lab, app) for app in BLOCK_APPS}


def assert_block_apps_leave_nothing(lab: Lab, open_apps: dict[str, subprocess.Popen[str]]) -> None:
    """With the daemon gone: each block app's new connection and its open connection's next sends put no
    packet on the uplink towards the web server."""
    with lab.capture(CLIENT, "eth0", TO_WEB) as capture:
        attempts = {app: lab.app(app, timeout=2.0) for app in BLOCK_APPS}
        sent = {}
        for app, process in open_apps.items():
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
            sent[app] = read_line(process, 5.0)
        time.sleep(0.5)
    for app, attempt in attempts.items():
        assert not attempt.ok and attempt.seen_ip == "", (app, attempt.stdout)
        assert not sent[app].startswith("answered"), (app, sent[app])
    assert capture.count() == 0, "\n".join(capture.packets())


def stop_all(processes: dict[str, subprocess.Popen[str]]) -> None:
    for process in processes.values():
        process.kill()


def test_kill_9_of_the_daemon_keeps_block_apps_off_the_uplink_and_run_restores_every_route(
    kernel_lab: Lab,
) -> None:
    lab = kernel_lab
    running = start(lab)
    open_apps = open_block_connections(lab)
    try:
        router = router_pid(running)
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(10)
        # The router process notices its control pipe closed and ends, leaving the kernel's rules.
        wait_for(lambda: not os.path.exists(f"/proc/{router}"), 10.0, "the router process gone too")
        assert_block_apps_leave_nothing(lab, open_apps)
        # New flows of every app wait while no daemon decides them (the gate has no bypass).
        assert lab.app("app-direct", timeout=2.0).seen_ip == ""
    finally:
        stop_all(open_apps)
    again = start(lab)
    try:
        assert lab.app("app-block").seen_ip == SOCKS_IP
        assert lab.app("app-wgblock").seen_ip == TUNNEL_CLIENT_IP
        assert lab.app("app-socks").seen_ip == SOCKS_IP
        with lab.capture(CLIENT, "eth0", TO_WEB) as direct:
            assert lab.app("app-direct").seen_ip == CLIENT_IP
            time.sleep(0.3)
        assert direct.count() > 0, "the capture sees direct traffic, so its silence above means something"
    finally:
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(15) == 0, again.output()[-3000:]


def test_kill_9_of_the_router_process_keeps_block_apps_off_the_uplink(kernel_lab: Lab) -> None:
    lab = kernel_lab
    running = start(lab)
    open_apps = open_block_connections(lab)
    try:
        os.kill(router_pid(running), signal.SIGKILL)
        assert running.process.wait(10) == 1
        assert "the kernel holds every new connection" in running.output()
        assert_block_apps_leave_nothing(lab, open_apps)
    finally:
        stop_all(open_apps)
    env = {**os.environ, "PYTHONPATH": python_path()}
    cleanup = lab.run(CLIENT, [sys.executable, "-m", "awg_split_tunnel", "cleanup"], env=env)
    assert cleanup.returncode == 0, cleanup.stderr
    assert "removed nftables table inet awg_split_tunnel" in cleanup.stdout
    assert lab.app("app-block").seen_ip == CLIENT_IP, "after cleanup nothing of the daemon is left"
    assert lab.app("app-wgblock").seen_ip == CLIENT_IP
    assert "awgst" not in lab.run(CLIENT, ["ip", "-o", "link"]).stdout


def test_a_clean_stop_leaves_ruleset_rules_routes_and_links_as_before(kernel_lab: Lab) -> None:
    lab = kernel_lab
    before = kernel_state(lab)
    running = start(lab)
    during = kernel_state(lab)
    assert "awg_split_tunnel" in during["nft list ruleset"]
    assert during["ip rule"] != before["ip rule"]
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(15) == 0, running.output()[-3000:]
    after = kernel_state(lab)
    for name in STATE_COMMANDS:
        assert after[name] == before[name], f"{name} differs after the stop"
    assert lab.app("app-block").seen_ip == CLIENT_IP
    assert lab.app("app-wgblock").seen_ip == CLIENT_IP


def router_pid(running: RunningDaemon) -> int:
    """The daemon's router process (its one multiprocessing child)."""
    children = subprocess.run(["pgrep", "-P", str(running.process.pid)], capture_output=True, text=True)
    routers = [int(pid) for pid in children.stdout.split() if "spawn_main" in _cmdline(int(pid))]
    assert len(routers) == 1, children.stdout
    return routers[0]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""
