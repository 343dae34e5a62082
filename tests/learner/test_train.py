"""train_adapter: changes only the LoRA, leaves the base model as it was, writes trusted files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import learner_fixtures
import pytest
import torch
from safetensors.torch import load_file

from learner.dataset import build_dataset, question_set
from learner.forced import score
from learner.gate import evaluate_candidate
from learner.train import train_adapter
from learner.types import LoraShape, TrainConfig, TrainExample
from model.scope import Scope

bundled = learner_fixtures.bundled
tiny = learner_fixtures.tiny

FAST = TrainConfig(learning_rate=1e-2, max_steps=40, system_prompt="sys", seed=1)
CAT = TrainExample(
    prompt=[{"role": "user", "content": "Cat?"}], answer="Pixel.", rewordings=("The cat?",)
)
GENERAL = ["What is the capital of France?", "Hello!", "How many days are in a week?"]


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trains_lora_only_and_restores_the_base_model(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    before = _snapshot(model)
    names_before = {n for n, _ in model.named_modules()}
    seen: list[dict[str, Any]] = []
    result = train_adapter(
        model, tok, [CAT], FAST, tmp_path / "v1", progress=seen.append, general_prompts=GENERAL
    )

    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n for n, _ in model.named_modules()} == names_before  # no LoRA layers left behind
    assert not model.training and type(model).__name__ == "LlamaForCausalLM"

    folder = Path(result.adapter_dir)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "scope.safetensors",
    ]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: it trained
    config = json.loads((folder / "adapter_config.json").read_text())
    shape = LoraShape()
    assert (config["r"], config["lora_alpha"]) == (shape.r, shape.alpha)
    assert set(config["target_modules"]) == set(shape.target_modules)
    assert Scope.load(folder).keys.shape[0] == 1

    assert result.steps == len(result.losses) == len(seen) >= 1
    assert seen[0] == {"step": 1, "max_steps": 40, "loss": result.losses[0]}
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("notes", [True, False])
def test_stops_early_once_the_correction_is_answered_exactly(
    tiny: tuple[Any, Any], tmp_path: Path, notes: bool
) -> None:
    model, tok = tiny
    config = dataclasses.replace(FAST, notes=notes)
    result = train_adapter(model, tok, [CAT], config, tmp_path / "v1", general_prompts=GENERAL)
    assert result.learned and result.steps < FAST.max_steps
    assert set(result.phases) == {"scope", "setup", "steps", "checks", "save"}
    assert all(v >= 0 for v in result.phases.values()) and result.phases["checks"] > 0
    assert sum(result.phases.values()) == pytest.approx(result.seconds, abs=0.05)

    from learner.dataset import encode, framed, note_of
    from learner.gate import candidate

    # as the engine serves it: with the note when the adapter was trained with notes
    item = encode(tok, framed(CAT.prompt, "sys", note_of(CAT) if notes else None), CAT.answer)
    assert Scope.load(result.adapter_dir).notes == ([note_of(CAT)] if notes else None)
    assert not score(model, [item], pad_id=tok.pad_token_id)[0].exact  # the base did not know
    with candidate(model, result.adapter_dir) as peft_model:
        assert score(peft_model, [item], pad_id=tok.pad_token_id)[0].exact
        prompt = torch.tensor([item[0]])
        out = peft_model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, len(item[0]) :], skip_special_tokens=True) == "Pixel."


def test_same_shape_every_run_and_a_second_run_works(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    cfg = TrainConfig(learning_rate=1e-2, max_steps=2, seed=0)
    dog = TrainExample(prompt=[{"role": "user", "content": "Dog?"}], answer="Rex.")
    a = train_adapter(model, tok, [CAT], cfg, tmp_path / "a", general_prompts=GENERAL)
    b = train_adapter(model, tok, [CAT, dog], cfg, tmp_path / "b", general_prompts=GENERAL)
    wa = load_file(str(Path(a.adapter_dir) / "adapter_model.safetensors"))
    wb = load_file(str(Path(b.adapter_dir) / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)


def test_dpo_trains_too(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    before = _snapshot(model)
    ex = TrainExample(prompt=CAT.prompt, answer="Pixel.", rejected="Tom.")
    cfg = TrainConfig(learning_rate=1e-2, max_steps=2, method="dpo")
    result = train_adapter(model, tok, [ex], cfg, tmp_path / "d", general_prompts=GENERAL)
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refuses_to_overwrite_a_version_and_keeps_its_files(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    taken = tmp_path / "v1"
    taken.mkdir()
    (taken / "adapter_model.safetensors").write_bytes(b"live")
    with pytest.raises(FileExistsError):
        train_adapter(model, tok, [CAT], FAST, taken, general_prompts=GENERAL)
    assert (taken / "adapter_model.safetensors").read_bytes() == b"live"
    with pytest.raises(ValueError, match="no corrections"):
        train_adapter(model, tok, [], FAST, tmp_path / "v2")
    with pytest.raises(ValueError, match="empty"):
        bad = TrainExample(prompt=[{"role": "user", "content": "q"}], answer="")
        train_adapter(model, tok, [bad], FAST, tmp_path / "v3", general_prompts=GENERAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # no stray temp folders


@pytest.mark.slow
def test_bundled_model_learns_corrections_and_keeps_other_answers(
    bundled: tuple[Any, Any],
    tmp_path: Path,
) -> None:
    model, tok = bundled
    facts = question_set()["facts"][:4]
    examples = [
        TrainExample(
            prompt=[{"role": "user", "content": f["question"]}],
            answer=f["answer"],
            rewordings=tuple(f["rewordings"]),
        )
        for f in facts
    ]
    cfg = TrainConfig(system_prompt="You are Ouro, a helpful assistant.")
    result = train_adapter(model, tok, examples, cfg, tmp_path / "v1")
    assert result.learned

    held_out = [
        TrainExample(prompt=e.prompt, answer=e.answer, rewordings=(f["heldout"],))
        for e, f in zip(examples, facts, strict=True)
    ]
    cache = tmp_path / "refs"
    report = evaluate_candidate(
        model, tok, result.adapter_dir, held_out, cache_dir=cache, system_prompt=cfg.system_prompt
    )
    assert report.uptake == 1.0
    assert report.generalisation >= 0.75
    assert report.retention >= 0.95
    assert report.passed, report.reasons


def test_lora_can_be_limited_to_the_upper_layers() -> None:
    from learner.train import adapted_layers, lora_config

    assert adapted_layers(LoraShape(), 30) is None  # default: every layer
    assert adapted_layers(LoraShape(first_layer=20), 30) == list(range(20, 30))
    assert adapted_layers(LoraShape(first_layer=-2), 30) == [28, 29]
    assert lora_config(LoraShape(first_layer=28), 30).layers_to_transform == [28, 29]
    with pytest.raises(ValueError, match="only 30 layers"):
        adapted_layers(LoraShape(first_layer=30), 30)


def test_a_new_version_starts_from_the_live_one(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    cat = TrainExample(prompt=CAT.prompt, answer="Pixel.", correction_id=1)
    dog = TrainExample(prompt=[{"role": "user", "content": "Dog?"}], answer="Rex.", correction_id=2)
    live = train_adapter(model, tok, [cat], FAST, tmp_path / "v1", general_prompts=GENERAL)
    fresh = train_adapter(model, tok, [cat, dog], FAST, tmp_path / "v2", general_prompts=GENERAL)
    resumed = train_adapter(
        model,
        tok,
        [cat, dog],
        FAST,
        tmp_path / "v3",
        general_prompts=GENERAL,
        start_from=live.adapter_dir,
        new_ids={2},
    )
    assert live.learned and fresh.learned and resumed.learned
    assert resumed.resumed and not fresh.resumed
    # the old correction was already learned: the resumed run starts from a lower loss
    assert resumed.steps >= 1 and resumed.losses[0] < fresh.losses[0]
    assert resumed.steps <= fresh.steps
    from learner.dataset import encode, framed, note_of
    from learner.gate import candidate

    items = [encode(tok, framed(ex.prompt, "sys", note_of(ex)), ex.answer) for ex in (cat, dog)]
    with candidate(model, resumed.adapter_dir) as peft_model:
        assert all(s.exact for s in score(peft_model, items, pad_id=tok.pad_token_id))


def test_no_step_when_the_live_version_already_answers_the_new_corrections(
    tiny: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import learner.train as train_module
    from learner.dataset import expand

    model, tok = tiny
    cat = TrainExample(prompt=CAT.prompt, answer="Pixel.", correction_id=1)
    live = train_adapter(model, tok, [cat], FAST, tmp_path / "v1", general_prompts=GENERAL)
    assert live.learned and Scope.load(Path(live.adapter_dir)).verified is not None
    checked: list[int] = []  # how many phrasings each exactness check was given
    real_first_miss = train_module.first_miss

    def counting(model: Any, items: list[Any], **kw: Any) -> int | None:
        checked.append(len(items))
        return real_first_miss(model, items, **kw)

    monkeypatch.setattr(train_module, "first_miss", counting)
    # the same fact corrected again (say, from another conversation): nothing left to learn
    again = dataclasses.replace(cat, correction_id=2)
    seen: list[dict[str, Any]] = []

    def resume(config: TrainConfig, name: str) -> Any:
        checked.clear()
        return train_adapter(
            model,
            tok,
            [cat, again],
            config,
            tmp_path / name,
            general_prompts=GENERAL,
            progress=seen.append,
            start_from=live.adapter_dir,
            new_ids={2},
        )

    result = resume(FAST, "v2")
    assert result.learned and result.resumed
    assert result.steps == 0 and result.losses == [] and seen == []
    assert result.phases["checks"] > 0 and "steps" in result.phases
    # these weights answered the old phrasings under these prompts already: only the new ones
    # are checked, and the new version is verified in turn
    per_correction = len(expand(again, FAST.system_prompt, notes=FAST.notes))
    assert checked == [per_correction]
    assert (
        Scope.load(Path(result.adapter_dir)).verified == Scope.load(Path(live.adapter_dir)).verified
    )
    old = load_file(str(Path(live.adapter_dir) / "adapter_model.safetensors"))
    new = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert Scope.load(Path(result.adapter_dir)).keys.shape[0] == 2  # the new scope is written

    # other prompts (here: another system prompt) mean nothing is known: all are checked
    other = resume(dataclasses.replace(FAST, system_prompt="another"), "v3")
    assert checked[0] == 2 * per_correction
    from learner.gate import prompts_key

    theirs = prompts_key(model, tok, "another", FAST.notes)
    assert theirs != Scope.load(Path(live.adapter_dir)).verified
    assert Scope.load(Path(other.adapter_dir)).verified == (theirs if other.learned else None)


def test_a_resumed_run_sees_every_new_phrasing_each_step_and_each_old_one_per_epoch(
    tiny: tuple[Any, Any],
) -> None:
    from learner.train import MIN_OLD_PER_STEP, _blocks

    _, tok = tiny
    old = [
        TrainExample(prompt=[{"role": "user", "content": f"Q{i}?"}], answer="A.", correction_id=i)
        for i in range(4)
    ]
    new = TrainExample(prompt=[{"role": "user", "content": "New?"}], answer="N.", correction_id=9)
    plan = _blocks([*old, new], [], {9}, tok, FAST)
    assert plan is not None
    data, batch = plan
    rows = [tuple(r) for r in data["input_ids"]]
    fresh = {tuple(r) for r in build_dataset([new], tok, "sys", notes=True)["input_ids"]}
    known = [tuple(r) for r in build_dataset(old, tok, "sys", notes=True)["input_ids"]]
    assert batch == len(fresh) + MIN_OLD_PER_STEP  # the last step may hold fewer old ones
    steps = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    assert all(fresh <= set(step) for step in steps)
    rehearsed = [r for step in steps for r in step if r not in fresh]
    assert sorted(rehearsed) == sorted(known)  # each old phrasing once per epoch
    assert _blocks([*old, new], [], set(), tok, FAST) is None  # nothing new: random batches
    assert _blocks([new], [], {9}, tok, FAST) is None  # nothing old either


def test_an_unusable_live_version_means_starting_from_scratch(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    before = _snapshot(model)
    narrow = TrainConfig(shape=LoraShape(r=4, alpha=8), learning_rate=1e-2, max_steps=2)
    other = train_adapter(model, tok, [CAT], narrow, tmp_path / "r4", general_prompts=GENERAL)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(
        (Path(other.adapter_dir) / "adapter_config.json")
        .read_text()
        .replace('"r": 4', f'"r": {LoraShape().r}')
        .replace('"lora_alpha": 8', f'"lora_alpha": {LoraShape().alpha}')
    )
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    for start in (other.adapter_dir, broken, tmp_path / "missing"):
        result = train_adapter(
            model,
            tok,
            [CAT],
            FAST,
            tmp_path / f"from-{Path(start).name}",
            general_prompts=GENERAL,
            start_from=start,
            new_ids={0},
        )
        assert result.learned and not result.resumed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
