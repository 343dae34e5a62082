"""Gathered per-row LoRA (two batched matmuls per layer) computes what peft's per-row path does.

Every batch here runs both ways on the same slots: the logits must agree, rows without an
adapter must equal the plain model bit for bit, and kinds of LoRA the gathered path does not
cover must fall back to peft instead of computing something else.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from model.lora import BASE, LoraHost, forward, peft_forward
from model.registry import read_adapter
from tests.model.conftest import build_model
from tests.model.test_slots import QUESTION, write_adapter

PROMPTS = [QUESTION, "hello there", "how many legs does a spider have?", "ok"]


@pytest.fixture
def host(tokenizer: Any, adapters_dir: Path) -> LoraHost:
    """Four same-shape adapters in slots s1..s4 of one tiny model."""
    slots = LoraHost(build_model(len(tokenizer)))
    for seed in range(4):
        folder = write_adapter(adapters_dir / f"a{seed}", tokenizer, seed=seed)
        slots.attach(read_adapter(adapters_dir, folder))
    return slots


def batch(tokenizer: Any, n: int) -> dict[str, torch.Tensor]:
    """n left-padded prompts of different lengths, as the worker prefills them."""
    enc = tokenizer(
        [PROMPTS[i % len(PROMPTS)] for i in range(n)], return_tensors="pt", padding=True
    )
    mask = enc["attention_mask"]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def both(slots: LoraHost, names: list[str], inputs: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    with torch.inference_mode():
        fast = slots.forward(names, **inputs).logits
        slow = peft_forward(slots.model, slots.modules, names, **inputs).logits
    return fast, slow


@pytest.mark.parametrize(
    "names",
    [
        ["s1", "s2", "s3", "s4"],  # every row its own adapter, in slot order
        ["s3", "s1", "s3", "s2"],  # repeats: rows gather their slot
        ["s2", BASE, "s4", BASE],  # base rows beside adapter rows
        ["s2", "s2", "s2", "s2"],  # one adapter for the whole batch
        [BASE, BASE, BASE, BASE],
    ],
)
def test_gathered_rows_match_peft_per_row(host: LoraHost, tokenizer: Any, names: list[str]) -> None:
    inputs = batch(tokenizer, len(names))
    before = dict(host.gather.counts)
    fast, slow = both(host, names, inputs)
    assert host.gather.counts["gathered"] == before["gathered"] + 1
    assert host.gather.counts["peft"] == before["peft"]  # the reference ran outside `gather`
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(fast[real], slow[real], rtol=1e-4, atol=1e-4)


def test_base_rows_are_the_plain_model_bit_for_bit(host: LoraHost, tokenizer: Any) -> None:
    inputs = batch(tokenizer, 4)
    with torch.inference_mode():
        mixed = host.forward(["s1", BASE, "s2", BASE], **inputs).logits
        plain = build_model(len(tokenizer))(**inputs).logits
    assert torch.equal(mixed[1], plain[1]) and torch.equal(mixed[3], plain[3])
    assert not torch.allclose(mixed[0], plain[0])


def test_adapters_on_different_layers_share_a_batch(tokenizer: Any, adapters_dir: Path) -> None:
    slots = LoraHost(build_model(len(tokenizer)))
    attention = write_adapter(
        adapters_dir / "q", tokenizer, seed=5, r=4, targets=("q_proj", "v_proj")
    )
    mlp = write_adapter(adapters_dir / "m", tokenizer, seed=6, r=4, targets=("down_proj",))
    a = slots.attach(read_adapter(adapters_dir, attention))
    b = slots.attach(read_adapter(adapters_dir, mlp))
    fast, slow = both(slots, [a, b, BASE], batch(tokenizer, 3))
    assert slots.gather.counts["gathered"] == 1
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_different_ranks_in_one_layer_fall_back_to_peft(tokenizer: Any, adapters_dir: Path) -> None:
    slots = LoraHost(build_model(len(tokenizer)))
    narrow = slots.attach(
        read_adapter(adapters_dir, write_adapter(adapters_dir / "n", tokenizer, 1))
    )
    wide = slots.attach(
        read_adapter(adapters_dir, write_adapter(adapters_dir / "w", tokenizer, 2, r=8))
    )
    fast, slow = both(slots, [narrow, wide], batch(tokenizer, 2))
    assert slots.gather.counts == {"gathered": 0, "peft": 1}
    assert torch.equal(fast, slow)
    # each rank alone still gathers
    both(slots, [wide, wide], batch(tokenizer, 2))
    assert slots.gather.counts == {"gathered": 1, "peft": 1}


def test_a_refilled_slot_is_read_afresh(host: LoraHost, tokenizer: Any, adapters_dir: Path) -> None:
    inputs = batch(tokenizer, 2)
    first, _ = both(host, ["s1", "s2"], inputs)
    host.detach("s2")
    other = write_adapter(adapters_dir / "other", tokenizer, seed=9)
    assert host.attach(read_adapter(adapters_dir, other)) == "s2"  # same slot, new weights
    second, reference = both(host, ["s1", "s2"], inputs)
    torch.testing.assert_close(second, reference, rtol=1e-4, atol=1e-4)
    assert torch.allclose(second[0], first[0]) and not torch.allclose(second[1], first[1])


def test_hooks_and_flags_come_off_when_the_forward_raises(host: LoraHost) -> None:
    with pytest.raises(IndexError), torch.inference_mode():
        host.forward(["s1", "s2"], input_ids=torch.tensor([[10**6], [1]]))
    assert all(not m._forward_hooks for m in host.modules)
    assert all(not m.disable_adapters for m in host.modules)


def test_a_plain_model_runs_without_slots(tokenizer: Any) -> None:
    model = build_model(len(tokenizer))
    inputs = batch(tokenizer, 2)
    with torch.inference_mode():
        assert torch.equal(
            forward(model, [], [BASE, BASE], **inputs).logits, model(**inputs).logits
        )


async def test_engine_answers_the_same_either_way(tokenizer: Any, adapters_dir: Path) -> None:
    from model.interface import AdapterSpec
    from tests.model.test_slots import ask, engine_for

    folders = {u: write_adapter(adapters_dir / u, tokenizer, seed=i) for i, u in enumerate("abc")}
    users = ["a", "b", None, "c", "a"]
    answers = {}
    async with engine_for(tokenizer, adapters_dir) as engine:
        for user, folder in folders.items():
            await engine.activate(AdapterSpec(f"{user}-v1", str(folder), owner=user))
        for on in (True, False):
            await engine.set_gathered_lora(on)
            results = await asyncio.gather(*(engine.generate(ask(u)) for u in users))
            answers[on] = [(r.adapter_version, r.text) for r in results]
            assert engine._host is not None
            used = dict(engine._host.gather.counts)
            assert used["gathered" if on else "peft"] > 0
    assert answers[True] == answers[False]
    assert len({text for _, text in answers[True]}) == 4  # three adapters and the base model


def test_stacks_over_the_memory_budget_are_rebuilt_each_forward(
    host: LoraHost, tokenizer: Any
) -> None:
    inputs = batch(tokenizer, 4)
    kept, _ = both(host, ["s1", "s2", "s3", "s4"], inputs)
    assert host.gather.plan(host.modules, ["s1", "s2", "s3", "s4"]) is host.gather._layers
    host.gather.max_bytes = 0  # as the engine sets it before its first forward
    host.gather.forget()
    again, reference = both(host, ["s1", "s2", "s3", "s4"], inputs)
    assert host.gather._layers is None  # nothing kept
    torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, kept)
