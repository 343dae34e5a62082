"""When training runs: on an interval or a cron schedule, and as soon as a user has enough
new accepted corrections. Scheduling only queues jobs; the worker loop runs them one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from learner.validate import Rules, validate_pending
from storage.models import CorrectionStatus

if TYPE_CHECKING:
    from storage.store import Store

log = logging.getLogger(__name__)

JOB_ID = "ouro-train"


class LearnerScheduler:
    """APScheduler 3's AsyncIOScheduler calling `on_tick` every interval or on a crontab."""

    def __init__(
        self,
        on_tick: Callable[[], Awaitable[Any]],
        *,
        interval_minutes: float = 60,
        cron: str | None = None,
    ) -> None:
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        if cron:
            try:
                self._trigger: Any = CronTrigger.from_crontab(cron, timezone=UTC)
            except ValueError as exc:
                raise ValueError(f"invalid train cron {cron!r}: {exc}") from None
        else:
            if interval_minutes <= 0:
                raise ValueError(f"train interval must be positive, got {interval_minutes}")
            self._trigger = IntervalTrigger(minutes=interval_minutes, timezone=UTC)
        self.cron = cron
        self.interval_minutes = interval_minutes
        self._on_tick = on_tick
        self._scheduler: Any = None

    async def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_job(
            self._tick,
            self._trigger,
            id=JOB_ID,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self._scheduler.start()

    async def close(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._scheduler = None

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

    async def _tick(self) -> None:
        try:
            await self._on_tick()
        except Exception:
            log.exception("scheduled training could not be queued")

    def next_run_at(self) -> datetime | None:
        if self._scheduler is None:
            return None
        job = self._scheduler.get_job(JOB_ID)
        return None if job is None else job.next_run_time

    def describe(self) -> str:
        """`every 60 minutes` or `on the schedule '0 3 * * *' (UTC)`."""
        if self.cron:
            return f"on the schedule '{self.cron}' (UTC)"
        minutes = self.interval_minutes
        return "every minute" if minutes == 1 else f"every {minutes:g} minutes"


async def corrections_ready(store: Store, user_id: int, threshold: int, rules: Rules) -> bool:
    """Validate the user's pending corrections now; True once `threshold` are waiting to train."""
    await validate_pending(store, rules, user_id=user_id)
    waiting = await store.list_corrections(user_id=user_id, status=CorrectionStatus.ACCEPTED)
    return len(waiting) >= threshold
