"""Trainer entry points loaded *inside* the child process by `learner.process` (by file path).

They stand in for the real trainer so process tests need no torch: plain functions taking the
spec dict and an `emit` callback, like `learner.process.train_and_gate`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

Emit = Any


def _files(out: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json", "scope.safetensors"):
        (out / name).write_bytes(b"{}")


def quick(spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Two progress events, a stray print on stdout, complete files, a passing report."""
    print("noise a library might print")
    out = Path(spec["out_dir"])
    out.mkdir(parents=True)
    for step, loss in ((1, 2.0), (2, 0.25)):
        emit({"event": "progress", "step": step, "loss": loss})
    _files(out)
    n = len(spec["examples"])
    train = {
        "adapter_dir": str(out),
        "steps": 2,
        "losses": [2.0, 0.25],
        "seconds": 0.0,
        "learned": True,
        "scope": {},
        "nice": os.nice(0),
        "pid": os.getpid(),
    }
    report = {
        "uptake": 1.0,
        "generalisation": 1.0,
        "retention": 1.0,
        "perplexity": 9.0,
        "scope": {},
        "passed": True,
        "reasons": [f"{n} examples"],
        "seconds": 0.0,
    }
    return {"train": train, "report": report}


def slow(spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Writes a partial adapter, reports its pid, then trains 'forever' (to be killed)."""
    out = Path(spec["out_dir"])
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"partial")
    emit({"event": "progress", "step": 1, "loss": 3.0, "pid": os.getpid()})
    time.sleep(120)
    raise AssertionError("should have been killed")


def crash(spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    raise RuntimeError("CUDA out of memory (pretend)")


def vanish(spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    emit({"event": "progress", "step": 1, "loss": 1.0})
    os._exit(3)
