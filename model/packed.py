"""Serve a GGUF model's 4-bit layers from their own 4-bit blocks (CPU).

The bundled model is a Q4_1 GGUF: every weight of its 210 linear layers is a 4-bit integer
with a scale and an offset per block of 32. Dequantised to fp32 the model reads 540 MB per
decoded token, and on a 2-core CPU a single-user step is bound by that memory traffic (the
matmuls took 79 % of a step at about 7 GB/s). torch ships a CPU kernel for exactly this
layout (`_weight_int4pack_mm_for_cpu`, group size 32, `w = (q - 8) * scale + zero`), fast
when its activations are bf16. So each Q4_1 layer keeps its 4-bit codes, packed for that
kernel, and the decode step reads about a sixth of the bytes.

One numeric contract, two ways to compute it. A packed layer computes

    y = bf16( bf16(x) @ W'^T ),   W' = (q - 8) * bf16(d) + bf16(m + 8 d),  fp32 accumulation

where q, d, m are the GGUF block's codes, scale and minimum. Everything computed without
gradients (the engine's prefill and decode steps, the learner's checks and gate) runs the
kernel, 16 rows per call: the kernel's rows are independent, so a row's result has the same
bits whatever else is in its batch (fp32 matmuls do not have that property, and bf16 rounding
would turn their last-bit differences into visible ones). Training runs a dense fp32 matmul
on W' with the same bf16 rounding of input and output (straight through for gradients): the
same values up to summation order. The load function packs the learner's model exactly like
the engine's, so the learner trains and gates on the numbers the engine serves.

The tied output layer (Q8_0 in the bundled file) stays exact fp32: the kernel's bf16 output
would round logits by up to 0.1, enough to flip greedy choices. For up to 16 rows it is
computed approximately with the same kernel (each 8-bit code split into two 4-bit ones), and
then exactly, in fp32, for every token whose approximate logit is within a proven error
bound of the best exact one; the argmax is therefore always the exact fp32 argmax, and every
token a sampler can plausibly draw has its exact logit.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

GROUP = 32  # Q4_1 and Q8_0 block size, and the kernel's group size
KERNEL_ROWS = 16  # rows per kernel call (its rows are independent up to 16)
BLOCK_NAMES = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}


def numerics(model: Any) -> str:
    """How the model computes its linear layers: part of every cache key over its outputs."""
    count = sum(isinstance(m, PackedLinear) for m in model.modules())
    head = any(isinstance(m, PackedHead) for m in model.modules())
    return f"int4-kernels:{count}:{head}" if count or head else "dense"


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 and back; the gradient passes straight through."""
    rounded = x.to(torch.bfloat16).to(x.dtype)
    if x.requires_grad:
        return x + (rounded - x).detach()
    return rounded


def _pack_codes(codes: np.ndarray) -> torch.Tensor:
    """[N, K] codes in 0..15 -> the CPU kernel's packed uint8 layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int32)), 1
    )


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, K/32] scales and zeros -> the kernel's [K/32, N, 2] bf16, stored as int16 bits so
    that `model.to(dtype)` leaves them alone."""
    both = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return both.view(torch.int16)


def _kernel(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bf16(x) @ W'^T for 2-D x, in fp32 (values rounded to bf16 by the kernel)."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed, GROUP, scales.view(torch.bfloat16)
    )
    return out.float()


_dense_only = 0


@contextlib.contextmanager
def dense_paths() -> Iterator[None]:
    """Compute every packed layer by its dense path (to compare the two)."""
    global _dense_only
    _dense_only += 1
    try:
        yield
    finally:
        _dense_only -= 1


def use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Everything without gradients to compute runs the kernel."""
    if _dense_only or x.device.type != "cpu":
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad)


def int4_rows(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The kernel over 2-D x, KERNEL_ROWS rows per call: fast, and each row's result is the
    same bits whatever else is in the batch (the kernel's rows are independent up to 16)."""
    if x.shape[0] <= KERNEL_ROWS:
        return _kernel(x, packed, scales)
    parts = [_kernel(part, packed, scales) for part in x.split(KERNEL_ROWS)]
    return torch.cat(parts)


