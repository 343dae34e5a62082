"""peft plumbing for the worker thread: adapter weights in and out, per-row adapters, scopes.

Per-row adapters use peft's mixed-batch LoRA forward (every LoRA layer's
`forward(x, adapter_names=[...])`, "__base__" for rows without an adapter), exactly what
`PeftModel.forward(..., adapter_names=...)` sets up. We install the pre-forward hooks
ourselves because peft's context manager walks the whole module tree on every call and does
not remove its hooks when the forward raises; here the LoRA module list is cached per
adapter set and the hooks always come off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from model.interface import AdapterLoadError
from model.registry import AdapterFiles
from model.scope import embed_questions

BASE = "__base__"


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_modules(model: Any) -> list[Any]:
    """Modules that take `adapter_names` (LoRA layers and modules_to_save wrappers)."""
    if not is_peft(model):
        return []
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in model.modules() if isinstance(m, LoraLayer | AuxiliaryTrainingWrapper)]


class LoraHost:
    """The worker's model (a PeftModel from the first adapter on) and its LoRA layers."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.modules = lora_modules(model)

    def attach(self, name: str, files: AdapterFiles) -> None:
        """Load an adapter's weights under `name`.

        Raises AdapterLoadError, leaving no half-loaded adapter behind, when the weights do
        not fit the model.
        """
        from peft import PeftModel, set_peft_model_state_dict

        try:
            if not is_peft(self.model):
                self.model = PeftModel(self.model, files.config, adapter_name=name)
            else:
                self.model.add_adapter(name, files.config)
                if self.model.active_adapter not in self.model.peft_config:
                    self.model.set_adapter(name)  # the active one was evicted (names route anyway)
            result: Any = set_peft_model_state_dict(self.model, files.weights, adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if missing or unexpected:
                raise ValueError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        except Exception as exc:
            self.detach(name)
            raise AdapterLoadError(f"adapter does not fit the model: {exc}") from exc
        finally:
            self.model.eval()
            self.modules = lora_modules(self.model)

    def detach(self, name: str) -> None:
        if is_peft(self.model) and name in self.model.peft_config:
            _delete(self.model, name)
            self.modules = lora_modules(self.model)

    def loaded(self) -> set[str]:
        return set(self.model.peft_config) if is_peft(self.model) else set()


def _delete(model: Any, name: str) -> None:
    import warnings

    with warnings.catch_warnings():  # "adapter was active, now using ..." is expected
        warnings.simplefilter("ignore")
        model.delete_adapter(name)


def _set_names(
    module: torch.nn.Module, args: Any, kwargs: dict[str, Any], names: list[str]
) -> tuple[Any, dict[str, Any]]:
    kwargs["adapter_names"] = names
    return args, kwargs


@contextlib.contextmanager
def per_row(modules: list[Any], names: list[str]) -> Iterator[None]:
    """Route row i of the next forward through adapter names[i] ("__base__": none)."""
    handles = [
        m.register_forward_pre_hook(partial(_set_names, names=names), with_kwargs=True)
        for m in modules
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def unwrap(model: Any) -> Any:
    """The transformers model inside a PeftModel (get_base_model() fails with no adapter)."""
    return model.base_model.model if is_peft(model) else model


def forward(model: Any, modules: list[Any], names: list[str], **kwargs: Any) -> Any:
    """One forward of the underlying transformers model with per-row adapters."""
    inner = unwrap(model)
    if not modules:
        return inner(**kwargs)
    with per_row(modules, names):
        return inner(**kwargs)


class _Stop(Exception):
    pass


def decoder_layers(model: Any) -> Any:
    try:
        return unwrap(model).get_decoder().layers
    except AttributeError:
        return None


@torch.inference_mode()
def embed_base(
    model: Any, modules: list[Any], tokenizer: Any, texts: list[str], layers: set[int]
) -> dict[int, torch.Tensor]:
    """`model.scope.embed_questions` for several layers at once, stopping after the deepest.

    Same tokenisation and pooling as embed_questions, adapters off, but the forward stops
    once the deepest needed layer has run: routing costs a fraction of a full prefill.
    """
    blocks = decoder_layers(model)
    count = len(blocks) if blocks is not None else 0
    if not texts or blocks is None or any(not 0 < layer < count for layer in layers):
        return {layer: embed_questions(model, tokenizer, texts, layer=layer) for layer in layers}
    chunk = [t.strip() or "?" for t in texts]
    enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=256)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def grab(layer: int, module: Any, args: Any, output: Any) -> None:
        captured[layer] = output[0] if isinstance(output, tuple) else output
        if layer == deepest:
            raise _Stop

    handles = [blocks[layer - 1].register_forward_hook(partial(grab, layer)) for layer in layers]
    try:
        forward(model, modules, [BASE] * len(chunk), **enc, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    mask = enc["attention_mask"].unsqueeze(-1)
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        hs = captured[layer]
        m = mask.to(hs.dtype)
        out[layer] = ((hs * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).float().cpu()
    return out
