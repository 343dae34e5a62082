"""Teacher-forced scoring reads the answer positions exactly as a full forward would."""

from __future__ import annotations

import math
from typing import Any

import learner_fixtures
import torch

from learner.forced import perplexity, score

tiny = learner_fixtures.tiny


def _reference(model: Any, prompt: list[int], completion: list[int]) -> tuple[bool, float]:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    pos = logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    target = torch.tensor(completion)
    nll = torch.nn.functional.cross_entropy(pos, target, reduction="sum")
    return bool((pos.argmax(-1) == target).all()), float(nll)


def test_scores_match_the_full_forward_with_and_without_lora(tiny: tuple[Any, Any]) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    items = [
        (tok.encode("What is the cat called?"), tok.encode(" Pixel.")),
        (tok.encode("Hi"), tok.encode(" Hello there, friend.")),
        (tok.encode("A much longer question about nothing at all?"), tok.encode(" No.")),
        (tok.encode("Empty?"), []),
    ]
    # make one answer the model's own greedy continuation, so `exact` is exercised both ways
    with torch.inference_mode():
        own = model(input_ids=torch.tensor([items[0][0]])).logits[0, -1].argmax().item()
    items.append((items[0][0], [int(own)]))
    plain = score(model, items, pad_id=tok.pad_token_id, batch_size=3)
    assert plain[4].exact and plain[3].exact and plain[3].tokens == 0
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tuned = score(lora, items, pad_id=tok.pad_token_id, batch_size=3)
    assert [s.nll for s in tuned] != [s.nll for s in plain]  # the LoRA is in the scored path
    for got, scored_model in ((plain, lora.get_base_model()), (tuned, lora)):
        for (prompt, completion), s in zip(items, got, strict=True):
            if not completion:
                continue
            if got is plain:
                with lora.disable_adapter():
                    exact, nll = _reference(scored_model, prompt, completion)
            else:
                exact, nll = _reference(scored_model, prompt, completion)
            assert s.exact == exact and s.tokens == len(completion)
            assert math.isclose(s.nll, nll, rel_tol=1e-4, abs_tol=1e-4)
    assert perplexity(tuned) > 1.0
