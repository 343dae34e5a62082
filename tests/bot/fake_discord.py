"""A fake Discord (REST API v10 + gateway) on 127.0.0.1 that the real discord.py client talks to.

One aiohttp app serves `/api/v10/...` and a websocket at `/gateway`. Every REST call is recorded
for assertions; `fail_next` answers a matching call with 429 (retry_after) or an error such as
404 Unknown Message. Tests inject user actions (messages, reactions, interactions) as gateway
dispatches. Payloads follow the Discord API docs and what discord.py's parsers read.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import discord
from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
API = "/api/v10"


@dataclass
class Call:
    method: str
    path: str  # without the /api/v10 prefix
    body: Any
    query: dict[str, str]
    status: int = 200


@dataclass
class Failure:
    status: int
    method: str | None
    path_contains: str | None
    retry_after: float
    count: int


@dataclass
class FakeUser:
    id: int
    username: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.username,
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass
class FakeDiscord:
    """Start with `async with FakeDiscord() as fake:`; point the bot at api_base/gateway_url."""

    guild_id: int = 0
    channel_id: int = 0  # an ordinary text channel in the guild
    other_channel_id: int = 0  # a second text channel (not allowed in tests)
    calls: list[Call] = field(default_factory=list)
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)  # live message payloads
    identify: dict[str, Any] | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self.bot_user = FakeUser(self.snowflake(), "Ouro", bot=True)
        self.app_id = self.bot_user.id
        self.guild_id = self.guild_id or self.snowflake()
        self.channel_id = self.channel_id or self.snowflake()
        self.other_channel_id = self.other_channel_id or self.snowflake()
        self._dm_channels: dict[int, int] = {}  # user id -> DM channel id
        self._originals: dict[str, int] = {}  # interaction token -> original response message id
        self._interaction_channel: dict[str, int] = {}  # interaction token -> channel id
        self._failures: list[Failure] = []
        self._changed = asyncio.Event()
        self._ws: web.WebSocketResponse | None = None
        self._ws_ready = asyncio.Event()
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def snowflake(self) -> int:
        return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | next(self._ids)

    # --- assertions helpers -------------------------------------------------------------------
    def fail_next(
        self,
        status: int,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        retry_after: float = 0.05,
        count: int = 1,
    ) -> None:
        """Answer the next `count` matching calls with `status` (429 carries retry_after)."""
        self._failures.append(Failure(status, method, path_contains, retry_after, count))

    def clear_failures(self) -> None:
        self._failures.clear()

    def find(self, method: str | None = None, path_contains: str = "") -> list[Call]:
        return [
            c
            for c in self.calls
            if (method is None or c.method == method) and path_contains in c.path
        ]

    async def wait_for(self, check: Callable[[], Any], within: float = 5.0) -> Any:
        """Wait until check() (or the awaitable it returns) is truthy; re-checked after every
        REST call and at least every 0.1 s. Returns the truthy value."""
        deadline = asyncio.get_running_loop().time() + within
        while not (result := await _resolve(check())):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; last calls: {self.calls[-5:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        return result

    async def wait_ready(self, within: float = 5.0) -> None:
        await asyncio.wait_for(self._ws_ready.wait(), within)

    def bot_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """What the bot posted in a channel (interaction responses are not counted)."""
        return [
            m
            for m in self.messages.values()
            if m["channel_id"] == str(channel_id)
            and m["author"]["id"] == str(self.bot_user.id)
            and "interaction_token" not in m
        ]

    # --- REST ---------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        raw = await request.read()
        body: Any = None
        if raw and request.content_type == "application/json":
            body = json.loads(raw)
        elif raw and request.content_type.startswith("multipart/"):
            body = {"multipart": True}
        call = Call(request.method, path, body, dict(request.query))
        self.calls.append(call)
        try:
            failure = self._take_failure(call)
            if failure is not None:
                call.status = failure.status
                return self._failure_response(failure)
            status, data = self._route(request.method, path, body)
        except KeyError:
            status, data = 404, {"message": "Unknown Message", "code": 10008}
        finally:
            self._changed.set()  # wakes wait_for
        call.status = status
        return _json(data, status)

    def _take_failure(self, call: Call) -> Failure | None:
        for failure in self._failures:
            if failure.method not in (None, call.method):
                continue
            if failure.path_contains is not None and failure.path_contains not in call.path:
                continue
            failure.count -= 1
            if failure.count <= 0:
                self._failures.remove(failure)
            return failure
        return None

    def _failure_response(self, failure: Failure) -> web.Response:
        if failure.status == 429:
            data = {
                "message": "You are being rate limited.",
                "retry_after": failure.retry_after,
                "global": False,
            }
            headers = {"Via": "1.1 google", "Retry-After": str(failure.retry_after)}
            return _json(data, 429, headers)
        if failure.status == 404:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if failure.status == 401:
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        if failure.status == 403:
            return _json({"message": "Missing Permissions", "code": 50013}, 403)
        return _json({"message": "Internal Server Error", "code": 0}, failure.status)

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET", ["users", "@me"]:
                return 200, self.bot_user.payload()
            case "GET", ["oauth2", "applications", "@me"]:
                return 200, self._application()
            case "GET", ["gateway"] | ["gateway", "bot"]:
                return 200, {
                    "url": self.gateway_url,
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 999,
                        "reset_after": 0,
                        "max_concurrency": 1,
                    },
                }
            case "PUT", ["applications", _, *rest] if rest[-1:] == ["commands"]:
                self.commands = [self._command(c) for c in body]
                return 200, self.commands
            case "GET", ["applications", _, *rest] if rest[-1:] == ["commands"]:
                return 200, self.commands
            case "POST", ["users", "@me", "channels"]:
                user_id = int(body["recipient_id"])
                return 200, self._dm_channel_payload(user_id)
            case "POST", ["channels", channel, "typing"]:
                return 204, None
            case "POST", ["channels", channel, "messages"]:
                return 200, self._create_message(int(channel), self.bot_user, body)
            case "PATCH", ["channels", channel, "messages", mid]:
                return 200, self._edit_message(int(mid), body)
            case "DELETE", ["channels", channel, "messages", mid]:
                del self.messages[int(mid)]
                return 204, None
            case "PUT" | "DELETE", ["channels", _, "messages", mid, "reactions", *_]:
                self.messages[int(mid)]  # KeyError -> 404 Unknown Message
                return 204, None
            case "POST", ["interactions", _, token, "callback"]:
                return 200, self._interaction_callback(token, body)
            case "POST", ["webhooks", _, token]:
                target = self._interaction_channel.get(token, self.channel_id)
                return 200, self._create_message(target, self.bot_user, body)
            case "GET", ["webhooks", _, token, "messages", mid]:
                return 200, self.messages[self._webhook_message_id(token, mid)]
            case "PATCH", ["webhooks", _, token, "messages", mid]:
                return 200, self._edit_message(self._webhook_message_id(token, mid), body)
            case "DELETE", ["webhooks", _, token, "messages", mid]:
                del self.messages[self._webhook_message_id(token, mid)]
                return 204, None
        return 404, {"message": "404: Not Found", "code": 0}

    def _command(self, body: dict[str, Any]) -> dict[str, Any]:
        """A registered command as Discord echoes it: ids, version and defaulted fields."""
        defaults = {
            "description": "",
            "options": [],
            "type": 1,
            "dm_permission": True,
            "default_member_permissions": None,
            "nsfw": False,
        }
        return {
            **defaults,
            **body,
            "id": str(self.snowflake()),
            "application_id": str(self.app_id),
            "version": "1",
        }

    def _application(self) -> dict[str, Any]:
        return {
            "id": str(self.app_id),
            "name": "Ouro",
            "icon": None,
            "description": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": FakeUser(self.snowflake(), "owner").payload(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "interactions_endpoint_url": None,
            "bot": self.bot_user.payload(),
        }

    def _dm_channel_payload(self, user_id: int) -> dict[str, Any]:
        channel = self._dm_channels.setdefault(user_id, self.snowflake())
        user = FakeUser(user_id, f"user{user_id}")
        return {
            "id": str(channel),
            "type": 1,
            "recipients": [user.payload()],
            "last_message_id": None,
        }

    def dm_channel(self, user: FakeUser) -> int:
        return int(self._dm_channel_payload(user.id)["id"])

    def _create_message(
        self, channel_id: int, author: FakeUser, body: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        mid = self.snowflake()
        msg: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "author": author.payload(),
            "content": body.get("content") or "",
            "timestamp": _iso_now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "type": 0,
            "flags": body.get("flags") or 0,
            **extra,
        }
        if channel_id not in self._dm_channels.values():
            msg["guild_id"] = str(self.guild_id)
        if ref := body.get("message_reference"):
            msg["message_reference"] = {**ref, "channel_id": str(channel_id)}
            msg["type"] = 19
        self.messages[mid] = msg
        return msg

    def _edit_message(self, mid: int, body: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages[mid]
        for key in ("content", "embeds", "components", "flags"):
            if key in body and body[key] is not None:
                msg[key] = body[key]
        msg["flags"] = msg["flags"] & ~128  # an edited deferred response is no longer loading
        msg["edited_timestamp"] = _iso_now()
        return msg

    def _webhook_message_id(self, token: str, mid: str) -> int:
        return self._originals[token] if mid == "@original" else int(mid)

    # --- interactions -------------------------------------------------------------------------
    def _interaction_callback(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        kind = body["type"]
        data = body.get("data") or {}
        info: dict[str, Any] = {"id": token.removeprefix("tok-"), "type": 2}
        result: dict[str, Any] = {"interaction": info}
        if kind in (4, 5):  # message, or deferred "thinking" message
            flags = data.get("flags") or 0
            if kind == 5:
                flags |= 128  # loading
            channel = self._interaction_channel.get(token, self.channel_id)
            msg = self._create_message(
                channel, self.bot_user, {**data, "flags": flags}, interaction_token=token
            )
            self._originals[token] = int(msg["id"])
            info.update(
                response_message_id=msg["id"],
                response_message_loading=kind == 5,
                response_message_ephemeral=bool(flags & 64),
            )
            result["resource"] = {"type": kind, "message": msg}
        elif kind == 7:  # update the message the component is on
            mid = self._originals.get(token)
            if mid is not None:
                msg = self._edit_message(mid, data)
                result["resource"] = {"type": kind, "message": msg}
        elif kind == 9:
            result["resource"] = {"type": kind}
        return result

    def interaction_messages(self, token: str) -> list[dict[str, Any]]:
        """The original response and follow-ups of one interaction, oldest first."""
        return [m for m in self.messages.values() if m.get("interaction_token") == token]

    def _member(self, user: FakeUser) -> dict[str, Any]:
        return {
            "user": user.payload(),
            "roles": [],
            "joined_at": _iso_now(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": "2248473465835073",
        }

    def _channel_payload(self, channel_id: int) -> dict[str, Any]:
        if channel_id in self._dm_channels.values():
            return {"id": str(channel_id), "type": 1}
        return {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": "chat",
            "position": 0,
            "permission_overwrites": [],
        }

    async def interact(
        self,
        user: FakeUser,
        kind: int,
        data: dict[str, Any],
        *,
        channel_id: int | None = None,
        message: dict[str, Any] | None = None,
    ) -> str:
        """Dispatch an INTERACTION_CREATE; returns its token (to find the responses)."""
        channel = channel_id or self.channel_id
        iid = self.snowflake()
        token = f"tok-{iid}"
        self._interaction_channel[token] = channel
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.app_id),
            "type": kind,
            "data": data,
            "token": token,
            "version": 1,
            "channel_id": str(channel),
            "channel": self._channel_payload(channel),
            "locale": "en-US",
            "app_permissions": "2248473465835073",
            "entitlements": [],
            "attachment_size_limit": 10485760,
            "authorizing_integration_owners": {"0": str(self.guild_id)},
        }
        if channel in self._dm_channels.values():
            payload["user"] = user.payload()
            payload["context"] = 1
        else:
            payload["guild_id"] = str(self.guild_id)
            payload["member"] = self._member(user)
            payload["context"] = 0
        if message is not None:
            payload["message"] = message
            self._originals.setdefault(token, int(message["id"]))
        await self.dispatch("INTERACTION_CREATE", payload)
        return token

    async def slash(
        self,
        user: FakeUser,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        channel_id: int | None = None,
        resolved: dict[str, Any] | None = None,
    ) -> str:
        """Run /name with options {name: value}; value types follow the registered command."""
        registered = next((c for c in self.commands if c["name"] == name), None)
        types = {o["name"]: o["type"] for o in (registered or {}).get("options", [])}
        opts = [
            {"name": k, "type": types.get(k, 3), "value": v} for k, v in (options or {}).items()
        ]
        data: dict[str, Any] = {
            "id": (registered or {}).get("id", "0"),
            "name": name,
            "type": 1,
            "options": opts,
        }
        if resolved:
            data["resolved"] = resolved
        return await self.interact(user, 2, data, channel_id=channel_id)

    async def context_menu(self, user: FakeUser, name: str, message_id: int) -> str:
        msg = self.messages[message_id]
        data = {
            "id": "0",
            "name": name,
            "type": 3,
            "target_id": str(message_id),
            "resolved": {"messages": {str(message_id): msg}},
        }
        return await self.interact(user, 2, data, channel_id=int(msg["channel_id"]))

    def last_modal(self, token: str) -> dict[str, Any]:
        """The modal an interaction answered with (type 9 callback data)."""
        call = next(
            c
            for c in reversed(self.calls)
            if token in c.path and c.body and c.body.get("type") == 9
        )
        return call.body["data"]

    async def submit_modal(
        self,
        user: FakeUser,
        modal: dict[str, Any],
        values: dict[str, str],
        *,
        channel_id: int | None = None,
    ) -> str:
        def submitted(c: dict[str, Any]) -> dict[str, Any]:
            value = values.get(c["custom_id"], c.get("value", ""))
            return {"type": 4, "custom_id": c["custom_id"], "value": value}

        rows: list[dict[str, Any]] = []
        for row in modal["components"]:
            if row["type"] == 18:  # Label wrapping one input
                rows.append({"type": 18, "component": submitted(row["component"])})
            else:
                rows.append({"type": 1, "components": [submitted(c) for c in row["components"]]})
        return await self.interact(
            user, 5, {"custom_id": modal["custom_id"], "components": rows}, channel_id=channel_id
        )

    async def click(self, user: FakeUser, message_id: int, custom_id: str) -> str:
        msg = self.messages[message_id]
        data = {"custom_id": custom_id, "component_type": 2}
        return await self.interact(user, 3, data, channel_id=int(msg["channel_id"]), message=msg)

    # --- user actions over the gateway --------------------------------------------------------
    async def user_message(
        self,
        user: FakeUser,
        content: str,
        *,
        channel_id: int | None = None,
        mention: bool = False,
        reply_to: int | None = None,
    ) -> dict[str, Any]:
        """A user posts `content`; channel None means the user's DM with the bot."""
        channel = channel_id if channel_id is not None else self.dm_channel(user)
        body: dict[str, Any] = {"content": (f"<@{self.bot_user.id}> " if mention else "") + content}
        if reply_to is not None:
            body["message_reference"] = {"message_id": str(reply_to)}
        msg = self._create_message(channel, user, body)
        if mention:
            msg["mentions"] = [self.bot_user.payload()]
        if reply_to is not None:
            referenced = self.messages.get(reply_to)
            msg["referenced_message"] = referenced
            if referenced is not None and referenced["author"]["id"] == str(self.bot_user.id):
                msg["mentions"] = [self.bot_user.payload()]
        if "guild_id" in msg:
            msg["member"] = {k: v for k, v in self._member(user).items() if k != "user"}
        await self.dispatch("MESSAGE_CREATE", msg)
        return msg

    async def react(self, user: FakeUser, message_id: int, emoji: str) -> None:
        msg = self.messages[message_id]
        data: dict[str, Any] = {
            "user_id": str(user.id),
            "channel_id": msg["channel_id"],
            "message_id": str(message_id),
            "emoji": {"id": None, "name": emoji},
            "type": 0,
            "burst": False,
            "message_author_id": msg["author"]["id"],
        }
        if "guild_id" in msg:
            data["guild_id"] = msg["guild_id"]
            data["member"] = self._member(user)
        await self.dispatch("MESSAGE_REACTION_ADD", data)

    # --- gateway ------------------------------------------------------------------------------
    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        await self._ws_ready.wait()
        assert self._ws is not None
        self._seq += 1
        await self._ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            payload = json.loads(msg.data)
            op = payload.get("op")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif op in (2, 6):
                self.identify = payload["d"]
                await self._send_ready(ws)
        return ws

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        self._seq += 1
        ready = {
            "v": 10,
            "user": {**self.bot_user.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": "fake-session",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.app_id), "flags": 0},
            "private_channels": [],
        }
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": self._seq, "d": ready}))
        self._seq += 1
        guild = {
            "id": str(self.guild_id),
            "name": "Test guild",
            "unavailable": False,
            "member_count": 2,
            "owner_id": str(self.bot_user.id),
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": [
                {
                    "id": str(self.guild_id),
                    "name": "@everyone",
                    "permissions": "2248473465835073",
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                }
            ],
            "channels": [
                self._channel_payload(self.channel_id) | {"name": "chat"},
                self._channel_payload(self.other_channel_id) | {"name": "other", "position": 1},
            ],
            "members": [self._member(self.bot_user)],
            "threads": [],
            "voice_states": [],
            "presences": [],
            "joined_at": _iso_now(),
            "large": False,
        }
        await ws.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": self._seq, "d": guild}))
        self._ws_ready.set()


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@asynccontextmanager
async def running_bot(client: discord.Client, fake: FakeDiscord) -> AsyncIterator[discord.Client]:
    """Start `client` against `fake`, wait until it is ready, and check on exit that it never
    stopped: discord.py ends `start()` quietly on a payload it cannot parse."""
    task = asyncio.create_task(client.start("fake-token"), name="discord-bot")
    try:
        ready = asyncio.create_task(client.wait_until_ready())
        done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if task.done():
                task.result()  # re-raise why it stopped
            raise AssertionError("the bot did not become ready within 10 s")
        yield client
        assert not task.done(), f"the bot stopped early: {task}"
    finally:
        await client.close()
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.CancelledError:
            pass


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """discord.py parses a body as JSON only when Content-Type is exactly application/json."""
    if status == 204:
        return web.Response(status=204)
    body = json.dumps(data).encode()
    return web.Response(
        body=body, status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