class PackedLinear(nn.Linear):
    """A Q4_1 linear layer: its weight is W' (see the module docstring), kept dense for large
    batches and training, and packed for the 4-bit kernel."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear, codes: np.ndarray, scale: np.ndarray, low: np.ndarray):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        d = torch.from_numpy(scale).to(torch.bfloat16)
        z = (torch.from_numpy(low) + 8 * torch.from_numpy(scale)).to(torch.bfloat16)
        rows, cols = codes.shape
        dense = (torch.from_numpy(codes.astype(np.float32)) - 8).view(rows, cols // GROUP, GROUP)
        dense = (dense * d.float()[..., None] + z.float()[..., None]).view(rows, cols)
        weight = linear.weight
        with torch.no_grad():
            weight.data = dense.to(device=weight.device, dtype=weight.dtype)
        self.weight = weight
        self.bias = linear.bias
        self.register_buffer("packed", _pack_codes(codes), persistent=False)
        self.register_buffer("scales", _scales_zeros(d, z), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernel(x, self.weight):
            out = int4_rows(x.reshape(-1, x.shape[-1]), self.packed, self.scales)
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = _round_bf16(F.linear(_round_bf16(x), self.weight.to(x.dtype)))
        return out if self.bias is None else out + self.bias


class PackedHead(nn.Linear):
    """The output layer over Q8_0 weights: exact fp32 logits, approximated first for small
    batches and recomputed exactly wherever the approximation could matter."""

    hi: torch.Tensor
    hi_scales: torch.Tensor
    lo: torch.Tensor
    lo_scales: torch.Tensor
    reach: torch.Tensor

    def __init__(self, linear: nn.Linear, codes: np.ndarray, scale: np.ndarray):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # tied to the embeddings: untouched
        self.bias = linear.bias
        shifted = codes.astype(np.int32) + 128  # 0..255 = 16 * hi + lo
        hi, lo = shifted >> 4, shifted & 15
        d = torch.from_numpy(scale).to(torch.bfloat16)
        df = d.float()
        # 16 d (hi - 8) + d (lo - 8) + 8 d = d (shifted - 128) = d * code (with d in bf16)
        self.register_buffer("hi", _pack_codes(hi), persistent=False)
        self.register_buffer("hi_scales", _scales_zeros(16 * df, torch.zeros_like(df)), False)
        self.register_buffer("lo", _pack_codes(lo), persistent=False)
        self.register_buffer("lo_scales", _scales_zeros(df, 8 * df), persistent=False)
        # Per input feature, the largest weight magnitude any of the terms involves: the
        # error bound of an approximate logit is 2^-8 * |x| . reach (see _bound).
        rows, cols = codes.shape
        blocks = (rows, cols // GROUP, GROUP)
        w_hi = (16 * df[..., None] * torch.from_numpy(hi - 8).view(blocks).float()).view(rows, -1)
        w_lo = (df[..., None] * torch.from_numpy(lo).view(blocks).float()).view(rows, -1)
        exact = linear.weight.detach().float().cpu()
        reach = (w_hi.abs() + w_lo.abs() + (w_hi + w_lo).abs() + exact.abs()).amax(dim=0)
        self.register_buffer("reach", reach.to(linear.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > KERNEL_ROWS or not use_kernel(x, self.weight):
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        flat = x.reshape(-1, x.shape[-1]).float()
        logits = self.exact_where_it_matters(flat)
        if self.bias is not None:
            logits = logits + self.bias
        return logits.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def approximate(self, x: torch.Tensor) -> torch.Tensor:
        return _kernel(x, self.hi, self.hi_scales) + _kernel(x, self.lo, self.lo_scales)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per row, a bound on |approximate - exact| over every token.

        The approximation differs from fp32 by bf16 rounding of the input, of the scales and
        of the two partial outputs, each at most 2^-9 relative to a sum of |x_i| |w_i| with
        w_i one of the terms `reach` covers: 2^-9 * |x| . reach bounds their total to first
        order, and twice that leaves room for the rest (fp32 summation).
        """
        return 2.0**-8 * (x.abs() @ self.reach)

    def exact_where_it_matters(self, x: torch.Tensor) -> torch.Tensor:
        """Approximate logits with the exact ones for every token that could be the best.

        Let e be the exact logit of the approximately best few tokens, and b the bound. The
        true best token t has exact(t) >= e, so approximate(t) >= e - b: every token with an
        approximate logit under e - b is beaten by one whose exact logit is known.
        """
        logits = self.approximate(x)
        weight = self.weight.float()
        top = logits.topk(4, dim=-1).indices  # [rows, 4]
        best = torch.einsum("rd,rkd->rk", x, weight[top]).amax(dim=-1)
        rows, cols = (logits >= (best - self.bound(x))[:, None]).nonzero(as_tuple=True)
        logits[rows, cols] = (x[rows] * weight[cols]).sum(dim=-1)
        return logits


@dataclass
class PackReport:
    layers: int = 0  # linear layers now packed
    head: bool = False
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Blocks:
    """One quantised GGUF tensor: its type, its transformers-order shape [rows, cols] and
    its raw blocks."""

    kind: str  # "Q4_1" or "Q8_0"
    rows: int
    cols: int
    raw: np.ndarray  # uint8 [blocks, bytes per block]


def read_blocks(gguf_path: str | Path) -> dict[str, Blocks]:
    """The Q4_1 and Q8_0 tensors of a GGUF file (reading its metadata takes seconds)."""
    from gguf import GGUFReader

    found: dict[str, Blocks] = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        kind = tensor.tensor_type.name
        if kind in ("Q4_1", "Q8_0") and len(tensor.shape) == 2:
            cols, rows = (int(n) for n in tensor.shape)
            raw = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, 20 if kind == "Q4_1" else 34)
            found[tensor.name] = Blocks(kind, rows, cols, np.array(raw))
    return found


