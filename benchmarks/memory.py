"""The daemon's memory with 8 WireGuard/AmneziaWG tunnels up and 10,000 flows, against the same daemon with
no tunnels, measured in the same run; the budget is 80 MB for the daemon and its router process: the RAM
their resident pages take, each page counted once (the interpreter's and libraries' pages they share are
in both RSS figures, so the RSS sum, also printed, counts them twice).

Run as root: ``python3 benchmarks/memory.py [--dataplane kernel|divert] [--flows 10000] [--skip-lab]``.

1. **Lab** (real): one lab (network namespaces, 198.18.0.0/15 only), the web server in ns web, eight peers
   in ns wg — four wireguard-go and four AmneziaWG 2.0 peers (the reference amneziawg-go when it is built,
   else our own ``tun`` command as the server). The real daemon (``python -m awg_split_tunnel.daemon``)
   runs in ns client twice, one after the other: with no tunnels (the baseline), then with the eight
   tunnels. Once every tunnel is UP, two test apps open real UDP flows to the web server, each from its
   own connected socket to its own port (ns web's nftables hand them all to the UDP echo, which answers
   each): half ruled into the first WireGuard tunnel, half direct. RSS, PSS, anonymous memory and peak
   of the daemon, the router process and multiprocessing's resource tracker, and the page frames the
   daemon and the router map (``/proc/PID/pagemap``, each counted once) are read before and after
   ``status`` (which copies every flow through the pipe once), with the number of flows the router holds
   (on the kernel data path only those it must remember; the kernel's conntrack count in ns client shows
   them all).
2. **Imports**: what each import adds to one process's RSS (every daemon process pays it).
3. **Where it goes** (synthetic, no root): in this process, with tracemalloc on, the same router
   structures — a ``PacketRouter`` with the eight packet tunnels' routes, eight ``WireGuardDevice``
   objects (not started) and the same number of synthetic UDP flows routed through ``PacketRouter.route``
   — and the ten biggest allocation sites.

Prints all three, the loaded ÷ baseline ratio, and whether the 80 MB budget is met.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

BUDGET_MB = 80.0
TUNNELS = 8
WG_BASE_PORT = 51840
CLIENT_BASE_PORT = 51960
APP_TUNNEL, APP_DIRECT = "app-memtun", "app-memdirect"
FLOW_PORTS = (10_000, 59_999)
"""The web server's ports the apps' flows go to (one per flow), all answered by its UDP echo."""
AWG_PARAMS: dict[str, str] = {
    "Jc": "3", "Jmin": "50", "Jmax": "60", "S1": "37", "S2": "61", "S3": "11", "S4": "7",
    "H1": "100-199", "H2": "200-299", "H3": "300-399", "H4": "400-499",
    "I1": "<b 0xc0ffee><r 5><t>",
}  # fmt: skip
AWG_SET_NAMES = {k: k.lower() for k in AWG_PARAMS}

# A new connected UDP socket (a new flow) per datagram to the web server, each to its own port (from
# BASE): the router tells a flow's owner by its connect event, matched by destination, so every flow has
# one; ns web sends those ports to its UDP echo, which answers each. All kept open, sent
# in batches of 100, each once the previous one is answered (or after 2 s), so the first packets arrive
# at the pace the router decides them. Prints how many were answered and the seconds it took.
FLOW_OPENER = """
import resource, select, socket, sys, time
host, base, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 100), hard))
started = time.monotonic()
sockets, answered = [], 0
poller = select.epoll()
def collect(wait):
    global answered
    for fd, _ in poller.poll(wait):
        answered += 1
        poller.unregister(fd)
