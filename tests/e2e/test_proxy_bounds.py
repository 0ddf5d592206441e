"""End to end: the stream tunnel proxy's bounds as the config's ``proxy:`` block sets them.

The daemon (``python -m awg_split_tunnel.daemon``, on each data path in turn) runs in ns client with one
SOCKS5 tunnel (dante) for ``app-socks`` and ``app-other``, and small bounds: 4 connections per app, a
connection reset after 3 s without a byte, or 1 s after a FIN when the other side stays silent. A silent
server in ns web (port 9000) accepts connections and never sends or closes.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

import pytest
from marks import NEEDS_ROOT
from polling import wait_for
from running_daemon import RunningDaemon

from awg_split_tunnel.lab import CLIENT, SOCKS_IP, WEB, WEB_IP, Lab, make_app, start_dante, start_web

pytestmark = [*NEEDS_ROOT, pytest.mark.timeout(120)]

DATAPLANES = ("divert", "kernel")
SILENT_PORT = 9000

CONFIG = """\
log_level: debug
dataplane: {dataplane}
default: direct
proxy:
  max_flows_per_app: 4
  tcp_idle_timeout: 3
  half_close_timeout: 1
tunnels:
  - id: socks
    type: socks5
    server: {socks}:1080
rules:
  - process: app-socks
    tunnel: socks
  - process: app-other
    tunnel: socks
"""

# Accepts connections and holds them: never reads, sends or closes.
SILENT = f"""
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {SILENT_PORT}))
srv.listen(64)
held = []
while True:
    held.append(srv.accept()[0])
"""

# N connections to the web server, each with a request it waits to complete; a second later, how many
# are still open and how many were reset (or closed) — a reset may come before connect() returns.
MANY = """
import socket, sys, time
conns = []
alive = ended = 0
for _ in range(int(sys.argv[2])):
    try:
        s = socket.create_connection((sys.argv[1], 80), timeout=5)
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\n")
    except ConnectionError:
        ended += 1
        continue
    conns.append(s)
time.sleep(1.0)
for s in conns:
    s.setblocking(False)
    try:
        s.recv(1)
        ended += 1
    except BlockingIOError:
        alive += 1
    except OSError:
        ended += 1
print(alive, ended, flush=True)
"""

# One connection to the silent server; with "half" the app ends its side (FIN) first. Prints how long
# until the connection was reset, or "open" after 10 s.
QUIET = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello")
if sys.argv[3] == "half":
    s.shutdown(socket.SHUT_WR)
started = time.monotonic()
s.settimeout(10)
try:
    s.recv(1)
    print("closed", round(time.monotonic() - started, 2), flush=True)
except TimeoutError:
    print("open", flush=True)
except OSError:
    print("reset", round(time.monotonic() - started, 2), flush=True)
"""


@pytest.fixture(scope="module", params=DATAPLANES)
def dataplane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def lab(dataplane: str) -> Iterator[Lab]:
    with Lab() as lab:
        start_web(lab)
        lab.spawn(WEB, [sys.executable, "-c", SILENT])
        lab.wait_tcp(CLIENT, WEB_IP, SILENT_PORT)
        for name in ("app-socks", "app-other"):
            make_app(lab, name)
        yield lab


@pytest.fixture(scope="module")
def daemon(lab: Lab, dataplane: str) -> Iterator[RunningDaemon]:
    start_dante(lab)
    config = lab.tmpdir / "config.yaml"
    config.write_text(CONFIG.format(dataplane=dataplane, socks=SOCKS_IP))
    running = RunningDaemon(lab, config)
    running.wait_running()
    wait_for(lambda: lab.app("app-socks", timeout=2.0).seen_ip == SOCKS_IP, 10.0, "socks tunnel UP")
    yield running
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
        running.process.wait(10)
    print(running.output()[-5000:])


def proxy_counters(daemon: RunningDaemon) -> dict[str, int]:
    from awg_split_tunnel.api.control import request

    [row] = [t for t in request("status", path=daemon.control)["tunnels"] if t["id"] == "socks"]
    return dict(row.get("proxy", {}))


def run(lab: Lab, app: str, script: str, *args: str) -> str:
    done = lab.run(CLIENT, [lab.apps[app], "-c", script, *args], timeout=30)
    assert done.returncode == 0, done.stderr
    return str(done.stdout.strip())


def test_an_apps_connections_beyond_its_cap_are_reset_and_counted_and_others_still_pass(
    lab: Lab, daemon: RunningDaemon
) -> None:
    refused_before = proxy_counters(daemon).get("tcp_refused", 0)
    assert run(lab, "app-socks", MANY, WEB_IP, "8") == "4 4", "4 open, the 4 over the app's cap reset"
    assert proxy_counters(daemon)["tcp_refused"] - refused_before == 4
    assert lab.app("app-other").seen_ip == SOCKS_IP, "another app has a cap of its own"
    assert "refused: the app's 4 flows are open" in daemon.output()


def test_a_connection_without_a_byte_is_reset_after_the_idle_timeout(lab: Lab, daemon: RunningDaemon) -> None:
    outcome, took = run(lab, "app-other", QUIET, WEB_IP, str(SILENT_PORT), "idle").split()
    assert outcome == "reset" and 3.0 <= float(took) < 6.0, (outcome, took)


def test_a_half_closed_connection_whose_server_stays_silent_is_reset(lab: Lab, daemon: RunningDaemon) -> None:
    outcome, took = run(lab, "app-other", QUIET, WEB_IP, str(SILENT_PORT), "half").split()
    assert outcome == "reset" and 1.0 <= float(took) < 3.0, (outcome, took)
