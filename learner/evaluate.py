"""The `ouro eval` benchmark: one user corrects N fictional facts; what does the adapter learn?

Columns follow the WISE paper: Rel. (the corrected questions answered exactly), Gen. (a
held-out rewording, never trained on, answered exactly), Loc. (held-out general prompts answered
exactly as the base model does), and their average; all through scope routing, as the engine
serves them.

Two ways to reach the N-th correction:
- *from scratch* (default): one adapter trained on all N at once, as an admin's `/retrain`
  builds it;
- *sequential*: one correction at a time, each version starting from the one before
  (the learner's incremental versions), as corrections arrive in a chat.

Ten held-out rewordings make Gen. move in steps of 0.1, so `groups` repeats the eval on
disjoint sets of facts (group g starts at fact g × max(counts)) and reports their mean too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from learner.dataset import question_set
from learner.gate import evaluate_candidate, general_prompts
from learner.train import train_adapter
from learner.types import TrainConfig, TrainExample, TrainResult

METRICS = ("rel", "gen", "loc", "avg", "steps", "train_seconds", "gate_seconds")


def fact_examples(count: int, start: int = 0) -> tuple[list[TrainExample], list[TrainExample]]:
    """(training examples, the same corrections with only their held-out rewording) for the
    `count` facts from fact number `start` on."""
    facts = question_set()["facts"]
    if not 1 <= count <= len(facts) - start or start < 0:
        raise ValueError(
            f"count must be between 1 and {len(facts) - max(start, 0)} from fact {start}, "
            f"got {count}"
        )
    train, held = [], []
    for i, fact in enumerate(facts[start : start + count], start=start):
        prompt = [{"role": "user", "content": fact["question"]}]
        train.append(TrainExample(prompt, fact["answer"], None, tuple(fact["rewordings"]), i))
        held.append(TrainExample(prompt, fact["answer"], None, (fact["heldout"],), i))
    return train, held


def check_counts(counts: Sequence[int], groups: int, first_group: int = 0) -> list[int]:
    """The counts, sorted and deduplicated; ValueError when the shipped facts cannot hold
    `groups` disjoint sets of the largest, or `first_group` is not one of them."""
    available = len(question_set()["facts"])
    ordered = sorted(set(counts))
    if not ordered or ordered[0] < 1 or ordered[-1] > available:
        raise ValueError(f"counts must be between 1 and {available}")
    if groups < 1:
        raise ValueError("groups must be at least 1")
    if not 0 <= first_group < groups:
        raise ValueError(f"the first group must be between 0 and {groups - 1}")
    if ordered[-1] * groups > available:
        raise ValueError(
            f"{groups} group(s) of {ordered[-1]} corrections need {ordered[-1] * groups} facts, "
            f"which do not fit the {available} shipped"
        )
    return ordered


def run_eval(
    model: Any,
    tokenizer: Any,
    counts: Sequence[int] = (1, 10, 100),
    *,
    work_dir: str | Path,
    config: TrainConfig | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    groups: int = 1,
    sequential: bool = False,
    first_group: int = 0,
) -> list[dict[str, Any]]:
    """One row per (group, count), then one mean row per count when more than one group ran.

    `first_group` skips the groups before it (to finish a run that was stopped); the mean
    rows are then over the groups that ran. Raises ValueError when the question set has too
    few facts for `groups` × max(counts), or `first_group` is not one of the groups.
    """
    config = config or TrainConfig()
    counts = check_counts(counts, groups, first_group)
    work = Path(work_dir)
    cache = Path(cache_dir) if cache_dir is not None else work / "cache"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[dict[str, Any]] = []

    def measure(group: int, count: int, result: TrainResult, out: Path) -> None:
        _, held = fact_examples(count, group * counts[-1])
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
            "group": group,
            "mode": "sequential" if sequential else "scratch",
            "rel": report.uptake,
            "gen": report.generalisation,
            "loc": report.retention,
            "avg": (report.uptake + report.generalisation + report.retention) / 3,
            "steps": result.steps,
            "learned": result.learned,
            "resumed": result.resumed,
            "train_seconds": result.seconds,
            "gate_seconds": report.seconds,
            "scope_recall": report.scope["recall"],
            "scope_fpr": report.scope["fpr"],
            "adapter_dir": str(out),
        }
        rows.append(row)
        if log is not None:
            log(format_table([row]).splitlines()[-1])

    for group in range(first_group, groups):
        first = group * counts[-1]
        if sequential:
            train, _ = fact_examples(counts[-1], first)
            previous: Path | None = None
            for n in range(1, counts[-1] + 1):
                out = work / f"eval-g{group}-seq{n}-{stamp}"
                result = train_adapter(
                    model,
                    tokenizer,
                    train[:n],
                    config,
                    out,
                    start_from=previous,
                    new_ids={n - 1 + first},
                )
                previous = out
                if n in counts:
                    measure(group, n, result, out)
        else:
            for count in counts:
                train, _ = fact_examples(count, first)
                out = work / f"eval-g{group}-{count}-{stamp}"
                measure(group, count, train_adapter(model, tokenizer, train, config, out), out)
    if groups - first_group > 1:
        for count in counts:
            mine = [r for r in rows if r["corrections"] == count]
            mean = {k: sum(r[k] for r in mine) / len(mine) for k in METRICS}
            rows.append({**mine[0], **mean, "group": "mean", "adapter_dir": None})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table in the WISE paper's columns, plus time and steps (of the run that made
    the measured version: in sequential mode, the N-th correction's own run)."""
    lines = [
        "| Corrections | Rel. | Gen. | Loc. | Avg. | Steps | Train s | Gate s | Group | Mode |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corrections']} | {r['rel']:.2f} | {r['gen']:.2f} | {r['loc']:.2f} | "
            f"{r['avg']:.2f} | {r['steps']:.0f} | {r['train_seconds']:.0f} | "
            f"{r['gate_seconds']:.0f} | {r.get('group', 0)} | {r.get('mode', 'scratch')} |"
        )
    return "\n".join(lines)
