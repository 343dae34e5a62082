"""MLflow tracking against a real sqlite tracking store in tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opskit import FakeTrainer, ask, config, report

from learner.job import JobContext, run_job
from learner.tracking import LIVE_ALIAS, Tracker, owner_hash, registered_name, tracking_key
from model.fake import FakeEngine
from storage.models import JobStatus
from storage.store import Store


def test_owner_hash_is_keyed_and_stable(tmp_path: Path) -> None:
    key = tracking_key(tmp_path)
    assert tracking_key(tmp_path) == key and len(key) == 32
    assert (tmp_path / "tracking.key").stat().st_mode & 0o777 == 0o600
    h = owner_hash(7, key)
    assert h == owner_hash(7, key) != owner_hash(8, key) and len(h) == 64 and "7" != h
    assert owner_hash(7, b"other key") != h and owner_hash(None, key) == "shared"
    assert registered_name(h) == f"ouro-adapter-u{h[:16]}"


@pytest.mark.slow  # importing mlflow and creating its database: ~8 s idle, far more under load
async def test_runs_params_metrics_artifacts_and_live_alias(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"
    tracker = Tracker(uri, tmp_path / "data" / "mlflow-artifacts")
    trainer = FakeTrainer(reports=[report(), report(passed=False, reasons=["retention 0.5"])])
    async with Store(tmp_path / "data" / "ouro.db") as store:
        alice = await store.get_or_create_user("telegram", "4242", "alice")
        key = tracking_key(tmp_path / "data")
        ctx = JobContext(store, config(tmp_path), FakeEngine(), trainer, tracker, key)
        await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        await store.enqueue_job(alice.id, None)
        live = (await run_job(await store.claim_next_job(), ctx)).promoted[0]  # type: ignore[arg-type]
        await ask(store, alice, "Cat's name?", "Tom.", "Pixel.")
        await store.enqueue_job(alice.id, None)
        refused = (await run_job(await store.claim_next_job(), ctx)).rejected[0]  # type: ignore[arg-type]

    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(live.mlflow_run_id)  # type: ignore[arg-type]
    owner = owner_hash(alice.id, key)
    params = run.data.params
    assert params["owner_sha256"] == owner and "4242" not in str(params) + str(run.data.tags)
    assert params["lora_r"] == "16" and params["learning_rate"] == "0.001"
    assert params["base_model"] == "bundled" and params["examples"] == "1"
    assert run.data.metrics["uptake"] == 1.0 and run.data.metrics["promoted"] == 1.0
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.5, 0.5]
    assert run.data.tags["ouro.decision"] == "promoted" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    assert run.info.artifact_uri.startswith((tmp_path / "data" / "mlflow-artifacts").as_uri())

    model = client.get_model_version_by_alias(registered_name(owner), LIVE_ALIAS)
    assert model.run_id == live.mlflow_run_id

    rejected_run = client.get_run(refused.mlflow_run_id)  # type: ignore[arg-type]
    assert rejected_run.data.tags["ouro.decision"] == "rejected"
    assert rejected_run.data.metrics["promoted"] == 0.0
    assert client.list_artifacts(rejected_run.info.run_id, "adapter")  # kept only in MLflow
    model = client.get_model_version_by_alias(registered_name(owner), LIVE_ALIAS)
    assert model.run_id == live.mlflow_run_id  # the alias still names what is live

    await tracker.forget(owner)
    assert client.search_runs([run.info.experiment_id]) == []
    assert client.search_registered_models(f"name = '{registered_name(owner)}'") == []


class Unreachable(Tracker):
    """A tracking server that is down (mlflow itself is not imported: the fast suite stays fast)."""

    def _mlflow(self) -> Any:
        raise ConnectionError("tracking server unreachable")


async def test_a_broken_tracking_store_never_fails_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Unreachable("http://127.0.0.1:9/", tmp_path / "artifacts")
    async with Store(tmp_path / "ouro.db") as store:
        alice = await store.get_or_create_user("telegram", "1", "alice")
        ctx = JobContext(store, config(tmp_path), FakeEngine(), FakeTrainer(), tracker, b"k")
        await ask(store, alice, "Who maintains Ouro?", "No idea.", "The Loop Collective.")
        await store.enqueue_job(alice.id, None)
        outcome = await run_job(await store.claim_next_job(), ctx)  # type: ignore[arg-type]
    assert outcome.job.status == JobStatus.SUCCEEDED and len(outcome.promoted) == 1
    assert outcome.promoted[0].mlflow_run_id is None
    assert "MLflow could not start a run (ConnectionError" in caplog.text
