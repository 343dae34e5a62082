"""Splitting long answers into platform-sized messages without losing or mangling text.

Platforms cap message length (Discord 2000 characters, Telegram 4096 UTF-16 units). We cut
on the most natural boundary that fits: paragraph, then line, then word, and only as a last
resort inside a word, and then never between a surrogate pair or inside an emoji sequence.
Only the whitespace at a cut is dropped; every other character survives, in order.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

__all__ = ["split_message", "split_point", "utf16_len"]

Measure = Callable[[str], int]

_SEPARATORS = ("\n\n", "\n", " ")
_JOINERS = {"\u200d", "\ufe0e", "\ufe0f", "\u20e3"}  # ZWJ, variation selectors, keycap


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units: what Telegram counts against its 4096 limit."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def split_message(text: str, limit: int, *, measure: Measure = len) -> list[str]:
    """Cut `text` into non-blank parts of at most `limit` units (by `measure`).

    Joining the parts with the dropped cut whitespace gives back `text`; a blank text gives [].
    A part exceeds `limit` only when one code point alone does (an emoji, UTF-16, limit 1).
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    parts: list[str] = []
    rest = text
    while rest:
        if measure(rest) <= limit:
            if rest.strip():
                parts.append(rest)
            break
        end, start = split_point(rest, limit, measure=measure)
        head = rest[:end]
        if head.strip():
            parts.append(head)
        rest = rest[start:]
    return parts


def split_point(text: str, limit: int, *, measure: Measure = len) -> tuple[int, int]:
    """Where to cut `text` so the head fits `limit`: (end of head, start of the rest).

    The characters between the two indices are whitespace dropped at the cut. When the
    whole text fits, returns (len(text), len(text)).
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if measure(text) <= limit:
        return len(text), len(text)
    fit = _longest_prefix(text, limit, measure)
    window = text[: fit + 1]  # a separator may sit just past the last character that fits
    for sep in _SEPARATORS:
        index = window.rfind(sep)
        if index > 0 and text[:index].strip():
            end = len(text[:index].rstrip())
            start = index + len(sep)
            skip = " " if sep == " " else "\r\n"
            while start < len(text) and text[start] in skip:
                start += 1
            return end, start
    cut = _safe_cut(text, fit)
    return cut, cut


def _longest_prefix(text: str, limit: int, measure: Measure) -> int:
    """Largest k with measure(text[:k]) <= limit (at least 1, so splitting always progresses)."""
    if measure is len:
        return max(1, min(limit, len(text)))
    low, high = 1, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if measure(text[:mid]) <= limit:
            low = mid
        else:
            high = mid - 1
    return low


def _safe_cut(text: str, cut: int) -> int:
    """Move a hard cut left until it does not split a character sequence; `cut` if impossible."""
    index = cut
    while index > 1 and _glued(text, index):
        index -= 1
    return index if not _glued(text, index) else cut


def _glued(text: str, index: int) -> bool:
    """True when text[index - 1] and text[index] belong to one visible character."""
    if index <= 0 or index >= len(text):
        return False
    before, after = text[index - 1], text[index]
    if "\ud800" <= before <= "\udbff" and "\udc00" <= after <= "\udfff":
        return True
    if before == "\u200d" or after in _JOINERS:
        return True
    if "\U0001f3fb" <= after <= "\U0001f3ff":  # skin tone modifier
        return True
    if "\U0001f1e6" <= before <= "\U0001f1ff" and "\U0001f1e6" <= after <= "\U0001f1ff":
        return _regional_run(text, index) % 2 == 1  # inside a flag pair
    return unicodedata.combining(after) != 0


def _regional_run(text: str, index: int) -> int:
    """How many regional-indicator letters directly precede `index`."""
    count = 0
    while index - count - 1 >= 0 and "\U0001f1e6" <= text[index - count - 1] <= "\U0001f1ff":
        count += 1
    return count
