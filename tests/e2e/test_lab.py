"""The lab itself works: hosts reachable as predicted, every server answers, cleanup leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.lab import (
    AWG_TUNNEL_CLIENT_IP,
    CLIENT,
    CLIENT_IP,
    CLIENT_IP6,
    HOSTS,
    HTTP_IP,
    HTTP_IP6,
    HTTP_PROXY_AUTH_PORT,
    INET,
    SOCKS,
    SOCKS_AUTH_PORT,
    SOCKS_IP,
    SOCKS_IP6,
    TUNNEL_CLIENT_IP,
    TUNNEL_CLIENT_IP6,
    TUNNEL_SERVER_IP,
    TUNNEL_SERVER_IP6,
    UDP_ECHO_PORT,
    WEB,
    WEB_IP,
    WEB_IP6,
    WG_IP,
    Lab,
    LabError,
    LabServer,
    LabUnavailable,
    WireGuardPeer,
    WireGuardServer,
    cleanup_stale,
    generate_keypair,
    make_app,
    start_amneziawg_go,
    start_dante,
    start_internet,
    start_iperf3,
    start_microsocks,
    start_tinyproxy,
    start_wireguard_go,
)
from awg_split_tunnel.lab.echo_server import format_peer, pattern_bytes, pattern_sha256, serve
from awg_split_tunnel.lab.netns import OWNER_DIR, list_netns

# Same as conftest.needs_root; defined here so this module imports nothing from conftest.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

# -- the echo server's own logic (no root needed) ------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 70_000), st.integers(0, 70_000))
def test_pattern_stream_is_one_continuous_sequence(first: int, second: int) -> None:
    assert pattern_bytes(first + second) == pattern_bytes(first) + pattern_bytes(second, offset=first)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 200_000))
def test_pattern_sha256_is_the_hash_of_the_pattern(count: int) -> None:
    assert pattern_sha256(count) == hashlib.sha256(pattern_bytes(count)).hexdigest()


def test_peer_addresses_print_as_users_expect_them() -> None:
    assert format_peer("198.18.0.1", 54321) == ("198.18.0.1", "198.18.0.1:54321")
    assert format_peer("::ffff:198.18.0.1", 5) == ("198.18.0.1", "198.18.0.1:5")
    assert format_peer("2001:2::1", 80) == ("2001:2::1", "[2001:2::1]:80")


@pytest.fixture(scope="module")
def loopback_echo() -> Iterator[int]:
    """The echo server on 127.0.0.1 in a background thread (no root needed); yields its HTTP port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(port, 0, v4="127.0.0.1", v6=None))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.02)
    yield port
    loop.call_soon_threadsafe(task.cancel)
    thread.join(5)
    loop.close()


