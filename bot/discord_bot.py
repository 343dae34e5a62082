"""The Discord adapter: `OuroDiscordBot` (a discord.py `commands.Bot`) over the ChatService.

Thin by design (docs/chat-service.md): permissions, history and corrections live in the
service. Chat and reactions are in `bot.discord_chat`; slash commands, the context menu and
the modal in `bot.discord_commands`. `start_discord` runs the bot inside the app's loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import discord
import yarl
from discord.ext import commands

from bot.discord_chat import MESSAGE_LIMIT, PLATFORM, ChatCog, actor_for
from bot.discord_commands import CommandsCog
from bot.service import ChatService

__all__ = [
    "MESSAGE_LIMIT",
    "PLATFORM",
    "OuroDiscordBot",
    "actor_for",
    "configure_endpoints",
    "intents",
    "start_discord",
]

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0


def configure_endpoints(
    api_base: str | None = None, gateway_url: str | None = None
) -> tuple[str, yarl.URL]:
    """Point discord.py at another REST base / gateway (a test fake, a proxy); returns the
    previous pair so it can be restored.

    discord.py has no per-client setting for these: the REST base is the class attribute
    `Route.BASE` (what `discord.http._set_api_version` rewrites; webhooks and interaction
    callbacks use it too) and the gateway is `DiscordWebSocket.DEFAULT_GATEWAY` (used for
    every fresh connection). Both are process-wide, which is fine for one bot per process.
    """
    previous = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    return previous


def intents() -> discord.Intents:
    """Only what Ouro reads: guild/DM messages with content, and reactions."""
    wanted = discord.Intents.none()
    wanted.guilds = wanted.guild_messages = wanted.dm_messages = True
    wanted.message_content = True
    wanted.guild_reactions = wanted.dm_reactions = True
    return wanted


class OuroDiscordBot(commands.Bot):
    """Ouro on Discord; start inside the app's event loop with `await bot.start(token)`.

    `allowed_channels` (ids as text) limits where mentions/replies are answered; empty means
    every channel. DMs are always answered. `edit_interval` throttles streaming edits.
    """

    def __init__(
        self,
        service: ChatService,
        *,
        allowed_channels: Iterable[str] = (),
        api_base: str | None = None,
        gateway_url: str | None = None,
        edit_interval: float = 1.0,
        sync_commands: bool = True,
        shutdown_grace: float = 10.0,
        **options: Any,
    ) -> None:
        options.setdefault("allowed_mentions", discord.AllowedMentions.none())
        options.setdefault("help_command", None)  # no prefix commands; /help is a slash command
        super().__init__(command_prefix=commands.when_mentioned, intents=intents(), **options)
        self.service = service
        self.allowed_channels = frozenset(str(c) for c in allowed_channels)
        self.api_base, self.gateway_url = api_base, gateway_url
        self.edit_interval = edit_interval
        self.sync_commands = sync_commands
        self.shutdown_grace = shutdown_grace
        self._endpoints: tuple[str, yarl.URL] | None = None  # what login replaced

    async def login(self, token: str) -> None:
        if self.api_base or self.gateway_url:
            self._endpoints = configure_endpoints(self.api_base, self.gateway_url)
        await super().login(token)

    async def setup_hook(self) -> None:
        """Async setup before the gateway connects: cogs, then the slash commands."""
        await self.add_cog(ChatCog(self))
        await self.add_cog(CommandsCog(self, self.service))
        if self.sync_commands:
            try:
                await self.tree.sync()
            except discord.HTTPException:
                log.exception("could not sync application commands; the old ones stay")

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: every message is chat, handled by ChatCog."""

    async def close(self) -> None:
        """Let answers in flight finish (and be stored and linked) before disconnecting."""
        cog = self.get_cog(ChatCog.__cog_name__)
        running = (
            set(cog.in_flight) - {asyncio.current_task()} if isinstance(cog, ChatCog) else set()
        )
        if running:
            _, pending = await asyncio.wait(running, timeout=self.shutdown_grace)
            for task in pending:
                task.cancel()
        await super().close()
        if self._endpoints is not None:  # leave the process as we found it
            configure_endpoints(str(self._endpoints[0]), str(self._endpoints[1]))
            self._endpoints = None


@asynccontextmanager
async def start_discord(
    service: ChatService,
    token: str,
    *,
    api_base: str | None = None,
    gateway_url: str | None = None,
    channels: Iterable[str] = (),
    ready_timeout: float = READY_TIMEOUT,
    **options: Any,
) -> AsyncIterator[OuroDiscordBot]:
    """Run the bot in the current event loop until the block exits.

    Waits until the gateway is ready, so a bad token or an unreachable Discord fails here
    with a clear error instead of in a background task nobody watches. Past `ready_timeout`
    it goes on (discord.py keeps reconnecting) with a warning.
    """
    bot = OuroDiscordBot(
        service, allowed_channels=channels, api_base=api_base, gateway_url=gateway_url, **options
    )
    task = asyncio.create_task(bot.start(token), name="discord-bot")
    ready = asyncio.create_task(bot.wait_until_ready())
    try:
        await asyncio.wait(
            {task, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if task.done():
            error = task.exception()
            raise RuntimeError(f"the Discord bot could not start: {error!r}") from error
        if not ready.done():
            log.warning("Discord is not ready after %.0f s; still trying", ready_timeout)
        task.add_done_callback(_report_exit)
        yield bot
    finally:
        ready.cancel()
        task.remove_done_callback(_report_exit)
        await bot.close()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _report_exit(task: asyncio.Task[None]) -> None:
    """discord.py's start() only returns on close: anything else is worth an error line."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the Discord bot stopped", exc_info=task.exception())
    else:
        log.error("the Discord bot stopped unexpectedly")
