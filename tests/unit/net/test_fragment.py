"""IP fragmentation of oversize datagrams for a packet tunnel (net/fragment.py), checked against the RFCs'
rules and by reassembling the fragments as the receiving host does."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from awg_split_tunnel.net.fragment import IPV4_DF, IPV4_MF, can_fragment, fragment
from awg_split_tunnel.net.packet import IPPROTO_UDP, PacketView, build_packet, internet_checksum


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


SRC, DST = ip("198.19.0.2"), ip("198.18.0.10")
SRC6, DST6 = ip("2001:2:1::2"), ip("2001:2::10")


def view_of(packet: bytearray) -> PacketView:
    view = PacketView()
    assert view.parse(packet, len(packet))
    return view


def without_df(packet: bytearray, ident: int = 0x1234) -> bytearray:
    struct.pack_into("!HH", packet, 4, ident, 0)
    struct.pack_into("!H", packet, 10, 0)
    struct.pack_into("!H", packet, 10, internet_checksum(packet[:20]))
    return packet


def with_options(packet: bytearray, options: bytes) -> bytearray:
    """``packet`` (IPv4, 20-byte header) with ``options`` (a multiple of 4 bytes) in its header."""
    out = bytearray(packet[:20]) + options + packet[20:]
    out[0] = 0x40 | ((20 + len(options)) // 4)
    struct.pack_into("!H", out, 2, len(out))
    struct.pack_into("!H", out, 10, 0)
    struct.pack_into("!H", out, 10, internet_checksum(out[: 20 + len(options)]))
    return out


def reassemble_v4(fragments: list[bytearray]) -> tuple[bytes, int]:
    """(the reassembled data, the last fragment's MF) — as a receiving host puts the pieces together."""
    data = bytearray()
    more = 1
    for piece in sorted(fragments, key=lambda p: struct.unpack_from("!H", p, 6)[0] & 0x1FFF):
        header = (piece[0] & 0x0F) * 4
        flags = struct.unpack_from("!H", piece, 6)[0]
        assert (flags & 0x1FFF) * 8 == len(data), "a hole or an overlap"
        assert internet_checksum(piece[:header]) == 0, "the header checksum"
        data += piece[header:]
        more = flags & IPV4_MF
    return bytes(data), more


def reassemble_v6(fragments: list[bytearray]) -> tuple[bytes, int, set[int]]:
    data = bytearray()
    next_headers = set()
    idents = set()
    for piece in fragments:
        assert piece[6] == 44 and struct.unpack_from("!H", piece, 4)[0] == len(piece) - 40
        nxt, _, off_m, ident = struct.unpack_from("!BBHI", piece, 40)
        assert off_m & 0xFFF8 == len(data)
        next_headers.add(nxt)
        idents.add(ident)
        data += piece[48:]
        more = off_m & 1
    (nxt,) = next_headers
    return bytes(data), more, {nxt} | {-i for i in idents}


def test_an_ipv4_datagram_without_df_becomes_fragments_that_fit_and_reassemble() -> None:
    packet = without_df(build_packet(SRC, DST, IPPROTO_UDP, 40000, 7, bytes(range(256)) * 15))
    view = view_of(packet)
    assert can_fragment(view, 1420)
    pieces = fragment(view, 1420, 0)
    assert len(pieces) == 3 and all(len(p) <= 1420 for p in pieces)
    assert {struct.unpack_from("!H", p, 4)[0] for p in pieces} == {0x1234}  # the datagram's own id
    assert [struct.unpack_from("!H", p, 6)[0] & IPV4_MF for p in pieces] == [IPV4_MF, IPV4_MF, 0]
    assert all(p[12:20] == packet[12:20] and p[9] == IPPROTO_UDP for p in pieces)
    data, more = reassemble_v4(pieces)
    assert data == bytes(packet[20:]) and more == 0


def test_ipv4_with_df_is_never_fragmented() -> None:
    packet = build_packet(SRC, DST, IPPROTO_UDP, 40000, 7, b"x" * 2000)
    assert struct.unpack_from("!H", packet, 6)[0] & IPV4_DF
    assert not can_fragment(view_of(packet), 1420)


def test_a_fragment_is_cut_again_keeping_its_offset_and_its_more_fragments_flag() -> None:
    # The middle fragment of a larger datagram (offset 1480, MF set), as the app's stack cut it for a
    # 1500-byte link: the tunnel's pieces continue at its offset and the last one keeps MF.
    packet = without_df(build_packet(SRC, DST, IPPROTO_UDP, 40000, 7, b"y" * 1472))
    struct.pack_into("!H", packet, 6, IPV4_MF | (1480 // 8))
    struct.pack_into("!H", packet, 10, 0)
    struct.pack_into("!H", packet, 10, internet_checksum(packet[:20]))
    view = view_of(packet)
    assert view.fragment and can_fragment(view, 1420)
    pieces = fragment(view, 1420, 0)
    offsets = [(struct.unpack_from("!H", p, 6)[0] & 0x1FFF) * 8 for p in pieces]
    assert offsets == [1480, 1480 + 1400]
    assert all(struct.unpack_from("!H", p, 6)[0] & IPV4_MF for p in pieces)
    assert b"".join(bytes(p[20:]) for p in pieces) == bytes(packet[20:])


def test_only_options_with_the_copy_flag_go_into_later_fragments() -> None:
    copied = bytes([0x82, 11]) + bytes(9) + b"\x01"  # security (copy flag set), then a NOP: 12 bytes
    not_copied = bytes([7, 7, 4]) + bytes(4) + b"\x00"  # record route (copy flag clear), then end
    packet = with_options(
        without_df(build_packet(SRC, DST, IPPROTO_UDP, 40000, 7, b"z" * 3000)), copied + not_copied
    )
    view = view_of(packet)
    assert can_fragment(view, 1420)
    first, *later = fragment(view, 1420, 0)
    assert first[20:40] == copied + not_copied
    for piece in later:
        assert (piece[0] & 0x0F) * 4 == 32 and piece[20:31] == copied[:11]
    data, _ = reassemble_v4([first, *later])
    assert data == bytes(packet[40:])


def test_an_ipv6_datagram_gets_a_fragment_header_and_reassembles() -> None:
    packet = build_packet(SRC6, DST6, IPPROTO_UDP, 40000, 7, bytes(range(256)) * 12)
    view = view_of(packet)
    assert can_fragment(view, 1420)
    pieces = fragment(view, 1420, 0xABCDEF01)
    assert all(len(p) <= 1420 for p in pieces) and len(pieces) == 3
    data, more, facts = reassemble_v6(pieces)
    assert data == bytes(packet[40:]) and more == 0
    assert facts == {IPPROTO_UDP, -0xABCDEF01}
    assert all(p[8:40] == packet[8:40] for p in pieces)


def test_ipv6_is_not_fragmented_below_1280_or_with_extension_headers() -> None:
    packet = build_packet(SRC6, DST6, IPPROTO_UDP, 40000, 7, b"x" * 2000)
    assert not can_fragment(view_of(packet), 1279)
    with_hop_by_hop = bytearray(packet[:40]) + bytes([IPPROTO_UDP, 0, 1, 4, 0, 0, 0, 0]) + packet[40:]
    with_hop_by_hop[6] = 0
    struct.pack_into("!H", with_hop_by_hop, 4, len(with_hop_by_hop) - 40)
    assert not can_fragment(view_of(with_hop_by_hop), 1420)


@given(size=st.integers(0, 9000), mtu=st.integers(576, 9000), v6=st.booleans())
def test_any_size_and_mtu_reassembles_to_the_original(size: int, mtu: int, v6: bool) -> None:
    if v6:
        packet = build_packet(SRC6, DST6, IPPROTO_UDP, 1, 2, b"q" * size)
        mtu = max(mtu, 1280)
    else:
        packet = without_df(build_packet(SRC, DST, IPPROTO_UDP, 1, 2, b"q" * size))
    view = view_of(packet)
    assert can_fragment(view, mtu)
    pieces = fragment(view, mtu, 7)
    assert all(len(p) <= mtu for p in pieces)
    if v6:
        assert reassemble_v6(pieces)[:2] == (bytes(packet[40:]), 0)
    else:
        assert reassemble_v4(pieces) == (bytes(packet[20:]), 0)
