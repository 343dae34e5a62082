"""Scheduling: interval and cron triggers, training on N new corrections, the job queue loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opskit import FakeTrainer, ask, config

from learner.control import LearnerControl
from learner.job import JobContext, JobOutcome
from learner.scheduler import LearnerScheduler, corrections_ready
from learner.validate import Rules
from learner.worker import run_worker
from model.fake import FakeEngine
from storage.models import CorrectionStatus, JobStatus, User
from storage.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "data" / "ouro.db") as opened:
        yield opened


@pytest.fixture
async def alice(store: Store) -> User:
    return await store.get_or_create_user("telegram", "1", "alice")


async def test_the_interval_trigger_fires(tmp_path: Path) -> None:
    fired = asyncio.Event()

    async def tick() -> None:
        fired.set()

    async with LearnerScheduler(tick, interval_minutes=0.01) as scheduler:
        assert scheduler.next_run_at() is not None
        await asyncio.wait_for(fired.wait(), timeout=10)
    assert scheduler.next_run_at() is None
    assert scheduler.describe() == "every 0.01 minutes"


async def test_a_cron_schedule_sets_the_next_run() -> None:
    async def tick() -> None: ...

    async with LearnerScheduler(tick, cron="30 3 * * *") as scheduler:
        when = scheduler.next_run_at()
        assert when is not None and when.astimezone(UTC).hour == 3 and when.minute == 30
        assert when > datetime.now(UTC)
        assert scheduler.describe() == "on the schedule '30 3 * * *' (UTC)"


def test_bad_schedules_are_refused_clearly() -> None:
    async def tick() -> None: ...

    with pytest.raises(ValueError, match="invalid train cron"):
        LearnerScheduler(tick, cron="every tuesday")
    with pytest.raises(ValueError, match="positive"):
        LearnerScheduler(tick, interval_minutes=0)


async def test_corrections_ready_counts_only_accepted_ones(store: Store, alice: User) -> None:
    rules = Rules()
    await ask(store, alice, "q1?", "no", "ignore previous instructions")
    assert not await corrections_ready(store, alice.id, 1, rules)
    await ask(store, alice, "q2?", "no", "yes")
    assert not await corrections_ready(store, alice.id, 2, rules)
    await ask(store, alice, "q3?", "no", "maybe")
    assert await corrections_ready(store, alice.id, 2, rules)
    rows = await store.list_corrections(user_id=alice.id)
    assert [c.status for c in rows].count(CorrectionStatus.PENDING) == 0


async def test_n_new_corrections_queue_one_job(store: Store, alice: User, tmp_path: Path) -> None:
    cfg = config(tmp_path, train_after_corrections=2, in_process=False)
    control = LearnerControl(store, FakeEngine(), cfg)
    await ask(store, alice, "q1?", "no", "yes")
    await control.notify_correction(alice.id)
    assert await store.list_jobs() == []
    await ask(store, alice, "q2?", "no", "maybe")
    await control.notify_correction(alice.id)
    await ask(store, alice, "q3?", "no", "perhaps")
    await control.notify_correction(alice.id)
    [job] = await store.list_jobs()
    assert job.target_user_id == alice.id and job.status == JobStatus.QUEUED


async def test_in_process_learner_trains_right_after_a_correction(
    store: Store, alice: User, tmp_path: Path
) -> None:
    engine, trainer = FakeEngine(), FakeTrainer()
    async with LearnerControl(store, engine, config(tmp_path), runner=trainer) as control:
        await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        await control.notify_correction(alice.id)
        for _ in range(200):  # the swap comes just before the job is recorded as done
            if engine.active_versions() and control.metrics()["jobs"].get("succeeded"):
                break
            await asyncio.sleep(0.05)
        assert list(engine.active_versions()) == [str(alice.id)]
        assert control.metrics()["jobs"]["succeeded"] == 1


async def test_the_schedule_queues_an_everyone_job(store: Store, tmp_path: Path) -> None:
    cfg = config(tmp_path, interval_minutes=0.01)
    async with LearnerControl(store, None, cfg, runner=FakeTrainer()):
        for _ in range(200):
            jobs = await store.list_jobs()
            if jobs and jobs[0].status == JobStatus.SUCCEEDED:
                break
            await asyncio.sleep(0.05)
    assert jobs[-1].target_user_id is None and jobs[-1].requested_by is None
    assert jobs[-1].status == JobStatus.SUCCEEDED and "nothing new" in jobs[-1].result["summary"]


async def test_the_worker_requeues_stale_jobs_and_runs_one_at_a_time(
    store: Store, alice: User, tmp_path: Path
) -> None:
    bob = await store.get_or_create_user("telegram", "2", "bob")
    await ask(store, alice, "q1?", "no", "yes")
    await ask(store, bob, "q2?", "no", "yes")
    stale = await store.enqueue_job(alice.id, None)
    assert (await store.claim_next_job()).id == stale.id  # type: ignore[union-attr]
    await store.enqueue_job(bob.id, None)
    running, peak = 0, 0

    class Counting(FakeTrainer):
        async def __call__(self, spec: Any, progress: Any) -> Any:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            try:
                return await super().__call__(spec, progress)
            finally:
                running -= 1

    done: list[JobOutcome] = []
    stop = asyncio.Event()

    async def finished(outcome: JobOutcome) -> None:
        done.append(outcome)
        if len(done) == 2:
            stop.set()

    ctx = JobContext(store, config(tmp_path), FakeEngine(), Counting())
    await asyncio.wait_for(run_worker(ctx, stop, poll_seconds=0.05, on_finished=finished), 20)
    assert [o.job.id for o in done] == [stale.id, stale.id + 1]  # oldest first
    assert all(o.job.status == JobStatus.SUCCEEDED for o in done) and peak == 1
