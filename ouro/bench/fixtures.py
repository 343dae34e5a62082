"""Things the benchmarks need: synthetic adapters, prompts, memory readings."""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path
from typing import Any

import torch

from model.scope import Scope

PROMPTS = [
    "Write a short paragraph about the sea.",
    "Explain what a computer does, in simple words.",
    "Tell me a story about a brave little fox.",
    "Describe your favourite season and why.",
    "What makes a good friend? Explain at length.",
    "Write a letter to a future version of yourself.",
    "Describe a busy city street in the morning.",
    "Explain how plants grow from seeds.",
]

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(
    model: Any, folder: Path, *, seed: int, r: int = 16, alpha: int = 32, scale: float = 0.05
) -> Path:
    """A LoRA of the learner's fixed shape with small random weights and a scope that admits all.

    The weights are random (not zero) so that every adapter really changes the computation,
    as a trained one does; the scope threshold of -1 accepts every request.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(TARGET_MODULES), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    try:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
        folder.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        hidden = int(model.config.hidden_size)
        Scope.from_embeddings(
            torch.randn(1, hidden), torch.zeros(hidden), threshold=-1.0, layer=1
        ).save(folder)
    finally:
        peft_model.unload()
    return folder


def clone_adapter(source: Path, folder: Path) -> Path:
    """Another version with the same weights, hard-linked so 1,000 adapters fit on any disk."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        target = folder / item.name
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)
    return folder


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()