def _exchange(port: int, requests: list[bytes]) -> list[bytes]:
    """Send requests one after another on one connection; return each full response."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        stream = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = stream.readline()
                if not line:
                    raise ConnectionError("server closed the connection")
                head += line
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            answers.append(head + stream.read(length))
    return answers


def test_echo_server_answers_keepalive_requests(loopback_echo: int) -> None:
    chunked = b"POST /sha256 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    answers = _exchange(
        loopback_echo,
        [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /sha256 HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde",
            chunked,
            b"GET /bytes/1000 HTTP/1.1\r\n\r\n",
        ],
    )
    assert answers[0].split(b"\r\n\r\n")[1].startswith(b"127.0.0.1\n127.0.0.1:")
    digest = hashlib.sha256(b"abcde").hexdigest().encode()
    assert answers[1].endswith(digest + b"\n")
    assert answers[2].endswith(digest + b"\n")
    assert answers[3].split(b"\r\n\r\n", 1)[1] == pattern_bytes(1000)


def test_echo_server_answers_a_bad_request_line_with_400(loopback_echo: int) -> None:
    assert _exchange(loopback_echo, [b"NONSENSE\r\n\r\n"])[0].startswith(b"HTTP/1.1 400")


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_echo_server_survives_any_garbage(loopback_echo: int, garbage: bytes) -> None:
    with socket.create_connection(("127.0.0.1", loopback_echo), timeout=5) as sock:
        sock.sendall(garbage + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionError):
            while sock.recv(65536):
                pass
    assert _exchange(loopback_echo, [b"GET / HTTP/1.1\r\n\r\n"])[0].startswith(b"HTTP/1.1 200")


# -- the lab's shape ------------------------------------------------------------------------------------


@needs_root
def test_every_host_reaches_every_other_on_the_lab_network(lab: Lab) -> None:
    for host in HOSTS.values():
        for v6 in (False, True):
            family = socket.AF_INET6 if v6 else socket.AF_INET
            address = host.ipv6 if v6 else host.ipv4
            with lab.socket(host.name, family) as listener:
                listener.bind((address, 4000))
                listener.listen()
                peer_host = WEB if host.name == CLIENT else CLIENT
                with lab.socket(peer_host, family) as client:
                    client.settimeout(3)
                    client.connect((address, 4000))
                    accepted, peer = listener.accept()
                    accepted.close()
                assert peer[0] == lab.addr(peer_host, v6=v6)


@needs_root
def test_the_lab_has_no_way_out_of_the_machine(lab: Lab) -> None:
    bridge_side = lab.run(INET, ["ip", "-o", "link", "show"], check=True).stdout
    names = sorted(line.split(": ")[1].split("@")[0] for line in bridge_side.splitlines())
    assert names == sorted(["lo", "br0", *HOSTS])
    for host in HOSTS:
        links = lab.run(host, ["ip", "-o", "link", "show"], check=True).stdout
        assert sorted(line.split(": ")[1].split("@")[0] for line in links.splitlines()) == ["eth0", "lo"]
    # Anything outside the lab is routed onto the bridge, where no router exists.
    route = lab.run(CLIENT, ["ip", "route", "get", "203.0.113.9"], check=True).stdout
    assert "dev eth0" in route and "via" not in route


@needs_root
def test_call_runs_inside_the_hosts_namespace_only(lab: Lab) -> None:
    inside = lab.call(WEB, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inside == lab.ns_path(WEB).stat().st_ino
    assert os.stat("/proc/thread-self/ns/net").st_ino != inside


@needs_root
def test_namespace_and_address_names(lab: Lab) -> None:
    assert lab.ns_name(CLIENT) == f"{lab.prefix}-client"
    assert lab.ns_path(WEB) == Path("/run/netns") / f"{lab.prefix}-web"
    assert lab.addr(SOCKS) == SOCKS_IP and lab.addr(SOCKS, v6=True) == SOCKS_IP6
    assert {f"{lab.prefix}-{host}" for host in [INET, *HOSTS]} <= set(list_netns())
    with pytest.raises(KeyError):
        lab.ns_name("nowhere")


# -- apps and the web server ----------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize(
    ("udp", "v6", "expected"),
    [
        (False, False, CLIENT_IP),
        (False, True, CLIENT_IP6),
        (True, False, CLIENT_IP),
        (True, True, CLIENT_IP6),
    ],
)
def test_direct_app_sees_the_client_address(web_lab: Lab, udp: bool, v6: bool, expected: str) -> None:
    result = web_lab.app("app-direct", udp=udp, v6=v6)
    assert result.ok, result.stderr
    assert result.seen_ip == expected
    assert result.seen_addr.startswith(f"[{expected}]:" if v6 else f"{expected}:")


@needs_root
def test_running_app_shows_its_own_exe_name(web_lab: Lab) -> None:
    path = make_app(web_lab, "app-socks")
    process = web_lab.spawn_app("app-socks", delay=1)
    try:
        # nsenter execs the app (same pid); give it a moment to do so.
        deadline = time.monotonic() + 2
        while os.readlink(f"/proc/{process.pid}/exe") != str(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.readlink(f"/proc/{process.pid}/exe") == str(path)
        out, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out.splitlines()[0] == CLIENT_IP


@needs_root
def test_app_made_in_another_directory_runs_from_there(web_lab: Lab, tmp_path: Path) -> None:
    path = make_app(web_lab, "curl-like", tmp_path / "opt" / "tools" / "bin")
    assert path == tmp_path / "opt" / "tools" / "bin" / "curl-like"
    process = web_lab.spawn_app("curl-like", delay=0.5)
    deadline = time.monotonic() + 2
    while os.readlink(f"/proc/{process.pid}/exe") != str(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.readlink(f"/proc/{process.pid}/exe") == str(path)
    assert process.communicate(timeout=10)[0].splitlines()[0] == CLIENT_IP


@needs_root
def test_app_reports_an_unreachable_server_with_its_exit_code(web_lab: Lab) -> None:
    result = web_lab.app("app-direct", port=81, timeout=2)
    assert result.returncode == 4 and not result.seen_ip


@needs_root
def test_web_server_streams_and_hashes_for_checksum_transfers(web_lab: Lab, tmp_path: Path) -> None:
    count = 3_000_000
    fetched = web_lab.run(CLIENT, ["curl", "-sS", f"http://{WEB_IP}/bytes/{count}"], text=False)
    assert fetched.returncode == 0
    assert hashlib.sha256(fetched.stdout).hexdigest() == pattern_sha256(count)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(500_000))
    posted = web_lab.run(
        CLIENT, ["curl", "-sS", "--data-binary", f"@{upload}", f"http://[{WEB_IP6}]/sha256"], check=True
    )
    assert posted.stdout.strip() == hashlib.sha256(upload.read_bytes()).hexdigest()


@needs_root
def test_iperf3_server_is_ready_for_throughput_runs(lab: Lab) -> None:
    start_iperf3(lab)
    done = lab.run(CLIENT, ["iperf3", "-c", WEB_IP, "-t", "1", "-J"], check=True)
    assert json.loads(done.stdout)["end"]["sum_received"]["bytes"] > 0


# -- proxies ---------------------------------------------------------------------------------------------


def _curl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run(CLIENT, ["curl", "-sS", "--max-time", "5", *args])


@needs_root
def test_microsocks_relays_v4_and_v6_and_enforces_auth(web_lab: Lab) -> None:
    start_microsocks(web_lab)
    assert _curl(web_lab, "--socks5", f"{SOCKS_IP}:1080", f"http://{WEB_IP}/").stdout.startswith(
        SOCKS_IP + "\n"
    )
    v6 = _curl(web_lab, "--socks5", f"[{SOCKS_IP6}]:1080", f"http://[{WEB_IP6}]/")
    assert v6.stdout.startswith(SOCKS_IP6 + "\n")
    start_microsocks(web_lab, SOCKS_AUTH_PORT, "labuser", "labpass")
    assert _curl(web_lab, "--socks5", f"{SOCKS_IP}:{SOCKS_AUTH_PORT}", f"http://{WEB_IP}/").returncode != 0
    authed = _curl(web_lab, "--socks5", f"labuser:labpass@{SOCKS_IP}:{SOCKS_AUTH_PORT}", f"http://{WEB_IP}/")
    assert authed.stdout.startswith(SOCKS_IP + "\n")


def _socks5_udp_echo(lab: Lab, payload: bytes) -> bytes:
    """UDP ASSOCIATE with dante, one datagram to the UDP echo, the echo's reply (SOCKS header removed)."""
    with lab.socket(CLIENT) as control, lab.socket(CLIENT, socket.AF_INET, socket.SOCK_DGRAM) as udp:
        control.settimeout(5)
        udp.settimeout(5)
        udp.bind((CLIENT_IP, 0))
        control.connect((SOCKS_IP, 1080))
        control.sendall(b"\x05\x01\x00")
        assert control.recv(2) == b"\x05\x00"
        control.sendall(
            b"\x05\x03\x00\x01" + socket.inet_aton(CLIENT_IP) + struct.pack("!H", udp.getsockname()[1])
        )
        reply = control.recv(10)
        assert reply[:2] == b"\x05\x00", reply
        relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
        udp.sendto(
            b"\x00\x00\x00\x01" + socket.inet_aton(WEB_IP) + struct.pack("!H", UDP_ECHO_PORT) + payload, relay
        )
        answer = udp.recv(65535)
    return answer[10:]


