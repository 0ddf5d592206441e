"""``awg-split-tunnel demo``: the main job end to end, in a lab of network namespaces (Linux, root).

Builds the lab (docs/LAB.md), starts a web server that tells each client its address, our own AmneziaWG 2.0
peer (the ``tun`` command, no extra package) in ns wg, a SOCKS5 server (dante) and an HTTP proxy
(tinyproxy), writes a config routing five test apps — copies of one program under different names — to
AmneziaWG, SOCKS5, the HTTP proxy, direct and drop, starts the real daemon in the client namespace, waits
until every tunnel is UP (the AmneziaWG one after its handshake), runs the apps and shows which address
the web server saw for each. Everything is removed at the end. Exit 0 only when every app went the
predicted way.

With ``--ui`` the lab and the daemon keep running afterwards, the five apps keep making requests, and the
dashboard (docs/DASHBOARD.md) is reachable from this machine: a port on its loopback is forwarded, byte
for byte, to the dashboard's port on the client namespace's loopback. Ctrl-C removes everything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

DAEMON_START_TIMEOUT = 40.0
TUNNELS_UP_TIMEOUT = 30.0
"""Covers the AmneziaWG handshake, retried every few seconds if the first one is lost."""
AWG_TUNNEL_ID = "nl-awg"
AWG_CONF = "awg.conf"
AWG_PARAMS: dict[str, str] = {
    "Jc": "3", "Jmin": "50", "Jmax": "60", "S1": "37", "S2": "61", "S3": "11", "S4": "7",
    "H1": "100-199", "H2": "200-299", "H3": "300-399", "H4": "400-499",
    "I1": "<b 0xc0ffee><r 5><t>",
}  # fmt: skip
"""An AmneziaWG 2.0 parameter set: junk packets, padded messages of all four kinds, header ranges, I1."""
DEMO_UI_PORT = 7799
"""The dashboard's port (on this machine's loopback, forwarded into the lab); another if it is taken."""
LIVE_TRAFFIC = r"""
import socket, sys, time
host, size = sys.argv[1], int(sys.argv[2])
request = ("GET /bytes/%d HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n" % size).encode()
while True:
    try:
        with socket.create_connection((host, 80), timeout=3) as s:
            s.sendall(request)
            while s.recv(65536):
                pass
        time.sleep(1)
    except OSError:
        time.sleep(5)
"""
"""What each app runs while the dashboard shows them: a new connection fetching a few tens of kilobytes
every second (5 s after a failure), so each app always has flows to show (on the kernel data path a flow
is listed for 75 s after its first packet, docs/DATAPATHS.md) and the charts move."""


@dataclass(frozen=True, slots=True)
class DemoApp:
    """A test app, the route its rule gives it and the address the web server should then see."""

    name: str
    route: str
    expected: str
    """The IP the web server should report; empty: the connection must fail."""


@dataclass(frozen=True, slots=True)
class DemoResult:
    app: DemoApp
    seen: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.seen == self.app.expected


def demo_apps() -> list[DemoApp]:
    from awg_split_tunnel.lab import AWG_TUNNEL_CLIENT_IP, CLIENT_IP, HTTP_IP, SOCKS_IP

    return [
        DemoApp("app-awg", f"{AWG_TUNNEL_ID}: AmneziaWG 2.0 (ns wg)", AWG_TUNNEL_CLIENT_IP),
        DemoApp("app-socks", "socks: SOCKS5 (dante)", SOCKS_IP),
        DemoApp("app-http", "corp: HTTP proxy (tinyproxy)", HTTP_IP),
        DemoApp("app-direct", "direct (no rule)", CLIENT_IP),
        DemoApp("app-drop", "drop", ""),
    ]


def demo_config(ui_port: int | None = None) -> str:
    """The demo's config; with `ui_port` the dashboard listens there (on the client's loopback)."""
    from awg_split_tunnel.lab import HTTP_IP, HTTP_PROXY_PORT, SOCKS_IP, SOCKS_PORT

    ui = "off" if ui_port is None else f"{{listen: 127.0.0.1:{ui_port}}}"
    return f"""\
# awg-split-tunnel demo: five apps, five routes
log_level: info
default: direct
ui: {ui}
tunnels:
  - id: {AWG_TUNNEL_ID}
    type: amneziawg
    config_file: {AWG_CONF}
  - id: socks
    type: socks5
    server: {SOCKS_IP}:{SOCKS_PORT}
  - id: corp
    type: http
    server: {HTTP_IP}:{HTTP_PROXY_PORT}
