"""`ouro bench`: run the benchmarks and print one markdown report, section by section.

Each section is printed, and the `--output` file rewritten, as soon as it is measured: a long
run that is interrupted keeps everything it finished.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
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


class Report:
    """The markdown report so far: printed and saved one section at a time."""

    def __init__(self, header: str, output: str | None) -> None:
        self.parts = [header]
        self.output = Path(output) if output else None
        print(header, end="", flush=True)
        self._save()

    def add(self, title: str, body: str) -> None:
        section = f"\n## {title}\n\n{body}"
        self.parts.append(section)
        print(section, end="", flush=True)
        self._save()

    def _save(self) -> None:
        if self.output is not None:
            self.output.write_text("".join(self.parts), encoding="utf-8")


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
    report = Report(
        f"# Benchmark run ({time.strftime('%Y-%m-%d %H:%M')})\n"
        f"Command: `ouro bench {' '.join(which)}{' --quick' if quick else ''}` on {machine()}.\n",
        output,
    )
    workdir = Path(tempfile.mkdtemp(prefix="ouro-bench-"))
    adapters_dir = workdir / "adapters"
    adapters_dir.mkdir()
    base_model, tokenizer, source = load_base_model(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir,
        packed=settings.packed_weights,
    )
    engine = LocalEngine(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir,
        adapters_dir=adapters_dir,
        max_batch_size=max(32, settings.max_batch_size),
        max_resident_adapters=settings.max_resident_adapters,
        packed=settings.packed_weights,
    )
    async with engine:
        if "decode" in chosen:
            gguf = Path(resolve_model(settings.model).path) / BUNDLED_GGUF
            dense = None
            if source.gguf_file and settings.packed_weights:  # the dequantised model, to compare
                dense, _, _ = load_base_model(
                    settings.model,
                    device=settings.device,
                    dtype=settings.dtype,
                    cache_dir=settings.model_cache_dir,
                    packed=False,
                )
            row = await eb.bench_decode(
                engine, base_model, tokenizer, gguf if gguf.exists() else None, tokens, dense
            )
            del dense
            report.add("1. Single-user decode", table([row]))
        if "concurrency" in chosen:
            rows = await eb.bench_concurrency(engine, base_model, adapters_dir, counts, tokens)
            report.add("2. Aggregate throughput by concurrent users", table(rows))
        if "swap" in chosen:
            row = await eb.bench_swap(
                engine,
                base_model,
                adapters_dir,
                16 if not quick else 4,
                60.0 if not quick else 6.0,
                16,
            )
            report.add("3. Hot swap under load", table([row]))
    if "adapters" in chosen:
        small = LocalEngine(
            model=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.model_cache_dir,
            adapters_dir=adapters_dir,
            max_batch_size=settings.max_batch_size,
            max_resident_adapters=16,
            packed=settings.packed_weights,
        )
        async with small:
            row = await eb.bench_many_adapters(
                small, base_model, adapters_dir, 100 if quick else 1000, 8
            )
        report.add("4. Many registered adapters (resident cap 16)", table([row]))
    if "live" in chosen:
        from ouro.bench.live import bench_correction_to_live

        runs = [("batch", 1), ("batch", 5), ("sequential", 5)]
        if not quick:
            runs += [("batch", 20), ("sequential", 10)]
        rows = await bench_correction_to_live(settings, workdir, runs)
        report.add("5. Correction to live", table(rows))
    if output:
        print(f"wrote {output}", file=sys.stderr)
    del source
    shutil.rmtree(workdir, ignore_errors=True)  # adapters and per-run data folders: GBs
    return 0
