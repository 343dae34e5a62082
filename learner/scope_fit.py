"""Fit an adapter's scope: which questions it may answer (see model.scope for the routing rule).

Measured on the bundled SmolLM2-135M with the shipped question set (held-out rewordings vs
held-out general prompts, 10 corrections, mean of 3 draws):

| keys, layer, centre                         | AUC   | recall @ fitted threshold | fpr   |
|---------------------------------------------|-------|---------------------------|-------|
| one per phrasing, layer 6, no centre        | 0.84  | 0.00 (all cosines ~1)     | 0.00  |
| one per phrasing, layer 6, general mean     | 0.94  | 0.73                      | 0.021 |
| one per phrasing, layer 10, general mean    | 0.997 | 0.87                      | 0.007 |
| one per correction (mean), layer 10, g.mean | 0.995 | 0.97                      | 0.014 |

and then, with the fitting rule below (threshold 0.02 above the highest of the 60 fitting
prompts), held-out rewordings in scope / held-out general prompts in scope, mean of 5 draws:

| one key per correction           | 10 corrections | 100 corrections |
|----------------------------------|----------------|-----------------|
| layer 10, centred                | 0.88 / 0.008   | 0.85 / 0.063    |
| layer 10, centred and scaled     | 0.92 / 0.008   | 0.83 / 0.054    |
| layer 8, centred and scaled      | 0.94 / 0.004   | 0.81 / 0.046    |
| layer 12, centred and scaled     | 0.62 / 0.000   | 0.63 / 0.004    |

Layers past ~11 are dominated by a massive activation on the first token (mean pooling then
mostly encodes length), so the default layer is a quarter of the depth: 8 of 30 on SmolLM2.
Centring on the general-prompt mean removes the shared direction that makes every raw cosine
close to 1, and dividing each dimension by its spread over the general prompts (a diagonal
Mahalanobis distance) stops a few high-variance dimensions from deciding every cosine. One
key per correction (the mean of its phrasings' unit vectors) is a smoother target for unseen
rewordings than the individual phrasings (adding those as keys too raises recall by ~0.03
but triples the false positives). The threshold sits just above the highest-scoring general
prompt, so locality comes first; recall is estimated by leaving one phrasing out of its
correction's key.

Which phrasings make a key (session 5, layer 8, centred and scaled, 11 disjoint sets of 10
facts, 110 held-out rewordings; fpr on the 48 held-out general prompts):

| key built from                                 | held-out rewordings in scope | fpr   |
|------------------------------------------------|------------------------------|-------|
| question + 2 rewordings + 2 template variants  | 0.90                         | 0.015 |
| question + 2 rewordings                        | 0.94                         | 0.017 |
| question + 2 template variants (no rewordings) | 0.85                         | 0.015 |
| question alone (no rewordings)                 | 0.76                         | 0.019 |

so the template variants ("Tell me: ...") join a key only when a correction has no stored
rewordings (a correction made in a chat): they pull the mean towards the templates' words.
In 97 % of those held-out rewordings the nearest key is their own correction's, which is what
notes (model.scope) build on.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from learner.dataset import note_of, phrasings, question_set
from learner.types import TrainExample
from model.scope import Scope, embed_questions

MARGIN = 0.02  # threshold above the highest general prompt
SCALE_FLOOR = 1e-3  # added to each dimension's spread, so a constant dimension cannot blow up


def default_layer(model: Any) -> int:
    """A quarter of the depth (8 on SmolLM2's 30 layers): see the tables above."""
    layers = int(getattr(model.config, "num_hidden_layers", 30))
    return max(1, round(layers / 4))


def general_fit_prompts() -> list[str]:
    """The shipped negatives for fitting thresholds (disjoint from the gate's held-out set)."""
    return list(question_set()["general"]["fit"])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def fit_scope(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TrainExample],
    general_prompts: Sequence[str],
    layer: int | None = None,
    *,
    notes: bool = False,
) -> tuple[Scope, dict[str, float]]:
    """Keys from each correction's phrasings; threshold from the general prompts; with
    `notes`, each key carries its correction's note (`learner.dataset.note_of`).

    Returns the scope and {threshold, recall, fpr, auc, layer, keys}: recall is leave-one-
    phrasing-out (how many unseen rewordings would be routed to the adapter), fpr the share of
    general prompts inside the scope (0 by construction of the threshold).
    """
    if not examples:
        raise ValueError("a scope needs at least one correction")
    if not general_prompts:
        raise ValueError("a scope needs general prompts to set its threshold against")
    layer = default_layer(model) if layer is None else int(layer)
    # template variants only stand in for rewordings (see the module docstring)
    groups = [phrasings(ex, templates=not ex.rewordings) for ex in examples]
    flat = [text for group in groups for text in group]
    taught = {text.casefold() for text in flat}
    negatives = [p for p in general_prompts if p.strip().casefold() not in taught]
    if not negatives:
        raise ValueError("every general prompt is one of the corrected questions")
    positives = embed_questions(model, tokenizer, flat, layer=layer)
    sizes = [len(group) for group in groups]
    scope, metrics = fit_from_embeddings(
        positives, sizes, _negatives(model, tokenizer, negatives, layer), layer
    )
    if notes:
        scope.notes = [note_of(ex) for ex in examples]
    return scope, metrics