def save_blocks(blocks: dict[str, Blocks], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {name: torch.from_numpy(b.raw) for name, b in blocks.items()}
    meta = {name: f"{b.kind}:{b.rows}:{b.cols}" for name, b in blocks.items()}
    save_file(tensors, str(path), metadata=meta)


def load_blocks(path: Path) -> dict[str, Blocks]:
    from safetensors import safe_open

    found: dict[str, Blocks] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            kind, rows, cols = meta[name].split(":")
            found[name] = Blocks(kind, int(rows), int(cols), f.get_tensor(name).numpy())
    return found


def pack_gguf(model: Any, blocks: dict[str, Blocks]) -> PackReport:
    """Replace the model's Q4_1 linear layers (and a Q8_0 output layer) with packed ones.

    Each GGUF tensor is matched to its transformers layer by comparing dequantised rows, so
    a permutation made by the conversion (Llama's q and k rows) is followed, and a layer
    whose weights are not exactly the GGUF's stays as it is. Call before adding adapters.
    """
    report = PackReport()
    began = time.perf_counter()
    if not kernel_available():
        report.skipped.append("torch has no int4 CPU kernel")
        return report
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    for i, layer in enumerate(layers):
        for short, (part, name) in BLOCK_NAMES.items():
            tensor = blocks.get(f"blk.{i}.{short}.weight")
            parent = getattr(layer, part, None)
            linear = getattr(parent, name, None)
            if tensor is None or type(linear) is not nn.Linear:
                continue
            if tensor.kind != "Q4_1" or not _fits(tensor):
                shape = f"{tensor.kind} {tensor.rows}x{tensor.cols}"
                report.skipped.append(f"blk.{i}.{short} ({shape})")
                continue
            codes, scale, low = _read_q4_1(tensor)
            order = _row_order(_dequantise(codes, scale, low), linear.weight)
            if order is None:
                report.skipped.append(f"blk.{i}.{short} (rows differ from the model's)")
                continue
            setattr(parent, name, PackedLinear(linear, codes[order], scale[order], low[order]))
            report.layers += 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tensor = blocks.get("output.weight") or blocks.get("token_embd.weight")
    if type(head) is nn.Linear and tensor is not None and tensor.kind == "Q8_0" and _fits(tensor):
        codes, head_scale = _read_q8_0(tensor)
        if _row_order(_dequantise(codes, head_scale), head.weight, identity=True) is not None:
            model.set_output_embeddings(PackedHead(head, codes, head_scale))
            report.head = True
        else:
            report.skipped.append("output layer (rows differ from the GGUF's)")
    report.seconds = time.perf_counter() - began
    return report


def _fits(tensor: Blocks) -> bool:
    """The kernel takes whole groups of 32 inputs and outputs in multiples of 16."""
    return tensor.cols % GROUP == 0 and tensor.rows % 16 == 0


def _read_q4_1(tensor: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [N, K] (0..15), scales and minimums [N, K/32] of a Q4_1 tensor (20-byte blocks:
    fp16 d, fp16 m, 16 bytes of nibbles: low ones are elements 0-15, high ones 16-31)."""
    rows, cols, raw = tensor.rows, tensor.cols, tensor.raw
    scale = raw[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(rows, -1)
    low = raw[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(rows, -1)
    nibbles = raw[:, 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).reshape(rows, cols)
    return codes, scale, low


def _read_q8_0(tensor: Blocks) -> tuple[np.ndarray, np.ndarray]:
    """Codes [N, K] (int8) and scales [N, K/32] of a Q8_0 tensor (34-byte blocks: fp16 d,
    32 int8)."""
    rows, cols, raw = tensor.rows, tensor.cols, tensor.raw
    scale = raw[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(rows, -1)
    codes = raw[:, 2:].copy().view(np.int8).reshape(rows, cols)
    return codes, scale


def _dequantise(codes: np.ndarray, scale: np.ndarray, low: np.ndarray | None = None) -> np.ndarray:
    """fp32 weights exactly as gguf (and so transformers) dequantises them: d * q (+ m)."""
    rows, cols = codes.shape
    blocks = codes.reshape(rows, cols // GROUP, GROUP).astype(np.float32) * scale[..., None]
    if low is not None:
        blocks = blocks + low[..., None]
    return blocks.reshape(rows, cols).astype(np.float32)


def _row_order(gguf: np.ndarray, weight: torch.Tensor, identity: bool = False) -> np.ndarray | None:
    """order[j] = the GGUF row equal to the model's row j, or None if the rows differ."""
    model = weight.detach().float().cpu().numpy()
    if model.shape != gguf.shape:
        return None
    same = np.array_equal(gguf, model)
    if identity or same:
        return np.arange(gguf.shape[0]) if same else None
    where: dict[bytes, int] = {}
    for i, row in enumerate(gguf):
        where.setdefault(row.tobytes(), i)
    order = np.empty(gguf.shape[0], dtype=np.int64)
    for j, row in enumerate(model):
        found = where.get(row.tobytes())
        if found is None:
            return None
        order[j] = found
    if len(set(order.tolist())) != len(order):
        return None
    return order
