"""Handshakes answered while under load, per source: an IPv4 address or an IPv6 /64."""

from __future__ import annotations

from awg_split_tunnel.provider.wireguard.ratelimit import BURST, IDLE_EXPIRY, HandshakeRateLimiter, source_key


def burst(limiter: HandshakeRateLimiter, hosts: list[str], now: float) -> int:
    return sum(limiter.allow(host, now) for host in hosts)


def test_one_address_gets_its_burst_then_is_limited() -> None:
    limiter = HandshakeRateLimiter()
    assert burst(limiter, ["198.18.0.7"] * 10, 100.0) == BURST


def test_addresses_of_one_ipv6_slash_64_share_one_bucket() -> None:
    limiter = HandshakeRateLimiter()
    same_64 = [f"2001:db8:1:2::{i:x}" for i in range(1, 11)]
    assert burst(limiter, same_64, 100.0) == BURST, "rotating the host part does not escape the limit"
    assert burst(limiter, ["2001:db8:1:3::1"], 100.0) == 1, "another /64 has its own bucket"
    assert source_key("::ffff:198.18.0.7") == source_key("198.18.0.7")


def test_the_bucket_refills_with_time() -> None:
    limiter = HandshakeRateLimiter()
    burst(limiter, ["198.18.0.7"] * 10, 100.0)
    assert limiter.allow("198.18.0.7", 100.06), "one token back after 1/20 s"


def test_idle_buckets_go_and_a_flood_of_sources_resets_no_one() -> None:
    limiter = HandshakeRateLimiter(max_buckets=100)
    burst(limiter, ["198.18.0.7"] * 10, 100.0)  # a busy peer, out of tokens
    spoofed = [f"198.19.{i // 256}.{i % 256}" for i in range(500)]
    burst(limiter, spoofed, 100.01)
    assert len(limiter) == 100, "the cap holds"
    assert not limiter.allow("198.18.0.7", 100.02), "the busy peer's bucket was not reset by the flood"
    assert limiter.allow("198.18.0.9", 100.0 + 2 * IDLE_EXPIRY), "idle buckets were swept: room again"
    assert len(limiter) <= 2
