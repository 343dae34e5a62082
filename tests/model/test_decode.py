"""The lean decode step (model.decode) computes transformers' forward bit for bit.

Each case prefills a left-padded batch, then decodes the same steps twice from identical
caches: once through `LeanDecode.step`, once through the model's forward (peft modules and
gathered hooks included). The logits must be equal, not close.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model import packed
from model.batching import KVBatch, left_pad, new_cache
from model.decode import lean_decoder
from model.lora import BASE, LoraHost
from model.packed import pack_gguf
from model.registry import read_adapter
from tests.model.conftest import build_model
from tests.model.test_packed import VOCAB, gguf_like
from tests.model.test_slots import write_adapter

PROMPTS = ["what is the capital of france?", "hi", "how many legs does a spider have?", "ok"]


def decode_both(
    host: LoraHost, tokenizer: Any, names: list[str], steps: int = 6
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per step, the logits of the lean step and of the forward, from the same prefill."""
    runs = []
    for lean in (True, False):
        host.lean_enabled = lean
        prompts = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(len(names))]
        ids, mask = left_pad(prompts, int(tokenizer.pad_token_id))
        cache = new_cache(host.model.config)
        with torch.inference_mode():
            out = host.forward(
                names,
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                cache=cache,
                use_cache=True,
            )
            kv = KVBatch(cache, mask)
            last = out.logits[:, -1, :].argmax(-1, keepdim=True)
            lengths = torch.tensor([[len(p)] for p in prompts])
            logits = []
            for step in range(steps):
                before = host.steps["lean"]
                step_logits = host.decode(
                    names,
                    input_ids=last,
                    position_ids=lengths + step,
                    attention_mask=kv.step_mask(),
                    cache=kv.cache,
                )
                assert host.steps["lean"] == before + int(lean)
                logits.append(step_logits)
                last = step_logits.argmax(-1, keepdim=True)
        runs.append(logits)
    host.lean_enabled = True
    return runs[0], runs[1]


def with_adapters(model: Any, tokenizer: Any, adapters_dir: Path, count: int) -> LoraHost:
    host = LoraHost(model)
    assert host.lean is not None
    for seed in range(count):
        folder = write_adapter(adapters_dir / f"a{seed}", tokenizer, seed=seed)
        host.attach(read_adapter(adapters_dir, folder))
    return host


@pytest.mark.parametrize(
    "names",
    [
        [BASE],
        [BASE, BASE, BASE],  # padded rows
        ["s1", "s2", "s3"],  # every row its own adapter
        ["s2", BASE, "s2", "s1"],  # repeats and base rows beside adapter rows
        ["s3", "s3"],  # one adapter for the whole batch
    ],
)
def test_lean_steps_equal_the_forward(tokenizer: Any, adapters_dir: Path, names: list[str]) -> None:
    host = with_adapters(build_model(len(tokenizer)), tokenizer, adapters_dir, 3)
    lean, reference = decode_both(host, tokenizer, names)
    for a, b in zip(lean, reference, strict=True):
        assert torch.equal(a, b)


def test_a_model_without_adapters_takes_the_lean_step(tokenizer: Any) -> None:
    host = LoraHost(build_model(len(tokenizer)))
    lean, reference = decode_both(host, tokenizer, [BASE, BASE])
    assert host.steps["lean"] == 6
    assert all(torch.equal(a, b) for a, b in zip(lean, reference, strict=True))


@pytest.mark.skipif(not packed.kernel_available(), reason="no int4 CPU kernel")
def test_packed_layers_run_fused_and_give_the_same_bits(tokenizer: Any, adapters_dir: Path) -> None:
    model = build_model(VOCAB)
    pack_gguf(model, gguf_like(model))
    host = with_adapters(model, tokenizer, adapters_dir, 2)
    assert host.lean is not None
    groups = [group for layer in host.lean._groups for group in layer]
    assert all(group.packed is not None for group in groups)  # every projection on the kernel
    fused = [group for group in groups if len(group.linears) > 1]
    assert len(fused) == 2 * len(model.model.layers)  # q/k/v and gate/up of every layer
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.packed.data_ptr() == fused[0].packed.data_ptr()  # shared, not copied
    lean, reference = decode_both(host, tokenizer, ["s1", BASE, "s2"])
    assert all(torch.equal(a, b) for a, b in zip(lean, reference, strict=True))


def test_batches_peft_must_run_take_the_forward(tokenizer: Any, adapters_dir: Path) -> None:
    host = LoraHost(build_model(len(tokenizer)))
    narrow = write_adapter(adapters_dir / "n", tokenizer, 1)
    wide = write_adapter(adapters_dir / "w", tokenizer, 2, r=8)
    a = host.attach(read_adapter(adapters_dir, narrow))
    b = host.attach(read_adapter(adapters_dir, wide))
    host.lean_enabled = True
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    ids, mask = left_pad(prompts, int(tokenizer.pad_token_id))
    cache = new_cache(host.model.config)
    with torch.inference_mode():
        host.forward([a, b], input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        kv = KVBatch(cache, mask)
        host.decode(
            [a, b],
            input_ids=torch.tensor([[5], [6]]),
            position_ids=torch.tensor([[len(p)] for p in prompts]),
            attention_mask=kv.step_mask(),
            cache=kv.cache,
        )
    assert host.steps["lean"] == 0  # two ranks in one layer: peft's path


def test_only_models_it_was_checked_against_get_a_lean_step(tokenizer: Any) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    assert lean_decoder(build_model(len(tokenizer))) is not None
    eager = build_model(len(tokenizer))
    eager.config._attn_implementation = "eager"
    assert lean_decoder(eager) is None
    other = MistralForCausalLM(
        MistralConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert lean_decoder(other) is None


@pytest.mark.slow
def test_bundled_model_lean_steps_equal_the_forward(model_cache_dir: Path) -> None:
    from model.loading import load_base_model

    model, tok, _ = load_base_model(cache_dir=model_cache_dir)
    host = LoraHost(model)
    assert host.lean is not None
    assert all(group.packed is not None for layer in host.lean._groups for group in layer)
    lean, reference = decode_both(host, tok, [BASE, BASE, BASE], steps=8)
    assert all(torch.equal(a, b) for a, b in zip(lean, reference, strict=True))
