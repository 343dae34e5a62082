"""The platform-neutral chat service: every behaviour the bots share lives here, once.

Adapters (Discord, Telegram, console, HTTP) translate platform events into these calls and
`Reply`/`Answer` results back into platform messages. See docs/chat-service.md.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

from bot import commands
from bot.answer import Answer
from bot.history import as_context, reply_chain, to_chat
from bot.ports import LearnerPort, Progress
from bot.ratelimit import SlidingWindow
from model.interface import ChatMessage, GenerationRequest, InferenceEngine, SamplingParams
from storage.errors import InvalidArgumentError, StoreError
from storage.models import (
    AdapterScope,
    CorrectionScope,
    CorrectionStatus,
    Message,
    Rating,
    Role,
    User,
)

if TYPE_CHECKING:
    from storage.store import Store

__all__ = ["Actor", "Answer", "ChatConfig", "ChatService", "Reply"]

log = logging.getLogger(__name__)

CONTEXT_CACHE_SIZE = 2048
RATINGS = {
    "up": Rating.UP, "good": Rating.UP, "+1": Rating.UP, "👍": Rating.UP,
    "down": Rating.DOWN, "bad": Rating.DOWN, "-1": Rating.DOWN, "👎": Rating.DOWN,
}  # fmt: skip


@dataclass(frozen=True)
class Actor:
    """Who is talking, and where: a platform user in one chat."""

    platform: str  # "discord" | "telegram" | "console" | "api"
    platform_user_id: str
    chat_id: str  # DM/channel/chat id; "console" for the terminal; "api" for HTTP
    display_name: str | None = None


@dataclass(frozen=True)
class ChatConfig:
    """Chat behaviour, built by ouro from Settings (bot never imports ouro)."""

    system_prompt: str
    history_turns: int = 6
    max_new_tokens: int = 200
    temperature: float = 0.0
    rate_limit_per_minute: int = 12
    max_message_chars: int = 4000
    correction_max_chars: int = 2000
    admin_ids: Mapping[str, frozenset[str]] = field(default_factory=dict)
    console_user_is_admin: bool = True


@dataclass(frozen=True)
class Reply:
    """The result of every command: plain text plus hints for the adapter."""

    text: str
    ok: bool = True  # False: refused / invalid input
    private: bool = False  # Discord: ephemeral
    needs_confirmation: bool = False  # /forget: confirm, then forget(confirmed=True)
    data: Mapping[str, Any] = field(default_factory=dict)


def refuse(text: str, **data: Any) -> Reply:
    return Reply(text, ok=False, private=True, data=data)


P = ParamSpec("P")
Method = Callable[Concatenate["ChatService", P], Awaitable["Reply"]]
AnswerMethod = Callable[Concatenate["ChatService", P], Awaitable[Answer]]


def store_failure(error: StoreError) -> Reply:
    """What the user reads when the store refuses: bad input says why, anything else retries."""
    if isinstance(error, InvalidArgumentError):
        return refuse(f"That did not work: {error}.")
    log.error("store failure: %r", error)
    return refuse("I could not save that just now (storage is busy). Please try again.")


def guarded(method: Method[P]) -> Method[P]:
    """A store error becomes a clear refusal, not a crash."""

    @functools.wraps(method)
    async def wrapper(self: ChatService, /, *args: P.args, **kwargs: P.kwargs) -> Reply:
        try:
            return await method(self, *args, **kwargs)
        except StoreError as error:
            return store_failure(error)

    return wrapper


def guarded_answer(method: AnswerMethod[P]) -> AnswerMethod[P]:
    """As `guarded`, for chat calls: the refusal travels in the Answer."""

    @functools.wraps(method)
    async def wrapper(self: ChatService, /, *args: P.args, **kwargs: P.kwargs) -> Answer:
        try:
            return await method(self, *args, **kwargs)
        except StoreError as error:
            return Answer.refused(store_failure(error))

    return wrapper


def clean_text(text: str) -> str:
    """Join surrogate pairs that arrived as two code points (UTF-16 platforms) into one."""
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _storable(text: str) -> str:
    """Model output as the store can keep it (a tokenizer can emit NUL or broken UTF-16)."""
    text = clean_text(text).replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def _unstorable(text: str) -> str | None:
    """What in `text` the store cannot keep (SQLite text is UTF-8 without NUL), if anything."""
    if "\x00" in text:
        return "a NUL character"
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        return "an invalid character (a lone UTF-16 surrogate)"
    return None


class ChatService:
    """Chat, corrections, feedback and commands for every platform."""

    def __init__(
        self,
        store: Store,
        engine: InferenceEngine,
        learner: LearnerPort,
        config: ChatConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.engine, self.learner, self.config = store, engine, learner, config
        self.rate_limit = SlidingWindow(config.rate_limit_per_minute, 60.0, clock)
        # bot message id -> the exact turns that produced it (the store can rebuild it too)
        self._contexts: OrderedDict[int, list[dict[str, str]]] = OrderedDict()

    # --- who ------------------------------------------------------------------------------

    def is_admin(self, actor: Actor) -> bool:
        if actor.platform == "console":
            return self.config.console_user_is_admin
        return actor.platform_user_id in self.config.admin_ids.get(actor.platform, frozenset())

    async def user_for(self, actor: Actor) -> User:
        return await self.store.get_or_create_user(
            actor.platform, actor.platform_user_id, actor.display_name, self.is_admin(actor)
        )

    # --- chatting -------------------------------------------------------------------------

    @guarded_answer
    async def chat(
        self,
        actor: Actor,
        text: str,
        *,
        platform_message_id: str | None = None,
        reply_to_platform_message_id: str | None = None,
    ) -> Answer:
        """Answer `text` in the context of this chat (or of the reply chain it answers)."""
        text = clean_text(text)
        if refusal := self._check_message(text):
            return Answer.refused(refusal)
        user = await self.user_for(actor)
        if refusal := self._check_rate(actor, user):
            return Answer.refused(refusal)
        history = await self._history(user, actor, reply_to_platform_message_id)
        messages = [*to_chat(history), ChatMessage("user", text)]
        previous = history[-1].id if history and history[-1].role == Role.ASSISTANT else None
        turn = await self.store.add_message(
            user.id, actor.platform, actor.chat_id, Role.USER, text,
            platform_message_id=platform_message_id, reply_to_id=previous,
        )  # fmt: skip
        sampling = SamplingParams(self.config.max_new_tokens, self.config.temperature)
        return self._stream(user, actor, turn, messages, sampling)

    @guarded_answer
    async def complete(
        self,
        actor: Actor,
        messages: Sequence[ChatMessage],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Answer:
        """Stateless chat (HTTP API): `messages` is the whole conversation."""
        messages = [ChatMessage(m.role, clean_text(m.content)) for m in messages]
        if any(_unstorable(m.content) for m in messages):
            return Answer.refused(refuse("The conversation contains NUL or invalid characters."))
        question = next((m for m in reversed(messages) if m.role == "user"), None)
        if question is None:
            return Answer.refused(refuse("The conversation needs at least one user message."))
        if refusal := self._check_message(question.content):
            return Answer.refused(refusal)
        if max_new_tokens is not None and max_new_tokens < 1:
            return Answer.refused(refuse("max_new_tokens must be at least 1."))
        if temperature is not None and not 0.0 <= temperature <= 2.0:
            return Answer.refused(refuse("temperature must be between 0 and 2."))
        user = await self.user_for(actor)
        if refusal := self._check_rate(actor, user):
            return Answer.refused(refusal)
        turn = await self.store.add_message(
            user.id, actor.platform, actor.chat_id, Role.USER, question.content
        )
        prompt = [m for m in messages if m.role != "system"]
        system = [m for m in messages if m.role == "system"]
        sampling = SamplingParams(
            max_new_tokens or self.config.max_new_tokens,
            self.config.temperature if temperature is None else temperature,
        )
        return self._stream(user, actor, turn, prompt, sampling, system=system)

    async def link_platform_message(
        self, message_id: int, actor: Actor, platform_message_id: str
    ) -> None:
        """Best effort: a turn deleted meanwhile (/forget) must not fail the delivery."""
        try:
            await self.store.link_platform_message(
                message_id, actor.platform, actor.chat_id, platform_message_id
            )
        except StoreError as error:
            log.warning("could not link platform message %s: %s", platform_message_id, error)

    def _stream(
        self,
        user: User,
        actor: Actor,
        turn: Message,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        *,
        system: Sequence[ChatMessage] | None = None,
    ) -> Answer:
        """Admit the request now; the bot turn is stored when the stream ends."""
        prompt = list(system) if system else [ChatMessage("system", self.config.system_prompt)]
        request = GenerationRequest(tuple(prompt + list(messages)), str(user.id), sampling)
        context = as_context(messages)
        try:
            completion = self.engine.stream(request)
        except Exception:
            log.exception("the engine refused a request")
            return Answer.refused(refuse("The model is not available right now. Try again soon."))

        async def store_answer(answer: Answer) -> int:
            bot = await self.store.add_message(
                user.id, actor.platform, actor.chat_id, Role.ASSISTANT, _storable(answer.text),
                reply_to_id=turn.id, adapter_version=answer.adapter_version,
            )  # fmt: skip
            self._remember(bot.id, context)
            return bot.id

        return Answer(completion, user_message_id=turn.id, on_finish=store_answer)

    async def _history(
        self, user: User, actor: Actor, reply_to_platform_message_id: str | None
    ) -> list[Message]:
        """The reply chain when the user replies to a stored bot turn, else the window."""
        limit = self.config.history_turns
        if limit <= 0:
            return []
        if reply_to_platform_message_id:
            target = await self.store.find_by_platform_id(
                actor.platform, actor.chat_id, reply_to_platform_message_id
            )
            if target is not None and target.role == Role.ASSISTANT:
                return await reply_chain(self.store, target, limit)
        return await self.store.recent_messages(user.id, actor.platform, actor.chat_id, limit)

    def _check_message(self, text: str) -> Reply | None:
        if not text or not text.strip():
            return refuse("Your message is empty: write something for me to answer.")
        if unreadable := _unstorable(text):
            return refuse(f"Your message contains {unreadable}; please remove it and resend.")
        limit = self.config.max_message_chars
        if len(text) > limit:
            return refuse(
                f"Your message is too long ({len(text)} characters; the limit is {limit}). "
                "Please shorten it.",
                limit=limit,
            )
        return None

    def _check_rate(self, actor: Actor, user: User) -> Reply | None:
        if self.is_admin(actor):
            return None
        wait = self.rate_limit.hit(user.id)
        if wait <= 0:
            return None
        seconds = max(1, int(wait + 0.999))
        return refuse(
            f"You are sending messages too fast (limit {self.config.rate_limit_per_minute} "
            f"per minute). Try again in {seconds} s.",
            retry_after=seconds,
        )

    def _remember(self, message_id: int, context: list[dict[str, str]]) -> None:
        self._contexts[message_id] = context
        while len(self._contexts) > CONTEXT_CACHE_SIZE:
            self._contexts.popitem(last=False)

    async def _context_of(self, answer: Message) -> list[dict[str, str]]:
        """The turns that produced `answer`, ending with the user's question."""
        if (context := self._contexts.get(answer.id)) is not None:
            return context
        question = await self.store.get_message(answer.reply_to_id) if answer.reply_to_id else None
        if question is None:
            return []
        chain = await reply_chain(self.store, question, max(1, self.config.history_turns + 1))
        return as_context(to_chat(chain))

    # --- corrections and feedback ---------------------------------------------------------

    @guarded
    async def correct(
        self,
        actor: Actor,
        text: str,
        *,
        platform_message_id: str | None = None,
        message_id: int | None = None,
    ) -> Reply:
        """Store a correction of one of the bot's answers, confirmed only once committed."""
        corrected = clean_text(text).strip()
        if not corrected:
            return refuse("Tell me the right answer: /correct <the right answer>.")
        if unreadable := _unstorable(corrected):
            return refuse(f"Your correction contains {unreadable}; please remove it.")
        limit = self.config.correction_max_chars
        if len(corrected) > limit:
            return refuse(
                f"That correction is too long ({len(corrected)} characters; the limit is {limit}).",
                limit=limit,
            )
        user = await self.user_for(actor)
        target = await self._target(user, actor, platform_message_id, message_id)
        if isinstance(target, Reply):
            return target
        if target.user_id != user.id and not self.is_admin(actor):
            return refuse("You can only correct answers I gave to you.")
        if " ".join(corrected.split()) == " ".join(target.content.split()):
            return refuse("That is the same as my answer: tell me what the right answer is.")
        correction = await self.store.add_correction(
            user.id, target.id, target.content, corrected, await self._context_of(target)
        )
        try:
            await self.learner.notify_correction(user.id)
        except Exception:
            log.exception("notifying the learner of correction %s failed", correction.id)
        return Reply(
            f"Thanks! Correction #{correction.id} is saved. {self._schedule()}",
            data={"correction_id": correction.id, "message_id": target.id},
        )

    @guarded
    async def feedback(
        self,
        actor: Actor,
        rating: Rating | str,
        *,
        platform_message_id: str | None = None,
        message_id: int | None = None,
    ) -> Reply:
        """👍/👎 on an answer (one per user and answer; a later one replaces it)."""
        value = RATINGS.get(str(rating.value if isinstance(rating, Rating) else rating).strip())
        if value is None:
            return refuse("Rate an answer with 👍 (good) or 👎 (bad).")
        user = await self.user_for(actor)
        target = await self._target(user, actor, platform_message_id, message_id)
        if isinstance(target, Reply):
            return target
        saved = await self.store.add_feedback(user.id, target.id, value)
        data = {"feedback_id": saved.id, "message_id": target.id, "rating": value.value}
        if value == Rating.UP:
            return Reply("Thanks for the feedback!", private=True, data=data)
        return Reply(
            "Thanks for telling me. To teach me the right answer, "
            "reply with /correct <the right answer>.",
            private=True,
            data=data,
        )

    async def _target(
        self, user: User, actor: Actor, platform_message_id: str | None, message_id: int | None
    ) -> Message | Reply:
        """The bot answer a correction or rating is about, or why there is none."""
        if platform_message_id is not None:
            found = await self.store.find_by_platform_id(
                actor.platform, actor.chat_id, platform_message_id
            )
        elif message_id is not None:
            found = await self.store.get_message(message_id)
        else:
            found = await self.store.last_bot_message(user.id, actor.platform, actor.chat_id)
            if found is None:
                return refuse("There is no answer of mine to correct or rate yet.")
        if found is None:
            return refuse("I can't find that message; it may have been deleted.")
        if found.role != Role.ASSISTANT:
            return refuse("That is a user message, not one of my answers.")
        return found

    def _schedule(self) -> str:
        try:
            return self.learner.describe_schedule()
        except Exception:
            log.exception("describe_schedule failed")
            return "It will be learned at the next training run."

    # --- commands -------------------------------------------------------------------------

    def help(self, actor: Actor) -> Reply:
        return Reply(commands.help_text(self.is_admin(actor)), private=True)

    @guarded
    async def status(self, actor: Actor) -> Reply:
        """Your corrections by status, your adapter with its gate figures, the next run."""
        user = await self.user_for(actor)
        corrections = await self.store.list_corrections(user_id=user.id)
        counts = commands.count_by_status(corrections)
        personal = await self.store.active_adapter(AdapterScope.PERSONAL, user.id)
        shared = await self.store.active_adapter(AdapterScope.SHARED, None)
        try:
            next_run = self.learner.next_run_at()
        except Exception:
            log.exception("next_run_at failed")
            next_run = None
        lines = ["Your corrections: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "."]
        if corrections:
            lines += ["Latest:"] + [f"  {commands.describe_correction(c)}" for c in corrections[:5]]
        no_personal = "none yet (answers come from the shared adapter or the base model)"
        lines += [
            "Your adapter: " + commands.describe_adapter(personal, no_personal),
            "Shared adapter: " + commands.describe_adapter(shared, "none (base model)"),
            "Next training run: " + commands.describe_next_run(next_run),
        ]
        data = {
            "counts": counts,
            "corrections": [
                {"id": c.id, "status": c.status.value, "reason": c.reason} for c in corrections[:5]
            ],
            "personal_adapter": personal.version if personal else None,
            "shared_adapter": shared.version if shared else None,
            "next_run_at": next_run.isoformat() if next_run else None,
        }
        return Reply("\n".join(lines), private=True, data=data)

    @guarded
    async def reset(self, actor: Actor) -> Reply:
        user = await self.user_for(actor)
        hidden = await self.store.clear_context(user.id, actor.platform, actor.chat_id)
        return Reply(
            "Starting over: I no longer see our earlier messages here. Your corrections are kept.",
            private=True,
            data={"hidden": hidden},
        )

    @guarded
    async def forget(self, actor: Actor, *, confirmed: bool = False) -> Reply:
        """Two steps on purpose: deleting everything about a user cannot be undone."""
        if not confirmed:
            return Reply(
                "This deletes everything I store about you: messages, corrections, feedback "
                "and your personal adapter. It cannot be undone. Confirm to go ahead "
                "(/forget confirm).",
                private=True,
                needs_confirmation=True,
            )
        user = await self.user_for(actor)
        try:
            await self.learner.forget(user.id)
        except Exception:
            log.exception("forgetting user %s failed", user.id)
            return refuse("Something went wrong while deleting your data. Please try again.")
        self.rate_limit.forget(user.id)
        return Reply("Done: everything I stored about you is deleted.", private=True)

    @guarded
    async def retrain(
        self, actor: Actor, target: str | None = None, progress: Progress | None = None
    ) -> Reply:
        """Admin: train now and wait, passing progress lines through."""
        if not self.is_admin(actor):
            return refuse("Only admins can start training.")
        admin = await self.user_for(actor)
        owner = await self._admin_target(actor, target, commands.EVERYONE)
        if isinstance(owner, Reply):
            return owner
        try:
            outcome = await self.learner.retrain(
                owner.id if owner else None, admin.id, progress=progress
            )
        except Exception as error:
            log.exception("retrain failed")
            return refuse(f"Training failed: {error}")
        job = outcome.job
        promoted = [v.version for v in outcome.promoted]
        rejected = [v.version for v in outcome.rejected]
        summary = outcome.summary or (
            f"Training job #{job.id} {job.status.value}: promoted "
            f"{', '.join(promoted) or 'nothing'}; rejected {', '.join(rejected) or 'nothing'}."
        )
        data = {"job_id": job.id, "status": job.status.value, "promoted": promoted}
        return Reply(summary, ok=job.error is None, data={**data, "rejected": rejected})

    @guarded
    async def rollback(self, actor: Actor, target: str | None = None) -> Reply:
        """Admin: back to the previous adapter of a user (None: of the shared adapter)."""
        if not self.is_admin(actor):
            return refuse("Only admins can roll adapters back.")
        owner = await self._admin_target(actor, target, commands.SHARED)
        if isinstance(owner, Reply):
            return owner
        try:
            active = await self.learner.rollback(owner.id if owner else None)
        except Exception as error:
            log.exception("rollback failed")
            return refuse(f"Rollback failed: {error}")
        who = "the shared adapter" if owner is None else f"user #{owner.id}"
        now = active.version if active else "the base model"
        return Reply(
            f"Rolled back {who}: now serving {now}.",
            data={"active": active.version if active else None},
        )

    @guarded
    async def approve(self, actor: Actor, correction_id: str) -> Reply:
        """Admin: let a correction into the shared adapter."""
        if not self.is_admin(actor):
            return refuse("Only admins can approve corrections.")
        number = commands.parse_id(str(correction_id))
        if number is None:
            return refuse("Usage: /approve <correction id>, e.g. /approve 12.")
        correction = await self.store.get_correction(number)
        if correction is None:
            return refuse(f"There is no correction #{number}.")
        if correction.status == CorrectionStatus.REJECTED:
            reason = f" ({correction.reason})" if correction.reason else ""
            return refuse(f"Correction #{number} was rejected{reason}; it cannot be shared.")
        admin = await self.user_for(actor)
        await self.store.set_correction_scope(
            number, CorrectionScope.SHARED_APPROVED, approved_by=admin.id
        )
        try:
            await self.learner.notify_correction(correction.user_id)
        except Exception:
            log.exception("notifying the learner of approval %s failed", number)
        return Reply(
            f"Correction #{number} is approved for the shared adapter. {self._schedule()}",
            data={"correction_id": number},
        )

    async def _admin_target(
        self, actor: Actor, target: str | None, default_words: frozenset[str]
    ) -> User | Reply | None:
        if target is None or not target.strip() or target.strip().casefold() in default_words:
            return None
        found = await commands.resolve_target(self.store, actor.platform, target)
        return refuse(found) if isinstance(found, str) else found

    @guarded
    async def handle_command(
        self, actor: Actor, line: str, progress: Progress | None = None
    ) -> Reply:
        """'/name args' from text-only adapters; case-insensitive, '/cmd@BotName' accepted."""
        parsed = commands.parse_command(line)
        if parsed is None:
            return refuse("Commands start with /. Try /help.")
        name, args = parsed
        if name in ("help", "start"):
            return self.help(actor)
        if name == "status":
            return await self.status(actor)
        if name == "reset":
            return await self.reset(actor)
        if name == "forget":
            return await self.forget(actor, confirmed=args.casefold() in ("confirm", "yes"))
        if name == "correct":
            return await self.correct(actor, args)
        if name in ("good", "bad"):
            return await self.feedback(actor, name)
        if name == "retrain":
            return await self.retrain(actor, args or None, progress)
        if name == "rollback":
            return await self.rollback(actor, args or None)
        if name == "approve":
            return await self.approve(actor, args)
        return refuse(f"Unknown command /{commands.shorten(name, 30)}. Try /help.")
