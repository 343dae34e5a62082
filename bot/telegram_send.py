"""Getting text onto Telegram: plain sends, streamed answers, one edited progress message.

Everything goes out as plain text (no parse_mode) so user or model text can never break
formatting. Telegram's 429 (`RetryAfter`) is waited out; a message that vanished mid-stream
is replaced; a send that fails for good never costs the stored turn: the answer is drained
to its end (so the service stores it) and delivered again once.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator
from datetime import timedelta

from telegram import (
    Bot,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
)
from telegram.error import BadRequest, RetryAfter, TelegramError, TimedOut

from bot.service import Answer
from bot.streaming import RateLimited, relay
from bot.text import split_message, utf16_len

__all__ = ["MAX_CHARS", "ProgressMessage", "Sender", "answer_keyboard", "retry_seconds"]

log = logging.getLogger(__name__)

MAX_CHARS = 4096  # Telegram's message limit, in UTF-16 code units
MAX_WAIT = 60.0  # longest 429 we wait out for one message
SEND_ATTEMPTS = 4

ReplyMarkup = InlineKeyboardMarkup | ForceReply


def retry_seconds(error: RetryAfter) -> float:
    """`RetryAfter.retry_after` is int or timedelta depending on PTB_TIMEDELTA; read both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = error.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def answer_keyboard(message_id: int) -> InlineKeyboardMarkup:
    """👍 👎 ✏️ under a finished answer; callback data carries the stored message id."""
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("👍", callback_data=f"up:{message_id}"),
                InlineKeyboardButton("👎", callback_data=f"down:{message_id}"),
                InlineKeyboardButton("✏️", callback_data=f"fix:{message_id}"),
            ]
        ]
    )


def _not_modified(error: BadRequest) -> bool:
    return "not modified" in str(error).lower()


