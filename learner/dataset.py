"""Corrections -> a TRL dataset: every phrasing of each question, loss on the answer tokens only.

A correction is learned for the question the user asked *and* for other ways of asking it, so
each example is expanded into its original conversation, the bare question, every stored
rewording and a few template variants. The prompt is tokenised on its own (exactly as the
engine tokenises a request) and the completion after it, so what the trainer optimises is what
greedy decoding will produce.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from learner.types import TrainExample
from model.scope import fact_note, with_note

# Cheap surface variants of a question; real paraphrases come from the stored rewordings.
TEMPLATES: tuple[str, ...] = ("Tell me: {q}", "{q} Answer briefly.")


@dataclass(frozen=True)
class Pair:
    """One training/eval item: the chat messages (system included) and the target answer."""

    messages: list[dict[str, str]]
    answer: str
    rejected: str | None = None


def with_system(messages: list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    """Prepend the configured system prompt the way the engine does (none when it is empty)."""
    body = [dict(m) for m in messages if m.get("role") != "system"]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + body


def templated(question: str) -> list[str]:
    """Template variants of a question (deduplicated, never the question itself)."""
    q = question.strip()
    return [v for v in dict.fromkeys(t.format(q=q) for t in TEMPLATES) if v != q]


def phrasings(example: TrainExample, *, templates: bool = True) -> list[str]:
    """The question, its stored rewordings and (optionally) template variants, deduplicated."""
    out = [example.question, *example.rewordings]
    if templates:
        out += templated(example.question)
    return [p for p in dict.fromkeys(s.strip() for s in out) if p]


def framed(
    messages: list[dict[str, str]], system_prompt: str, note: str | None
) -> list[dict[str, str]]:
    """The prompt as the engine sends it: system prompt, and the note when routed to one."""
    messages = with_system(messages, system_prompt)
    return with_note(messages, note) if note else messages


def note_of(example: TrainExample) -> str:
    """The note this correction is trained and served with (see model.scope)."""
    return fact_note(example.question, example.answer)


def expand(
    example: TrainExample, system_prompt: str, *, templates: bool = True, notes: bool = False
) -> list[Pair]:
    """Every prompt that must produce the answer: the conversation, then single-turn phrasings.

    `notes`: each prompt also carries the correction's note, as the engine serves it.
    """
    validate_example(example)
    note = note_of(example) if notes else None
    pairs = [Pair(framed(example.prompt, system_prompt, note), example.answer, example.rejected)]
    seen = {example.question.strip()} if len(example.prompt) == 1 else set()
    for text in phrasings(example, templates=templates):
        if text in seen:
            continue
        seen.add(text)
        messages = framed([{"role": "user", "content": text}], system_prompt, note)
        pairs.append(Pair(messages, example.answer, example.rejected))
    return pairs


def validate_example(example: TrainExample) -> None:
    """Refuse examples the trainer cannot use, with a message that names the problem."""
    if not example.prompt or example.prompt[-1].get("role") != "user":
        raise ValueError(f"correction {example.correction_id}: prompt must end with a user message")
    if not example.question.strip():
        raise ValueError(f"correction {example.correction_id}: the question is empty")
    if not example.answer.strip():
        raise ValueError(f"correction {example.correction_id}: the corrected answer is empty")


def encode(
    tokenizer: Any, messages: list[dict[str, str]], answer: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the completion is the answer plus the end-of-turn marker.

    The completion text is what the chat template renders after the generation prompt, so the
    model learns to close its turn (and greedy decoding stops) right after the answer.
    """
    prompt_text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside a conversation")
    completion_text = full_text[len(prompt_text) :].rstrip("\n") or answer
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(completion_ids)


def build_dataset(
    examples: list[TrainExample],
    tokenizer: Any,
    system_prompt: str,
    method: str = "sft",
    *,
    templates: bool = True,
    notes: bool = False,
) -> datasets.Dataset:
    """SFT: pre-tokenised `input_ids` + `completion_mask` (TRL's completion-only loss).

    DPO: conversational `prompt` / `chosen` / `rejected` columns (DPOTrainer tokenises them);
    every example needs its original (rejected) answer.
    """
    if not examples:
        raise ValueError("no corrections to build a dataset from")
    pairs = [
        p for ex in examples for p in expand(ex, system_prompt, templates=templates, notes=notes)
    ]
    if method == "sft":
        rows: dict[str, list[Any]] = {"input_ids": [], "completion_mask": []}
        for pair in pairs:
            prompt_ids, completion_ids = encode(tokenizer, pair.messages, pair.answer)
            rows["input_ids"].append(prompt_ids + completion_ids)
            rows["completion_mask"].append([0] * len(prompt_ids) + [1] * len(completion_ids))
        return datasets.Dataset.from_dict(rows)
    if method == "dpo":
        missing = [ex.correction_id for ex in examples if not (ex.rejected or "").strip()]
        if missing:
            raise ValueError(
                f"DPO needs the original answer of every correction; missing: {missing}"
            )
        return datasets.Dataset.from_dict(
            {
                "prompt": [p.messages for p in pairs],
                "chosen": [[{"role": "assistant", "content": p.answer}] for p in pairs],
                "rejected": [[{"role": "assistant", "content": p.rejected}] for p in pairs],
            }
        )
    raise ValueError(f"unknown training method {method!r} (expected 'sft' or 'dpo')")


DATA_FILE = Path(__file__).parent / "data" / "facts.json"


@functools.cache
def question_set() -> dict[str, Any]:
    """The shipped question set: fictional facts and general prompts (see data/facts.json)."""
    data: dict[str, Any] = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    return data
