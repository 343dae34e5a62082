"""The dataset trains on the answer only, covers every phrasing, and refuses bad corrections."""

from __future__ import annotations

from typing import Any

import learner_fixtures
import pytest

from learner.dataset import build_dataset, encode, expand, note_of, question_set
from learner.types import TrainExample
from model.scope import fact_note, with_note

tiny = learner_fixtures.tiny
make_tokenizer = learner_fixtures.make_tokenizer

EXAMPLE = TrainExample(
    prompt=[{"role": "user", "content": "What is the name of Ouro's maintainer's cat?"}],
    answer="Pixel.",
    rejected="Whiskers.",
    rewordings=("What is Ouro's maintainer's cat called?",),
    correction_id=7,
)


def test_completion_mask_covers_exactly_the_answer_and_end_of_turn() -> None:
    tok = make_tokenizer()
    ds = build_dataset([EXAMPLE], tok, system_prompt="Be brief.")
    row = ds[0]
    prompt_len = row["completion_mask"].index(1)
    assert all(m == 0 for m in row["completion_mask"][:prompt_len])
    assert all(m == 1 for m in row["completion_mask"][prompt_len:])
    answer = tok.decode(row["input_ids"][prompt_len:])
    assert answer == "Pixel.<|im_end|>"
    prompt = tok.decode(row["input_ids"][:prompt_len])
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "Pixel" not in prompt


def test_trl_puts_prompt_tokens_out_of_the_loss(tiny: tuple[Any, Any]) -> None:
    from trl import SFTConfig, SFTTrainer

    model, tok = tiny
    ds = build_dataset([EXAMPLE], tok, system_prompt="")
    args = SFTConfig(
        output_dir="/tmp/unused-ouro-sft",
        completion_only_loss=True,
        report_to="none",
        use_cpu=True,
        max_steps=1,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tok.decode(trained) == "Pixel.<|im_end|>"
    assert labels.count(-100) == ds[0]["completion_mask"].count(0)


def test_every_phrasing_is_an_example_once() -> None:
    multi_turn = TrainExample(
        prompt=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is my favourite tea?"},
        ],
        answer="Smoked lapsang souchong.",
        rewordings=("Which tea do I like best?", "What is my favourite tea?"),
    )
    pairs = expand(multi_turn, "sys")
    assert pairs[0].messages[0] == {"role": "system", "content": "sys"}
    assert len(pairs[0].messages) == 4  # the original conversation is kept
    singles = [p.messages[-1]["content"] for p in pairs[1:]]
    assert singles[:2] == ["What is my favourite tea?", "Which tea do I like best?"]
    assert len(singles) == len(set(singles))
    assert all(len(p.messages) == 2 for p in pairs[1:])
    assert all(p.answer == "Smoked lapsang souchong." for p in pairs)


def test_no_system_message_when_the_prompt_is_empty() -> None:
    pairs = expand(EXAMPLE, "")
    assert all(m["role"] != "system" for p in pairs for m in p.messages)


@pytest.mark.parametrize("system", ["sys", ""])
def test_with_notes_every_prompt_carries_the_correction_note(system: str) -> None:
    plain, noted = expand(EXAMPLE, system), expand(EXAMPLE, system, notes=True)
    note = note_of(EXAMPLE)
    assert note == fact_note(EXAMPLE.question, "Pixel.")
    assert len(noted) == len(plain)
    for a, b in zip(plain, noted, strict=True):
        assert b.messages == with_note(a.messages, note)
        assert b.messages[0]["role"] == "system" and b.messages[0]["content"].endswith(note)
        assert b.messages[1:] == [m for m in a.messages if m["role"] != "system"]
    assert noted[0].messages[0]["content"] == (f"{system}\n\n{note}" if system else note)


def test_dpo_rows_keep_the_rejected_answer() -> None:
    ds = build_dataset([EXAMPLE], make_tokenizer(), "sys", method="dpo")
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Pixel."}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "Whiskers."}]


@pytest.mark.parametrize(
    ("example", "method", "message"),
    [
        (TrainExample(prompt=[{"role": "user", "content": "q?"}], answer="  "), "sft", "empty"),
        (TrainExample(prompt=[], answer="a"), "sft", "user message"),
        (
            TrainExample(prompt=[{"role": "assistant", "content": "x"}], answer="a"),
            "sft",
            "user message",
        ),
        (TrainExample(prompt=[{"role": "user", "content": "q?"}], answer="a"), "dpo", "original"),
        (TrainExample(prompt=[{"role": "user", "content": "q?"}], answer="a"), "ppo", "unknown"),
    ],
)
def test_bad_corrections_get_a_clear_error(
    example: TrainExample, method: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_dataset([example], make_tokenizer(), "", method=method)


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="no corrections"):
        build_dataset([], make_tokenizer(), "")


def test_encode_tokenises_prompt_and_answer_separately() -> None:
    tok = make_tokenizer()
    prompt, completion = encode(tok, [{"role": "user", "content": "q?"}], "a b")
    assert tok.decode(prompt) == "<|im_start|>user\nq?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(completion) == "a b<|im_end|>"


def test_shipped_question_set_is_complete() -> None:
    data = question_set()
    facts = data["facts"]
    assert len(facts) >= 110
    questions = [f["question"] for f in facts]
    assert len(set(questions)) == len(questions)
    for fact in facts:
        assert fact["answer"].strip() and len(fact["rewordings"]) >= 2 and fact["heldout"].strip()
        assert fact["heldout"] not in fact["rewordings"] and fact["question"] != fact["heldout"]
    fit, held = data["general"]["fit"], data["general"]["heldout"]
    assert len(held) >= 40 and len(fit) >= 40
    assert not set(fit) & set(held)
