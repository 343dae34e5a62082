"""The lean decode step (model.decode) computes, row for row, transformers' forward alone.

Each case decodes a batch of prompts of different lengths (so the cache is padded) through
`LeanDecode.step`, then decodes each row alone through the model's forward (peft modules and
gathered hooks included), fed the same tokens. Every row's logits must be equal, not close.
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

PROMPTS = [
    "what is the capital of france?",
    "hi there",
    "how many legs does a spider have?",
    "ok then",
]


def prefill(host: LoraHost, prompts: list[list[int]], names: list[str]) -> KVBatch:
    """Each prompt but its last token alone into the cache (as the worker prefills on CPU),
    then one left-padded batch."""
    batches = []
    for prompt, name in zip(prompts, names, strict=True):
        ids = torch.tensor([prompt[:-1]])
        cache = new_cache(host.model.config)
        host.forward([name], input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache)
        batches.append(KVBatch(cache, torch.ones_like(ids)))
    batches[0].merge(*batches[1:])
    return batches[0]


def decode(
    host: LoraHost, prompts: list[list[int]], names: list[str], feed: list[list[int]] | None
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Logits per step, and the tokens fed (greedy unless `feed` gives them per step)."""
    steps = len(feed) if feed is not None else 6
    with torch.inference_mode():
        kv = prefill(host, prompts, names)
        tokens = [[p[-1] for p in prompts]]  # the first step reads each prompt's last token
        logits = []
        lengths = torch.tensor([[len(p) - 1] for p in prompts])
        for step in range(steps):
            fed = feed[step] if feed is not None else tokens[-1]
            out = host.decode(
                names,
                input_ids=torch.tensor(fed).view(-1, 1),
                position_ids=lengths + step,
                attention_mask=kv.step_mask(),
                cache=kv.cache,
            )
            logits.append(out)
            tokens.append(out.argmax(-1).tolist())
    return logits, tokens[:steps]  # tokens[s] is what step s read


def lean_and_alone(host: LoraHost, tokenizer: Any, names: list[str], exact: bool = True) -> None:
    """The batch's lean steps equal each row decoded alone through the forward: bit for bit
    where the linear layers' rows are independent of their batch (packed layers, or one row),
    else (dense fp32 matmuls) to fp32 rounding."""
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(len(names))]
    host.lean_enabled = True
    before = host.steps["lean"]
    batch, fed = decode(host, prompts, names, None)
    assert host.steps["lean"] == before + len(batch)
    host.lean_enabled = False
    try:
        for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
            alone, _ = decode(host, [prompt], [name], [[step[i]] for step in fed])
            for step, (a, b) in enumerate(zip(batch, alone, strict=True)):
                if exact:
                    assert torch.equal(a[i], b[0]), f"row {i} ({name}) differs at step {step}"
                else:
                    torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)
    finally:
        host.lean_enabled = True


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
        ["s2"],
        [BASE, BASE, BASE],  # padded rows
        ["s1", "s2", "s3"],  # every row its own adapter
        ["s2", BASE, "s2", "s1"],  # repeats and base rows beside adapter rows
        ["s3", "s3"],  # one adapter for the whole batch
    ],
)
def test_lean_steps_equal_the_forward(tokenizer: Any, adapters_dir: Path, names: list[str]) -> None:
    """Dense tiny model: one row is exact; a batch is exact but for the dense matmuls."""
    host = with_adapters(build_model(len(tokenizer)), tokenizer, adapters_dir, 3)
    lean_and_alone(host, tokenizer, names, exact=len(names) == 1)


def test_a_model_without_adapters_takes_the_lean_step(tokenizer: Any) -> None:
    host = LoraHost(build_model(len(tokenizer)))
    lean_and_alone(host, tokenizer, [BASE, BASE], exact=False)
    assert host.steps["lean"] == 6


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
    lean_and_alone(host, tokenizer, ["s1", BASE, "s2", "s1"])
    lean_and_alone(host, tokenizer, ["s2", "s2", "s2"])  # one adapter for every row


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
    lean_and_alone(host, tok, [BASE, BASE, BASE])
