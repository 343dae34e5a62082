"""The decode worker: the one thread that owns the model.

Between decode steps it takes commands from its inbox (new requests, adapter loads), admits
newcomers (route by scope, prefill them together with per-row adapters, merge their KV into
the running batch), runs one decode step for every row, streams text back to each request's
event loop, and drops finished or cancelled rows. Adapter loads and unloads also happen here,
between steps, so nobody ever sees a half-swapped model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from model.batching import Detokenizer, KVBatch, left_pad, new_cache, sample
from model.interface import GenerationRequest
from model.lora import BASE, LoraHost, embed_base
from model.registry import AdapterFiles, Entry, Registry, read_adapter
from model.scope import with_note

log = logging.getLogger(__name__)

Finish = Literal["stop", "length", "cancelled"]


@dataclass(eq=False)
class Ticket:
    """A request as both threads see it: the loop reads events, the worker writes them."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]]
    candidates: list[Entry]
    cancelled: bool = False

    def send(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass(eq=False)
class _Row:
    """Worker-only decode state of one admitted request."""

    ticket: Ticket
    entry: Entry | None
    prompt: list[int]
    max_new: int
    detok: Detokenizer
    generator: torch.Generator | None
    length: int = 0  # tokens in the KV cache = position of the next input token
    last: int = 0
    generated: int = 0
    finish: Finish | None = None
    name: str = BASE


class Worker:
    """Continuous batching over one model; every method runs on the worker thread."""

    def __init__(
        self,
        host: LoraHost,
        tokenizer: Any,
        registry: Registry,
        adapters_dir: Path,
        max_batch_size: int,
    ) -> None:
        self._host = host
        self.tokenizer = tokenizer
        self.registry = registry
        self.adapters_dir = adapters_dir
        self.max_batch_size = max_batch_size
        self._stop_ids = stop_ids(host.model, tokenizer)
        config = host.model.config
        self._max_positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
        self.inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._pending: deque[Ticket] = deque()
        self._rows: list[_Row] = []
        self._kv: KVBatch | None = None
        self.counts = Counter[str]()
        self.batch_sizes = Counter[int]()
        self.load_seconds: deque[float] = deque(maxlen=256)  # recent adapter attaches

    def run(self) -> None:
        """The thread body: drain commands, admit, decode one step, repeat."""
        while True:
            try:
                if not self._drain(block=not self._rows and not self._pending):
                    break
                self._collect()
                if self._pending and len(self._rows) < self.max_batch_size:
                    self._admit()
                if self._rows:
                    self._step()
            except Exception as exc:  # a bug must not strand every waiting consumer
                log.exception("engine worker error; failing the requests in the batch")
                for row in self._rows:
                    self._fail(row, exc)
                self._rows, self._kv = [], None
        for row in self._rows:
            self._finish(row, "cancelled")
        while self._pending:
            ticket = self._pending.popleft()
            self._release_all(ticket)
            ticket.send("done", ("cancelled", 0))
        self._rows, self._kv = [], None
        for entry in list(self.registry.entries.values()):
            if entry.resident:
                self._unload(entry)
        self._host.clear()

    def _drain(self, block: bool) -> bool:
        """Take every queued command; False once asked to stop."""
        try:
            item = self.inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            kind = item[0]
            if kind == "stop":
                return False
            if kind == "request":
                self._pending.append(item[1])
            elif kind == "call":
                _, fn, loop, future = item
                try:
                    result, error = fn(), None
                except Exception as exc:
                    result, error = None, exc
                loop.call_soon_threadsafe(_settle, future, result, error)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _collect(self) -> None:
        """Unload superseded versions nobody uses any more, and idle ones over the limit."""
        for entry in self.registry.retired() + self.registry.evictable():
            if entry.resident:
                self._unload(entry)
                log.info("adapter %s unloaded", entry.spec.version)

    def register(self, entry: Entry, files: AdapterFiles) -> Entry | None:
        """Route `entry`'s owner to it, loading it first only where that costs nobody else.

        Loaded now when there is room, or when the owner's live version is resident (a hot
        swap: the new version loads beside the old one, and the first request after the flip
        must not wait); otherwise loaded on its first request. Returns the superseded entry.
        """
        live = self.registry.active(entry.spec.owner)
        if live is not None and live.resident:
            self.registry.touch(live)  # make room elsewhere than the version still serving
            self.load(entry, files)
        elif self.registry.has_room():
            self.load(entry, files)
        else:
            self._host.check(files)
        return self.registry.flip(entry.spec, entry)

    def load(self, entry: Entry, files: AdapterFiles) -> None:
        """Make room (least recently used idle adapters go), then attach the weights."""
        for victim in self.registry.evictable(keep=entry):
            self._unload(victim)
            log.info("adapter %s evicted (least recently used)", victim.spec.version)
        began = time.perf_counter()
        entry.name = self._host.attach(files)
        self.load_seconds.append(time.perf_counter() - began)
        entry.resident = True
        self.registry.touch(entry)

    def _unload(self, entry: Entry) -> None:
        """Give the entry's slot back; only for entries with nothing in flight (refs == 0)."""
        if entry.name is not None:
            self._host.detach(entry.name)
        entry.resident, entry.name = False, None

    def _ensure_resident(self, entry: Entry) -> bool:
        if entry.resident:
            self.registry.touch(entry)
            return True
        try:
            self.load(entry, read_adapter(self.adapters_dir, entry.spec.path))
        except Exception as exc:
            entry.load_failures += 1
            self.counts["adapter_load_failures"] += 1
            log.warning("adapter %s failed to load on demand: %s", entry.spec.version, exc)
            return False
        log.info("adapter %s loaded on demand in %.2fs", entry.spec.version, self.load_seconds[-1])
        return True

    def _release_all(self, ticket: Ticket) -> None:
        for entry in ticket.candidates:
            self.registry.release(entry)
        ticket.candidates = []

    def _admit(self) -> None:
        tickets: list[Ticket] = []
        while self._pending and len(self._rows) + len(tickets) < self.max_batch_size:
            ticket = self._pending.popleft()
            if ticket.cancelled:
                self._release_all(ticket)
                ticket.send("done", ("cancelled", 0))
            else:
                tickets.append(ticket)
        rows = [row for row in map(self._prepare, tickets) if row is not None]
        if not rows:
            return
        self._route(rows)
        try:
            self._prefill(rows)
        except Exception as exc:
            log.exception("prefill failed")
            for row in rows:
                self._fail(row, exc)

    def _prepare(self, ticket: Ticket) -> _Row | None:
        request = ticket.request
        try:
            prompt = self._encode(_messages(request))
        except Exception as exc:
            self._release_all(ticket)
            self.counts["failed"] += 1
            ticket.send("error", exc if isinstance(exc, ValueError) else ValueError(str(exc)))
            return None
        sampling = request.sampling
        generator = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        return _Row(
            ticket=ticket,
            entry=None,
            prompt=prompt,
            max_new=self._max_new(request, prompt),
            detok=Detokenizer(self.tokenizer),
            generator=generator,
        )

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat-template token ids; ValueError when they leave no room for an answer."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        prompt = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self._max_positions - len(prompt) < 1:
            raise ValueError(
                f"the conversation is {len(prompt)} tokens; the model reads at most "
                f"{self._max_positions - 1}: shorten it"
            )
        return prompt

    def _add_note(self, row: _Row, note: str) -> None:
        """Serve `row` with its adapter's note in the system message (model.scope); a note
        that would leave no room for the answer is left out."""
        try:
            prompt = self._encode(with_note(_messages(row.ticket.request), note))
        except ValueError:
            log.warning("a note would overflow the context; serving without it")
            return
        row.prompt = prompt
        row.max_new = self._max_new(row.ticket.request, prompt)

    def _max_new(self, request: GenerationRequest, prompt: list[int]) -> int:
        """The request's token limit, within what the context leaves after `prompt`."""
        return min(request.sampling.max_new_tokens, self._max_positions - len(prompt))

    def _route(self, rows: list[_Row]) -> None:
        """Per row: personal adapter if in its scope, else shared if in scope, else base."""
        scoped = [r for r in rows if r.ticket.candidates]
        embeddings: dict[int, torch.Tensor] = {}
        if scoped:
            layers = {e.scope.layer for r in scoped for e in r.ticket.candidates}
            texts = [_question(r.ticket.request) for r in scoped]
            try:
                embeddings = embed_base(
                    self._host.model, self._host.modules, self.tokenizer, texts, layers
                )
            except Exception:
                log.exception("scope embedding failed; routing these requests to the base model")
        for i, row in enumerate(scoped):
            chosen, note = None, None
            for entry in row.ticket.candidates:
                if chosen is None:
                    inside, note = _inside(entry, embeddings, i)
                    if inside and self._ensure_resident(entry):
                        chosen = entry
                        continue
                self.registry.release(entry)
            row.ticket.candidates = []
            row.entry = chosen
            if chosen is not None:
                assert chosen.name is not None, "a resident adapter has a slot"
                row.name = chosen.name
                if note is not None:
                    self._add_note(row, note)
        for row in rows:
            version = row.entry.spec.version if row.entry is not None else None
            row.ticket.send("route", (version, len(row.prompt)))

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]) -> None:
        """Prompts into the KV cache, and each row's first token.

        On CPU each prompt runs alone: its cache and first logits are then the same bits as
        if it had arrived alone (a padded batch computes its attention differently in the
        last bits), and batching buys nothing there, since the kernels' cost grows with the
        rows. Elsewhere (GPU) the newcomers prefill as one left-padded batch.
        """
        device = next(self._host.model.parameters()).device
        groups = [[row] for row in rows] if device.type == "cpu" else [rows]
        batches, first = [], []
        for group in groups:
            ids, mask = left_pad([r.prompt for r in group], int(self.tokenizer.pad_token_id))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = new_cache(self._host.model.config)
            out = self._host.forward(
                [r.name for r in group],
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            batches.append(KVBatch(cache, mask.to(device)))
            first.extend(out.logits[:, -1, :])
        if self._kv is None or not self._rows:
            self._kv = batches[0]
            batches = batches[1:]
        if batches:
            self._kv.merge(*batches)
        self._rows.extend(rows)
        for row, logits in zip(rows, first, strict=True):
            row.length = len(row.prompt)
            self._emit(row, logits)
        self._drop_finished()

    @torch.inference_mode()
    def _step(self) -> None:
        assert self._kv is not None
        for row in self._rows:
            if row.ticket.cancelled:
                row.finish = "cancelled"
        self._drop_finished()
        if not self._rows:
            return
        kv, rows = self._kv, self._rows
        device = kv.mask.device
        try:
            logits = self._host.decode(
                [r.name for r in rows],
                input_ids=torch.tensor([[r.last] for r in rows], device=device),
                position_ids=torch.tensor([[r.length] for r in rows], device=device),
                attention_mask=kv.step_mask(),
                cache=kv.cache,
            )
        except Exception as exc:
            log.exception("decode step failed; failing its %d requests", len(rows))
            for row in rows:
                self._fail(row, exc)
            self._rows, self._kv = [], None
            return
        self.batch_sizes[len(rows)] += 1
        for row, row_logits in zip(rows, logits, strict=True):
            row.length += 1
            self._emit(row, row_logits)
        self._drop_finished()

    def _emit(self, row: _Row, logits: torch.Tensor) -> None:
        sampling = row.ticket.request.sampling
        token = sample(logits, sampling.temperature, sampling.top_p, row.generator)
        if token in self._stop_ids:
            row.finish = "stop"
            return
        row.last = token
        row.generated += 1
        self.counts["tokens"] += 1
        text = row.detok.push(token)
        if text:
            row.ticket.send("text", (text, row.generated))
        if row.generated >= row.max_new:
            row.finish = "length"

    def _drop_finished(self) -> None:
        if not any(r.finish for r in self._rows):
            return
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        for row in self._rows:
            if row.finish is not None:
                self._finish(row, row.finish)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._kv = None
        elif self._kv is not None:
            self._kv.select(keep)

    def _finish(self, row: _Row, reason: Finish) -> None:
        rest = row.detok.flush() if reason != "cancelled" else ""
        if rest:
            row.ticket.send("text", (rest, row.generated))
        row.ticket.send("done", (reason, row.generated))
        if row.entry is not None:
            self.registry.release(row.entry)
            row.entry = None

    def _fail(self, row: _Row, exc: Exception) -> None:
        self.counts["failed"] += 1
        if row.entry is not None:
            self.registry.release(row.entry)
            row.entry = None
        row.ticket.send("error", RuntimeError(f"generation failed: {exc}"))


def _settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _question(request: GenerationRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def _messages(request: GenerationRequest) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in request.messages]


def _inside(entry: Entry, embeddings: dict[int, torch.Tensor], i: int) -> tuple[bool, str | None]:
    """Whether row `i` falls in the entry's scope, and the note to serve it with (or None)."""
    query = embeddings.get(entry.scope.layer)
    if query is None:
        return False, None
    try:
        inside, nearest = entry.scope.nearest(query[i : i + 1])
    except Exception:  # a scope from another model (wrong width): never in scope
        log.warning("adapter %s has an unusable scope", entry.spec.version)
        return False, None
    if not bool(inside[0]):
        return False, None
    return True, entry.scope.note(int(nearest[0]))


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids
