"""The decode-side pieces of continuous batching: a left-padded KV batch, sampling, detokenising.

Rows join and leave between decode steps. Every row is left-padded: its real tokens sit at
the right end of the cache, the attention mask marks them, and each row carries its own
position counter, so a row's attention never sees another row's padding and its RoPE
positions are exactly those of an unbatched run.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW = 64  # spare cache columns reserved at a time: a buffer is copied once per 64 steps


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends in place.

    DynamicLayer concatenates on every update, copying the layer's whole cache for each new
    token (for 16 rows of 300 tokens, 2 x 30 copies of a few MB per decode step). Here `keys`
    and `values` are views of buffers with `GROW` spare columns, so a decode step writes one
    column; the buffers are copied only when they fill up, or when the batch's rows change
    (`assign`).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        used, new = self.get_seq_length(), key_states.shape[-2]
        buffers = self._buffers
        if buffers is None or used + new > buffers[0].shape[-2]:
            buffers = self._buffers = (
                _reserve(self.keys, key_states, used + new + GROW),
                _reserve(self.values, value_states, used + new + GROW),
            )
        keys, values = buffers
        keys[:, :, used : used + new].copy_(key_states)
        values[:, :, used : used + new].copy_(value_states)
        self.keys, self.values = keys[:, :, : used + new], values[:, :, : used + new]
        return self.keys, self.values

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the cached states (rows joined or left): the next update copies them."""
        self.keys, self.values, self._buffers = keys, values, None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            assert self.keys is not None and self.values is not None
            self.assign(self.keys[indices, ...], self.values[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            assert self.keys is not None and self.values is not None
            self.assign(
                self.keys.repeat_interleave(repeats, dim=0),
                self.values.repeat_interleave(repeats, dim=0),
            )

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._buffers = None


def _reserve(cached: torch.Tensor, new: torch.Tensor, columns: int) -> torch.Tensor:
    """A [batch, heads, columns, dim] buffer starting with the `cached` states."""
    batch, heads, _, dim = new.shape
    buffer = torch.empty((batch, heads, columns, dim), dtype=new.dtype, device=new.device)
    if cached.numel():
        buffer[:, :, : cached.shape[-2]].copy_(cached)
    return buffer


class KVBatch:
    """A cache of GrowingLayers plus the 2-D attention mask that says which cached columns
    are real."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        for layer in cache.layers:
            if not isinstance(layer, GrowingLayer):
                raise TypeError(f"continuous batching needs full-attention layers, not {layer}")
        self.cache = cache
        self.layers: list[GrowingLayer] = list(cache.layers)  # type: ignore[arg-type]
        self.mask = mask  # [B, L] long

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def step_mask(self) -> torch.Tensor:
        """Mask for the next single-token step (the new token is real for every row)."""
        ones = torch.ones((self.size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def merge(self, *others: KVBatch) -> None:
        """Append the rows of `others`, left-padding every batch to the longest."""
        batches = [self, *others]
        width = max(b.length for b in batches)
        pads = [width - b.length for b in batches]
        for i, layer in enumerate(self.layers):
            parts = [b.layers[i] for b in batches]
            layer.assign(
                torch.cat([_pad_left(p.keys, n) for p, n in zip(parts, pads, strict=True)]),
                torch.cat([_pad_left(p.values, n) for p, n in zip(parts, pads, strict=True)]),
            )
        self.mask = torch.cat([_pad_mask(b.mask, width - b.length) for b in batches])

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (finished and cancelled rows leave), then trim padding columns."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        for layer in self.layers:
            if layer.keys is not None and layer.values is not None and layer.keys.numel():
                layer.assign(layer.keys.index_select(0, index), layer.values.index_select(0, index))
        self.mask = self.mask.index_select(0, index)
        self.trim()

    def trim(self) -> None:
        """Drop leading columns that are padding in every row (left when long rows finished)."""
        if self.size == 0:
            return
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.length
        if start == 0:
            return
        for layer in self.layers:
            if layer.keys is not None and layer.values is not None and layer.keys.numel():
                layer.assign(layer.keys[:, :, start:, :], layer.values[:, :, start:, :])
        self.mask = self.mask[:, start:]


def _pad_left(t: Any, n: int) -> torch.Tensor:
    if n == 0:
        return t  # type: ignore[no-any-return]
    pad = torch.zeros((t.shape[0], t.shape[1], n, t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def _pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return mask
    pad = torch.zeros((mask.shape[0], n), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask for a prefill batch, padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy at temperature 0, else temperature + nucleus sampling with the row's generator."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # the generator is on CPU
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        cut = cumulative - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs[cut] = 0.0
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """Turns token ids into text pieces, holding back bytes until they form whole characters.

    Decodes a sliding window (prefix_offset..end) and emits only the part past what the window
    already produced; a window ending in U+FFFD means a multi-byte character is incomplete.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever complete text is still held back (a cut-off character is dropped)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :]).rstrip("\ufffd")
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


def new_cache(config: Any) -> DynamicCache:
    """A cache for `config`'s layers, with GrowingLayers where they are full attention (a
    cache with other layers cannot join a KVBatch)."""
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache
