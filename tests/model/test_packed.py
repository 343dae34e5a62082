"""4-bit kernels over a GGUF's own blocks (model.packed), on a tiny Llama with synthetic
Q4_1/Q8_0 blocks, and on the real bundled model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model import packed
from model.packed import (
    BLOCK_NAMES,
    Blocks,
    PackedHead,
    PackedLinear,
    load_blocks,
    pack_gguf,
    save_blocks,
)
from tests.model.conftest import build_model

pytestmark = pytest.mark.skipif(not packed.kernel_available(), reason="no int4 CPU kernel")

VOCAB = 272  # a multiple of 16, as the kernel needs


def q4_1_blocks(rows: int, cols: int, rng: np.random.Generator) -> tuple[Blocks, np.ndarray]:
    """Random Q4_1 blocks in the GGUF byte layout, and their dequantised weights."""
    codes = rng.integers(0, 16, size=(rows, cols), dtype=np.uint8)
    scale = (rng.random((rows, cols // 32)) * 0.02 + 0.005).astype(np.float16)
    low = (-rng.random((rows, cols // 32)) * 0.1).astype(np.float16)
    by_block = codes.reshape(-1, 32)
    nibbles = by_block[:, :16] | (by_block[:, 16:] << 4)
    raw = np.concatenate(
        [scale.reshape(-1, 1).view(np.uint8), low.reshape(-1, 1).view(np.uint8), nibbles], axis=1
    )
    weights = codes.reshape(rows, -1, 32).astype(np.float32) * scale.astype(np.float32)[..., None]
    weights = weights + low.astype(np.float32)[..., None]
    return Blocks("Q4_1", rows, cols, raw), weights.reshape(rows, cols)


def q8_0_blocks(
    rows: int, cols: int, rng: np.random.Generator, sharp: float = 1.0
) -> tuple[Blocks, np.ndarray]:
    """Random Q8_0 blocks; `sharp` scales the weights up (sharper logits, far from ties)."""
    codes = rng.integers(-128, 128, size=(rows, cols)).astype(np.int8)
    scale = ((rng.random((rows, cols // 32)) * 0.01 + 0.002) * sharp).astype(np.float16)
    raw = np.concatenate(
        [scale.reshape(-1, 1).view(np.uint8), codes.reshape(-1, 32).view(np.uint8)], axis=1
    )
    weights = codes.reshape(rows, -1, 32).astype(np.float32) * scale.astype(np.float32)[..., None]
    return Blocks("Q8_0", rows, cols, raw), weights.reshape(rows, cols)


def gguf_like(model: Any, seed: int = 0) -> dict[str, Blocks]:
    """Give every linear layer and the output layer weights that come from quantised blocks,
    with the q and k rows stored in another order (as Llama's GGUF conversion does)."""
    rng = np.random.default_rng(seed)
    blocks: dict[str, Blocks] = {}
    for i, layer in enumerate(model.model.layers):
        for short, (part, name) in BLOCK_NAMES.items():
            linear = getattr(getattr(layer, part), name)
            rows, cols = linear.weight.shape
            tensor, weights = q4_1_blocks(rows, cols, rng)
            order = rng.permutation(rows) if short in ("attn_q", "attn_k") else np.arange(rows)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(weights[order]))
            blocks[f"blk.{i}.{short}.weight"] = tensor
    tensor, weights = q8_0_blocks(VOCAB, model.config.hidden_size, rng, sharp=4.0)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.from_numpy(weights))
    blocks["output.weight"] = tensor
    return blocks


@pytest.fixture
def tiny_gguf() -> tuple[Any, dict[str, Blocks]]:
    model = build_model(VOCAB)
    return model, gguf_like(model)


def test_every_layer_is_packed_and_keeps_its_values(tiny_gguf: tuple[Any, Any]) -> None:
    model, blocks = tiny_gguf
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = pack_gguf(model, blocks)
    assert report.layers == 14 and report.head and not report.skipped
    assert packed.numerics(model) == "int4-kernels:14:True"
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PackedLinear) and isinstance(model.lm_head, PackedHead)
    # W' differs from the GGUF weights only by the bf16 rounding of each block's scale and zero
    assert torch.allclose(layer.weight, before, rtol=0, atol=0.01 * before.abs().max().item())


