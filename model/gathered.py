"""Per-row LoRA for a whole batch in two batched matmuls per layer (the Punica / S-LoRA idea).

peft's mixed-batch forward loops over the adapters in a batch: in every LoRA layer, for every
adapter, it indexes that adapter's rows, runs its A and B and adds the result back. That is a
handful of small operations per adapter per layer, so a decode step for 16 users on 16 adapters
costs about 16 times the kernel launches (and Python) of the same step on one adapter, and on a
CPU those launches, not the arithmetic, are the step's time.

Here, in every LoRA layer, the A and B weights of the adapters in the batch are stacked, lined
up with the rows (an all-zero pair for rows without an adapter), and applied with two `bmm`s,
however many adapters the batch holds:

    delta[i] = x[i] @ A[slot(i)]^T @ B[slot(i)]^T * scaling[slot(i)]

A decode step repeats its batch's adapter set until a row joins or leaves, so the stacks are
kept for the next step: copying 16 adapters' weights every step costs as much as the bmms and
more than everything else LoRA adds. They are a copy of those adapters' LoRA weights, held
while the set lasts and dropped whenever a slot is filled, created or deleted; a set whose
copy would exceed `max_bytes` is stacked afresh each forward instead. Rows without an adapter
get exactly the base output (adding a zero delta changes no bit).

Vanilla LoRA on Linear layers only; a batch touching anything else (DoRA and other variants,
LoRA on embeddings, modules_to_save, LoRA bias, adapters of different ranks in one layer) takes
peft's path, which computes the same thing more slowly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

BASE = "__base__"


@dataclass(frozen=True)
class _Layer:
    """One LoRA layer's weights for one batch's distinct adapters, in first-appearance order,
    then an all-zero pair for rows without an adapter."""

    a: torch.Tensor  # [distinct + 1, r, in]
    b: torch.Tensor  # [distinct + 1, out, r]
    scale: torch.Tensor  # [distinct + 1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.scale))


class Gather:
    """Decides whether a batch can be gathered, and runs its forward that way.

    Keeps the last adapter set's stacks (see the module docstring); the host calls `forget()`
    whenever a slot's weights change or slots come and go.
    """

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self.enabled = True
        self._key: tuple[int, tuple[str, ...]] | None = None
        self._layers: list[tuple[Any, _Layer]] | None = None
        self._routed_for: tuple[Any, ...] | None = None  # the rows `_routed` was built for
        self._routed: dict[int, Routed] | None = None
        self.counts = {"gathered": 0, "peft": 0}

    def forget(self) -> None:
        self._key, self._layers = None, None
        self._routed_for, self._routed = None, None

    def plan(self, modules: list[Any], names: list[str]) -> list[tuple[Any, _Layer]] | None:
        """The layers to hook for these rows' adapters, or None when peft's path must run."""
        distinct = tuple(dict.fromkeys(n for n in names if n != BASE))
        key = (id(modules), distinct)  # the host swaps its module list when slots come or go
        if key == self._key:
            return self._layers
        layers = _layers(modules, distinct)
        if layers is not None and sum(layer.nbytes for _, layer in layers) <= self.max_bytes:
            self._key, self._layers = key, layers
        else:
            self.forget()
        return layers

    def routed(self, modules: list[Any], names: list[str]) -> dict[int, Routed] | None:
        """Per LoRA module (by id) touched by these rows' adapters, its delta for the batch;
        None when the batch needs peft's per-row path."""
        layers = self.plan(modules, names) if self.enabled else None
        if layers is None:
            self.counts["peft"] += 1
            return None
        self.counts["gathered"] += 1
        key = (id(modules), *names)  # decode steps repeat their rows until one joins or leaves
        if key == self._routed_for and self._layers is layers and self._routed is not None:
            return self._routed
        distinct = list(dict.fromkeys(n for n in names if n != BASE))
        if not distinct:
            return {}
        position = {name: i for i, name in enumerate(distinct)}
        index = [position.get(n, len(distinct)) for n in names]  # the zero pair last
        # all rows on one adapter: plain matmuls; else gather per row (skip it when aligned)
        single = len(distinct) == 1 and BASE not in names
        aligned = index == list(range(len(names)))
        rows = None if single or aligned else torch.tensor(index)
        routed = {id(module): Routed(layer, rows, single, len(names)) for module, layer in layers}
        self._routed_for, self._routed = key, routed
        return routed

    @contextlib.contextmanager
    def rows(self, modules: list[Any], names: list[str]) -> Iterator[bool]:
        """Within: row i of the next forward goes through adapter names[i] ("__base__": none).

        Yields False (and changes nothing) when the batch needs peft's per-row path.
        """
        routed = self.routed(modules, names)
        if routed is None:
            yield False
            return
        handles = []
        saved = [(m, m._disable_adapters) for m in modules]
        try:
            for module in modules:
                module._disable_adapters = True  # peft runs the base layer only
                delta = routed.get(id(module))
                if delta is not None:
                    handles.append(module.register_forward_hook(delta.hook))
            yield True
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in saved:
                module._disable_adapters = flag


