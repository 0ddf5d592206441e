"""End to end: a router process that stops answering (SIGSTOP) is caught by the daemon's watchdog, one that
ends (SIGKILL) by its pipe's end; the daemon fails closed on both data paths (docs/DATAPATHS.md, "When the
router process stops answering").

The lab of ``test_kernel_datapath.py``: a SOCKS5 tunnel (dante), a WireGuard tunnel (wireguard-go) and two
block apps, ``app-block`` (through SOCKS5) and ``app-wgblock`` (through WireGuard). From the moment the
router process is stopped, a capture on the client's uplink sees nothing of them towards the web server —
neither a new connection nor the next sends of a connection opened before — past the ~3 s after which a
stopped divert handle lets packets pass. The daemon says what happened: on ``divert`` it keeps running and
holds every packet until it is stopped (then traffic flows again); on ``kernel`` it stops with exit code 1
and the kernel's rules hold until ``cleanup``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO
from polling import wait_for
from running_daemon import RunningDaemon
from test_kernel_datapath import (
    BLOCK_APPS,
    CONFIG,
    TO_WEB,
    assert_block_apps_leave_nothing,
    kernel_lab,
    open_block_connections,
    router_pid,
    stop_all,
)

from awg_split_tunnel.lab import CLIENT, CLIENT_IP, Lab
from awg_split_tunnel.lab.topology import python_path

pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]
__all__ = ["kernel_lab"]  # the fixture, shared with test_kernel_datapath.py

FAIL_OPEN_AFTER = 3.0
"""Seconds after which a stopped divert handle's owner lets packets pass (scripts/repro/)."""


def start(lab: Lab, dataplane: str) -> RunningDaemon:
    config = lab.tmpdir / "config.yaml"
    config.write_text(CONFIG.replace("dataplane: kernel", f"dataplane: {dataplane}"))
    running = RunningDaemon(lab, config)
    running.wait_running()
    for app, seen in BLOCK_APPS.items():
        wait_for(
            lambda app=app, seen=seen: lab.app(app, timeout=2.0).seen_ip == seen, 15.0, f"{app} tunnelled"
        )
    return running


LOST = {
    signal.SIGSTOP: "the packet router process stopped answering",
    signal.SIGKILL: "the packet router process ended unexpectedly",
}
"""What the daemon says when its router process is stopped or killed."""


@pytest.mark.parametrize("dataplane", ["divert", "kernel"])
@pytest.mark.parametrize("lost_by", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_lost_router_process_is_caught_and_block_apps_put_nothing_on_the_uplink(
    kernel_lab: Lab, dataplane: str, lost_by: signal.Signals
) -> None:
    lab = kernel_lab
    running = start(lab, dataplane)
    open_apps = open_block_connections(lab)
    router = router_pid(running)
    try:
        with lab.capture(CLIENT, "eth0", TO_WEB) as everything:
            os.kill(router, lost_by)
            stopped_at = time.monotonic()
            wait_for(lambda: LOST[lost_by] in running.output(), 10.0, "the daemon says so", running.output)
            assert time.monotonic() - stopped_at < FAIL_OPEN_AFTER, "the watchdog acted before a leak"
            wait_for(lambda: not os.path.exists(f"/proc/{router}"), 5.0, "the stopped router process killed")
            # Past the moment a stopped divert handle would let packets pass.
            time.sleep(max(0.0, stopped_at + FAIL_OPEN_AFTER + 0.5 - time.monotonic()))
            assert_block_apps_leave_nothing(lab, open_apps)
        assert everything.count() == 0, "\n".join(everything.packets())
    finally:
        stop_all(open_apps)
        if os.path.exists(f"/proc/{router}"):
            os.kill(router, signal.SIGCONT)
    if dataplane == "kernel":
        assert running.process.wait(10) == 1, running.output()[-3000:]
        assert "the kernel's rules stay and hold every new connection" in running.output()
        env = {**os.environ, "PYTHONPATH": python_path()}
        cleanup = lab.run(CLIENT, [sys.executable, "-m", "awg_split_tunnel", "cleanup"], env=env)
        assert cleanup.returncode == 0, cleanup.stderr
    else:
        assert running.process.poll() is None, "the daemon keeps running and holding"
        assert "every outbound packet is held (fail closed)" in running.output()
        status = lab.run(
            CLIENT,
            [sys.executable, "-m", "awg_split_tunnel", "status"],
            env={**os.environ, "PYTHONPATH": python_path(), "AWG_SPLIT_TUNNEL_CONTROL": str(running.control)},
        )
        assert f"failed closed: {LOST[lost_by]}" in status.stdout, status
        assert lab.app("app-direct", timeout=2.0).seen_ip == "", "every app's packets are held"
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(15) == 1, running.output()[-3000:]
    assert lab.app("app-direct").seen_ip == CLIENT_IP, "once the daemon is stopped, traffic flows again"