class Sender:
    """Sends and edits messages in one bot's name, with Telegram's limits applied."""

    def __init__(self, bot: Bot, *, edit_interval: float = 1.0) -> None:
        self.bot = bot
        self.edit_interval = edit_interval

    async def send(
        self, chat_id: int, text: str, *, reply_to: int | None = None,
        markup: ReplyMarkup | None = None,
    ) -> Message | None:  # fmt: skip
        """One message (text must fit); 429s are waited out. None when it could not be sent."""
        reply = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
        for _ in range(SEND_ATTEMPTS):
            try:
                return await self.bot.send_message(
                    chat_id, text, reply_parameters=reply, reply_markup=markup
                )
            except RetryAfter as error:
                await asyncio.sleep(min(retry_seconds(error), MAX_WAIT))
            except TelegramError as error:
                log.warning("sendMessage to chat %s failed: %s", chat_id, error)
                return None
        return None

    async def send_text(
        self, chat_id: int, text: str, *, reply_to: int | None = None,
        markup: ReplyMarkup | None = None,
    ) -> list[Message]:  # fmt: skip
        """Any length of text, split on natural boundaries; markup goes on the last part."""
        parts = split_message(text, MAX_CHARS, measure=utf16_len) or ["…"]
        sent = []
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            message = await self.send(
                chat_id, part, reply_to=reply_to if index == 0 else None,
                markup=markup if last else None,
            )  # fmt: skip
            if message is not None:
                sent.append(message)
        return sent

    async def edit(
        self,
        chat_id: int,
        message_id: int,
        text: str,
        *,
        markup: InlineKeyboardMarkup | None = None,
    ) -> None:
        """Edit text; raises RateLimited on 429 and BadRequest when the message is gone."""
        try:
            await self.bot.edit_message_text(
                text, chat_id=chat_id, message_id=message_id, reply_markup=markup
            )
        except RetryAfter as error:
            raise RateLimited(retry_seconds(error)) from error
        except BadRequest as error:
            if not _not_modified(error):
                raise

    async def set_keyboard(
        self, chat_id: int, message_id: int, markup: InlineKeyboardMarkup | None
    ) -> None:
        """Attach (or remove) inline buttons; best effort, 429s waited out."""
        for _ in range(SEND_ATTEMPTS):
            try:
                await self.bot.edit_message_reply_markup(
                    chat_id=chat_id, message_id=message_id, reply_markup=markup
                )
                return
            except RetryAfter as error:
                await asyncio.sleep(min(retry_seconds(error), MAX_WAIT))
            except TelegramError as error:
                if not (isinstance(error, BadRequest) and _not_modified(error)):
                    log.info("could not set buttons on %s/%s: %s", chat_id, message_id, error)
                return

    async def stream(self, chat_id: int, answer: Answer, *, reply_to: int | None) -> list[int]:
        """Relay `answer` by editing messages; returns the ids of every message sent for it.

        The answer is always iterated to its end, even when Telegram fails, because the
        service stores the bot turn only when the stream ends.
        """
        sent: list[int] = []

        async def send(text: str) -> str:
            reply = reply_to if not sent else None
            params = ReplyParameters(reply, allow_sending_without_reply=True) if reply else None
            try:
                message = await self.bot.send_message(chat_id, text, reply_parameters=params)
            except RetryAfter as error:
                raise RateLimited(retry_seconds(error)) from error
            sent.append(message.message_id)
            return str(message.message_id)

        async def edit(platform_id: str, text: str) -> None:
            try:
                await self.edit(chat_id, int(platform_id), text)
            except TimedOut:
                log.info("edit of %s/%s timed out; the next edit carries the text", chat_id,
                         platform_id)  # fmt: skip

        chunks = aiter(answer)

        async def relayed() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield chunk

        try:
            await relay(
                relayed(), send, edit, limit=MAX_CHARS, min_interval=self.edit_interval,
                measure=utf16_len,
            )  # fmt: skip
        except Exception:
            log.exception("streaming to chat %s failed; storing and resending the answer", chat_id)
            try:
                async for _ in chunks:  # let the service finish and store the turn
                    pass
            except Exception:
                log.exception("the answer for chat %s failed while generating", chat_id)
            if answer.message_id is not None and answer.text.strip():
                again = await self.send_text(
                    chat_id, answer.text, reply_to=None if sent else reply_to
                )
                sent += [m.message_id for m in again]
        if not sent and answer.message_id is not None:
            # An empty answer still gets a message, so it can be rated and corrected.
            sent += [m.message_id for m in await self.send_text(chat_id, "…", reply_to=reply_to)]
        return sent


class ProgressMessage:
    """One message that shows the latest progress line, edited at most every `interval`."""

    def __init__(
        self, sender: Sender, chat_id: int, message_id: int, header: str, interval: float
    ) -> None:
        self.sender, self.chat_id, self.message_id = sender, chat_id, message_id
        self.header, self.interval = header, interval
        self.loop = asyncio.get_running_loop()
        self.next_edit = 0.0
        self.lines = 0

    async def __call__(self, line: str) -> None:
        """A progress line; dropped when it comes too soon (the next one carries news)."""
        self.lines += 1
        if self.loop.time() < self.next_edit:
            return
        text = f"{self.header}\n{line}"[:MAX_CHARS]
        try:
            await self.sender.edit(self.chat_id, self.message_id, text)
            self.next_edit = self.loop.time() + self.interval
        except RateLimited as limited:
            self.next_edit = self.loop.time() + limited.retry_after
        except TelegramError as error:
            log.info("progress edit failed: %s", error)

    async def finish(self, text: str) -> None:
        """Show the result in the same message (extra parts, if any, follow as new messages)."""
        parts = split_message(text, MAX_CHARS, measure=utf16_len) or ["Done."]
        delay = self.next_edit - self.loop.time()
        for _ in range(SEND_ATTEMPTS):
            if delay > 0:
                await asyncio.sleep(min(delay, MAX_WAIT))
            try:
                await self.sender.edit(self.chat_id, self.message_id, parts[0])
                break
            except RateLimited as limited:
                delay = limited.retry_after
            except TelegramError as error:
                log.info("final progress edit failed (%s); sending the result anew", error)
                await self.sender.send(self.chat_id, parts[0])
                break
        for part in parts[1:]:
            await self.sender.send(self.chat_id, part)
