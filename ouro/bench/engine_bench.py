"""Inference-core benchmarks: decode speed, concurrency, hot swap under load, many adapters.

Every figure is measured in the same run as the figure it is compared with, and reported as a
ratio; nothing here is a timed assertion.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.engine import LocalEngine
from model.interface import (
    AdapterSpec,
    ChatMessage,
    GenerationRequest,
    InferenceEngine,
    SamplingParams,
)
from ouro.bench.fixtures import PROMPTS, clone_adapter, current_rss_mb, make_random_adapter

log = logging.getLogger(__name__)


@dataclass
class Timed:
    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def request(i: int, user: str | None, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("user", PROMPTS[i % len(PROMPTS)]),),
        user_key=user,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
    )


async def timed_batch(engine: InferenceEngine, users: Sequence[str | None], tokens: int) -> Timed:
    start = time.perf_counter()
    results = await asyncio.gather(
        *(engine.generate(request(i, u, tokens)) for i, u in enumerate(users))
    )
    return Timed(sum(r.completion_tokens for r in results), time.perf_counter() - start)


def plain_generate(model: Any, tokenizer: Any, tokens: int) -> Timed:
    """transformers' own `generate`, batch 1, greedy: the baseline the engine must not lose to."""
    import torch

    messages = [{"role": "user", "content": PROMPTS[0]}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    produced = out.shape[1] - enc["input_ids"].shape[1]
    return Timed(produced, time.perf_counter() - start)


def llama_cpp_generate(gguf: Path, tokens: int) -> Timed | None:
    """llama.cpp on the same GGUF file, when the optional llama-cpp-python is installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm: Any = Llama(model_path=str(gguf), n_threads=os.cpu_count() or 1, n_ctx=1024, verbose=False)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    llm.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)
    start = time.perf_counter()
    out = llm.create_chat_completion(messages=messages, max_tokens=tokens, temperature=0.0)
    return Timed(int(out["usage"]["completion_tokens"]), time.perf_counter() - start)


def seed_adapters(base_model: Any, adapters_dir: Path, prefix: str, first_seed: int) -> list[Path]:
    """Two adapters with distinct random weights, made once; versions are hard-linked copies."""
    seeds = [adapters_dir / f"{prefix}-seed-a", adapters_dir / f"{prefix}-seed-b"]
    for i, folder in enumerate(seeds):
        if not (folder / "adapter_model.safetensors").exists():
            make_random_adapter(base_model, folder, seed=first_seed + i)
    return seeds


async def register_adapters(
    engine: InferenceEngine, base_model: Any, adapters_dir: Path, count: int, prefix: str
) -> list[str]:
    """`count` personal adapters (owners bench0..), two distinct weight sets, hard-linked."""
    seeds = seed_adapters(base_model, adapters_dir, prefix, first_seed=1)
    owners = []
    for i in range(count):
        version = f"{prefix}-{i}"
        folder = clone_adapter(seeds[i % 2], adapters_dir / version)
        await engine.activate(AdapterSpec(version, str(folder), owner=f"bench{i}"))
        owners.append(f"bench{i}")
    return owners


async def bench_decode(
    engine: InferenceEngine,
    model: Any,
    tokenizer: Any,
    gguf: Path | None,
    tokens: int,
    dense: Any = None,
) -> dict[str, Any]:
    """Engine against `generate` on the same model, on the `dense` (dequantised) model when
    the engine's is packed, and llama.cpp on the GGUF file; and the engine's lean decode step
    against its own transformers-forward step (two interleaved rounds each, averaged, since
    the machines drift)."""
    await engine.generate(request(0, None, 4))  # warm-up
    local = engine if isinstance(engine, LocalEngine) and engine.lean_decode else None
    lean = local is not None
    rates: dict[bool, list[float]] = {True: [], False: []}
    for on in (True, False, True, False) if lean else (False,):
        if local is not None:
            await local.set_lean_decode(on)
        rates[on].append((await timed_batch(engine, [None], tokens)).rate)
    if local is not None:
        await local.set_lean_decode(True)
    forward = statistics.mean(rates[False])
    engine_rate = statistics.mean(rates[True]) if lean else forward
    plain = plain_generate(model, tokenizer, tokens)
    unpacked = plain_generate(dense, tokenizer, tokens) if dense is not None else None
    cpp = llama_cpp_generate(gguf, tokens) if gguf else None
    return {
        "engine_tok_s": engine_rate,
        "engine_forward_step_tok_s": forward if lean else None,
        "lean_vs_forward_step": engine_rate / forward if lean and forward else None,
        "generate_tok_s": plain.rate,
        "engine_vs_generate": engine_rate / plain.rate if plain.rate else None,
        "dense_generate_tok_s": unpacked.rate if unpacked else None,
        "engine_vs_dense_generate": engine_rate / unpacked.rate if unpacked else None,
        "llama_cpp_tok_s": cpp.rate if cpp else None,
        "engine_vs_llama_cpp": (engine_rate / cpp.rate) if cpp and cpp.rate else None,
    }


async def bench_concurrency(
    engine: InferenceEngine, base_model: Any, adapters_dir: Path, counts: list[int], tokens: int
) -> list[dict[str, Any]]:
    owners = await register_adapters(engine, base_model, adapters_dir, max(counts), "conc")
    shared_dir = adapters_dir / "conc-shared"
    if not shared_dir.exists():
        clone_adapter(adapters_dir / "conc-seed-a", shared_dir)
    single = None
    rows = []
    for n in counts:
        await engine.deactivate(None)
        base = await timed_batch(engine, [None] * n, tokens)
        distinct = await timed_batch(engine, owners[:n], tokens)
        peft_loop = forward_step = None
        if isinstance(engine, LocalEngine):  # the same batch through peft's per-adapter loop
            await engine.set_gathered_lora(False)
            peft_loop = await timed_batch(engine, owners[:n], tokens)
            await engine.set_gathered_lora(True)
            if engine.lean_decode:  # and through transformers' forward instead of the lean step
                await engine.set_lean_decode(False)
                forward_step = await timed_batch(engine, owners[:n], tokens)
                await engine.set_lean_decode(True)
        await engine.activate(AdapterSpec(f"conc-shared-{n}", str(shared_dir), owner=None))
        one = await timed_batch(engine, [f"nobody{i}" for i in range(n)], tokens)
        await engine.deactivate(None)
        if single is None:
            single = base.rate
        rows.append(
            {
                "users": n,
                "base_tok_s": base.rate,
                "one_adapter_tok_s": one.rate,
                "distinct_tok_s": distinct.rate,
                "distinct_peft_loop_tok_s": peft_loop.rate if peft_loop else None,
                "distinct_forward_step_tok_s": forward_step.rate if forward_step else None,
                "distinct_vs_single_user": distinct.rate / single if single else None,
                "distinct_cost": 1 - distinct.rate / one.rate if one.rate else None,
            }
        )
        log.info("concurrency %s", rows[-1])
    return rows


async def _load(
    engine: InferenceEngine,
    users: int,
    seconds: float,
    tokens: int,
    record: list[tuple[float, str | None, str, int]],
    stop: asyncio.Event,
) -> int:
    failures = 0

    async def user_loop(i: int) -> None:
        nonlocal failures
        j = 0
        while not stop.is_set():
            start = time.perf_counter()
            try:
                result = await engine.generate(request(i + j, f"swapper{i}", tokens))
                record.append(
                    (
                        time.perf_counter() - start,
                        result.adapter_version,
                        result.text,
                        (i + j) % len(PROMPTS),
                    )
                )
            except Exception:
                failures += 1
            j += 1

    async def timer() -> None:
        await asyncio.sleep(seconds)
        stop.set()

    await asyncio.gather(timer(), *(user_loop(i) for i in range(users)))
    return failures


async def bench_swap(
    engine: InferenceEngine,
    base_model: Any,
    adapters_dir: Path,
    users: int,
    seconds: float,
    tokens: int,
) -> dict[str, Any]:
    """16 users chat while the shared adapter gets a new version every second."""
    seeds = seed_adapters(base_model, adapters_dir, "swap", first_seed=10)
    # reference answer of every weight set for every prompt, served alone
    reference: dict[tuple[int, int], str] = {}
    for s, folder in enumerate(seeds):
        version = f"swap-ref-{s}"
        await engine.activate(
            AdapterSpec(version, str(clone_adapter(folder, adapters_dir / version)), owner=None)
        )
        for p in range(len(PROMPTS)):
            reference[(s, p)] = (await engine.generate(request(p, "ref", tokens))).text
    version_seed: dict[str, int] = {f"swap-ref-{s}": s for s in range(2)}

    quiet: list[tuple[float, str | None, str, int]] = []
    quiet_failures = await _load(engine, users, seconds / 2, tokens, quiet, asyncio.Event())

    busy: list[tuple[float, str | None, str, int]] = []
    stop = asyncio.Event()
    swaps = 0
    swap_errors = 0

    async def swapper() -> None:
        nonlocal swaps, swap_errors
        while not stop.is_set():
            await asyncio.sleep(1.0)
            seed = swaps % 2
            version = f"swap-{swaps}"
            folder = clone_adapter(seeds[seed], adapters_dir / version)
            try:
                await engine.activate(AdapterSpec(version, str(folder), owner=None))
                version_seed[version] = seed
            except Exception:
                swap_errors += 1
            swaps += 1

    failures, _ = await asyncio.gather(_load(engine, users, seconds, tokens, busy, stop), swapper())
    mixed = sum(
        1
        for _, version, text, prompt in busy
        if version is not None and text != reference[(version_seed[version], prompt)]
    )

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    ql = [r[0] for r in quiet]
    bl = [r[0] for r in busy]
    return {
        "users": users,
        "seconds": seconds,
        "swaps": swaps,
        "swap_errors": swap_errors,
        "requests": len(busy),
        "failed": failures + quiet_failures,
        "mismatched_answers": mixed,
        "p50_quiet": statistics.median(ql) if ql else None,
        "p99_quiet": pct(ql, 0.99),
        "p50_swapping": statistics.median(bl) if bl else None,
        "p99_swapping": pct(bl, 0.99),
    }


async def bench_many_adapters(
    engine: InferenceEngine, base_model: Any, adapters_dir: Path, count: int, tokens: int
) -> dict[str, Any]:
    """Register `count` user adapters with a resident cap: memory and cold-load latency.

    Registering past the cap loads nothing (each adapter loads on its first request), so the
    cold adapters are ten from the middle that were never resident; every one of their first
    requests loads it into the slot of the least recently used one.
    """
    rss_before = current_rss_mb()
    start = time.perf_counter()
    owners = await register_adapters(engine, base_model, adapters_dir, count, "many")
    register_s = time.perf_counter() - start
    log.info("registered %d adapters in %.1fs", count, register_s)
    rss_registered = current_rss_mb()
    stats = engine.stats()
    warm_owner = owners[-1]
    await engine.generate(request(0, warm_owner, tokens))
    t = time.perf_counter()
    await engine.generate(request(0, warm_owner, tokens))
    warm = time.perf_counter() - t
    middle = len(owners) // 2
    colds = []
    for owner in owners[middle : middle + 10]:
        t = time.perf_counter()
        await engine.generate(request(0, owner, tokens))
        colds.append(time.perf_counter() - t)
    load_times = getattr(engine, "adapter_load_seconds", None)
    attaches = load_times()[-len(colds) :] if load_times is not None else []
    return {
        "adapters": count,
        "resident": stats.resident_adapters,
        "register_seconds": register_s,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_registered,
        "rss_peak_mb": current_rss_mb(),
        "warm_request_s": warm,
        "cold_request_s": statistics.median(colds),
        "cold_load_overhead_s": statistics.median(colds) - warm,
        "attach_ms": statistics.median(attaches) * 1000 if attaches else None,
    }
