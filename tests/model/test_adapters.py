"""Adapters in LocalEngine: scope routing, per-row adapters, hot swap, eviction, bad files."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from model.engine import LocalEngine
from model.interface import (
    AdapterLoadError,
    AdapterSpec,
    ChatMessage,
    GenerationRequest,
    SamplingParams,
)
from model.scope import Scope, with_note

QUESTION = "what is the capital of france?"
OUTSIDE = "how do I bake bread at home, step by step?"


def ask(question: str, user: str | None = None, n: int = 12) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", question)),
        user_key=user,
        sampling=SamplingParams(max_new_tokens=n),
    )


def engine_for(tiny: tuple[Any, Any], adapters_dir: Path, **kwargs: Any) -> LocalEngine:
    return LocalEngine("tiny", adapters_dir=adapters_dir, loaded=tiny, **kwargs)


async def test_routing_rule_per_row(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any
) -> None:
    personal = make_adapter("u1-v1", seed=1, questions=[QUESTION], outside=[OUTSIDE, "hi"])
    shared = make_adapter("shared-v1", seed=2, questions=["hi"], outside=[OUTSIDE, QUESTION])
    async with engine_for(tiny, adapters_dir) as engine:
        base_q = (await engine.generate(ask(QUESTION))).text
        base_out = (await engine.generate(ask(OUTSIDE))).text
        base_hi = (await engine.generate(ask("hi"))).text
        await engine.activate(AdapterSpec("u1-v1", str(personal), owner="1"))
        await engine.activate(AdapterSpec("shared-v1", str(shared), owner=None))
        assert engine.active_versions() == {"1": "u1-v1", "shared": "shared-v1"}
        results = await asyncio.gather(
            engine.generate(ask(QUESTION, user="1")),  # personal, in scope
            engine.generate(ask(OUTSIDE, user="1")),  # out of every scope: base
            engine.generate(ask(QUESTION, user="2")),  # someone else: not u1's adapter
            engine.generate(ask("hi", user="1")),  # outside personal, inside shared
            engine.generate(ask("hi")),  # anonymous: shared only
        )
        sizes = engine.stats().batch_sizes
    versions = [r.adapter_version for r in results]
    assert versions == ["u1-v1", None, None, "shared-v1", "shared-v1"]
    assert results[0].text != base_q
    assert results[1].text == base_out  # out of scope in the same batch: exactly the base answer
    assert results[2].text == base_q
    assert results[3].text == results[4].text != base_hi
    assert max(sizes) == 5


async def test_a_request_inside_a_scope_with_notes_is_served_with_the_nearest_note(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any
) -> None:
    other = "who wrote hamlet?"
    noted = make_adapter("u1-v1", seed=1, questions=[QUESTION, other], outside=[OUTSIDE])
    plain = adapters_dir / "u2-v1"  # the same weights and keys, no notes
    shutil.copytree(noted, plain)
    notes = ["Remember: Pixeltown.", "Remember this other fact, a longer note than the first."]
    scope = Scope.load(noted)
    scope.notes = notes
    scope.save(noted)
    _, tok = tiny

    def tokens(messages: list[dict[str, str]]) -> int:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def by_hand(question: str, note: str) -> GenerationRequest:
        framed = with_note([{"role": "system", "content": "be brief"}], note)[0]["content"]
        return GenerationRequest(
            messages=(ChatMessage("system", framed), ChatMessage("user", question)),
            user_key="2",
            sampling=SamplingParams(max_new_tokens=12),
        )

    async with engine_for(tiny, adapters_dir) as engine:
        await engine.activate(AdapterSpec("u1-v1", str(noted), owner="1"))
        await engine.activate(AdapterSpec("u2-v1", str(plain), owner="2"))
        served = await asyncio.gather(
            engine.generate(ask(QUESTION, user="1")),
            engine.generate(ask(other, user="1")),
            engine.generate(ask(OUTSIDE, user="1")),
            engine.generate(by_hand(QUESTION, notes[0])),  # the note written into the request
            engine.generate(by_hand(other, notes[1])),
        )
    base = [{"role": "system", "content": "be brief"}]
    for result, question, note in zip(served[:2], [QUESTION, other], notes, strict=True):
        expected = tokens(with_note([*base, {"role": "user", "content": question}], note))
        assert result.adapter_version == "u1-v1" and result.prompt_tokens == expected
    assert served[2].adapter_version is None  # outside: no adapter, no note
    assert served[2].prompt_tokens == tokens([*base, {"role": "user", "content": OUTSIDE}])
    # what the adapter answers with the note added = what it answers to the note written out
    assert [r.adapter_version for r in served[3:]] == ["u2-v1", "u2-v1"]
    assert [r.text for r in served[:2]] == [r.text for r in served[3:]]
    assert [r.prompt_tokens for r in served[:2]] == [r.prompt_tokens for r in served[3:]]


async def test_a_note_too_long_for_the_context_is_left_out(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any
) -> None:
    noted = make_adapter("u1-v1", seed=1, questions=[QUESTION], outside=[OUTSIDE])
    scope = Scope.load(noted)
    scope.notes = ["remember " * 5000]
    scope.save(noted)
    async with engine_for(tiny, adapters_dir) as engine:
        without = await engine.generate(ask(QUESTION))
        await engine.activate(AdapterSpec("u1-v1", str(noted), owner="1"))
        served = await engine.generate(ask(QUESTION, user="1"))
    assert served.adapter_version == "u1-v1"
    assert served.prompt_tokens == without.prompt_tokens and served.completion_tokens > 0


async def test_per_row_adapters_match_each_alone(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any
) -> None:
    a = make_adapter("a-v1", seed=11, questions=[QUESTION])
    b = make_adapter("b-v1", seed=12, questions=[QUESTION])
    async with engine_for(tiny, adapters_dir) as engine:
        await engine.activate(AdapterSpec("a-v1", str(a), owner="a"))
        await engine.activate(AdapterSpec("b-v1", str(b), owner="b"))
        alone = {u: (await engine.generate(ask(QUESTION, user=u, n=16))).text for u in "abc"}
        mixed = await asyncio.gather(*(engine.generate(ask(QUESTION, user=u, n=16)) for u in "abc"))
    assert len(set(alone.values())) == 3  # the two adapters and the base all differ
    assert [r.text for r in mixed] == [alone["a"], alone["b"], alone["c"]]
    assert [r.adapter_version for r in mixed] == ["a-v1", "b-v1", None]


async def test_swap_is_atomic_under_load(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any
) -> None:
    v1 = make_adapter("u1-v1", seed=21, questions=[QUESTION])
    v2 = make_adapter("u1-v2", seed=22, questions=[QUESTION])
    async with engine_for(tiny, adapters_dir, max_batch_size=4) as engine:
        await engine.activate(AdapterSpec("u1-v2", str(v2), owner="1"))
        ref_v2 = (await engine.generate(ask(QUESTION, user="1", n=20))).text
        await engine.activate(AdapterSpec("u1-v1", str(v1), owner="1"))
        ref_v1 = (await engine.generate(ask(QUESTION, user="1", n=20))).text
        assert ref_v1 != ref_v2
        expected = {"u1-v1": ref_v1, "u1-v2": ref_v2}

        tasks: list[asyncio.Task[Any]] = []
        for i in range(12):
            tasks.append(asyncio.create_task(engine.generate(ask(QUESTION, user="1", n=20))))
            if i == 5:  # swap while earlier requests are queued or mid-decode
                await asyncio.sleep(0.05)
                await engine.activate(AdapterSpec("u1-v2", str(v2), owner="1"))
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*tasks)
        after = await engine.generate(ask(QUESTION, user="1", n=20))
        await asyncio.sleep(0.05)
        loaded = {e.spec.version for e in engine.registry.entries.values() if e.resident}
        assert engine._host is not None and len(engine._host.loaded()) == 1
    assert not engine._host.loaded()  # close() released the adapters
    for r in results:
        assert r.text == expected[r.adapter_version]  # every answer from exactly one version
    assert {r.adapter_version for r in results} == {"u1-v1", "u1-v2"}
    assert results[-1].adapter_version == "u1-v2"
    assert after.adapter_version == "u1-v2"
    assert loaded == {"u1-v2"}  # the superseded version was unloaded once idle


async def test_eviction_is_lru_and_spares_in_flight(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any
) -> None:
    folders = {
        u: make_adapter(f"{u}-v1", seed=30 + i, questions=[QUESTION]) for i, u in enumerate("abcd")
    }
    async with engine_for(tiny, adapters_dir, max_resident_adapters=2) as engine:
        refs = {}
        for u in "abcd":  # reference answers while each is freshly loaded
            await engine.activate(AdapterSpec(f"{u}-v1", str(folders[u]), owner=u))
            refs[u] = (await engine.generate(ask(QUESTION, user=u))).text

        def resident() -> set[str]:
            return {e.spec.version for e in engine.registry.entries.values() if e.resident}

        assert resident() == {"c-v1", "d-v1"}
        await engine.generate(ask(QUESTION, user="c"))  # c is now more recent than d
        await engine.generate(ask(QUESTION, user="a"))  # loads a on demand: d (LRU) goes
        assert resident() == {"a-v1", "c-v1"}

        # a long request keeps "a" in flight; two loads must evict "c", never "a"
        long = asyncio.create_task(engine.generate(ask(QUESTION, user="a", n=60)))
        await asyncio.sleep(0.1)
        b = await engine.generate(ask(QUESTION, user="b"))
        d = await engine.generate(ask(QUESTION, user="d"))
        assert "a-v1" in resident()
        assert (await long).adapter_version == "a-v1"
        assert engine.stats().resident_adapters <= 3
        await asyncio.sleep(0.05)
        assert engine.stats().resident_adapters == 2  # back under the limit once idle
    assert (b.text, d.text) == (refs["b"], refs["d"])  # reloaded adapters answer the same


def _write_junk(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)


async def test_bad_adapters_are_refused_and_engine_keeps_serving(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any, tmp_path: Path
) -> None:
    good = make_adapter("u1-v1", seed=41, questions=[QUESTION])
    outside = tmp_path / "elsewhere"
    shutil.copytree(good, outside)
    link = adapters_dir / "link"
    os.symlink(outside, link)
    corrupt = adapters_dir / "corrupt"
    shutil.copytree(good, corrupt)
    _write_junk(corrupt, "adapter_model.safetensors", b"not a safetensors file")
    pickled = adapters_dir / "pickled"
    shutil.copytree(good, pickled)
    _write_junk(pickled, "adapter_model.bin", b"\x80\x04pickle")
    no_scope = adapters_dir / "no-scope"
    shutil.copytree(good, no_scope)
    (no_scope / "scope.safetensors").unlink()
    bad_config = adapters_dir / "bad-config"
    shutil.copytree(good, bad_config)
    _write_junk(bad_config, "adapter_config.json", b"{not json")
    wrong_shape = adapters_dir / "wrong-shape"
    shutil.copytree(good, wrong_shape)
    cfg = (wrong_shape / "adapter_config.json").read_text().replace('"r": 4', '"r": 8')
    (wrong_shape / "adapter_config.json").write_text(cfg)

    async with engine_for(tiny, adapters_dir) as engine:
        await engine.activate(AdapterSpec("u1-v1", str(good), owner="1"))
        before = await engine.generate(ask(QUESTION, user="1"))
        cases = {
            "missing": adapters_dir / "nope",
            "outside": outside,
            "symlink-out": link,
            "dotdot": adapters_dir / ".." / "elsewhere",
            "corrupt": corrupt,
            "pickled": pickled,
            "no-scope": no_scope,
            "bad-config": bad_config,
            "wrong-shape": wrong_shape,
        }
        for version, path in cases.items():
            with pytest.raises(AdapterLoadError):
                await engine.activate(AdapterSpec(version, str(path), owner="1"))
            assert engine.active_versions() == {"1": "u1-v1"}, version
        after = await engine.generate(ask(QUESTION, user="1"))
        assert engine._host is not None and len(engine._host.loaded()) == 1
    assert (after.text, after.adapter_version) == (before.text, "u1-v1")


async def test_adapter_failing_on_demand_falls_back(
    tiny: tuple[Any, Any], adapters_dir: Path, make_adapter: Any
) -> None:
    mine = make_adapter("u1-v1", seed=51, questions=[QUESTION])
    shared = make_adapter("shared-v1", seed=52, questions=[QUESTION])
    async with engine_for(tiny, adapters_dir, max_resident_adapters=1) as engine:
        await engine.activate(AdapterSpec("u1-v1", str(mine), owner="1"))
        await engine.activate(AdapterSpec("shared-v1", str(shared), owner=None))  # not loaded yet
        shared_answer = await engine.generate(ask(QUESTION, user="2"))  # evicts u1-v1
        _write_junk(mine, "adapter_model.safetensors", b"garbage")
        result = await engine.generate(ask(QUESTION, user="1"))
        await engine.deactivate(None)
        base = await engine.generate(ask(QUESTION, user="1"))
        plain = await engine.generate(ask(QUESTION))
    assert result.adapter_version == "shared-v1"
    assert result.text == shared_answer.text
    assert base.adapter_version is None and base.text == plain.text
    assert base.finish_reason == "length"
