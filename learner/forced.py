"""Teacher-forced answer checks: one batched forward pass instead of token-by-token generation.

If the model's argmax at every answer position (the end-of-turn marker included) is the answer
token, greedy decoding produces exactly that answer and stops; so "learned" and "unchanged"
are decided without generating, which keeps early stopping and the gate cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Scored:
    exact: bool  # greedy decoding would reproduce the completion exactly
    nll: float  # summed negative log-likelihood of the completion tokens
    tokens: int  # completion tokens scored
    accuracy: float  # share of completion tokens that are the argmax


@torch.inference_mode()
def score(
    model: Any, items: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int = 8
) -> list[Scored]:
    """Score (prompt ids, completion ids) pairs under `model` as it is (adapter on or off)."""
    out: list[Scored | None] = [None] * len(items)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            seqs = [items[i][0] + items[i][1] for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(chunk):
                prompt, completion = items[i]
                if not completion:
                    out[i] = Scored(True, 0.0, 0, 1.0)
                    continue
                start_pos = len(prompt) - 1
                pos_logits = logits[row, start_pos : start_pos + len(completion)].float()
                target = torch.tensor(completion, device=pos_logits.device)
                hits = pos_logits.argmax(-1) == target
                nll = torch.nn.functional.cross_entropy(pos_logits, target, reduction="sum")
                out[i] = Scored(
                    bool(hits.all()), float(nll), len(completion), float(hits.float().mean())
                )
    finally:
        model.train(was_training)
    return [s for s in out if s is not None]


def perplexity(scored: list[Scored]) -> float:
    tokens = sum(s.tokens for s in scored)
    return math.exp(sum(s.nll for s in scored) / tokens) if tokens else 1.0
