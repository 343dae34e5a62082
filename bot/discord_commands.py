"""Discord application commands: slash commands, the "Correct this answer" menu and its modal.

Each handler builds an `Actor`, calls the matching ChatService method and shows its `Reply`.
Anything that touches the store or the learner defers first (Discord wants an answer within
3 s) and shows the reply by editing that deferred response. Permission checks are the
service's: a non-admin running an admin command gets its refusal, ephemerally.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_chat import MESSAGE_LIMIT, PLATFORM
from bot.service import Actor, ChatService, Reply
from bot.text import split_message, utf16_len

if TYPE_CHECKING:
    from bot.discord_bot import OuroDiscordBot

__all__ = ["CommandsCog", "CorrectionModal", "ForgetView", "parse_message_ref"]

log = logging.getLogger(__name__)

TEXT_INPUT_LIMIT = 4000  # Discord's cap on a modal text input
PROGRESS_INTERVAL = 1.0  # seconds between progress edits of one message
_LINK = re.compile(
    r"^https?://(?:(?:ptb|canary)\.)?discord(?:app)?\.com/channels/(?:@me|\d+)/(\d+)/(\d+)/?$"
)


def parse_message_ref(value: str, channel_id: int) -> tuple[int, int] | None:
    """A message link or a bare id -> (channel id, message id); None when it is neither."""
    value = value.strip().strip("<>")
    if value.isdigit() and len(value) <= 20:
        return channel_id, int(value)
    match = _LINK.match(value)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _actor(interaction: discord.Interaction, channel_id: int | None = None) -> Actor:
    user = interaction.user
    return Actor(
        PLATFORM,
        str(user.id),
        str(channel_id if channel_id is not None else interaction.channel_id),
        display_name=user.display_name,
    )


def _parts(text: str) -> list[str]:
    return split_message(text, MESSAGE_LIMIT, measure=utf16_len) or ["(nothing to show)"]


async def show(interaction: discord.Interaction, reply: Reply, *, ephemeral: bool = True) -> None:
    """Show a Reply: edit the deferred response (or respond), long text continues in follow-ups."""
    parts = _parts(reply.text)
    if interaction.response.is_done():
        await interaction.edit_original_response(content=parts[0])
    else:
        await interaction.response.send_message(parts[0], ephemeral=ephemeral)
    for part in parts[1:]:
        await interaction.followup.send(part, ephemeral=ephemeral)


class CommandsCog(commands.Cog):
    """Slash commands and the message context menu, translated to ChatService calls."""

    def __init__(self, bot: OuroDiscordBot, service: ChatService) -> None:
        self.bot = bot
        self.service = service
        # Context menus cannot be declared inside a Cog: register one by hand.
        self.correct_menu = app_commands.ContextMenu(
            name="Correct this answer", callback=self._correct_menu
        )
        self.correct_menu.error(self._menu_error)
        bot.tree.add_command(self.correct_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.correct_menu.name, type=self.correct_menu.type)

    # --- everyone -------------------------------------------------------------------------
    @app_commands.command(name="correct", description="Teach me the right answer.")
    @app_commands.describe(
        text="The right answer",
        message="Link or id of my answer to correct (default: my latest answer to you here)",
    )
    async def correct(
        self, interaction: discord.Interaction, text: str, message: str | None = None
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        channel_id, platform_id = interaction.channel_id or 0, None
        if message is not None:
            ref = parse_message_ref(message, channel_id)
            if ref is None:
                text_ = (
                    "That is not a message link or id. Right-click my answer, Copy Message Link."
                )
                await show(interaction, Reply(text_, ok=False))
                return
            channel_id, platform_id = ref[0], str(ref[1])
        actor = _actor(interaction, channel_id)
        reply = await self.service.correct(actor, text, platform_message_id=platform_id)
        await show(interaction, reply)

    @app_commands.command(name="status", description="Your corrections and what I have learned.")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await show(interaction, await self.service.status(_actor(interaction)))

    @app_commands.command(name="reset", description="Start a fresh conversation here.")
    async def reset(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await show(interaction, await self.service.reset(_actor(interaction)))

    @app_commands.command(name="help", description="What I can do and how to correct me.")
    async def help(self, interaction: discord.Interaction) -> None:
        await show(interaction, self.service.help(_actor(interaction)))

    @app_commands.command(name="forget", description="Delete everything I know about you.")
    async def forget(self, interaction: discord.Interaction) -> None:
        actor = _actor(interaction)
        reply = await self.service.forget(actor)
        if not reply.needs_confirmation:
            await show(interaction, reply)
            return
        view = ForgetView(self.service, actor, interaction.user.id)
        await interaction.response.send_message(
            reply.text[:MESSAGE_LIMIT], view=view, ephemeral=True
        )

    # --- admins -----------------------------------------------------------------------------
    @app_commands.command(name="retrain", description="Admin: train now and report progress.")
    @app_commands.describe(user="Only this user's adapter (default: everyone with new corrections)")
    async def retrain(
        self, interaction: discord.Interaction, user: discord.User | None = None
    ) -> None:
        actor = _actor(interaction)
        admin = self.service.is_admin(actor)
        await interaction.response.defer(ephemeral=not admin, thinking=True)
        progress = ProgressMessage(interaction, self.bot.edit_interval) if admin else None
        target = str(user.id) if user is not None else None
        reply = await self.service.retrain(actor, target, progress=progress)
        if progress is not None:
            progress.closed = True
        await show(interaction, reply, ephemeral=not admin)

    @app_commands.command(name="rollback", description="Admin: restore the previous adapter.")
    @app_commands.describe(user="Roll back this user's adapter (default: the shared adapter)")
    async def rollback(
        self, interaction: discord.Interaction, user: discord.User | None = None
    ) -> None:
        actor = _actor(interaction)
        admin = self.service.is_admin(actor)
        await interaction.response.defer(ephemeral=not admin, thinking=True)
        target = str(user.id) if user is not None else None
        await show(interaction, await self.service.rollback(actor, target), ephemeral=not admin)

    @app_commands.command(name="approve", description="Admin: share a correction with everyone.")
    @app_commands.describe(correction="The correction id, as /status shows it")
    async def approve(self, interaction: discord.Interaction, correction: str) -> None:
        actor = _actor(interaction)
        admin = self.service.is_admin(actor)
        await interaction.response.defer(ephemeral=not admin, thinking=True)
        await show(interaction, await self.service.approve(actor, correction), ephemeral=not admin)

    # --- context menu -----------------------------------------------------------------------
    async def _correct_menu(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        me = self.bot.user
        if me is None or message.author.id != me.id:
            await show(
                interaction, Reply("I can only learn from corrections to my own answers.", ok=False)
            )
            return
        actor = _actor(interaction, message.channel.id)
        modal = CorrectionModal(self.service, actor, str(message.id), message.content)
        await interaction.response.send_modal(modal)

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await _report_error(interaction, error)

    async def _menu_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await _report_error(interaction, error)


async def _report_error(interaction: discord.Interaction, error: Exception) -> None:
    """Log, and tell the user something went wrong (best effort: the platform may be down)."""
    log.error("Discord interaction %s failed", interaction.id, exc_info=error)
    text = "Sorry, something went wrong on my side. Nothing you stored was lost; please try again."
    try:
        await show(interaction, Reply(text, ok=False))
    except Exception as again:  # the platform or our session is gone: logged above
        log.warning("could not report the error: %r", again)


class CorrectionModal(discord.ui.Modal, title="Correct this answer"):
    """Pre-filled with my answer; the correction is confirmed only once it is stored."""

    def __init__(self, service: ChatService, actor: Actor, platform_message_id: str, answer: str):
        super().__init__(timeout=15 * 60)
        self.service, self.actor, self.platform_message_id = service, actor, platform_message_id
        self.text: discord.ui.TextInput[CorrectionModal] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            default=answer[:TEXT_INPUT_LIMIT] or None,
            max_length=TEXT_INPUT_LIMIT,
            required=True,
        )
        self.add_item(discord.ui.Label(text="The right answer", component=self.text))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        reply = await self.service.correct(
            self.actor, self.text.value, platform_message_id=self.platform_message_id
        )
        await show(interaction, reply)

    async def on_error(  # type: ignore[override]  # Modal's hook takes no item
        self, interaction: discord.Interaction, error: Exception
    ) -> None:
        await _report_error(interaction, error)


class ForgetView(discord.ui.View):
    """The confirmation /forget asks for: only the user who asked may press it."""

    def __init__(self, service: ChatService, actor: Actor, owner_id: int) -> None:
        super().__init__(timeout=120)
        self.service, self.actor, self.owner_id = service, actor, owner_id

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.owner_id:
            return True
        await show(interaction, Reply("This button is not for you.", ok=False))
        return False

    @discord.ui.button(label="Forget everything", style=discord.ButtonStyle.danger)
    async def confirm(
        self, interaction: discord.Interaction, _: discord.ui.Button[ForgetView]
    ) -> None:
        await interaction.response.defer()  # updates this message later
        reply = await self.service.forget(self.actor, confirmed=True)
        self.stop()
        await interaction.edit_original_response(content=_parts(reply.text)[0], view=None)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(
        self, interaction: discord.Interaction, _: discord.ui.Button[ForgetView]
    ) -> None:
        self.stop()
        await interaction.response.edit_message(content="Nothing was deleted.", view=None)

    async def on_error(
        self, interaction: discord.Interaction, error: Exception, item: discord.ui.Item[ForgetView]
    ) -> None:
        await _report_error(interaction, error)


class ProgressMessage:
    """The learner's progress lines, edited into the deferred /retrain response.

    Edits are throttled to `interval` (Discord rate-limits edits); a failed edit never
    interrupts training. The final reply is shown by the caller.
    """

    def __init__(self, interaction: discord.Interaction, interval: float = PROGRESS_INTERVAL):
        self.interaction, self.interval = interaction, interval
        self.last = float("-inf")
        self.closed = False

    async def __call__(self, line: str) -> None:
        now = time.monotonic()
        if self.closed or now - self.last < self.interval:
            return
        self.last = now
        try:
            await self.interaction.edit_original_response(content=f"⏳ {line}"[:MESSAGE_LIMIT])
        except discord.DiscordException as error:
            log.info("progress edit failed: %r", error)
