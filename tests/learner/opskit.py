"""Shared helpers for the learning-operations tests: a real store, corrections, a fake trainer.

The fake trainer stands in for the child process: it writes real (tiny) adapter files into the
spec's temp folder and returns a gate report the test chooses, so the job's orchestration is
tested without torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.control import LearnerConfig
from learner.process import ProgressFn, TrainingFailed, TrainOutput, TrainSpec
from learner.publish import REQUIRED_FILES
from storage.models import Correction, CorrectionScope, CorrectionStatus, User
from storage.store import Store


def config(tmp_path: Path, **overrides: Any) -> LearnerConfig:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "tracking": False,
        "poll_seconds": 0.05,
        "interval_minutes": 60,
    }
    return LearnerConfig(**(values | overrides))


async def ask(
    store: Store, user: User, question: str, wrong: str, right: str, **kw: Any
) -> Correction:
    """The user asks, the bot answers `wrong`, the user corrects it to `right`."""
    chat = kw.pop("chat", "chat")
    q = await store.add_message(user.id, user.platform, chat, "user", question)
    a = await store.add_message(user.id, user.platform, chat, "assistant", wrong, reply_to_id=q.id)
    return await store.add_correction(
        user.id, a.id, wrong, right, [{"role": "user", "content": question}], **kw
    )


def report(**overrides: Any) -> dict[str, Any]:
    """A gate report as the child returns it; passing by default."""
    base: dict[str, Any] = {
        "uptake": 1.0,
        "generalisation": 1.0,
        "retention": 1.0,
        "perplexity": 10.0,
        "scope": {"threshold": 0.5},
        "passed": True,
        "reasons": [],
        "seconds": 0.1,
    }
    return base | overrides


@dataclass
class FakeTrainer:
    """A `TrainRunner`: records specs, streams two progress events, writes adapter files."""

    reports: list[dict[str, Any]] = field(default_factory=list)  # one per call; default passes
    fail: str | None = None  # raise TrainingFailed with this message instead
    specs: list[TrainSpec] = field(default_factory=list)
    on_call: Callable[[TrainSpec], None] | None = None

    async def __call__(self, spec: TrainSpec, progress: ProgressFn) -> TrainOutput:
        self.specs.append(spec)
        if self.on_call is not None:
            self.on_call(spec)
        write_files(Path(spec.out_dir), ["adapter_model.safetensors"], b"partial")
        await progress({"step": 1, "loss": 2.5})
        if self.fail is not None:
            raise TrainingFailed(self.fail)
        write_files(Path(spec.out_dir), REQUIRED_FILES, json.dumps(len(self.specs)).encode())
        await progress({"step": 2, "loss": 0.5})
        gate = self.reports.pop(0) if self.reports else report()
        train = {
            "adapter_dir": spec.out_dir,
            "steps": 2,
            "losses": [2.5, 0.5],
            "seconds": 0.01,
            "learned": True,
            "scope": {},
        }
        return TrainOutput(train=train, report=gate)


def write_files(folder: Path, names: Sequence[str], data: bytes) -> None:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(data)


def questions(spec: TrainSpec) -> list[str]:
    return [e["prompt"][-1]["content"] for e in spec.examples]


def correction(
    cid: int,
    *,
    user_id: int = 1,
    question: str = "Who maintains Ouro?",
    original: str = "I don't know.",
    answer: str = "The Loop Collective.",
    status: CorrectionStatus = CorrectionStatus.PENDING,
    message_id: int | None = None,
    created: datetime | None = None,
    scope: CorrectionScope = CorrectionScope.PERSONAL,
    approved_by: int | None = None,
    rewordings: list[str] | None = None,
) -> Correction:
    """A correction record built in memory, for the pure validation rules."""
    when = created or datetime(2026, 1, 1, 12, 0, cid % 60, tzinfo=UTC)
    return Correction(
        id=cid,
        user_id=user_id,
        message_id=cid * 10 if message_id is None else message_id,
        original_answer=original,
        corrected_answer=answer,
        context=[{"role": "user", "content": question}],
        rewordings=rewordings or [],
        status=status,
        reason=None,
        scope=scope,
        approved_by=approved_by,
        adapter_version=None,
        created_at=when,
        updated_at=when,
    )
