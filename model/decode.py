"""One decode step of a Llama model in few operations: the engine's hot loop.

transformers' forward is general. For every layer it goes through deprecation wrappers, output
capturing, the attention-interface registry, mask builders and, once adapters are loaded,
peft's LoRA modules and our hooks. For one new token per row on a CPU that machinery costs more
than the arithmetic: a decode step of SmolLM2's 30 layers was about 7,000 small operations and
Python calls. `LeanDecode.step` computes the same step from the same modules, with the same
operations in the same order, but:

- q/k/v and gate/up of a packed model run as one 4-bit kernel call each (the kernel computes
  each output column on its own, so fusing changes no bit);
- LoRA deltas come straight from the gathered stacks (`model.gathered.Routed`), without peft's
  modules or hooks;
- a row attends over its own cache columns only, unmasked, as it would alone (a masked batch
  call differs in the last bits, and bf16 kernel inputs can turn that into another answer);
- the KV cache appends in place (`model.batching.GrowingLayer`, for both paths).

So each row's logits are the same bits as that row's through transformers' forward with no
other row beside it: tests check `torch.equal` for padded batches with per-row adapters.

Only what it was checked against takes this path: `LlamaForCausalLM` (SmolLM2, Llama) with SDPA
attention, and batches whose adapters the gathered path covers. Every other model and batch
runs transformers' forward, which computes the same thing more slowly (padded rows within
the last bits of their unbatched values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.gathered import Routed
from model.packed import PackedLinear, int4_rows, use_kernel

ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


def _projections(layer: Any) -> tuple[tuple[nn.Module, tuple[str, ...]], ...]:
    """A decoder layer's projection groups, in the order the step applies them: (parent
    module, names of the projections that read the same input)."""
    return (
        (layer.self_attn, ATTENTION),
        (layer.self_attn, ("o_proj",)),
        (layer.mlp, MLP_IN),
        (layer.mlp, ("down_proj",)),
    )


def lean_decoder(model: Any) -> LeanDecode | None:
    """A LeanDecode for the transformers `model`, or None where only its own forward is right."""
    try:
        from transformers.models.llama import modeling_llama as llama
    except ImportError:  # pragma: no cover - transformers without Llama
        return None
    if type(model) is not llama.LlamaForCausalLM:
        return None
    config = model.config
    layers = model.model.layers
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    if len(layers) != config.num_hidden_layers:
        return None
    norms = [model.model.norm]
    for layer in layers:
        if (
            type(layer) is not llama.LlamaDecoderLayer
            or type(layer.self_attn) is not llama.LlamaAttention
            or type(layer.mlp) is not llama.LlamaMLP
        ):
            return None
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    if any(type(norm) is not llama.LlamaRMSNorm for norm in norms):
        return None
    return LeanDecode(model)


def _base(module: nn.Module) -> nn.Module:
    """The layer under a peft LoRA wrapper (peft keeps it as `base_layer`), or the module."""
    return getattr(module, "base_layer", module)


@dataclass(eq=False)
class _Group:
    """Projections reading the same input: one kernel call when all are packed (their codes
    and scales side by side), else each layer's own forward."""

    linears: list[nn.Module]  # the base layers
    packed: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # as PackedLinear keeps them (int16 bits)
    sizes: tuple[int, ...] = ()

    @classmethod
    def of(cls, parent: nn.Module, names: tuple[str, ...]) -> _Group:
        linears = [_base(getattr(parent, name)) for name in names]
        group = cls(linears)
        if all(type(m) is PackedLinear and m.bias is None for m in linears):
            layers: list[PackedLinear] = linears  # type: ignore[assignment]
            group.sizes = tuple(m.out_features for m in layers)
            if len(layers) == 1:
                group.packed, group.scales = layers[0].packed, layers[0].scales
            else:
                group.packed = torch.cat([m.packed for m in layers])
                group.scales = torch.cat([m.scales for m in layers], dim=1)
                start = 0
                for m in layers:  # each layer's codes become its rows of the fused ones: no copy
                    rows = m.packed.shape[0]
                    m.packed = group.packed[start : start + rows]
                    start += rows
        return group

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(the fused output when one kernel call made them all, else None; each output)."""
        if self.packed is not None and use_kernel(x, self.linears[0].weight):  # type: ignore[arg-type]
            assert self.scales is not None
            out = int4_rows(x.reshape(-1, x.shape[-1]), self.packed, self.scales)
            out = out.to(x.dtype).reshape(*x.shape[:-1], -1)
            return out, list(out.split(self.sizes, dim=-1))
        return None, [m(x) for m in self.linears]


def _rms_norm(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward, operation for operation, without the module call."""
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    out: torch.Tensor = norm.weight * x.to(dtype)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecode:
    """Decode steps of one LlamaForCausalLM (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

        self.model = model
        self._use_gqa = use_gqa_in_sdpa
        self.heads = int(model.config.num_attention_heads)
        self._groups = [
            tuple(_Group.of(parent, names) for parent, names in _projections(layer))
            for layer in model.model.layers
        ]
        self._seen: list[Any] | None = None  # the host's module list the ids below are for
        self._ids: list[tuple[tuple[int, ...], ...]] = []
        self._known: set[int] = set()

    def covers(self, modules: list[Any], routed: dict[int, Routed]) -> bool:
        """Whether every LoRA layer in `routed` is a projection this step applies."""
        self._index(modules)
        return routed.keys() <= self._known

    def _index(self, modules: list[Any]) -> None:
        """Ids of the modules now in the projections' places (peft wraps them when the first
        adapter arrives); recomputed whenever the host's module list changes."""
        if modules is self._seen:
            return
        self._ids = [
            tuple(
                tuple(id(getattr(parent, name)) for name in names)
                for parent, names in _projections(layer)
            )
            for layer in self.model.model.layers
        ]
        self._known = {i for layer in self._ids for group in layer for i in group}
        self._seen = modules

    @torch.inference_mode()
    def step(
        self,
        modules: list[Any],
        routed: dict[int, Routed],
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Logits [rows, vocab] for one new token per row (input_ids and position_ids are
        [rows, 1]; attention_mask [rows, cached + 1] marks real columns; the cache grows).

        Mirrors, per layer, LlamaDecoderLayer / LlamaAttention / LlamaMLP / LlamaRMSNorm and
        transformers' SDPA attention for one query token (`sdpa_attention_forward`), with
        RoPE applied to q and k in one pass (elementwise: the same bits)."""
        self._index(modules)
        inner = self.model.model
        hidden = _base(inner.embed_tokens)(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rows, heads = input_ids.shape[0], self.heads
        padded = not bool(attention_mask.all())
        starts = (attention_mask == 0).sum(dim=-1).tolist() if padded else None
        for layer, groups, ids in zip(inner.layers, self._groups, self._ids, strict=True):
            attn = layer.self_attn
            dim = attn.head_dim
            residual = hidden
            x = _rms_norm(layer.input_layernorm, hidden)
            fused, (q, k, v) = groups[0](x)
            dq, dk, dv = (routed.get(i) for i in ids[0]) if routed else (None, None, None)
            if fused is not None and dq is None and dk is None:
                qk = fused[..., : q.shape[-1] + k.shape[-1]]
            else:
                q = dq.add(x, q) if dq is not None else q
                k = dk.add(x, k) if dk is not None else k
                qk = torch.cat([q, k], dim=-1)
            v = dv.add(x, v) if dv is not None else v
            qk = qk.view(rows, 1, -1, dim).transpose(1, 2)
            qk = (qk * cos) + (_rotate_half(qk) * sin)
            k, v = cache.layers[attn.layer_idx].update(
                qk[:, heads:], v.view(rows, 1, -1, dim).transpose(1, 2)
            )
            out = self._attend(attn, qk[:, :heads], k, v, starts)
            hidden = residual + _project(groups[1], ids[1], out, routed)[0]
            residual = hidden
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            gate, up = _project(groups[2], ids[2], x, routed)
            down = _project(groups[3], ids[3], layer.mlp.act_fn(gate) * up, routed)[0]
            hidden = residual + down
        hidden = _rms_norm(inner.norm, hidden)
        logits: torch.Tensor = _base(self.model.lm_head)(hidden)
        return logits[:, -1, :]

    def _attend(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        starts: list[int] | None,
    ) -> torch.Tensor:
        """Attention for one query token per row, as the o_proj input [rows, 1, features].

        `starts`: each row's first real cache column, or None when no row has padding. A row
        attends over its own columns only, with no mask, one SDPA call per row: exactly the
        computation of the row decoded alone (a masked batch call differs in the last bits,
        which bf16 kernel inputs can turn into a different answer)."""
        if starts is None:
            out = self._alone(attn, query, key, value)
        else:
            out = torch.cat(
                [
                    self._alone(
                        attn, query[i : i + 1], key[i : i + 1, :, s:], value[i : i + 1, :, s:]
                    )
                    for i, s in enumerate(starts)
                ]
            )
        rows, dim = query.shape[0], value.shape[-1]
        out = out.reshape(rows, -1, 1, dim).transpose(1, 2).contiguous()
        return out.reshape(rows, 1, -1).contiguous()

    def _alone(
        self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """transformers' `sdpa_attention_forward` for one query token and no mask."""
        groups = attn.num_key_value_groups
        options = {}
        if groups > 1:
            if self._use_gqa(None, key, value):
                options["enable_gqa"] = True
            else:  # pack_gqa: the kv heads' query groups as a sequence
                rows, heads, _, dim = query.shape
                query = query.reshape(rows, heads // groups, groups, dim)
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            scale=attn.scaling,
            is_causal=False,
            **options,
        )


def _project(
    group: _Group, ids: tuple[int, ...], x: torch.Tensor, routed: dict[int, Routed]
) -> list[torch.Tensor]:
    outs = group(x)[1]
    if routed:
        for j, key in enumerate(ids):
            delta = routed.get(key)
            if delta is not None:
                outs[j] = delta.add(x, outs[j])
    return outs