for first in range(0, count, 100):
    for i in range(first, min(count, first + 100)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect((host, base + i))
        s.send(b"flow %d" % i)
        sockets.append(s)
        poller.register(s.fileno(), select.EPOLLIN)
    deadline = time.monotonic() + 2
    while answered < len(sockets) * 0.95 and time.monotonic() < deadline:
        collect(0.05)
collect(1.0)
print(answered, round(time.monotonic() - started, 1))
"""


def _mb(kib: int) -> float:
    return kib / 1024.0


Memory = dict[str, float]
"""One process's memory in MB: rss, peak (VmHWM), pss (shared pages divided among their users), anon."""


def proc_memory(pid: int) -> Memory:
    """A process's memory from /proc/PID/status and /proc/PID/smaps_rollup."""
    fields = {"VmRSS:": "rss", "VmHWM:": "peak", "RssAnon:": "anon", "Pss:": "pss"}
    out = dict.fromkeys(fields.values(), 0.0)
    for name in ("status", "smaps_rollup"):
        with open(f"/proc/{pid}/{name}") as table:
            for line in table:
                parts = line.split()
                if parts and parts[0] in fields:
                    out[fields[parts[0]]] = _mb(int(parts[1]))
    return out


def process_tree(pid: int) -> dict[str, int]:
    """The daemon and its descendants by role: daemon, router, resource_tracker (multiprocessing's)."""
    import psutil

    roles = {"daemon": pid}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        role = (
            "router"
            if "spawn_main" in cmdline
            else "resource_tracker"
            if "resource_tracker" in cmdline
            else "other"
        )
        roles[role if role not in roles else f"{role}:{child.pid}"] = child.pid
    return roles


def tree_memory(pid: int) -> dict[str, Memory]:
    """``proc_memory`` of each process of ``process_tree``; one that ended meanwhile (a short-lived child
    such as ``nft``) is left out."""
    out: dict[str, Memory] = {}
    for role, p in process_tree(pid).items():
        try:
            out[role] = proc_memory(p)
        except ProcessLookupError:
            if role in ("daemon", "router"):
                raise
    return out


def summed(
    memory: dict[str, Memory], key: str = "rss", roles: tuple[str, ...] = ("daemon", "router")
) -> float:
    return sum(m[key] for role, m in memory.items() if role in roles)


PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63


def resident_once(pids: list[int]) -> float:
    """MB of RAM the processes' resident pages take, each physical page counted once however many of them
    map it (the interpreter's and libraries' code, shared by both): the union of the page frames of
    their mappings, from /proc/PID/pagemap (root sees the frame numbers)."""
    frames: set[int] = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if start >= 1 << 47:  # [vsyscall]
                    continue
                pagemap.seek(start // PAGE * 8)
                data = pagemap.read((end - start) // PAGE * 8)
                for (entry,) in struct.iter_unpack("=Q", data):
                    if entry & PRESENT and entry & PFN_MASK:
                        frames.add(entry & PFN_MASK)
    return len(frames) * PAGE / (1 << 20)


def stage_memory(pid: int) -> dict[str, Any]:
    """Each process's ``proc_memory``, and the daemon's and router's resident pages counted once."""
    tree = process_tree(pid)
    return {
        "processes": tree_memory(pid),
        "once": resident_once([p for role, p in tree.items() if role in ("daemon", "router")]),
    }


IMPORT_STEPS = (
    "asyncio",
    "cryptography.hazmat.primitives.ciphers.aead",
    "psutil",
    "pydantic",
    "ruamel.yaml",
    "rich.console",
    "typer",
    "dns.message",
    "netfilterqueue",
    "pydivert",
    "awg_split_tunnel.core.config",
    "awg_split_tunnel.daemon",
    "awg_split_tunnel.router.service",
    "awg_split_tunnel.platform.linux.kernel_datapath",
)
IMPORTS = """
import importlib, json, sys
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
steps = [("python itself", rss())]
for name in sys.argv[1:]:
    before = rss()
    try:
        importlib.import_module(name)
    except Exception as exc:
        steps.append((name + " (" + type(exc).__name__ + ")", rss() - before))
        continue
    steps.append((name, rss() - before))
print(json.dumps({"rss_mb": rss(), "modules": len(sys.modules), "steps": steps}))
"""
"""What one process of the daemon costs before it does anything: RSS after each group of imports, in the
order the heaviest are pulled in (each step counts only what it adds)."""


def measure_imports() -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    argv = [sys.executable, "-c", IMPORTS, *IMPORT_STEPS]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return dict(json.loads(done.stdout))


# -- the lab ---------------------------------------------------------------------------------------------


def start_peers(lab: Any, client_public: str) -> tuple[list[Any], list[Any], str]:
    """Four wireguard-go and four AmneziaWG peers in ns wg; which AmneziaWG peer was used."""
    from awg_split_tunnel.lab.netns import LabUnavailable
    from awg_split_tunnel.lab.servers import (
        WireGuardPeer,
        start_amneziawg_go,
        start_our_amneziawg,
        start_wireguard_go,
    )
    from awg_split_tunnel.lab.topology import TUNNEL_CLIENT_IP, TUNNEL_SERVER_IP

    wg_peers = []
    for i in range(TUNNELS // 2):
        # Only the first carries traffic (198.19.0.0/24 is routed to the web server); the others
        # handshake and keep their tunnel UP.
        address = f"{TUNNEL_SERVER_IP}/24" if i == 0 else f"198.19.{10 + i}.1/24"
        allowed = f"{TUNNEL_CLIENT_IP}/32" if i == 0 else f"198.19.{10 + i}.2/32"
        wg_peers.append(
            start_wireguard_go(
                lab,
                peers=[WireGuardPeer(client_public, [allowed])],
                listen_port=WG_BASE_PORT + i,
                address=address,
                log_level="error",
            )
        )
    awg_peers = []
    flavour = "amneziawg-go"
    for i in range(TUNNELS // 2):
        port = WG_BASE_PORT + TUNNELS // 2 + i
        address = f"198.19.{20 + i}.1/24"
        client_address = f"198.19.{20 + i}.2"
        try:
            if flavour != "amneziawg-go":
                raise LabUnavailable("")
            params = {AWG_SET_NAMES[k]: v for k, v in AWG_PARAMS.items()}
            awg_peers.append(
                start_amneziawg_go(
                    lab,
                    peers=[WireGuardPeer(client_public, [f"{client_address}/32"])],
                    listen_port=port,
                    address=address,
                    awg_params=params,
                    log_level="error",
                )
            )
        except LabUnavailable:
            flavour = "ours (tun command)"
            awg_peers.append(
                start_our_amneziawg(
                    lab,
                    client_public,
                    AWG_PARAMS,
                    listen_port=port,
                    address=address,
                    client_address=client_address,
                )
            )
    return wg_peers, awg_peers, flavour


def client_conf(
    private: str, peer_public: str, endpoint: str, address: str, port: int, params: dict[str, str]
) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in params.items())
    return (
        f"[Interface]\nPrivateKey = {private}\nAddress = {address}/24\nListenPort = {port}\n{extra}\n"
        f"[Peer]\nPublicKey = {peer_public}\nEndpoint = {endpoint}\nAllowedIPs = 0.0.0.0/0\n"
    )


def write_configs(
    lab: Any, private: str, wg_peers: list[Any], awg_peers: list[Any], dataplane: str
) -> tuple[Path, Path]:
    """The baseline config (no tunnels) and the loaded one (eight tunnels, the tunnel app's rule)."""
    from awg_split_tunnel.lab.topology import TUNNEL_CLIENT_IP

    tunnels = ""
    for i, peer in enumerate(wg_peers):
        address = TUNNEL_CLIENT_IP if i == 0 else f"198.19.{10 + i}.2"
        conf = lab.tmpdir / f"wg{i}.conf"
        conf.write_text(
            client_conf(private, peer.public_key, peer.endpoint, address, CLIENT_BASE_PORT + i, {})
        )
        conf.chmod(0o600)
        tunnels += f"  - id: wg{i}\n    type: wireguard\n    config_file: {conf.name}\n"
    for i, peer in enumerate(awg_peers):
        address = f"198.19.{20 + i}.2"
        port = CLIENT_BASE_PORT + TUNNELS // 2 + i
        conf = lab.tmpdir / f"awg{i}.conf"
        conf.write_text(client_conf(private, peer.public_key, peer.endpoint, address, port, AWG_PARAMS))
        conf.chmod(0o600)
        tunnels += f"  - id: awg{i}\n    type: amneziawg\n    config_file: {conf.name}\n"
    head = f"dataplane: {dataplane}\nlog_level: warning\ndefault: direct\n"
    baseline = lab.tmpdir / "baseline.yaml"
    baseline.write_text(head + "tunnels: []\nrules: []\n")
    loaded = lab.tmpdir / "loaded.yaml"
    loaded.write_text(
        head
        + "tunnels:\n"
        + tunnels
        + f"rules:\n  - process: {APP_TUNNEL}\n    tunnel: wg0\n    fallback: block\n"
    )
    for path in (baseline, loaded):
        path.chmod(0o600)
    return baseline, loaded


class Daemon:
    def __init__(self, lab: Any, config: Path, name: str) -> None:
        from awg_split_tunnel.lab.topology import CLIENT, python_path

        self.control = lab.tmpdir / f"{name}.sock"
        self.log = lab.tmpdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": python_path()}
        with open(self.log, "wb") as out:
            self.process = lab.spawn(
                CLIENT,
                [
                    sys.executable,
                    "-m",
                    "awg_split_tunnel.daemon",
                    "-c",
                    str(config),
                    "--control",
                    str(self.control),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def request(self, cmd: str) -> Any:
        from awg_split_tunnel.api.control import request

        return request(cmd, path=self.control, timeout=30.0)

    def wait(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"the daemon exited while waiting for {what}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if condition():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise SystemExit(f"not within {timeout:.0f}s: {what}\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def settle() -> None:
    time.sleep(3.0)


def open_flows(lab: Any, counts: dict[str, int]) -> dict[str, tuple[int, float]]:
    """Each app opens its flows (both at once); (answered, seconds) per app."""
    from awg_split_tunnel.lab.topology import CLIENT, WEB_IP

    running = {
        app: lab.spawn(
            CLIENT,
            [str(lab.apps[app]), "-c", FLOW_OPENER, WEB_IP, str(FLOW_PORTS[0] + 25_000 * n), str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, (app, count) in enumerate(counts.items())
    }
    out: dict[str, tuple[int, float]] = {}
    for app, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        if process.returncode != 0:
            raise SystemExit(f"{app} failed: {stderr}")
        answered, seconds = stdout.split()
        out[app] = (int(answered), float(seconds))
    return out


def measure_lab(dataplane: str, flows: int) -> dict[str, Any]:
    from awg_split_tunnel.lab import Lab, make_app, start_web
    from awg_split_tunnel.lab.servers import generate_keypair
    from awg_split_tunnel.lab.topology import CLIENT, UDP_ECHO_PORT, WEB

    private, public = generate_keypair()
    result: dict[str, Any] = {"dataplane": dataplane}
    with Lab() as lab:
        start_web(lab)
        # The UDP echo answers on every port the apps use: ns web's own nftables send them to port 7.
        ruleset = (
            "table ip memflows {\n chain pre {\n  type nat hook prerouting priority -100;\n"
            f"  udp dport {FLOW_PORTS[0]}-{FLOW_PORTS[1]} redirect to :{UDP_ECHO_PORT}\n }}\n}}\n"
        )
        lab.run(WEB, ["nft", "-f", "-"], input=ruleset, text=True, check=True)
        for app in (APP_TUNNEL, APP_DIRECT):
            make_app(lab, app)
        wg_peers, awg_peers, flavour = start_peers(lab, public)
        result["awg_peer"] = flavour
        baseline_conf, loaded_conf = write_configs(lab, private, wg_peers, awg_peers, dataplane)

        daemon = Daemon(lab, baseline_conf, "baseline")
        try:
            daemon.wait(lambda: daemon.request("status") is not None, 60, "the baseline daemon")
            settle()
            result["baseline"] = stage_memory(daemon.process.pid)
        finally:
            daemon.stop()

        daemon = Daemon(lab, loaded_conf, "loaded")
        try:

            def all_up() -> bool:
                rows = daemon.request("status")["tunnels"]
                return sum(1 for row in rows if row["state"] == "up") == TUNNELS

            started = time.monotonic()
            daemon.wait(all_up, 90, f"{TUNNELS} tunnels UP")
            result["tunnels_up_after_s"] = round(time.monotonic() - started, 1)
            settle()
            result["tunnels_up"] = stage_memory(daemon.process.pid)
            result["flows"] = open_flows(lab, {APP_TUNNEL: flows // 2, APP_DIRECT: flows - flows // 2})
            time.sleep(1.0)
            result["loaded"] = stage_memory(daemon.process.pid)
            status = daemon.request("status")
            # `status` copies every flow through the pipe; with many it may not answer in time (no count).
            result["router_flows"] = status["router"].get("flows")
            result["conntrack_flows"] = int(
                lab.run(CLIENT, ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).stdout or 0
            )
            result["tunnels"] = {row["id"]: row["state"] for row in status["tunnels"]}
            result["loaded_after_status"] = stage_memory(daemon.process.pid)
        finally:
            daemon.stop()
            result["log_tail"] = daemon.log.read_text(errors="replace")[-3000:]
    return result


# -- where it goes (synthetic, tracemalloc) ---------------------------------------------------------------


def measure_synthetic(flows: int) -> dict[str, Any]:
    from awg_split_tunnel.core.packet_router import PacketRouter
    from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
    from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
    from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
    from awg_split_tunnel.net.packet import IPPROTO_UDP, build_packet
    from awg_split_tunnel.process.matcher import Platform
    from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
    from awg_split_tunnel.provider.wireguard import crypto
    from awg_split_tunnel.provider.wireguard.device import DeviceSettings, PeerSettings, WireGuardDevice

    gc.collect()
    tracemalloc.start(8)
    before = tracemalloc.take_snapshot()
    routes: dict[str, Any] = {}
    devices = []
    params = AmneziaParams.from_mapping(AWG_PARAMS)
    for i in range(TUNNELS):
        tunnel_id = f"t{i}"
        routes[tunnel_id] = PacketTunnelRoute.from_addresses([f"198.19.{i}.2/24"], 1420)
        peer = PeerSettings(
            crypto.public_key(crypto.generate_private_key()),
            (ipaddress.ip_network("0.0.0.0/0"),),
            ("198.18.0.40", WG_BASE_PORT + i),
        )
        settings = DeviceSettings(
            crypto.generate_private_key(), (peer,), amnezia=params if i >= TUNNELS // 2 else None
        )
        devices.append(WireGuardDevice(settings, tunnel_id=tunnel_id))
    states = {tunnel_id: TunnelState.UP for tunnel_id in routes}
    exes = {100: "/usr/bin/app-memtun", 200: "/usr/bin/app-memdirect"}
    router = PacketRouter(
        RuleEngine([Rule("app-memtun", "t0", FallbackPolicy.BLOCK)], "direct", Platform.POSIX),
        states.get,
        routes,
        own_pids={999},
        exe_of=exes.get,
        os_lookup=lambda *a: None,
    )
    app = ipaddress.ip_address("198.18.0.1").packed
    web = ipaddress.ip_address("198.18.0.10").packed
    now = 1000.0
    for n in range(flows):
        pid = 100 if n % 2 == 0 else 200
        sport = 10000 + n
        router.connect_event(IPPROTO_UDP, web, 7, pid, now)
        packet = build_packet(app, web, IPPROTO_UDP, sport, 7, payload=b"flow")
        router.route(packet, len(packet), now, lambda: None)
        now += 0.0001
    gc.collect()
    after = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, __file__)])
    before = before.filter_traces([tracemalloc.Filter(False, __file__)])
    tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    top = [
        (
            f"{s.traceback[0].filename.split('src/')[-1].split('lib/python')[-1]}:{s.traceback[0].lineno}",
            s.size_diff,
            s.count_diff,
        )
        for s in stats[:10]
    ]
    return {
        "flows": flows,
        "router_connections": len(list(router.connections())),
        "traced_mb": round(total / 1e6, 2),
        "top": top,
        "keep": (router, devices),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataplane", default="kernel", choices=("kernel", "divert"))
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--skip-lab", action="store_true", help="only the synthetic tracemalloc part")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    report: dict[str, Any] = {}
    if not args.skip_lab:
        if os.geteuid() != 0:
            raise SystemExit("the lab part needs root (network namespaces); --skip-lab runs the rest")
        report["lab"] = lab = measure_lab(args.dataplane, args.flows)
        print(f"lab, {args.dataplane} data path, AmneziaWG peers: {lab['awg_peer']}")
        print("  daemon + router: RSS summed, resident pages counted once, PSS summed; then each process")
        for stage in ("baseline", "tunnels_up", "loaded", "loaded_after_status"):
            processes = lab[stage]["processes"]
            parts = ", ".join(
                f"{role} {m['rss']:.1f} (pss {m['pss']:.1f}, anon {m['anon']:.1f}, peak {m['peak']:.1f})"
                for role, m in processes.items()
            )
            print(
                f"  {stage:20s} RSS {summed(processes):6.1f} MB, once {lab[stage]['once']:6.1f} MB, PSS "
                f"{summed(processes, 'pss'):6.1f} MB   [{parts}]"
            )
        up = sum(1 for state in lab["tunnels"].values() if state == "up")
        print(f"  tunnels up: {up}/{TUNNELS} (all up {lab['tunnels_up_after_s']} s after start)")
        for app, (answered, seconds) in lab["flows"].items():
            print(f"  {app}: {answered} flows answered in {seconds} s")
        router_flows = lab["router_flows"]
        held = "(status did not answer in time)" if router_flows is None else router_flows
        print(f"  flows the router holds: {held}; conntrack entries in ns client: {lab['conntrack_flows']}")
        stages = ("baseline", "tunnels_up", "loaded_after_status")
        base, up_rss, loaded = (summed(lab[k]["processes"]) for k in stages)
        print(
            f"  loaded ÷ baseline: {loaded / base:.2f} (+{loaded - base:.1f} MB: tunnels "
            f"+{up_rss - base:.1f}, flows and status +{loaded - up_rss:.1f})"
        )
        print(f"  growth per flow opened: {(loaded - up_rss) / args.flows * 1024:.1f} KB")
        # The budget is judged on the RAM the two processes take: their RSS with each shared page (the
        # interpreter's, the libraries') counted once. The RSS sum counts those twice.
        once, base_once = lab["loaded_after_status"]["once"], lab["baseline"]["once"]
        verdict = "met" if once <= BUDGET_MB else "NOT met"
        print(
            f"  budget {BUDGET_MB:.0f} MB (daemon + router resident pages counted once, {TUNNELS} tunnels, "
            f"{args.flows} flows): {verdict} ({once:.1f} MB measured, RSS summed {loaded:.1f}; the "
            f"baseline alone is {base_once:.1f} MB)"
        )
    imports = measure_imports()
    print(
        f"one process with the daemon's and the router's imports: RSS {imports['rss_mb']:.1f} MB, "
        f"{imports['modules']} modules; what each import adds:"
    )
    for name, size in imports["steps"]:
        print(f"  {size:6.1f} MB  {name}")
    report["imports"] = imports
    synthetic = measure_synthetic(args.flows)
    print(
        f"synthetic (tracemalloc): {TUNNELS} devices + {synthetic['router_connections']} flows in a "
        f"PacketRouter allocate {synthetic['traced_mb']} MB; biggest sites:"
    )
    for where, size, count in synthetic["top"]:
        print(f"  {size / 1e6:7.2f} MB {count:8d} blocks  {where}")
    if args.json:
        synthetic.pop("keep")
        print(json.dumps({**report, "synthetic": synthetic}, indent=1, default=str))


if __name__ == "__main__":
    main()
