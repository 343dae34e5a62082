"""Adapter slots: versions of one LoRA shape take turns in the same peft modules.

Loading into a reused slot must answer exactly like a fresh load; the model never holds more
peft adapters than the resident cap; activating past the cap evicts nobody.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from model.engine import LocalEngine
from model.interface import (
    AdapterLoadError,
    AdapterSpec,
    ChatMessage,
    GenerationRequest,
    SamplingParams,
)
from model.lora import BASE, LoraHost, forward
from model.registry import Entry, read_adapter
from model.scope import Scope
from tests.model.conftest import LORA_TARGETS, SCOPE_LAYER, build_model

QUESTION = "what is the capital of france?"


def ask(user: str | None, n: int = 12) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("user", QUESTION),),
        user_key=user,
        sampling=SamplingParams(max_new_tokens=n),
    )


def write_adapter(
    folder: Path, tokenizer: Any, seed: int, r: int = 4, targets: tuple[str, ...] = ()
) -> Path:
    """A random LoRA of any shape whose scope admits every request."""
    from peft import LoraConfig, get_peft_model

    model = build_model(len(tokenizer))
    modules = list(targets or LORA_TARGETS)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 2.0)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    hidden = int(model.config.hidden_size)
    Scope.from_embeddings(
        torch.randn(1, hidden, generator=gen),
        torch.zeros(hidden),
        threshold=-1.0,
        layer=SCOPE_LAYER,
    ).save(folder)
    return folder


def engine_for(tokenizer: Any, adapters_dir: Path, **kwargs: Any) -> LocalEngine:
    model = build_model(len(tokenizer))
    return LocalEngine("tiny", adapters_dir=adapters_dir, loaded=(model, tokenizer), **kwargs)


async def answer_alone(tokenizer: Any, adapters_dir: Path, folder: Path) -> str:
    """What the adapter answers in an engine that never held another one."""
    async with engine_for(tokenizer, adapters_dir) as engine:
        await engine.activate(AdapterSpec("alone", str(folder), owner="x"))
        return (await engine.generate(ask("x"))).text


def resident(engine: LocalEngine) -> dict[str, str | None]:
    return {e.spec.version: e.name for e in engine.registry.entries.values() if e.resident}


def host(engine: LocalEngine) -> LoraHost:
    assert engine._host is not None
    return engine._host


def test_reused_slot_gives_the_logits_of_a_fresh_load(tokenizer: Any, adapters_dir: Path) -> None:
    a = read_adapter(adapters_dir, write_adapter(adapters_dir / "a", tokenizer, seed=1))
    b = read_adapter(adapters_dir, write_adapter(adapters_dir / "b", tokenizer, seed=2))
    ids = torch.tensor([tokenizer.encode(QUESTION)] * 2)

    reused = LoraHost(build_model(len(tokenizer)), max_slots=1)
    slot = reused.attach(a)
    reused.detach(slot)
    assert reused.attach(b) == slot
    assert reused.counts == {"created": 1, "reused": 1}
    fresh = LoraHost(build_model(len(tokenizer)))
    only = fresh.attach(b)
    with torch.inference_mode():
        got = forward(reused.model, reused.modules, [slot, BASE], input_ids=ids).logits
        want = forward(fresh.model, fresh.modules, [only, BASE], input_ids=ids).logits
        plain = build_model(len(tokenizer))(input_ids=ids).logits
    assert torch.equal(got, want)
    assert torch.equal(got[1], plain[1]) and not torch.allclose(got[0], plain[0])


async def test_evicted_adapter_slot_serves_the_next_exactly(
    tokenizer: Any, adapters_dir: Path
) -> None:
    a = write_adapter(adapters_dir / "a", tokenizer, seed=1)
    b = write_adapter(adapters_dir / "b", tokenizer, seed=2)
    expected = await answer_alone(tokenizer, adapters_dir, b)
    async with engine_for(tokenizer, adapters_dir, max_resident_adapters=1) as engine:
        await engine.activate(AdapterSpec("a-v1", str(a), owner="a"))
        first = await engine.generate(ask("a"))
        await engine.activate(AdapterSpec("b-v1", str(b), owner="b"))
        got = await engine.generate(ask("b"))  # evicts a, copies b into a's slot
        assert resident(engine) == {"b-v1": "s1"}
        assert host(engine).counts == {"created": 1, "reused": 1}
        assert (await engine.generate(ask("a"))).text == first.text  # and back again
    assert got.adapter_version == "b-v1"
    assert got.text == expected != first.text


async def test_shapes_share_the_cap(tokenizer: Any, adapters_dir: Path) -> None:
    small = {u: write_adapter(adapters_dir / u, tokenizer, seed=10 + i) for i, u in enumerate("ac")}
    wide = {
        u: write_adapter(
            adapters_dir / u, tokenizer, seed=20 + i, r=8, targets=("q_proj", "v_proj")
        )
        for i, u in enumerate("bd")
    }
    folders = small | wide
    expected = {u: await answer_alone(tokenizer, adapters_dir, f) for u, f in folders.items()}
    assert len(set(expected.values())) == 4
    async with engine_for(tokenizer, adapters_dir, max_resident_adapters=2) as engine:
        slots = host(engine)
        most = 0
        attach = slots.attach

        def counted(files: Any) -> str:
            nonlocal most
            name = attach(files)
            most = max(most, len(slots.model.peft_config))
            return name

        slots.attach = counted  # type: ignore[method-assign]
        for u, folder in folders.items():
            await engine.activate(AdapterSpec(f"{u}-v1", str(folder), owner=u))
        order = "abcdabadc"  # b displaces c's idle slot of the other shape; then all reuse
        answers = []
        for u in order:
            result = await engine.generate(ask(u))
            answers.append((result.adapter_version, result.text))
            names = list(resident(engine).values())
            assert len(names) == len(set(names))  # no slot serves two versions
            assert len(slots.slots()) <= 2
    assert most == 2
    assert slots.counts == {"created": 3, "reused": 6}
    assert answers == [(f"{u}-v1", expected[u]) for u in order]


async def test_failed_copy_deletes_the_slot_and_serving_goes_on(
    tokenizer: Any, adapters_dir: Path
) -> None:
    a = write_adapter(adapters_dir / "a", tokenizer, seed=1)
    b = write_adapter(adapters_dir / "b", tokenizer, seed=2)
    c = write_adapter(adapters_dir / "c", tokenizer, seed=3)
    expected_c = await answer_alone(tokenizer, adapters_dir, c)
    async with engine_for(tokenizer, adapters_dir, max_resident_adapters=2) as engine:
        await engine.activate(AdapterSpec("a-v1", str(a), owner="a"))
        await engine.activate(AdapterSpec("b-v1", str(b), owner="b"))
        before = await engine.generate(ask("a"))
        base = await engine.generate(ask(None))
        await engine.deactivate("b")
        await engine.generate(ask("b"))  # the worker has let b go: its slot is free
        assert host(engine).slots() == {"s1", "s2"} and host(engine).loaded() == {"s1"}

        files = read_adapter(adapters_dir, c)
        last = list(files.weights)[-1]  # everything before it gets copied, then this fails
        files.weights[last] = torch.empty(files.weights[last].shape, device="meta")
        broken = Entry(spec=AdapterSpec("c-v1", str(c), owner="c"), scope=files.scope)
        worker = engine._running()
        with pytest.raises(AdapterLoadError):
            await engine._call(lambda: worker.register(broken, files))
        assert not broken.resident and broken.name is None
        assert host(engine).slots() == {"s1"}  # the half-written slot is gone
        assert engine.active_versions() == {"a": "a-v1"}
        after = await engine.generate(ask("a"))
        assert (await engine.generate(ask("c"))).adapter_version is None
        assert (await engine.generate(ask(None))).text == base.text

        await engine.activate(AdapterSpec("c-v1", str(c), owner="c"))
        fixed = await engine.generate(ask("c"))
    assert after.text == before.text
    assert (fixed.adapter_version, fixed.text) == ("c-v1", expected_c)


async def test_activate_past_the_cap_evicts_nobody(tokenizer: Any, adapters_dir: Path) -> None:
    folders = {
        u: write_adapter(adapters_dir / u, tokenizer, seed=30 + i) for i, u in enumerate("abc")
    }
    expected_c = await answer_alone(tokenizer, adapters_dir, folders["c"])
    wrong = adapters_dir / "wrong"
    shutil.copytree(folders["c"], wrong)
    config = (wrong / "adapter_config.json").read_text().replace('"r": 4', '"r": 8')
    (wrong / "adapter_config.json").write_text(config)
    async with engine_for(tokenizer, adapters_dir, max_resident_adapters=2) as engine:
        for u, folder in folders.items():
            await engine.activate(AdapterSpec(f"{u}-v1", str(folder), owner=u))
        assert resident(engine) == {"a-v1": "s1", "b-v1": "s2"}
        assert engine.registry.entries["c-v1"].name is None
        assert len(engine.adapter_load_seconds()) == 2
        with pytest.raises(AdapterLoadError, match="does not fit"):  # refused all the same
            await engine.activate(AdapterSpec("c-v2", str(wrong), owner="c"))
        assert engine.active_versions() == {"a": "a-v1", "b": "b-v1", "c": "c-v1"}

        got = await engine.generate(ask("c"))  # loaded on its first request
        assert "c-v1" in resident(engine) and len(resident(engine)) == 2
        assert len(engine.adapter_load_seconds()) == 3
    assert (got.adapter_version, got.text) == ("c-v1", expected_c)


async def test_hot_swap_of_a_resident_adapter_loads_beside_the_old_one(
    tokenizer: Any, adapters_dir: Path
) -> None:
    folders = {
        v: write_adapter(adapters_dir / v, tokenizer, seed=40 + i) for i, v in enumerate("xyz")
    }
    expected_z = await answer_alone(tokenizer, adapters_dir, folders["z"])
    async with engine_for(tokenizer, adapters_dir, max_resident_adapters=2) as engine:
        await engine.activate(AdapterSpec("a-v1", str(folders["x"]), owner="a"))
        await engine.activate(AdapterSpec("b-v1", str(folders["y"]), owner="b"))
        old = await engine.generate(ask("a", n=300))
        long = asyncio.create_task(engine.generate(ask("a", n=300)))  # keeps a-v1 in flight
        await asyncio.sleep(0.05)
        await engine.activate(AdapterSpec("a-v2", str(folders["z"]), owner="a"))
        during = resident(engine)
        new = await engine.generate(ask("a"))
        finished = await long
        await engine.generate(ask(None))
        after = resident(engine)
    assert set(during) == {"a-v1", "a-v2"}  # loaded at once; b-v1 (idle) made room
    assert (finished.adapter_version, finished.text) == ("a-v1", old.text)
    assert (new.adapter_version, new.text) == ("a-v2", expected_z)
    assert set(after) == {"a-v2"}  # the old version let go once its request finished
