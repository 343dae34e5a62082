"""`LearnerControl`: the learner as the chat service sees it (`bot.ports.LearnerPort`).

`ouro` builds a `LearnerConfig` from its settings and nests `LearnerControl` like any other
long-lived part. With `in_process=True` it runs the schedule and the job loop in this
process (training itself still happens in a child process); with `in_process=False` jobs are
only queued here, a separate `ouro learner` runs them, and this side keeps the engine in step
with the store's active versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from learner import publish as pub
from learner.job import JobContext, JobOutcome
from learner.process import DEFAULT_ENTRY, TrainRunner, WarmTrainer
from learner.scheduler import LearnerScheduler, corrections_ready
from learner.tracking import Tracker, owner_hash, tracking_key
from learner.types import LoraShape, TrainConfig
from learner.validate import Rules, shared_learnable
from learner.worker import run_worker
from model.interface import InferenceEngine
from storage.models import (
    AdapterScope,
    AdapterStatus,
    AdapterVersion,
    CorrectionScope,
    JobStatus,
    RetrainOutcome,
    TrainingJob,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from storage.store import Store

    Progress = Callable[[str], Awaitable[None]]

log = logging.getLogger(__name__)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class LearnerConfig:
    """Everything the learner reads from the settings, as plain values (no `ouro` import)."""

    data_dir: Path = field(metadata=_help("Data folder: MLflow database and artifacts go here."))
    adapters_dir: Path | None = field(default=None, metadata=_help("Default: <data_dir>/adapters."))
    model: str = field(default="bundled", metadata=_help("Base model, as in model.loading."))
    device: str = field(default="auto", metadata=_help("Device the trainer uses."))
    dtype: str = field(default="auto", metadata=_help("Base weight dtype for training."))
    packed: bool = field(default=True, metadata=_help("GGUF 4-bit layers on their kernels."))
    model_cache_dir: Path | None = field(default=None, metadata=_help("Converted GGUF cache."))
    gate_cache_dir: Path | None = field(
        default=None, metadata=_help("Gate's base reference answers; default <data>/gate-cache.")
    )
    system_prompt: str = field(
        default="", metadata=_help("System prompt answers are trained under.")
    )
    method: str = field(default="sft", metadata=_help("'sft' or 'dpo'."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank, fixed across versions."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha."))
    learning_rate: float = field(default=1e-3, metadata=_help("Learning rate."))
    max_steps: int = field(default=80, metadata=_help("Most optimiser steps per candidate."))
    seed: int = field(default=0, metadata=_help("Training seed (repeatable runs)."))
    min_uptake: float = field(
        default=0.8, metadata=_help("Gate floor: share of corrections learned.")
    )
    min_retention: float = field(
        default=0.95, metadata=_help("Gate floor: unrelated answers kept.")
    )
    tolerance: float = field(
        default=0.03,
        metadata=_help("How far below the live version's gate scores a candidate may be."),
    )
    correction_max_chars: int = field(default=2000, metadata=_help("Longest accepted correction."))
    daily_quota: int = field(default=50, metadata=_help("Corrections per user and UTC day."))
    shared_min_users: int = field(default=3, metadata=_help("Users agreeing before auto-sharing."))
    train_after_corrections: int = field(
        default=1, metadata=_help("New corrections that trigger a run.")
    )
    interval_minutes: float = field(default=60, metadata=_help("Scheduled run interval."))
    cron: str | None = field(default=None, metadata=_help("Crontab (UTC); replaces the interval."))
    tracking_uri: str | None = field(
        default=None, metadata=_help("Default: sqlite:///<data>/mlflow.db.")
    )
    tracking: bool = field(default=True, metadata=_help("Log runs to MLflow."))
    in_process: bool = field(
        default=True, metadata=_help("Run jobs here (False: `ouro learner` does).")
    )
    train_timeout_s: float = field(default=3600.0, metadata=_help("Kill a trainer running longer."))
    warm_trainer: bool = field(
        default=True,
        metadata=_help("Keep a trainer process with the base model loaded between runs."),
    )
    incremental: bool = field(
        default=True,
        metadata=_help("Start a new version from the live one's weights when it allows."),
    )
    notes: bool = field(
        default=True,
        metadata=_help("Train and serve each correction with its note (model.scope)."),
    )
    poll_seconds: float = field(default=5.0, metadata=_help("Job queue poll interval."))
    sync_seconds: float = field(
        default=5.0, metadata=_help("Engine/store sync interval (worker mode).")
    )
    train_entry: str = field(
        default=DEFAULT_ENTRY, metadata=_help("Trainer entry point in the child.")
    )
    hf_token: str | None = field(default=None, repr=False, metadata=_help("HF Hub token (secret)."))
    hf_repo: str | None = field(default=None, metadata=_help("HF Hub repo for shared adapters."))

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.adapters_dir is None:
            object.__setattr__(self, "adapters_dir", self.data_dir / "adapters")
        object.__setattr__(self, "adapters_dir", Path(self.adapters_dir))  # type: ignore[arg-type]

    @property
    def gate_cache(self) -> Path:
        return self.gate_cache_dir or self.data_dir / "gate-cache"

    @property
    def adapters(self) -> Path:
        assert self.adapters_dir is not None
        return self.adapters_dir

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    def rules(self) -> Rules:
        return Rules(
            max_chars=self.correction_max_chars,
            daily_quota=self.daily_quota,
            shared_min_users=self.shared_min_users,
        )

    def floors(self) -> dict[str, float]:
        return {"uptake": self.min_uptake, "retention": self.min_retention}

    def train_config(self) -> dict[str, Any]:
        """`learner.types.TrainConfig` as JSON fields (built here, so bad values fail early)."""
        method: Literal["sft", "dpo"] = "dpo" if self.method == "dpo" else "sft"
        if self.method not in ("sft", "dpo"):
            raise ValueError(f"training method must be 'sft' or 'dpo', not {self.method!r}")
        config = TrainConfig(
            shape=LoraShape(r=self.lora_r, alpha=self.lora_alpha),
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
            method=method,
            system_prompt=self.system_prompt,
            seed=self.seed,
            notes=self.notes,
        )
        return asdict(config)


class LearnerControl:
    """Implements `bot.ports.LearnerPort` structurally (the learner never imports `bot`)."""

    def __init__(
        self,
        store: Store,
        engine: InferenceEngine | None,
        config: LearnerConfig,
        *,
        runner: TrainRunner | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        if tracker is None and config.tracking:
            tracker = Tracker(config.resolved_tracking_uri, config.data_dir / "mlflow-artifacts")
        self.store, self.engine, self.config = store, engine, config
        self.warm: WarmTrainer | None = None
        if runner is None and config.in_process and config.warm_trainer:
            preload = None
            if config.train_entry == DEFAULT_ENTRY:  # another entry may not want the model
                preload = {
                    "model": config.model,
                    "device": config.device,
                    "dtype": config.dtype,
                    "packed": config.packed,
                    "cache_dir": str(config.model_cache_dir) if config.model_cache_dir else None,
                    "gate_cache_dir": str(config.gate_cache),
                    "system_prompt": config.system_prompt,
                }
            self.warm = WarmTrainer(time_limit=config.train_timeout_s, preload=preload)
        self.ctx = JobContext(
            store=store,
            config=config,
            engine=engine,
            runner=runner,
            warm=self.warm,
            tracker=tracker,
            tracking_key=tracking_key(config.data_dir) if tracker is not None else b"",
        )
        self.scheduler: LearnerScheduler | None = None
        if config.in_process:
            self.scheduler = LearnerScheduler(
                self._scheduled_run, interval_minutes=config.interval_minutes, cron=config.cron
            )
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._prewarming: asyncio.Task[None] | None = None
        self._lock_file: Any = None  # held while this process is the one that trains
        self._submit_lock = asyncio.Lock()
        self._counts: Counter[str] = Counter()
        self._last: dict[str, Any] = {}

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the active adapters into the engine; start the schedule and job loop if ours."""
        self._stop.clear()
        if self.engine is not None:
            await pub.sync_engine(self.store, self.engine)
        if self.config.in_process and self._take_training_lock():
            assert self.scheduler is not None
            await self.scheduler.start()
            worker = run_worker(
                self.ctx,
                self._stop,
                wake=self._wake,
                poll_seconds=self.config.poll_seconds,
                on_finished=self._finished,
            )
            self._tasks.append(asyncio.create_task(worker, name="ouro-learner"))
            if self.warm is not None and self.warm.preload is not None:
                self._prewarming = asyncio.create_task(self._prewarm(), name="ouro-trainer")
                self._tasks.append(self._prewarming)
        elif self.engine is not None:
            sync = pub.sync_engine_every(
                self.store, self.engine, self.config.sync_seconds, self._stop
            )
            self._tasks.append(asyncio.create_task(sync, name="ouro-adapter-sync"))

    async def close(self) -> None:
        """Stop scheduling; a training in flight is killed and requeued at the next start."""
        self._stop.set()
        if self.scheduler is not None:
            await self.scheduler.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.warm is not None:
            await self.warm.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    @property
    def trains(self) -> bool:
        """Whether this process runs the training jobs (it holds the data folder's lock)."""
        return self._lock_file is not None

    def _take_training_lock(self) -> bool:
        """One process trains from a data folder: the first to lock `<data_dir>/learner.lock`.

        Another `ouro run` or `ouro learner` on the same folder would otherwise claim jobs too,
        and requeue, as stale, the job the first one is running. A process that does not get
        the lock still queues jobs and serves the versions the trainer publishes.
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: nothing to lock with
            self._lock_file = open(os.devnull)
            return True
        path = self.config.data_dir / "learner.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            log.warning(
                "another process (pid %s) trains from %s; this one queues jobs and serves the "
                "versions it publishes",
                holder,
                self.config.data_dir,
            )
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle
        return True

    async def ready(self) -> None:
        """Wait until the trainer process started ahead of time has the base model loaded."""
        if self._prewarming is not None:
            await asyncio.shield(self._prewarming)

    async def _prewarm(self) -> None:
        assert self.warm is not None
        try:
            await self.warm.warm()
        except Exception as exc:  # the first run will start it again and report any failure
            log.warning("could not start the trainer process ahead of time: %s", exc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- LearnerPort ------------------------------------------------------------------------

    async def submit(self, target_user_id: int | None, requested_by: int | None) -> TrainingJob:
        """Queue a job unless one for the same target is already waiting; return at once."""
        async with self._submit_lock:
            for queued in await self.store.list_jobs(status=JobStatus.QUEUED, limit=500):
                if queued.target_user_id == target_user_id:
                    return queued
            job = await self.store.enqueue_job(target_user_id, requested_by)
        self._counts["submitted"] += 1
        self._wake.set()
        return job

    async def retrain(
        self,
        target_user_id: int | None,
        requested_by: int | None,
        progress: Progress | None = None,
    ) -> RetrainOutcome:
        """Queue a job and wait for it, relaying its log lines as progress."""
        job = await self.submit(target_user_id, requested_by)
        seen = len(job.log.splitlines())
        while True:
            await asyncio.sleep(0.5)
            current = await self.store.get_job(job.id)
            if current is None:
                raise LookupError(f"training job {job.id} disappeared")
            lines = current.log.splitlines()
            for line in lines[seen:]:
                if progress is not None:
                    try:
                        await progress(line)
                    except Exception:
                        log.warning("progress callback failed", exc_info=True)
            seen = len(lines)
            if current.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                return await self.outcome(current)

    async def outcome(self, job: TrainingJob) -> RetrainOutcome:
        """The `RetrainOutcome` of a finished job, rebuilt from the store."""
        found = {
            key: [
                a for a in [await self.store.get_adapter(v) for v in job.result.get(key, [])] if a
            ]
            for key in ("promoted", "rejected")
        }
        summary = str(job.result.get("summary") or job.error or job.status)
        return RetrainOutcome(
            job=job, promoted=found["promoted"], rejected=found["rejected"], summary=summary
        )

    async def rollback(self, owner_user_id: int | None) -> AdapterVersion | None:
        return await pub.rollback(self.store, self.engine, owner_user_id)

    async def forget(self, user_id: int) -> None:
        """Unload and delete the user's adapters, rows and MLflow runs; retrain shared if needed."""
        mine = await self.store.list_corrections(user_id=user_id)
        shared = any(c.scope == CorrectionScope.SHARED_APPROVED for c in mine)
        if self.engine is not None:
            await self.engine.deactivate(pub.owner_key(user_id))
        paths = await self.store.forget_user(user_id)
        await asyncio.to_thread(pub.remove_folders, paths, self.config.adapters)
        if self.ctx.tracker is not None:
            await self.ctx.tracker.forget(owner_hash(user_id, self.ctx.tracking_key))
        if not shared:
            return
        # Their corrections may live in the shared adapter, and in every personal adapter that
        # learned it: the next job rebuilds those without them (see learner.job.plan_job).
        left = shared_learnable(await self.store.list_corrections(), self.config.shared_min_users)
        live = await self.store.active_adapter(AdapterScope.SHARED, None)
        if live is not None and not left:  # nothing shared is left to learn: back to the base
            await self.store.set_adapter_status(
                live.version, AdapterStatus.RETIRED, reason="its corrections were forgotten"
            )
            if self.engine is not None:
                await self.engine.deactivate(None)
        await self.submit(None, None)

    async def notify_correction(self, user_id: int) -> None:
        """Validate the user's new correction now; queue training once enough are waiting."""
        try:
            threshold = self.config.train_after_corrections
            if await corrections_ready(self.store, user_id, threshold, self.config.rules()):
                await self.submit(user_id, None)
        except Exception:  # the correction is stored; the next scheduled run picks it up
            log.exception("could not validate corrections of user %s", user_id)

    async def _scheduled_run(self) -> None:
        await self.submit(None, None)

    def next_run_at(self) -> datetime | None:
        return None if self.scheduler is None else self.scheduler.next_run_at()

    def describe_schedule(self) -> str:
        n = self.config.train_after_corrections
        soon = "as soon as it is validated" if n == 1 else f"once you have {n} new corrections"
        if self.scheduler is None:
            return f"It will be learned {soon} (by the learner worker)."
        when = self.next_run_at()
        at = f", next {when.astimezone(UTC):%H:%M} UTC" if when else ""
        every = self.scheduler.describe()
        return f"It will be learned {soon}, or at the next scheduled run ({every}{at})."

    def metrics(self) -> dict[str, Any]:
        return {"jobs": dict(self._counts), **self._last}

    async def _finished(self, outcome: JobOutcome) -> None:
        self._counts[str(outcome.job.status)] += 1
        self._counts["promoted"] += len(outcome.promoted)
        self._counts["rejected"] += len(outcome.rejected)
        self._last = {
            "last_run_seconds": float(outcome.job.result.get("seconds", 0.0)),
            "last_run_finished_at": (outcome.job.finished_at or datetime.now(UTC)).isoformat(),
        }
