"""The gate passes a candidate that learned only its corrections and refuses one that forgets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import learner_fixtures
import pytest
import torch

from learner.gate import GateFloors, evaluate_candidate, general_prompts, reference_answers
from learner.train import train_adapter
from learner.types import GateReport, TrainConfig, TrainExample
from model.scope import Scope

tiny = learner_fixtures.tiny

CFG = TrainConfig(learning_rate=1e-2, max_steps=40, system_prompt="sys", seed=1)
CAT = TrainExample(
    prompt=[{"role": "user", "content": "Cat?"}], answer="Pixel.", rewordings=("The cat?",)
)
GENERAL = ["What is the capital of France?", "Hello!", "How many days are in a week?"]


def _gate(model: Any, tok: Any, folder: str, tmp: Path, **kw: Any) -> GateReport:
    return evaluate_candidate(
        model,
        tok,
        folder,
        [CAT],
        cache_dir=tmp / "refs",
        system_prompt="sys",
        general=GENERAL,
        **kw,
    )


def test_good_candidate_passes_and_forgetful_one_is_refused(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = train_adapter(model, tok, [CAT], CFG, tmp_path / "good", general_prompts=GENERAL)
    report = _gate(model, tok, good.adapter_dir, tmp_path)
    assert report.passed, report.reasons
    assert report.uptake == 1.0 and report.retention == 1.0 and report.reasons == ["ok"]
    assert report.scope["fpr"] == 0.0 and report.scope["original_recall"] == 1.0

    # trained to answer every general question wrongly, with a scope that covers everything
    forget = [
        TrainExample(prompt=[{"role": "user", "content": q}], answer="Banana banana.")
        for q in GENERAL
    ]
    bad = train_adapter(model, tok, forget, CFG, tmp_path / "bad", general_prompts=["unrelated"])
    everything = Scope.load(bad.adapter_dir)
    everything.threshold = -1.0
    everything.save(bad.adapter_dir)
    refused = _gate(model, tok, bad.adapter_dir, tmp_path)
    assert not refused.passed
    assert refused.retention < 0.5 and refused.scope["fpr"] == 1.0
    assert any(r.startswith("retention") for r in refused.reasons)
    assert any(r.startswith("perplexity") for r in refused.reasons)
    # the gate attaches and removes the candidate: the base model is as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "peft_config")


def test_never_worse_than_the_active_version(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    short = TrainConfig(learning_rate=1e-2, max_steps=1, system_prompt="sys")
    weak = train_adapter(model, tok, [CAT], short, tmp_path / "weak", general_prompts=GENERAL)
    active = GateReport(1.0, 1.0, 1.0, 1.0, {}, True, ["ok"], 0.0)
    lenient = GateFloors(min_uptake=0.0, min_retention=0.0, max_perplexity_ratio=100.0)
    report = _gate(model, tok, weak.adapter_dir, tmp_path, floors=lenient, active=active)
    assert report.uptake < 1.0  # one step does not teach it
    assert not report.passed
    assert any("worse than the active" in r for r in report.reasons)
    alone = _gate(model, tok, weak.adapter_dir, tmp_path, floors=lenient)
    assert alone.passed


def test_reference_answers_are_cached_per_model(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    refs = reference_answers(model, tok, GENERAL, system_prompt="sys", cache_dir=tmp_path)
    files = list(tmp_path.glob("references-*.json"))
    assert len(files) == 1 and set(refs) == set(GENERAL)
    assert all(r["tokens"] == len(r["ids"]) > 0 for r in refs.values())
    stamp = files[0].stat().st_mtime_ns
    assert reference_answers(model, tok, GENERAL, system_prompt="sys", cache_dir=tmp_path) == refs
    assert files[0].stat().st_mtime_ns == stamp  # nothing regenerated
    reference_answers(model, tok, GENERAL, system_prompt="other", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("references-*.json"))) == 2  # another prompt, another file
    files[0].write_text("{broken")
    assert reference_answers(model, tok, GENERAL, system_prompt="sys", cache_dir=tmp_path) == refs


def test_missing_candidate_or_corrections_are_clear_errors(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    with pytest.raises(ValueError, match="corrections"):
        evaluate_candidate(model, tok, tmp_path, [], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        evaluate_candidate(model, tok, tmp_path / "nope", [CAT], cache_dir=tmp_path)


def test_shipped_general_prompts_are_held_out() -> None:
    from learner.scope_fit import general_fit_prompts

    held = general_prompts()
    assert len(held) >= 40 and not set(held) & set(general_fit_prompts())
