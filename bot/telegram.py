"""The Telegram adapter: python-telegram-bot updates in, ChatService calls, messages out.

Thin by design (docs/chat-service.md): permissions, history, rate limits and correction
capture live in the service. This file only decides when a Telegram update is meant for the
bot (private chats; in groups a mention or a reply), and turns the service's answers into
streamed, button-carrying plain-text messages. A Telegram bot cannot fetch old messages, so
every message it sends is linked to the stored turn it shows.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    Chat,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReactionTypeEmoji,
    Update,
    User,
)
from telegram.constants import ChatAction, ChatType, MessageEntityType
from telegram.error import InvalidToken, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    MessageReactionHandler,
    filters,
)

from bot.service import Actor, ChatService, Reply
from bot.telegram_send import ProgressMessage, Sender, answer_keyboard
from storage.models import Rating

__all__ = ["ALLOWED_UPDATES", "PLATFORM", "TelegramBot"]

log = logging.getLogger(__name__)

PLATFORM = "telegram"
ALLOWED_UPDATES = ["message", "callback_query", "message_reaction"]
USER_COMMANDS = [
    ("help", "How Ouro works"),
    ("correct", "Reply to an answer: /correct <the right answer>"),
    ("status", "Your corrections and your adapter"),
    ("reset", "Start a fresh conversation"),
    ("forget", "Delete everything Ouro stored about you"),
]
ADMIN_COMMANDS = [
    ("retrain", "Admin: train now, /retrain [user]"),
    ("rollback", "Admin: restore the previous adapter, /rollback [user]"),
    ("approve", "Admin: share a correction with everyone, /approve <id>"),
]
_COMMAND = re.compile(r"/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(.*)\Z", re.S)
_BUTTON = re.compile(r"(up|down|fix|forget|keep):(-?\d+)\Z")
_PROMPT = "✏️ What should I have said? Reply to this message with the right answer."
_RATINGS = {"👍": Rating.UP, "👎": Rating.DOWN}

Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]


class TelegramBot:
    """Ouro on Telegram. `async with TelegramBot(service, token):` polls until closed."""

    def __init__(
        self,
        service: ChatService,
        token: str,
        *,
        base_url: str | None = None,
        admin_ids: Iterable[str] = (),
        poll_interval: float = 0.0,
        poll_timeout: float = 10.0,
        edit_interval: float = 1.0,
        typing_interval: float = 4.0,
        request_timeout: float = 20.0,
        max_prompts: int = 1000,
    ) -> None:
        """`base_url`: a self-hosted Bot API server's root (what precedes /bot<token>)."""
        self.service = service
        self.admin_ids = [str(i) for i in admin_ids]
        self.poll_interval, self.poll_timeout = poll_interval, poll_timeout
        self.typing_interval = typing_interval
        if logging.getLogger("httpx").level == logging.NOTSET:
            # httpx logs every request URL at INFO, and Bot API URLs contain the token.
            logging.getLogger("httpx").setLevel(logging.WARNING)
        builder = ApplicationBuilder().token(token).job_queue(None).concurrent_updates(64)
        if base_url:
            root = base_url.rstrip("/").removesuffix("/bot")
            builder = builder.base_url(f"{root}/bot").base_file_url(f"{root}/file/bot")
        builder = builder.read_timeout(request_timeout).write_timeout(request_timeout)
        builder = builder.get_updates_read_timeout(poll_timeout + request_timeout)
        self.application: Application[Any, Any, Any, Any, Any, Any] = builder.build()
        self.sender = Sender(self.application.bot, edit_interval=edit_interval)
        self.username = ""
        self.bot_id = 0
        # ForceReply prompt (chat id, message id) -> stored bot message id it corrects.
        self._prompts: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._max_prompts = max_prompts
        self._stack = AsyncExitStack()
        self._add_handlers()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (getMe), register commands, start polling; undone in reverse by close()."""
        app = self.application
        try:
            await self._stack.enter_async_context(app)
            self.username, self.bot_id = app.bot.username, app.bot.id
            await self._register_commands()
            await app.start()
            self._stack.push_async_callback(app.stop)
            assert app.updater is not None
            await app.updater.start_polling(
                poll_interval=self.poll_interval,
                timeout=int(self.poll_timeout),
                allowed_updates=ALLOWED_UPDATES,
            )
            self._stack.push_async_callback(app.updater.stop)
        except InvalidToken:
            await self._stack.aclose()
            # PTB's message quotes the token; secrets never reach logs or tracebacks.
            message = "Telegram rejected the bot token; check it with @BotFather."
            raise InvalidToken(message) from None
        except BaseException:
            await self._stack.aclose()
            raise
        log.info("Telegram bot @%s is polling", self.username)

    async def close(self) -> None:
        """Stop polling, let in-flight answers finish, then disconnect."""
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _add_handlers(self) -> None:
        app, new = self.application, filters.UpdateType.MESSAGE
        app.add_handler(MessageHandler(new & filters.COMMAND, self._guard(self._on_command)))
        app.add_handler(MessageHandler(new & filters.TEXT, self._guard(self._on_text)))
        app.add_handler(MessageHandler(new & filters.ChatType.PRIVATE, self._guard(self._on_other)))
        app.add_handler(CallbackQueryHandler(self._guard(self._on_button)))
        app.add_handler(MessageReactionHandler(self._guard(self._on_reaction)))
        app.add_error_handler(self._on_error)

    async def _register_commands(self) -> None:
        """Native command menus: everyone sees the user commands, admins also theirs."""
        users = [BotCommand(name, text) for name, text in USER_COMMANDS]
        admins = users + [BotCommand(name, text) for name, text in ADMIN_COMMANDS]
        bot = self.application.bot
        try:
            await bot.set_my_commands(users)
        except TelegramError as error:
            log.warning("setMyCommands failed: %s", error)
        for admin in self.admin_ids:
            try:  # fails until the admin has opened a chat with the bot; harmless
                await bot.set_my_commands(admins, scope=BotCommandScopeChat(int(admin)))
            except (TelegramError, ValueError) as error:
                log.info("admin command menu for %s not set: %s", admin, error)

    # --- handlers ----------------------------------------------------------------------------

    def _guard(self, handler: Handler) -> Handler:
        """No update may crash the adapter: log, tell the user, carry on."""

        @functools.wraps(handler)
        async def guarded(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            try:
                await handler(update, context)
            except Exception:
                log.exception("Telegram update %s failed", update.update_id)
                chat = update.effective_chat
                if chat is not None:
                    await self.sender.send(
                        chat.id, "Sorry, something went wrong on my side. Nothing you sent "
                        "was lost; please try again.",
                    )  # fmt: skip
                if update.callback_query is not None:
                    await _answer_query(update.callback_query.answer())

        return guarded

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("Telegram error (update %r)", update, exc_info=context.error)

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.message, update.effective_user
        if message is None or user is None or user.is_bot or message.text is None:
            return
        match = _COMMAND.match(message.text.strip())
        if match is None:
            return
        name, addressee, args = match.group(1).lower(), match.group(2), match.group(3).strip()
        if addressee and addressee.lower() != self.username.lower():
            return  # /command@another_bot in a group
        actor = _actor(user, message.chat)
        if name == "correct":
            reply = await self._correct_command(actor, message, args)
        elif name == "retrain" and self.service.is_admin(actor):
            await self._retrain(actor, message, args)
            return
        else:
            line = f"/{'help' if name == 'start' else name} {args}".strip()
            reply = await self.service.handle_command(actor, line)
        markup = _confirm_keyboard(user.id) if reply.needs_confirmation else None
        await self.sender.send_text(
            message.chat_id, reply.text, reply_to=message.message_id, markup=markup
        )

    async def _correct_command(self, actor: Actor, message: Message, args: str) -> Reply:
        """/correct as a reply targets that message (or the answer a prompt was about)."""
        replied = message.reply_to_message
        if replied is None:
            return await self.service.correct(actor, args)
        key = (message.chat_id, replied.message_id)
        if key in self._prompts:
            return await self._correct_prompt(actor, key, args)
        return await self.service.correct(actor, args, platform_message_id=str(replied.message_id))

    async def _retrain(self, actor: Actor, message: Message, args: str) -> None:
        """Admin /retrain: progress and result edited into ONE message."""
        header = f"⏳ Retraining {args.strip() or 'everyone'}…"
        status = await self.sender.send(message.chat_id, header, reply_to=message.message_id)
        if status is None:
            return
        progress = ProgressMessage(
            self.sender, message.chat_id, status.message_id, header, self.sender.edit_interval
        )
        typing = await self._typing(message.chat_id)
        try:
            reply = await self.service.handle_command(actor, f"/retrain {args}".strip(), progress)
        finally:
            typing.cancel()
        await progress.finish(reply.text)

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.message, update.effective_user
        if message is None or user is None or user.is_bot or message.text is None:
            return
        replied = message.reply_to_message
        key = (message.chat_id, replied.message_id if replied else 0)
        if key in self._prompts:
            reply = await self._correct_prompt(_actor(user, message.chat), key, message.text)
            await self.sender.send_text(message.chat_id, reply.text, reply_to=message.message_id)
            return
        text = self._addressed_text(message)
        if text is not None:
            await self._chat(_actor(user, message.chat), message, text)

    async def _correct_prompt(self, actor: Actor, prompt: tuple[int, int], text: str) -> Reply:
        """A reply to a ✏️ prompt (chat id, message id) corrects the answer it was about."""
        reply = await self.service.correct(actor, text, message_id=self._prompts[prompt])
        if reply.ok:  # a refused reply (too long...) may be retried on the same prompt
            self._prompts.pop(prompt, None)
        return reply

    def _addressed_text(self, message: Message) -> str | None:
        """The text meant for the bot, or None: groups need a mention or a reply to the bot."""
        text = message.text or ""
        if message.chat.type == ChatType.PRIVATE:
            return text
        mention = f"@{self.username}".lower()
        mentions = [
            entity
            for entity, value in message.parse_entities([MessageEntityType.MENTION]).items()
            if value.lower() == mention
        ]
        replied = message.reply_to_message
        to_bot = bool(replied and replied.from_user and replied.from_user.id == self.bot_id)
        if not mentions and not to_bot:
            return None
        if not mentions:
            return text
        return re.sub(re.escape(mention) + r"(?!\w)", " ", text, flags=re.I).strip()

    async def _chat(self, actor: Actor, message: Message, text: str) -> None:
        replied = message.reply_to_message
        to_bot = bool(replied and replied.from_user and replied.from_user.id == self.bot_id)
        answer = await self.service.chat(
            actor,
            text,
            platform_message_id=str(message.message_id),
            reply_to_platform_message_id=str(replied.message_id) if replied and to_bot else None,
        )
        if answer.refusal is not None:
            await self.sender.send_text(
                message.chat_id, answer.refusal.text, reply_to=message.message_id
            )
            return
        typing = await self._typing(message.chat_id)
        try:
            sent = await self.sender.stream(message.chat_id, answer, reply_to=message.message_id)
        finally:
            typing.cancel()
        if answer.message_id is None:  # the engine failed: the stream ended in an apology
            if sent:
                return
            await self.sender.send(
                message.chat_id, "Sorry, I could not answer that just now; please try again.",
                reply_to=message.message_id,
            )  # fmt: skip
            return
        for platform_id in sent:
            await self.service.link_platform_message(answer.message_id, actor, str(platform_id))
        if sent:
            await self.sender.set_keyboard(
                message.chat_id, sent[-1], answer_keyboard(answer.message_id)
            )

    async def _typing(self, chat_id: int) -> asyncio.Task[None]:
        """Show "typing…" now and keep it up (Telegram clears it after ~5 s) until cancelled."""

        async def typing_once() -> None:
            try:
                await self.application.bot.send_chat_action(chat_id, ChatAction.TYPING)
            except TelegramError as error:
                log.debug("typing indicator failed: %s", error)

        async def keep_typing() -> None:
            while True:
                await asyncio.sleep(self.typing_interval)
                await typing_once()

        await typing_once()
        return asyncio.create_task(keep_typing())

    async def _on_other(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Stickers, photos, voice...: say what the bot can read instead of staying silent."""
        message = update.message
        if message is not None and message.text is None:
            await self.sender.send(
                message.chat_id, "I can only read text messages; please type your question.",
                reply_to=message.message_id,
            )  # fmt: skip

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query, user = update.callback_query, update.effective_user
        if query is None or user is None:
            return
        match = _BUTTON.match(query.data or "")
        message = query.message
        if match is None or not isinstance(message, Message):
            await _answer_query(query.answer("This button no longer works."))
            return
        action, value = match.group(1), int(match.group(2))
        actor = _actor(user, message.chat)
        if action in ("forget", "keep"):
            await self._on_forget_button(query.answer, actor, message, action, value)
            return
        if action == "fix":
            await _answer_query(query.answer())
            await self._prompt_correction(message.chat, message.message_id, value, user)
            return
        rating = Rating.UP if action == "up" else Rating.DOWN
        reply = await self.service.feedback(actor, rating, message_id=value)
        await _answer_query(query.answer(_toast(reply.text)))
        if reply.ok and rating is Rating.DOWN:
            await self._prompt_correction(message.chat, message.message_id, value, user)

    async def _on_forget_button(
        self, answer: Callable[..., Awaitable[bool]], actor: Actor, message: Message,
        action: str, owner: int,
    ) -> None:  # fmt: skip
        """Only the user who asked can confirm /forget; the question becomes the result."""
        if str(owner) != actor.platform_user_id:
            await _answer_query(answer("Only the person who asked can confirm this.", True))
            return
        if action == "keep":
            text = "Nothing was deleted."
        else:
            text = (await self.service.forget(actor, confirmed=True)).text
        await _answer_query(answer())
        try:
            await self.sender.edit(message.chat_id, message.message_id, text)
        except Exception as error:  # the question was deleted: say it anew
            log.info("could not edit the /forget question: %s", error)
            await self.sender.send_text(message.chat_id, text)

    async def _prompt_correction(self, chat: Chat, reply_to: int, target: int, user: User) -> None:
        """Ask for the right answer with ForceReply; the reply is mapped back to `target`."""
        text = _PROMPT
        if chat.type != ChatType.PRIVATE and user.username:
            text = f"@{user.username} {_PROMPT}"  # ForceReply(selective) pops up for them only
        prompt = await self.sender.send(
            chat.id,
            text,
            reply_to=reply_to,
            markup=ForceReply(selective=True, input_field_placeholder="The right answer"),
        )
        if prompt is None:
            return
        self._prompts[(chat.id, prompt.message_id)] = target
        while len(self._prompts) > self._max_prompts:
            self._prompts.popitem(last=False)

    async def _on_reaction(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """👍/👎 reactions on an answer are feedback; a 👎 gets the invitation to correct."""
        reaction = update.message_reaction
        if reaction is None or reaction.user is None or reaction.user.is_bot:
            return
        emojis = [r.emoji for r in reaction.new_reaction if isinstance(r, ReactionTypeEmoji)]
        rating = next((_RATINGS[e] for e in emojis if e in _RATINGS), None)
        if rating is None:
            return  # removed, or another emoji
        actor = _actor(reaction.user, reaction.chat)
        reply = await self.service.feedback(
            actor, rating, platform_message_id=str(reaction.message_id)
        )
        target = reply.data.get("message_id")
        if rating is Rating.DOWN and reply.ok and isinstance(target, int):
            await self._prompt_correction(reaction.chat, reaction.message_id, target, reaction.user)
        # Errors stay silent: a reaction on someone's message in a group is not a request.


def _actor(user: User, chat: Chat) -> Actor:
    return Actor(PLATFORM, str(user.id), str(chat.id), user.username or user.full_name)


def _confirm_keyboard(user_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("Yes, forget me", callback_data=f"forget:{user_id}"),
                InlineKeyboardButton("Cancel", callback_data=f"keep:{user_id}"),
            ]
        ]
    )


def _toast(text: str) -> str:
    """answerCallbackQuery shows at most 200 characters."""
    return text if len(text) <= 200 else text[:199] + "…"


async def _answer_query(call: Awaitable[bool]) -> None:
    """Answering a callback query is cosmetic; an old or duplicate query must not fail."""
    try:
        await call
    except TelegramError as error:
        log.info("answerCallbackQuery failed: %s", error)
