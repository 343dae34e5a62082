"""Shared fixtures for the learner-quality tests: a tiny random Llama and the bundled model.

Imported by the test modules (`from learner_fixtures import ...`), not a conftest, so the
operational learner tests keep their own conftest free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer() -> Any:
    """Byte-level tokenizer (one token per byte) with ChatML markers: no files, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<|im_end|>", bos_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def make_tiny_model(tokenizer: Any, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # confident logits: learns a correction in a few steps
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture
def tiny() -> tuple[Any, Any]:
    """(model, tokenizer): a fresh 3-layer random Llama each test (tests may train it)."""
    tokenizer = make_tokenizer()
    return make_tiny_model(tokenizer), tokenizer


@pytest.fixture(scope="session")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The bundled SmolLM2-135M (converted once into OURO_TEST_MODEL_CACHE or a temp folder)."""
    from model.loading import ModelNotFoundError, load_base_model

    cache = os.environ.get("OURO_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("model-cache"))
    try:
        model, tokenizer, _ = load_base_model(device="cpu", dtype="float32", cache_dir=Path(cache))
    except ModelNotFoundError as exc:
        pytest.skip(f"bundled model not installed: {exc}")
    return model, tokenizer
