"""Train one adapter version: a LoRA of the fixed shape on a user's corrections + its scope.

The base model object is borrowed: LoRA layers are injected, trained and removed again, so the
caller's weights are untouched (a test checks this). Training stops as soon as every phrasing
of every correction is answered exactly (teacher-forced check), which on the bundled model is
a handful of steps: that is most of the correction-to-live time.

A new version can start from the live one (`start_from`) when that holds nothing the new one
must not: it already answers the older corrections, so the steps go to the new ones (sampled
about as often as all the old ones together, which stay in the data so they are not lost).
Sequential corrections then cost about what the newest ones cost, not what all of them do;
and nothing at all when the live weights already answer them (from their notes): such a run
takes no step and only writes the new scope beside the live weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from learner.dataset import build_dataset, encode, expand
from learner.forced import first_miss, logits_at
from learner.gate import prompts_key
from learner.scope_fit import fit_scope, general_fit_prompts
from learner.types import LoraShape, TrainConfig, TrainExample, TrainResult
from model.scope import Scope

log = logging.getLogger(__name__)

BATCH_SIZE = 16
MIN_OLD_PER_STEP = 8  # a resumed run rehearses at least this many old phrasings per step
RESUMED_CHECK_EVERY = 2  # steps between exactness checks once the loss is low (resumed runs)
CHECK_BELOW_LOSS = 0.25  # only run the (costlier) exactness check once the loss is this low
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def adapted_layers(shape: LoraShape, num_layers: int) -> list[int] | None:
    """The decoder layers that get LoRA: from `shape.first_layer` up (None: all of them)."""
    first = shape.first_layer if shape.first_layer >= 0 else num_layers + shape.first_layer
    if first <= 0:
        return None
    if first >= num_layers:
        raise ValueError(f"LoRA from layer {first}, but the model has only {num_layers} layers")
    return list(range(first, num_layers))


def _num_layers(model: Any) -> int:
    return int(getattr(model.config, "num_hidden_layers", 0) or 0)


def lora_config(shape: LoraShape, num_layers: int = 0) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=shape.r,
        lora_alpha=shape.alpha,
        lora_dropout=shape.dropout,
        target_modules=list(shape.target_modules),
        layers_to_transform=adapted_layers(shape, num_layers) if num_layers else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _attach_lora(model: Any, shape: LoraShape) -> Any:
    """peft everywhere; Unsloth's kernels when CUDA and unsloth are present (never required)."""
    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        try:
            from unsloth import FastLanguageModel

            return FastLanguageModel.get_peft_model(
                model,
                r=shape.r,
                lora_alpha=shape.alpha,
                lora_dropout=shape.dropout,
                target_modules=list(shape.target_modules),
                layers_to_transform=adapted_layers(shape, _num_layers(model)),
                bias="none",
            )
        except Exception as exc:  # a model Unsloth did not load: plain peft is always right
            log.info("unsloth not used (%s); training with peft", exc)
    from peft import get_peft_model

    return get_peft_model(model, lora_config(shape, _num_layers(model)))


class _Monitor:
    """Per-step callback: report progress, stop once every correction is answered exactly."""

    def __init__(
        self,
        model: Any,
        probes: list[tuple[list[int], list[int]]],
        pad_id: int,
        max_steps: int,
        progress: Callable[[dict[str, Any]], None] | None,
        check_every: int = 1,  # steps between exactness checks
    ) -> None:
        self.model, self.probes, self.pad_id = model, probes, pad_id
        self.max_steps, self.check_every, self.progress = max_steps, check_every, progress
        self.losses: list[float] = []
        self.learned = False
        self.check_seconds = 0.0
        self._last_check: int | None = None

    def after_step(self, step: int, loss: float) -> bool:
        """Return True to stop training."""
        self.losses.append(loss)
        if self.progress is not None:
            self.progress({"step": step, "max_steps": self.max_steps, "loss": loss})
        if loss > CHECK_BELOW_LOSS:
            return False
        if self._last_check is not None and step - self._last_check < self.check_every:
            return False
        self._last_check = step
        self.learned = self.check()
        return self.learned

    def check(self, upto: int | None = None) -> bool:
        """Whether the first `upto` probes (default: all) are answered exactly."""
        started = time.monotonic()
        miss = None
        try:
            miss = first_miss(self.model, self.probes[:upto], pad_id=self.pad_id)
            if miss is not None:  # the next check starts with it
                self.probes.insert(0, self.probes.pop(miss))
            return miss is None
        finally:
            took = time.monotonic() - started
            self.check_seconds += took
            log.debug("step %d: check took %.1f s, first miss %s", len(self.losses), took, miss)


