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


def first_miss(
    model: Any, items: list[tuple[list[int], list[int]]], *, pad_id: int, chunk: int = 16
) -> int | None:
    """The index of the first item greedy decoding would not reproduce (None: all of them).

    Scores `chunk` items at a time in the given order and stops at the first chunk with a
    miss, so a check that fails is cheap when the likeliest misses come first.
    """
    for start in range(0, len(items), chunk):
        scored = score(model, items[start : start + chunk], pad_id=pad_id, batch_size=chunk)
        for offset, s in enumerate(scored):
            if not s.exact:
                return start + offset
    return None


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
    shared = shared_prefix(input_ids, attention_mask, select)
    if shared < MIN_SHARED_PREFIX:
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return head(hidden[select]).float()
    # Every row starts with the same tokens (the system prompt): run them once, then the rest
    # of each row on top of their keys and values. Same attention, a fraction of the work;
    # gradients flow back through the shared part as through the repeated one.
    first = decoder(input_ids=input_ids[:1, :shared], use_cache=True)
    name = "cache" if "cache" in first else "past_key_values"  # renamed in 5.x, in and out
    past = first[name]
    past.batch_repeat_interleave(input_ids.shape[0])
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    hidden = decoder(
        input_ids=input_ids[:, shared:], attention_mask=mask, use_cache=True, **{name: past}
    ).last_hidden_state
    return head(hidden[select[:, shared:]]).float()


MIN_SHARED_PREFIX = 8  # below this, one plain forward is as cheap


def shared_prefix(input_ids: torch.Tensor, attention_mask: Any, select: torch.Tensor) -> int:
    """How many leading tokens every row has in common (unpadded), up to the first selected
    position of any row (those must be computed per row); 0 for a single row."""
    if input_ids.shape[0] < 2 or not bool(select.any()):
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    if attention_mask is not None:
        same &= attention_mask.bool().all(dim=0)
    run = int(same.long().cumprod(dim=0).sum())
    first_selected = int(select.long().argmax(dim=1)[select.any(dim=1)].min())
    return min(run, first_selected, input_ids.shape[1] - 1)


def perplexity(scored: list[Scored]) -> float:
    tokens = sum(s.tokens for s in scored)
    return math.exp(sum(s.nll for s in scored) / tokens) if tokens else 1.0
