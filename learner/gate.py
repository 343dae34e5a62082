"""Decide whether a candidate adapter may go live: learned, generalises, and changes nothing else.

Everything is measured *through scope routing*, the rule the engine applies: a prompt gets the
adapter only when its question is inside the candidate's scope, otherwise the base model.
Answers are checked teacher-forced (learner.forced), so the gate costs a few batched forward
passes; only the base model's reference answers need generation, and those are cached per
model, system prompt and length under `cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learner.dataset import encode, framed, question_set
from learner.forced import Scored, perplexity, score
from learner.types import GateReport, TrainExample
from model.packed import numerics
from model.scope import Scope, embed_questions, fact_note

REFERENCE_TOKENS = 32  # base answers are compared on their first 32 tokens


@dataclass(frozen=True)
class GateFloors:
    min_uptake: float = 0.8
    min_generalisation: float = 0.0
    min_retention: float = 0.95
    # routed / base perplexity on held-out answers; one general prompt that falls inside the
    # scope moves the mean by several percent, and retention already guards locality
    max_perplexity_ratio: float = 1.10
    tolerance: float = 0.0  # how much worse than the active version's report is still accepted


def general_prompts() -> list[str]:
    """The shipped held-out general prompts (never used to fit scopes)."""
    return list(question_set()["general"]["heldout"])


def route(model: Any, tokenizer: Any, scope: Scope, questions: Sequence[str]) -> torch.Tensor:
    """The engine's rule: which questions the adapter is applied to -> bool [len(questions)]."""
    return torch.tensor(routes(model, tokenizer, scope, questions)[0], dtype=torch.bool)


def routes(
    model: Any, tokenizer: Any, scope: Scope, questions: Sequence[str]
) -> tuple[list[bool], list[str | None]]:
    """(inside, note) per question, as the engine routes them: the note of the nearest key
    for questions inside a scope that has notes, else None."""
    if not questions:
        return [], []
    inside, nearest = scope.nearest(
        embed_questions(model, tokenizer, list(questions), layer=scope.layer)
    )
    flags = [bool(x) for x in inside.tolist()]
    nearest_keys = nearest.tolist()
    notes = [scope.note(j) if ok else None for ok, j in zip(flags, nearest_keys, strict=True)]
    return flags, notes


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {int(eos)}


def prompts_key(model: Any, tokenizer: Any, system_prompt: str, notes: bool) -> str:
    """Identifies the prompts a version's corrections are checked under: the base model and
    its template, the system prompt, and whether (and how) notes are written into it."""
    parts = [_model_key(model, tokenizer, system_prompt), str(notes), fact_note("{q}", "{a}")]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _model_key(model: Any, tokenizer: Any, system_prompt: str) -> str:
    """Identifies (weights, template, system prompt): a changed model never reuses references."""
    first = next(model.parameters())
    parts = [
        model.config.to_json_string(),
        Path(str(getattr(model.config, "name_or_path", ""))).name,  # not where it was loaded from
        repr(float(first.detach().float().sum())),
        str(getattr(tokenizer, "chat_template", "")),
        system_prompt,
        str(REFERENCE_TOKENS),
        numerics(model),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


@torch.inference_mode()
def _generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], batch_size: int = 16
) -> list[list[int]]:
    """Greedy answers (ids up to and including the end-of-turn token) for tokenised prompts."""
    pad, eos, device = (
        _pad_id(tokenizer),
        _eos_ids(model, tokenizer),
        next(model.parameters()).device,
    )
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=REFERENCE_TOKENS,
            do_sample=False,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for row in gen[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def reference_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, system_prompt: str, cache_dir: str | Path
) -> dict[str, dict[str, Any]]:
    """Base-model answers and their base scores, {prompt: {"ids", "nll", "tokens"}}; cached.

    Call with the plain base model (no adapter attached).
    """
    path = Path(cache_dir) / f"references-{_model_key(model, tokenizer, system_prompt)}.json"
    cached: dict[str, dict[str, Any]] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}  # a broken cache is regenerated, never trusted
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:
        encoded = [_prompt_ids(tokenizer, p, system_prompt) for p in missing]
        answers = _generate(model, tokenizer, encoded)
        scored = score(model, list(zip(encoded, answers, strict=True)), pad_id=_pad_id(tokenizer))
        for p, ids, s in zip(missing, answers, scored, strict=True):
            cached[p] = {"ids": ids, "nll": s.nll, "tokens": s.tokens}
        _write_json(path, cached)
    return {p: cached[p] for p in prompts}


def _prompt_ids(
    tokenizer: Any, question: str, system_prompt: str, note: str | None = None
) -> list[int]:
    messages = framed([{"role": "user", "content": question}], system_prompt, note)
    ids = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(ids, add_special_tokens=False)["input_ids"])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


