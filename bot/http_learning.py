"""POST /v1/corrections and /v1/feedback: how an API user teaches Ouro.

Both check the target answer first (exists, is the caller's, is a bot answer) so each refusal
gets its own status; the service then stores the row and answers only after it is committed.
"""

from __future__ import annotations

from fastapi import APIRouter

from bot.http_context import ApiContext, refusal_error
from bot.http_errors import ApiError, documented
from bot.http_schemas import (
    CorrectionCreated,
    CorrectionRequest,
    FeedbackRequest,
    FeedbackStored,
    format_message_id,
)


def learning_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(tags=["learning"])
    config = ctx.service.config

    @router.post(
        "/v1/corrections",
        status_code=201,
        response_model=CorrectionCreated,
        summary="Correct an answer",
        description="`message_id` is the `id` of a chat completion this `user` received. The "
        "correction is stored (status `pending`), validated, then learned into the user's "
        "adapter at the next training run; `detail` says when. `status` is the stored status "
        "at reply time: `accepted` or `rejected` when the learner validated it meanwhile.",
        responses=documented(400, 403, 404, 413, 422, 429),
    )
    async def create_correction(body: CorrectionRequest) -> CorrectionCreated:
        actor = ctx.actor(body.user)
        message_id, _ = await ctx.owned_answer(actor, body.message_id)
        text = body.correction.strip()
        if not text:
            raise ApiError(
                422, "the correction is empty", code="empty_correction", param="correction"
            )
        if len(text) > config.correction_max_chars:
            raise ApiError(
                422,
                f"the correction is {len(text)} characters; the limit is "
                f"{config.correction_max_chars}",
                code="correction_too_long",
                param="correction",
            )
        reply = await ctx.service.correct(actor, text, message_id=message_id)
        if not reply.ok:
            raise refusal_error(reply, 422)
        correction_id = reply.data.get("correction_id")
        correction = None
        if correction_id is not None:
            correction = await ctx.store.get_correction(int(correction_id))
        if correction is None:  # the service confirmed without a row: never claim success
            raise ApiError(500, "the correction was not stored; please retry", code="not_stored")
        return CorrectionCreated(
            id=correction.id,
            status=correction.status.value,
            message_id=format_message_id(message_id) or "",
            scope=correction.scope.value,
            detail=reply.text,
        )

    @router.post(
        "/v1/feedback",
        response_model=FeedbackStored,
        summary="Rate an answer 👍/👎",
        description="One rating per user and answer: a later one replaces the earlier. A 👎 "
        "invites a correction through POST /v1/corrections.",
        responses=documented(400, 403, 404, 413, 422, 429),
    )
    async def feedback(body: FeedbackRequest) -> FeedbackStored:
        actor = ctx.actor(body.user)
        message_id, _ = await ctx.owned_answer(actor, body.message_id)
        reply = await ctx.service.feedback(actor, body.rating, message_id=message_id)
        if not reply.ok:
            raise refusal_error(reply, 422)
        return FeedbackStored(
            message_id=format_message_id(message_id) or "", rating=body.rating, detail=reply.text
        )

    return router
