"""End to end: the real daemon (``python -m awg_split_tunnel.daemon -c CONFIG``) in the lab's client.

One daemon for the module per data path (``dataplane: divert``, then ``dataplane: kernel``), started from
a YAML config with a SOCKS5 tunnel (dante, 198.18.0.20), an HTTP tunnel (tinyproxy, 198.18.0.30) and, on
the divert path, a WireGuard tunnel that ``run`` keeps DOWN. Test apps are copies of
one interpreter under different names; the web server tells each which address it saw (docs/LAB.md):
.20 via SOCKS5, .30 via the HTTP proxy, .1 direct, nothing when dropped. The tests that stop the SOCKS
server and the daemon itself come last, in file order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_for
from running_daemon import OPEN_REQUEST, RunningDaemon, read_line

from awg_split_tunnel.lab import (
    CLIENT,
    CLIENT_IP,
    CLIENT_IP6,
    HTTP_IP,
    HTTP_IP6,
    SOCKS_IP,
    SOCKS_IP6,
    Lab,
    LabServer,
    generate_keypair,
    make_app,
    start_dante,
    start_tinyproxy,
    start_web,
)
from awg_split_tunnel.lab.topology import python_path

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

APPS = (
    "app-socks",
    "app-http",
    "app-direct",
    "app-drop",
    "app-block",
    "app-fallback",
    "app-vpn",
    "app-late",
)


DATAPLANES = ("divert", "kernel")


def daemon_config(dataplane: str = "divert") -> str:
    _, peer_public = generate_keypair()
    private, _ = generate_keypair()
    return f"""\
# the daemon's end-to-end test config
log_level: debug
dataplane: {dataplane}
default: direct
tunnels:
  - id: socks
    type: socks5
    server: {SOCKS_IP}:1080
  - id: corp
    type: http
    server: {HTTP_IP}:3128
  - id: vpn
    type: wireguard
    private_key: {private}
    address: 198.19.0.2/32
    peer:
      public_key: {peer_public}
      endpoint: 198.18.0.40:51820
rules:
  - process: app-socks
    tunnel: socks
  - process: app-http
    tunnel: corp
  - process: app-drop
    tunnel: socks
    fallback: drop
  - process: app-block
    tunnel: socks
    fallback: block
  - process: app-fallback
    tunnel: socks
    fallback: allow_direct
  - process: app-vpn
    tunnel: vpn
    fallback: block
