"""DNS messages as the forwarder needs them, built on dnspython: read a query, answer it with an error,
match and age answers, and frame messages on TCP (RFC 1035 4.2.2: a two-byte length before each)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.rcode

CLASSIC_UDP_SIZE = 512
"""The largest UDP answer a client without EDNS accepts (RFC 1035 4.2.1)."""
MAX_MESSAGE = 65535

SERVFAIL = dns.rcode.SERVFAIL
REFUSED = dns.rcode.REFUSED

QuestionKey = tuple[str, int, int, bool, bool]
"""(lower-case name, type, class, DNSSEC OK, checking disabled): answers differ along these."""


@dataclass(frozen=True, slots=True)
class Query:
    """One query as it came in: its wire bytes and what the forwarder looks at."""

    wire: bytes
    id: int
    key: QuestionKey
    udp_size: int
    """The largest UDP answer the asker takes (its EDNS payload size, else 512)."""

    @property
    def name(self) -> str:
        return self.key[0]


def read_query(wire: bytes) -> Query | None:
    """The query in ``wire``, or None when it is not one question of a well-formed query (dropped)."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return None
    if message.flags & dns.flags.QR or len(message.question) != 1:
        return None
    question = message.question[0]
    do = bool(message.ednsflags & dns.flags.DO)
    cd = bool(message.flags & dns.flags.CD)
    key = (question.name.to_text().lower(), int(question.rdtype), int(question.rdclass), do, cd)
    size = max(CLASSIC_UDP_SIZE, message.payload) if message.edns >= 0 else CLASSIC_UDP_SIZE
    return Query(wire, message.id, key, size)


def error_answer(query: Query, rcode: int) -> bytes:
    """An answer to ``query`` carrying only ``rcode`` (SERVFAIL: its route is down; REFUSED: dropped)."""
    message = dns.message.from_wire(query.wire)
    response = dns.message.make_response(message)
    response.set_rcode(dns.rcode.Rcode(rcode))
    return bytes(response.to_wire())


def truncated_answer(query: Query) -> bytes:
    """An empty answer with TC set: the asker repeats its query over TCP (RFC 7766 5)."""
    message = dns.message.from_wire(query.wire)
    response = dns.message.make_response(message)
    response.flags |= dns.flags.TC
    return bytes(response.to_wire())


def with_id(wire: bytes, message_id: int) -> bytes:
    """``wire`` with its header's ID replaced (a message's first two bytes, RFC 1035 4.1.1)."""
    return struct.pack("!H", message_id) + wire[2:]


def message_id(wire: bytes) -> int | None:
    """The ID of a message, or None when it is too short to have one."""
    return struct.unpack_from("!H", wire)[0] if len(wire) >= 2 else None


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's answer as the forwarder judges it."""

    wire: bytes
    truncated: bool
    ttl: int | None
    """Seconds it may be cached (None: not cacheable: an error, truncated, or no record to age by)."""


def read_answer(wire: bytes, query: Query) -> Answer | None:
    """The answer to ``query`` in ``wire``, or None when it answers another question or is malformed."""
    try:
        message = dns.message.from_wire(wire, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError):
        return None
    if not message.flags & dns.flags.QR or message.id != query.id or len(message.question) != 1:
        return None
    question = message.question[0]
    if (question.name.to_text().lower(), int(question.rdtype), int(question.rdclass)) != query.key[:3]:
        return None
    truncated = bool(message.flags & dns.flags.TC)
    ttl: int | None = None
    if not truncated and message.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        ttls = [rrset.ttl for section in (message.answer, message.authority) for rrset in section]
        ttl = min(ttls) if ttls else None
    return Answer(wire, truncated, ttl)


def aged(wire: bytes, message_id: int, elapsed: int) -> bytes:
    """A cached answer for a new asker: its ID, and every TTL lowered by the seconds it was kept."""
    message = dns.message.from_wire(wire, ignore_trailing=True)
    message.id = message_id
    if elapsed > 0:
        for section in (message.answer, message.authority, message.additional):
            for rrset in section:
                rrset.ttl = max(0, rrset.ttl - elapsed)
    return bytes(message.to_wire(max_size=MAX_MESSAGE))


def tcp_frame(wire: bytes) -> bytes:
    """A message as it goes on a TCP connection."""
    return struct.pack("!H", len(wire)) + wire


class TcpFramer:
    """Messages out of a TCP byte stream: ``receive(data)`` returns the messages completed by ``data``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= 2:
            length = struct.unpack_from("!H", self._buffer)[0]
            if len(self._buffer) < 2 + length:
                break
            messages.append(bytes(self._buffer[2 : 2 + length]))
            del self._buffer[: 2 + length]
        return messages

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole message yet."""
        return len(self._buffer)
