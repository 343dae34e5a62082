"""relay(): progressive edits, throttling, 429 handling, deleted messages, long answers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from bot.streaming import RateLimited, relay


class FakePlatform:
    """Messages by id, with a log of calls; can fail the next send/edit on purpose."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}
        self.calls: list[tuple[str, float, str]] = []  # (kind, time, text)
        self.rate_limit_next: list[tuple[str, float]] = []  # (kind, retry_after)
        self.fail_next_edit = False
        self.deleted: set[str] = set()

    def _maybe_limited(self, kind: str) -> None:
        for index, (which, retry_after) in enumerate(self.rate_limit_next):
            if which == kind:
                del self.rate_limit_next[index]
                raise RateLimited(retry_after)

    async def send(self, text: str) -> str:
        self.calls.append(("send", time.monotonic(), text))
        self._maybe_limited("send")
        message_id = f"m{len(self.messages) + 1}"
        self.messages[message_id] = text
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        self.calls.append(("edit", time.monotonic(), text))
        self._maybe_limited("edit")
        if self.fail_next_edit:
            self.fail_next_edit = False
            self.deleted.add(message_id)
            raise LookupError("message to edit not found")
        self.messages[message_id] = text

    def visible(self, ids: list[str]) -> list[str]:
        return [self.messages[i] for i in ids if i not in self.deleted]


async def chunks(words: list[str], delay: float = 0.0) -> AsyncIterator[str]:
    for word in words:
        if delay:
            await asyncio.sleep(delay)
        yield word


async def test_one_message_edited_to_the_full_text() -> None:
    platform = FakePlatform()
    words = [f" w{i}" for i in range(20)]
    ids = await relay(chunks(words), platform.send, platform.edit, limit=2000, min_interval=0)
    assert len(ids) == 1
    assert platform.messages[ids[0]] == "".join(words)
    assert platform.calls[0][0] == "send"


async def test_edits_are_throttled() -> None:
    platform = FakePlatform()
    words = [f" w{i}" for i in range(30)]
    started = time.monotonic()
    ids = await relay(
        chunks(words, delay=0.005), platform.send, platform.edit, limit=2000, min_interval=0.05
    )
    elapsed = time.monotonic() - started
    assert platform.messages[ids[0]] == "".join(words)
    # at most one update per interval, plus the final one
    assert len(platform.calls) <= elapsed / 0.05 + 2
    times = [t for _, t, _ in platform.calls]
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
    assert all(gap >= 0.045 for gap in gaps), gaps


async def test_long_answer_continues_in_new_messages() -> None:
    platform = FakePlatform()
    words = [f"word{i} " for i in range(100)]  # ~700 characters
    ids = await relay(chunks(words), platform.send, platform.edit, limit=100, min_interval=0)
    texts = platform.visible(ids)
    assert len(ids) >= 7
    assert all(len(text) <= 100 for text in texts)
    assert " ".join(texts).split() == "".join(words).split()


async def test_rate_limited_send_and_edit_are_waited_out() -> None:
    platform = FakePlatform()
    platform.rate_limit_next = [("send", 0.05), ("edit", 0.05)]
    words = [f" w{i}" for i in range(10)]
    started = time.monotonic()
    ids = await relay(chunks(words), platform.send, platform.edit, limit=2000, min_interval=0)
    assert platform.visible(ids) == ["".join(words)]
    assert time.monotonic() - started >= 0.05
    limited_at = next(t for kind, t, _ in platform.calls if kind == "send")
    later = [t for _, t, _ in platform.calls if t > limited_at]
    assert later and later[0] - limited_at >= 0.045  # nothing sent during the retry window


async def test_failed_edit_sends_a_new_message() -> None:
    platform = FakePlatform()
    platform.fail_next_edit = True
    words = [f" w{i}" for i in range(6)]
    ids = await relay(chunks(words), platform.send, platform.edit, limit=2000, min_interval=0)
    assert len(ids) == 2  # the deleted one and its replacement
    assert platform.visible(ids) == ["".join(words)]


async def test_rate_limit_that_never_ends_raises() -> None:
    platform = FakePlatform()
    platform.rate_limit_next = [("send", 0.0)] * 50
    with pytest.raises(RateLimited):
        await relay(chunks([" a"]), platform.send, platform.edit, limit=10, min_interval=0)


async def test_empty_stream_sends_nothing() -> None:
    platform = FakePlatform()
    assert await relay(chunks([]), platform.send, platform.edit, limit=10, min_interval=0) == []
    assert (
        await relay(chunks([" ", "\n"]), platform.send, platform.edit, limit=10, min_interval=0)
        == []
    )
    assert platform.calls == []
