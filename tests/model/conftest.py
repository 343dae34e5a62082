"""Inference-core fixtures: a tiny random Llama, a byte-level tokenizer, adapters on disk.

The tiny model is rebuilt per test (the engine wraps it in peft in place) from a fixed
seed, so every test sees the same weights and greedy outputs are reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from model.scope import Scope, embed_questions

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCOPE_LAYER = 1


def build_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens, no merges): multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=specials,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(vocab_size: int, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # sharper logits: greedy picks are far from ties, so batching cannot flip them
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture
def tiny(tokenizer: Any) -> tuple[Any, Any]:
    """A fresh (model, tokenizer) pair; the same weights in every test."""
    return build_model(len(tokenizer)), tokenizer


@pytest.fixture
def adapters_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapters"
    folder.mkdir()
    return folder


AdapterMaker = Callable[..., Path]


@pytest.fixture
def make_adapter(tokenizer: Any, adapters_dir: Path) -> AdapterMaker:
    """Write a random LoRA adapter whose scope is `questions`, as the learner publishes one."""

    def make(
        name: str,
        seed: int,
        questions: list[str],
        outside: list[str] | None = None,
        scale: float = 2.0,
    ) -> Path:
        from peft import LoraConfig, get_peft_model

        base = build_model(len(tokenizer))
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0)
        peft_model = get_peft_model(base, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        folder = adapters_dir / name
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        plain = build_model(len(tokenizer))
        keys = embed_questions(plain, tokenizer, questions, layer=SCOPE_LAYER)
        reference = embed_questions(
            plain, tokenizer, ["hello", "what time is it", "tell me"], layer=SCOPE_LAYER
        )
        center = reference.mean(dim=0)
        scope = Scope.from_embeddings(keys, center, threshold=0.0, layer=SCOPE_LAYER)
        others = outside or []
        top = 0.0
        if others:
            far = embed_questions(plain, tokenizer, others, layer=SCOPE_LAYER)
            top = float(scope.scores(far).max())
        assert top < 0.999, f"test setup: {others} too close to the scope ({top})"
        scope.threshold = (1.0 + top) / 2
        scope.save(folder)
        return folder

    return make


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("OURO_TEST_MODEL_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def bundled(model_cache: Path) -> Iterator[tuple[Any, Any]]:
    """The real bundled SmolLM2 (fp32, CPU, 4-bit kernels), loaded once per session for slow
    tests."""
    from model.loading import load_base_model

    model, tok, _ = load_base_model(cache_dir=model_cache, device="cpu", dtype="float32")
    yield model, tok
