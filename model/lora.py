"""peft plumbing for the worker thread: adapter slots, per-row adapters, scopes.

Adapters of one LoRA shape take turns in the same peft modules ("slots", see `LoraHost`):
loading one copies its weights into a free slot instead of building new modules.

Per-row adapters: row i of a batch goes through adapter names[i] ("__base__": none). The
fast path stacks the batch's adapters per layer and applies them with two batched matmuls
(`model.gathered`). The fallback, for LoRA kinds that path does not cover, is peft's
mixed-batch forward (every LoRA layer's `forward(x, adapter_names=[...])`), exactly what
`PeftModel.forward(..., adapter_names=...)` sets up. We install its pre-forward hooks
ourselves because peft's context manager walks the whole module tree on every call and does
not remove its hooks when the forward raises; here the hooks always come off.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from model.decode import lean_decoder
from model.gathered import BASE, Gather
from model.interface import AdapterLoadError
from model.registry import AdapterFiles
from model.scope import embed_questions

log = logging.getLogger(__name__)

__all__ = ["BASE", "LoraHost", "embed_base", "forward", "peft_forward", "unwrap"]


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_modules(model: Any) -> list[Any]:
    """Modules that take `adapter_names` (LoRA layers and modules_to_save wrappers)."""
    if not is_peft(model):
        return []
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in model.modules() if isinstance(m, LoraLayer | AuxiliaryTrainingWrapper)]


# LoraConfig fields that change neither the modules peft builds nor the forward's math
_NOT_SHAPE = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", "lora_dropout", "peft_version"}
)


def shape_key(config: Any) -> str:
    """Everything in a LoraConfig that decides which modules an adapter gets and how they compute.

    Two adapters with the same key (and the same weight names and shapes) can take turns in
    one peft slot: only the tensors' values differ.
    """
    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _NOT_SHAPE
    }
    return json.dumps(fields, sort_keys=True, default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(map(str, value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


Layout = dict[str, tuple[int, ...]]  # weight name as saved -> shape


def layout(weights: dict[str, torch.Tensor]) -> Layout:
    return {key: tuple(t.shape) for key, t in weights.items()}


@dataclass(eq=False)
class _Slot:
    """One peft adapter in the model: the modules stay, the adapters using them take turns."""

    key: str  # shape_key of the config it was built from
    tensors: dict[str, torch.Tensor]  # saved weight name -> the slot's own parameter
    used: bool = True

    @property
    def layout(self) -> Layout:
        return layout(self.tensors)


class LoraHost:
    """The worker's model (a PeftModel from the first adapter on), its LoRA layers and slots.

    Adding a LoRA adapter to a model builds and randomly initialises modules in every targeted
    layer (most of a second for a 135M model on two cores); copying weights into modules that
    are already there takes milliseconds. So an adapter that leaves keeps its modules as a
    free slot, and the next adapter of the same shape is copied into it. At most `max_slots`
    peft adapters, used or free, exist at once; free ones of other shapes make room.
    """

    def __init__(self, model: Any, max_slots: int = 32) -> None:
        self.model = model
        self.max_slots = max(1, max_slots)
        self.modules = lora_modules(model)
        self._slots: dict[str, _Slot] = {}  # free ones in the order they were freed
        self._named = 0
        self._layouts: dict[str, Layout | None] = {}  # shape key -> the weights it takes
        self.counts = Counter[str]()  # "reused" and "created" slots
        self.gather = Gather()
        self.lean = lean_decoder(unwrap(model))  # None: every step runs the model's forward
        self.lean_enabled = True
        self.steps = Counter[str]()  # decode steps by path: "lean" or "forward"

    def forward(self, names: list[str], **kwargs: Any) -> Any:
        """One forward of the transformers model, row i through slot names[i] ("__base__": none).

        Batched gathered LoRA (`model.gathered`) where the slots allow it, else peft's
        mixed-batch path; both compute the same thing.
        """
        return forward(self.model, self.modules, names, gather=self.gather, **kwargs)

    def decode(
        self,
        names: list[str],
        *,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Logits [rows, vocab] of one decode step (one new token per row, row i through
        slot names[i]): `model.decode`'s lean step where it applies, else `forward`."""
        if self.lean is not None and self.lean_enabled:
            routed = self.gather.routed(self.modules, names) if self.modules else {}
            if routed is not None and self.lean.covers(self.modules, routed):
                self.steps["lean"] += 1
                return self.lean.step(
                    self.modules, routed, input_ids, position_ids, attention_mask, cache
                )
        self.steps["forward"] += 1
        out = self.forward(
            names,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def attach(self, files: AdapterFiles) -> str:
        """Load an adapter's weights into a slot and return the slot's name (its peft name).

        Raises AdapterLoadError, leaving no half-loaded adapter behind, when the weights do
        not fit the model.
        """
        key, shapes = shape_key(files.config), layout(files.weights)
        for name, slot in self._slots.items():
            if not slot.used and slot.key == key and slot.layout == shapes:
                self._fill(name, slot, files.weights)
                return name
        self._make_room()
        self._named += 1
        name = f"s{self._named}"
        self._create(name, key, files)
        return name

    def detach(self, name: str) -> None:
        """The adapter in slot `name` is gone: keep the modules for the next one of its shape."""
        slot = self._slots.get(name)
        if slot is None:
            return
        if len(self._slots) > self.max_slots or not slot.tensors:
            self._drop(name)  # over the cap (every slot was in use) or not reusable
            return
        slot.used = False
        self._slots[name] = self._slots.pop(name)  # most recently freed last

    def check(self, files: AdapterFiles) -> None:
        """Refuse weights that cannot fit the model, without loading them.

        Compares the LoRA weights' names and shapes with what peft builds for their config on
        this model (a slot's, or a weightless copy's on the meta device, once per shape).
        """
        expected = self._expected(files.config)
        if expected is None:
            return
        ours, theirs = _lora_only(expected), _lora_only(layout(files.weights))
        if ours != theirs:
            wrong = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
            raise AdapterLoadError(f"adapter does not fit the model: {wrong}")

    def clear(self) -> None:
        """Delete every slot (the engine is closing)."""
        for name in list(self._slots):
            self._drop(name)

    def loaded(self) -> set[str]:
        """Slots holding an adapter."""
        return {name for name, slot in self._slots.items() if slot.used}

    def slots(self) -> set[str]:
        """Every peft adapter in the model, used or free."""
        return set(self.model.peft_config) if is_peft(self.model) else set()

    def _fill(self, name: str, slot: _Slot, weights: dict[str, torch.Tensor]) -> None:
        """Copy weights of the slot's exact layout in place; a failure deletes the slot."""
        try:
            with torch.no_grad():
                for key, tensor in slot.tensors.items():
                    tensor.copy_(weights[key])
        except Exception as exc:
            self._drop(name)  # partly overwritten: nobody may route through it
            raise AdapterLoadError(f"adapter does not fit the model: {exc}") from exc
        finally:
            self.gather.forget()  # stacks copied from the slot's old weights
        slot.used = True
        self.counts["reused"] += 1

    def _create(self, name: str, key: str, files: AdapterFiles) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        try:
            if not is_peft(self.model):
                self.model = PeftModel(self.model, files.config, adapter_name=name)
            else:
                self.model.add_adapter(name, files.config)
                if self.model.active_adapter not in self.model.peft_config:
                    self.model.set_adapter(name)  # the active one was deleted (names route anyway)
            result: Any = set_peft_model_state_dict(self.model, files.weights, adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if missing or unexpected:
                raise ValueError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
            slot = self._slots[name] = _Slot(key, self._tensors(name))
            if slot.tensors and self._layouts.get(key) is None:
                self._layouts[key] = slot.layout
        except Exception as exc:
            if is_peft(self.model) and name in self.model.peft_config:
                _delete(self.model, name)
            raise AdapterLoadError(f"adapter does not fit the model: {exc}") from exc
        finally:
            self.model.eval()
            self.modules = lora_modules(self.model)
            self.gather.forget()
        self.counts["created"] += 1

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The slot's parameters under their saved names; {} when they cannot be told apart."""
        from peft import get_peft_model_state_dict

        def ours(param: str) -> bool:
            return f".{name}." in param or param.endswith(f".{name}")

        own = {k: v for k, v in self.model.named_parameters() if ours(k)}
        own.update({k: v for k, v in self.model.named_buffers() if ours(k)})
        try:
            saved = get_peft_model_state_dict(
                self.model, state_dict=own, adapter_name=name, save_embedding_layers=False
            )
        except Exception:
            log.warning("adapter slot %s cannot be reused", name, exc_info=True)
            return {}
        live = {id(t) for t in own.values()}
        return saved if all(id(t) in live for t in saved.values()) else {}

    def _expected(self, config: Any) -> Layout | None:
        key = shape_key(config)
        if key not in self._layouts:
            self._layouts[key] = _shell_layout(unwrap(self.model), config)
        return self._layouts[key]

    def _make_room(self) -> None:
        """Delete free slots (least recently freed first) until a new one fits under the cap."""
        for name in [n for n, slot in self._slots.items() if not slot.used]:
            if len(self._slots) < self.max_slots:
                return
            self._drop(name)
        if len(self._slots) >= self.max_slots:
            log.warning(
                "all %d adapter slots hold adapters with requests in flight; adding one more",
                len(self._slots),
            )

    def _drop(self, name: str) -> None:
        self._slots.pop(name, None)
        if is_peft(self.model) and name in self.model.peft_config:
            _delete(self.model, name)
            self.modules = lora_modules(self.model)
            self.gather.forget()


def _lora_only(shapes: Layout) -> Layout:
    return {key: shape for key, shape in shapes.items() if "lora_" in key}


def _shell_layout(model: Any, config: Any) -> Layout | None:
    """The weights peft builds for `config` on a weightless (meta device) copy of `model`."""
    from peft import get_peft_model, get_peft_model_state_dict

    try:
        with torch.device("meta"):
            shell = type(model)(copy.deepcopy(model.config))
        peft_model = get_peft_model(shell, copy.deepcopy(config), low_cpu_mem_usage=True)
        return layout(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    except Exception:
        log.warning("cannot tell which weights a LoRA config needs", exc_info=True)
        return None


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


def forward(
    model: Any, modules: list[Any], names: list[str], *, gather: Gather | None = None, **kwargs: Any
) -> Any:
    """One forward of the underlying transformers model with per-row adapters.

    Gathered (`model.gathered`) where the adapters allow it, else peft's mixed-batch path.
    `gather` keeps its per-adapter-set plan between calls (the worker's decode steps).
    """
    inner = unwrap(model)
    if not modules:
        return inner(**kwargs)
    with (gather or Gather()).rows(modules, names) as gathered:
        if gathered:
            return inner(**kwargs)
    return peft_forward(model, modules, names, **kwargs)


def peft_forward(model: Any, modules: list[Any], names: list[str], **kwargs: Any) -> Any:
    """The same forward through peft's own per-row LoRA (one pass per adapter in the batch)."""
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
