"""I1–I5 templates: the grammar amneziawg-go 2.0+/3.x accepts and the packets it produces
(docs/PROTOCOL.md: I-packet templates, Test vectors)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.amneziawg.tags import (
    LETTERS,
    MAX_PACKET_SIZE,
    TagKind,
    TemplateError,
    parse_template,
)


def counting_urandom(n: int) -> bytes:
    """Deterministic 'random' bytes 0, 1, 2, … so generated letters and digits are predictable."""
    return bytes(i % 256 for i in range(n))


def test_the_doc_example_i1_is_twelve_bytes_bytes_random_then_big_endian_time() -> None:
    template = parse_template("<b 0xc0ffee><r 5><t>")
    assert template is not None
    packet = template.generate(1_700_000_000.9, lambda n: b"\xaa" * n)
    assert len(packet) == template.size == 12
    assert packet[:3] == b"\xc0\xff\xee"
    assert packet[3:8] == b"\xaa" * 5
    assert packet[8:] == struct.pack(">I", 1_700_000_000)


def test_digits_letters_and_data_size_produce_nine_bytes() -> None:
    template = parse_template("<b 0x0102><rd 3><rc 2><dz 2>")
    assert template is not None
    packet = template.generate(0.0, counting_urandom)
    assert len(packet) == 9
    assert packet[:2] == b"\x01\x02"
    assert packet[2:5] == b"012"  # bytes 0, 1, 2 mod 10
    assert packet[5:7] == b"ab"  # bytes 0, 1 index a..zA..Z, lower case first
    assert packet[7:] == b"\x00\x00"


def test_letters_cover_upper_case_after_lower_case() -> None:
    template = parse_template("<rc 4>")
    assert template is not None
    assert template.generate(0.0, lambda n: bytes([25, 26, 51, 52])[:n]) == b"zAZa"
    assert len(LETTERS) == 52


def test_text_outside_tags_is_ignored_and_extra_words_too() -> None:
    template = parse_template("GET / <b 0x41 ignored words> trailing text <d><ds>")
    assert template is not None
    assert template.generate(0.0, counting_urandom) == b"A"


@pytest.mark.parametrize("text", ["", "abc", "no tags here > at all"])
def test_a_template_without_tags_disables_the_packet(text: str) -> None:
    assert parse_template(text) is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("<b 0x123>", "odd number"),
        ("<b 0X12>", "hex"),
        ("<b>", "needs hex"),
        ("<b 0x>", "needs hex"),
        ("<b 0xzz>", "not hexadecimal"),
        ("<x 1>", "unknown tag <x>"),
        ("<>", "empty tag"),
        ("<   >", "empty tag"),
        ("<r 5", "missing enclosing >"),
        ("<c>", "unknown tag <c>"),
        ("<r>", "needs a byte count"),
        ("<r five>", "decimal"),
        ("<r -1>", "negative"),
        ("<dz -3>", "negative"),
        ("<rc 99999999>", "largest UDP"),
    ],
)
def test_templates_current_amneziawg_go_rejects_are_rejected(text: str, fragment: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse_template(text)
    assert fragment in str(info.value)


def test_every_error_of_a_template_is_reported_together() -> None:
    with pytest.raises(TemplateError) as info:
        parse_template("<b 0x1><x><r 4><rd -2><>")
    assert len(info.value.problems) == 4
    assert "odd" in info.value.problems[0]
    assert "<x>" in info.value.problems[1]
    assert "negative" in info.value.problems[2]
    assert "empty" in info.value.problems[3]


def test_go_integer_syntax_accepts_a_plus_sign() -> None:
    template = parse_template("<r +3>")
    assert template is not None and template.size == 3


def test_uppercase_hex_digits_are_fine_only_the_prefix_must_be_lower_case() -> None:
    template = parse_template("<b 0xC0FFEE>")
    assert template is not None
    assert template.generate(0.0, counting_urandom) == b"\xc0\xff\xee"
    no_prefix = parse_template("<b c0ffee>")
    assert no_prefix is not None and no_prefix.size == 3


def test_the_legacy_counter_is_an_eight_byte_big_endian_value_when_allowed() -> None:
    template = parse_template("<c><b 0x01>", allow_counter=True)
    assert template is not None and template.uses_counter
    assert template.tags[0].kind is TagKind.COUNTER
    assert template.generate(0.0, counting_urandom, counter=258) == bytes(6) + b"\x01\x02\x01"


def test_random_bytes_are_fresh_for_every_packet() -> None:
    template = parse_template("<r 16>")
    assert template is not None
    source = itertools.count()
    packets = {template.generate(0.0, lambda n: bytes([next(source) % 256]) * n) for _ in range(5)}
    assert len(packets) == 5


def test_a_packet_above_the_udp_limit_is_refused() -> None:
    with pytest.raises(TemplateError, match="UDP limit"):
        parse_template(f"<r {MAX_PACKET_SIZE}><r 1>")


_TAG = st.one_of(
    st.binary(min_size=1, max_size=8).map(lambda b: ("b", f"<b 0x{b.hex()}>", len(b))),
    st.just(("t", "<t>", 4)),
    st.integers(0, 40).map(lambda n: ("r", f"<r {n}>", n)),
    st.integers(0, 40).map(lambda n: ("rc", f"<rc {n}>", n)),
    st.integers(0, 40).map(lambda n: ("rd", f"<rd {n}>", n)),
    st.integers(0, 8).map(lambda n: ("dz", f"<dz {n}>", n)),
    st.just(("d", "<d>", 0)),
    st.just(("ds", "<ds>", 0)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_TAG, min_size=1, max_size=8), st.text(alphabet="xyz \t", max_size=3))
def test_any_valid_template_generates_exactly_its_declared_size(
    tags: list[tuple[str, str, int]], filler: str
) -> None:
    text = filler.join(tag for _, tag, _ in tags)
    template = parse_template(text)
    assert template is not None
    assert [t.kind.value for t in template.tags] == [name for name, _, _ in tags]
    packet = template.generate(1_234_567_890.0, counting_urandom)
    assert len(packet) == template.size == sum(size for _, _, size in tags)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>bcdrtzsx0123456789 -+abcdef", max_size=40))
def test_parsing_arbitrary_text_either_succeeds_or_raises_template_error(text: str) -> None:
    try:
        template = parse_template(text)
    except TemplateError as exc:
        assert exc.problems
    else:
        if template is not None:
            assert len(template.generate(0.0, counting_urandom)) == template.size