"""


@pytest.fixture(scope="module", params=DATAPLANES)
def dataplane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def lab(dataplane: str) -> Iterator[Lab]:
    with Lab() as lab:
        start_web(lab)
        start_web(lab, port=SECOND_WEB_PORT, udp_port=SECOND_UDP_PORT)
        for name in APPS:
            make_app(lab, name)
        yield lab


@pytest.fixture(scope="module")
def dante(lab: Lab) -> LabServer:
    return start_dante(lab)


@pytest.fixture(scope="module")
def daemon(lab: Lab, dante: LabServer, dataplane: str) -> Iterator[RunningDaemon]:
    start_tinyproxy(lab)
    config = lab.tmpdir / "config.yaml"
    config.write_text(daemon_config(dataplane))
    config.chmod(0o600)  # it holds a private key
    running = RunningDaemon(lab, config)
    running.wait_running()
    wait_for(lambda: lab.app("app-socks", timeout=2.0).seen_ip == SOCKS_IP, 10.0, "socks tunnel UP")
    yield running
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
        running.process.wait(10)
    print(running.output()[-5000:])


# -- routing by exe name ---------------------------------------------------------------------------------


def test_status_line_names_every_tunnel_with_its_state(daemon: RunningDaemon) -> None:
    out = daemon.output()
    assert "socks UP" in out and "corp UP" in out
    # The WireGuard peer of `vpn` does not exist in this lab: its device keeps trying.
    assert "vpn CONNECTING" in out or "vpn DOWN" in out
    for prefix in ("[Core]", "[Router]", "[Proxy]"):
        assert prefix in out, prefix


@pytest.mark.parametrize(
    ("app", "expected"),
    [("app-socks", SOCKS_IP), ("app-http", HTTP_IP), ("app-direct", CLIENT_IP), ("app-fallback", SOCKS_IP)],
)
def test_each_app_reaches_the_web_server_the_way_its_rule_says(
    lab: Lab, daemon: RunningDaemon, app: str, expected: str
) -> None:
    result = lab.app(app)
    assert result.ok, result.stderr
    assert result.seen_ip == expected


@pytest.mark.parametrize(
    ("parent", "child", "expected"),
    [
        ("app-socks", "app-direct", SOCKS_IP),  # no rule of its own: the parent's tunnel
        ("app-http", "app-direct", HTTP_IP),
        ("app-direct", "app-direct", CLIENT_IP),  # no rule anywhere: the default
        ("app-socks", "app-http", HTTP_IP),  # a rule of its own wins over the parent's
        ("app-socks", "app-drop", ""),
    ],
)
def test_a_child_without_a_rule_of_its_own_follows_its_parent_s_rule(
    lab: Lab, daemon: RunningDaemon, parent: str, child: str, expected: str
) -> None:
    result = lab.app(child, parent=parent, timeout=3.0)
    assert result.seen_ip == expected, result.stderr


@pytest.mark.parametrize(
    ("app", "expected"), [("app-socks", SOCKS_IP6), ("app-http", HTTP_IP6), ("app-direct", CLIENT_IP6)]
)
def test_ipv6_apps_are_routed_the_same_way(lab: Lab, daemon: RunningDaemon, app: str, expected: str) -> None:
    result = lab.app(app, v6=True)
    assert result.ok, result.stderr
    assert result.seen_ip == expected


@pytest.mark.parametrize("app", ["app-drop", "app-vpn"])
def test_dropped_apps_and_apps_of_a_down_packet_tunnel_cannot_connect(
    lab: Lab, daemon: RunningDaemon, app: str
) -> None:
    result = lab.app(app, timeout=3.0)
    assert not result.ok and result.seen_ip == ""
    # Refused at once (a reset for the SYN), not left to time out.
    assert "refused" in result.stderr, result.stderr


@pytest.mark.parametrize("v6", [False, True])
def test_udp_through_socks5_arrives_from_the_socks_server(lab: Lab, daemon: RunningDaemon, v6: bool) -> None:
    result = lab.app("app-socks", udp=True, v6=v6)
    assert result.ok, result.stderr
    assert result.seen_ip == (SOCKS_IP6 if v6 else SOCKS_IP)
    direct = lab.app("app-direct", udp=True, v6=v6)
    assert direct.seen_ip == (CLIENT_IP6 if v6 else CLIENT_IP)


@pytest.mark.parametrize("v6", [False, True])
def test_udp_of_an_http_tunnel_app_is_blocked(lab: Lab, daemon: RunningDaemon, v6: bool) -> None:
    result = lab.app("app-http", udp=True, v6=v6, timeout=2.0)
    assert not result.ok and result.seen_ip == ""


def test_status_api_reports_the_tunnels(daemon: RunningDaemon) -> None:
    from awg_split_tunnel.api.control import request

    status = request("status", path=daemon.control)
    states = {t["id"]: t["state"] for t in status["tunnels"]}
    # `vpn`'s WireGuard peer does not exist in this lab: its device is still trying (or has given up).
    assert states.pop("vpn") in ("connecting", "down")
    assert states == {"socks": "up", "corp": "up"}


def test_a_second_daemon_refuses_to_start_and_the_first_keeps_routing(
    lab: Lab, daemon: RunningDaemon
) -> None:
    argv: list[str | Path] = [sys.executable, "-m", "awg_split_tunnel.daemon", "-c", daemon.config]
    argv += ["--control", daemon.control]
    second = lab.run(CLIENT, argv, env={**os.environ, "PYTHONPATH": python_path()}, timeout=30)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert lab.app("app-socks").seen_ip == SOCKS_IP


# -- changes while running -------------------------------------------------------------------------------


def test_rule_added_through_config_manager_applies_to_the_next_connection(
    lab: Lab, daemon: RunningDaemon
) -> None:
    from awg_split_tunnel.core.config import ConfigManager

    assert lab.app("app-late").seen_ip == CLIENT_IP
    manager = ConfigManager(daemon.config)
    manager.add_rule({"process": "app-late", "tunnel": "corp"}, index=0)
    took = wait_for(lambda: lab.app("app-late", timeout=2.0).seen_ip == HTTP_IP, 5.0, "new rule applied")
    print(f"rule applied after {took:.1f}s")
    assert "# the daemon's end-to-end test config" in daemon.config.read_text(), "comments kept"


def test_tunnel_added_while_running_carries_the_next_connection_and_removal_restores_direct(
    lab: Lab, daemon: RunningDaemon
) -> None:
    from awg_split_tunnel.core.config import ConfigManager

    manager = ConfigManager(daemon.config)
    manager.add_tunnel({"id": "socks-late", "type": "socks5", "server": f"{SOCKS_IP}:1080", "udp": False})
    manager.add_rule({"process": "app-direct", "tunnel": "socks-late"}, index=0)
    wait_for(
        lambda: lab.app("app-direct", timeout=2.0).seen_ip == SOCKS_IP, 6.0, "new tunnel carries the app"
    )
    assert lab.app("app-direct", udp=True).seen_ip == "", "the new tunnel has udp: false, so UDP is blocked"
    manager.remove_rule(0)
    manager.remove_tunnel("socks-late")
    wait_for(lambda: lab.app("app-direct", timeout=2.0).seen_ip == CLIENT_IP, 6.0, "tunnel removed")
    assert "tunnel socks-late removed" in daemon.output()


def test_http_tunnel_with_udp_direct_sends_its_apps_udp_directly(lab: Lab, daemon: RunningDaemon) -> None:
    from awg_split_tunnel.core.config import ConfigManager

    manager = ConfigManager(daemon.config)
    manager.add_tunnel({"id": "corp-udp", "type": "http", "server": f"{HTTP_IP}:3128", "udp": "direct"})
    manager.add_rule({"process": "app-http", "tunnel": "corp-udp"}, index=0)
    try:
        wait_for(lambda: lab.app("app-http", udp=True, timeout=1.0).seen_ip == CLIENT_IP, 6.0, "UDP direct")
        # Until the new tunnel is UP its `allow_direct` fallback sends its TCP direct too.
        wait_for(lambda: lab.app("app-http", timeout=2.0).seen_ip == HTTP_IP, 6.0, "TCP through the proxy")
    finally:
        manager.remove_rule(0)
        manager.remove_tunnel("corp-udp")
    wait_for(lambda: lab.app("app-http", udp=True, timeout=1.0).seen_ip == "", 6.0, "UDP blocked again")


def test_a_broken_config_edit_is_reported_and_the_running_config_stays(
    lab: Lab, daemon: RunningDaemon
) -> None:
    good = daemon.config.read_text()
    try:
        daemon.config.write_text(good + "  - process: app-direct\n    tunnel: nowhere\n")
        wait_for(lambda: "config change ignored" in daemon.output(), 5.0, "error logged")
        assert "nowhere" in daemon.output()
        assert daemon.process.poll() is None
        assert lab.app("app-socks").seen_ip == SOCKS_IP
    finally:
        daemon.config.write_text(good)
    time.sleep(1.5)  # the watcher reloads the good file again


def test_tunnel_down_by_hand_applies_the_fallback_and_up_restores_it(lab: Lab, daemon: RunningDaemon) -> None:
    from awg_split_tunnel.api.control import request

    assert request("tunnel", path=daemon.control, action="down", id="corp")["state"] == "down"
    try:
        assert lab.app("app-http", timeout=2.0).seen_ip == CLIENT_IP, "allow_direct: direct while down"
        states = {t["id"]: t["state"] for t in request("status", path=daemon.control)["tunnels"]}
        assert states["corp"] == "down", "the health probes do not bring it back by themselves"
    finally:
        request("tunnel", path=daemon.control, action="up", id="corp")
    wait_for(lambda: lab.app("app-http", timeout=2.0).seen_ip == HTTP_IP, 5.0, "corp UP again")


SECOND_WEB_PORT, SECOND_UDP_PORT = 8080, 8007

# Two connections from ONE local port to two ports of one host, both open at once (Linux hands out one
# local port to connections to different destinations this way): each prints the address the server saw.
SAME_LOCAL_PORT = """
import socket, sys
host, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
socks = []
for port in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", socks[0].getsockname()[1] if socks else 0))
    s.settimeout(10)
    s.connect((host, port))
    socks.append(s)
