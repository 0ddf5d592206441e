"""End to end: a stream tunnel going DOWN leaks nothing of its apps' open connections onto the uplink.

The daemon (``python -m awg_split_tunnel.daemon``, on each data path in turn) runs in ns client with one
SOCKS5 tunnel (dante, 198.18.0.20) and two apps on it: ``app-block`` (``fallback: block``) and
``app-fallback`` (``allow_direct``). Each is in the middle of a long upload to the web server when the
tunnel goes DOWN — by ``tunnel down``, or because the SOCKS server is killed. A capture on the client's
uplink then sees **no** packet from either app's uploading port to the web server: the block app's
connection is reset and nothing of it goes out directly; the allow_direct app may open a new connection
directly, but its old tunnelled one never continues un-NATed. A second capture, of that new direct
connection, shows the capture sees what goes out directly (so its silence means something).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
from marks import NEEDS_ROOT
from polling import wait_for
from running_daemon import RunningDaemon, read_line

from awg_split_tunnel.lab import (
    CLIENT,
    CLIENT_IP,
    SOCKS_IP,
    WEB_IP,
    Lab,
    LabServer,
    PacketCapture,
    make_app,
    start_dante,
    start_web,
)

pytestmark = [*NEEDS_ROOT, pytest.mark.timeout(180)]

DATAPLANES = ("divert", "kernel")

CONFIG = """\
log_level: debug
dataplane: {dataplane}
default: direct
tunnels:
  - id: socks
    type: socks5
    server: {socks}:1080
rules:
  - process: app-block
    tunnel: socks
    fallback: block
  - process: app-fallback
    tunnel: socks
    fallback: allow_direct
"""

# An app in the middle of a long upload: it prints "uploading PORT" (its local port) once the request
# is under way, then sends as fast as the connection takes until it breaks, and prints "reset".
UPLOAD = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"POST /sha256 HTTP/1.1\\r\\nHost: web\\r\\nContent-Length: 1000000000000\\r\\n\\r\\n")
chunk = b"u" * 65536
s.sendall(chunk)
print("uploading", s.getsockname()[1], flush=True)
try:
    while True:
        s.sendall(chunk)
except OSError as exc:
    print("reset", type(exc).__name__, flush=True)
"""

TO_WEB = f"tcp and src host {CLIENT_IP} and dst host {WEB_IP}"
"""What the client sends the web server directly (a tunnelled flow goes to the SOCKS server instead)."""
UPLOADING = 1.0
"""Seconds the uploads run under the capture before the tunnel goes DOWN."""
AFTER_DOWN = 3.0
"""Seconds the capture goes on after the tunnel went DOWN: the health monitor's verdict on a dead server
comes within 2 s, and an app's last packets in flight are long out by then."""


@pytest.fixture(scope="module", params=DATAPLANES)
def dataplane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def lab(dataplane: str) -> Iterator[Lab]:
    with Lab() as lab:
        start_web(lab)
        for name in ("app-block", "app-fallback"):
            make_app(lab, name)
        yield lab


@pytest.fixture(scope="module")
def dante(lab: Lab) -> LabServer:
    return start_dante(lab)


@pytest.fixture(scope="module")
def daemon(lab: Lab, dante: LabServer, dataplane: str) -> Iterator[RunningDaemon]:
    config = lab.tmpdir / "config.yaml"
    config.write_text(CONFIG.format(dataplane=dataplane, socks=SOCKS_IP))
    running = RunningDaemon(lab, config)
    running.wait_running()
    wait_for(lambda: lab.app("app-block", timeout=2.0).seen_ip == SOCKS_IP, 10.0, "socks tunnel UP")
    yield running
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
        running.process.wait(10)
    print(running.output()[-5000:])


