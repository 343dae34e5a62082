"""Correction-to-live: seconds from the last correction being stored to the engine serving it.

The whole product path runs: the chat service stores the user's turns and corrections, the
in-process learner validates, trains in a child process, gates and publishes, and the engine
hot-swaps the new version. The clock stops when the corrected question, asked again through
the chat service, comes back with the corrected answer.

Two ways in: a batch of N corrections stored at once and learned by one run (from scratch),
and the N-th of N sequential corrections, the earlier ones already live (the new run starts
from the live version's weights, see learner.train).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from bot.service import Actor
from ouro.settings import Settings

log = logging.getLogger(__name__)


def load_facts(count: int) -> list[dict[str, Any]]:
    text = resources.files("learner").joinpath("data/facts.json").read_text(encoding="utf-8")
    facts: list[dict[str, Any]] = json.loads(text)["facts"]
    return facts[:count]


def _learned(answer: str, expected: str) -> bool:
    return expected.strip().rstrip(".").casefold() in answer.casefold()


async def one_run(
    settings: Settings, count: int, timeout_s: float, *, sequential: bool = False
) -> dict[str, Any]:
    """Time the last of `count` corrections from stored to served.

    batch: all `count` are stored first and one training run learns them together.
    sequential: the first `count - 1` are learned one run at a time (untimed), as a user who
    corrects now and then would have them; then the last one is timed.
    """
    from ouro.app import open_core

    facts = load_facts(count)
    actor = Actor("console", "bench", "bench", "bench")
    async with open_core(settings, learner_in_process=True) as core:
        await core.learner.ready()  # a running bot has its trainer loaded long before
        earlier, last = (facts[:-1], facts[-1:]) if sequential else ([], facts)
        for i, fact in enumerate(earlier, start=1):
            await _correct(core, actor, fact)
            if await _served(core, actor, facts[:i], time.perf_counter() + timeout_s) is None:
                raise RuntimeError(f"correction {i} of {count} never went live")
        stored_at = time.perf_counter()
        for fact in last:
            await _correct(core, actor, fact)
            stored_at = time.perf_counter()
        live = await _served(core, actor, last, stored_at + timeout_s)
        elapsed = live - stored_at if live is not None else None
        served = await _answered(core, actor, facts)  # untimed: all of them still answered
        user = await core.store.find_user("console", "bench")
        active = await core.store.active_adapter("personal", user.id) if user else None
        metrics = active.metrics if active else {}
    return {
        "mode": "sequential" if sequential else "batch",
        "corrections": count,
        "correction_to_live_s": elapsed,
        "served_correctly": served,
        "uptake": metrics.get("uptake"),
        "generalisation": metrics.get("generalisation"),
        "retention": metrics.get("retention"),
        "train_s": metrics.get("train_seconds"),
        "steps": metrics.get("steps"),
        "resumed": metrics.get("resumed"),
        "train_phases": " ".join(
            f"{k} {v:.1f}" for k, v in (metrics.get("train_phases") or {}).items()
        ),
    }


async def _correct(core: Any, actor: Actor, fact: dict[str, Any]) -> None:
    await _ask(core.service, actor, fact["question"])
    reply = await core.service.correct(actor, fact["answer"])
    if not reply.ok:
        raise RuntimeError(f"correction refused: {reply.text}")
    await core.service.reset(actor)


async def _served(
    core: Any, actor: Actor, facts: list[dict[str, Any]], deadline: float
) -> float | None:
    """When a new adapter version answering `facts` went live (clock read after the answers)."""
    before = dict(core.engine.active_versions())
    while time.perf_counter() < deadline:
        versions = core.engine.active_versions()
        if versions and versions != before:
            if await _answered(core, actor, facts) >= 0.8:
                return time.perf_counter()
            before = dict(versions)  # a version that does not answer them yet: wait for the next
        await asyncio.sleep(0.25)
    return None


async def _answered(core: Any, actor: Actor, facts: list[dict[str, Any]]) -> float:
    """Share of `facts` whose question, asked through the chat service, gets the right answer."""
    ok = 0
    for fact in facts:
        ok += _learned(await _ask(core.service, actor, fact["question"]), fact["answer"])
        await core.service.reset(actor)
    return ok / len(facts)


async def _ask(service: Any, actor: Actor, question: str) -> str:
    answer = await service.chat(actor, question)
    if answer.refusal is not None:
        raise RuntimeError(f"chat refused: {answer.refusal.text}")
    return "".join([chunk async for chunk in answer])


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a converted-model file (read only here, ~0.5 GB each) where the filesystem
    allows it, else copy it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


async def bench_correction_to_live(
    settings: Settings,
    workdir: Path,
    runs: list[tuple[str, int]],
    timeout_s: float = 900.0,
) -> list[dict[str, Any]]:
    """One row per (mode, corrections): mode "batch" or "sequential"."""
    rows = []
    for mode, count in runs:
        data = workdir / f"live-{mode}-{count}"
        cache = data / "model-cache"
        if settings.model_cache_dir.exists() and not cache.exists():
            shutil.copytree(settings.model_cache_dir, cache, copy_function=_link_or_copy)
        run_settings = settings.model_copy(
            update={
                "data_dir": data,
                "train_after_corrections": 1 if mode == "sequential" else count,
                "rate_limit_per_minute": 10_000,
                "max_new_tokens": 32,  # the bot's first answers are not what is timed
            }
        )
        rows.append(await one_run(run_settings, count, timeout_s, sequential=mode == "sequential"))
        log.info("correction to live: %s", rows[-1])
    return rows
