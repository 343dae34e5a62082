"""What every route needs: the parts the app serves, and helpers that turn requests into them.

No globals: `create_app` builds one `ApiContext` and hands it to each router factory.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from bot import commands
from bot.http_errors import ApiError
from bot.http_schemas import format_message_id, parse_message_id
from bot.ports import LearnerPort
from bot.service import Actor, ChatService, Reply
from model.interface import InferenceEngine
from storage.models import Message, Role, User

if TYPE_CHECKING:
    from storage.store import Store

INTERNAL_ID = re.compile(r"#[0-9]{1,18}")
PLATFORM = "api"
CHAT_ID = "api"
ANONYMOUS = "anonymous"
DISABLED_ADMIN = (
    "admin endpoints are disabled: set an admin token (OURO_ADMIN_TOKEN) and send it as "
    "`Authorization: Bearer <token>`"
)


@dataclass
class ApiContext:
    service: ChatService
    store: Store
    engine: InferenceEngine
    learner: LearnerPort
    admin_token: str | None
    model_name: str
    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    completion_tokens: int = 0
    background: set[asyncio.Task[None]] = field(default_factory=set)  # streams in flight

    def actor(self, user: str | None) -> Actor:
        """The API has no accounts: `user` names the caller, as in OpenAI's API."""
        name = (user or "").strip() or ANONYMOUS
        return Actor(PLATFORM, name, CHAT_ID, display_name=name)

    async def find_target(self, target: str | None) -> User | None:
        """Admin targets, as in the chat commands: an API user id, `#<id>` or `@name`.

        None or blank: nobody (everyone for retrain, the shared adapter for rollback).
        """
        if target is None or not target.strip():
            return None
        raw = target.strip()
        if raw.startswith("#") and not INTERNAL_ID.fullmatch(raw):
            raise ApiError(404, f"no user {raw[:40]!r}", code="user_not_found", param="user")
        found = await commands.resolve_target(self.store, PLATFORM, raw)
        if isinstance(found, str):
            raise ApiError(404, found, code="user_not_found", param="user")
        return found

    async def owned_answer(self, actor: Actor, raw_id: int | str) -> tuple[int, Message]:
        """The bot answer `raw_id` names, if `actor` may act on it; else a clear 4xx.

        Checked here, before the service writes anything, so a refused request creates no user
        and every refusal gets its own status (404 unknown, 403 not yours, 422 not an answer).
        """
        message_id = parse_message_id(raw_id)
        if message_id is None:
            raise ApiError(
                422,
                f"message_id {str(raw_id)[:40]!r} is not an answer id like 'msg-42'",
                code="invalid_message_id",
                param="message_id",
            )
        shown = format_message_id(message_id)
        message = await self.store.get_message(message_id)
        if message is None:
            raise ApiError(404, f"no message {shown}", code="message_not_found", param="message_id")
        owner = await self.store.find_user(actor.platform, actor.platform_user_id)
        mine = owner is not None and owner.id == message.user_id
        if not mine and not self.service.is_admin(actor):
            raise ApiError(
                403,
                f"{shown} answered another user; you can only act on your own answers",
                code="not_your_message",
                param="message_id",
            )
        if message.role != Role.ASSISTANT:
            raise ApiError(
                422,
                f"{shown} is a user message; only the bot's answers can be corrected or rated",
                code="not_an_answer",
                param="message_id",
            )
        return message_id, message


def refusal_error(reply: Reply, default_status: int = 422) -> ApiError:
    """Map a service refusal to an HTTP error; rate limits become 429 with Retry-After."""
    data = reply.data
    retry = data.get("retry_after")
    if retry is not None or data.get("reason") in ("rate_limited", "quota"):
        seconds = max(1, int(float(retry or 60) + 0.999))
        return ApiError(429, reply.text, code="rate_limited", headers={"Retry-After": str(seconds)})
    code = data.get("reason") or data.get("code")
    return ApiError(default_status, reply.text, code=str(code) if code else "refused")


def require_admin(ctx: ApiContext, request: Request) -> None:
    """Bearer-token check, compared in constant time."""
    if not ctx.admin_token:
        raise ApiError(403, DISABLED_ADMIN, code="admin_disabled")
    header = request.headers.get("authorization")
    challenge = {"WWW-Authenticate": "Bearer"}
    if header is None:
        raise ApiError(
            401,
            "missing `Authorization: Bearer <admin token>` header",
            code="no_token",
            headers=challenge,
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        raise ApiError(
            401,
            "malformed Authorization header: expected `Bearer <admin token>`",
            code="bad_auth_header",
            headers=challenge,
        )
    if not hmac.compare_digest(token.encode(), ctx.admin_token.encode()):
        raise ApiError(403, "wrong admin token", code="wrong_token")
