"""`wg` and `awg` look inside and drive our `tun` command's device through its control socket (UAPI).

The real `wg` from wireguard-tools (and `awg` from the reference tools, when they are built) against our
client in ns client, with a wireguard-go (or amneziawg-go) peer in ns wg, as in test_wg_interop.py.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO
from polling import wait_for
from test_awg_interop import PARAMETER_SETS, conf_text, reference_params
from test_wg_interop import OurClient, Setup, make_setup, udp_echo

from awg_split_tunnel.lab import Lab, LabUnavailable
from awg_split_tunnel.lab.servers import (
    WireGuardPeer,
    amneziawg_peer_bin,
    generate_keypair,
    public_key,
    start_amneziawg_go,
)
from awg_split_tunnel.lab.topology import CLIENT, TUNNEL_CLIENT_IP, UPLINK, WG, WG_PORT
from awg_split_tunnel.provider.wireguard.uapi_socket import AMNEZIAWG_SOCKET_DIR, WIREGUARD_SOCKET_DIR

pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]

SECOND_WG_IP = "198.18.0.41"
"""A second address of the peer's namespace: where `wg set ... endpoint` moves the traffic."""


def dump(lab: Lab, ifname: str, tool: str = "wg") -> tuple[list[str], list[list[str]]]:
    """`wg show IFNAME dump`: the interface's fields and one field list per peer."""
    done = lab.run(CLIENT, [tool, "show", ifname, "dump"])
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    return lines[0], lines[1:]


def wg_set(lab: Lab, *argv: str, tool: str = "wg") -> None:
    done = lab.run(CLIENT, [tool, "set", *argv])
    assert done.returncode == 0, done.stderr


@pytest.fixture
def setup(web_lab: Lab) -> Iterator[Setup]:
    s = make_setup(web_lab, name="u")
    s.client.start()
    try:
        yield s
    finally:
        s.client.stop()


def test_wg_show_lists_the_peer_with_a_recent_handshake_and_transfer(setup: Setup) -> None:
    ifname = setup.client.ifname
    assert udp_echo(setup.lab) == [TUNNEL_CLIENT_IP] * 3, setup.client.output()
    interface, peers = dump(setup.lab, ifname)
    private, public, port, _fwmark = interface
    assert public == public_key(private)
    assert port == "51900"
    assert len(peers) == 1
    key, psk, endpoint, allowed, handshake, rx, tx, keepalive = peers[0]
    assert key == setup.server.public_key
    assert psk == "(none)"
    assert endpoint == setup.server.endpoint
    assert "198.19.0.1/32" in allowed.split(",")
    assert abs(time.time() - int(handshake)) < 60
    assert int(rx) > 0 and int(tx) > 0
    assert keepalive == "off"
    shown = setup.lab.run(CLIENT, ["wg", "show", ifname]).stdout
    assert "latest handshake" in shown and "transfer" in shown
    assert f"interface: {ifname}" in setup.lab.run(CLIENT, ["wg", "show"]).stdout
    conf = setup.lab.run(CLIENT, ["wg", "showconf", ifname]).stdout
    assert f"PublicKey = {setup.server.public_key}" in conf and f"Endpoint = {setup.server.endpoint}" in conf
    # The key only ever travels over a socket only root may open, and never into the log.
    mode = os.stat(WIREGUARD_SOCKET_DIR / f"{ifname}.sock")
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == 0
    assert private not in setup.client.output()


def test_wg_set_endpoint_moves_the_traffic_to_another_address_of_the_peer(setup: Setup) -> None:
    lab = setup.lab
    lab.run(WG, ["ip", "addr", "add", f"{SECOND_WG_IP}/24", "dev", UPLINK], check=True)
    assert udp_echo(lab, count=1) == [TUNNEL_CLIENT_IP], setup.client.output()
    wg_set(lab, setup.client.ifname, "peer", setup.server.public_key, "endpoint", f"{SECOND_WG_IP}:{WG_PORT}")
    with lab.capture(WG, bpf_filter=f"udp and dst host {SECOND_WG_IP} and dst port {WG_PORT}") as moved:
        assert udp_echo(lab) == [TUNNEL_CLIENT_IP] * 3, setup.client.output()
    assert moved.count() >= 3
    _, peers = dump(lab, setup.client.ifname)
    assert peers[0][2] == f"{SECOND_WG_IP}:{WG_PORT}"