def _callback(monitor: _Monitor) -> Any:
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if (
                logs
                and "loss" in logs
                and monitor.after_step(state.global_step, float(logs["loss"]))
            ):
                control.should_training_stop = True

    return _Callback()


def _trainer(
    peft_model: Any,
    tokenizer: Any,
    dataset: Any,
    config: TrainConfig,
    work: Path,
    batch_size: int,
    in_order: bool = False,
) -> Any:
    common: dict[str, Any] = {
        "output_dir": str(work),
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "per_device_train_batch_size": batch_size,
        "train_sampling_strategy": "sequential" if in_order else "random",
        "gradient_accumulation_steps": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": config.seed,
        "data_seed": config.seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,  # TRL turns it on; recomputing costs ~30% per step
    }
    if config.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        dpo_args = DPOConfig(**common, loss_type=["sigmoid", "sft"], beta=0.1)
        return DPOTrainer(
            model=peft_model, args=dpo_args, train_dataset=dataset, processing_class=tokenizer
        )
    from trl import SFTConfig

    args = SFTConfig(**common, completion_only_loss=True, max_length=None, packing=False)
    return _answer_loss_trainer()(
        model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def _answer_loss_trainer() -> Any:
    """TRL's SFTTrainer, scoring only the answer tokens through the LM head.

    The stock loss projects every position onto the 49k-token vocabulary (and computes entropy
    over it for its logs); the answers are a fifth of the tokens, so projecting only those
    saves that much of the head's forward and backward on every step. Same loss: mean
    cross-entropy of the completion tokens.
    """
    from trl import SFTTrainer

    class AnswerLossSFTTrainer(SFTTrainer):  # type: ignore[misc]
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            labels = inputs["labels"][:, 1:]
            mask = labels != -100  # position t predicts token t + 1
            select = torch.nn.functional.pad(mask, (0, 1))  # the last position predicts nothing
            logits = logits_at(model, inputs["input_ids"], inputs.get("attention_mask"), select)
            loss = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum")
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(count).clamp(min=1)
            return (loss, None) if return_outputs else loss

    return AnswerLossSFTTrainer


def _prepare_out_dir(out_dir: Path) -> Path:
    """A temp folder beside `out_dir`; refuse to overwrite a non-empty version folder."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already holds files; adapter versions are never reused")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))


def train_adapter(
    model: Any,
    tokenizer: Any,
    examples: list[TrainExample],
    config: TrainConfig,
    out_dir: str | Path,
    *,
    replay: Sequence[TrainExample] = (),
    progress: Callable[[dict[str, Any]], None] | None = None,
    general_prompts: Sequence[str] | None = None,
    start_from: str | Path | None = None,
    new_ids: Collection[int] | None = None,
) -> TrainResult:
    """Train a LoRA on `examples` (+ `replay`), fit its scope, write both into `out_dir`.

    `general_prompts` are the scope's negatives (default: the shipped fitting set). The files
    appear in `out_dir` only once complete (written to a temp folder, then renamed).
    `start_from`: an adapter folder (the live version) whose LoRA weights the new one starts
    from, when its shape is this one's; `new_ids` are the corrections it does not hold yet.
    Anything else (no such folder, another shape, unreadable weights) starts from scratch.
    """
    started = time.monotonic()
    if not examples:
        raise ValueError("no corrections to train on")
    if config.max_steps < 1:
        raise ValueError("max_steps must be at least 1")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds files; adapter versions are never reused")
    torch.manual_seed(config.seed)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    newest_first = sorted(examples, key=lambda ex: not _is_new(ex, new_ids))
    expanded = [(ex, expand(ex, config.system_prompt, notes=config.notes)) for ex in newest_first]
    probes = [  # what the early-stop check scores: the likeliest misses first
        encode(tokenizer, p.messages, p.answer) for _, pairs in expanded for p in pairs
    ]
    new_probes = sum(len(pairs) for ex, pairs in expanded if _is_new(ex, new_ids))  # the first
    fingerprint = prompts_key(model, tokenizer, config.system_prompt, config.notes)
    negatives = list(general_prompts) if general_prompts is not None else general_fit_prompts()
    scope, scope_metrics = fit_scope(model, tokenizer, examples, negatives, notes=config.notes)
    phases = {"scope": time.monotonic() - started}

    tmp = _prepare_out_dir(out)
    state = _model_state(model)
    _unmark_gguf(model)
    peft_model = _attach_lora(model, config.shape)
    try:
        resumed = start_from is not None and _resume(peft_model, Path(start_from))
        monitor = _Monitor(peft_model, probes, pad_id, config.max_steps, progress)
        # The live weights may answer the new corrections already: with notes, a version that
        # learned to answer from its note reads a new correction's note like an old one's. Then
        # no step is needed, and the new scope (its keys and notes) is all that changes. The
        # older phrasings need no second look when these very weights answered all of them
        # under these very prompts (the live scope's `verified` fingerprint says so).
        known = resumed and new_ids is not None and _verified(Path(str(start_from))) == fingerprint
        if resumed and monitor.check(upto=new_probes if known else None):
            monitor.learned = True
            phases["setup"] = time.monotonic() - started - phases["scope"] - monitor.check_seconds
        else:
            plan = _blocks(examples, replay, new_ids, tokenizer, config) if resumed else None
            if plan is not None:  # each step: every new phrasing, and the next few old ones
                dataset, batch, monitor.check_every = (*plan, RESUMED_CHECK_EVERY)
            else:
                dataset = _dataset(examples, replay, tokenizer, config)
                batch = min(BATCH_SIZE, len(dataset))
                monitor.check_every = -(-len(dataset) // batch)  # once per epoch
            trainer = _trainer(
                peft_model, tokenizer, dataset, config, tmp / "trainer", batch, plan is not None
            )
            trainer.add_callback(_callback(monitor))
            phases["setup"] = time.monotonic() - started - phases["scope"] - monitor.check_seconds
            trainer.train()
            if not monitor.learned:  # ran out of steps: one last look at the final weights
                monitor.learned = monitor.check()
        phases["checks"] = monitor.check_seconds
        phases["steps"] = time.monotonic() - started - sum(phases.values())
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        scope.verified = fingerprint if monitor.learned else None
        scope.save(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _restore(peft_model, model, state)
    phases["save"] = time.monotonic() - started - sum(phases.values())
    return TrainResult(
        adapter_dir=str(out),
        steps=len(monitor.losses),
        losses=monitor.losses,
        seconds=time.monotonic() - started,
        learned=monitor.learned,
        scope=scope_metrics,
        resumed=resumed,
        phases={k: round(v, 3) for k, v in phases.items()},
    )


def _is_new(example: TrainExample, new_ids: Collection[int] | None) -> bool:
    """Whether the live version does not hold this correction yet."""
    return new_ids is not None and example.correction_id in new_ids


def _dataset(
    examples: Sequence[TrainExample],
    replay: Sequence[TrainExample],
    tokenizer: Any,
    config: TrainConfig,
) -> Any:
    """Corrections (with their notes, when configured) and replay (never with a note: the
    scope holds no key for it, so no note of its own is ever served beside it)."""
    parts = []
    if examples:
        parts.append(
            build_dataset(
                list(examples), tokenizer, config.system_prompt, config.method, notes=config.notes
            )
        )
    if replay:
        parts.append(build_dataset(list(replay), tokenizer, config.system_prompt, config.method))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _blocks(
    examples: list[TrainExample],
    replay: Sequence[TrainExample],
    new_ids: Collection[int] | None,
    tokenizer: Any,
    config: TrainConfig,
) -> tuple[Any, int] | None:
    """A resumed run's data, in the order it is trained: (dataset, batch size), or None when
    random batches over everything serve as well (nothing new, nothing old, or too much new).

    The live weights already answer the old corrections, so every step holds each phrasing of
    the new corrections once, beside as many old phrasings (at least MIN_OLD_PER_STEP), taken
    in turn from a shuffled list so an epoch rehearses each old one once. A step then costs
    what its rows cost: 10 rows for one new correction of five phrasings, not 16.
    """
    new = [ex for ex in examples if _is_new(ex, new_ids)]
    old = [ex for ex in examples if not _is_new(ex, new_ids)]
    if not new or not (old or replay):
        return None
    fresh = _dataset(new, (), tokenizer, config)
    known = _dataset(old, replay, tokenizer, config)
    per_step = max(len(fresh), MIN_OLD_PER_STEP)
    if len(fresh) + per_step > BATCH_SIZE:
        return None
    rotation = torch.randperm(len(known), generator=torch.Generator().manual_seed(config.seed))
    order: list[int] = []
    for start in range(0, len(known), per_step):
        order += list(range(len(known), len(known) + len(fresh)))  # the new rows, every step
        order += rotation[start : start + per_step].tolist()
    data = datasets.concatenate_datasets([known, fresh]).select(order)
    return data, len(fresh) + min(per_step, len(known))


def _verified(folder: Path) -> str | None:
    """The prompts fingerprint a saved version was fully checked under, if any."""
    try:
        return Scope.load(folder).verified
    except Exception:  # no scope, or an unreadable one: nothing is known about it
        return None


def _resume(peft_model: Any, folder: Path) -> bool:
    """Load a saved adapter's LoRA weights into the fresh LoRA; False (still fresh) if unfit."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    ours = peft_model.peft_config["default"]
    try:
        theirs = LoraConfig.from_pretrained(str(folder))
        fields = ("r", "lora_alpha", "use_rslora", "use_dora", "layers_to_transform", "bias")
        if any(getattr(theirs, f) != getattr(ours, f) for f in fields) or set(
            theirs.target_modules
        ) != set(ours.target_modules):
            log.info("starting from scratch: %s has another LoRA shape", folder.name)
            return False
        weights = load_file(str(folder / "adapter_model.safetensors"))
        result: Any = set_peft_model_state_dict(peft_model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    except Exception as exc:
        log.warning("starting from scratch: cannot start from %s: %s", folder, exc)
        for module in peft_model.modules():  # undo a partial load
            if hasattr(module, "reset_lora_parameters") and "default" in getattr(
                module, "lora_A", {}
            ):
                module.reset_lora_parameters("default", True)
        return False
    return True


def _publish(tmp: Path, out: Path) -> None:
    for name in ADAPTER_FILES:
        if not (tmp / name).is_file():
            raise RuntimeError(f"peft did not write {name}")
    for stray in tmp.iterdir():
        if stray.name not in (*ADAPTER_FILES, "scope.safetensors"):
            if stray.is_dir():
                shutil.rmtree(stray)
            else:
                stray.unlink()
    if out.exists():
        out.rmdir()  # empty (checked before training)
    os.replace(tmp, out)


def _model_state(model: Any) -> dict[str, Any]:
    return {
        "training": model.training,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "use_cache": getattr(model.config, "use_cache", None),
        "hf_quantizer": getattr(model, "hf_quantizer", None),
        "is_quantized": vars(model).get("is_quantized"),
    }


def _unmark_gguf(model: Any) -> None:
    """GGUF weights are dequantised at load, yet transformers keeps a GGUF quantizer on the model
    and the Trainer then refuses to train; the weights are plain tensors, so hide the marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ == "GgufHfQuantizer":
        model.hf_quantizer = None
        model.is_quantized = False


def _restore(peft_model: Any, model: Any, state: dict[str, Any]) -> None:
    """Take the LoRA layers out again and put back what the trainer changed on the model."""
    base = peft_model.unload()
    if base is not model:
        log.warning("peft returned a different base model object; the caller's model was restored")
    for name, param in model.named_parameters():
        param.requires_grad_(state["requires_grad"].get(name, param.requires_grad))
    if state["use_cache"] is not None:
        model.config.use_cache = state["use_cache"]
    model.train(state["training"])
    if state["hf_quantizer"] is not None:
        model.hf_quantizer = state["hf_quantizer"]
    if state["is_quantized"] is not None:
        model.is_quantized = state["is_quantized"]
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
