"""mac1/mac2 and cookie replies (docs/PROTOCOL.md: Cookies, Test vectors)."""

from __future__ import annotations

from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.cookie import (
    LABEL_COOKIE,
    LABEL_MAC1,
    CookieChecker,
    CookieGenerator,
    source_bytes,
)
from awg_split_tunnel.provider.wireguard.messages import CookieReply

PK_I = bytes.fromhex("07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c")
PK_R = bytes.fromhex("5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b")
INITIATION = bytes.fromhex(
    "010000004433221164b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466158a0e4ca242d151"
    "ca97ab90159a98b67e616625e68b4065d357376b6598e644ad7d678c0295d22de4cb43d5135581ed36346bfa7cf42a12"
    "2139f8939935ec574414e91f3b457e447709b4db0277480586ab0a99b2d78cf74bf0acad00000000000000000000000000000000"
)
REPLY = bytes.fromhex(
    "0300000044332211a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7"
    "47b8937b506b845a1d0c7bf9c6707780a1e6e74f14d66e899b8390ddd407f41d"
)
SOURCE = ("192.0.2.1", 51820)


def _checker() -> CookieChecker:
    checker = CookieChecker.for_public_key(PK_R, random_bytes=lambda n: bytes(range(0xA0, 0xA0 + n)))
    checker.secret, checker.secret_time = b"\x5a" * 32, 0.0
    return checker


def test_mac_and_cookie_keys() -> None:
    assert (
        crypto.hash_(LABEL_MAC1, PK_R).hex()
        == "5c5cbbfd0c782a2539047315dc2b629f825570bc6a8686d245dd060463b85e1b"
    )
    assert (
        crypto.hash_(LABEL_MAC1, PK_I).hex()
        == "6d0855ea6225516c9993e0bc4312a1703292766b0578e0ad25b2f9e05a1f0c57"
    )
    assert (
        crypto.hash_(LABEL_COOKIE, PK_R).hex()
        == "17728e626505a9a7054fda9a980a5209fb72714de5d9e476848ec7214cc83713"
    )
    assert (
        crypto.hash_(LABEL_COOKIE, PK_I).hex()
        == "2fbbcbf582ab0f1a0ca849c57ea3a3a0f9402b429c5fe01736ce7e7fe3c51430"
    )


def test_source_bytes_put_the_port_little_endian() -> None:
    assert source_bytes(SOURCE).hex() == "c00002016cca"
    assert source_bytes(("2001:2::1", 1)) == bytes.fromhex("20010002" + "00" * 11 + "01") + b"\x01\x00"


def test_cookie_reply_matches_the_vector() -> None:
    checker = _checker()
    assert checker.cookie_for(source_bytes(SOURCE), 1.0).hex() == "2825074fcc5f7a22ab0e851e0ed3cb0b"
    reply = checker.create_reply(INITIATION, source_bytes(SOURCE), 3, 1.0)
    assert reply.pack() == REPLY


def test_initiator_consumes_the_reply_and_sends_mac2_until_it_is_stale() -> None:
    generator = CookieGenerator.for_public_key(PK_R)
    assert generator.add_macs(INITIATION, 0.0) == INITIATION  # remembers mac1 for the reply's AD
    reply = CookieReply.parse(REPLY)
    assert reply is not None
    assert generator.consume_reply(reply, 5.0)
    assert generator.cookie.hex() == "2825074fcc5f7a22ab0e851e0ed3cb0b"
    with_mac2 = generator.add_macs(INITIATION, 6.0)
    assert with_mac2[132:].hex() == "8dabc7206b593e3c36d083170ff4a694"
    assert _checker().check_mac2(with_mac2, source_bytes(SOURCE), 6.0)
    assert not _checker().check_mac2(with_mac2, source_bytes(("192.0.2.1", 51821)), 6.0)
    assert generator.add_macs(INITIATION, 5.0 + 120.0)[132:] == bytes(16)


def test_reply_under_a_different_mac1_is_refused() -> None:
    generator = CookieGenerator.for_public_key(PK_R)
    reply = CookieReply.parse(REPLY)
    assert reply is not None
    assert not generator.consume_reply(reply, 0.0)  # nothing sent yet
    other = INITIATION[:10] + b"\xff" + INITIATION[11:]
    generator.add_macs(other, 0.0)
    assert not generator.consume_reply(reply, 0.0)
    assert generator.cookie_time is None


def test_checker_secret_rotates_after_two_minutes() -> None:
    checker = _checker()
    first = checker.cookie_for(b"src", 100.0)
    assert checker.cookie_for(b"src", 120.0) == first
    assert checker.cookie_for(b"src", 121.0) != first