def test_wg_set_remove_stops_the_traffic_and_a_new_peer_brings_it_back(setup: Setup) -> None:
    lab, ifname, server = setup.lab, setup.client.ifname, setup.server
    assert udp_echo(lab, count=1) == [TUNNEL_CLIENT_IP], setup.client.output()
    wg_set(lab, ifname, "peer", server.public_key, "remove")
    assert dump(lab, ifname)[1] == []
    assert udp_echo(lab, count=2, timeout=1.0) == []
    allowed = "198.19.0.1/32,198.18.0.10/32"
    wg_set(lab, ifname, "peer", server.public_key, "endpoint", server.endpoint, "allowed-ips", allowed)
    assert udp_echo(lab) == [TUNNEL_CLIENT_IP] * 3, setup.client.output()
    assert dump(lab, ifname)[1][0][3] == allowed


def test_wg_set_allowed_ips_changes_what_goes_to_the_peer(setup: Setup) -> None:
    lab, ifname = setup.lab, setup.client.ifname
    assert udp_echo(lab, count=1) == [TUNNEL_CLIENT_IP], setup.client.output()
    wg_set(lab, ifname, "peer", setup.server.public_key, "allowed-ips", "198.19.0.1/32")
    assert udp_echo(lab, count=2, timeout=1.0) == []  # the web server is no longer behind this peer
    assert dump(lab, ifname)[1][0][3] == "198.19.0.1/32"


def test_a_malformed_request_gets_an_errno_and_the_device_keeps_running(setup: Setup) -> None:
    path = WIREGUARD_SOCKET_DIR / f"{setup.client.ifname}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b"set=1\nlisten_port=not-a-port\n\nset=1\npublic_key=zz\n\n")
        assert read_answers(sock, 2) == [b"errno=-22\n\n"] * 2
    assert udp_echo(setup.lab, count=1) == [TUNNEL_CLIENT_IP], setup.client.output()


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\n\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return [part + b"\n\n" for part in data.split(b"\n\n") if part]


def test_the_socket_replaces_a_stale_one_and_goes_on_stop(web_lab: Lab) -> None:
    s = make_setup(web_lab, name="st")
    path = WIREGUARD_SOCKET_DIR / f"{s.client.ifname}.sock"
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a dead process's socket: the file stays, nobody listens
    stale.close()
    s.client.start()
    try:
        assert dump(web_lab, s.client.ifname)[1][0][0] == s.server.public_key
    finally:
        s.client.stop()
    assert not path.exists()


# -- AmneziaWG: `awg` against our client, with the reference amneziawg-go as the peer -------------------


@pytest.fixture(scope="module")
def awg_tool() -> str:
    try:
        return str(amneziawg_peer_bin() / "awg")
    except LabUnavailable as exc:
        pytest.skip(f"needs the reference awg tool: {exc}")


def test_awg_show_lists_the_amneziawg_parameters(web_lab: Lab, awg_tool: str) -> None:
    params = PARAMETER_SETS["2.0"]
    client_private, client_public = generate_keypair()
    server = start_amneziawg_go(
        web_lab,
        peers=[WireGuardPeer(client_public, [f"{TUNNEL_CLIENT_IP}/32"])],
        awg_params=reference_params(web_lab, params),
        listen_port=51821,
    )
    conf = web_lab.tmpdir / "awg-show.conf"
    conf.write_text(conf_text(client_private, server.public_key, params, server=False))
    client = OurClient(web_lab, web_lab.new_ifname("c"), conf, web_lab.tmpdir / "awg-show.log")
    client.start()
    try:
        answers = udp_echo(web_lab, count=5, timeout=1.5)
        assert len(answers) >= 4, client.output()
        assert (AMNEZIAWG_SOCKET_DIR / f"{client.ifname}.sock").exists()
        assert not (WIREGUARD_SOCKET_DIR / f"{client.ifname}.sock").exists()
        shown = web_lab.run(CLIENT, [awg_tool, "show", client.ifname]).stdout
        for line in ("jc: 3", "jmin: 50", "jmax: 60", "s1: 37", "s2: 61", "s3: 11", "s4: 7"):
            assert line in shown, shown
        for line in ("h1: 100-199", "h2: 200-299", "h3: 300-399", "h4: 400-499", "i1: <b 0xc0ffee><r 5><t>"):
            assert line in shown, shown
        assert "latest handshake" in shown
        conf_shown = web_lab.run(CLIENT, [awg_tool, "showconf", client.ifname]).stdout
        assert "Jc = 3" in conf_shown and "H1 = 100-199" in conf_shown
        # `awg set` drives it too: the peer removed, then added back.
        done = web_lab.run(CLIENT, [awg_tool, "set", client.ifname, "peer", server.public_key, "remove"])
        assert done.returncode == 0, done.stderr
        wait_for(
            lambda: "peer:" not in web_lab.run(CLIENT, [awg_tool, "show", client.ifname]).stdout, 5, "removed"
        )
    finally:
        client.stop()
