"""Discord chat: which messages are addressed to Ouro, streaming answers by editing a message
within Discord's edit rate limit, linking every sent message to the stored turn, reactions.

What to answer and what to store is the ChatService's; here only the translation.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord.ext import commands

from bot import streaming
from bot.service import Actor, Answer, Reply
from bot.text import split_message, utf16_len
from storage.models import Rating

if TYPE_CHECKING:
    from bot.discord_bot import OuroDiscordBot

__all__ = ["MESSAGE_LIMIT", "PLATFORM", "PLATFORM_ERRORS", "ChatCog", "actor_for"]

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000  # characters per Discord message (counted as UTF-16 units, the stricter)
REFUSAL_REPEAT_S = 60.0  # the same refusal is told to a user at most once in this window
# What a failed delivery can raise: discord errors, network errors, timeouts.
PLATFORM_ERRORS = (discord.DiscordException, aiohttp.ClientError, OSError, TimeoutError)
SORRY = "Sorry, something went wrong on my side. Please try again in a moment."
_RATINGS = {"👍": Rating.UP, "👎": Rating.DOWN}
_EMOJI_MODIFIERS = re.compile("[\ufe0e\ufe0f\U0001f3fb-\U0001f3ff]")


def actor_for(user: discord.abc.User | discord.Object, channel_id: int) -> Actor:
    """The service's view of a Discord user in one channel (DM or guild channel)."""
    name = getattr(user, "display_name", None)
    return Actor(PLATFORM, str(user.id), str(channel_id), display_name=name)


