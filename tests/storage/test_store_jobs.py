"""The training job queue."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage import jobs
from storage.errors import ConflictError, InvalidArgumentError, NotFoundError
from storage.models import JobStatus, User
from storage.store import Store


async def test_job_life_cycle(store: Store, alice: User, bob: User) -> None:
    queued = await store.enqueue_job(alice.id, bob.id)
    assert (queued.status, queued.target_user_id, queued.requested_by) == (
        JobStatus.QUEUED,
        alice.id,
        bob.id,
    )
    assert (queued.progress, queued.result, queued.log, queued.started_at) == ({}, {}, "", None)
    everyone = await store.enqueue_job(None, None)
    claimed = await store.claim_next_job()
    assert claimed is not None and claimed.id == queued.id  # oldest first
    assert claimed.status is JobStatus.RUNNING and claimed.started_at is not None
    await store.update_job(claimed.id, progress={"step": 1, "of": 4}, log_line="loading data")
    await store.update_job(claimed.id, log_line="step 1/4 · loss 0.41\n")
    await store.update_job(claimed.id, progress={"step": 4, "of": 4})
    seen = await store.get_job(claimed.id)
    assert seen is not None
    assert seen.progress == {"step": 4, "of": 4}
    assert seen.log == "loading data\nstep 1/4 · loss 0.41\n"
    done = await store.finish_job(claimed.id, "succeeded", result={"promoted": ["a-1"]})
    assert (done.status, done.result, done.error) == (
        JobStatus.SUCCEEDED,
        {"promoted": ["a-1"]},
        None,
    )
    assert done.finished_at is not None and done.finished_at >= done.started_at  # type: ignore[operator]
    with pytest.raises(ConflictError, match="already finished"):
        await store.finish_job(claimed.id, "failed", error="late")
    second = await store.claim_next_job()
    assert second is not None and second.id == everyone.id and second.target_user_id is None
    failed = await store.finish_job(second.id, JobStatus.FAILED, error="out of memory")
    assert failed.error == "out of memory" and failed.result == {}
    assert await store.claim_next_job() is None
    assert [j.id for j in await store.list_jobs()] == [everyone.id, queued.id]
    assert [j.id for j in await store.list_jobs(status="failed")] == [everyone.id]
    assert [j.id for j in await store.list_jobs(limit=1)] == [everyone.id]


async def test_job_refusals(store: Store, alice: User) -> None:
    with pytest.raises(NotFoundError, match="target user"):
        await store.enqueue_job(999, None)
    with pytest.raises(NotFoundError, match="requesting user"):
        await store.enqueue_job(None, 999)
    assert await store.list_jobs() == []
    job = await store.enqueue_job(alice.id, alice.id)
    with pytest.raises(NotFoundError, match="no training job 999"):
        await store.update_job(999, log_line="x")
    with pytest.raises(NotFoundError):
        await store.finish_job(999, "failed")
    with pytest.raises(InvalidArgumentError, match="succeeded or failed"):
        await store.finish_job(job.id, "running")
    with pytest.raises(InvalidArgumentError, match="status"):
        await store.finish_job(job.id, "crashed")
    with pytest.raises(InvalidArgumentError, match="progress"):
        await store.update_job(job.id, progress=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="result"):
        await store.finish_job(job.id, "failed", result={"x": {1, 2}})
    with pytest.raises(InvalidArgumentError, match="limit"):
        await store.list_jobs(limit=0)
    unchanged = await store.get_job(job.id)
    assert unchanged == job
    assert await store.get_job(999) is None


async def test_log_keeps_the_newest_characters(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "LOG_LIMIT", 20)
    job = await store.enqueue_job(None, None)
    for index in range(10):
        await store.update_job(job.id, log_line=f"line {index}")
    seen = await store.get_job(job.id)
    full = "".join(f"line {index}\n" for index in range(10))
    assert seen is not None and seen.log == full[-20:] == "ine 7\nline 8\nline 9\n"


async def test_requeue_stale_jobs(store: Store) -> None:
    first = await store.enqueue_job(None, None)
    await store.enqueue_job(None, None)
    await store.claim_next_job()
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await store.claim_next_job()
    assert await store.requeue_stale_jobs(started_before=cutoff) == 1  # only the older run
    assert await store.requeue_stale_jobs() == 1
    assert await store.requeue_stale_jobs() == 0
    back = await store.get_job(first.id)
    assert back is not None
    assert (back.status, back.started_at) == (JobStatus.QUEUED, None)
    assert "requeued" in back.log
    with pytest.raises(InvalidArgumentError, match="aware"):
        await store.requeue_stale_jobs(started_before=datetime.now() - timedelta(hours=1))
    again = await store.claim_next_job()
    assert again is not None and again.id == first.id


async def test_two_workers_never_claim_the_same_job(db_path: Path) -> None:
    """Two Store instances (two connections, as two worker processes would have)."""
    async with Store(db_path) as one, Store(db_path) as two:
        for _ in range(30):
            await one.enqueue_job(None, None)

        async def drain(store: Store) -> list[int]:
            claimed = []
            while (job := await store.claim_next_job()) is not None:
                claimed.append(job.id)
            return claimed

        got_one, got_two = await asyncio.gather(drain(one), drain(two))
    assert sorted(got_one + got_two) == list(range(1, 31))
    assert not set(got_one) & set(got_two)