@needs_root
def test_dante_relays_tcp_and_udp_associate(web_lab: Lab) -> None:
    dante = start_dante(web_lab)
    assert _curl(web_lab, "--socks5", f"{SOCKS_IP}:1080", f"http://{WEB_IP}/").stdout.startswith(
        SOCKS_IP + "\n"
    )
    v6 = _curl(web_lab, "--socks5", f"[{SOCKS_IP6}]:1080", f"http://[{WEB_IP6}]/")
    assert v6.stdout.startswith(SOCKS_IP6 + "\n")
    echoed = _socks5_udp_echo(web_lab, b"through dante")
    assert echoed.startswith(SOCKS_IP.encode() + b":") and echoed.endswith(b"\nthrough dante")
    dante.restart()
    assert _curl(web_lab, "--socks5", f"{SOCKS_IP}:1080", f"http://{WEB_IP}/").stdout.startswith(
        SOCKS_IP + "\n"
    )


@needs_root
def test_tinyproxy_relays_get_and_connect_and_enforces_auth(web_lab: Lab) -> None:
    start_tinyproxy(web_lab)
    plain = _curl(web_lab, "-x", f"http://{HTTP_IP}:3128", f"http://{WEB_IP}/")
    assert plain.stdout.startswith(HTTP_IP + "\n")
    tunnelled = _curl(web_lab, "-p", "-x", f"http://[{HTTP_IP6}]:3128", f"http://[{WEB_IP6}]/")
    assert tunnelled.stdout.startswith(HTTP_IP6 + "\n")
    start_tinyproxy(web_lab, HTTP_PROXY_AUTH_PORT, "labuser", "labpass")
    refused = _curl(
        web_lab, "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{HTTP_IP}:3129", f"http://{WEB_IP}/"
    )
    assert refused.stdout == "407"
    authed = _curl(web_lab, "-p", "-x", f"http://labuser:labpass@{HTTP_IP}:3129", f"http://{WEB_IP}/")
    assert authed.stdout.startswith(HTTP_IP + "\n")