@contextmanager
def candidate(model: Any, adapter_dir: str | Path) -> Iterator[Any]:
    """The base model with the candidate LoRA attached; removed again on exit."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(model):
                delattr(model, attr)


def routed_scores(
    peft_model: Any, items: list[tuple[list[int], list[int]]], inside: list[bool], pad_id: int
) -> list[Scored]:
    """Score each item with the adapter when `inside`, else with the base model."""
    results: list[Scored | None] = [None] * len(items)
    for use_adapter in (True, False):
        idx = [i for i, flag in enumerate(inside) if flag == use_adapter]
        if not idx:
            continue
        chunk = [items[i] for i in idx]
        if use_adapter:
            scored = score(peft_model, chunk, pad_id=pad_id)
        else:
            with peft_model.disable_adapter():
                scored = score(peft_model, chunk, pad_id=pad_id)
        for i, s in zip(idx, scored, strict=True):
            results[i] = s
    return [s for s in results if s is not None]


def evaluate_candidate(
    model: Any,
    tokenizer: Any,
    candidate_dir: str | Path,
    examples: Sequence[TrainExample],
    *,
    cache_dir: str | Path,
    system_prompt: str = "",
    floors: GateFloors | None = None,
    active: GateReport | None = None,
    general: Sequence[str] | None = None,
    other_questions: Sequence[str] = (),
) -> GateReport:
    """Measure `candidate_dir` on `examples` (uptake: the original conversations; generalisation:
    their rewordings) and on held-out prompts (retention, perplexity), all through routing.

    `model` is the plain base model; `general` defaults to `general_prompts()`;
    `other_questions` adds e.g. other users' questions to the retention set.
    """
    started = time.monotonic()
    floors = floors or GateFloors()
    if not examples:
        raise ValueError("the gate needs the corrections the candidate was trained on")
    scope = Scope.load(candidate_dir)
    pad = _pad_id(tokenizer)
    held_out = list(
        dict.fromkeys([*(general if general is not None else general_prompts()), *other_questions])
    )
    refs = reference_answers(
        model, tokenizer, held_out, system_prompt=system_prompt, cache_dir=cache_dir
    )

    rewordings = [(r, ex.answer) for ex in examples for r in ex.rewordings]
    questions = [ex.question for ex in examples] + [r for r, _ in rewordings] + held_out
    inside, notes = routes(model, tokenizer, scope, questions)
    n_orig, n_rew = len(examples), len(rewordings)
    in_orig, in_rew, in_held = (
        inside[:n_orig],
        inside[n_orig : n_orig + n_rew],
        inside[n_orig + n_rew :],
    )
    originals = [
        encode(tokenizer, framed(ex.prompt, system_prompt, note), ex.answer)
        for ex, note in zip(examples, notes[:n_orig], strict=True)
    ]
    reworded = [
        encode(tokenizer, framed([{"role": "user", "content": r}], system_prompt, note), a)
        for (r, a), note in zip(rewordings, notes[n_orig : n_orig + n_rew], strict=True)
    ]
    retained_items = [
        (_prompt_ids(tokenizer, p, system_prompt, note), refs[p]["ids"])
        for p, note in zip(held_out, notes[n_orig + n_rew :], strict=True)
    ]

    with candidate(model, candidate_dir) as peft_model:
        up = routed_scores(peft_model, originals, in_orig, pad)
        gen = routed_scores(peft_model, reworded, in_rew, pad)
        held_idx = [i for i, flag in enumerate(in_held) if flag]
        held_scored = score(peft_model, [retained_items[i] for i in held_idx], pad_id=pad)

    changed = {i for i, s in zip(held_idx, held_scored, strict=True) if not s.exact}
    routed = [Scored(True, refs[p]["nll"], refs[p]["tokens"], 1.0) for p in held_out]
    for i, s in zip(held_idx, held_scored, strict=True):
        routed[i] = s
    base_ppl = perplexity([Scored(True, refs[p]["nll"], refs[p]["tokens"], 1.0) for p in held_out])
    report_scope = {
        "threshold": scope.threshold,
        "layer": float(scope.layer),
        "recall": _share(in_rew) if in_rew else 1.0,
        "original_recall": _share(in_orig),
        "fpr": _share(in_held) if in_held else 0.0,
        "base_perplexity": base_ppl,
    }
    uptake = _share([s.exact for s in up])
    generalisation = _share([s.exact for s in gen]) if gen else 1.0
    retention = 1.0 - len(changed) / len(held_out) if held_out else 1.0
    ppl = perplexity(routed)
    reasons = _judge(uptake, generalisation, retention, ppl / base_ppl, floors, active)
    return GateReport(
        uptake=uptake,
        generalisation=generalisation,
        retention=retention,
        perplexity=ppl,
        scope=report_scope,
        passed=not reasons,
        reasons=reasons or ["ok"],
        seconds=time.monotonic() - started,
    )


def _share(flags: Sequence[bool]) -> float:
    return sum(map(bool, flags)) / len(flags) if flags else 0.0


def _judge(
    uptake: float,
    generalisation: float,
    retention: float,
    ppl_ratio: float,
    floors: GateFloors,
    active: GateReport | None,
) -> list[str]:
    reasons = []
    if uptake < floors.min_uptake:
        reasons.append(f"uptake {uptake:.2f} below {floors.min_uptake:.2f}")
    if generalisation < floors.min_generalisation:
        reasons.append(f"generalisation {generalisation:.2f} below {floors.min_generalisation:.2f}")
    if retention < floors.min_retention:
        reasons.append(f"retention {retention:.2f} below {floors.min_retention:.2f}")
    if ppl_ratio > floors.max_perplexity_ratio:
        reasons.append(
            f"perplexity {ppl_ratio:.3f}x base, above {floors.max_perplexity_ratio:.3f}x"
        )
    if active is not None:
        for name, new, old in (
            ("uptake", uptake, active.uptake),
            ("generalisation", generalisation, active.generalisation),
            ("retention", retention, active.retention),
        ):
            if new < old - floors.tolerance:
                reasons.append(f"{name} {new:.2f} worse than the active version's {old:.2f}")
    return reasons
