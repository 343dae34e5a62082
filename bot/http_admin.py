"""Admin endpoints: retrain, job status, adapter versions, rollback. Bearer token required.

Retraining returns at once (202 + job id); the job is polled at /v1/jobs/{id}. The learner's
job `result` is passed through, with `metrics` and the gate decision lifted out when present.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bot.http_context import ApiContext, require_admin
from bot.http_errors import ApiError, documented
from bot.http_schemas import (
    AdapterList,
    AdapterOut,
    JobAccepted,
    JobOut,
    RetrainRequest,
    RollbackRequest,
    RollbackResult,
)
from storage.models import AdapterScope, AdapterVersion, TrainingJob

LOG_TAIL_CHARS = 4000
MAX_ID = 2**63 - 1
bearer = HTTPBearer(auto_error=False, description="The admin token (OURO_ADMIN_TOKEN).")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_out(job: TrainingJob) -> JobOut:
    result = dict(job.result or {})
    metrics = result.get("metrics")
    gate = result.get("gate")
    if gate is None and ("promoted" in result or "rejected" in result):
        gate = {"promoted": result.get("promoted", []), "rejected": result.get("rejected", [])}
    return JobOut(
        id=job.id,
        status=str(job.status),
        target_user_id=job.target_user_id,
        progress=dict(job.progress or {}),
        metrics=metrics if isinstance(metrics, dict) else {},
        gate=gate if isinstance(gate, dict) else None,
        result=result,
        error=job.error,
        log_tail=(job.log or "")[-LOG_TAIL_CHARS:],
        created_at=_iso(job.created_at) or "",
        started_at=_iso(job.started_at),
        finished_at=_iso(job.finished_at),
    )


def adapter_out(adapter: AdapterVersion) -> AdapterOut:
    return AdapterOut(
        version=adapter.version,
        scope=str(adapter.scope),
        owner_user_id=adapter.owner_id,
        status=str(adapter.status),
        parent_version=adapter.parent_version,
        metrics=dict(adapter.metrics or {}),
        reason=adapter.reason,
        created_at=_iso(adapter.created_at),
        activated_at=_iso(adapter.activated_at),
    )


def admin_router(ctx: ApiContext) -> APIRouter:
    async def admin(
        request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> None:
        require_admin(ctx, request)

    router = APIRouter(tags=["admin"], dependencies=[Depends(admin)])
    auth_errors = (401, 403)

    @router.post(
        "/v1/retrain",
        status_code=202,
        response_model=JobAccepted,
        summary="Train now (returns at once)",
        description="Queues a training job for `user` (or for everyone with new corrections "
        "and the shared adapter) and answers 202 with the job id to poll.",
        responses=documented(*auth_errors, 400, 404, 413, 422),
    )
    async def retrain(response: Response, body: RetrainRequest | None = None) -> JobAccepted:
        target = await ctx.find_target(body.user if body is not None else None)
        job = await ctx.learner.submit(target.id if target is not None else None, None)
        url = f"/v1/jobs/{job.id}"
        response.headers["Location"] = url
        return JobAccepted(job_id=job.id, status=str(job.status), url=url)

    @router.get(
        "/v1/jobs/{job_id}",
        response_model=JobOut,
        summary="A training job's status, progress, metrics and gate decision",
        responses=documented(*auth_errors, 404, 422),
    )
    async def get_job(job_id: int = Path(ge=1, le=MAX_ID)) -> JobOut:
        job = await ctx.store.get_job(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}", code="job_not_found", param="job_id")
        return job_out(job)

    @router.get(
        "/v1/adapters",
        response_model=AdapterList,
        summary="Adapter versions, newest first",
        description="`user`: that user's personal versions; `shared`: the shared adapter's; "
        "missing: all.",
        responses=documented(*auth_errors, 404, 422),
    )
    async def list_adapters(
        user: str | None = Query(None, max_length=256, description="API user id, #id or shared"),
    ) -> AdapterList:
        kwargs: dict[str, Any] = {}
        if user is not None and user.strip() == "shared":
            kwargs["scope"] = AdapterScope.SHARED
        elif user is not None and user.strip():
            target = await ctx.find_target(user)
            assert target is not None
            kwargs["owner_id"] = target.id
            kwargs["scope"] = AdapterScope.PERSONAL
        adapters = await ctx.store.list_adapters(**kwargs)
        return AdapterList(data=[adapter_out(a) for a in adapters])

    @router.post(
        "/v1/rollback",
        response_model=RollbackResult,
        summary="Restore the previous adapter version",
        description="Retires `user`'s active adapter (or the shared one) and re-activates its "
        "parent; `active_version` null means the base model answers now.",
        responses=documented(*auth_errors, 400, 404, 413, 422),
    )
    async def rollback(body: RollbackRequest | None = None) -> RollbackResult:
        name = body.user if body is not None else None
        target = await ctx.find_target(name)
        active = await ctx.learner.rollback(target.id if target is not None else None)
        owner = "shared" if target is None else (name or "").strip()
        return RollbackResult(owner=owner, active_version=active.version if active else None)

    return router
