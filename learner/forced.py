"""Teacher-forced answer checks: one batched forward pass instead of token-by-token generation.

If the model's argmax at every answer position (the end-of-turn marker included) is the answer
token, greedy decoding produces exactly that answer and stops; so "learned" and "unchanged"
are decided without generating, which keeps early stopping and the gate cheap. Only the
answer positions go through the LM head (49k-token vocabulary on the bundled model): projecting
every prompt position as well cost more than the rest of the forward.
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
            spans = [(len(items[i][0]) - 1, len(items[i][1])) for i in chunk]
            answers = _answer_logits(model, ids.to(device), mask.to(device), spans)
            for row, i in enumerate(chunk):
                completion = items[i][1]
                if not completion:
                    out[i] = Scored(True, 0.0, 0, 1.0)
                    continue
                pos_logits = answers[row]
                target = torch.tensor(completion, device=pos_logits.device)
                hits = pos_logits.argmax(-1) == target
                nll = torch.nn.functional.cross_entropy(pos_logits, target, reduction="sum")
                out[i] = Scored(
                    bool(hits.all()), float(nll), len(completion), float(hits.float().mean())
                )
    finally:
        model.train(was_training)
    return [s for s in out if s is not None]


def _answer_logits(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, spans: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """Per row, fp32 logits at positions start .. start + count - 1 (predicting the answer)."""
    select = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for row, (start, count) in enumerate(spans):
        select[row, start : start + count] = True
    return list(logits_at(model, ids, mask, select).split([n for _, n in spans]))


def logits_at(
    model: Any, input_ids: torch.Tensor, attention_mask: Any, select: torch.Tensor
) -> torch.Tensor:
    """fp32 logits at the positions where `select` ([batch, length], bool) is True, row by row.

    The decoder runs once and the LM head only on those positions (the head is most of the
    forward on a 49k-token vocabulary). Models whose head is not a plain projection of the last
    hidden state (logit scaling or soft-capping) take the full forward. No gradient mode is
    set here: the trainer's loss uses it too.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    plain = (
        getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
    )
    decoder = inner.get_decoder() if plain and hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings() if decoder is not None else None
    if decoder is None or head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[select].float()
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return head(hidden[select]).float()


def perplexity(scored: list[Scored]) -> float:
    tokens = sum(s.tokens for s in scored)
    return math.exp(sum(s.nll for s in scored) / tokens) if tokens else 1.0