class ChatCog(commands.Cog):
    """Messages and reactions."""

    def __init__(self, bot: OuroDiscordBot) -> None:
        self.bot = bot
        self.service = bot.service
        self._told: dict[tuple[str, str, str], float] = {}  # (user, chat, refusal) -> time told
        self.in_flight: set[asyncio.Task[Any]] = set()  # handlers still answering

    # --- chat --------------------------------------------------------------------------------
    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or not self._addressed(message):
            return
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
        try:
            await self._answer(message)
        except Exception:
            log.exception("failed to answer Discord message %s", message.id)
            await self._apologise(message)
        finally:
            self.in_flight.discard(task)  # type: ignore[arg-type]

    def _addressed(self, message: discord.Message) -> bool:
        """DMs always; in guilds a mention or a reply to us, in an allowed channel."""
        me = self.bot.user
        if me is None:
            return False
        if message.guild is None:
            return True
        channel = message.channel
        ids = {str(channel.id), str(getattr(channel, "parent_id", None))}
        allowed = self.bot.allowed_channels
        if allowed and not ids & allowed:
            return False
        if any(user.id == me.id for user in message.mentions):
            return True
        ref = message.reference
        resolved = ref.resolved if ref is not None else None
        return isinstance(resolved, discord.Message) and resolved.author.id == me.id

    def _text(self, message: discord.Message) -> str:
        me = self.bot.user
        text = message.content
        if me is not None:
            text = re.sub(rf"<@!?{me.id}>", "", text)
        return text.strip()

    async def _answer(self, message: discord.Message) -> None:
        actor = actor_for(message.author, message.channel.id)
        ref = message.reference
        reply_to = str(ref.message_id) if ref is not None and ref.message_id else None
        answer = await self.service.chat(
            actor,
            self._text(message),
            platform_message_id=str(message.id),
            reply_to_platform_message_id=reply_to,
        )
        if answer.refusal is not None:
            await self._refuse(message, actor, answer.refusal)
            return
        sent = await self._deliver(message, answer)
        if answer.message_id is None:
            log.warning(
                "answer to %s was not stored; %d messages left unlinked", message.id, len(sent)
            )
            return
        for platform_id in sent:
            await self.service.link_platform_message(answer.message_id, actor, platform_id)

    async def _deliver(self, message: discord.Message, answer: Answer) -> list[str]:
        """Stream the answer into Discord; returns the ids sent. The stored turn never depends
        on delivery: on a platform failure the answer is still read to the end (so the
        service stores it) and, if nothing got through, sent once more in one go."""
        channel = message.channel
        sent: list[str] = []
        posted: dict[str, discord.Message] = {}
        reference = message.to_reference(fail_if_not_exists=False)

        async def send(text: str) -> str:
            try:
                msg = await _post(channel, text, None if sent else reference)
            except discord.RateLimited as limited:
                raise streaming.RateLimited(limited.retry_after) from limited
            sent.append(str(msg.id))
            posted[str(msg.id)] = msg
            return str(msg.id)

        async def edit(platform_id: str, text: str) -> None:
            try:
                await posted[platform_id].edit(content=text)
            except discord.RateLimited as limited:
                raise streaming.RateLimited(limited.retry_after) from limited

        chunks = aiter(answer)
        try:
            async with _typing(channel):
                await streaming.relay(
                    _forward(chunks),
                    send,
                    edit,
                    limit=MESSAGE_LIMIT,
                    min_interval=self.bot.edit_interval,
                    measure=utf16_len,
                )
        except PLATFORM_ERRORS as error:
            log.warning("delivering answer to %s failed: %r", message.id, error)
            async for _ in _forward(chunks):  # let the service finish and store the turn
                pass
            if not sent:
                await self._send_parts(channel, answer.text, sent, reference)
        return sent

    async def _send_parts(
        self,
        channel: discord.abc.Messageable,
        text: str,
        sent: list[str],
        reference: discord.MessageReference | None,
    ) -> None:
        """Best-effort plain delivery (no streaming) after a failed stream."""
        try:
            for part in split_message(text, MESSAGE_LIMIT, measure=utf16_len):
                msg = await _post(channel, part, None if sent else reference)
                sent.append(str(msg.id))
        except PLATFORM_ERRORS as error:
            log.warning("could not deliver the answer at all: %r", error)

    async def _apologise(self, message: discord.Message) -> None:
        """Something of ours failed: say so rather than stay silent (best effort)."""
        try:
            await _post(message.channel, SORRY, message.to_reference(fail_if_not_exists=False))
        except Exception as error:
            log.warning("could not apologise either: %r", error)

    async def _refuse(self, message: discord.Message, actor: Actor, refusal: Reply) -> None:
        """Tell the user why nothing was generated, but not the same thing over and over."""
        kind = "rate limit" if "retry_after" in refusal.data else refusal.text  # the wait varies
        key = (actor.platform_user_id, actor.chat_id, kind)
        now = time.monotonic()
        if now - self._told.get(key, -REFUSAL_REPEAT_S) < REFUSAL_REPEAT_S:
            return
        self._told = {k: t for k, t in self._told.items() if now - t < REFUSAL_REPEAT_S}
        self._told[key] = now
        try:
            reference = message.to_reference(fail_if_not_exists=False)
            await _post(message.channel, refusal.text[:MESSAGE_LIMIT], reference)
        except PLATFORM_ERRORS as error:
            log.warning("could not send refusal: %r", error)

    # --- reactions ---------------------------------------------------------------------------
    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """Raw, because the reacted message is usually not in discord.py's cache."""
        me = self.bot.user
        rating = _RATINGS.get(_EMOJI_MODIFIERS.sub("", payload.emoji.name or ""))
        if me is None or rating is None or payload.user_id == me.id:
            return
        if payload.message_author_id is not None and payload.message_author_id != me.id:
            return
        user = payload.member or discord.Object(payload.user_id)
        actor = actor_for(user, payload.channel_id)
        try:
            reply = await self.service.feedback(
                actor, rating, platform_message_id=str(payload.message_id)
            )
            if rating is Rating.DOWN and reply.ok and reply.text:
                await self._invite_correction(payload, reply.text)
        except Exception:
            log.exception("failed to record reaction on %s", payload.message_id)

    async def _invite_correction(self, payload: discord.RawReactionActionEvent, text: str) -> None:
        """A short reply under the answer (a DM reply when the answer is in a DM)."""
        channel = self.bot.get_partial_messageable(payload.channel_id, guild_id=payload.guild_id)
        reference = discord.MessageReference(
            message_id=payload.message_id,
            channel_id=payload.channel_id,
            guild_id=payload.guild_id,
            fail_if_not_exists=False,
        )
        content = text if payload.guild_id is None else f"<@{payload.user_id}> {text}"
        mentions = discord.AllowedMentions(users=[discord.Object(payload.user_id)])
        try:
            await channel.send(
                content[:MESSAGE_LIMIT], reference=reference, allowed_mentions=mentions
            )
        except PLATFORM_ERRORS as error:
            log.warning("could not invite a correction: %r", error)


async def _post(
    channel: discord.abc.Messageable, text: str, reference: discord.MessageReference | None
) -> discord.Message:
    """Send `text`, as a reply when `reference` is given (never pinging anyone)."""
    if reference is None:
        return await channel.send(text)
    return await channel.send(text, reference=reference)


async def _forward(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Iterate `chunks` without closing it when the consumer stops early (we drain it later)."""
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        yield chunk


@asynccontextmanager
async def _typing(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """The typing indicator, best effort: a failure to show it never stops the answer."""
    typing = channel.typing()
    try:
        await typing.__aenter__()
    except PLATFORM_ERRORS as error:
        log.info("typing indicator failed: %r", error)
        yield
        return
    try:
        yield
    finally:
        await typing.__aexit__(None, None, None)
