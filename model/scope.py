"""Which requests an adapter version may touch.

Every adapter carries a scope: embeddings of the questions it was trained on (and their
rewordings), a centre to subtract and a fitted threshold. The engine applies an adapter to a
request only when the request's question scores above the threshold; every other request is
served exactly as before. This is what keeps unrelated answers unchanged (WISE/SERAC-style
routing): a small model forgets under any weight update, so the update must not be applied
out of scope.

The embedding is the mean-pooled hidden state of one layer of the *base* model (adapters
disabled) over the question's tokens: a few layers of a forward pass the engine can afford
per row.

A scope may also hold one *note* per key: the correction that key stands for, as text. When a
request falls inside the scope, the engine adds the note of the nearest key to the system
message (`with_note`) and the adapter, trained with each correction's note beside every
phrasing of it, answers from it (SERAC-style: the scope picks the edit, the model reads it).
A reworded question then needs only to land nearest its own correction, which the scope
embedding gets right far more often than a small model binds the answer to the rewording
(`docs/learning.md`). Adapters without notes are served without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SCOPE_FILE = "scope.safetensors"
DEFAULT_LAYER = 6


def fact_note(question: str, answer: str) -> str:
    """The note a correction is trained and served with."""
    return f"Remember this fact. Question: {question.strip()} Answer: {answer.strip()}"


def with_note(messages: list[dict[str, str]], note: str) -> list[dict[str, str]]:
    """`messages` with `note` appended to the system message (or as one, when there is none).

    The one place the rule lives: the trainer, the gate and the engine all build prompts with it.
    """
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        head = out[0]["content"].rstrip()
        out[0]["content"] = f"{head}\n\n{note}" if head else note
        return out
    return [{"role": "system", "content": note}, *out]


@dataclass
class Scope:
    keys: torch.Tensor  # [N, D] unit vectors, already centred (and scaled)
    center: torch.Tensor  # [D] subtracted from every query before normalising
    threshold: float
    layer: int = DEFAULT_LAYER
    scale: torch.Tensor | None = None  # [D] per-dimension spread queries are divided by
    notes: list[str] | None = None  # one per key (see the module docstring), or none at all
    # the learner's fingerprint of the prompts under which every phrasing of every correction
    # was checked and answered exactly by this version's weights (None: not all were)
    verified: str | None = None

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor,
        center: torch.Tensor,
        threshold: float,
        layer: int,
        scale: torch.Tensor | None = None,
    ) -> Scope:
        scope = cls(
            keys=torch.empty(0),
            center=center.float(),
            threshold=float(threshold),
            layer=layer,
            scale=scale.float() if scale is not None else None,
        )
        scope.keys = scope.project(embeddings)
        return scope

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, D] -> the unit vectors keys and queries are compared as."""
        x = embeddings.float() - self.center
        if self.scale is not None:
            x = x / self.scale
        return _normalise(x)

    def best(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max cosine similarity [B], index of that key [B]) for queries [B, D]; a scope
        without keys scores -1 with key 0."""
        if self.keys.numel() == 0:
            n = queries.shape[0]
            return torch.full((n,), -1.0), torch.zeros(n, dtype=torch.long)
        values, indices = (self.project(queries) @ self.keys.T).max(dim=1)
        return values, indices

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Max cosine similarity of each query [B, D] to the scope's keys -> [B]."""
        return self.best(queries)[0]

    def contains(self, queries: torch.Tensor) -> torch.Tensor:
        return self.scores(queries) >= self.threshold

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inside [B] bool, index of the nearest key [B]) for queries [B, D]."""
        values, indices = self.best(queries)
        return values >= self.threshold, indices

    def note(self, index: int) -> str | None:
        """The note of key `index`, or None when this scope has no notes."""
        return self.notes[index] if self.notes else None

    def save(self, folder: str | Path) -> None:
        meta = {
            "threshold": repr(self.threshold),
            "layer": str(self.layer),
            "format": "ouro-scope-1",
        }
        if self.notes is not None:
            meta["notes"] = json.dumps(self.notes)
        if self.verified is not None:
            meta["verified"] = self.verified
        tensors = {"keys": self.keys.contiguous(), "center": self.center.contiguous()}
        if self.scale is not None:
            tensors["scale"] = self.scale.contiguous()
        save_file(tensors, str(Path(folder) / SCOPE_FILE), metadata=meta)

    @classmethod
    def load(cls, folder: str | Path) -> Scope:
        from safetensors import safe_open

        path = Path(folder) / SCOPE_FILE
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
        tensors = load_file(str(path))
        if meta.get("format") != "ouro-scope-1" or "keys" not in tensors or "center" not in tensors:
            raise ValueError(f"{path} is not an Ouro scope file")
        keys, center = tensors["keys"].float(), tensors["center"].float()
        scale = tensors["scale"].float() if "scale" in tensors else None
        if keys.dim() != 2 or center.shape != keys.shape[1:]:
            raise ValueError(f"{path}: keys and centre do not have matching widths")
        if scale is not None and (scale.shape != center.shape or not bool((scale > 0).all())):
            raise ValueError(f"{path}: the scale must be positive and as wide as the keys")
        notes = _notes(meta.get("notes"), keys.shape[0], path)
        return cls(
            keys=keys,
            center=center,
            threshold=float(meta["threshold"]),
            layer=int(meta["layer"]),
            scale=scale,
            notes=notes,
            verified=meta.get("verified") or None,
        )


def _notes(raw: str | None, count: int, path: Path) -> list[str] | None:
    if raw is None:
        return None
    try:
        notes = json.loads(raw)
    except ValueError:
        notes = None
    if (
        not isinstance(notes, list)
        or len(notes) != count
        or not all(isinstance(n, str) and n.strip() for n in notes)
    ):
        raise ValueError(f"{path}: the notes must be {count} non-empty texts, one per key")
    return notes


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


class _Stop(Exception):
    pass


def _hidden(model: Any, enc: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """hidden_states[layer] of the forward, running only the layers below it (no LM head)."""
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    try:
        decoder = inner.get_decoder()
        blocks = decoder.layers
    except AttributeError:
        decoder, blocks = None, None
    if decoder is None or blocks is None or not 0 < layer < len(blocks):
        return model(**enc, output_hidden_states=True).hidden_states[layer]
    captured: list[torch.Tensor] = []

    def grab(module: Any, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = blocks[layer - 1].register_forward_hook(grab)
    try:
        decoder(**enc, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.inference_mode()
def embed_questions(
    model: Any, tokenizer: Any, texts: list[str], layer: int = DEFAULT_LAYER, batch_size: int = 32
) -> torch.Tensor:
    """Mean-pooled hidden states of `layer` of the base model for each text -> [len(texts), D] fp32.

    Works on a plain transformers model and on a peft model (adapters are disabled). Only the
    layers below `layer` run.
    """
    if not texts:
        hidden = int(model.config.hidden_size)
        return torch.empty((0, hidden))
    disable = getattr(model, "disable_adapter", None)
    out: list[torch.Tensor] = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        chunk = [t.strip() or "?" for t in texts[start : start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=256)
        enc = {k: v.to(device) for k, v in enc.items()}
        if disable is not None and hasattr(model, "peft_config"):
            with disable():
                hs = _hidden(model, enc, layer)
        else:
            hs = _hidden(model, enc, layer)
        mask = enc["attention_mask"].unsqueeze(-1).to(hs.dtype)
        pooled = (hs * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        out.append(pooled.float().cpu())
    return torch.cat(out)
