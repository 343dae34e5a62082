"""LocalEngine on the real bundled SmolLM2-135M (fp32, CPU): a few lean integration checks."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from model.engine import LocalEngine
from model.interface import AdapterSpec, ChatMessage, GenerationRequest, SamplingParams
from model.lora import embed_base
from model.scope import DEFAULT_LAYER, Scope, embed_questions

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "Say hello."]


def ask(question: str, user: str | None = None, n: int = 40) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("user", question),),
        user_key=user,
        sampling=SamplingParams(max_new_tokens=n),
    )


def hf_greedy(model: Any, tok: Any, question: str, n: int) -> str:
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


async def test_bundled_answers_like_generate_alone_and_batched(
    bundled: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = bundled
    expected = hf_greedy(model, tok, QUESTIONS[0], 40)
    async with LocalEngine("bundled", adapters_dir=tmp_path, loaded=(model, tok)) as engine:
        alone = await engine.generate(ask(QUESTIONS[0]))
        refs = [alone.text] + [(await engine.generate(ask(q))).text for q in QUESTIONS[1:]]
        batched = await asyncio.gather(*(engine.generate(ask(q)) for q in QUESTIONS))
    assert alone.text == expected
    assert "Paris" in alone.text
    assert alone.finish_reason == "stop"  # stopped on <|im_end|>, not the length limit
    # every row is computed as it would be alone (model.decode), free-form answers included
    assert [r.text for r in batched] == refs
    assert all(r.text and r.finish_reason == "stop" for r in batched)


async def test_bundled_scope_routing_with_truncated_embeddings(
    bundled: tuple[Any, Any], tmp_path: Path
) -> None:
    """A real-width adapter: in-scope rows change, out-of-scope rows in the batch do not."""
    from peft import LoraConfig, get_peft_model

    model, tok = copy.deepcopy(bundled[0]), bundled[1]  # peft wraps the model in place
    texts = [QUESTIONS[0], QUESTIONS[2]]
    fast = embed_base(model, [], tok, texts, {DEFAULT_LAYER})[DEFAULT_LAYER]
    assert torch.allclose(fast, embed_questions(model, tok, texts), atol=1e-4)

    # a LoRA on a throwaway copy of the same architecture: only its weights are saved
    from transformers import LlamaForCausalLM

    shell = LlamaForCausalLM(model.config)
    peft_model = get_peft_model(shell, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    folder = tmp_path / "u1-v1"
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    keys = embed_questions(model, tok, [QUESTIONS[0]])
    center = embed_questions(model, tok, ["hello", "tell me a story", "what time is it"]).mean(0)
    scope = Scope.from_embeddings(keys, center, threshold=0.0, layer=DEFAULT_LAYER)
    outside_score = float(scope.scores(fast[1:])[0])
    assert outside_score < 0.99, "test setup: the two questions must be told apart"
    scope.threshold = (1.0 + outside_score) / 2
    scope.save(folder)

    async with LocalEngine("bundled", adapters_dir=tmp_path, loaded=(model, tok)) as engine:
        # each alone: a row's answer does not depend on its batch (model.decode)
        base_in = (await engine.generate(ask(QUESTIONS[0], n=12))).text
        base_out = (await engine.generate(ask(QUESTIONS[2], n=12))).text
        await engine.activate(AdapterSpec("u1-v1", str(folder), owner="1"))
        inside, outside = await asyncio.gather(
            engine.generate(ask(QUESTIONS[0], user="1", n=12)),
            engine.generate(ask(QUESTIONS[2], user="1", n=12)),
        )
    assert inside.adapter_version == "u1-v1" and inside.text != base_in
    assert outside.adapter_version is None and outside.text == base_out