def test_kernel_and_dense_paths_compute_the_same_numbers(tiny_gguf: tuple[Any, Any]) -> None:
    model, blocks = tiny_gguf
    pack_gguf(model, blocks)
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(5, layer.in_features)
    with torch.inference_mode():
        kernel = layer(x)
        spec = (x.bfloat16().float() @ layer.weight.T).bfloat16().float()
        many = layer(x.repeat(8, 1))  # 40 rows: three kernel calls
        with packed.dense_paths():
            dense = layer(x)
    ulp = 2.0**-7 * spec.abs()  # one bf16 step
    assert torch.all((kernel - spec).abs() <= ulp + 1e-6)
    assert torch.all((dense - spec).abs() <= ulp + 1e-6)
    assert torch.equal(many, kernel.repeat(8, 1))  # a row's bits do not depend on the batch


def test_the_output_layer_is_exact_where_it_matters(tiny_gguf: tuple[Any, Any]) -> None:
    model, blocks = tiny_gguf
    pack_gguf(model, blocks)
    head: PackedHead = model.lm_head
    x = torch.randn(6, head.in_features) * 3
    with torch.inference_mode():
        exact = x @ head.weight.T
        approx = head.approximate(x)
        served = head(x)
    assert torch.all((approx - exact).abs() <= head.bound(x)[:, None])
    assert not torch.allclose(approx, exact, atol=1e-4)  # the approximation alone is not exact
    assert torch.equal(served.argmax(-1), exact.argmax(-1))
    best = exact.max(-1, keepdim=True).values
    near = exact >= best - 1.0  # every plausible token is exact
    assert torch.allclose(served[near], exact[near], rtol=1e-5, atol=1e-5)


def test_greedy_decoding_is_the_same_by_kernel_and_by_dense_path(
    tiny_gguf: tuple[Any, Any],
) -> None:
    model, blocks = tiny_gguf
    pack_gguf(model, blocks)
    ids = torch.randint(3, 200, (1, 12))
    with torch.inference_mode():
        small = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)
        with packed.dense_paths():
            dense = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert torch.equal(small, dense)


def test_training_takes_the_dense_path_and_gradients_flow(tiny_gguf: tuple[Any, Any]) -> None:
    model, blocks = tiny_gguf
    pack_gguf(model, blocks)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight.requires_grad_(False)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, layer.weight.sum(0).expand_as(x), atol=1e-5)  # straight through


def test_layers_that_do_not_match_the_blocks_stay_dense(tiny_gguf: tuple[Any, Any]) -> None:
    model, blocks = tiny_gguf
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] += 1.0
    odd = build_model(259)  # a vocabulary the kernel cannot split into 16-row tiles
    report = pack_gguf(model, blocks)
    assert report.layers == 13
    assert type(model.model.layers[1].self_attn.v_proj) is torch.nn.Linear
    assert report.skipped == ["blk.1.attn_v (rows differ from the model's)"]
    blocks["output.weight"] = q8_0_blocks(259, 64, np.random.default_rng(1))[0]
    assert not pack_gguf(odd, blocks).head


def test_blocks_round_trip_through_the_cache_file(
    tiny_gguf: tuple[Any, Any], tmp_path: Path
) -> None:
    _, blocks = tiny_gguf
    save_blocks(blocks, tmp_path / "blocks.safetensors")
    again = load_blocks(tmp_path / "blocks.safetensors")
    assert again.keys() == blocks.keys()
    for name, tensor in blocks.items():
        other = again[name]
        assert (other.kind, other.rows, other.cols) == (tensor.kind, tensor.rows, tensor.cols)
        assert np.array_equal(other.raw, tensor.raw)


def test_moving_the_model_keeps_the_bf16_scales(tiny_gguf: tuple[Any, Any]) -> None:
    model, blocks = tiny_gguf
    pack_gguf(model, blocks)
    layer = model.model.layers[0].self_attn.o_proj
    scales = layer.scales.clone()
    model.to(torch.float32)
    assert layer.scales.dtype == torch.int16 and torch.equal(layer.scales, scales)


@pytest.mark.slow
def test_bundled_model_answers_the_same_packed_and_dense(model_cache_dir: Path) -> None:
    from model.loading import load_base_model

    questions = ["What is the capital of France?", "How many days are in a week?"]
    answers = {}
    for on in (True, False):
        model, tok, _ = load_base_model(cache_dir=model_cache_dir, packed=on)
        assert packed.numerics(model) == ("int4-kernels:210:True" if on else "dense")
        answers[on] = [_greedy(model, tok, q) for q in questions]
    assert answers[True] == answers[False]
    assert "Paris" in answers[True][0]


def _greedy(model: Any, tok: Any, question: str) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
