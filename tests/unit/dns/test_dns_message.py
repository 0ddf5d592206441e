"""DNS messages as the forwarder reads and writes them (built with dnspython, checked byte for byte)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given
from hypothesis import strategies as st

from awg_split_tunnel.dns.message import (
    REFUSED,
    SERVFAIL,
    TcpFramer,
    aged,
    error_answer,
    read_answer,
    read_query,
    tcp_frame,
    truncated_answer,
    with_id,
)


def query(name: str = "Example.ORG.", rdtype: str = "A", *, edns: int = -1, payload: int = 1232) -> bytes:
    message = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    message.id = 0x1234
    return bytes(message.to_wire())


def answer_to(wire: bytes, *ttls: int, rcode: int = dns.rcode.NOERROR, tc: bool = False) -> bytes:
    message = dns.message.make_response(dns.message.from_wire(wire))
    for index, ttl in enumerate(ttls):
        message.answer.append(
            dns.rrset.from_text(message.question[0].name, ttl, "IN", "A", f"192.0.2.{index}")
        )
    message.set_rcode(dns.rcode.Rcode(rcode))
    if tc:
        message.flags |= dns.flags.TC
    return bytes(message.to_wire())


def test_a_query_is_read_with_its_question_and_the_size_its_asker_takes() -> None:
    q = read_query(query())
    assert q is not None
    assert (q.id, q.key, q.udp_size) == (0x1234, ("example.org.", 1, 1, False, False), 512)
    with_edns = read_query(query(edns=0, payload=4096))
    assert with_edns is not None and with_edns.udp_size == 4096


def test_what_is_not_one_query_is_refused_at_the_boundary() -> None:
    assert read_query(b"") is None
    assert read_query(b"\x00" * 11) is None
    assert read_query(answer_to(query(), 60)) is None  # an answer, not a query


@given(st.binary(max_size=600))
def test_any_bytes_are_read_without_raising(data: bytes) -> None:
    read_query(data)
    q = read_query(query())
    assert q is not None
    read_answer(data, q)


def test_errors_answer_the_question_with_the_rcode_and_nothing_else() -> None:
    q = read_query(query())
    assert q is not None
    for rcode in (SERVFAIL, REFUSED):
        message = dns.message.from_wire(error_answer(q, rcode))
        assert message.id == 0x1234 and message.rcode() == rcode and message.flags & dns.flags.QR
        assert message.question == dns.message.from_wire(q.wire).question and not message.answer


def test_an_answer_is_cacheable_for_its_smallest_ttl_unless_truncated_or_an_error() -> None:
    q = read_query(query())
    assert q is not None
    assert read_answer(answer_to(q.wire, 300, 60), q) == read_answer(answer_to(q.wire, 300, 60), q)
    ok = read_answer(answer_to(q.wire, 300, 60), q)
    assert ok is not None and ok.ttl == 60 and not ok.truncated
    truncated = read_answer(answer_to(q.wire, 300, tc=True), q)
    assert truncated is not None and truncated.truncated and truncated.ttl is None
    failed = read_answer(answer_to(q.wire, rcode=dns.rcode.SERVFAIL), q)
    assert failed is not None and failed.ttl is None


def test_an_answer_to_another_id_or_question_is_not_taken() -> None:
    q = read_query(query())
    assert q is not None
    assert read_answer(with_id(answer_to(q.wire, 60), 0x4321), q) is None
    assert read_answer(answer_to(query("other.org."), 60), q) is None


def test_a_kept_answer_gets_the_new_askers_id_and_ttls_lowered_by_the_time_kept() -> None:
    wire = answer_to(query(), 300, 60)
    message = dns.message.from_wire(aged(wire, 0x9999, 50))
    assert message.id == 0x9999
    assert sorted(rrset.ttl for rrset in message.answer) == [10]  # one rrset, smallest TTL kept by dnspython
    assert dns.message.from_wire(aged(wire, 1, 500)).answer[0].ttl == 0


def test_truncated_answer_tells_the_asker_to_come_back_over_tcp() -> None:
    q = read_query(query())
    assert q is not None
    message = dns.message.from_wire(truncated_answer(q))
    assert message.flags & dns.flags.TC and message.id == 0x1234 and not message.answer


def test_tcp_framing_splits_a_stream_into_messages_wherever_it_is_cut() -> None:
    stream = tcp_frame(b"first") + tcp_frame(b"") + tcp_frame(b"third one")
    for cut in range(len(stream) + 1):
        framer = TcpFramer()
        got = framer.receive(stream[:cut]) + framer.receive(stream[cut:])
        assert got == [b"first", b"", b"third one"] and framer.pending == 0
    framer = TcpFramer()
    assert framer.receive(b"\x00\x05abc") == [] and framer.pending == 5
