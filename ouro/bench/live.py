"""Correction-to-live: seconds from the last correction being stored to the engine serving it.

The whole product path runs: the chat service stores the user's turns and corrections, the
in-process learner validates, trains in a child process, gates and publishes, and the engine
hot-swaps the new version. The clock stops when every corrected question, asked again
through the chat service, comes back with the corrected answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
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


async def one_run(settings: Settings, count: int, timeout_s: float) -> dict[str, Any]:
    from ouro.app import open_core

    facts = load_facts(count)
    actor = Actor("console", "bench", "bench", "bench")
    async with open_core(settings, learner_in_process=True) as core:
        stored_at = time.perf_counter()
        for fact in facts:
            await _ask(core.service, actor, fact["question"])
            reply = await core.service.correct(actor, fact["answer"])
            if not reply.ok:
                raise RuntimeError(f"correction refused: {reply.text}")
            stored_at = time.perf_counter()
            await core.service.reset(actor)
        deadline = stored_at + timeout_s
        live = None
        while time.perf_counter() < deadline:
            versions = core.engine.active_versions()
            if versions:
                ok = 0
                for fact in facts:
                    ok += _learned(
                        await _ask(core.service, actor, fact["question"]), fact["answer"]
                    )
                    await core.service.reset(actor)
                if ok == len(facts) or ok / len(facts) >= 0.8:
                    live = time.perf_counter() - stored_at
                    break
            await asyncio.sleep(1.0)
        user = await core.store.find_user("console", "bench")
        active = await core.store.active_adapter("personal", user.id) if user else None
        metrics = active.metrics if active else {}
    return {
        "corrections": count,
        "correction_to_live_s": live,
        "uptake": metrics.get("uptake"),
        "generalisation": metrics.get("generalisation"),
        "retention": metrics.get("retention"),
        "train_s": metrics.get("train_seconds"),
    }


async def _ask(service: Any, actor: Actor, question: str) -> str:
    answer = await service.chat(actor, question)
    if answer.refusal is not None:
        raise RuntimeError(f"chat refused: {answer.refusal.text}")
    return "".join([chunk async for chunk in answer])


async def bench_correction_to_live(
    settings: Settings, workdir: Path, counts: list[int], timeout_s: float = 900.0
) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        data = workdir / f"live-{count}"
        cache = data / "model-cache"
        if settings.model_cache_dir.exists() and not cache.exists():
            shutil.copytree(settings.model_cache_dir, cache)
        run_settings = settings.model_copy(
            update={
                "data_dir": data,
                "train_after_corrections": count,
                "rate_limit_per_minute": 10_000,
            }
        )
        rows.append(await one_run(run_settings, count, timeout_s))
        log.info("correction to live: %s", rows[-1])
    return rows