rules:
  - process: app-awg
    tunnel: {AWG_TUNNEL_ID}
    fallback: block
  - process: app-socks
    tunnel: socks
  - process: app-http
    tunnel: corp
  - process: app-drop
    tunnel: socks
    fallback: drop
"""


def run_demo(console: Console | None = None, *, ui: bool = False) -> int:
    """Run the demo; 0 when every app went the predicted way, 1 otherwise or when the lab cannot run.
    With `ui`, keep it running with the dashboard open to this machine until Ctrl-C."""
    console = console or Console()
    if not sys.platform.startswith("linux"):
        console.print("[red]demo needs Linux (network namespaces)[/]")
        return 1
    if os.geteuid() != 0:
        console.print("[red]demo needs root to build network namespaces: run it with sudo[/]")
        return 1
    from awg_split_tunnel.lab import Lab, LabError, LabUnavailable

    with _stopped_as_by_ctrl_c():
        try:
            with Lab() as lab:
                return _run_in_lab(lab, console, ui)
        except (LabError, LabUnavailable) as exc:
            console.print(f"[red]the lab could not be built: {exc}[/]")
            return 1


@contextlib.contextmanager
def _stopped_as_by_ctrl_c() -> Iterator[None]:
    """`kill` (SIGTERM) and a closed terminal (SIGHUP) stop the demo as Ctrl-C does: the daemon is
    stopped and the lab's namespaces and processes are removed, none left behind."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    stops = [signal.SIGTERM]
    if sys.platform != "win32":
        stops.append(signal.SIGHUP)
    previous = {signum: signal.signal(signum, interrupt) for signum in stops}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_in_lab(lab: Any, console: Console, ui: bool = False) -> int:
    from awg_split_tunnel.lab import (
        CLIENT,
        generate_keypair,
        make_app,
        our_amneziawg_client_conf,
        start_dante,
        start_our_amneziawg,
        start_tinyproxy,
        start_web,
    )
    from awg_split_tunnel.lab.topology import python_path

    apps = demo_apps()
    with console.status("building the lab: web server, AmneziaWG peer, SOCKS5 server, HTTP proxy"):
        start_web(lab)
        client_private, client_public = generate_keypair()
        peer = start_our_amneziawg(lab, client_public, AWG_PARAMS)
        start_dante(lab)
        start_tinyproxy(lab)
        for app in apps:
            make_app(lab, app.name)
    forward = DashboardForward(lab) if ui else None
    config = lab.tmpdir / "config.yaml"
    text = demo_config(None if forward is None else forward.port)
    config.write_text(text)
    awg_conf = lab.tmpdir / AWG_CONF
    awg_conf.touch(mode=0o600)  # it holds a private key: never readable by others, not even briefly
    awg_conf.write_text(our_amneziawg_client_conf(peer, client_private))
    control = lab.tmpdir / "control.sock"
    log_path = lab.tmpdir / "daemon.log"
    console.print(f"[bold]config[/] ({config}):")
    console.print(text, markup=False, highlight=False)
    console.print(
        f"[bold]{AWG_CONF}[/] (0600): AmneziaWG 2.0, our own peer in ns wg at {peer.endpoint}",
        highlight=False,
    )
    headers = " ".join(f"{key}={AWG_PARAMS[key]}" for key in ("H1", "H2", "H3", "H4"))
    others = " ".join(f"{key}={value}" for key, value in AWG_PARAMS.items() if key[0] not in "HI")
    console.print(f"  {others}\n  {headers}\n  I1={AWG_PARAMS['I1']}\n", markup=False, highlight=False)
    with open(log_path, "wb") as log_file:
        daemon: subprocess.Popen[bytes] = lab.spawn(
            CLIENT,
            [sys.executable, "-m", "awg_split_tunnel.daemon", "-c", config, "--control", control],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": python_path()},
        )
    try:
        with console.status("starting the daemon in the client namespace"):
            problem = _wait_daemon(daemon, control, log_path)
        if problem:
            console.print(f"[red]{problem}[/]")
            console.print(log_path.read_text(errors="replace")[-4000:], markup=False)
            return 1
        with console.status("running the apps"):
            results = [_run_app(lab, app) for app in apps]
        console.print(_table(results))
        if forward is not None:
            _show_dashboard(lab, apps, forward, control, console)
    finally:
        if forward is not None:
            forward.close()
        exit_code = _stop_daemon(daemon)
    went_right = all(r.ok for r in results)
    if exit_code != 0 or not went_right:
        why = (
            f"the daemon exited with {exit_code}; the end of its log"
            if exit_code
            else "the end of the daemon's log"
        )
        console.print(f"[red]{why} ({log_path}):[/]")
        console.print(log_path.read_text(errors="replace")[-4000:], markup=False, highlight=False)
    passed = went_right and exit_code == 0
    verdict = "[green]every app went the predicted way[/]" if passed else "[red]some app did not[/]"
    console.print(verdict)
    return 0 if passed else 1


