"""`LearnerControl` as the chat service uses it: submit, retrain, rollback, forget, schedule."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opskit import FakeTrainer, ask, config

from bot.ports import LearnerPort
from learner.control import LearnerConfig, LearnerControl
from learner.publish import new_temp_dir
from model.fake import FakeEngine
from storage.models import AdapterScope, AdapterStatus, CorrectionScope, JobStatus, User
from storage.store import Store


def exists(path: str | Path) -> bool:
    return Path(path).exists()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "data" / "ouro.db") as opened:
        yield opened


@pytest.fixture
async def alice(store: Store) -> User:
    return await store.get_or_create_user("telegram", "1", "alice")


@pytest.fixture
async def admin(store: Store) -> User:
    return await store.get_or_create_user("console", "root", "root", is_admin=True)


def test_control_has_every_learner_port_method_with_the_same_parameters() -> None:
    for name, member in inspect.getmembers(LearnerPort, inspect.isfunction):
        if name.startswith("_"):
            continue
        ours = getattr(LearnerControl, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(member), name
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(member).parameters
        ), name


def test_config_defaults_and_derived_values(tmp_path: Path) -> None:
    cfg = LearnerConfig(data_dir=tmp_path, hf_token="hf_secret")
    assert cfg.adapters == tmp_path / "adapters"
    assert cfg.resolved_tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert "hf_secret" not in repr(cfg)
    assert cfg.floors() == {"uptake": 0.8, "retention": 0.95}
    train = cfg.train_config()
    assert train["shape"]["r"] == 16 and train["shape"]["alpha"] == 32
    assert train["max_steps"] == 80 and train["method"] == "sft"
    with pytest.raises(ValueError, match="sft"):
        LearnerConfig(data_dir=tmp_path, method="ppo").train_config()


async def test_submit_does_not_duplicate_a_queued_job(
    store: Store, alice: User, admin: User, tmp_path: Path
) -> None:
    control = LearnerControl(store, None, config(tmp_path, in_process=False))
    first = await control.submit(alice.id, None)
    assert (await control.submit(alice.id, admin.id)).id == first.id
    everyone = await control.submit(None, admin.id)
    assert everyone.id != first.id and (await control.submit(None, None)).id == everyone.id
    assert len(await store.list_jobs(status=JobStatus.QUEUED)) == 2


async def test_retrain_waits_and_reports_progress(
    store: Store, alice: User, admin: User, tmp_path: Path
) -> None:
    engine = FakeEngine()
    await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
    lines: list[str] = []

    async def progress(line: str) -> None:
        lines.append(line)

    async with LearnerControl(store, engine, config(tmp_path), runner=FakeTrainer()) as control:
        outcome = await asyncio.wait_for(control.retrain(alice.id, admin.id, progress), 20)
    assert outcome.job.status == JobStatus.SUCCEEDED and outcome.job.requested_by == admin.id
    [live] = outcome.promoted
    assert engine.active_versions() == {str(alice.id): live.version}
    assert any("step 2/80" in line for line in lines) and "promoted" in outcome.summary


async def test_rollback_goes_back_one_version(
    store: Store, alice: User, admin: User, tmp_path: Path
) -> None:
    engine = FakeEngine()
    async with LearnerControl(store, engine, config(tmp_path), runner=FakeTrainer()) as control:
        await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        first = (await control.retrain(alice.id, admin.id)).promoted[0]
        await ask(store, alice, "Cat's name?", "Tom.", "Pixel.")
        second = (await control.retrain(alice.id, admin.id)).promoted[0]
        restored = await control.rollback(alice.id)
        assert restored is not None and restored.version == first.version
        assert engine.active_versions() == {str(alice.id): first.version}
        retired = await store.get_adapter(second.version)
        assert retired is not None and retired.status == AdapterStatus.RETIRED
        assert await control.rollback(None) is None  # no shared adapter: nothing to do


async def test_forget_removes_adapters_rows_and_queues_a_shared_retrain(
    store: Store, alice: User, admin: User, tmp_path: Path
) -> None:
    engine = FakeEngine()
    cfg = config(tmp_path)
    async with LearnerControl(store, engine, cfg, runner=FakeTrainer()) as control:
        c = await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        await store.set_correction_scope(
            c.id, CorrectionScope.SHARED_APPROVED, approved_by=admin.id
        )
        outcome = await control.retrain(None, admin.id)
        assert {a.scope for a in outcome.promoted} == {AdapterScope.PERSONAL, AdapterScope.SHARED}
        mine = next(a for a in outcome.promoted if a.owner_id == alice.id)
        await control.close()  # keep the queued shared retrain visible

        await control.forget(alice.id)

        assert str(alice.id) not in engine.active_versions()
        assert not exists(mine.path) and await store.get_user(alice.id) is None
        assert await store.list_adapters(owner_id=alice.id) == []
        [queued] = await store.list_jobs(status=JobStatus.QUEUED)
        assert queued.target_user_id is None
        # the shared adapter learned only alice's correction: it stops serving at once
        assert "shared" not in engine.active_versions()
        assert await store.active_adapter(AdapterScope.SHARED, None) is None


async def test_worker_mode_only_queues_and_follows_the_store(
    store: Store, alice: User, tmp_path: Path
) -> None:
    bot_engine = FakeEngine()
    cfg = config(tmp_path, in_process=False, sync_seconds=0.05)
    async with LearnerControl(store, bot_engine, cfg) as control:
        assert control.next_run_at() is None and "learner worker" in control.describe_schedule()
        await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        await control.notify_correction(alice.id)
        [job] = await store.list_jobs()
        assert job.status == JobStatus.QUEUED  # nobody here runs it

        worker_cfg = config(tmp_path)  # what `ouro learner` runs: the loop, no engine
        async with LearnerControl(store, None, worker_cfg, runner=FakeTrainer()):
            for _ in range(200):
                if bot_engine.active_versions():
                    break
                await asyncio.sleep(0.05)
        live = await store.active_adapter(AdapterScope.PERSONAL, alice.id)
        assert live is not None and bot_engine.active_versions() == {str(alice.id): live.version}


async def test_start_loads_active_adapters_and_cleans_abandoned_temp_folders(
    store: Store, alice: User, admin: User, tmp_path: Path
) -> None:
    cfg = config(tmp_path)
    async with LearnerControl(store, FakeEngine(), cfg, runner=FakeTrainer()) as control:
        await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        live = (await control.retrain(alice.id, admin.id)).promoted[0]
    abandoned = new_temp_dir(cfg.adapters)
    restarted = FakeEngine()
    async with LearnerControl(store, restarted, cfg, runner=FakeTrainer()) as control:
        assert restarted.active_versions() == {str(alice.id): live.version}
        await asyncio.sleep(0.1)
        assert not exists(abandoned)
        when = control.next_run_at()
        assert when is not None and "every 60 minutes" in control.describe_schedule()
        assert "as soon as it is validated" in control.describe_schedule()


async def test_notify_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "closed.db")  # never started: every call fails
    control = LearnerControl(store, None, config(tmp_path, in_process=False))
    await control.notify_correction(1)  # the correction is stored; failing here must not surface
    assert "could not validate corrections of user 1" in caplog.text


async def test_only_one_process_trains_from_a_data_folder(
    store: Store, alice: User, tmp_path: Path
) -> None:
    first_engine, second_engine = FakeEngine(), FakeEngine()
    cfg = config(tmp_path, sync_seconds=0.05)
    trainer = FakeTrainer()
    async with LearnerControl(store, first_engine, cfg, runner=trainer) as first:
        async with LearnerControl(store, second_engine, cfg, runner=trainer) as second:
            assert first.trains and not second.trains
            lock = (tmp_path / "data" / "learner.lock").read_text()
            assert lock == str(os.getpid())
            await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
            await second.notify_correction(alice.id)  # queued here, trained by the first
            for _ in range(200):
                if second_engine.active_versions():
                    break
                await asyncio.sleep(0.05)
            assert second_engine.active_versions() == first_engine.active_versions() != {}
            assert len(trainer.specs) == 1
    async with LearnerControl(store, None, cfg, runner=trainer) as third:
        assert third.trains  # released when the first closed
