"""Scope fitting: rewordings of a correction fall inside, general prompts outside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import learner_fixtures
import pytest
import torch

from learner.dataset import note_of, question_set
from learner.gate import general_prompts, route, routes
from learner.scope_fit import default_layer, fit_from_embeddings, fit_scope, general_fit_prompts
from learner.types import TrainExample
from model.scope import Scope

bundled = learner_fixtures.bundled
tiny = learner_fixtures.tiny


def _clusters(seed: int = 0) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """3 corrections x 3 phrasings around their own direction, a shared offset, general noise."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(32, generator=g) * 5  # what every embedding shares (centring removes it)
    topics = torch.randn(3, 32, generator=g)
    phr = topics.repeat_interleave(3, dim=0) + 0.2 * torch.randn(9, 32, generator=g) + offset
    held = topics + 0.2 * torch.randn(3, 32, generator=g) + offset
    general = torch.randn(40, 32, generator=g) + offset
    return phr, [3, 3, 3], general, held


def test_rewordings_in_general_prompts_out() -> None:
    phr, sizes, general, held = _clusters()
    scope, metrics = fit_from_embeddings(phr, sizes, general[:20], layer=4)
    assert scope.keys.shape == (3, 32) and scope.layer == 4
    assert torch.allclose(scope.keys.norm(dim=-1), torch.ones(3))
    assert scope.contains(held).all()
    assert not scope.contains(general[:20]).any()
    assert scope.contains(general[20:]).float().mean() <= 0.1  # unseen general prompts
    assert metrics["recall"] == 1.0 and metrics["fpr"] == 0.0 and metrics["auc"] == 1.0
    assert metrics["threshold"] > float(scope.scores(general[:20]).max())


def test_centring_is_what_separates_them() -> None:
    phr, sizes, general, _ = _clusters()
    plain = torch.nn.functional.normalize(phr, dim=-1)
    raw = (torch.nn.functional.normalize(general, dim=-1) @ plain.T).max(dim=1).values
    scope, _ = fit_from_embeddings(phr, sizes, general, layer=4)
    assert raw.min() > 0.8  # uncentred, everything looks alike
    assert scope.scores(general).max() < 0.8


def test_scope_round_trips_through_the_contract_file(tmp_path: Path) -> None:
    phr, sizes, general, held = _clusters()
    scope, _ = fit_from_embeddings(phr, sizes, general, layer=4)
    scope.save(tmp_path)
    loaded = Scope.load(tmp_path)
    assert loaded.threshold == scope.threshold and loaded.layer == 4
    assert loaded.scale is not None and scope.scale is not None
    assert torch.equal(loaded.scale, scope.scale)
    assert torch.equal(loaded.contains(held), scope.contains(held))


def test_scaling_stops_one_loud_dimension_from_deciding() -> None:
    """A dimension that swings wildly across ordinary questions would dominate every cosine;
    dividing by each dimension's spread over the general prompts takes its say away."""
    phr, sizes, general, held = _clusters()
    g = torch.Generator().manual_seed(1)
    for x in (phr, general, held):
        x[:, 0] = torch.randn(x.shape[0], generator=g) * 200
    scope, metrics = fit_from_embeddings(phr, sizes, general[:20], layer=4)
    assert scope.scale is not None and scope.scale[0] > 50 * scope.scale[1:].median()
    assert scope.contains(held).all() and metrics["recall"] == 1.0
    unscaled = Scope.from_embeddings(phr, general[:20].mean(0), threshold=0.0, layer=4)
    assert (unscaled.scores(general[20:]) > 0.9).float().mean() > 0.2  # the loud dimension wins


def test_scope_files_without_a_scale_still_load(tmp_path: Path) -> None:
    """Versions written before scaling existed keep routing as they did."""
    phr, _, general, held = _clusters()
    old = Scope.from_embeddings(phr, general.mean(0), threshold=0.5, layer=4)
    old.save(tmp_path)
    loaded = Scope.load(tmp_path)
    assert loaded.scale is None and torch.equal(loaded.scores(held), old.scores(held))