@dataclass(frozen=True)
class Routed:
    """One LoRA layer's delta for one batch: row i through the stacks' entry rows[i]."""

    layer: _Layer
    rows: torch.Tensor | None  # None: row i uses entry i (or entry 0 for all, when single)
    single: bool  # every row on the same adapter
    batch: int

    def add(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` (the base layer's, for input `x`) plus each row's LoRA delta.

        Always one pair of batched matmuls, one matrix product per row, whether the batch
        holds one adapter or many: a row's delta is then the same bits in any batch.
        """
        layer, batch = self.layer, self.batch
        x = x.to(layer.a.dtype)
        if x.dim() < 2 or x.shape[0] != batch:  # rows must stay rows: [batch, ..., features]
            raise RuntimeError(f"gathered LoRA got input {tuple(x.shape)} for {batch} rows")
        a, b, scale = layer.a, layer.b, layer.scale
        if self.single:
            a, b = a[:1].expand(batch, -1, -1), b[:1].expand(batch, -1, -1)
            scale = scale[:1].expand(batch)
        elif self.rows is not None:
            a, b, scale = a[self.rows], b[self.rows], scale[self.rows]
        else:
            a, b, scale = a[:batch], b[:batch], scale[:batch]
        flat = x.reshape(batch, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        delta = delta * scale.view(batch, 1, 1)
        return output + delta.reshape(output.shape).to(output.dtype)

    def hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return self.add(args[0], output)


def _layers(modules: list[Any], distinct: tuple[str, ...]) -> list[tuple[Any, _Layer]] | None:
    from peft.tuners.lora import Linear

    if any(type(module) is not Linear for module in modules):
        return None
    layers = []
    for module in modules:
        present = [n for n in distinct if n in module.lora_A]
        if not present:
            continue
        ranks = {module.r[n] for n in present}
        if len(ranks) > 1 or any(
            n in module.lora_variant or module.lora_bias.get(n, False) for n in present
        ):
            return None
        some = present[0]
        a0, b0 = module.lora_A[some].weight, module.lora_B[some].weight
        a = torch.zeros((len(distinct) + 1, *a0.shape), dtype=a0.dtype, device=a0.device)
        b = torch.zeros((len(distinct) + 1, *b0.shape), dtype=b0.dtype, device=b0.device)
        scale = torch.zeros(len(distinct) + 1, dtype=a0.dtype, device=a0.device)
        with torch.no_grad():
            for i, name in enumerate(distinct):
                if name in present:
                    a[i].copy_(module.lora_A[name].weight)
                    b[i].copy_(module.lora_B[name].weight)
                    scale[i] = float(module.scaling[name])
        layers.append((module, _Layer(a, b, scale)))
    return layers
