"""The `ouro eval` benchmark: one user corrects N fictional facts; what does the adapter learn?

Columns follow the WISE paper: Rel. (the corrected questions answered exactly), Gen. (a
held-out rewording, never trained on, answered exactly), Loc. (held-out general prompts answered
exactly as the base model does), and their average; all through scope routing, as the engine
serves them. Each user adapter is retrained from scratch on all of the user's corrections, so
the adapter live after the N-th sequential correction is the one trained on the first N: only
the requested counts are trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from learner.dataset import question_set
from learner.gate import evaluate_candidate, general_prompts
from learner.train import train_adapter
from learner.types import TrainConfig, TrainExample


def fact_examples(count: int) -> tuple[list[TrainExample], list[TrainExample]]:
    """(training examples, the same corrections with only their held-out rewording) for N facts."""
    facts = question_set()["facts"]
    if not 1 <= count <= len(facts):
        raise ValueError(f"count must be between 1 and {len(facts)}, got {count}")
    train, held = [], []
    for i, fact in enumerate(facts[:count]):
        prompt = [{"role": "user", "content": fact["question"]}]
        train.append(TrainExample(prompt, fact["answer"], None, tuple(fact["rewordings"]), i))
        held.append(TrainExample(prompt, fact["answer"], None, (fact["heldout"],), i))
    return train, held


def run_eval(
    model: Any,
    tokenizer: Any,
    counts: Sequence[int] = (1, 10, 100),
    *,
    work_dir: str | Path,
    config: TrainConfig | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train and gate one adapter per count; one row per count (see format_table)."""
    config = config or TrainConfig()
    work = Path(work_dir)
    cache = Path(cache_dir) if cache_dir is not None else work / "cache"
    rows = []
    for count in counts:
        started = time.monotonic()
        train, held = fact_examples(count)
        out = work / f"eval-{count}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train_adapter(model, tokenizer, train, config, out)
        report = evaluate_candidate(
            model,
            tokenizer,
            out,
            held,
            cache_dir=cache,
            system_prompt=config.system_prompt,
            general=general_prompts(),
        )
        row = {
            "corrections": count,
            "rel": report.uptake,
            "gen": report.generalisation,
            "loc": report.retention,
            "avg": (report.uptake + report.generalisation + report.retention) / 3,
            "steps": result.steps,
            "learned": result.learned,
            "train_seconds": result.seconds,
            "gate_seconds": report.seconds,
            "seconds": time.monotonic() - started,
            "scope_recall": report.scope["recall"],
            "scope_fpr": report.scope["fpr"],
            "adapter_dir": str(out),
        }
        rows.append(row)
        if log is not None:
            log(format_table([row]).splitlines()[-1])
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table in the WISE paper's columns, plus time and steps."""
    lines = [
        "| Corrections | Rel. | Gen. | Loc. | Avg. | Steps | Train s | Gate s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corrections']} | {r['rel']:.2f} | {r['gen']:.2f} | {r['loc']:.2f} | "
            f"{r['avg']:.2f} | {r['steps']} | {r['train_seconds']:.0f} | {r['gate_seconds']:.0f} |"
        )
    return "\n".join(lines)