def _show_dashboard(
    lab: Any, apps: list[DemoApp], forward: DashboardForward, control: Path, console: Console
) -> None:
    """Keep the apps talking and the dashboard reachable until Ctrl-C."""
    from awg_split_tunnel.api.control import request
    from awg_split_tunnel.lab import CLIENT, WEB_IP
    from awg_split_tunnel.lab.apps import app_path

    url = str(request("ui", path=control, timeout=5.0)["url"])
    for number, app in enumerate(apps):
        argv = [str(app_path(lab, app.name)), "-c", LIVE_TRAFFIC, WEB_IP, str(20_000 * (number + 1))]
        lab.spawn(CLIENT, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    forward.start()
    # Ctrl-C is the way out from the moment the address is shown, even while the lines are printed.
    with contextlib.suppress(KeyboardInterrupt):
        console.print(f"\n[bold]dashboard[/]: {url}", highlight=False, soft_wrap=True)
        console.print("the apps keep running; Ctrl-C stops the daemon and removes the lab")
        while True:
            time.sleep(1)


class DashboardForward:
    """This machine's loopback `port` → the same port on the client namespace's loopback, bytes as they
    are (the browser's Host header names the port the dashboard expects)."""

    def __init__(self, lab: Any, port: int = DEMO_UI_PORT) -> None:
        self._lab = lab
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind(("127.0.0.1", port))
        except OSError:
            self._listener.bind(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._listener.listen(16)
        self._listener.settimeout(0.5)
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []

    def start(self) -> None:
        threading.Thread(target=self._accept, name="dashboard-forward", daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        from awg_split_tunnel.lab import CLIENT

        while not self._closing.is_set():
            try:
                browser, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            dashboard = self._lab.socket(CLIENT, socket.AF_INET, socket.SOCK_STREAM)
            try:
                dashboard.connect(("127.0.0.1", self.port))
            except OSError:
                browser.close()
                dashboard.close()
                continue
            self._sockets += [browser, dashboard]
            for source, sink in ((browser, dashboard), (dashboard, browser)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _wait_daemon(daemon: subprocess.Popen[bytes], control: Path, log_path: Path) -> str:
    """Empty once the daemon runs with every tunnel UP (stream and packet tunnels); else what went wrong."""
    from awg_split_tunnel.api.control import request

    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while "running" not in log_path.read_text(errors="replace"):
        if daemon.poll() is not None:
            return f"the daemon exited ({daemon.returncode}) while starting"
        if time.monotonic() > deadline:
            return "the daemon did not start in time"
        time.sleep(0.1)
    deadline = time.monotonic() + TUNNELS_UP_TIMEOUT
    states: dict[Any, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = request("status", path=control, timeout=2.0)
        except Exception:  # the API answers a moment after the status line
            status = {}
        states = {t.get("id"): t.get("state") for t in status.get("tunnels", [])}
        if states and all(state == "up" for state in states.values()):
            return ""
        if daemon.poll() is not None:
            return f"the daemon exited ({daemon.returncode}) while its tunnels came up"
        time.sleep(0.2)
    waiting = ", ".join(f"{tid}: {state}" for tid, state in states.items() if state != "up")
    return f"the tunnels did not come UP within {TUNNELS_UP_TIMEOUT:.0f}s ({waiting or 'no status'})"


def _run_app(lab: Any, app: DemoApp) -> DemoResult:
    result = lab.app(app.name, timeout=3.0)
    # The app client's last stderr line ends with the OS's reason ("... Connection refused").
    detail = result.seen_addr if result.ok else (result.stderr.strip().splitlines() or ["failed"])[-1]
    detail = detail.rsplit("] ", 1)[-1] if not result.ok else detail
    return DemoResult(app, result.seen_ip, detail)


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> int:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    return daemon.returncode


def _table(results: list[DemoResult]) -> Table:
    table = Table(title="awg-split-tunnel demo: what the web server saw", title_justify="left")
    table.add_column("app")
    table.add_column("expected route")
    table.add_column("address the web server saw")
    table.add_column("")
    for r in results:
        seen = r.seen or f"[dim]none: {r.detail}[/]"
        expected = r.app.expected or "no connection"
        mark = "[green]✓[/]" if r.ok else f"[red]✗ expected {expected}[/]"
        table.add_row(r.app.name, r.app.route, seen, mark)
    return table


def main() -> int:
    return run_demo(ui="--ui" in sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
