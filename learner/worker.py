"""The job loop: claim the oldest queued job, run it, repeat; one training at a time.

It runs inside `ouro run` (in-process learner) or alone as `ouro learner`. Jobs live in the
store, so a job left `running` by a dead process is requeued when the loop starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from learner.job import JobContext, JobOutcome, run_job
from learner.publish import clean_temp

log = logging.getLogger(__name__)


async def run_worker(
    ctx: JobContext,
    stop_event: asyncio.Event,
    *,
    wake: asyncio.Event | None = None,
    poll_seconds: float = 5.0,
    on_finished: Callable[[JobOutcome], Awaitable[None]] | None = None,
) -> None:
    """Run queued jobs until `stop_event` is set; `wake` cuts the idle wait short.

    Cancelling the task kills a running trainer; its job stays `running` in the store and is
    requeued by the next start.
    """
    requeued = await ctx.store.requeue_stale_jobs()
    removed = await asyncio.to_thread(clean_temp, ctx.config.adapters)
    if requeued or removed:
        log.info("requeued %d stale jobs, removed %d abandoned temp folders", requeued, removed)
    while not stop_event.is_set():
        if wake is not None:
            wake.clear()
        try:
            job = await ctx.store.claim_next_job()
        except Exception:
            log.exception("could not claim a training job; retrying")
            job = None
        if job is None:
            await _idle(stop_event, wake, poll_seconds)
            continue
        outcome = await run_job(job, ctx)
        log.info("job %s %s: %s", job.id, outcome.job.status, outcome.summary)
        if on_finished is not None:
            try:
                await on_finished(outcome)
            except Exception:
                log.exception("job %s finished but its listener failed", job.id)


async def _idle(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    """Sleep until stopped, woken, or `seconds` pass."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