for s in socks:
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(s.getsockname()[1], data.partition(b"\\r\\n\\r\\n")[2].split()[0].decode(), flush=True)
"""


def test_one_local_port_to_two_ports_of_one_server_both_tunnelled(lab: Lab, daemon: RunningDaemon) -> None:
    from awg_split_tunnel.lab import WEB_IP, WEB_PORT

    done = lab.run(CLIENT, [lab.apps["app-socks"], "-c", SAME_LOCAL_PORT, WEB_IP, str(WEB_PORT), "8080"])
    assert done.returncode == 0, done.stderr
    (port_a, seen_a), (port_b, seen_b) = (line.split() for line in done.stdout.splitlines())
    assert port_a == port_b, "the test meant one local port"
    assert (seen_a, seen_b) == (SOCKS_IP, SOCKS_IP)


# Ask the web server from a given local port (0: any); print the port and the address the server saw.
FROM_PORT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(10)
s.connect((sys.argv[1], 80))
s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(s.getsockname()[1], data.partition(b"\\r\\n\\r\\n")[2].split()[0].decode(), flush=True)
"""


def test_an_app_reusing_another_apps_port_to_the_same_server_gets_its_own_route(
    lab: Lab, daemon: RunningDaemon
) -> None:
    # The kernel hands a closed connection's local port out again, to any process: the first app's flow
    # still lingers in the router when the second app's SYN comes on the same 4-tuple.
    from awg_split_tunnel.lab import WEB_IP

    port, seen = _from_port(lab, "app-direct", FROM_PORT, WEB_IP, "0")
    assert seen == CLIENT_IP
    assert _from_port(lab, "app-socks", FROM_PORT, WEB_IP, port) == (port, SOCKS_IP)
    assert _from_port(lab, "app-direct", FROM_PORT, WEB_IP, port) == (port, CLIENT_IP)