@needs_root
def test_a_stopped_server_refuses_and_a_restarted_one_answers(web_lab: Lab) -> None:
    socks = start_microsocks(web_lab)
    socks.stop()
    assert not socks.running
    assert _curl(web_lab, "--socks5", f"{SOCKS_IP}:1080", f"http://{WEB_IP}/").returncode != 0
    socks.start()
    assert _curl(web_lab, "--socks5", f"{SOCKS_IP}:1080", f"http://{WEB_IP}/").stdout.startswith(SOCKS_IP)


@needs_root
def test_a_server_that_dies_at_start_reports_its_output(lab: Lab) -> None:
    broken = LabServer(lab, "broken", SOCKS, ["sh", "-c", "echo cannot bind >&2; exit 3"], lambda: False)
    with pytest.raises(LabError, match="cannot bind"):
        broken.start()


# -- WireGuard / AmneziaWG peers -------------------------------------------------------------------------


def _start_pair(
    lab: Lab, amnezia: dict[str, str | int] | None = None
) -> tuple[WireGuardServer, WireGuardServer]:
    """The lab's peer in ns wg and a userspace client of the same kind in ns client."""
    client_private, client_public = generate_keypair()
    tunnel_routes = [f"{WEB_IP}/32", f"{WEB_IP6}/128"]
    client_peer = WireGuardPeer(client_public, [f"{TUNNEL_CLIENT_IP}/32", f"{TUNNEL_CLIENT_IP6}/128"])
    server_addresses = [f"{TUNNEL_SERVER_IP}/24", f"{TUNNEL_SERVER_IP6}/64"]
    client_addresses = [f"{TUNNEL_CLIENT_IP}/24", f"{TUNNEL_CLIENT_IP6}/64"]
    if amnezia is None:
        server = start_wireguard_go(lab, peers=[client_peer], address=server_addresses)
        server_peer = WireGuardPeer(server.public_key, tunnel_routes, endpoint=server.endpoint)
        client = start_wireguard_go(
            lab,
            host=CLIENT,
            private_key=client_private,
            peers=[server_peer],
            listen_port=None,
            address=client_addresses,
            routes=tunnel_routes,
        )
    else:
        server = start_amneziawg_go(lab, peers=[client_peer], address=server_addresses, awg_params=amnezia)
        server_peer = WireGuardPeer(server.public_key, tunnel_routes, endpoint=server.endpoint)
        client = start_amneziawg_go(
            lab,
            host=CLIENT,
            private_key=client_private,
            peers=[server_peer],
            listen_port=None,
            address=client_addresses,
            routes=tunnel_routes,
            awg_params=amnezia,
        )
    return server, client


@needs_root
def test_wireguard_go_peer_forwards_to_the_web_server_without_nat(web_lab: Lab) -> None:
    server, client = _start_pair(web_lab)
    assert server.endpoint == f"{WG_IP}:51820" and len(server.ifname) <= 15
    cases = [
        (False, False, TUNNEL_CLIENT_IP),
        (False, True, TUNNEL_CLIENT_IP6),
        (True, False, TUNNEL_CLIENT_IP),
    ]
    for udp, v6, expected in cases:
        result = web_lab.app("app-wg", udp=udp, v6=v6)
        assert result.ok, result.stderr
        assert result.seen_ip == expected
    assert "latest handshake" in server.show()
    server.stop()
    assert web_lab.app("app-wg", timeout=1).returncode == 3
    # A restarted peer has no session; restarting the client too gives a fresh handshake at once.
    server.start()
    client.restart()
    assert web_lab.app("app-wg").seen_ip == TUNNEL_CLIENT_IP


