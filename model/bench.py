"""Throughput check: LocalEngine vs plain `model.generate` on the same model and prompt.

python -m model.bench --cache-dir /tmp/ouro-model-cache --tokens 64 --users 4
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from typing import Any

import torch

from model.engine import LocalEngine
from model.interface import ChatMessage, GenerationRequest, SamplingParams
from model.loading import load_base_model

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
]


def _request(i: int, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("user", QUESTIONS[i % len(QUESTIONS)]),),
        user_key=str(i),
        sampling=SamplingParams(max_new_tokens=tokens),
    )


def plain_generate(model: Any, tokenizer: Any, tokens: int) -> tuple[int, float]:
    """Tokens and seconds for transformers' own greedy generate, one request."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return int(out.shape[1] - ids.shape[1]), time.perf_counter() - began


async def engine_generate(
    model: Any, tokenizer: Any, tokens: int, users: int
) -> list[tuple[int, float]]:
    """(tokens, seconds) for one user alone, then for `users` users at once."""
    runs = []
    with tempfile.TemporaryDirectory() as adapters:
        engine = LocalEngine("bench", adapters_dir=adapters, loaded=(model, tokenizer))
        async with engine:
            for n in (1, users):
                began = time.perf_counter()
                results = await asyncio.gather(
                    *(engine.generate(_request(i, tokens)) for i in range(n))
                )
                runs.append(
                    (sum(r.completion_tokens for r in results), time.perf_counter() - began)
                )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--users", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer, source = load_base_model(
        args.model, cache_dir=args.cache_dir, device="cpu", dtype="float32"
    )
    print(f"{source.name}, torch threads {torch.get_num_threads()}")
    n, s = plain_generate(model, tokenizer, args.tokens)
    print(f"model.generate      1 user : {n} tokens in {s:.2f}s = {n / s:.1f} tok/s")
    (n1, s1), (nb, sb) = asyncio.run(engine_generate(model, tokenizer, args.tokens, args.users))
    print(f"LocalEngine         1 user : {n1} tokens in {s1:.2f}s = {n1 / s1:.1f} tok/s")
    print(f"LocalEngine {args.users:>7} users: {nb} tokens in {sb:.2f}s = {nb / sb:.1f} tok/s")
    n, s = plain_generate(model, tokenizer, args.tokens)
    print(f"model.generate again 1 user: {n} tokens in {s:.2f}s = {n / s:.1f} tok/s")


if __name__ == "__main__":
    main()
