"""Teacher-forced scoring reads the answer positions exactly as a full forward would."""

from __future__ import annotations

import math
from typing import Any

import learner_fixtures
import torch

from learner.forced import first_miss, perplexity, score

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


def test_first_miss_stops_at_the_first_chunk_with_a_miss(
    tiny: tuple[Any, Any], monkeypatch: Any
) -> None:
    import learner.forced as forced

    model, tok = tiny
    prompt = tok.encode("What is the cat called?")
    with torch.inference_mode():
        own = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax().item())
    hit, miss = (prompt, [own]), (prompt, [(own + 1) % model.config.vocab_size])
    chunks: list[int] = []
    real = forced.score
    monkeypatch.setattr(
        forced, "score", lambda m, items, **kw: chunks.append(1) or real(m, items, **kw)
    )
    pad = tok.pad_token_id
    assert first_miss(model, [hit] * 5, pad_id=pad, chunk=2) is None
    assert len(chunks) == 3  # every chunk scored
    chunks.clear()
    assert first_miss(model, [hit, miss, *[hit] * 3], pad_id=pad, chunk=2) == 1
    assert len(chunks) == 1  # the first chunk missed: the rest were not scored
    chunks.clear()
    assert first_miss(model, [*[hit] * 4, miss], pad_id=pad, chunk=2) == 4
    assert len(chunks) == 3


def test_a_shared_prefix_runs_once_with_the_same_logits_and_gradients(
    tiny: tuple[Any, Any], monkeypatch: Any
) -> None:
    from peft import LoraConfig, get_peft_model

    import learner.forced as forced

    model, tok = tiny
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    try:
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        system = tok.encode("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n")
        rows = [system + tok.encode(q) for q in ("Cat?", "The dog's name, please?", "Hi")]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        select = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(rows):  # right padding, as the collator and `score` pad
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            select[i, len(system) + 1 : len(r)] = True
        assert forced.shared_prefix(ids, mask, select) == len(system)

        def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
            lora.zero_grad()
            logits = forced.logits_at(lora, ids, mask, select)
            logits.logsumexp(-1).sum().backward()
            grads = [p.grad.clone() for n, p in lora.named_parameters() if "lora_" in n]
            return logits.detach(), grads

        shared_logits, shared_grads = run()
        monkeypatch.setattr(forced, "MIN_SHARED_PREFIX", 10**9)  # the plain forward
        plain_logits, plain_grads = run()
    finally:
        lora.unload()
    assert torch.allclose(shared_logits, plain_logits, atol=1e-4, rtol=1e-4)
    for got, want in zip(shared_grads, plain_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-3)
    # no shared run: left padding, or a row selected inside the common part
    left = torch.cat([torch.zeros((3, 1), dtype=ids.dtype), ids], dim=1)
    assert forced.shared_prefix(left, torch.cat([mask[:, :1] * 0, mask], 1), select) == 0
    early = select.clone()
    early[0, 3] = True
    assert forced.shared_prefix(ids, mask, early) == 3