@needs_root
def test_internet_with_an_amneziawg_peer_carries_obfuscated_traffic(lab: Lab) -> None:
    params: dict[str, str | int] = {"jc": 3, "jmin": 50, "jmax": 60, "s1": 37, "s2": 61}
    params |= {"h1": 1001, "h2": 1002, "h3": 1003, "h4": 1004}
    client_private, client_public = generate_keypair()
    client_peer = WireGuardPeer(client_public, [f"{AWG_TUNNEL_CLIENT_IP}/32"])
    try:
        internet = start_internet(lab, amneziawg_client=client_peer, awg_params=params)
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    assert internet.amneziawg is not None and internet.wireguard is None
    assert all(server.running for server in internet.servers())
    server_peer = WireGuardPeer(
        internet.amneziawg.public_key, [f"{WEB_IP}/32"], endpoint=internet.amneziawg.endpoint
    )
    start_amneziawg_go(
        lab,
        host=CLIENT,
        private_key=client_private,
        peers=[server_peer],
        listen_port=None,
        address=f"{AWG_TUNNEL_CLIENT_IP}/24",
        routes=[f"{WEB_IP}/32"],
        awg_params=params,
    )
    with lab.capture(CLIENT, bpf_filter=f"udp and host {WG_IP}") as capture:
        result = lab.app("app-awg")
    assert result.seen_ip == AWG_TUNNEL_CLIENT_IP, result.stderr
    # Junk packets (jc=3, 50..60 bytes) go out before the handshake initiation.
    sizes = [int(line.rsplit("length ", 1)[1]) for line in capture.packets(f"dst host {WG_IP}")]
    assert sum(1 for size in sizes[:3] if 50 <= size <= 60) == 3
    assert "latest handshake" in internet.amneziawg.show()
    # The rest of the internet answers too.
    assert _curl(lab, "--socks5", f"{SOCKS_IP}:1080", f"http://{WEB_IP}/").stdout.startswith(SOCKS_IP + "\n")
    assert _curl(lab, "-x", f"http://{HTTP_IP}:3128", f"http://{WEB_IP}/").stdout.startswith(HTTP_IP + "\n")


# -- capture and cleanup ---------------------------------------------------------------------------------


@needs_root
def test_capture_counts_only_matching_packets(web_lab: Lab) -> None:
    with web_lab.capture(CLIENT, bpf_filter="tcp or udp") as capture:
        assert web_lab.app("app-direct").ok
    to_web = capture.count(f"tcp and dst host {WEB_IP} and dst port 80")
    assert to_web >= 3  # SYN, ACK, request, ...
    assert capture.count(f"dst host {SOCKS_IP}") == 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for init to reap it counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@needs_root
def test_close_removes_namespaces_processes_and_sockets_even_after_failure() -> None:
    with pytest.raises(RuntimeError, match="test failure"), Lab() as lab:
        server = start_microsocks(lab)
        wg = start_wireguard_go(lab)
        # A daemon that detached from whoever started it is found through its namespace.
        detached = lab.run(WEB, ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], check=True)
        pids = [server.pid, wg.server.pid, int(detached.stdout)]
        raise RuntimeError("test failure")
    assert not [name for name in list_netns() if name.startswith(lab.prefix)]
    for pid in pids:
        assert pid is not None and not _alive(pid)
    assert not Path(f"/var/run/wireguard/{wg.ifname}.sock").exists()
    assert not lab.tmpdir.exists()
    assert not (OWNER_DIR / f"{lab.prefix}.owner").exists()
    lab.close()  # harmless twice


@needs_root
def test_cleanup_stale_removes_dead_labs_and_spares_live_ones() -> None:
    with Lab() as live:
        crashed = Lab().start()
        # Pretend the crashed lab's owner died: a pid that has just exited.
        finished = subprocess.Popen(["true"])
        finished.wait()
        (OWNER_DIR / f"{crashed.prefix}.owner").write_text(f"{finished.pid}\n")
        removed = cleanup_stale("awl")
        assert all(name.startswith(crashed.prefix) for name in removed) and len(removed) == 6
        assert not [name for name in list_netns() if name.startswith(crashed.prefix)]
        assert len([name for name in list_netns() if name.startswith(live.prefix)]) == 6
        crashed.close()


def test_lab_refuses_prefixes_that_would_break_interface_names() -> None:
    with pytest.raises(ValueError):
        Lab("much-too-long-prefix")


@needs_root
def test_whole_lab_starts_quickly(lab: Lab) -> None:
    started = time.monotonic()
    with Lab() as other:
        assert other.prefix != lab.prefix
    assert time.monotonic() - started < 10
