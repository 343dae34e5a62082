"""What the chat service needs from the learner, as a Protocol.

`bot/` never imports `learner/`: the composition root (`ouro/`) hands the service an object
with these methods (the learner's `LearnerControl`). Tests hand it a fake.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from storage.models import AdapterVersion, RetrainOutcome, TrainingJob

__all__ = ["LearnerPort", "Progress", "RetrainOutcome"]

Progress = Callable[[str], Awaitable[None]]  # one human line: "step 12/40 · loss 0.41"


class LearnerPort(Protocol):
    async def submit(self, target_user_id: int | None, requested_by: int | None) -> TrainingJob:
        """Queue a training job and return at once (HTTP API: 202 + job id)."""
        ...

    async def retrain(
        self, target_user_id: int | None, requested_by: int | None, progress: Progress | None = None
    ) -> RetrainOutcome:
        """Queue a job and wait for it, reporting progress lines (admin /retrain)."""
        ...

    async def rollback(self, owner_user_id: int | None) -> AdapterVersion | None:
        """Restore the previous version (None: the base model); return what is now active."""
        ...

    async def forget(self, user_id: int) -> None:
        """Unload and delete the user's adapters and every stored row about them."""
        ...

    async def notify_correction(self, user_id: int) -> None:
        """A correction was stored; validation and training may be triggered."""
        ...

    def next_run_at(self) -> datetime | None:
        """When the next scheduled run happens (None: no schedule in this process)."""
        ...

    def describe_schedule(self) -> str:
        """One line: when a new correction will be learned."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Counters for /metrics (jobs by status, last run duration)."""
        ...
