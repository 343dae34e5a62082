"""Every training run is an MLflow run; every promoted version is a registered model version.

MLflow is a record, not a dependency of learning: each call here catches its own failures,
logs a warning and returns, so a broken tracking store never fails a job. `mlflow` is
imported lazily (it takes seconds) and its blocking calls run in a worker thread.

Users appear only as a keyed SHA-256 of their id (`owner_hash`), never the id itself; the key
lives in the data folder, so the hash cannot be reversed by hashing every small integer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

EXPERIMENT = "ouro-learner"
LIVE_ALIAS = "live"
T = TypeVar("T")


def tracking_key(data_dir: Path) -> bytes:
    """The installation's hashing key, created on first use (readable by the owner only)."""
    path = data_dir / "tracking.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def owner_hash(owner_id: int | None, key: bytes) -> str:
    """`shared`, or a SHA-256 (keyed) of the store user id: how MLflow names a user."""
    if owner_id is None:
        return "shared"
    return hmac.new(key, f"user:{owner_id}".encode(), hashlib.sha256).hexdigest()


def registered_name(owner: str) -> str:
    """Registered model per scope: `ouro-adapter-shared` or `ouro-adapter-u<hash[:16]>`."""
    return "ouro-adapter-shared" if owner == "shared" else f"ouro-adapter-u{owner[:16]}"


class Tracker:
    """Writes runs to `tracking_uri` with artifacts under `artifact_dir`."""

    def __init__(self, tracking_uri: str, artifact_dir: Path, experiment: str = EXPERIMENT) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_dir = artifact_dir
        self.experiment = experiment
        self._client: Any = None
        self._experiment_id: str | None = None

    async def start_run(self, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Open a run for one candidate; returns its id, or None when MLflow is unavailable."""
        return await self._safe("start a run", self._start, params, tags)

    async def finish_run(
        self,
        run_id: str | None,
        *,
        metrics: dict[str, float],
        tags: dict[str, str],
        adapter_dir: Path | None,
        losses: Sequence[float] = (),
        failed: bool = False,
    ) -> None:
        """Step losses, final metrics, the decision, the adapter folder as artifact; close it."""
        if run_id:
            await self._safe(
                "finish a run",
                self._finish,
                run_id,
                metrics,
                list(losses),
                tags,
                adapter_dir,
                failed,
            )

    async def set_live(self, run_id: str | None, owner: str) -> str | None:
        """Register the run's adapter and point the scope's `live` alias at it."""
        if not run_id:
            return None
        return await self._safe("register a model version", self._register, run_id, owner)

    async def forget(self, owner: str) -> None:
        """Delete a forgotten user's runs, artifacts and registered model."""
        await self._safe("forget a user", self._forget, owner)

    # --- blocking parts, run in a thread ----------------------------------------------------

    async def _safe(self, what: str, func: Callable[..., T], *args: Any) -> T | None:
        try:
            return await asyncio.to_thread(func, *args)
        except Exception as exc:
            log.warning("MLflow could not %s (%s: %s)", what, exc.__class__.__name__, exc)
            return None

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def _experiment(self) -> str:
        if self._experiment_id is None:
            client = self._mlflow()
            found = client.get_experiment_by_name(self.experiment)
            if found is not None:
                self._experiment_id = str(found.experiment_id)
            else:
                self.artifact_dir.mkdir(parents=True, exist_ok=True)
                self._experiment_id = str(
                    client.create_experiment(
                        self.experiment, artifact_location=self.artifact_dir.resolve().as_uri()
                    )
                )
        return self._experiment_id

    def _start(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        from mlflow.entities import Param, RunTag

        client = self._mlflow()
        run = client.create_run(self._experiment(), tags=tags)
        run_id: str = run.info.run_id
        client.log_batch(
            run_id,
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        return run_id

    def _finish(
        self,
        run_id: str,
        metrics: dict[str, float],
        losses: list[float],
        tags: dict[str, str],
        adapter_dir: Path | None,
        failed: bool,
    ) -> None:
        from mlflow.entities import Metric, RunTag

        client = self._mlflow()
        now = _millis()
        steps = [Metric("loss", float(v), now, i + 1) for i, v in enumerate(losses)]
        finals = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for start in range(0, len(steps + finals), 500):  # log_batch takes at most 1000
            client.log_batch(run_id, metrics=(steps + finals)[start : start + 500])
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if adapter_dir is not None and adapter_dir.is_dir():
            client.log_artifacts(run_id, str(adapter_dir), artifact_path="adapter")
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def _register(self, run_id: str, owner: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self._mlflow()
        name = registered_name(owner)
        try:
            client.create_registered_model(name, tags={"ouro.owner": owner})
        except MlflowException as exc:
            if "already exists" not in str(exc).lower():
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/adapter"
        version = client.create_model_version(name, source=source, run_id=run_id)
        client.set_registered_model_alias(name, LIVE_ALIAS, str(version.version))
        return str(version.version)

    def _forget(self, owner: str) -> None:
        import shutil
        from urllib.parse import urlparse

        from mlflow.exceptions import MlflowException

        client = self._mlflow()
        runs = client.search_runs(
            [self._experiment()], filter_string=f"tags.`ouro.owner` = '{owner}'"
        )
        for run in runs:
            location = urlparse(run.info.artifact_uri)
            if location.scheme == "file":
                shutil.rmtree(location.path, ignore_errors=True)
            client.delete_run(run.info.run_id)
        try:
            client.delete_registered_model(registered_name(owner))
        except MlflowException as exc:
            if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
                raise


def _millis() -> int:
    import time

    return int(time.time() * 1000)
