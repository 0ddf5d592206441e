"""Answers kept per route for their TTL (a fake clock)."""

from __future__ import annotations

import dns.message
import dns.rrset

from awg_split_tunnel.dns.cache import MAX_TTL, DnsCache
from awg_split_tunnel.dns.message import Answer, Query, read_answer, read_query


def ask(name: str = "example.org.", message_id: int = 1) -> Query:
    message = dns.message.make_query(name, "A", use_edns=-1)
    message.id = message_id
    q = read_query(message.to_wire())
    assert q is not None
    return q


def answer(q: Query, ttl: int) -> Answer:
    message = dns.message.make_response(dns.message.from_wire(q.wire))
    message.answer.append(dns.rrset.from_text(message.question[0].name, ttl, "IN", "A", "192.0.2.1"))
    a = read_answer(message.to_wire(), q)
    assert a is not None
    return a


def test_an_answer_is_served_to_the_next_asker_of_the_same_route_until_its_ttl_runs_out() -> None:
    cache = DnsCache()
    first = ask()
    cache.put("wg", first, answer(first, 60), now=100.0)
    later = ask(message_id=7)
    kept = cache.get("wg", later, now=130.0)
    assert kept is not None
    message = dns.message.from_wire(kept)
    assert message.id == 7 and message.answer[0].ttl == 30
    assert cache.get("wg", later, now=160.0) is None and len(cache) == 0


def test_routes_never_share_answers() -> None:
    cache = DnsCache()
    q = ask()
    cache.put("wg", q, answer(q, 60), now=0.0)
    assert cache.get("socks", q, now=1.0) is None
    assert cache.get("direct", q, now=1.0) is None


def test_uncacheable_answers_are_not_kept_and_long_ttls_are_capped() -> None:
    cache = DnsCache()
    q = ask()
    cache.put("wg", q, Answer(b"", True, None), now=0.0)
    cache.put("wg", q, answer(q, 0), now=0.0)
    assert len(cache) == 0
    cache.put("wg", q, answer(q, 86400), now=0.0)
    assert cache.get("wg", q, now=MAX_TTL - 1) is not None
    assert cache.get("wg", q, now=MAX_TTL) is None


def test_the_least_recently_used_goes_first_when_full_and_a_route_can_be_forgotten() -> None:
    cache = DnsCache(max_entries=2)
    a, b, c = ask("a.org."), ask("b.org."), ask("c.org.")
    cache.put("wg", a, answer(a, 60), now=0.0)
    cache.put("wg", b, answer(b, 60), now=0.0)
    assert cache.get("wg", a, now=1.0) is not None  # a used: b is now the oldest
    cache.put("wg", c, answer(c, 60), now=1.0)
    assert cache.get("wg", b, now=2.0) is None
    assert cache.get("wg", a, now=2.0) is not None
    cache.forget_route("wg")
    assert len(cache) == 0