# The negatives are the same general prompts run after run: a warm trainer embeds them once.
_NEGATIVES: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[str, ...]], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def warm_negatives(model: Any, tokenizer: Any) -> None:
    """Embed the shipped general prompts at the default scope layer ahead of the first fit."""
    _negatives(model, tokenizer, general_fit_prompts(), default_layer(model))


def _negatives(model: Any, tokenizer: Any, prompts: list[str], layer: int) -> torch.Tensor:
    """Embeddings of the general prompts, cached per (base) model object, layer and prompt list.

    Only ever called on the base model (before any LoRA is attached), whose weights a run
    never changes, so the cache stays valid for the life of the model object.
    """
    per_model = _NEGATIVES.setdefault(model, {})
    key = (layer, tuple(prompts))
    if key not in per_model:
        per_model.clear()  # one prompt set at a time is all a trainer uses
        per_model[key] = embed_questions(model, tokenizer, prompts, layer=layer)
    return per_model[key]


def fit_from_embeddings(
    positives: torch.Tensor, sizes: Sequence[int], negatives: torch.Tensor, layer: int
) -> tuple[Scope, dict[str, float]]:
    """The fitting rule on raw embeddings: `positives` holds each correction's phrasings in
    order, `sizes[i]` of them for correction i; `negatives` the general prompts."""
    if not sizes or min(sizes) < 1 or sum(sizes) != positives.shape[0] or negatives.shape[0] == 0:
        raise ValueError("need at least one phrasing per correction and one general prompt")
    center = negatives.float().mean(dim=0)
    scale = None
    if negatives.shape[0] >= 2:  # per-dimension spread of ordinary questions
        scale = negatives.float().std(dim=0) + SCALE_FLOOR
    probe = Scope(keys=torch.empty(0), center=center, threshold=0.0, layer=layer, scale=scale)
    units = probe.project(positives)
    negs = probe.project(negatives)
    spans, start = [], 0
    for size in sizes:
        spans.append((start, start + size))
        start += size
    key_matrix = torch.stack([_unit(units[a:b].mean(dim=0)) for a, b in spans])
    neg_scores = (negs @ key_matrix.T).max(dim=1).values
    threshold = float(neg_scores.max()) + MARGIN
    loo_scores = _leave_one_out(units, spans, key_matrix)
    scope = Scope(keys=key_matrix, center=center, threshold=threshold, layer=layer, scale=scale)
    metrics = {
        "threshold": threshold,
        "recall": float((loo_scores >= threshold).float().mean()) if loo_scores.numel() else 1.0,
        "fpr": float((neg_scores >= threshold).float().mean()),
        "auc": _auc(loo_scores, neg_scores),
        "layer": float(layer),
        "keys": float(len(spans)),
    }
    return scope, metrics


def _leave_one_out(
    units: torch.Tensor, spans: list[tuple[int, int]], keys: torch.Tensor
) -> torch.Tensor:
    """Score each phrasing as routing would if it had not been seen: the max over every key,
    its own correction's key rebuilt without it."""
    out = []
    for i, (a, b) in enumerate(spans):
        if b - a < 2:
            continue
        members = units[a:b]
        scores = (members * _unit(members.sum(dim=0, keepdim=True) - members)).sum(dim=-1)
        others = torch.cat([keys[:i], keys[i + 1 :]])
        if others.numel():
            scores = torch.maximum(scores, (members @ others.T).max(dim=1).values)
        out.append(scores)
    return torch.cat(out) if out else torch.empty(0)
