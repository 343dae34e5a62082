"""The pieces under continuous batching: KV merging, detokenising, sampling, scope embeddings."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from model.batching import GROW, Detokenizer, GrowingLayer, KVBatch, left_pad, sample
from model.lora import BASE, embed_base
from model.scope import embed_questions


def _kv(batch: int, length: int, fill: float, layers: int = 2) -> KVBatch:
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in range(layers)]
    for i in range(layers):
        keys = torch.full((batch, 2, length, 4), fill)
        cache.update(keys, -keys, i)
    return KVBatch(cache, torch.ones((batch, length), dtype=torch.long))


def test_growing_layer_appends_in_place_and_matches_a_dynamic_layer() -> None:
    grown, plain = GrowingLayer(), DynamicLayer()
    steps = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, GROW, 1)]
    buffers = []
    for step in steps:
        k, v = grown.update(step, step * 2)
        pk, pv = plain.update(step, step * 2)
        assert torch.equal(k, pk) and torch.equal(v, pv)
        buffers.append(k.untyped_storage().data_ptr())
    assert buffers[0] == buffers[1] == buffers[2]  # decode steps wrote into the same buffer
    assert buffers[3] != buffers[2]  # it filled up: a bigger one, once
    grown.assign(k[:1], v[:1])  # a row left
    k, _ = grown.update(steps[-1][:1], steps[-1][:1])
    assert torch.equal(k, torch.cat([pk[:1], steps[-1][:1]], dim=2))


def test_a_batch_refuses_layers_it_cannot_grow() -> None:
    cache = DynamicCache()
    cache.layers = [DynamicLayer()]
    try:
        KVBatch(cache, torch.ones((1, 1), dtype=torch.long))
    except TypeError as exc:
        assert "full-attention" in str(exc)
    else:
        raise AssertionError("a KVBatch accepted a layer it cannot append to in place")


def test_merge_left_pads_the_shorter_side_and_select_trims() -> None:
    running = _kv(2, 3, 1.0)
    newcomers = _kv(1, 5, 2.0)
    running.merge(newcomers)
    assert running.size == 3 and running.length == 5
    assert running.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = running.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 4)
    assert keys[0, :, :2].abs().sum() == 0 and keys[0, :, 2:].eq(1.0).all()
    assert keys[2].eq(2.0).all()
    running.step_mask()
    assert running.length == 6
    running.select([0, 1])  # the long row finished: its two padding columns go too
    assert running.length == 4
    assert running.mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert running.cache.layers[1].values.shape == (2, 2, 3, 4)  # cache lags the mask by a step
    assert running.cache.get_seq_length() == 3


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_detokenizer_never_splits_a_character(tokenizer: Any) -> None:
    text = "héllo € 😀 naïve, 日本語!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: characters really span several tokens
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_detokenizer_flush_drops_a_cut_off_character(tokenizer: Any) -> None:
    ids = tokenizer("ok 😀", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids[:-2]] + [detok.flush()]
    assert "".join(pieces) == "ok "


def test_sample_greedy_and_seeded() -> None:
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    assert sample(logits, 0.0, 1.0, None) == 1
    draws = {sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws >= {1, 3}
    nucleus = {sample(logits, 1.0, 0.4, torch.Generator().manual_seed(s)) for s in range(40)}
    assert nucleus == {1}
    a = [sample(logits, 1.0, 1.0, g) for g in [torch.Generator().manual_seed(3)] * 10]
    b = [sample(logits, 1.0, 1.0, g) for g in [torch.Generator().manual_seed(3)] * 10]
    assert a == b


def test_truncated_scope_embedding_equals_embed_questions(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    texts = ["what is the capital of france?", "hi", "  "]
    fast = embed_base(model, [], tok, texts, {1})
    slow = embed_questions(model, tok, texts, layer=1)
    assert torch.allclose(fast[1], slow, atol=1e-5)
    assert BASE == "__base__"
