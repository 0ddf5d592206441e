"""Secrets never in output: private and preshared keys, passwords and `user:password@` never appear in a
repr()/str() of an object, in an error message, in a log record or in what the CLI prints."""

from __future__ import annotations

import base64
import random

from awg_split_tunnel.core.config import InlinePeer, PacketTunnel, Socks5Tunnel, tunnel_wg_conf
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard import noise
from awg_split_tunnel.provider.wireguard.conf import parse_conf
from awg_split_tunnel.provider.wireguard.cookie import CookieChecker, CookieGenerator
from awg_split_tunnel.provider.wireguard.device import DeviceSettings, PeerSettings
from awg_split_tunnel.provider.wireguard.keys import encode_key
from awg_split_tunnel.provider.wireguard.messages import HandshakeInitiation, HandshakeResponse
from awg_split_tunnel.provider.wireguard.noise import Handshake, StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import PeerConfig, WireGuardProtocol
from awg_split_tunnel.provider.wireguard.tai64n import tai64n

SK_I = bytes(range(1, 33))
SK_R = bytes(range(101, 133))
PSK = bytes(range(201, 233))
EPHEMERAL_I = bytes(range(33, 65))
EPHEMERAL_R = bytes(range(65, 97))
PASSWORD = "S3cretPw-9x"


def forms(secret: bytes) -> list[str]:
    """The ways raw key bytes could be printed."""
    return [repr(secret)[2:-1], secret.hex(), base64.b64encode(secret).decode()]


def assert_hidden(obj: object, *secrets: bytes) -> None:
    for shown in (repr(obj), str(obj)):
        for secret in secrets:
            for form in forms(secret):
                assert form not in shown, f"{type(obj).__name__} shows a secret: {shown}"


def test_repr_of_key_material_hides_the_secret_bytes() -> None:
    initiator, responder = StaticIdentity.from_private(SK_I), StaticIdentity.from_private(SK_R)
    assert_hidden(initiator, initiator.private)

    hs_i = Handshake.for_peer(initiator, responder.public, PSK)
    hs_r = Handshake.for_peer(responder, initiator.public, PSK)
    initiation = noise.create_initiation(hs_i, initiator, EPHEMERAL_I, 1, tai64n(1.7e9), 1)
    assert_hidden(hs_i, PSK, hs_i.precomputed_static_static, hs_i.chaining_key, EPHEMERAL_I)
    parsed = HandshakeInitiation.parse(initiation.pack())
    assert parsed is not None
    noise.consume_initiation(parsed, responder, lambda key: hs_r, 0.0)
    response = noise.create_response(hs_r, EPHEMERAL_R, 2, 2)
    assert_hidden(hs_r, PSK, hs_r.precomputed_static_static, hs_r.chaining_key, EPHEMERAL_R)
    parsed_response = HandshakeResponse.parse(response.pack())
    assert parsed_response is not None
    noise.consume_response(parsed_response, initiator, hs_i)
    keys = noise.derive_transport_keys(hs_i)
    assert_hidden(keys, keys.send, keys.receive)

    checker = CookieChecker.for_public_key(responder.public)
    checker.cookie_for(b"\x01" * 6, 0.0)
    assert_hidden(checker, checker.secret)
    generator = CookieGenerator.for_public_key(responder.public)
    generator.cookie = bytes(range(16))
    assert_hidden(generator, generator.cookie)

    assert_hidden(PeerConfig(responder.public, preshared_key=PSK), PSK)
    wg = WireGuardProtocol(SK_I, rng=random.Random(1))
    peer = wg.add_peer(PeerConfig(responder.public, preshared_key=PSK), 0.0)
    assert_hidden(peer, PSK, SK_I)
    assert_hidden(wg.identity, wg.identity.private)

    settings = DeviceSettings(SK_I, peers=(PeerSettings(responder.public, preshared_key=PSK),))
    assert_hidden(settings, SK_I, PSK)
    assert_hidden(AmneziaParams(header_protection_key=PSK), PSK)


def test_repr_of_config_models_hides_keys_and_passwords() -> None:
    proxy = Socks5Tunnel(
        id="office", type="socks5", server="198.18.0.5:1080", username="u", password=PASSWORD
    )
    assert PASSWORD not in repr(proxy) and PASSWORD not in str(proxy)
    tunnel = PacketTunnel(
        id="wg",
        type="wireguard",
        private_key=encode_key(SK_I),
        address="10.0.0.2/32",
        header_protection_key=encode_key(SK_R),
        peer=InlinePeer(
            public_key=encode_key(StaticIdentity.from_private(SK_R).public),
            preshared_key=encode_key(PSK),
            endpoint="198.18.0.1:51820",
        ),
    )
    assert_hidden(tunnel, SK_I, SK_R, PSK)
    assert_hidden(tunnel_wg_conf(tunnel), SK_I, SK_R, PSK)
    conf = parse_conf(
        f"[Interface]\nPrivateKey = {encode_key(SK_I)}\n[Peer]\nPublicKey = {encode_key(SK_R)}\n"
        f"PresharedKey = {encode_key(PSK)}\n"
    )
    assert_hidden(conf, SK_I, PSK)
