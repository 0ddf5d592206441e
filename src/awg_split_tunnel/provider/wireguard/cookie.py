"""mac1, mac2 and cookies (docs/PROTOCOL.md: Cookies).

`CookieChecker` is the receiving side, one per device, keyed by our own static public key: it checks
mac1/mac2 and makes cookie replies. `CookieGenerator` is the sending side, one per peer, keyed by the
peer's static public key: it writes mac1/mac2 and consumes the cookie replies the peer sends us.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.messages import CookieReply

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
COOKIE_REFRESH_TIME = 120.0
COOKIE_NONCE_SIZE = 24
_ZERO_MAC = bytes(crypto.MAC_SIZE)

RandomBytes = Callable[[int], bytes]


def source_bytes(source: tuple[str, int]) -> bytes:
    """The binary form of a UDP source that the cookie is bound to: IP bytes, then the port as u16 LE
    (Go's `netip.AddrPort.MarshalBinary`, which wireguard-go uses)."""
    host = source[0].split("%", 1)[0]
    return ipaddress.ip_address(host).packed + (source[1] & 0xFFFF).to_bytes(2, "little")


@dataclass(slots=True)
class CookieChecker:
    """Checks the MACs of handshake messages sent to us and answers with cookie replies under load."""

    mac1_key: bytes
    cookie_key: bytes
    random_bytes: RandomBytes = os.urandom
    secret: bytes = field(default=b"", repr=False)
    secret_time: float | None = None

    @classmethod
    def for_public_key(cls, public: bytes, random_bytes: RandomBytes = os.urandom) -> CookieChecker:
        return cls(crypto.hash_(LABEL_MAC1, public), crypto.hash_(LABEL_COOKIE, public), random_bytes)

    def check_mac1(self, message: bytes) -> bool:
        n = len(message)
        expected = crypto.mac(self.mac1_key, message[: n - 32])
        return hmac.compare_digest(expected, message[n - 32 : n - 16])

    def check_mac2(self, message: bytes, source: bytes, now: float) -> bool:
        """Whether mac2 carries the cookie we would give `source` now (false once the secret is stale)."""
        if self.secret_time is None or now - self.secret_time > COOKIE_REFRESH_TIME:
            return False
        n = len(message)
        cookie = crypto.mac(self.secret, source)
        expected = crypto.mac(cookie, message[: n - 16])
        return hmac.compare_digest(expected, message[n - 16 :])

    def cookie_for(self, source: bytes, now: float) -> bytes:
        if self.secret_time is None or now - self.secret_time > COOKIE_REFRESH_TIME:
            self.secret = self.random_bytes(32)
            self.secret_time = now
        return crypto.mac(self.secret, source)

    def create_reply(self, message: bytes, source: bytes, type_value: int, now: float) -> CookieReply:
        """The cookie reply answering handshake `message` (receiver = its sender index)."""
        n = len(message)
        receiver = int.from_bytes(message[4:8], "little")
        mac1 = message[n - 32 : n - 16]
        nonce = self.random_bytes(COOKIE_NONCE_SIZE)
        sealed = crypto.xaead_seal(self.cookie_key, nonce, self.cookie_for(source, now), mac1)
        return CookieReply(type_value, receiver, nonce, sealed)


@dataclass(slots=True)
class CookieGenerator:
    """Writes mac1/mac2 on handshake messages to one peer and keeps the cookie that peer gave us."""

    mac1_key: bytes
    cookie_key: bytes
    cookie: bytes = field(default=b"", repr=False)
    cookie_time: float | None = None
    last_mac1: bytes | None = field(default=None, repr=False)

    @classmethod
    def for_public_key(cls, peer_public: bytes) -> CookieGenerator:
        return cls(crypto.hash_(LABEL_MAC1, peer_public), crypto.hash_(LABEL_COOKIE, peer_public))

    def add_macs(self, message: bytes, now: float) -> bytes:
        """`message` (mac fields ignored) with mac1 and, while a cookie is fresh, mac2 written."""
        n = len(message)
        body = message[: n - 32]
        mac1 = crypto.mac(self.mac1_key, body)
        self.last_mac1 = mac1
        mac2 = _ZERO_MAC
        if self.cookie_time is not None and now - self.cookie_time < COOKIE_REFRESH_TIME:
            mac2 = crypto.mac(self.cookie, body + mac1)
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Store the cookie of a reply that decrypts under the last mac1 we sent; False otherwise."""
        if self.last_mac1 is None:
            return False
        try:
            cookie = crypto.xaead_open(self.cookie_key, reply.nonce, reply.encrypted_cookie, self.last_mac1)
        except crypto.InvalidTag:
            return False
        self.cookie = cookie
        self.cookie_time = now
        return True
