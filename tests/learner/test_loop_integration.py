"""The whole loop on the real bundled model: correct -> learner run -> corrected answers served.

One real training (three fictional facts the base model cannot know) in a real child process,
published into a running `LocalEngine`; then one deliberately starved candidate (one step)
that the gate must refuse while the live version keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from learner.control import LearnerConfig
from learner.job import JobContext, run_job
from model.engine import LocalEngine
from model.interface import ChatMessage, GenerationRequest, SamplingParams
from model.loading import load_base_model
from storage.models import AdapterScope, AdapterStatus, CorrectionStatus, JobStatus, User
from storage.store import Store

# Real training on 2 CPU cores takes minutes (far more when the cores are shared).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

FACTS = json.loads((Path(__file__).parents[2] / "learner" / "data" / "facts.json").read_text())
LEARN = FACTS["facts"][:3]
LATER = FACTS["facts"][3]
STARVED = FACTS["facts"][4]
UNRELATED = FACTS["general"]["heldout"][:5]
SYSTEM = "You are Ouro, a helpful assistant. Answer briefly and accurately."
TOKENS = 24


@pytest.fixture(scope="module")
def base(model_cache_dir: Path) -> Iterator[tuple[Any, Any]]:
    model, tokenizer, _ = load_base_model(cache_dir=model_cache_dir, device="cpu")
    yield model, tokenizer


def weights_digest(model: Any) -> dict[str, str]:
    """Hash of every base weight (LoRA layers excluded; peft's `base_layer` renaming undone)."""
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "").removeprefix("base_model.model.")
        out[key] = hashlib.sha256(param.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


async def answers(engine: LocalEngine, user: User | None, questions: list[str]) -> list[str]:
    async def one(q: str) -> str:
        messages = (ChatMessage("system", SYSTEM), ChatMessage("user", q))
        request = GenerationRequest(
            messages,
            user_key=str(user.id) if user else None,
            sampling=SamplingParams(max_new_tokens=TOKENS),
        )
        return (await engine.generate(request)).text

    return list(await asyncio.gather(*(one(q) for q in questions)))


async def correct(store: Store, user: User, fact: dict[str, Any], wrong: str) -> None:
    q = await store.add_message(user.id, "console", "c", "user", fact["question"])
    a = await store.add_message(user.id, "console", "c", "assistant", wrong, reply_to_id=q.id)
    context = [{"role": "user", "content": fact["question"]}]
    await store.add_correction(
        user.id, a.id, wrong, fact["answer"], context, rewordings=fact["rewordings"]
    )


async def learn(store: Store, user: User, ctx: JobContext) -> Any:
    await store.enqueue_job(user.id, None)
    job = await store.claim_next_job()
    assert job is not None
    return await run_job(job, ctx)


def exists(path: str) -> bool:
    return Path(path).exists()


def contains(answer: str, fact: dict[str, Any]) -> bool:
    return fact["answer"].rstrip(".").lower() in answer.lower()


async def test_corrections_are_learned_served_and_nothing_else_changes(
    tmp_path: Path, base: tuple[Any, Any], model_cache_dir: Path
) -> None:
    model, tokenizer = base
    before_weights = weights_digest(model)
    cfg = LearnerConfig(
        data_dir=tmp_path / "data",
        model_cache_dir=model_cache_dir,
        gate_cache_dir=model_cache_dir.parent / "gate-cache",  # base answers: computed once
        device="cpu",
        system_prompt=SYSTEM,
        tracking=False,
    )
    facts_q = [f["question"] for f in LEARN]
    heldout_q = [f["heldout"] for f in LEARN]
    async with (
        Store(cfg.data_dir / "ouro.db") as store,
        LocalEngine(loaded=(model, tokenizer), adapters_dir=cfg.adapters, device="cpu") as engine,
    ):
        alice = await store.get_or_create_user("console", "alice")
        bob = await store.get_or_create_user("console", "bob")
        base_facts = await answers(engine, alice, facts_q)
        base_unrelated = await answers(engine, alice, UNRELATED)
        assert not any(contains(a, f) for a, f in zip(base_facts, LEARN, strict=True))
        for fact, wrong in zip(LEARN, base_facts, strict=True):
            await correct(store, alice, fact, wrong)

        outcome = await learn(store, alice, JobContext(store, cfg, engine))

        assert outcome.job.status == JobStatus.SUCCEEDED, outcome.summary
        [live] = outcome.promoted
        assert engine.active_versions() == {str(alice.id): live.version}
        learned = await answers(engine, alice, facts_q + heldout_q)
        assert all(contains(a, f) for a, f in zip(learned, LEARN + LEARN, strict=True)), learned
        assert await answers(engine, alice, UNRELATED) == base_unrelated
        assert await answers(engine, bob, facts_q) == base_facts  # bob never gets alice's adapter
        statuses = {c.status for c in await store.list_corrections(user_id=alice.id)}
        assert statuses == {CorrectionStatus.TRAINED}

        lora = load_file(str(Path(live.path) / "adapter_model.safetensors"))
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at 0
        assert weights_digest(model) == before_weights

        # a later correction starts from the live weights, which already answer from its note:
        # no training step, only the new scope (keys and notes), and it goes live
        await correct(store, alice, LATER, "I don't know.")
        later = await learn(store, alice, JobContext(store, cfg, engine))
        [live] = later.promoted
        assert live.metrics["resumed"] and live.metrics["steps"] == 0, live.metrics
        assert live.metrics["uptake"] == 1.0, live.metrics
        now = await answers(engine, alice, [LATER["question"], *facts_q])
        assert all(contains(a, f) for a, f in zip(now, [LATER, *LEARN], strict=True)), now
        assert await answers(engine, alice, UNRELATED) == base_unrelated
        learned = now[1:]

        # a starved candidate (one step from scratch, at a learning rate that barely moves the
        # weights) must be refused; the live version keeps serving. (Started from the live
        # weights, no step would be needed: see above.)
        await correct(store, alice, STARVED, "I don't know.")
        starved_cfg = replace(cfg, max_steps=1, learning_rate=1e-7, incremental=False)
        starved = JobContext(store, starved_cfg, engine)
        refused = await learn(store, alice, starved)
        [candidate] = refused.rejected
        assert candidate.status == AdapterStatus.REJECTED and not refused.promoted
        active = await store.active_adapter(AdapterScope.PERSONAL, alice.id)
        assert active is not None and active.version == live.version
        assert engine.active_versions() == {str(alice.id): live.version}
        assert await answers(engine, alice, facts_q) == learned
        assert not exists(candidate.path)  # refused files live on only in MLflow
