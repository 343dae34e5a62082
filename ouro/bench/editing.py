"""`ouro eval`: reliability, generalisation and locality after N corrections by one user.

In the WISE paper's columns (Rel., Gen., Loc.); see learner/evaluate.py for the two modes
(from scratch, sequential) and the groups of facts.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from ouro.settings import Settings


async def run_editing_eval(
    settings: Settings,
    *,
    counts: tuple[int, ...],
    output: str | None,
    groups: int = 1,
    sequential: bool = False,
    first_group: int = 0,
) -> int:
    import asyncio

    from learner.evaluate import check_counts, format_table, run_eval
    from learner.types import LoraShape, TrainConfig
    from model.loading import load_base_model

    try:  # before loading the model
        check_counts(counts, groups, first_group)
    except ValueError as exc:
        print(f"ouro eval: {exc}", file=sys.stderr)
        return 2
    model, tokenizer, source = load_base_model(
        settings.model, device=settings.device, dtype="float32", cache_dir=settings.model_cache_dir
    )
    config = TrainConfig(
        shape=LoraShape(r=settings.lora_r, alpha=settings.lora_alpha),
        learning_rate=settings.learning_rate,
        max_steps=settings.max_train_steps,
        system_prompt=settings.system_prompt,
        notes=settings.adapter_notes,
    )
    work = Path(tempfile.mkdtemp(prefix="ouro-eval-"))
    rows = await asyncio.to_thread(
        run_eval,
        model,
        tokenizer,
        counts,
        work_dir=work,
        config=config,
        cache_dir=settings.data_dir / "gate-cache",
        log=lambda line: print(line, file=sys.stderr, flush=True),
        groups=groups,
        sequential=sequential,
        first_group=first_group,
    )
    flags = f"--counts {','.join(map(str, counts))}" + (f" --groups {groups}" if groups > 1 else "")
    flags += f" --from-group {first_group}" if first_group else ""
    flags += " --sequential" if sequential else ""
    text = (
        f"# Knowledge-editing eval ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"Command: `ouro eval {flags}`; model {source.name}.\n\n" + format_table(rows) + "\n"
    )
    print(text)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    return 0