def start_uploads(lab: Lab) -> dict[str, tuple[subprocess.Popen[str], str]]:
    """Both apps uploading through the tunnel: app name → (process, local port)."""
    uploads = {}
    for name in ("app-block", "app-fallback"):
        process = lab.spawn(CLIENT, [lab.apps[name], "-c", UPLOAD, WEB_IP], stdout=subprocess.PIPE, text=True)
        line = read_line(process, 10.0)
        assert line.startswith("uploading "), f"{name}: {line}"
        uploads[name] = (process, line.split()[1])
    return uploads


def assert_nothing_direct(
    capture: PacketCapture, uploads: dict[str, tuple[subprocess.Popen[str], str]]
) -> None:
    for name, (_, port) in uploads.items():
        leaked = capture.packets(f"src port {port}")
        assert leaked == [], f"{name}'s tunnelled connection went out directly:\n" + "\n".join(leaked[:20])


def assert_capture_sees_direct_traffic(lab: Lab) -> None:
    """The allow_direct app's new connection goes direct while the tunnel is DOWN, and the capture sees it."""
    with lab.capture(CLIENT, "eth0", TO_WEB) as control:
        assert lab.app("app-fallback").seen_ip == CLIENT_IP
    assert control.count() > 0, "the capture sees direct traffic, so its silence above means something"


def socks_status(daemon: RunningDaemon) -> dict[str, object]:
    from awg_split_tunnel.api.control import request

    [row] = [t for t in request("status", path=daemon.control)["tunnels"] if t["id"] == "socks"]
    return dict(row)


def proxy_flows(daemon: RunningDaemon) -> int:
    return int(socks_status(daemon).get("flows", 0))  # type: ignore[call-overload]


def test_tunnel_down_by_hand_mid_upload_leaks_nothing(lab: Lab, daemon: RunningDaemon) -> None:
    from awg_split_tunnel.api.control import request as control

    uploads = start_uploads(lab)
    try:
        with lab.capture(CLIENT, "eth0", TO_WEB) as capture:
            wait_for(lambda: proxy_flows(daemon) == 2, 5.0, "both uploads relayed by the proxy")
            read_line(uploads["app-block"][0], UPLOADING)  # the uploads run on meanwhile
            control("tunnel", path=daemon.control, action="down", id="socks")
            assert read_line(uploads["app-block"][0], AFTER_DOWN).startswith("reset"), "block: reset"
            # The proxy ends the block app's relay too (its upstream connection would go on sending).
            wait_for(lambda: proxy_flows(daemon) == 1, AFTER_DOWN, "the block app's relay closed")
            assert read_line(uploads["app-fallback"][0], AFTER_DOWN) == "(nothing)", "allow_direct goes on"
        assert_nothing_direct(capture, uploads)
        assert_capture_sees_direct_traffic(lab)
    finally:
        for process, _ in uploads.values():
            process.kill()
        control("tunnel", path=daemon.control, action="up", id="socks")
    wait_for(lambda: lab.app("app-block", timeout=2.0).seen_ip == SOCKS_IP, 5.0, "socks UP again")


def test_socks_server_killed_mid_upload_leaks_nothing(
    lab: Lab, daemon: RunningDaemon, dante: LabServer
) -> None:
    uploads = start_uploads(lab)
    try:
        with lab.capture(CLIENT, "eth0", TO_WEB) as capture:
            read_line(uploads["app-block"][0], UPLOADING)  # the uploads run on meanwhile
            pid = dante.pid
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)  # dante and its children, at once
            dante.stop()
            for name, (process, _) in uploads.items():
                assert read_line(process, AFTER_DOWN).startswith("reset"), f"{name}: its server died"
            wait_for(lambda: socks_status(daemon)["state"] == "down", AFTER_DOWN, "socks DOWN")
        assert_nothing_direct(capture, uploads)
        assert_capture_sees_direct_traffic(lab)
    finally:
        for process, _ in uploads.values():
            process.kill()
        dante.start()
    wait_for(lambda: lab.app("app-block", timeout=1.0).seen_ip == SOCKS_IP, 10.0, "tunnelled again")
