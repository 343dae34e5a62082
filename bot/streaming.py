"""Relaying a streamed answer to a chat platform: one message edited as text arrives.

Platforms rate-limit edits, so edits are throttled to `min_interval`; a 429 (`RateLimited`)
postpones the next update instead of dropping text; a message the user deleted mid-stream
is replaced by a new one. Past `limit` characters the message is finished and a new one starts,
cut on a natural boundary by `bot.text.split_point`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable

from bot.text import Measure, split_point

__all__ = ["RateLimited", "relay"]

log = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[str]]
Edit = Callable[[str, str], Awaitable[None]]

MAX_RATE_LIMIT_RETRIES = 8
MAX_RETRY_AFTER = 60.0


class RateLimited(Exception):
    """Raised by an adapter's send/edit callback when the platform answers 429."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited, retry after {retry_after:.2f}s")
        self.retry_after = max(0.0, float(retry_after))


async def relay(
    chunks: AsyncIterable[str],
    send: Send,
    edit: Edit,
    *,
    limit: int,
    min_interval: float,
    measure: Measure = len,
) -> list[str]:
    """Show `chunks` progressively; return the platform id of every message sent, in order.

    Intermediate updates are best effort (skipped while throttled or rate limited); the final
    text of every message is always delivered, waiting out rate limits if it must.
    """
    return await _Relay(send, edit, limit=limit, min_interval=min_interval, measure=measure).run(
        chunks
    )


class _Relay:
    """The state of one relayed answer: the message being edited and what it shows."""

    def __init__(
        self, send: Send, edit: Edit, *, limit: int, min_interval: float, measure: Measure
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.send, self.edit = send, edit
        self.limit, self.min_interval, self.measure = limit, max(0.0, min_interval), measure
        self.ids: list[str] = []
        self.current: str | None = None  # platform id of the message being edited
        self.shown = ""  # what that message shows now
        self.next_update = 0.0  # loop time before which no intermediate update is sent
        self.loop = asyncio.get_running_loop()

    async def run(self, chunks: AsyncIterable[str]) -> list[str]:
        pending = ""
        async for chunk in chunks:
            pending += chunk
            while self.measure(pending) > self.limit:
                end, start = split_point(pending, self.limit, measure=self.measure)
                await self._final(pending[:end])
                self.current, self.shown = None, ""
                pending = pending[start:]
            if pending.strip() and pending != self.shown and self.loop.time() >= self.next_update:
                await self._update(pending)
        await self._final(pending)
        return self.ids

    async def _update(self, text: str) -> None:
        """Intermediate update: on a rate limit, postpone rather than wait."""
        try:
            await self._show(text)
        except RateLimited as limited:
            self.next_update = self.loop.time() + min(limited.retry_after, MAX_RETRY_AFTER)
            return
        self.next_update = self.loop.time() + self.min_interval

    async def _final(self, text: str) -> None:
        """Deliver `text` as the finished content of the current message, whatever it takes."""
        if not text.strip() or text == self.shown:
            return
        for _ in range(MAX_RATE_LIMIT_RETRIES):
            delay = self.next_update - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self._show(text)
            except RateLimited as limited:
                self.next_update = self.loop.time() + min(limited.retry_after, MAX_RETRY_AFTER)
                continue
            self.next_update = self.loop.time() + self.min_interval
            return
        raise RateLimited(self.next_update - self.loop.time())

    async def _show(self, text: str) -> None:
        if self.current is not None:
            try:
                await self.edit(self.current, text)
                self.shown = text
                return
            except RateLimited:
                raise
            except Exception as error:  # deleted message, edit window over: send anew
                log.info("edit of message %s failed (%s); sending a new one", self.current, error)
                self.current, self.shown = None, ""
        message_id = await self.send(text)
        self.ids.append(message_id)
        self.current, self.shown = message_id, text
