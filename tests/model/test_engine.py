"""LocalEngine on a tiny random Llama: greedy correctness, continuous batching, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from model.engine import LocalEngine
from model.interface import ChatMessage, GenerationRequest, SamplingParams

QUESTION = "what is the capital of france?"
PROMPTS = [QUESTION, "hi", "how do I bake bread at home, step by step?", "2+2=?"]


def ask(
    question: str,
    user: str | None = None,
    n: int = 12,
    temperature: float = 0.0,
    seed: int | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", question)),
        user_key=user,
        sampling=SamplingParams(max_new_tokens=n, temperature=temperature, seed=seed),
    )


def engine_for(tiny: tuple[Any, Any], adapters_dir: Path, **kwargs: Any) -> LocalEngine:
    return LocalEngine("tiny", adapters_dir=adapters_dir, loaded=tiny, **kwargs)


async def test_single_request_matches_hf_generate(
    tiny: tuple[Any, Any], adapters_dir: Path
) -> None:
    model, tok = tiny
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2
        )
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    async with engine_for(tiny, adapters_dir) as engine:
        result = await engine.generate(ask(QUESTION))
    assert result.text == expected
    assert result.prompt_tokens == ids.shape[1]
    assert result.completion_tokens == 12
    assert result.finish_reason == "length"
    assert result.adapter_version is None


async def test_batched_equals_unbatched(tiny: tuple[Any, Any], adapters_dir: Path) -> None:
    async with engine_for(tiny, adapters_dir) as engine:
        alone = [(await engine.generate(ask(p, n=10 + i))).text for i, p in enumerate(PROMPTS)]
        together = await asyncio.gather(
            *(engine.generate(ask(p, n=10 + i)) for i, p in enumerate(PROMPTS))
        )
        stats = engine.stats()
    assert [r.text for r in together] == alone
    assert len(set(alone)) > 1, "prompts should give different answers"
    assert max(stats.batch_sizes) == len(PROMPTS)  # they really were decoded together
    assert stats.requests_total == 2 * len(PROMPTS)
    assert stats.tokens_generated == 2 * sum(10 + i for i in range(len(PROMPTS)))


async def test_requests_join_mid_decode(tiny: tuple[Any, Any], adapters_dir: Path) -> None:
    async with engine_for(tiny, adapters_dir) as engine:
        refs = [(await engine.generate(ask(p, n=30))).text for p in PROMPTS[:3]]
        first = engine.stream(ask(PROMPTS[0], n=30))
        seen: list[str] = []
        later: list[asyncio.Task[Any]] = []
        async for chunk in first:
            seen.append(chunk)
            if len(seen) == 3:  # the first request is mid-decode: two more join it
                later = [asyncio.create_task(engine.generate(ask(p, n=30))) for p in PROMPTS[1:3]]
        results = await asyncio.gather(*later)
        sizes = engine.stats().batch_sizes
    assert "".join(seen) == refs[0]
    assert [r.text for r in results] == refs[1:]
    assert max(sizes) == 3


async def test_stream_reports_version_first_and_counts(
    tiny: tuple[Any, Any], adapters_dir: Path
) -> None:
    async with engine_for(tiny, adapters_dir) as engine:
        completion = engine.stream(ask("hi", n=5))
        chunks = [c async for c in completion]
    assert completion.completion_tokens == 5
    assert completion.prompt_tokens > 0
    assert completion.finish_reason == "length"
    assert all(chunks)


async def test_sampling_is_seeded(tiny: tuple[Any, Any], adapters_dir: Path) -> None:
    async with engine_for(tiny, adapters_dir) as engine:
        a = await engine.generate(ask("hi", n=15, temperature=1.0, seed=7))
        b = await engine.generate(ask("hi", n=15, temperature=1.0, seed=7))
        c = await engine.generate(ask("hi", n=15, temperature=1.0, seed=8))
        greedy = await engine.generate(ask("hi", n=15))
    assert a.text == b.text
    assert c.text != a.text
    assert greedy.text not in (a.text, c.text)


async def test_cancel_frees_the_slot(tiny: tuple[Any, Any], adapters_dir: Path) -> None:
    async with engine_for(tiny, adapters_dir, max_batch_size=1) as engine:
        long = engine.stream(ask(QUESTION, n=400))
        got = []
        async for chunk in long:
            got.append(chunk)
            if len(got) == 2:
                await long.cancel()
        assert long.finish_reason == "cancelled"
        # with one slot, this can only finish if the cancelled row left the batch
        after = await asyncio.wait_for(engine.generate(ask("hi", n=5)), timeout=10)
        assert after.finish_reason == "length"
        assert engine.stats().tokens_generated < 60


async def test_abandoned_iterator_and_cancelled_task_free_the_slot(
    tiny: tuple[Any, Any], adapters_dir: Path
) -> None:
    async with engine_for(tiny, adapters_dir, max_batch_size=1) as engine:
        abandoned = engine.stream(ask(QUESTION, n=400))
        async for _ in abandoned:
            break
        del abandoned
        task = asyncio.create_task(engine.generate(ask(QUESTION, n=400)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        never_read = engine.stream(ask(QUESTION, n=400))
        await never_read.cancel()
        after = await asyncio.wait_for(engine.generate(ask("hi", n=5)), timeout=10)
        assert after.completion_tokens == 5
        assert engine.stats().tokens_generated < 300


async def test_bad_requests_get_clear_errors(tiny: tuple[Any, Any], adapters_dir: Path) -> None:
    engine = engine_for(tiny, adapters_dir)
    with pytest.raises(RuntimeError, match="not running"):
        engine.stream(ask("hi"))
    async with engine:
        with pytest.raises(ValueError, match="at least one message"):
            engine.stream(GenerationRequest(messages=()))
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.stream(ask("hi", n=0))
        with pytest.raises(ValueError, match="temperature"):
            engine.stream(ask("hi", temperature=-1))
        too_long = ask("word " * 600)
        with pytest.raises(ValueError, match="tokens"):
            await engine.generate(too_long)
        assert (await engine.generate(ask("hi", n=3))).completion_tokens == 3
        assert engine.stats().requests_failed == 1


async def test_close_ends_in_flight_requests(tiny: tuple[Any, Any], adapters_dir: Path) -> None:
    engine = engine_for(tiny, adapters_dir)
    await engine.start()
    completion = engine.stream(ask(QUESTION, n=400))
    task = asyncio.create_task(completion.text())
    await asyncio.sleep(0.1)
    await engine.close()
    await asyncio.wait_for(task, timeout=10)
    assert completion.finish_reason == "cancelled"
    with pytest.raises(RuntimeError):
        engine.stream(ask("hi"))
