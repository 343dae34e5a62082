"""Records passed between the learner's steps (dataset -> train -> gate) and its operator.

Frozen dataclasses: a job builds them once and hands them on; nothing mutates them in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TrainExample:
    """One correction to learn."""

    prompt: list[dict[str, str]]  # chat messages ending with the user question (no system message)
    answer: str  # the corrected answer (the target)
    rejected: str | None = None  # the original (wrong) answer, for DPO
    rewordings: tuple[str, ...] = ()  # other phrasings of the question (same answer)
    correction_id: int | None = None

    @property
    def question(self) -> str:
        """The last user turn: what routing embeds and what rewordings replace."""
        for turn in reversed(self.prompt):
            if turn.get("role") == "user":
                return turn.get("content", "")
        return ""


@dataclass(frozen=True)
class LoraShape:
    """Fixed across runs so a new version can replace an old one in place (peft hotswap)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    first_layer: int = 0  # LoRA on decoder layers from this one up (negative: from the end)
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


@dataclass(frozen=True)
class TrainConfig:
    shape: LoraShape = LoraShape()
    learning_rate: float = 1e-3
    max_steps: int = 80
    method: Literal["sft", "dpo"] = "sft"
    system_prompt: str = ""
    seed: int = 0
    # train and serve each correction with its note beside the question (model.scope)
    notes: bool = True


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str  # adapter_model.safetensors, adapter_config.json, scope.safetensors
    steps: int
    losses: list[float]
    seconds: float
    learned: bool  # early-stop criterion met: every correction answered exactly (teacher-forced)
    scope: dict[str, float]  # threshold, recall, fpr, auc, layer (see learner.scope_fit)
    resumed: bool = False  # started from the live version's weights (see train_adapter)
    # seconds per phase: scope (fit), setup (LoRA, data, trainer), steps (forward/backward),
    # checks (early-stop exactness), save (write and publish the folder)
    phases: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateReport:
    uptake: float  # share of corrections answered exactly on the original questions
    generalisation: float  # ... on held-out rewordings (none: 1.0 when there are none)
    retention: float  # share of held-out prompts answered exactly as the reference did, routed
    perplexity: float  # held-out perplexity on reference answers through routing
    scope: dict[str, float]
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed, or ["ok"]
    seconds: float = 0.0
