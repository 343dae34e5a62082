"""The eval benchmark: rows in the WISE columns, a markdown table, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import learner_fixtures
import pytest

from learner.evaluate import fact_examples, format_table, run_eval
from learner.types import TrainConfig

tiny = learner_fixtures.tiny


def test_fact_examples_hold_out_one_rewording() -> None:
    train, held = fact_examples(3)
    assert len(train) == len(held) == 3
    for t, h in zip(train, held, strict=True):
        assert t.prompt == h.prompt and t.answer == h.answer
        assert len(h.rewordings) == 1 and h.rewordings[0] not in t.rewordings
        assert len(t.rewordings) >= 2
    with pytest.raises(ValueError, match="between 1 and"):
        fact_examples(0)
    with pytest.raises(ValueError, match="between 1 and"):
        fact_examples(10_000)


def test_run_eval_reports_each_count(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    cfg = TrainConfig(learning_rate=1e-2, max_steps=30, system_prompt="sys")
    lines: list[str] = []
    rows = run_eval(model, tok, counts=(1,), work_dir=tmp_path, config=cfg, log=lines.append)
    assert [r["corrections"] for r in rows] == [1]
    row = rows[0]
    for key in ("rel", "gen", "loc", "avg"):
        assert 0.0 <= row[key] <= 1.0
    assert row["avg"] == pytest.approx((row["rel"] + row["gen"] + row["loc"]) / 3)
    assert row["rel"] == 1.0 and row["learned"]  # the tiny model learns one fact
    assert Path(row["adapter_dir"], "adapter_model.safetensors").is_file()
    assert len(lines) == 1 and lines[0].startswith("| 1 |")
    assert row["group"] == 0 and row["mode"] == "scratch" and not row["resumed"]


def test_sequential_eval_builds_each_version_on_the_last_in_every_group(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    cfg = TrainConfig(learning_rate=1e-2, max_steps=30, system_prompt="sys")
    rows = run_eval(
        model, tok, counts=(2, 1), work_dir=tmp_path, config=cfg, groups=2, sequential=True
    )
    assert [(r["group"], r["corrections"]) for r in rows] == [
        (0, 1),
        (0, 2),
        (1, 1),
        (1, 2),
        ("mean", 1),
        ("mean", 2),
    ]
    assert [r["resumed"] for r in rows[:4]] == [False, True, False, True]
    assert {r["mode"] for r in rows} == {"sequential"}
    first, second = rows[1]["adapter_dir"], rows[3]["adapter_dir"]
    assert "g0-seq2" in first and "g1-seq2" in second  # groups use disjoint facts (see below)
    mean = rows[4]
    for key in ("rel", "gen", "loc", "train_seconds"):
        assert mean[key] == pytest.approx((rows[0][key] + rows[2][key]) / 2)
    assert fact_examples(2, 2)[0][0].correction_id == 2


def test_eval_refuses_more_facts_than_shipped(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    with pytest.raises(ValueError, match="need 200 facts"):
        run_eval(model, tok, counts=(100,), work_dir=tmp_path, groups=2)
    with pytest.raises(ValueError, match="groups must be at least 1"):
        run_eval(model, tok, counts=(1,), work_dir=tmp_path, groups=0)
    with pytest.raises(ValueError, match="first group must be between 0 and 1"):
        run_eval(model, tok, counts=(1,), work_dir=tmp_path, groups=2, first_group=2)


def test_a_stopped_eval_can_finish_from_a_later_group(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    cfg = TrainConfig(learning_rate=1e-2, max_steps=30, system_prompt="sys")
    rows = run_eval(model, tok, counts=(1,), work_dir=tmp_path, config=cfg, groups=3, first_group=2)
    assert [(r["group"], r["corrections"]) for r in rows] == [(2, 1)]  # one group: no mean row
    assert "eval-g2-1-" in rows[0]["adapter_dir"]


def test_format_table_is_markdown() -> None:
    row = {
        "corrections": 10,
        "rel": 1.0,
        "gen": 0.9,
        "loc": 0.98,
        "avg": 0.96,
        "steps": 12,
        "train_seconds": 42.4,
        "gate_seconds": 3.2,
    }
    table = format_table([row]).splitlines()
    assert table[0].startswith("| Corrections | Rel. | Gen. | Loc. | Avg. |")
    assert table[2] == "| 10 | 1.00 | 0.90 | 0.98 | 0.96 | 12 | 42 | 3 | 0 | scratch |"
