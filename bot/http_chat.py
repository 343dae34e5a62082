"""POST /v1/chat/completions and GET /v1/models: OpenAI's format over `ChatService.complete`.

Ids: a non-streamed completion's `id` is the stored answer's id, `msg-<n>`, which
/v1/corrections and /v1/feedback take back. A streamed answer is stored when the stream
ends, so its chunks share a provisional `chatcmpl-<hex>` id and the final chunk carries
`ouro.message_id`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from bot.http_context import ApiContext, refusal_error
from bot.http_errors import ApiError, documented
from bot.http_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageIn,
    ModelCard,
    ModelList,
    format_message_id,
)
from bot.http_stream import (
    cancel_answer,
    fingerprint,
    finish_reason,
    model_failed,
    stream_answer,
    usage_of,
)
from bot.service import Answer
from model.interface import ChatMessage

ADAPTER_PREFIX = "ouro:"
STREAM_EXAMPLE = (
    'data: {"id":"chatcmpl-1f2e","object":"chat.completion.chunk","choices":[{"index":0,'
    '"delta":{"content":" Paris."},"finish_reason":null}]}\n\ndata: [DONE]\n\n'
)


def _content(message: ChatMessageIn) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)


def to_messages(body: ChatCompletionRequest, max_chars: int) -> list[ChatMessage]:
    """Validate the conversation the way the service would, but with the field at fault named."""
    out: list[ChatMessage] = []
    for i, message in enumerate(body.messages):
        text = _content(message)
        if len(text) > max_chars:
            raise ApiError(
                400,
                f"messages[{i}].content is {len(text)} characters; the limit is {max_chars}",
                code="message_too_long",
                param=f"messages[{i}].content",
            )
        role = "system" if message.role == "developer" else message.role
        out.append(ChatMessage(role=role, content=text))
    if out[-1].role != "user":
        raise ApiError(
            400,
            "the last message must be the user's question",
            code="last_not_user",
            param="messages",
        )
    if not out[-1].content.strip():
        raise ApiError(
            400, "the last user message is empty", code="empty_message", param="messages"
        )
    return out


def chat_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(tags=["chat"])
    config = ctx.service.config

    async def known_models(user: str | None = None) -> list[ModelCard]:
        now = int(time.time())
        cards = [ModelCard(id=ctx.model_name, created=now, owned_by="ouro", ouro={"kind": "base"})]
        active = ctx.engine.active_versions()
        owner = None
        if user is not None:
            found = await ctx.store.find_user("api", ctx.actor(user).platform_user_id)
            owner = str(found.id) if found is not None else None
        for key, version in sorted(active.items()):
            if key == "shared" or key == owner:
                scope = "shared" if key == "shared" else "personal"
                cards.append(
                    ModelCard(
                        id=f"{ADAPTER_PREFIX}{version}",
                        created=now,
                        owned_by="ouro",
                        ouro={"kind": "adapter", "scope": scope, "version": version},
                    )
                )
        return cards

    @router.get(
        "/v1/models",
        response_model=ModelList,
        summary="Models you may address",
        description="The base model, the shared adapter and, with `user`, that user's own "
        "adapter. Routing is automatic whichever you name (see POST /v1/chat/completions).",
        responses=documented(422),
    )
    async def list_models(
        user: str | None = Query(None, max_length=256, description="Include this user's adapter."),
    ) -> ModelList:
        return ModelList(data=await known_models(user))

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        summary="Chat (OpenAI compatible, streaming or not)",
        description="Stateless: `messages` is the whole conversation; `user` names the caller "
        "(default `anonymous`). The answer comes from the caller's adapter when the question is "
        "in its scope, else the shared adapter, else the base model; `system_fingerprint` and "
        "`ouro.adapter_version` say which. `id` (`msg-<n>`) is what /v1/corrections takes. "
        "With `stream: true` the answer is Server-Sent Events of `chat.completion.chunk`, "
        "ending with `data: [DONE]`; the last chunk carries `ouro.message_id`.",
        responses={
            200: {"content": {"text/event-stream": {"example": STREAM_EXAMPLE}}},
            **documented(400, 404, 413, 422, 429),
        },
    )
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        if body.n is not None and body.n > 1:
            raise ApiError(
                400, "n > 1 is not supported: ask once per answer", code="unsupported_n", param="n"
            )
        model = body.model or ctx.model_name
        if model not in (ctx.model_name, "ouro") and model not in {
            c.id for c in await known_models()
        }:
            raise ApiError(
                404,
                f"unknown model {model[:80]!r}; GET /v1/models lists them "
                f"(the base model is {ctx.model_name!r})",
                code="model_not_found",
                param="model",
            )
        messages = to_messages(body, config.max_message_chars)
        requested = body.max_completion_tokens or body.max_tokens
        max_new = min(requested, config.max_new_tokens) if requested else None
        answer = await ctx.service.complete(
            ctx.actor(body.user), messages, max_new_tokens=max_new, temperature=body.temperature
        )
        if answer.refusal is not None:
            raise refusal_error(answer.refusal, 400)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_answer(ctx, answer, model, include_usage)
        return await _complete(ctx, answer, model)

    return router


async def _complete(ctx: ApiContext, answer: Answer, model: str) -> JSONResponse:
    try:
        async for _ in answer:
            pass
    except BaseException:  # the client went away: stop generating
        await cancel_answer(answer)
        raise
    if answer.error is not None:
        raise model_failed(answer)
    prompt, completion = usage_of(answer)
    ctx.completion_tokens += completion
    message_id = format_message_id(answer.message_id)
    body = ChatCompletion.model_validate(
        {
            "id": message_id or f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint(answer.adapter_version),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": finish_reason(answer),
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "ouro": {"message_id": message_id, "adapter_version": answer.adapter_version},
        }
    )
    return JSONResponse(body.model_dump())
