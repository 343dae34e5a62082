"""Which adapter versions exist, which one each owner is routed to, and which are in memory.

Registered versions (one active per owner, maybe thousands, plus superseded ones still serving
in-flight requests) are cheap: a spec and a small scope. Resident versions hold LoRA weights
inside the model, each in a peft adapter slot (see `model.lora.LoraHost`); there are at most
`max_resident` of them, and the least recently used one with nothing in flight makes room for
the next. The registry only keeps the books (under a lock, because the event loop routes while
the worker thread loads); the engine's worker does the actual peft calls.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.interface import AdapterLoadError, AdapterSpec
from model.scope import SCOPE_FILE, Scope

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class AdapterFiles:
    """An adapter read from disk and checked: what the worker needs to attach it."""

    config: Any  # peft.LoraConfig
    weights: dict[str, torch.Tensor]
    scope: Scope


@dataclass
class Entry:
    spec: AdapterSpec
    scope: Scope
    # the peft slot it is loaded in while resident, set by the worker (versions may contain
    # characters peft refuses, and slots outlive the versions that pass through them)
    name: str | None = None
    active: bool = False  # some owner is routed to it
    retired: bool = False  # superseded or deactivated: drop once nothing is in flight
    resident: bool = False
    refs: int = 0  # requests admitted that may still use this version
    last_used: float = field(default_factory=time.monotonic)
    load_failures: int = 0


def resolve_inside(adapters_dir: Path, path: str | Path) -> Path:
    """The adapter folder, symlinks resolved, refused unless it lies inside `adapters_dir`."""
    root = adapters_dir.resolve()
    folder = Path(path)
    if not folder.is_absolute():
        folder = root / folder
    folder = folder.resolve()
    if folder == root or not folder.is_relative_to(root):
        raise AdapterLoadError(f"adapter path {path} is outside the adapter folder {root}")
    return folder


def read_adapter(adapters_dir: Path, path: str | Path) -> AdapterFiles:
    """Read and check an adapter folder; any problem becomes an AdapterLoadError.

    Only safetensors are read: a folder that also carries pickled weights is refused, so a
    tampered folder cannot smuggle code in through a loader that prefers `.bin`.
    """
    folder = resolve_inside(adapters_dir, path)
    if not folder.is_dir():
        raise AdapterLoadError(f"adapter folder {folder} does not exist")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterLoadError(f"adapter folder {folder} holds pickled files {pickles}; refused")
    for name in (WEIGHTS_FILE, CONFIG_FILE, SCOPE_FILE):
        file = folder / name
        real = file.resolve()
        if not real.is_file():
            raise AdapterLoadError(f"adapter {folder} is missing {name}")
        if not real.is_relative_to(adapters_dir.resolve()):
            raise AdapterLoadError(f"{file} links outside the adapter folder")
    try:
        from peft import LoraConfig

        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
            raise ValueError("not a LoRA adapter config")
        config = LoraConfig.from_pretrained(str(folder))
        config.inference_mode = True
        weights = load_file(str(folder / WEIGHTS_FILE))
        scope = Scope.load(folder)
    except AdapterLoadError:
        raise
    except Exception as exc:  # json, safetensors, scope: all mean "corrupt"
        raise AdapterLoadError(f"adapter {folder} is corrupt: {exc}") from exc
    if not weights or not any("lora_" in key for key in weights):
        raise AdapterLoadError(f"adapter {folder} has no LoRA weights")
    bad = [k for k, t in weights.items() if not torch.isfinite(t).all()]
    if bad:
        raise AdapterLoadError(f"adapter {folder} has non-finite weights in {bad[:3]}")
    return AdapterFiles(config=config, weights=weights, scope=scope)


def owner_key(owner: str | None) -> str:
    return "shared" if owner is None else owner


class Registry:
    """The routing table and the books on every registered version."""

    def __init__(self, adapters_dir: Path, max_resident: int) -> None:
        self.adapters_dir = adapters_dir
        self.max_resident = max(1, max_resident)
        self.lock = threading.Lock()
        self.entries: dict[str, Entry] = {}  # version -> entry
        self.routes: dict[str | None, str] = {}  # owner -> active version

    # --- routing (event loop) ---------------------------------------------------------------
    def candidates(self, user_key: str | None) -> list[Entry]:
        """Personal then shared active entries for a request, each pinned (refs + 1)."""
        with self.lock:
            owners: list[str | None] = [user_key, None] if user_key is not None else [None]
            found = [self.entries[self.routes[o]] for o in owners if o in self.routes]
            for entry in found:
                entry.refs += 1
            return found

    def flip(self, spec: AdapterSpec, entry: Entry) -> Entry | None:
        """Make `entry` its owner's active version at once; returns the superseded entry."""
        with self.lock:
            old_version = self.routes.get(spec.owner)
            self.entries[spec.version] = entry
            entry.active, entry.retired = True, False
            self.routes[spec.owner] = spec.version
            if old_version is None or old_version == spec.version:
                return None
            old = self.entries[old_version]
            old.active, old.retired = False, True
            return old

    def unroute(self, owner: str | None) -> Entry | None:
        with self.lock:
            version = self.routes.pop(owner, None)
            if version is None:
                return None
            entry = self.entries[version]
            entry.active, entry.retired = False, True
            return entry

    def active(self, owner: str | None) -> Entry | None:
        with self.lock:
            version = self.routes.get(owner)
            return self.entries[version] if version is not None else None

    def active_versions(self) -> dict[str, str]:
        with self.lock:
            return {owner_key(o): v for o, v in self.routes.items()}

    # --- residency (worker) -----------------------------------------------------------------
    def release(self, entry: Entry) -> None:
        with self.lock:
            entry.refs = max(0, entry.refs - 1)
            entry.last_used = time.monotonic()

    def touch(self, entry: Entry) -> None:
        with self.lock:
            entry.last_used = time.monotonic()

    def resident_count(self) -> int:
        with self.lock:
            return sum(e.resident for e in self.entries.values())

    def has_room(self) -> bool:
        """True when one more adapter can be loaded without evicting any."""
        return self.resident_count() < self.max_resident

    def evictable(self, keep: Entry | None = None) -> list[Entry]:
        """Resident entries over the limit, least recently used first, never one in flight."""
        with self.lock:
            resident = [e for e in self.entries.values() if e.resident]
            excess = len(resident) - self.max_resident + (1 if keep and not keep.resident else 0)
            if excess <= 0:
                return []
            idle = sorted((e for e in resident if e.refs == 0 and e is not keep), key=_lru)
            return idle[:excess]

    def retired(self) -> list[Entry]:
        """Superseded entries with nothing in flight: drop them (and unload if resident)."""
        with self.lock:
            done = [e for e in self.entries.values() if e.retired and e.refs == 0]
            for entry in done:
                if self.entries.get(entry.spec.version) is entry:
                    del self.entries[entry.spec.version]
            return done


def _lru(entry: Entry) -> float:
    return entry.last_used
