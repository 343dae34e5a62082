"""The local inference core: one transformers base model, many LoRA adapters, continuous batching.

The event loop side: `LocalEngine` validates and enqueues requests, flips adapter routing, and
hands each caller a `LocalCompletion` fed through an asyncio queue. All model work happens in
`model.worker.Worker` on one thread, so a forward pass never blocks the bots.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from model.interface import (
    AdapterLoadError,
    AdapterSpec,
    Completion,
    EngineStats,
    GenerationRequest,
    InferenceEngine,
)
from model.lora import LoraHost
from model.registry import Entry, Registry, read_adapter
from model.worker import Ticket, Worker

log = logging.getLogger(__name__)


class LocalCompletion(Completion):
    """Iterate once for text chunks; cancel() (or abandoning the iterator) frees the slot."""

    def __init__(self, ticket: Ticket) -> None:
        self._ticket = ticket
        self._started = False
        self._cancelled = False

    def __aiter__(self) -> AsyncIterator[str]:
        if self._started:
            raise RuntimeError("a Completion can be iterated only once")
        self._started = True
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        try:
            while not self._cancelled:
                kind, payload = await self._ticket.events.get()
                if kind == "route":
                    self.adapter_version, self.prompt_tokens = payload
                elif kind == "text":
                    self.completion_tokens = payload[1]
                    if payload[0] and not self._cancelled:
                        yield payload[0]
                elif kind == "done":
                    self.finish_reason, self.completion_tokens = payload
                    return
                elif kind == "error":
                    raise payload
            self.finish_reason = "cancelled"
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            if self.finish_reason == "cancelled":
                self._ticket.cancelled = True

    async def cancel(self) -> None:
        self._cancelled = True
        self._ticket.cancelled = True

    def __del__(self) -> None:  # dropped without being read: free the slot
        self._ticket.cancelled = self._ticket.cancelled or self.finish_reason is None


class LocalEngine(InferenceEngine):
    """transformers + peft on this machine; see the module docstring for the threading model."""

    def __init__(
        self,
        model: str = "bundled",
        *,
        adapters_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | Path | None = None,
        max_batch_size: int = 16,
        max_resident_adapters: int = 32,
        load_in_4bit: bool = False,
        packed: bool = True,
        gathered_lora: bool = True,
        lean_decode: bool = True,
        lora_stack_mb: int = 512,
        loaded: tuple[Any, Any] | None = None,
    ) -> None:
        """`loaded` = (model, tokenizer) already in memory (tests) instead of loading `model`.

        `gathered_lora`: rows on different adapters share two batched matmuls per LoRA layer
        (`model.gathered`); off, peft's mixed-batch forward loops over the batch's adapters.
        `lean_decode`: Llama decode steps skip transformers' forward machinery (`model.decode`).
        `lora_stack_mb`: memory for those stacks between decode steps (more: restacked per step).
        `packed`: a GGUF model's 4-bit layers run on their own blocks on CPU (`model.packed`).
        """
        if max_batch_size < 1 or max_resident_adapters < 1:
            raise ValueError("max_batch_size and max_resident_adapters must be at least 1")
        self.model_id = model
        self.model_name = model
        self.device, self.dtype, self.cache_dir = device, dtype, cache_dir
        self.load_in_4bit = load_in_4bit
        self.packed = packed
        self.gathered_lora = gathered_lora
        self.lean_decode = lean_decode
        self.lora_stack_bytes = max(0, lora_stack_mb) << 20
        self.max_batch_size = max_batch_size
        self.adapters_dir = Path(adapters_dir)
        self.registry = Registry(self.adapters_dir, max_resident_adapters)
        self._loaded = loaded
        self._host: LoraHost | None = None
        self.tokenizer: Any = None
        self._worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self._activating = asyncio.Lock()
        self._closed = False
        self._requests = 0

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        began = time.monotonic()
        if self._loaded is None:
            from model.loading import load_base_model

            log.info("loading base model %s on %s (%s)", self.model_id, self.device, self.dtype)
            model, tokenizer, source = await asyncio.to_thread(
                load_base_model,
                self.model_id,
                device=self.device,
                dtype=self.dtype,
                cache_dir=self.cache_dir,
                load_in_4bit=self.load_in_4bit,
                packed=self.packed,
            )
            self.model_name = source.name
        else:
            model, tokenizer = self._loaded
            self.model_name = getattr(model.config, "_name_or_path", "") or self.model_id
        model.eval()
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self._host = LoraHost(model, self.registry.max_resident)
        self._host.gather.enabled = self.gathered_lora
        self._host.lean_enabled = self.lean_decode
        self._host.gather.max_bytes = self.lora_stack_bytes
        self._worker = Worker(
            self._host, tokenizer, self.registry, self.adapters_dir, self.max_batch_size
        )
        params = sum(p.numel() for p in model.parameters())
        log.info(
            "model %s ready: %.1fM parameters, %s on %s, %.1fs",
            self.model_name,
            params / 1e6,
            next(model.parameters()).dtype,
            next(model.parameters()).device,
            time.monotonic() - began,
        )
        self._thread = threading.Thread(target=self._worker.run, name="ouro-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._closed = True
        if self._thread is None or self._worker is None:
            return
        self._worker.inbox.put(("stop",))
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # --- requests (event loop) -----------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> Completion:
        worker = self._running()
        _validate(request)
        loop = asyncio.get_running_loop()
        ticket = Ticket(request, loop, asyncio.Queue(), self.registry.candidates(request.user_key))
        self._requests += 1
        worker.inbox.put(("request", ticket))
        return LocalCompletion(ticket)

    # --- adapters (event loop) -----------------------------------------------------------------
    async def activate(self, spec: AdapterSpec) -> None:
        """Check the files and route the owner to `spec`; its weights load at once only when
        that evicts nothing or replaces a resident version (`Worker.register`)."""
        worker = self._running()
        if not spec.version:
            raise AdapterLoadError("an adapter version needs a name")
        async with self._activating:
            entry = self.registry.entries.get(spec.version)
            if entry is not None and entry.spec.owner != spec.owner:
                raise AdapterLoadError(f"version {spec.version} belongs to another owner")
            if entry is None:
                began = time.monotonic()
                files = await asyncio.to_thread(read_adapter, self.adapters_dir, spec.path)
                new = Entry(spec=spec, scope=files.scope)
                old = await self._call(lambda: worker.register(new, files))
                log.info(
                    "adapter %s %s in %.2fs",
                    spec.version,
                    "loaded" if new.resident else "registered (loads on its first request)",
                    time.monotonic() - began,
                )
            else:
                old = self.registry.flip(spec, entry)
            worker.inbox.put(("wake",))
            log.info(
                "routing %s -> %s%s",
                "shared" if spec.owner is None else f"user {spec.owner}",
                spec.version,
                f" (was {old.spec.version}, unloaded once idle)" if old else "",
            )

    async def deactivate(self, owner: str | None) -> None:
        old = self.registry.unroute(owner)
        if self._worker is not None:
            self._worker.inbox.put(("wake",))
        if old is not None:
            log.info("routing %s -> base model (was %s)", owner or "shared", old.spec.version)

    def active_versions(self) -> dict[str, str]:
        return self.registry.active_versions()

    def stats(self) -> EngineStats:
        counts = self._worker.counts if self._worker else {}
        return EngineStats(
            requests_total=self._requests,
            requests_failed=counts.get("failed", 0),
            tokens_generated=counts.get("tokens", 0),
            batch_sizes=dict(self._worker.batch_sizes) if self._worker else {},
            resident_adapters=self.registry.resident_count(),
            active_versions=self.active_versions(),
        )

    async def set_gathered_lora(self, on: bool) -> None:
        """Switch between gathered and peft per-row LoRA between decode steps (benchmarks)."""
        self.gathered_lora = on
        if self._host is not None:
            host = self._host
            await self._call(lambda: setattr(host.gather, "enabled", on))

    async def set_lean_decode(self, on: bool) -> None:
        """Switch between the lean decode step and the model's forward (benchmarks)."""
        self.lean_decode = on
        if self._host is not None:
            host = self._host
            await self._call(lambda: setattr(host, "lean_enabled", on))

    def adapter_load_seconds(self) -> list[float]:
        """How long recent adapter loads took in the worker (attach only, not file reads)."""
        return list(self._worker.load_seconds) if self._worker else []

    def _running(self) -> Worker:
        if self._worker is None or self._thread is None or self._closed:
            raise RuntimeError("the engine is not running (use `async with engine:`)")
        return self._worker

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread between decode steps."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._running().inbox.put(("call", fn, loop, future))
        return await future


def _validate(request: GenerationRequest) -> None:
    """Refuse malformed requests up front with a message a caller can show."""
    if not request.messages:
        raise ValueError("a request needs at least one message")
    s = request.sampling
    if s.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not s.temperature >= 0:
        raise ValueError("temperature must be 0 (greedy) or positive")
    if not 0 < s.top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
