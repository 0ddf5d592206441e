"""End to end: DNS follows the app with a real local resolver, dnsmasq (Debian ``dnsmasq-base``), on both
data paths (docs/DNS.md).

dnsmasq listens on 127.0.0.53 in ns client and forwards to the lab's server in ns web (``web``); a second
server (``wg``) sits at the WireGuard tunnel's far end (198.19.0.1, reachable only through the tunnel) and
is the tunnel's ``DNS =`` server. The daemon finds dnsmasq by its socket (it knows no resolver by name).
With ``dns: {system: vpn}``:

- an app ruled into the tunnel asks dnsmasq and is answered through the tunnel, by ``wg``, from the
  tunnel address (its lookup never reaches dnsmasq);
- dnsmasq's own upstream lookups (those of direct apps) go into the tunnel to ``wg``, not to the server
  dnsmasq is configured with, over UDP and TCP.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO
from polling import wait_for
from running_daemon import RunningDaemon, stop_daemon
from test_dns import APP_DIRECT, answered_by, lookup, packet_conf, seen

from awg_split_tunnel.lab import (
    CLIENT,
    CLIENT_IP,
    TUNNEL_CLIENT_IP,
    TUNNEL_SERVER_IP,
    WEB_IP,
    WG,
    WG_PORT,
    Lab,
    WireGuardPeer,
    generate_keypair,
    make_app,
    start_wireguard_go,
)
from awg_split_tunnel.lab.dns_server import STUB_ADDRESS, WHOAMI, ask, start_dns

pytestmark = [
    *NEEDS_ROOT,
    NEEDS_WIREGUARD_GO,
    pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (Debian package dnsmasq-base)"),
]

CLIENT_PORT = 51820
UP_TIMEOUT = 30.0
APP_VPN = "dnsmasq-vpn-app"


def start_dnsmasq(lab: Lab) -> subprocess.Popen[bytes]:
    """dnsmasq as a local resolver would run: 127.0.0.53, forwarding to the lab's server, no cache (every
    lookup is forwarded, so each one shows its way)."""
    # --no-daemon: in the foreground, and no pid file written outside the lab.
    argv = ["dnsmasq", "--no-daemon", f"--listen-address={STUB_ADDRESS}", "--bind-interfaces", "--no-resolv"]
    argv += ["--no-hosts", f"--server={WEB_IP}", "--cache-size=0", "--user=root"]
    process = lab.spawn(CLIENT, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while ask(lab, CLIENT, STUB_ADDRESS) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"dnsmasq did not answer on {STUB_ADDRESS}: {err.decode(errors='replace')}")
        time.sleep(0.1)
    return process


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, str]]:
    with Lab() as lab:
        start_dns(lab)
        keys = generate_keypair()
        peer = start_wireguard_go(
            lab,
            peers=[WireGuardPeer(keys[1], [f"{TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{CLIENT_PORT}")],
            listen_port=WG_PORT,
            address=f"{TUNNEL_SERVER_IP}/24",
        )
        start_dns(lab, WG, TUNNEL_SERVER_IP, name="wg")
        for name in (APP_VPN, APP_DIRECT):
            make_app(lab, name)
        dnsmasq = start_dnsmasq(lab)
        try:
            yield lab, packet_conf(keys[0], TUNNEL_CLIENT_IP, CLIENT_PORT, peer.public_key, peer.endpoint)
        finally:
            dnsmasq.terminate()
            dnsmasq.wait(10)


@pytest.mark.parametrize("dataplane", ["divert", "kernel"])
def test_dnsmasq_lookups_follow_dns_system_and_a_tunnelled_apps_follow_its_tunnel(
    lab: tuple[Lab, str], dataplane: str, tmp_path: Path
) -> None:
    the_lab, conf = lab
    assert answered_by(the_lab, "stub") == "web"  # without the daemon: dnsmasq's own server
    (tmp_path / "wg.conf").write_text(conf)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"dataplane: {dataplane}\ndefault: direct\n"
        "tunnels:\n  - id: vpn\n    type: wireguard\n    config_file: wg.conf\n"
        f"rules:\n  - {{process: {APP_VPN}, tunnel: vpn, fallback: block}}\n"
        "dns:\n  system: vpn\n"
    )
    for path in (config, tmp_path / "wg.conf"):
        path.chmod(0o600)
    daemon = RunningDaemon(the_lab, config)
    try:
        daemon.wait_running()
        wait_for(lambda: "vpn UP" in daemon.output(), UP_TIMEOUT, "the tunnel UP", daemon.output)
        # The tunnelled app: through the tunnel to its DNS server, from the tunnel address.
        vpn_app = lookup(the_lab, APP_VPN, "stub", f"{secrets.token_hex(4)}.{WHOAMI}")
        assert seen(vpn_app) == TUNNEL_CLIENT_IP, daemon.output()[-3000:]
        # dnsmasq's own lookups (a direct app's): into the tunnel, to the tunnel's server, UDP and TCP.
        assert answered_by(the_lab, "stub") == "wg", daemon.output()[-3000:]
        assert answered_by(the_lab, "stub-tcp") == "wg", daemon.output()[-3000:]
        direct_app = lookup(the_lab, APP_DIRECT, "stub", f"{secrets.token_hex(4)}.{WHOAMI}")
        assert seen(direct_app) == TUNNEL_CLIENT_IP  # dnsmasq asked from inside the tunnel
    finally:
        stop_daemon(daemon.process)
    assert answered_by(the_lab, "stub") == "web"  # after a stop, dnsmasq's lookups go their own way again
