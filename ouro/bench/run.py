"""`ouro bench`: run the benchmarks and print one markdown report."""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ouro.settings import Settings

log = logging.getLogger(__name__)

ALL = ("decode", "concurrency", "swap", "adapters", "live")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
    )


async def run_benchmarks(
    settings: Settings, *, which: list[str], output: str | None, quick: bool
) -> int:
    from model.engine import LocalEngine
    from model.loading import BUNDLED_GGUF, load_base_model, resolve_model
    from ouro.bench import engine_bench as eb

    chosen = ALL if "all" in which else tuple(w for w in which if w in ALL)
    unknown = [w for w in which if w not in ALL and w != "all"]
    if unknown:
        print(
            f"ouro bench: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}",
            file=sys.stderr,
        )
        return 2
    tokens = 24 if quick else 64
    counts = [1, 4] if quick else [1, 4, 16, 32]
    report = [
        f"# Benchmark run ({time.strftime('%Y-%m-%d %H:%M')})\n",
        f"Command: `ouro bench {' '.join(which)}{' --quick' if quick else ''}` on {machine()}.\n",
    ]
    workdir = Path(tempfile.mkdtemp(prefix="ouro-bench-"))
    adapters_dir = workdir / "adapters"
    adapters_dir.mkdir()
    base_model, tokenizer, source = load_base_model(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir,
    )
    engine = LocalEngine(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir,
        adapters_dir=adapters_dir,
        max_batch_size=max(32, settings.max_batch_size),
        max_resident_adapters=settings.max_resident_adapters,
    )
    async with engine:
        if "decode" in chosen:
            gguf = Path(resolve_model(settings.model).path) / BUNDLED_GGUF
            row = await eb.bench_decode(
                engine, base_model, tokenizer, gguf if gguf.exists() else None, tokens
            )
            report += ["\n## 1. Single-user decode\n\n", table([row])]
        if "concurrency" in chosen:
            rows = await eb.bench_concurrency(engine, base_model, adapters_dir, counts, tokens)
            report += ["\n## 2. Aggregate throughput by concurrent users\n\n", table(rows)]
        if "swap" in chosen:
            row = await eb.bench_swap(
                engine,
                base_model,
                adapters_dir,
                16 if not quick else 4,
                60.0 if not quick else 6.0,
                16,
            )
            report += ["\n## 3. Hot swap under load\n\n", table([row])]
    if "adapters" in chosen:
        small = LocalEngine(
            model=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.model_cache_dir,
            adapters_dir=adapters_dir,
            max_batch_size=settings.max_batch_size,
            max_resident_adapters=16,
        )
        async with small:
            row = await eb.bench_many_adapters(
                small, base_model, adapters_dir, 100 if quick else 1000, 8
            )
        report += ["\n## 4. Many registered adapters (resident cap 16)\n\n", table([row])]
    if "live" in chosen:
        from ouro.bench.live import bench_correction_to_live

        rows = await bench_correction_to_live(settings, workdir, [1, 5] if quick else [1, 5, 20])
        report += ["\n## 5. Correction to live\n\n", table(rows)]
    text = "".join(report)
    print(text)
    if output:
        Path(output).write_text(text, encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    del source
    return 0