def _from_port(lab: Lab, app: str, script: str, *args: str) -> tuple[str, str]:
    """Run ``script`` as ``app`` in ns client: (local port, address the server saw) it printed."""
    done = lab.run(CLIENT, [lab.apps[app], "-c", script, *args])
    assert done.returncode == 0, done.stderr
    port, seen = done.stdout.split()
    return port, seen


# A UDP exchange with the echo from a given local port (0: any), resent until answered; prints the port
# and the address the echo saw.
UDP_FROM_PORT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.connect((sys.argv[1], 7))
s.settimeout(0.5)
for _ in range(10):
    s.send(b"probe")
    try:
        reply = s.recv(4096)
    except TimeoutError:
        continue
    print(s.getsockname()[1], reply.partition(b"\\n")[0].decode().rsplit(":", 1)[0], flush=True)
    break
else:
    sys.exit("no answer")
"""


def test_an_app_reusing_a_closed_udp_sockets_port_gets_its_own_route(lab: Lab, daemon: RunningDaemon) -> None:
    from awg_split_tunnel.lab import WEB_IP

    port, seen = _from_port(lab, "app-direct", UDP_FROM_PORT, WEB_IP, "0")
    assert seen == CLIENT_IP
    reused = _from_port(lab, "app-socks", UDP_FROM_PORT, WEB_IP, port)
    assert reused == (port, SOCKS_IP), "the closed socket's route was inherited"


def test_tunnel_going_down_resets_open_block_flows_and_keeps_allow_direct_flows(
    lab: Lab, daemon: RunningDaemon
) -> None:
    from awg_split_tunnel.api.control import request
    from awg_split_tunnel.lab import WEB_IP

    apps = {
        name: lab.spawn(
            CLIENT,
            [lab.apps[name], "-c", OPEN_REQUEST, WEB_IP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("app-block", "app-fallback")
    }
    try:
        assert [read_line(p, 5.0) for p in apps.values()] == ["connected", "connected"]
        request("tunnel", path=daemon.control, action="down", id="socks")
        taken_down = time.monotonic()
        assert read_line(apps["app-block"], 3.0) == "reset"
        assert time.monotonic() - taken_down < 2.0
        fallback = apps["app-fallback"]
        assert fallback.stdin is not None
        fallback.stdin.write("go\n")
        fallback.stdin.flush()
        assert read_line(fallback, 5.0) == f"answered {SOCKS_IP}", "an allow_direct flow keeps its tunnel"
    finally:
        for process in apps.values():
            process.kill()
        request("tunnel", path=daemon.control, action="up", id="socks")
    wait_for(lambda: lab.app("app-block", timeout=2.0).seen_ip == SOCKS_IP, 5.0, "socks UP again")


def test_socks_server_down_block_app_fails_allow_direct_app_goes_direct_then_tunnelled_again(
    lab: Lab, daemon: RunningDaemon, dante: LabServer
) -> None:
    from awg_split_tunnel.lab import WEB_IP

    assert lab.app("app-fallback").seen_ip == SOCKS_IP
    dante.stop()
    killed = time.monotonic()
    try:
        # A new flow gets the fallback within 2 s of the server dying: find the first attempt that did.
        went_direct_at = None
        while time.monotonic() - killed < 4.0:
            attempt = time.monotonic()
            if lab.app("app-fallback", timeout=1.0).seen_ip == CLIENT_IP:
                went_direct_at = attempt - killed
                break
            time.sleep(0.05)
        assert went_direct_at is not None and went_direct_at < 2.0, went_direct_at
        print(f"allow_direct app went direct {went_direct_at:.2f}s after the SOCKS server died")
        # While down, the block app fails and nothing of it leaves for the web server.
        web = f"tcp and dst host {WEB_IP} and src host {CLIENT_IP}"
        with lab.capture(CLIENT, "eth0", web) as capture:
            blocked = lab.app("app-block", timeout=2.0)
            time.sleep(0.3)
        assert not blocked.ok and blocked.seen_ip == ""
        assert capture.count() == 0, "\n".join(capture.packets())
        with lab.capture(CLIENT, "eth0", web) as direct:
            assert lab.app("app-fallback").seen_ip == CLIENT_IP
            time.sleep(0.3)
        assert direct.count() > 0, "the capture sees direct traffic, so its silence above means something"
    finally:
        restarted = time.monotonic()
        dante.start()
    remaining = 5.0 - (time.monotonic() - restarted)
    wait_for(lambda: lab.app("app-block", timeout=1.0).seen_ip == SOCKS_IP, remaining, "tunnelled again")
    print(f"tunnelled again {time.monotonic() - restarted:.1f}s after the restart began")
    assert lab.app("app-fallback").seen_ip == SOCKS_IP


def test_sigterm_stops_the_daemon_cleanly_and_restores_the_network(lab: Lab, daemon: RunningDaemon) -> None:
    wait_for(lambda: lab.app("app-socks", timeout=2.0).seen_ip == SOCKS_IP, 5.0, "socks tunnel UP")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(15) == 0, daemon.output()[-3000:]
    assert "network restored" in daemon.output()
    result = lab.app("app-socks")
    assert result.ok, result.stderr
    assert result.seen_ip == CLIENT_IP
    assert lab.app("app-drop").seen_ip == CLIENT_IP


# -- start-up errors and the demo ------------------------------------------------------------------------


def test_run_without_root_says_so_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from awg_split_tunnel.daemon import run_daemon

    config = tmp_path / "config.yaml"
    config.write_text("default: direct\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_daemon(config) == 1
    assert "needs root" in capsys.readouterr().err


def test_run_says_so_when_pydivert_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from awg_split_tunnel.daemon import run_daemon

    config = tmp_path / "config.yaml"
    config.write_text("default: direct\n")
    monkeypatch.delitem(sys.modules, "awg_split_tunnel.platform.divert", raising=False)
    monkeypatch.setitem(sys.modules, "pydivert", None)
    assert run_daemon(config) == 1
    assert "pydivert cannot load" in capsys.readouterr().err


def test_run_with_a_broken_config_names_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from awg_split_tunnel.daemon import run_daemon

    config = tmp_path / "config.yaml"
    config.write_text("default: direct\nrules:\n  - process: x\n    tunnel: nowhere\n")
    assert run_daemon(config) == 1
    err = capsys.readouterr().err
    assert f"{config}:4" in err and "nowhere" in err


def test_ctrl_c_stops_the_daemon_with_0_and_restores_the_network() -> None:
    with Lab() as lab:
        start_web(lab)
        make_app(lab, "app-drop")
        config = lab.tmpdir / "config.yaml"
        config.write_text("default: drop\n")
        running = RunningDaemon(lab, config)
        running.wait_running()
        assert lab.app("app-drop", timeout=2.0).seen_ip == "", "default: drop"
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(15) == 0, running.output()[-3000:]
        assert lab.app("app-drop").seen_ip == CLIENT_IP


def test_daemon_exits_1_when_its_packet_router_process_dies() -> None:
    with Lab() as lab:
        config = lab.tmpdir / "config.yaml"
        config.write_text("default: direct\n")
        running = RunningDaemon(lab, config)
        running.wait_running()
        children = subprocess.run(["pgrep", "-P", str(running.process.pid)], capture_output=True, text=True)
        routers = [
            int(pid)
            for pid in children.stdout.split()
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        ]
        assert len(routers) == 1, children.stdout
        os.kill(routers[0], signal.SIGKILL)
        assert running.process.wait(10) == 1
        assert "packet router process ended unexpectedly" in running.output()


def test_demo_shows_every_app_going_the_predicted_way(capsys: pytest.CaptureFixture[str]) -> None:
    from awg_split_tunnel.demo import run_demo
    from awg_split_tunnel.lab import AWG_TUNNEL_CLIENT_IP

    assert run_demo() == 0
    out = capsys.readouterr().out
    for app in ("app-awg", "app-socks", "app-http", "app-direct", "app-drop"):
        assert app in out
    assert "✗" not in out and out.count("✓") == 5
    # The AmneziaWG app's row: the web server saw its tunnel address, i.e. it went through our peer.
    awg_row = next(line for line in out.splitlines() if line.startswith("│ app-awg "))
    assert "AmneziaWG" in awg_row and AWG_TUNNEL_CLIENT_IP in awg_row and "✓" in awg_row, out
    assert "type: amneziawg" in out and "config_file: awg.conf" in out
