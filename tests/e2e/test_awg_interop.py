"""AmneziaWG on the wire: our initiator ↔ our responder with a parameter set of every generation, checked
against a capture (sizes and headers as docs/PROTOCOL.md says), and ours ↔ the reference amneziawg-go.

Both of our ends run the `tun` command: the initiator in ns client, the responder in ns wg (which forwards
to the web server without NAT, so the web server sees our tunnel address 198.19.0.2).
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_wg_interop import OurClient, check_tcp_both_ways, udp_echo

from awg_split_tunnel.lab import Lab, LabUnavailable
from awg_split_tunnel.lab.servers import (
    WireGuardPeer,
    amneziawg_peer_bin,
    generate_keypair,
    start_amneziawg_go,
)
from awg_split_tunnel.lab.topology import (
    CLIENT,
    CLIENT_IP,
    TUNNEL_CLIENT_IP,
    TUNNEL_SERVER_IP,
    WEB_IP,
    WG,
    WG_IP,
)
from awg_split_tunnel.provider.amneziawg.envelope import header_keystream
from awg_split_tunnel.provider.wireguard.value_range import Range

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

SERVER_PORT = 51821
HP_KEY = bytes(range(0x80, 0xA0))

# One non-trivial set per generation, written as a .conf would (docs/PROTOCOL.md: AmneziaWG 1.0–3.x).
PARAMETER_SETS: dict[str, dict[str, str]] = {
    "1.0": {
        "Jc": "4", "Jmin": "40", "Jmax": "70", "S1": "15", "S2": "18",
        "H1": "123456", "H2": "67543", "H3": "32345", "H4": "123123",
    },
    "1.5": {
        "Jc": "2", "Jmin": "30", "Jmax": "40", "S1": "21", "S2": "33",
        "H1": "1001", "H2": "1002", "H3": "1003", "H4": "1004",
        "I1": "<b 0xc0ffee><r 5><t>", "I2": "<r 16>", "I3": "<b 0xdeadbeef><rd 4><rc 4>",
    },
    "2.0": {
        "Jc": "3", "Jmin": "50", "Jmax": "60", "S1": "37", "S2": "61", "S3": "11", "S4": "7",
        "H1": "100-199", "H2": "200-299", "H3": "300-399", "H4": "400-499",
        "I1": "<b 0xc0ffee><r 5><t>",
    },
    "3.x": {
        "Jc": "2", "Jmin": "40", "Jmax": "50", "S1": "20", "S2": "30", "S3": "25", "S4": "16",
        "H1": "100000-100999", "H2": "200000-200999", "H3": "300000-300999", "H4": "400000-400999",
        "I1": "<b 0xc0ffee><r 5><t>",
        "HeaderProtectionKey": base64.b64encode(HP_KEY).decode(),
        "RandomTrailers": "on",
        "ContentPaddingAddition": "10-20",
    },
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class WireSet:
    """The parameters a capture check needs, parsed from a set."""

    jc: int
    jmin: int
    jmax: int
    s: tuple[int, int, int, int]
    h: tuple[Range, Range, Range, Range]
    i_prefixes: tuple[bytes, ...]
    protected: bool
    trailers: bool
    padding: bool

    @classmethod
    def of(cls, params: dict[str, str]) -> WireSet:
        s = tuple(int(params.get(f"S{n}", "0")) for n in range(1, 5))
        h = tuple(Range.parse(params.get(f"H{n}", str(n))) for n in range(1, 5))
        i_prefixes = []
        for n in range(1, 6):
            template = params.get(f"I{n}")
            if template is not None:
                first = template.split(">")[0]
                i_prefixes.append(bytes.fromhex(first[5:]) if first.startswith("<b 0x") else b"")
        return cls(
            int(params.get("Jc", "0")),
            int(params.get("Jmin", "0")),
            int(params.get("Jmax", "0")),
            s,  # type: ignore[arg-type]
            h,  # type: ignore[arg-type]
            tuple(i_prefixes),
            "HeaderProtectionKey" in params,
            params.get("RandomTrailers") == "on",
            "ContentPaddingAddition" in params,
        )

    def type_at(self, datagram: bytes, kind: int) -> int:
        """The message type value as the receiver sees it (unmasked when header protection is on)."""
        offset = self.s[kind]
        raw = int.from_bytes(datagram[offset : offset + 4], "little")
        if not self.protected:
            return raw
        mask = int.from_bytes(header_keystream(HP_KEY, datagram[:12], 4), "little")
        return raw ^ mask


def read_pcap_udp(path: Path) -> list[tuple[str, str, bytes]]:
    """(source IP, destination IP, UDP payload) of every IPv4/UDP packet in an Ethernet pcap."""
    data = path.read_bytes()
    out = []
    offset = 24
    while offset + 16 <= len(data):
        incl = struct.unpack_from("<I", data, offset + 8)[0]
        frame = data[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        src = ".".join(str(b) for b in frame[26:30])
        dst = ".".join(str(b) for b in frame[30:34])
        udp_len = struct.unpack_from("!H", frame, 14 + ihl + 4)[0]
        out.append((src, dst, frame[14 + ihl + 8 : 14 + ihl + udp_len]))
    return out


def conf_text(private: str, peer_public: str, params: dict[str, str], *, server: bool) -> str:
    lines = ["[Interface]", f"PrivateKey = {private}"]
    if server:
        lines += [f"Address = {TUNNEL_SERVER_IP}/24", f"ListenPort = {SERVER_PORT}"]
    else:
        lines += [f"Address = {TUNNEL_CLIENT_IP}/24"]
    lines += [f"{key} = {value}" for key, value in params.items()]
    lines += ["", "[Peer]", f"PublicKey = {peer_public}"]
    if server:
        lines += [f"AllowedIPs = {TUNNEL_CLIENT_IP}/32"]
    else:
        lines += [f"Endpoint = {WG_IP}:{SERVER_PORT}", f"AllowedIPs = {TUNNEL_SERVER_IP}/32, {WEB_IP}/32"]
    return "\n".join(lines) + "\n"


def our_client(lab: Lab, params: dict[str, str], server_public: str, name: str) -> tuple[OurClient, str]:
    private, public = generate_keypair()
    conf = lab.tmpdir / f"{name}.conf"
    conf.write_text(conf_text(private, server_public, params, server=False))
    return OurClient(lab, lab.new_ifname("c"), conf, lab.tmpdir / f"{name}.log"), public


@pytest.mark.parametrize("generation", list(PARAMETER_SETS))
def test_our_initiator_and_responder_match_the_documented_wire_format(web_lab: Lab, generation: str) -> None:
    params = PARAMETER_SETS[generation]
    wire = WireSet.of(params)
    # The device sends same-size runs as one UDP GSO write; a veth passes such a super-datagram on whole,
    # so tcpdump would see it unsegmented. Segmenting in software on our side shows datagrams as on a NIC.
    web_lab.run(CLIENT, ["ethtool", "-K", "eth0", "tx-udp-segmentation", "off"], check=True)
    web_lab.run(WG, ["ethtool", "-K", "eth0", "tx-udp-segmentation", "off"], check=True)
    server_private, server_public = generate_keypair()
    client, client_public = our_client(web_lab, params, server_public, f"init-{generation}")
    server_conf = web_lab.tmpdir / f"resp-{generation}.conf"
    server_conf.write_text(conf_text(server_private, client_public, params, server=True))
    server = OurClient(
        web_lab, web_lab.new_ifname("s"), server_conf, web_lab.tmpdir / f"resp-{generation}.log", WG
    )
    server.start()
    try:
        client.start()
        try:
            with web_lab.capture(WG, bpf_filter=f"udp port {SERVER_PORT}") as cap:
                answers = udp_echo(web_lab, count=3)
            assert answers == [TUNNEL_CLIENT_IP] * 3, client.output() + server.output()
        finally:
            client.stop()
    finally:
        server.stop()
    datagrams = read_pcap_udp(cap.pcap)
    sent = [d for src, _, d in datagrams if src == CLIENT_IP]
    answered = [d for src, _, d in datagrams if src == WG_IP]
    check_initiator_burst(wire, sent)
    check_response(wire, answered[0])
    check_transport(wire, sent[len(wire.i_prefixes) + wire.jc + 1 :])
    check_transport(wire, answered[1:])


def check_initiator_burst(wire: WireSet, sent: list[bytes]) -> None:
    """I-packets in order, then Jc junk datagrams of Jmin..Jmax bytes, then the initiation."""
    n_i = len(wire.i_prefixes)
    for prefix, datagram in zip(wire.i_prefixes, sent[:n_i], strict=True):
        assert datagram.startswith(prefix)
    junk = sent[n_i : n_i + wire.jc]
    assert len(junk) == wire.jc
    assert all(wire.jmin <= len(j) <= wire.jmax for j in junk), [len(j) for j in junk]
    initiation = sent[n_i + wire.jc]
    if wire.trailers:
        assert wire.s[0] + 148 <= len(initiation) < 500
    else:
        assert len(initiation) == wire.s[0] + 148
    assert wire.type_at(initiation, 0) in wire.h[0]
    if wire.protected:
        # The type on the wire is masked: an observer does not see a value from H1.
        assert int.from_bytes(initiation[wire.s[0] : wire.s[0] + 4], "little") not in wire.h[0]


def check_response(wire: WireSet, response: bytes) -> None:
    if wire.trailers:
        assert wire.s[1] + 92 <= len(response) < 500
    else:
        assert len(response) == wire.s[1] + 92
    assert wire.type_at(response, 1) in wire.h[1]


def check_transport(wire: WireSet, datagrams: list[bytes]) -> None:
    assert datagrams, "no transport datagrams captured"
    for datagram in datagrams:
        assert len(datagram) >= wire.s[3] + 32
        assert wire.type_at(datagram, 3) in wire.h[3]
        if not (wire.trailers or wire.padding):
            # Plain WireGuard padding: the plaintext is a multiple of 16 (a keepalive is empty).
            assert (len(datagram) - wire.s[3] - 32) % 16 == 0


# -- against the reference amneziawg-go -----------------------------------------------------------------

AWG_SET_NAMES = {
    "Jc": "jc", "Jmin": "jmin", "Jmax": "jmax", "S1": "s1", "S2": "s2", "S3": "s3", "S4": "s4",
    "H1": "h1", "H2": "h2", "H3": "h3", "H4": "h4", "I1": "i1", "I2": "i2", "I3": "i3",
    "RandomTrailers": "random-trailers", "ContentPaddingAddition": "content-padding-addition",
}  # fmt: skip


@pytest.fixture(scope="module")
def reference_peer() -> None:
    """Skip unless the reference amneziawg-go can be built here (CI builds it: docs/LAB.md, Peers)."""
    try:
        amneziawg_peer_bin()
    except LabUnavailable as exc:
        pytest.skip(str(exc))


def reference_params(lab: Lab, params: dict[str, str]) -> dict[str, str | int]:
    """A .conf parameter set as `awg set` arguments (the protection key goes through a file)."""
    awg_params: dict[str, str | int] = {AWG_SET_NAMES[k]: v for k, v in params.items() if k in AWG_SET_NAMES}
    if "HeaderProtectionKey" in params:
        key_file = lab.tmpdir / "hp.key"
        key_file.write_text(params["HeaderProtectionKey"] + "\n")
        awg_params["header-protection-key"] = str(key_file)
    return awg_params


@pytest.mark.parametrize("generation", ["2.0", "3.x"])
def test_our_initiator_and_the_reference_responder_interoperate(
    web_lab: Lab, generation: str, reference_peer: None
) -> None:
    params = PARAMETER_SETS[generation]
    client_private, client_public = generate_keypair()
    server = start_amneziawg_go(
        web_lab, peers=[WireGuardPeer(client_public, [f"{TUNNEL_CLIENT_IP}/32"])],
        awg_params=reference_params(web_lab, params), listen_port=SERVER_PORT,
    )  # fmt: skip
    conf = web_lab.tmpdir / f"vs-ref-{generation}.conf"
    conf.write_text(conf_text(client_private, server.public_key, params, server=False))
    client = OurClient(web_lab, web_lab.new_ifname("c"), conf, web_lab.tmpdir / f"vs-ref-{generation}.log")
    client.start()
    try:
        # amneziawg-go 3.x sends its first packet after (re)configuration with a stale S4 (docs/PROTOCOL.md:
        # 3.x quirks): one lost answer is the reference peer's, not ours.
        answers = udp_echo(web_lab, count=5, timeout=1.5)
        assert len(answers) >= 4 and set(answers) == {TUNNEL_CLIENT_IP}, client.output()
        assert "latest handshake" in server.show()
    finally:
        client.stop()


@pytest.mark.parametrize("generation", ["2.0", "3.x"])
def test_the_reference_initiator_and_our_responder_interoperate(
    web_lab: Lab, generation: str, reference_peer: None
) -> None:
    params = PARAMETER_SETS[generation]
    server_private, server_public = generate_keypair()
    client_private, client_public = generate_keypair()
    server_conf = web_lab.tmpdir / f"ours-resp-{generation}.conf"
    server_conf.write_text(conf_text(server_private, client_public, params, server=True))
    ours = OurClient(
        web_lab, web_lab.new_ifname("s"), server_conf, web_lab.tmpdir / f"ours-resp-{generation}.log", WG
    )
    ours.start()
    try:
        # amneziawg-go as the client in ns client, routing the web server through the tunnel.
        start_amneziawg_go(
            web_lab,
            host=CLIENT,
            private_key=client_private,
            listen_port=None,
            peers=[WireGuardPeer(server_public, [f"{WEB_IP}/32"], endpoint=f"{WG_IP}:{SERVER_PORT}")],
            address=f"{TUNNEL_CLIENT_IP}/24",
            routes=[f"{WEB_IP}/32"],
            awg_params=reference_params(web_lab, params),
        )
        answers = udp_echo(web_lab, count=5, timeout=1.5)
        assert len(answers) >= 4 and set(answers) == {TUNNEL_CLIENT_IP}, ours.output()
        assert "handshake completed" in ours.output()
    finally:
        ours.stop()


def test_datagrams_bigger_than_the_link_still_carry_tcp_both_ways(web_lab: Lab) -> None:
    """S4 = 32 on top of the default MTU 1420 makes full-size transport datagrams 1,484 bytes: 12 more than
    the lab's 1500-byte links carry in one packet. A UDP GSO write of such datagrams is refused by the
    kernel (scripts/repro/udp_gso_bigger_than_mtu.py); the device sends them one by one, fragmented, so a
    download and an upload still arrive whole, and each end's log says to lower the MTU."""
    params = {**PARAMETER_SETS["2.0"], "S4": "32"}
    server_private, server_public = generate_keypair()
    client, client_public = our_client(web_lab, params, server_public, "big-s4")
    server_conf = web_lab.tmpdir / "big-s4-resp.conf"
    server_conf.write_text(conf_text(server_private, client_public, params, server=True))
    server = OurClient(web_lab, web_lab.new_ifname("s"), server_conf, web_lab.tmpdir / "big-s4-resp.log", WG)
    server.start()
    try:
        client.start()
        try:
            size = 4 * 1024 * 1024
            check_tcp_both_ways(
                web_lab, size, size, "big-s4-upload", lambda: client.output() + server.output()
            )
            for end in (client, server):
                assert "1484 bytes are bigger than the network path" in end.output(), end.output()
        finally:
            client.stop()
    finally:
        server.stop()