def test_a_corrupt_scale_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    phr, sizes, general, _ = _clusters()
    scope, _ = fit_from_embeddings(phr, sizes, general, layer=4)
    scope.save(tmp_path)
    meta = {"threshold": "0.5", "layer": "4", "format": "ouro-scope-1"}
    bad = {"keys": scope.keys, "center": scope.center, "scale": -torch.ones(32)}
    save_file(bad, str(tmp_path / "scope.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="scale"):
        Scope.load(tmp_path)


@pytest.mark.parametrize(
    ("sizes", "negatives"), [([], 3), ([2, 0], 3), ([3, 3], 3), ([3, 3, 3], 0)]
)
def test_bad_input_is_refused(sizes: list[int], negatives: int) -> None:
    phr, _, general, _ = _clusters()
    with pytest.raises(ValueError):
        fit_from_embeddings(phr, sizes, general[:negatives], layer=4)


def test_fit_on_a_model_keeps_corrected_general_questions_in_scope(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ex = TrainExample(prompt=[{"role": "user", "content": "Hello!"}], answer="Hi, I am Ouro.")
    scope, metrics = fit_scope(model, tok, [ex], ["Hello!", "What is 2 plus 2?", "Tell me a joke."])
    assert metrics["layer"] == default_layer(model) == 1
    assert route(model, tok, scope, ["Hello!"]).tolist() == [True]
    with pytest.raises(ValueError, match="every general prompt"):
        fit_scope(model, tok, [ex], ["hello!"])
    with pytest.raises(ValueError):
        fit_scope(model, tok, [], ["Hello!"])


@pytest.mark.slow
def test_bundled_model_scope_separates_held_out_prompts(bundled: tuple[Any, Any]) -> None:
    model, tok = bundled
    facts = question_set()["facts"][:10]
    examples = [
        TrainExample(
            prompt=[{"role": "user", "content": f["question"]}],
            answer=f["answer"],
            rewordings=tuple(f["rewordings"]),
        )
        for f in facts
    ]
    scope, metrics = fit_scope(model, tok, examples, general_fit_prompts())
    assert scope.layer == 8 and scope.scale is not None
    recall = route(model, tok, scope, [f["heldout"] for f in facts]).float().mean()
    fpr = route(model, tok, scope, general_prompts()).float().mean()
    assert recall >= 0.8, recall
    assert fpr <= 0.05, fpr
    assert metrics["auc"] >= 0.95


def test_notes_round_trip_one_per_key(tmp_path: Path) -> None:
    phr, sizes, general, held = _clusters()
    scope, _ = fit_from_embeddings(phr, sizes, general, layer=4)
    scope.notes = ["first fact", "second fact", "third fact"]
    scope.save(tmp_path)
    loaded = Scope.load(tmp_path)
    assert loaded.notes == scope.notes
    inside, nearest = loaded.nearest(held)
    assert inside.all() and nearest.tolist() == [0, 1, 2]  # each rewording: its own key
    assert [loaded.note(i) for i in nearest.tolist()] == scope.notes
    assert loaded.verified is None  # not set: nothing is claimed about the weights
    scope.verified = "0123abcd"
    scope.save(tmp_path)
    assert Scope.load(tmp_path).verified == "0123abcd"


@pytest.mark.parametrize("notes", ['["only one"]', '["a", "b", ""]', "not json", '{"a": 1}'])
def test_notes_that_do_not_match_the_keys_are_refused(tmp_path: Path, notes: str) -> None:
    from safetensors.torch import save_file

    phr, sizes, general, _ = _clusters()
    scope, _ = fit_from_embeddings(phr, sizes, general, layer=4)
    meta = {"threshold": "0.5", "layer": "4", "format": "ouro-scope-1", "notes": notes}
    tensors = {"keys": scope.keys, "center": scope.center}
    save_file(tensors, str(tmp_path / "scope.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="notes"):
        Scope.load(tmp_path)


def test_a_scope_without_notes_serves_none() -> None:
    phr, sizes, general, held = _clusters()
    scope, _ = fit_from_embeddings(phr, sizes, general, layer=4)
    assert scope.notes is None and scope.note(0) is None
    empty = Scope(keys=torch.empty(0), center=torch.zeros(32), threshold=0.0)
    inside, _ = empty.nearest(held)
    assert not inside.any()


def test_fit_scope_attaches_each_corrections_note_in_order(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    examples = [
        TrainExample(prompt=[{"role": "user", "content": "Cat?"}], answer="Pixel."),
        TrainExample(
            prompt=[{"role": "user", "content": "Dog?"}], answer="Rex.", rewordings=("The dog?",)
        ),
    ]
    general = ["What is 2 plus 2?", "Tell me a joke."]
    scope, _ = fit_scope(model, tok, examples, general, notes=True)
    assert scope.notes == [note_of(ex) for ex in examples]
    assert "Cat?" in scope.notes[0] and "Pixel." in scope.notes[0] and "Rex." in scope.notes[1]
    plain, _ = fit_scope(model, tok, examples, general)
    assert plain.notes is None and torch.equal(plain.keys, scope.keys)
    inside, notes = routes(model, tok, scope, ["Dog?", "Cat?"])
    assert inside == [True, True] and notes == scope.notes[::-1]
