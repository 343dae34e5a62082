"""A fake learner for the chat service's tests: the real LearnerPort surface, recorded calls.

It works against a real `Store` when given one (retrain enqueues and finishes a real job,
rollback and forget change real rows), so tests check stored outcomes, not call counts alone.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from bot.ports import Progress
from storage.models import AdapterScope, AdapterVersion, JobStatus, RetrainOutcome, TrainingJob

if TYPE_CHECKING:
    from storage.store import Store

SCHEDULE_TEXT = "It will be learned at the next training run, within 60 minutes."


class FakeLearner:
    """Implements bot.ports.LearnerPort; set `fail_with` to make the next call raise."""

    def __init__(self, store: Store | None = None, *, progress_lines: int = 3) -> None:
        self.store = store
        self.progress_lines = progress_lines
        self.fail_with: BaseException | None = None
        self.next_run: datetime | None = datetime.now(UTC) + timedelta(minutes=42)
        self.notified: list[int] = []
        self.submitted: list[tuple[int | None, int | None]] = []
        self.retrained: list[tuple[int | None, int | None]] = []
        self.rolled_back: list[int | None] = []
        self.forgotten: list[int] = []
        self.gate: asyncio.Event | None = None  # set: retrain waits for it (concurrency tests)

    def _raise(self) -> None:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error

    async def submit(self, target_user_id: int | None, requested_by: int | None) -> TrainingJob:
        self._raise()
        self.submitted.append((target_user_id, requested_by))
        assert self.store is not None, "submit needs a store"
        return await self.store.enqueue_job(target_user_id, requested_by)

    async def retrain(
        self, target_user_id: int | None, requested_by: int | None, progress: Progress | None = None
    ) -> RetrainOutcome:
        self._raise()
        self.retrained.append((target_user_id, requested_by))
        assert self.store is not None, "retrain needs a store"
        job = await self.store.enqueue_job(target_user_id, requested_by)
        if self.gate is not None:
            await self.gate.wait()
        for step in range(1, self.progress_lines + 1):
            if progress is not None:
                await progress(f"step {step}/{self.progress_lines} · loss {1 / step:.2f}")
        job = await self.store.finish_job(job.id, JobStatus.SUCCEEDED, result={"fake": True})
        who = "everyone" if target_user_id is None else f"user #{target_user_id}"
        return RetrainOutcome(job=job, summary=f"Trained {who}: nothing new to learn (fake).")

    async def rollback(self, owner_user_id: int | None) -> AdapterVersion | None:
        self._raise()
        self.rolled_back.append(owner_user_id)
        if self.store is None:
            return None
        scope = AdapterScope.SHARED if owner_user_id is None else AdapterScope.PERSONAL
        return await self.store.rollback_adapter(scope, owner_user_id)

    async def forget(self, user_id: int) -> None:
        self._raise()
        self.forgotten.append(user_id)
        if self.store is not None:
            await self.store.forget_user(user_id)

    async def notify_correction(self, user_id: int) -> None:
        self._raise()
        self.notified.append(user_id)

    def next_run_at(self) -> datetime | None:
        return self.next_run

    def describe_schedule(self) -> str:
        return SCHEDULE_TEXT

    def metrics(self) -> dict[str, Any]:
        return {"notified": len(self.notified), "retrained": len(self.retrained)}
