"""Streaming a chat answer as Server-Sent Events, and what both answer paths share.

The answer is generated in its own task feeding a queue, not inside the response: when a
client hangs up, the server cancels the response, and that cancellation must not reach the
answer halfway through storing itself. The response then cancels the answer (shielded), so
generation stops and the partial answer is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from bot.http_context import ApiContext
from bot.http_errors import ApiError, error_body
from bot.http_schemas import format_message_id
from bot.service import Answer

log = logging.getLogger(__name__)

_END = None


def usage_of(answer: Answer) -> tuple[int, int]:
    """(prompt, completion) tokens. `Answer` does not expose them (yet); its completion does."""
    source: Any = answer
    if getattr(answer, "completion_tokens", None) is None:
        source = getattr(answer, "_completion", None)
    prompt = int(getattr(source, "prompt_tokens", 0) or 0)
    return prompt, int(getattr(source, "completion_tokens", 0) or 0)


def finish_reason(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def fingerprint(version: str | None) -> str:
    return f"ouro-{version}" if version else "ouro-base"


def model_failed(answer: Answer) -> ApiError:
    name = type(answer.error).__name__
    return ApiError(
        500, f"the model failed while answering ({name}); please retry", code="model_error"
    )


async def cancel_answer(answer: Answer) -> None:
    """Stop the answer and store what was said, even while this request is being cancelled."""
    with anyio.CancelScope(shield=True):
        await answer.cancel()


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class _EventStream(StreamingResponse):
    """Closes its generator when the response ends however it ends (client gone included),
    instead of leaving that to the garbage collector."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


def _pump(ctx: ApiContext, answer: Answer) -> asyncio.Queue[str | None]:
    """Generate the answer in a task of its own; chunks arrive on the queue, then `_END`."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def run() -> None:
        try:
            async for text in answer:
                queue.put_nowait(text)
        except Exception:
            log.exception("streaming an answer failed")
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(run(), name="ouro-http-answer")
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)
    return queue


async def stream_answer(
    ctx: ApiContext, answer: Answer, model: str, include_usage: bool
) -> StreamingResponse:
    """Wait for the first chunk before answering, so a failing model is a proper 500."""
    queue = _pump(ctx, answer)
    try:
        first = await queue.get()
    except BaseException:
        await cancel_answer(answer)
        raise
    if answer.error is not None:
        await cancel_answer(answer)
        raise model_failed(answer)
    stream_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse(
            {
                "id": stream_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": fingerprint(answer.adapter_version),
                "choices": [choice],
                **extra,
            }
        )

    async def events() -> AsyncIterator[bytes]:
        finished = False
        text = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            while text is not _END:
                if answer.error is not None:  # the service's apology: report an error instead
                    yield _sse(error_body(500, model_failed(answer).message, "model_error"))
                    return
                yield chunk({"content": text})
                text = await queue.get()
            prompt, completion = usage_of(answer)
            ctx.completion_tokens += completion
            info = {
                "message_id": format_message_id(answer.message_id),
                "adapter_version": answer.adapter_version,
            }
            yield chunk({}, finish_reason(answer), ouro=info)
            if include_usage:
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
                yield _sse(
                    {
                        "id": stream_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away: stop generating, keep what was said
                await cancel_answer(answer)

    return _EventStream(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
