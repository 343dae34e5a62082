"""The training child process: protocol, failures, kills, timeouts, and a loop that stays free."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from opskit import ask, config

from learner.job import JobContext, run_job
from learner.process import (
    TrainingFailed,
    TrainOutput,
    TrainSpec,
    WarmTrainer,
    run_in_subprocess,
)
from model.fake import FakeEngine
from storage.models import CorrectionStatus, JobStatus
from storage.store import Store

CHILD = str(Path(__file__).with_name("child_entries.py"))


def spec(tmp_path: Path, entry: str) -> TrainSpec:
    out = tmp_path / ".tmp-x" / "adapter"
    example = {"prompt": [{"role": "user", "content": "q"}], "answer": "a"}
    return TrainSpec(out_dir=str(out), examples=[example], config={}, entry=f"{CHILD}:{entry}")


class Events:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.seen.append(event)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_result_and_progress_come_back_despite_stray_prints(tmp_path: Path) -> None:
    events = Events()
    output = await run_in_subprocess(spec(tmp_path, "quick"), events)
    assert isinstance(output, TrainOutput)
    assert events.seen == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.25}]
    assert output.report["passed"] is True and output.report["reasons"] == ["1 examples"]
    assert output.train["losses"] == [2.0, 0.25]
    assert output.train["nice"] >= os.nice(0) + 10  # training yields the CPU to the bots


async def test_an_exception_in_the_child_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TrainingFailed, match="CUDA out of memory"):
        await run_in_subprocess(spec(tmp_path, "crash"), Events())


async def test_a_child_that_exits_without_a_result_fails(tmp_path: Path) -> None:
    with pytest.raises(TrainingFailed, match="exited with status 3"):
        await run_in_subprocess(spec(tmp_path, "vanish"), Events())


async def test_a_slow_child_is_stopped_at_the_time_limit(tmp_path: Path) -> None:
    events = Events()
    with pytest.raises(TrainingFailed, match="longer than 2"):
        await run_in_subprocess(spec(tmp_path, "slow"), events, time_limit=2)
    assert not alive(events.seen[0]["pid"])


async def test_the_event_loop_keeps_serving_and_cancelling_kills_the_child(
    tmp_path: Path,
) -> None:
    events = Events()
    task = asyncio.create_task(run_in_subprocess(spec(tmp_path, "slow"), events))
    ticks = 0
    while not events.seen:
        await asyncio.sleep(0.01)
        ticks += 1
        assert ticks < 3000, "the child never reported"
    for _ in range(20):  # the loop is free while the child "trains"
        await asyncio.sleep(0.01)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(events.seen[0]["pid"])


async def test_killing_the_trainer_mid_run_leaves_nothing_half_done(tmp_path: Path) -> None:
    """SIGKILL after the first progress line: no adapter, corrections wait; the next run trains."""
    async with Store(tmp_path / "data" / "ouro.db") as store:
        alice = await store.get_or_create_user("telegram", "1", "alice")
        c = await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        engine = FakeEngine()
        cfg = config(tmp_path, train_entry=f"{CHILD}:slow")
        killed: list[int] = []

        async def kill_on_first_progress(spec: TrainSpec, progress: Any) -> TrainOutput:
            async def relay(event: dict[str, Any]) -> None:
                await progress(event)
                if not killed:
                    killed.append(event["pid"])
                    os.kill(event["pid"], signal.SIGKILL)

            return await run_in_subprocess(spec, relay)

        ctx = JobContext(store, cfg, engine, kill_on_first_progress)
        await store.enqueue_job(alice.id, None)
        job = await store.claim_next_job()
        assert job is not None
        outcome = await run_job(job, ctx)

        assert killed and not alive(killed[0])
        assert outcome.job.status == JobStatus.FAILED and "SIGKILL" in (outcome.job.error or "")
        assert await store.list_adapters() == []
        assert list(cfg.adapters.iterdir()) == []  # the partial temp folder is gone
        assert engine.active_versions() == {}
        row = await store.get_correction(c.id)
        assert row is not None and row.status == CorrectionStatus.ACCEPTED

        ctx = JobContext(store, config(tmp_path, train_entry=f"{CHILD}:quick"), engine)
        await store.enqueue_job(None, None)
        retry = await store.claim_next_job()
        assert retry is not None
        outcome = await run_job(retry, ctx)
        assert outcome.job.status == JobStatus.SUCCEEDED, outcome.summary
        [live] = outcome.promoted
        assert [p.name for p in cfg.adapters.iterdir()] == [live.version]
        row = await store.get_correction(c.id)
        assert row is not None and row.status == CorrectionStatus.TRAINED
        assert engine.active_versions() == {str(alice.id): live.version}


# --- the warm trainer: one long-lived child, same guarantees -------------------------------


async def test_a_warm_trainer_reuses_one_child_for_many_runs(tmp_path: Path) -> None:
    warm = WarmTrainer(nice=10)
    try:
        outputs = []
        for i in range(3):
            events = Events()
            outputs.append(await warm(spec(tmp_path / str(i), "quick"), events))
            assert events.seen == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.25}]
        assert warm.started == 1 and warm.pid is not None
        assert {o.train["pid"] for o in outputs} == {warm.pid}
        assert all(o.report["passed"] for o in outputs)
        assert outputs[-1].train["nice"] >= os.nice(0) + 10  # set once, not once per run
        assert outputs[-1].train["nice"] < os.nice(0) + 20
    finally:
        await warm.close()
    assert warm.pid is None


async def test_a_failed_run_replaces_the_warm_child(tmp_path: Path) -> None:
    """An error may leave the model half-changed: the child goes, the next run gets a new one."""
    warm = WarmTrainer()
    try:
        with pytest.raises(TrainingFailed, match="CUDA out of memory"):
            await warm(spec(tmp_path / "a", "crash"), Events())
        assert warm.pid is None
        with pytest.raises(TrainingFailed, match="exited with status 3"):
            await warm(spec(tmp_path / "b", "vanish"), Events())
        output = await warm(spec(tmp_path / "c", "quick"), Events())
        assert output.report["passed"] and warm.started == 3
    finally:
        await warm.close()


async def test_a_warm_child_is_stopped_at_the_time_limit_and_on_cancel(tmp_path: Path) -> None:
    warm = WarmTrainer(time_limit=2)
    try:
        events = Events()
        with pytest.raises(TrainingFailed, match="longer than 2"):
            await warm(spec(tmp_path / "a", "slow"), events)
        assert not alive(events.seen[0]["pid"]) and warm.pid is None

        warm.time_limit = None
        events = Events()
        task = asyncio.create_task(warm(spec(tmp_path / "b", "slow"), events))
        for _ in range(3000):
            if events.seen:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not alive(events.seen[0]["pid"])
        assert (await warm(spec(tmp_path / "c", "quick"), Events())).report["passed"]
    finally:
        await warm.close()


async def test_killing_the_warm_trainer_mid_run_fails_that_run_only(tmp_path: Path) -> None:
    warm = WarmTrainer()
    try:
        events = Events()
        task = asyncio.create_task(warm(spec(tmp_path / "a", "slow"), events))
        for _ in range(3000):
            if events.seen:
                break
            await asyncio.sleep(0.01)
        os.kill(events.seen[0]["pid"], signal.SIGKILL)
        with pytest.raises(TrainingFailed, match="SIGKILL"):
            await task
        assert (await warm(spec(tmp_path / "b", "quick"), Events())).report["passed"]
    finally:
        await warm.close()


def test_prepared_checks_are_what_the_first_run_reuses(tmp_path: Path) -> None:
    import learner_fixtures

    from learner.gate import reference_answers
    from learner.process import prepare_checks
    from learner.scope_fit import _NEGATIVES

    tok = learner_fixtures.make_tokenizer()
    model = learner_fixtures.make_tiny_model(tok)
    general = ["Hello!", "What is the capital of France?"]
    prepare_checks(model, tok, str(tmp_path / "gate"), "sys", general)
    [cached] = list((tmp_path / "gate").glob("references-*.json"))
    assert len(_NEGATIVES[model]) == 1  # the scope's negatives, embedded once
    before = cached.stat().st_mtime_ns
    refs = reference_answers(model, tok, general, system_prompt="sys", cache_dir=tmp_path / "gate")
    assert set(refs) == set(general) and cached.stat().st_mtime_ns == before
