"""Text a server sent is cut and made printable before it goes into an error message."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from awg_split_tunnel.errors import SHOWN_TEXT_LIMIT, shown_text


def test_short_printable_text_is_unchanged() -> None:
    assert shown_text("403 Forbidden") == "403 Forbidden"
    assert shown_text(b"Bad Gateway") == "Bad Gateway"


def test_control_characters_and_escapes_are_replaced() -> None:
    assert shown_text("a\x1b[31mb\x00\r\n\x7f") == "a?[31mb????"


def test_long_text_is_cut() -> None:
    shown = shown_text("x" * 10_000)
    assert len(shown) == SHOWN_TEXT_LIMIT and shown.endswith("…")


@given(st.one_of(st.text(), st.binary()))
def test_anything_becomes_short_and_printable(text: str | bytes) -> None:
    shown = shown_text(text)
    assert len(shown) <= SHOWN_TEXT_LIMIT
    assert shown.isprintable()
