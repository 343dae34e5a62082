"""One training job, top to bottom: validate -> plan -> train + gate (child) -> decide -> publish.

A job with a target trains that user's adapter; a job without one trains every user with
new accepted corrections and then the shared adapter when its approved corrections changed.
Each adapter is trained from the base model on everything it must know (its owner's current
corrections plus the approved shared ones), so a new version replaces the old one outright.
Corrections become `trained` only once their version is live; anything else (a refused
candidate, a crashed trainer) leaves them `accepted`, and a later run retries them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learner import publish as pub
from learner.process import (
    TrainingFailed,
    TrainOutput,
    TrainRunner,
    TrainSpec,
    WarmTrainer,
    run_in_subprocess,
)
from learner.tracking import Tracker, owner_hash
from learner.types import TrainExample
from learner.validate import newest_per_question, normalise, shared_learnable, validate_pending
from model.interface import InferenceEngine
from storage.models import (
    AdapterScope,
    AdapterStatus,
    AdapterVersion,
    Correction,
    CorrectionStatus,
    JobStatus,
    RetrainOutcome,
    TrainingJob,
)

if TYPE_CHECKING:
    from learner.control import LearnerConfig
    from storage.store import Store

log = logging.getLogger(__name__)

JobOutcome = RetrainOutcome
Say = Callable[[str], Awaitable[None]]
GATE_METRICS = ("uptake", "generalisation", "retention", "perplexity")


@dataclass
class JobContext:
    """What a job needs; `runner` and `tracker` are swapped in tests."""

    store: Store
    config: LearnerConfig
    engine: InferenceEngine | None = None
    runner: TrainRunner | None = None  # default: `warm`, else a fresh child process per run
    tracker: Tracker | None = None
    tracking_key: bytes = b""
    progress: Say | None = None  # human progress lines, besides the job's log
    warm: WarmTrainer | None = None  # a long-lived trainer child with the base model loaded

    def run_training(self) -> TrainRunner:
        if self.runner is not None:
            return self.runner
        if self.warm is not None:
            return self.warm
        return functools.partial(run_in_subprocess, time_limit=self.config.train_timeout_s)


@dataclass(frozen=True)
class Plan:
    """One adapter to train: whose, the corrections it must answer, and which are new."""

    scope: AdapterScope
    owner_id: int | None
    examples: list[Correction]
    new: list[Correction]
    other_questions: list[str] = field(default_factory=list)
    rebuild: bool = False  # an admin asked: train from scratch even with nothing new

    @property
    def label(self) -> str:
        return "the shared adapter" if self.owner_id is None else f"user #{self.owner_id}"


async def run_job(job: TrainingJob, ctx: JobContext) -> JobOutcome:
    """Run a claimed job to the end and record how it went; never raises (except cancel)."""
    store, started = ctx.store, time.monotonic()
    promoted: list[AdapterVersion] = []
    rejected: list[AdapterVersion] = []
    notes: list[str] = []
    failures: list[str] = []

    async def say(line: str) -> None:
        await _update(store, job.id, log_line=line)
        if ctx.progress is not None:
            try:
                await ctx.progress(line)
            except Exception:
                log.warning("progress listener failed", exc_info=True)

    try:
        # 1. validate whatever arrived since the last run (users see rejections and why)
        verdicts = await validate_pending(store, ctx.config.rules())
        if verdicts:
            kept = sum(v.accepted for v in verdicts)
            await say(f"validated {len(verdicts)} corrections: {kept} accepted")

        # 2. decide which adapters need training
        plans, skipped = await plan_job(store, job, ctx.config.shared_min_users)
        notes.extend(skipped)
        if not plans:
            notes.append("nothing new to learn")

        # 3. train, gate, decide and publish each one, one at a time
        for plan in plans:
            await say(f"training {plan.label} on {len(plan.examples)} corrections")
            try:
                adapter = await train_and_publish(plan, job, ctx, say)
            except Exception as exc:  # crash, kill, timeout, or the owner was forgotten meanwhile
                log.warning("training %s failed: %s", plan.label, exc)
                failures.append(f"{plan.label}: {exc}")
                await say(f"training {plan.label} failed: {exc}")
                continue
            (promoted if adapter.status == AdapterStatus.ACTIVE else rejected).append(adapter)
            await say(describe_adapter(adapter))
    except Exception as exc:  # a bug or the store failing: the job fails, the bot serves on
        log.exception("training job %s failed", job.id)
        failures.append(f"{exc.__class__.__name__}: {exc}")

    # 4. record the outcome
    seconds = time.monotonic() - started
    summary = summarise(promoted, rejected, notes, failures, seconds)
    result = {
        "promoted": [a.version for a in promoted],
        "rejected": [a.version for a in rejected],
        "summary": summary,
        "seconds": round(seconds, 2),
        "metrics": {a.version: job_metrics(a) for a in promoted + rejected},
        "gate": {
            "promoted": [a.version for a in promoted],
            "rejected": [a.version for a in rejected],
            "reasons": {a.version: a.reason for a in rejected if a.reason},
        },
    }
    status = JobStatus.FAILED if failures else JobStatus.SUCCEEDED
    error = "; ".join(failures) or None
    try:
        finished = await store.finish_job(job.id, status, result=result, error=error)
    except Exception as exc:  # e.g. the job's user was forgotten meanwhile, and the job with them
        log.warning("could not record the end of job %s: %s", job.id, exc)
        finished = replace(job, status=status, result=result, error=error)
    return JobOutcome(job=finished, promoted=promoted, rejected=rejected, summary=summary)


async def _update(store: Store, job_id: int, **changes: Any) -> None:
    """Job progress is best effort: a failed write must not stop the training."""
    try:
        await store.update_job(job_id, **changes)
    except Exception as exc:
        log.debug("could not update job %s: %s", job_id, exc)


async def plan_job(store: Store, job: TrainingJob, min_users: int) -> tuple[list[Plan], list[str]]:
    """The adapters this job trains, personal ones first; plus notes on what it skipped.

    A scheduled or automatic job trains only where there is something new, or where the live
    version holds a correction that is gone (another user was forgotten, and with them a
    shared correction this user's adapter had learned): that one is rebuilt from scratch, so
    the forgotten words do not live on in its weights. An admin's job (`/retrain`) also
    rebuilds adapters with nothing new, from scratch.
    """
    admin = job.requested_by is not None
    everyone = await store.list_corrections()
    shared = shared_learnable(everyone, min_users)
    learning = (CorrectionStatus.ACCEPTED, CorrectionStatus.TRAINED)
    if job.target_user_id is not None:
        owners = [job.target_user_id]
    else:
        owners = sorted({c.user_id for c in everyone if c.status in learning})
    plans: list[Plan] = []
    notes: list[str] = []
    for owner in owners:
        own = [c for c in everyone if c.user_id == owner]
        current = newest_per_question(c for c in own if c.status in learning)
        new = [c for c in current if c.status == CorrectionStatus.ACCEPTED]
        asked = {_question_key(c) for c in current}
        extra = [c for c in shared if _question_key(c) not in asked]
        examples = current + extra
        live = await store.active_adapter(AdapterScope.PERSONAL, owner)
        held = set(live.metrics.get("correction_ids", [])) if live else set()
        stale = bool(held - {c.id for c in examples})
        rebuild = admin or stale
        if not current or not (new or rebuild):
            continue
        if not admin and await _already_refused(
            store, AdapterScope.PERSONAL, owner, new or examples
        ):
            notes.append(f"user #{owner}: waiting for new corrections (the last candidate failed)")
            continue
        others = unrelated_questions(everyone, owner, examples)
        plans.append(Plan(AdapterScope.PERSONAL, owner, examples, new, others, rebuild))
    if job.target_user_id is None and shared:
        active = await store.active_adapter(AdapterScope.SHARED, None)
        learned = set(active.metrics.get("correction_ids", [])) if active else set()
        if {c.id for c in shared} != learned or admin:
            new = [c for c in shared if c.id not in learned] or shared
            if not admin and await _already_refused(store, AdapterScope.SHARED, None, shared):
                notes.append(
                    "shared adapter: waiting for new corrections (the last candidate failed)"
                )
            else:
                plans.append(Plan(AdapterScope.SHARED, None, shared, new, rebuild=admin))
    return plans, notes


async def train_and_publish(
    plan: Plan, job: TrainingJob, ctx: JobContext, say: Say
) -> AdapterVersion:
    """Train one candidate in a child process, then promote it or keep it on record as refused."""
    store, cfg = ctx.store, ctx.config
    active = await store.active_adapter(plan.scope, plan.owner_id)
    base = active
    if base is None and plan.scope == AdapterScope.PERSONAL:
        # a user's first version may start from the shared one: it holds approved corrections
        # only, which this user's adapter learns too, and it has learned to read notes
        base = await store.active_adapter(AdapterScope.SHARED, None)
    owner = owner_hash(plan.owner_id, ctx.tracking_key)
    # the MLflow run opens while the child trains (importing mlflow alone takes seconds)
    opening = None
    if ctx.tracker is not None:
        opening = asyncio.create_task(
            ctx.tracker.start_run(run_params(plan, cfg, owner), {"ouro.owner": owner})
        )
    temp = pub.new_temp_dir(cfg.adapters)  # everything the child writes stays inside this
    spec = TrainSpec(
        out_dir=str(temp / "adapter"),
        examples=[to_example(c) for c in plan.examples],
        config=cfg.train_config(),
        model=cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        packed=cfg.packed,
        cache_dir=str(cfg.model_cache_dir) if cfg.model_cache_dir else None,
        gate_cache_dir=str(cfg.gate_cache),
        floors=cfg.floors(),
        tolerance=cfg.tolerance,
        active_report=active.metrics.get("report") if active else None,
        other_questions=plan.other_questions,
        start_from=start_from(plan, base) if cfg.incremental and not plan.rebuild else None,
        new_ids=[c.id for c in plan.new],
        entry=cfg.train_entry,
    )

    async def on_progress(event: dict[str, Any]) -> None:
        await _update(store, job.id, progress={"target": plan.label, **event})
        if event.get("step") is not None and event.get("loss") is not None:
            loss = float(event["loss"])
            await say(f"{plan.label}: step {event['step']}/{cfg.max_steps} · loss {loss:.3f}")

    began = time.monotonic()
    try:
        output = await ctx.run_training()(spec, on_progress)
    except Exception as exc:
        pub.remove_folders([temp], cfg.adapters)
        if ctx.tracker is not None and opening is not None:
            await ctx.tracker.finish_run(
                await opening,
                metrics={},
                tags={"ouro.decision": "failed"},
                adapter_dir=None,
                failed=True,
            )
        if isinstance(exc, TrainingFailed):
            raise
        raise TrainingFailed(f"{exc.__class__.__name__}: {exc}") from exc
    except BaseException:  # cancelled (shutdown): the job is requeued at the next start
        pub.remove_folders([temp], cfg.adapters)
        if opening is not None:
            opening.cancel()
        raise
    output = replace(output, train={**output.train, "process_seconds": time.monotonic() - began})
    run_id = await opening if opening is not None else None
    try:
        files = temp / "adapter"
        return await _decide_and_publish(plan, ctx, output, active, files, run_id, owner, say)
    finally:
        pub.remove_folders([temp], cfg.adapters)


async def _decide_and_publish(
    plan: Plan,
    ctx: JobContext,
    output: TrainOutput,
    active: AdapterVersion | None,
    files: Path,
    run_id: str | None,
    owner: str,
    say: Say,
) -> AdapterVersion:
    store, cfg = ctx.store, ctx.config
    waiting = [c.id for c in plan.new if c.status == CorrectionStatus.ACCEPTED]
    passed, reasons = decide(output.report, active, cfg.floors(), cfg.tolerance)
    metrics = adapter_metrics(plan, output)
    if not passed:
        reason = "gate: " + "; ".join(reasons)
        await _track(ctx, run_id, output, "rejected", reason, files)  # the files' only copy
        adapter = await pub.record_rejected(
            store,
            files,
            adapters_dir=cfg.adapters,
            scope=plan.scope,
            owner_id=plan.owner_id,
            metrics=metrics,
            reason=reason,
            mlflow_run_id=run_id,
        )
        note = f"not learned yet: candidate {adapter.version} was refused ({'; '.join(reasons)})"
        if waiting:
            await store.set_correction_status(waiting, CorrectionStatus.ACCEPTED, reason=note)
        return adapter
    adapter = await pub.publish(
        store,
        ctx.engine,
        files,
        adapters_dir=cfg.adapters,
        scope=plan.scope,
        owner_id=plan.owner_id,
        metrics=metrics,
        mlflow_run_id=run_id,
    )
    if adapter.status != AdapterStatus.ACTIVE:  # the engine could not load it
        await _track(ctx, run_id, output, "rejected", adapter.reason or "", Path(adapter.path))
        return adapter
    if waiting:
        await store.set_correction_status(
            waiting, CorrectionStatus.TRAINED, adapter_version=adapter.version
        )
    await _track(ctx, run_id, output, "promoted", "", Path(adapter.path))
    if ctx.tracker is not None:
        await ctx.tracker.set_live(run_id, owner)
    if plan.scope == AdapterScope.SHARED and cfg.hf_token and cfg.hf_repo:
        pushed = await asyncio.to_thread(
            pub.push_to_hub,
            Path(adapter.path),
            adapter.version,
            token=cfg.hf_token,
            repo=cfg.hf_repo,
        )
        await say(f"HF Hub: {pushed}")
    return adapter


def decide(
    report: Mapping[str, Any],
    active: AdapterVersion | None,
    floors: Mapping[str, float],
    tolerance: float = 0.0,
) -> tuple[bool, list[str]]:
    """Promote only above the floors and never worse than the version now serving (by more
    than `tolerance`: the held-out sets change as users come and go, so one prompt of the 48
    is noise, not forgetting).

    The gate already judged inside the child; this re-checks its numbers in the parent so a
    gate bug cannot promote a candidate below the configured floors.
    """
    reasons = [] if report.get("passed") else list(report.get("reasons") or ["the gate refused it"])
    for name, floor in floors.items():
        value = report.get(name)
        if not isinstance(value, int | float) or value < floor:
            shown = f"{value:.2f}" if isinstance(value, int | float) else "missing"
            reasons.append(f"{name} {shown} is below {floor:.2f}")
    previous = (active.metrics.get("report") or {}) if active else {}
    for name in ("uptake", "retention"):
        value, before = report.get(name), previous.get(name)
        if (
            isinstance(value, int | float)
            and isinstance(before, int | float)
            and value < before - tolerance - 1e-9
        ):
            reasons.append(f"{name} {value:.2f} is worse than the live version's {before:.2f}")
    return not reasons, list(dict.fromkeys(reasons))


def unrelated_questions(
    everyone: list[Correction], owner: int, own: list[Correction], limit: int = 20
) -> list[str]:
    """Other users' recent questions, as extra retention checks for this user's adapter.

    Questions this user corrected too are left out: their answer is meant to change.
    """
    mine = {_question_key(c) for c in own}
    out: dict[str, str] = {}
    for c in everyone:  # newest first
        key = _question_key(c)
        if c.user_id != owner and key and key not in mine and key not in out:
            out[key] = c.question
        if len(out) >= limit:
            break
    return list(out.values())


def to_example(c: Correction) -> dict[str, Any]:
    """A `TrainExample` for one correction, as JSON (the system prompt comes from the config)."""
    prompt = [dict(t) for t in c.context if t.get("role") in ("user", "assistant")]
    if not prompt or prompt[-1].get("role") != "user":
        prompt.append({"role": "user", "content": c.question})
    example = TrainExample(
        prompt=prompt,
        answer=c.corrected_answer,
        rejected=c.original_answer or None,
        rewordings=tuple(c.rewordings),
        correction_id=c.id,
    )
    return asdict(example)


def run_params(plan: Plan, cfg: LearnerConfig, owner: str) -> dict[str, Any]:
    train = cfg.train_config()
    shape = train["shape"]
    return {
        "base_model": cfg.model,
        "scope": plan.scope.value,
        "owner_sha256": owner,
        "lora_r": shape["r"],
        "lora_alpha": shape["alpha"],
        "lora_dropout": shape["dropout"],
        "lora_target_modules": ",".join(shape["target_modules"]),
        "learning_rate": train["learning_rate"],
        "max_steps": train["max_steps"],
        "method": train["method"],
        "examples": len(plan.examples),
        "new_corrections": len(plan.new),
    }


def start_from(plan: Plan, active: AdapterVersion | None) -> str | None:
    """The live version's folder when the candidate may start from its weights (for a user
    with no version yet, the live shared one's).

    Only when everything that version learned is still to be learned: a correction that was
    deleted, replaced or forgotten must not survive in weights the new version inherits.
    """
    if active is None or not active.metrics.get("learned", False):
        return None
    held = set(active.metrics.get("correction_ids") or [])
    if not held or not held <= {c.id for c in plan.examples}:
        return None
    return str(Path(active.path).resolve())


def adapter_metrics(plan: Plan, output: TrainOutput) -> dict[str, Any]:
    """What the registry keeps about a candidate: gate numbers, and which corrections it holds."""
    train, report = output.train, output.report
    return {
        **{k: report.get(k) for k in GATE_METRICS},
        "steps": train.get("steps"),
        "train_seconds": train.get("seconds"),
        "learned": train.get("learned"),
        "resumed": bool(train.get("resumed")),
        "train_phases": dict(train.get("phases") or {}),
        "report": dict(report),
        "correction_ids": sorted(c.id for c in plan.examples),
        "new_ids": sorted(c.id for c in plan.new),
    }


async def _track(
    ctx: JobContext,
    run_id: str | None,
    output: TrainOutput,
    decision: str,
    reason: str,
    folder: Path,
) -> None:
    if ctx.tracker is None:
        return
    report, train = output.report, output.train
    metrics = {k: float(report[k]) for k in GATE_METRICS if isinstance(report.get(k), int | float)}
    metrics["train_seconds"] = float(train.get("seconds") or 0.0)
    metrics["process_seconds"] = float(train.get("process_seconds") or 0.0)
    metrics["gate_seconds"] = float(report.get("seconds") or 0.0)
    metrics["steps"] = float(train.get("steps") or 0)
    for phase, seconds in (train.get("phases") or {}).items():
        metrics[f"train_{phase}_seconds"] = float(seconds)
    metrics["promoted"] = 1.0 if decision == "promoted" else 0.0
    await ctx.tracker.finish_run(
        run_id,
        metrics=metrics,
        losses=[float(x) for x in train.get("losses") or []],
        tags={"ouro.decision": decision, "ouro.reason": reason[:500]},
        adapter_dir=folder,
    )


async def _already_refused(
    store: Store, scope: AdapterScope, owner_id: int | None, wanted: list[Correction]
) -> bool:
    """True when the newest refused candidate already tried exactly these corrections."""
    refused = await store.list_adapters(
        owner_id=owner_id, scope=scope, status=AdapterStatus.REJECTED
    )
    if not refused:
        return False
    active = await store.active_adapter(scope, owner_id)
    if active and active.created_at and refused[0].created_at:
        if active.created_at > refused[0].created_at:
            return False
    tried = set(refused[0].metrics.get("correction_ids", []))
    return {c.id for c in wanted} <= tried


def _question_key(c: Correction) -> str:
    return normalise(c.question)


def job_metrics(adapter: AdapterVersion) -> dict[str, Any]:
    """The numbers a job reports per candidate: the gate's scores and the training effort."""
    m = adapter.metrics
    keys = (*GATE_METRICS, "steps", "train_seconds", "resumed")
    return {k: m[k] for k in keys if isinstance(m.get(k), int | float)}


def describe_adapter(adapter: AdapterVersion) -> str:
    m = adapter.metrics
    scores = ", ".join(
        f"{k} {m[k]:.2f}" for k in ("uptake", "retention") if isinstance(m.get(k), int | float)
    )
    if adapter.status == AdapterStatus.ACTIVE:
        return f"promoted {adapter.version} ({scores})"
    return f"refused {adapter.version}: {adapter.reason} ({scores})"


def summarise(
    promoted: list[AdapterVersion],
    rejected: list[AdapterVersion],
    notes: list[str],
    failures: list[str],
    seconds: float,
) -> str:
    parts = [describe_adapter(a) for a in promoted + rejected]
    parts += [f"failed: {f}" for f in failures] + notes
    return "; ".join(parts) + f" ({seconds:.0f} s)."
