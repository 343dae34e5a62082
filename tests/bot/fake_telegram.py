"""A fake Telegram Bot API on 127.0.0.1 that the real python-telegram-bot talks to.

    async with FakeTelegram() as tg, running_bot(service, tg) as bot:
        answer = await tg.answer_to(tg.user(100, "Ann"), "Capital of France?")


Why a server and not mocks: the adapter's behaviour is mostly about what PTB puts on the
wire (form-encoded params, reply markup, error mapping of 429/400 answers). The fake keeps a
little state like Telegram does (chats, per-chat message ids, message text and keyboards,
the update queue, allowed_updates), answers the errors Telegram answers (message to edit
not found, message is not modified, text empty/too long, chat not found) and records every
call for assertions. Tests inject updates and await what the bot sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from bot.service import ChatService
from bot.telegram import TelegramBot

TOKEN = "123456:TEST-token"
BOT_ID = 424242
MAX_TEXT = 4096  # UTF-16 code units, as Telegram counts
# What Telegram delivers when allowed_updates is empty: everything except these.
_OPT_IN_UPDATES = {"chat_member", "message_reaction", "message_reaction_count"}
# Params PTB JSON-encodes; everything else stays a string (text may look like JSON).
_JSON_PARAMS = {
    "reply_markup", "allowed_updates", "commands", "entities", "reply_parameters",
    "link_preview_options", "scope", "reaction", "caption_entities",
}  # fmt: skip
_INT_PARAMS = {"chat_id", "message_id", "offset", "limit", "timeout", "cache_time"}

Json = dict[str, Any]


@dataclass
class Call:
    """One request the bot made, params decoded to JSON values."""

    method: str
    params: Json
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Failure:
    times: int
    status: int
    description: str
    retry_after: float | None = None


class FakeTelegram:
    """The Bot API server. `async with FakeTelegram() as tg:` then point PTB at `tg.base_url`."""

    def __init__(
        self, *, token: str = TOKEN, username: str = "ouro_test_bot", idle_poll: float = 0.2
    ) -> None:
        self.token = token
        self.bot_user: Json = {
            "id": BOT_ID, "is_bot": True, "first_name": "Ouro", "username": username,
            "can_join_groups": True, "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }  # fmt: skip
        self.idle_poll = idle_poll
        self.calls: list[Call] = []
        self.chats: dict[int, Json] = {}
        self.messages: dict[tuple[int, int], Json] = {}  # (chat id, message id) -> message
        self.commands: dict[str, list[Json]] = {}  # scope (JSON text) -> commands
        self.client_markup: dict[tuple[int, int], Json] = {}  # ForceReply etc. by message
        self.callback_answers: dict[str, Json] = {}  # callback query id -> answerCallbackQuery
        self.allowed_updates: list[str] = []
        self._updates: list[Json] = []
        self._update_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._callback_ids = itertools.count(1)
        self._failures: dict[str, list[_Failure]] = {}
        self._stalls: dict[str, list[float]] = {}
        self._changed = asyncio.Condition()
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.close()

    @property
    def base_url(self) -> str:
        """The server root, as a self-hosted Bot API server's (PTB appends /bot<token>)."""
        return f"http://127.0.0.1:{self.port}"

    # --- failure injection -------------------------------------------------------------------

    def fail_next(
        self, method: str, times: int = 1, *, status: int = 400,
        description: str = "Bad Request", retry_after: float | None = None,
    ) -> None:  # fmt: skip
        """Answer the next `times` calls of `method` with this error instead of doing them."""
        self._failures.setdefault(method, []).append(
            _Failure(times, status, description, retry_after)
        )

    def rate_limit_next(self, method: str, times: int = 1, retry_after: float = 1) -> None:
        """Flood control: 429 with parameters.retry_after, as Telegram answers it."""
        self.fail_next(
            method, times, status=429, retry_after=retry_after,
            description=f"Too Many Requests: retry after {retry_after}",
        )  # fmt: skip

    def stall_next(self, method: str, seconds: float, times: int = 1) -> None:
        """Answer the next calls of `method` only after `seconds` (the client times out first;
        the call still takes effect, like a message Telegram delivered on a slow link)."""
        self._stalls.setdefault(method, []).extend([seconds] * times)

    def fail_next_edit(self, times: int = 1) -> None:
        """The edited message is gone (a user deleted it)."""
        self.fail_next(
            "editMessageText", times, description="Bad Request: message to edit not found"
        )

    # --- building updates --------------------------------------------------------------------

    @staticmethod
    def user(user_id: int, first_name: str = "Ann", username: str | None = None) -> Json:
        data: Json = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username:
            data["username"] = username
        return data

    def private_chat(self, user: Json) -> Json:
        chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
        self.chats[chat["id"]] = chat
        return chat

    def group_chat(self, chat_id: int = -100123, title: str = "Group") -> Json:
        chat = {"id": chat_id, "type": "supergroup", "title": title}
        self.chats[chat_id] = chat
        return chat

    def send_user_message(
        self, user: Json, text: str, *, chat: Json | None = None, reply_to: int | None = None
    ) -> Json:
        """A user writes `text` (optionally replying to message `reply_to`); returns the message."""
        chat = chat or self.private_chat(user)
        self.chats[chat["id"]] = chat
        message = self._new_message(chat, user, text)
        entities = _entities(text)
        if entities:
            message["entities"] = entities
        if reply_to is not None:
            message["reply_to_message"] = self._plain(self.messages[(chat["id"], reply_to)])
        self._push({"message": message})
        return message

    def send_user_sticker(self, user: Json, *, chat: Json | None = None) -> Json:
        """A non-text message (the bot only reads text)."""
        chat = chat or self.private_chat(user)
        message = self._new_message(chat, user, None)
        message["sticker"] = {
            "file_id": "stk", "file_unique_id": "stk1", "width": 512, "height": 512,
            "is_animated": False, "is_video": False, "type": "regular",
        }  # fmt: skip
        self._push({"message": message})
        return message

    def press_button(self, user: Json, chat_id: int, message_id: int, data: str) -> str:
        """The user taps an inline button; returns the callback query id."""
        query_id = str(next(self._callback_ids))
        query = {
            "id": query_id, "from": user, "chat_instance": f"ci{chat_id}", "data": data,
            "message": self._plain(self.messages[(chat_id, message_id)]),
        }  # fmt: skip
        self._push({"callback_query": query})
        return query_id

    def react(
        self, user: Json, chat_id: int, message_id: int, emoji: Iterable[str],
        old: Iterable[str] = (),
    ) -> None:  # fmt: skip
        """A message_reaction update (only delivered if the bot asked for them)."""
        self._push({
            "message_reaction": {
                "chat": self.chats[chat_id], "message_id": message_id, "user": user,
                "date": int(time.time()),
                "old_reaction": [{"type": "emoji", "emoji": e} for e in old],
                "new_reaction": [{"type": "emoji", "emoji": e} for e in emoji],
            }
        })  # fmt: skip

    def delete_message(self, chat_id: int, message_id: int) -> None:
        """A user deletes a message: later edits of it fail like on Telegram."""
        self.messages.pop((chat_id, message_id), None)

    # --- assertions --------------------------------------------------------------------------

    def calls_of(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    def bot_messages(self, chat_id: int) -> list[Json]:
        """Messages the bot sent in a chat (current text after edits), oldest first."""
        found = [
            m for (c, _), m in self.messages.items() if c == chat_id and m["from"]["id"] == BOT_ID
        ]
        return sorted(found, key=lambda m: m["message_id"])

    async def wait_for(self, predicate: Callable[[], Any], within: float = 5.0) -> Any:
        """Wait until `predicate()` returns something truthy (re-checked on every call)."""
        async with asyncio.timeout(within):
            async with self._changed:
                while not (result := predicate()):
                    await self._changed.wait()
                return result

    async def wait_for_call(
        self, method: str, where: Callable[[Json], bool] = lambda p: True, within: float = 5.0
    ) -> Call:
        def find() -> Call | None:
            return next((c for c in self.calls_of(method) if where(c.params)), None)

        return await self.wait_for(find, within)  # type: ignore[no-any-return]

    async def wait_for_bot_message(
        self, chat_id: int, pattern: str, *, within: float = 5.0,
        where: Callable[[Json], bool] = lambda m: True,
    ) -> Json:  # fmt: skip
        """Wait until a bot message in the chat (as edited so far) matches the regex `pattern`."""
        regex = re.compile(pattern, re.S)

        def find() -> Json | None:
            return next(
                (
                    m for m in self.bot_messages(chat_id)
                    if regex.search(m.get("text", "")) and where(m)
                ),
                None,
            )  # fmt: skip

        return await self.wait_for(find, within)  # type: ignore[no-any-return]

    def replies_to(self, sent: Json) -> list[Json]:
        """Bot messages that reply to the message `sent`, oldest first."""
        return [
            m for m in self.bot_messages(sent["chat"]["id"])
            if m.get("reply_to_message", {}).get("message_id") == sent["message_id"]
        ]  # fmt: skip

    def first_reply(self, sent: Json) -> Json | None:
        found = self.replies_to(sent)
        return found[0] if found else None

    async def reply_to(self, user: Json, text: str, *, within: float = 5.0, **kwargs: Any) -> Json:
        """Send `text` (kwargs as send_user_message); return the bot's first reply to it."""
        sent = self.send_user_message(user, text, **kwargs)
        return await self.wait_for(lambda: self.first_reply(sent), within)  # type: ignore[no-any-return]

    async def answer_to(self, user: Json, text: str, *, within: float = 5.0, **kwargs: Any) -> Json:
        """Send `text`; return the finished answer: the bot message with the 👍 👎 ✏️ buttons."""
        sent = self.send_user_message(user, text, **kwargs)

        def finished() -> Json | None:
            return next(
                (
                    m for m in self.bot_messages(sent["chat"]["id"])
                    if m["message_id"] > sent["message_id"] and buttons(m)[:1]
                    and buttons(m)[0].startswith("up:")
                ),
                None,
            )  # fmt: skip

        return await self.wait_for(finished, within)  # type: ignore[no-any-return]

    # --- the HTTP side -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params = await _read_params(request)
        call = Call(method, params)
        self.calls.append(call)
        try:
            if self._stalls.get(method):
                await asyncio.sleep(self._stalls[method].pop(0))
            failure = self._take_failure(method)
            if failure is not None:
                return _error(failure.status, failure.description, failure.retry_after)
            handler = getattr(self, f"_api_{method.lower()}", None)
            if handler is None:
                return _error(404, "Not Found: method not found")
            result = await handler(params)
            if isinstance(result, web.Response):
                return result
            return web.json_response({"ok": True, "result": result})
        finally:
            await self._notify()

    def _take_failure(self, method: str) -> _Failure | None:
        queue = self._failures.get(method)
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.pop(0)
        return failure

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _push(self, update: Json) -> None:
        update["update_id"] = next(self._update_ids)
        self._updates.append(update)
        self._arrived.set()
        asyncio.get_running_loop().create_task(self._notify())

    def _new_message(self, chat: Json, sender: Json, text: str | None) -> Json:
        ids = self._message_ids.setdefault(chat["id"], itertools.count(1))
        message: Json = {
            "message_id": next(ids), "date": int(time.time()), "chat": chat, "from": sender,
        }  # fmt: skip
        if text is not None:
            message["text"] = text
        self.messages[(chat["id"], message["message_id"])] = message
        return message

    @staticmethod
    def _plain(message: Json) -> Json:
        """A message as embedded in another (Telegram does not nest replies further)."""
        return {k: v for k, v in message.items() if k != "reply_to_message"}

    def _chat_or_error(self, params: Json) -> Json | web.Response:
        chat = self.chats.get(params.get("chat_id"))  # type: ignore[arg-type]
        return chat if chat is not None else _error(400, "Bad Request: chat not found")

    def _bot_message_or_error(self, params: Json, verb: str) -> Json | web.Response:
        key = (params.get("chat_id"), params.get("message_id"))
        message = self.messages.get(key)  # type: ignore[arg-type]
        if message is None:
            return _error(400, f"Bad Request: message to {verb} not found")
        if message["from"]["id"] != BOT_ID:
            return _error(400, f"Bad Request: message can't be {verb}ed")
        return message

    # --- Bot API methods ---------------------------------------------------------------------

    async def _api_getme(self, params: Json) -> Json:
        return self.bot_user

    async def _api_getupdates(self, params: Json) -> list[Json]:
        if params.get("allowed_updates") is not None:
            self.allowed_updates = list(params["allowed_updates"])
        offset = params.get("offset") or 0
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        wait = min(float(params.get("timeout") or 0), self.idle_poll)
        deadline = time.monotonic() + wait
        while not (ready := self._deliverable()) and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return ready[: int(params.get("limit") or 100)]

    def _deliverable(self) -> list[Json]:
        allowed = set(self.allowed_updates)
        ready = []
        for update in self._updates:
            kind = next(k for k in update if k != "update_id")
            if (kind in allowed) if allowed else (kind not in _OPT_IN_UPDATES):
                ready.append(update)
        # Updates the bot did not ask for are dropped, as Telegram does.
        self._updates = [u for u in self._updates if u in ready]
        return ready

    async def _api_sendmessage(self, params: Json) -> Json | web.Response:
        chat = self._chat_or_error(params)
        if isinstance(chat, web.Response):
            return chat
        text = params.get("text") or ""
        if not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if _utf16_len(text) > MAX_TEXT:
            return _error(400, "Bad Request: message is too long")
        message = self._new_message(chat, self.bot_user, text)
        markup = params.get("reply_markup")
        if markup and "inline_keyboard" in markup:
            message["reply_markup"] = markup
        elif markup:  # ForceReply / keyboards: shown to the user, not part of the message
            self.client_markup[(chat["id"], message["message_id"])] = markup
        reply_to = (params.get("reply_parameters") or {}).get("message_id")
        if reply_to is None:
            reply_to = params.get("reply_to_message_id")
        if reply_to is not None and (chat["id"], int(reply_to)) in self.messages:
            message["reply_to_message"] = self._plain(self.messages[(chat["id"], int(reply_to))])
        return message

    async def _api_editmessagetext(self, params: Json) -> Json | web.Response:
        message = self._bot_message_or_error(params, "edit")
        if isinstance(message, web.Response):
            return message
        text = params.get("text") or ""
        if not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if _utf16_len(text) > MAX_TEXT:
            return _error(400, "Bad Request: MESSAGE_TOO_LONG")
        markup = params.get("reply_markup")  # omitted: Telegram removes the inline keyboard
        if text == message.get("text") and markup == message.get("reply_markup"):
            return _error(400, "Bad Request: message is not modified: specified new message "
                          "content and reply markup are exactly the same")  # fmt: skip
        message["text"] = text
        message["edit_date"] = int(time.time())
        _set_markup(message, markup)
        return message

    async def _api_editmessagereplymarkup(self, params: Json) -> Json | web.Response:
        message = self._bot_message_or_error(params, "edit")
        if isinstance(message, web.Response):
            return message
        markup = params.get("reply_markup")
        if markup == message.get("reply_markup"):
            return _error(400, "Bad Request: message is not modified")
        _set_markup(message, markup)
        return message

    async def _api_deletemessage(self, params: Json) -> bool | web.Response:
        key = (params.get("chat_id"), params.get("message_id"))
        if key not in self.messages:
            return _error(400, "Bad Request: message to delete not found")
        del self.messages[key]  # type: ignore[arg-type]
        return True

    async def _api_sendchataction(self, params: Json) -> bool | web.Response:
        chat = self._chat_or_error(params)
        return chat if isinstance(chat, web.Response) else True

    async def _api_answercallbackquery(self, params: Json) -> bool | web.Response:
        if len(params.get("text") or "") > 200:
            return _error(400, "Bad Request: MESSAGE_TOO_LONG")
        self.callback_answers[str(params.get("callback_query_id"))] = params
        return True

    async def _api_setmycommands(self, params: Json) -> bool | web.Response:
        scope = params.get("scope") or {"type": "default"}
        if "chat_id" in scope and int(scope["chat_id"]) not in self.chats:
            return _error(400, "Bad Request: chat not found")
        self.commands[json.dumps(scope, sort_keys=True)] = list(params.get("commands") or [])
        return True

    async def _api_getmycommands(self, params: Json) -> list[Json]:
        scope = params.get("scope") or {"type": "default"}
        return self.commands.get(json.dumps(scope, sort_keys=True), [])

    async def _api_deletemycommands(self, params: Json) -> bool:
        scope = params.get("scope") or {"type": "default"}
        self.commands.pop(json.dumps(scope, sort_keys=True), None)
        return True

    async def _api_deletewebhook(self, params: Json) -> bool:
        return True

    async def _api_close(self, params: Json) -> bool:
        return True

    async def _api_logout(self, params: Json) -> bool:
        return True


def buttons(message: Json) -> list[str]:
    """Callback data of a message's inline buttons, row by row."""
    rows = message.get("reply_markup", {}).get("inline_keyboard", [])
    return [button["callback_data"] for row in rows for button in row]


def stored_id(answer: Json) -> int:
    """The stored bot message id an answer's 👍 button carries."""
    return int(buttons(answer)[0].split(":")[1])


@contextlib.asynccontextmanager
async def running_bot(
    service: ChatService, fake: FakeTelegram, **options: Any
) -> AsyncIterator[TelegramBot]:
    """The real adapter polling `fake` with test-speed timings (any keyword overrides them).

    Works with any ChatService: the FakeEngine one, or the real model and learner.
    """
    settings: dict[str, Any] = {
        "poll_timeout": 1, "edit_interval": 0.05, "typing_interval": 0.5, "request_timeout": 2,
    }  # fmt: skip
    async with TelegramBot(
        service, fake.token, base_url=fake.base_url, **(settings | options)
    ) as bot:
        yield bot


def _set_markup(message: Json, markup: Json | None) -> None:
    if markup:
        message["reply_markup"] = markup
    else:
        message.pop("reply_markup", None)


def _error(status: int, description: str, retry_after: float | None = None) -> web.Response:
    body: Json = {"ok": False, "error_code": status, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return web.json_response(body, status=status)


async def _read_params(request: web.Request) -> Json:
    """PTB posts form fields (complex values JSON-encoded); other clients post JSON."""
    if request.content_type == "application/json":
        body = await request.json()
        return dict(body) if isinstance(body, dict) else {}
    raw: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        raw.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
    params: Json = {}
    for key, value in raw.items():
        if key in _JSON_PARAMS:
            params[key] = json.loads(value)
        elif key in _INT_PARAMS and re.fullmatch(r"-?\d+", value):
            params[key] = int(value)
        else:
            params[key] = value
    return params


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _entities(text: str) -> list[Json]:
    """bot_command and mention entities with UTF-16 offsets, as Telegram computes them."""
    found = []
    command = re.match(r"/[A-Za-z0-9_]+(@[A-Za-z0-9_]+)?", text)
    if command:
        found.append({"type": "bot_command", "offset": 0, "length": _utf16_len(command.group())})
    for match in re.finditer(r"(?<![\w/])@[A-Za-z0-9_]{3,}", text):
        found.append({
            "type": "mention", "offset": _utf16_len(text[: match.start()]),
            "length": _utf16_len(match.group()),
        })  # fmt: skip
    return found
