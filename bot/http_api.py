"""The OpenAI-compatible HTTP API over the chat service: `create_app` builds it, `serve` runs it.

No globals: everything the routes use arrives through `create_app`, so tests (and the
integrator's whole-loop test) can serve any engine and learner. `serve` runs uvicorn inside
the caller's event loop, beside the bots, and stops when `stop` is set.

Endpoints (see /docs): chat completions and models (bot/http_chat.py), corrections and
feedback (bot/http_learning.py), admin: retrain, jobs, adapters, rollback (bot/http_admin.py),
plus /healthz and /metrics here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from bot.http_admin import admin_router
from bot.http_chat import chat_router
from bot.http_context import ApiContext
from bot.http_errors import BodyLimit, RequestCounter, ServerErrors, install_error_handlers
from bot.http_learning import learning_router
from bot.http_metrics import CONTENT_TYPE, render_metrics
from bot.http_schemas import Health
from bot.http_server import serve, serving
from bot.ports import LearnerPort
from bot.service import ChatService
from model.interface import InferenceEngine
from storage.models import JobStatus

if TYPE_CHECKING:
    from storage.store import Store

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "serve", "serving"]

DEFAULT_MAX_BODY_BYTES = 256 * 1024
JOB_COUNT_LIMIT = 100_000

DESCRIPTION = """\
Ouro's OpenAI-compatible API. Point any OpenAI client at `/v1`, set `user` to name the caller,
and correct wrong answers with POST /v1/corrections using the answer's `id`: Ouro learns the
correction into that user's adapter and answers with it from then on.

Errors are always `{"error": {"message", "type", "code", "param"}}`. Admin endpoints need
`Authorization: Bearer <admin token>`.
"""


def create_app(
    service: ChatService,
    store: Store,
    engine: InferenceEngine,
    learner: LearnerPort,
    *,
    admin_token: str | None,
    model_name: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The API over already-started parts; the caller owns their lifetimes."""
    ctx = ApiContext(service, store, engine, learner, admin_token or None, model_name)
    app = FastAPI(
        title="Ouro",
        version="1",
        description=DESCRIPTION,
        openapi_tags=[
            {"name": "chat", "description": "OpenAI-compatible chat."},
            {"name": "learning", "description": "Corrections and feedback."},
            {"name": "admin", "description": "Training and adapter versions (admin token)."},
            {"name": "ops", "description": "Health and metrics."},
        ],
    )
    app.state.ouro = ctx
    install_error_handlers(app)
    app.include_router(chat_router(ctx))
    app.include_router(learning_router(ctx))
    app.include_router(admin_router(ctx))

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness")
    async def healthz() -> Health:
        return Health(model=model_name)

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={
            200: {"content": {CONTENT_TYPE: {"example": "ouro_tokens_generated_total 42\n"}}}
        },
    )
    async def metrics() -> PlainTextResponse:
        jobs = {
            status.value: len(await store.list_jobs(status=status, limit=JOB_COUNT_LIMIT))
            for status in JobStatus
        }
        text = render_metrics(
            ctx.requests, ctx.completion_tokens, engine.stats(), learner.metrics(), jobs
        )
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    # added innermost first: ServerErrors sees route errors, the counter sees every answer
    app.add_middleware(ServerErrors)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestCounter, counts=ctx.requests)
    return app
