"""Training jobs: a queue in the database, so bots and a separate worker process share it.

`claim_next_job` runs under `BEGIN IMMEDIATE`, which holds SQLite's write lock across
processes: two workers can never claim the same job.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from storage import checks as ck
from storage import records
from storage.base import Repository, require, require_user, where
from storage.db import Tx
from storage.errors import ConflictError, InvalidArgumentError
from storage.models import JobStatus, TrainingJob

LOG_LIMIT = 200_000  # characters of log kept per job (the newest)


class JobsMixin(Repository):
    async def enqueue_job(
        self, target_user_id: int | None, requested_by: int | None
    ) -> TrainingJob:
        """Queue a job; target None means every user with new corrections plus the shared one."""
        target_user_id = ck.optional_ident(target_user_id, "target_user_id")
        requested_by = ck.optional_ident(requested_by, "requested_by")
        async with self._db.write() as tx:
            if target_user_id is not None:
                await require_user(tx, target_user_id, "target user")
            if requested_by is not None:
                await require_user(tx, requested_by, "requesting user")
            row = await tx.row(
                "INSERT INTO training_jobs (target_user_id, requested_by, status, created_at)"
                " VALUES (?, ?, 'queued', ?) RETURNING *",
                (target_user_id, requested_by, ck.now()),
            )
        assert row is not None
        return records.job(row)

    async def claim_next_job(self) -> TrainingJob | None:
        """Move the oldest queued job to running and return it; None when the queue is empty."""
        async with self._db.write() as tx:
            row = await tx.row(
                "UPDATE training_jobs SET status = 'running', started_at = ?"
                " WHERE id = (SELECT id FROM training_jobs WHERE status = 'queued'"
                " ORDER BY id LIMIT 1) RETURNING *",
                (ck.now(),),
            )
        return None if row is None else records.job(row)

    async def update_job(
        self,
        job_id: int,
        *,
        progress: Mapping[str, Any] | None = None,
        log_line: str | None = None,
    ) -> None:
        """Replace the progress dict and/or append one line to the log (oldest lines drop)."""
        job_id = ck.ident(job_id, "job_id")
        progress_json = None if progress is None else ck.json_object(progress, "progress")
        line = None if log_line is None else ck.text(log_line, "log_line").rstrip("\n") + "\n"
        async with self._db.write() as tx:
            await _require(tx, job_id)
            await tx.run(
                "UPDATE training_jobs SET progress = coalesce(?, progress),"
                " log = CASE WHEN ? IS NULL THEN log ELSE substr(log || ?, -?) END WHERE id = ?",
                (progress_json, line, line, LOG_LIMIT, job_id),
            )

    async def finish_job(
        self,
        job_id: int,
        status: JobStatus | str,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> TrainingJob:
        """Record how a queued or running job ended (succeeded or failed)."""
        job_id = ck.ident(job_id, "job_id")
        status = ck.enum_value(JobStatus, status, "status")
        if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            raise InvalidArgumentError(f"a job finishes as succeeded or failed, not {status}")
        result_json = None if result is None else ck.json_object(result, "result")
        error = ck.optional_text(error, "error")
        async with self._db.write() as tx:
            row = await _require(tx, job_id)
            if row["status"] not in (JobStatus.QUEUED, JobStatus.RUNNING):
                raise ConflictError(f"job {job_id} already finished as {row['status']}")
            row = await tx.row(
                "UPDATE training_jobs SET status = ?, result = coalesce(?, result), error = ?,"
                " finished_at = ? WHERE id = ? RETURNING *",
                (status.value, result_json, error, ck.now(), job_id),
            )
        assert row is not None
        return records.job(row)

    async def get_job(self, job_id: int) -> TrainingJob | None:
        job_id = ck.ident(job_id, "job_id")
        async with self._db.read() as tx:
            row = await tx.row("SELECT * FROM training_jobs WHERE id = ?", (job_id,))
        return None if row is None else records.job(row)

    async def list_jobs(
        self, *, status: JobStatus | str | None = None, limit: int = 50
    ) -> list[TrainingJob]:
        """Newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit must be a positive integer; got {limit!r}")
        clause, params = where({"status": ck.optional_enum(JobStatus, status, "status")})
        async with self._db.read() as tx:
            rows = await tx.rows(
                f"SELECT * FROM training_jobs{clause} ORDER BY id DESC LIMIT ?", [*params, limit]
            )
        return [records.job(row) for row in rows]

    async def requeue_stale_jobs(self, *, started_before: datetime | None = None) -> int:
        """Put running jobs back in the queue after a crash; returns how many.

        Call it when no worker is alive. With several workers, pass `started_before` so only
        jobs older than any live run are taken back.
        """
        params: list[Any] = [ck.now()]
        clause = ""
        if started_before is not None:
            clause = " AND started_at < ?"
            params.append(ck.to_text(started_before, "started_before"))
        async with self._db.write() as tx:
            return await tx.run(
                "UPDATE training_jobs SET status = 'queued', started_at = NULL,"
                " log = log || 'requeued at ' || ? || ' after an interrupted run' || char(10)"
                f" WHERE status = 'running'{clause}",
                params,
            )


async def _require(tx: Tx, job_id: int) -> Any:
    return await require(
        tx, "SELECT * FROM training_jobs WHERE id = ?", (job_id,), f"no training job {job_id}"
    )
