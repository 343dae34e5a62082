"""split_message: every character kept, in order; every part fits and is not blank."""

from __future__ import annotations

import itertools
import re

import pytest

from bot.text import split_message, split_point, utf16_len

EMOJI_FAMILY = "👨‍👩‍👧‍👦"  # one visible character, seven code points
FLAG = "🇫🇷"
RTL = "مرحبا بالعالم، هذا نص عربي طويل. שלום עולם זה טקסט בעברית."
MARKDOWN = "**bold _italic `code ``` unclosed ~~strike [link](http://x) *** __ \\"


def assert_valid(text: str, parts: list[str], limit: int, measure=len) -> None:
    """Parts fit, are not blank, and are `text` in order with only whitespace between them."""
    assert all(0 < measure(part) <= limit for part in parts), [measure(p) for p in parts]
    assert all(part.strip() for part in parts)
    position = 0
    for part in parts:
        found = text.find(part, position)
        assert found >= 0, f"part not found in order: {part!r}"
        assert not text[position:found].strip(), f"dropped text: {text[position:found]!r}"
        position = found + len(part)
    assert not text[position:].strip(), f"dropped tail: {text[position:]!r}"
    assert re.sub(r"\s", "", "".join(parts)) == re.sub(r"\s", "", text)


def test_short_text_is_one_untouched_part() -> None:
    text = "  Hello,\n\nworld!  "
    assert split_message(text, 100) == [text]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t "])
def test_blank_text_gives_no_parts(text: str) -> None:
    assert split_message(text, 10) == []


def test_prefers_paragraph_then_line_then_word() -> None:
    text = "first paragraph here\n\nsecond one\nwith two lines"
    assert split_message(text, 30) == ["first paragraph here", "second one\nwith two lines"]
    assert split_message("aaa bbb\nccc ddd", 10) == ["aaa bbb", "ccc ddd"]
    assert split_message("one two three four", 9) == ["one two", "three", "four"]


def test_hard_cut_inside_a_long_word() -> None:
    text = "x" * 25
    parts = split_message(text, 10)
    assert parts == ["x" * 10, "x" * 10, "x" * 5]


def test_indentation_after_a_line_break_survives() -> None:
    text = "def f():\n    return 1\n    return 2"
    parts = split_message(text, 21)
    assert_valid(text, parts, 21)
    assert parts[1].startswith("    return")


@pytest.mark.parametrize(
    "text",
    [
        EMOJI_FAMILY * 7,
        FLAG * 9,
        "e\u0301" * 12,  # e + combining acute
        "👍🏽" * 8,  # thumbs up + skin tone
        "\ud83d\ude00" * 6,  # a surrogate pair written out (from surrogatepass decoding)
    ],
)
def test_hard_cuts_never_split_a_visible_character(text: str) -> None:
    parts = split_message(text, 9)
    assert_valid(text, parts, 9)
    assert "".join(parts) == text
    for left, right in itertools.pairwise(parts):
        assert right[0] not in "\u200d\u0301\U0001f3fd\ude00", (left, right)
        assert not left.endswith("\u200d")
    if text.startswith(FLAG):
        assert all(len(part) % 2 == 0 for part in parts)


@pytest.mark.parametrize("text", [RTL * 5, MARKDOWN * 6, (RTL + " " + MARKDOWN + " 😀") * 4])
@pytest.mark.parametrize("limit", [1, 7, 50, 2000])
def test_rtl_and_markdown_round_trip(text: str, limit: int) -> None:
    assert_valid(text, split_message(text, limit), limit)


def test_utf16_measure_for_telegram() -> None:
    text = "😀" * 10  # 20 UTF-16 units
    parts = split_message(text, 6, measure=utf16_len)
    assert parts == ["😀😀😀"] * 3 + ["😀"]
    assert all(utf16_len(part) <= 6 for part in parts)


def test_split_point_reports_the_dropped_whitespace() -> None:
    assert split_point("hello world again", 11) == (11, 12)  # the space after "world" fits
    assert split_point("hello world again", 10) == (5, 6)
    assert split_point("para one\n\n\nnext", 12) == (8, 11)
    assert split_point("short", 10) == (5, 5)


def test_bad_limit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="limit"):
        split_message("text", 0)


def test_property_every_character_kept() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    alphabet = st.sampled_from(
        [*"ab \n\t*_`~#>", "\n\n", "😀", "é", "\u0301", "\u200d", "👍🏽", "ש", "ع", FLAG]
    )

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(st.lists(alphabet, max_size=80).map("".join), st.integers(1, 40))
    def check(text: str, limit: int) -> None:
        assert_valid(text, split_message(text, limit), limit)
        wide = max(limit, 2)  # one astral character is 2 UTF-16 units
        assert_valid(text, split_message(text, wide, measure=utf16_len), wide, utf16_len)

    check()
