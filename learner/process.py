"""Training and gating run in a child process, so the bots keep serving whatever happens there.

The parent starts `python -m learner.process`, writes a JSON `TrainSpec` to its stdin and
reads JSON lines back: `{"event": "progress", ...}` while training, then one
`{"event": "result", "train": ..., "report": ...}`. Libraries that print are pointed at
stderr, so stdout carries only this protocol. A crash, an out-of-memory kill or a timeout
raises `TrainingFailed` in the parent; the child only ever wrote inside its temporary folder,
which the caller deletes.

Run `python -m learner.process < spec.json` by hand to debug one training run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_ENTRY = "learner.process:train_and_gate"
_LINE_LIMIT = 16 * 1024 * 1024

Emit = Callable[[dict[str, Any]], None]
ProgressFn = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class TrainSpec:
    """Everything the child needs, as plain JSON: no live object crosses the process boundary.

    `examples`/`replay` hold `learner.types.TrainExample` fields, `config` the `TrainConfig`
    fields (with `shape` as a dict), `active_report` the active version's `GateReport` fields.
    `entry` is "module:function" or "/path/file.py:function" (tests swap the trainer).
    """

    out_dir: str
    examples: list[dict[str, Any]]
    config: dict[str, Any]
    replay: list[dict[str, Any]] = field(default_factory=list)
    model: str = "bundled"
    device: str = "auto"
    dtype: str = "auto"
    packed: bool = True  # GGUF 4-bit layers on their kernels (model.packed)
    cache_dir: str | None = None  # converted base model cache
    gate_cache_dir: str | None = None  # the gate's base-model reference answers
    floors: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0  # how far below the live version's scores a candidate may be
    active_report: dict[str, Any] | None = None
    other_questions: list[str] = field(default_factory=list)
    start_from: str | None = None  # the live version's folder, to start its weights from
    new_ids: list[int] = field(default_factory=list)  # corrections the live version lacks
    entry: str = DEFAULT_ENTRY
    nice: int = 10  # CPU priority below the bots', so chat stays fast while training runs


@dataclass(frozen=True)
class TrainOutput:
    train: dict[str, Any]  # TrainResult fields
    report: dict[str, Any]  # GateReport fields


class TrainingFailed(Exception):
    """The child crashed, was killed, timed out or reported an error; nothing was published."""


TrainRunner = Callable[[TrainSpec, ProgressFn], Awaitable[TrainOutput]]


async def run_in_subprocess(
    spec: TrainSpec, progress: ProgressFn, *, time_limit: float | None = None
) -> TrainOutput:
    """Run `spec` in a fresh Python process, forwarding its progress, and return its result.

    Awaited asynchronously, so the caller's event loop keeps serving. Cancelling the caller
    kills the child.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "learner.process",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=_LINE_LIMIT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        start_new_session=True,  # its own process group: killing it leaves no orphans
    )
    assert proc.stdin and proc.stdout and proc.stderr
    tail: collections.deque[str] = collections.deque(maxlen=30)
    drain = asyncio.create_task(_drain(proc.stderr, tail))
    result: dict[str, Any] | None = None
    error: str | None = None
    try:
        proc.stdin.write(json.dumps(asdict(spec)).encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await proc.stdin.drain()
        proc.stdin.close()
        async with asyncio.timeout(time_limit):
            async for raw in proc.stdout:
                event = _parse(raw)
                if event is None:
                    continue
                kind = event.pop("event", None)
                if kind == "progress":
                    await progress(event)
                elif kind == "result":
                    result = event
                elif kind == "error":
                    error = str(event.get("message", "unknown error"))
            code = await proc.wait()
    except TimeoutError:
        raise TrainingFailed(f"training took longer than {time_limit} s and was stopped") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        await drain
    if error is not None or code != 0 or result is None:
        log.warning("the training process failed; its last output:\n%s", "\n".join(tail))
    if error is not None:
        raise TrainingFailed(f"training failed: {error}")
    if code != 0 or result is None:
        raise TrainingFailed(_describe_exit(code, list(tail)))
    return TrainOutput(train=dict(result.get("train", {})), report=dict(result.get("report", {})))


async def _drain(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    """Keep the child's stderr flowing (a full pipe would block it) and remember its end."""
    async for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        if line:
            tail.append(line)
            log.debug("trainer: %s", line)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _describe_exit(code: int, tail: list[str]) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        why = f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    elif code == 0:
        why = "ended without a result"
    else:
        why = f"exited with status {code}"
    last = " | ".join(tail[-3:])
    return f"the training process {why}" + (f": {last}" if last else "")


class WarmTrainer:
    """A long-lived trainer child that keeps the base model loaded between runs.

    Starting Python, importing torch/transformers/TRL and loading the base model costs ~15 s
    on 2 CPU cores, more than training one correction; a warm child pays it once, before the
    first correction arrives (`warm`). Same protocol as `run_in_subprocess`, one JSON request
    per stdin line; the same guarantees: a crash, a timeout, a cancelled job or a reported
    error kills the child (so no half-changed model is ever reused) and the next run starts a
    fresh one. Runs go one at a time.
    """

    def __init__(
        self,
        *,
        time_limit: float | None = None,
        nice: int = 10,
        threads: int | None = None,
        preload: dict[str, Any] | None = None,
    ) -> None:
        """`preload`: model/device/dtype/cache_dir to load as soon as the child starts;
        `threads`: CPU threads torch may use there (None: torch's default, one per core)."""
        self.time_limit, self.nice, self.preload = time_limit, nice, preload
        self.threads = threads
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=30)
        self._lock = asyncio.Lock()
        self.started = 0  # children started so far

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def warm(self) -> None:
        """Start the child now rather than at the first run; return once it has loaded (and
        prepared, see `prepare_checks`) what `preload` names, or failed to."""
        async with self._lock:
            proc = await self._ensure()
            if self.preload is None or proc.stdout is None:
                return
            try:
                async with asyncio.timeout(self.time_limit):
                    while True:
                        raw = await proc.stdout.readline()
                        if not raw:
                            break  # died while loading
                        event = _parse(raw)
                        if event is not None and event.get("event") in ("ready", "load_failed"):
                            return
            except TimeoutError:
                log.warning("the trainer process took too long to load; starting over later")
            await self._kill()  # the first run starts a fresh one

    async def __call__(self, spec: TrainSpec, progress: ProgressFn) -> TrainOutput:
        async with self._lock:
            proc = await self._ensure()
            assert proc.stdin and proc.stdout
            ok = False
            try:
                await _send(proc, {"op": "train", "spec": asdict(spec)})
                async with asyncio.timeout(self.time_limit):
                    output = await self._read_until_result(proc, progress)
                ok = True
                return output
            except TimeoutError:
                raise TrainingFailed(
                    f"training took longer than {self.time_limit} s and was stopped"
                ) from None
            finally:
                if not ok:
                    await self._kill()

    async def close(self) -> None:
        async with self._lock:
            await self._kill()

    async def _read_until_result(
        self, proc: asyncio.subprocess.Process, progress: ProgressFn
    ) -> TrainOutput:
        assert proc.stdout
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                code = await proc.wait()
                if self._drain is not None:
                    await self._drain
                log.warning(
                    "the training process died; its last output:\n%s", "\n".join(self._tail)
                )
                raise TrainingFailed(_describe_exit(code, list(self._tail)))
            event = _parse(raw)
            if event is None:
                continue
            kind = event.pop("event", None)
            if kind == "progress":
                await progress(event)
            elif kind == "result":
                return TrainOutput(
                    train=dict(event.get("train", {})), report=dict(event.get("report", {}))
                )
            elif kind == "error":
                log.warning("the training run failed; trainer output:\n%s", "\n".join(self._tail))
                raise TrainingFailed(f"training failed: {event.get('message', 'unknown error')}")

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        await self._kill()
        self._tail.clear()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "learner.process",
            "--serve",
            "--nice",
            str(self.nice),
            *(["--threads", str(self.threads)] if self.threads else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
            start_new_session=True,
        )
        assert proc.stderr
        self._proc, self.started = proc, self.started + 1
        self._drain = asyncio.create_task(_drain(proc.stderr, self._tail))
        if self.preload is not None:
            await _send(proc, {"op": "load", **self.preload})
        log.info("trainer process %d started", proc.pid)
        return proc

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain
            self._drain = None


async def _send(proc: asyncio.subprocess.Process, request: dict[str, Any]) -> None:
    assert proc.stdin
    proc.stdin.write(json.dumps(request).encode() + b"\n")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await proc.stdin.drain()


# --- the child ------------------------------------------------------------------------------


def train_and_gate(spec: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Default entry: load the base model, train the candidate into `out_dir`, gate it."""
    from learner.gate import GateFloors, evaluate_candidate
    from learner.train import train_adapter
    from learner.types import GateReport, LoraShape, TrainConfig, TrainExample

    model, tokenizer = base_model(
        spec["model"], spec["device"], spec["dtype"], spec["cache_dir"], spec.get("packed", True)
    )

    def example(fields: dict[str, Any]) -> TrainExample:
        return TrainExample(**{**fields, "rewordings": tuple(fields.get("rewordings", ()))})

    examples = [example(e) for e in spec["examples"]]
    replay = [example(e) for e in spec["replay"]]
    settings = dict(spec["config"])
    shape = dict(settings.pop("shape", {}))
    if "target_modules" in shape:
        shape["target_modules"] = tuple(shape["target_modules"])
    config = TrainConfig(shape=LoraShape(**shape), **settings)
    emit({"event": "progress", "stage": "training", "step": 0, "loss": None})
    result = train_adapter(
        model,
        tokenizer,
        examples,
        config,
        spec["out_dir"],
        replay=replay,
        progress=lambda p: emit({"event": "progress", "stage": "training", **p}),
        start_from=spec.get("start_from"),
        new_ids=spec.get("new_ids") or None,
    )
    emit({"event": "progress", "stage": "gate", "step": result.steps, "loss": None})
    active = spec.get("active_report")
    floors = GateFloors(
        **{f"min_{name}": value for name, value in spec["floors"].items()},
        tolerance=float(spec.get("tolerance") or 0.0),
    )
    report = evaluate_candidate(
        model,
        tokenizer,
        result.adapter_dir,
        examples,
        cache_dir=spec.get("gate_cache_dir") or spec["out_dir"],
        system_prompt=config.system_prompt,
        floors=floors,
        active=GateReport(**active) if active else None,
        other_questions=tuple(spec.get("other_questions", ())),
    )
    return {"train": asdict(result), "report": asdict(report)}


@functools.lru_cache(maxsize=1)
def base_model(
    model: str, device: str, dtype: str, cache_dir: str | None, packed: bool = True
) -> tuple[Any, Any]:
    """The base model and tokenizer, loaded once per child (a warm child keeps them)."""
    from model.loading import load_base_model

    loaded, tokenizer, _ = load_base_model(
        model, device=device, dtype=dtype, cache_dir=cache_dir, packed=packed
    )
    return loaded, tokenizer


def prepare_checks(
    model: Any,
    tokenizer: Any,
    gate_cache_dir: str,
    system_prompt: str,
    general: Sequence[str] | None = None,
) -> None:
    """Work every run repeats on the unchanged base model, done once before the first run.

    The scope's negatives (general prompts embedded at the scope layer, kept in memory) and the
    gate's reference answers (the base model's own answers to the held-out prompts, cached on
    disk): on a fresh data folder the latter is most of a first run's gate time. `general`
    replaces the gate's held-out prompts (tests).
    """
    from learner.gate import general_prompts, reference_answers
    from learner.scope_fit import warm_negatives

    warm_negatives(model, tokenizer)
    prompts = list(general) if general is not None else general_prompts()
    reference_answers(
        model, tokenizer, prompts, system_prompt=system_prompt, cache_dir=gate_cache_dir
    )


def _load_entry(entry: str) -> Callable[[dict[str, Any], Emit], dict[str, Any]]:
    target, _, name = entry.rpartition(":")
    if target.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {target}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    func: Callable[[dict[str, Any], Emit], dict[str, Any]] = getattr(module, name)
    return func


def main(argv: list[str] | None = None) -> int:
    """Child side: one spec on stdin (or, with --serve, one request per line), JSON lines out."""
    args = sys.argv[1:] if argv is None else argv
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr

    def emit(event: dict[str, Any]) -> None:
        protocol.write(json.dumps(event, default=str) + "\n")
        protocol.flush()

    if "--serve" in args:
        nice = int(args[args.index("--nice") + 1]) if "--nice" in args else 0
        with contextlib.suppress(OSError, AttributeError):
            os.nice(nice)
        if "--threads" in args:
            import torch

            torch.set_num_threads(max(1, int(args[args.index("--threads") + 1])))
        return _serve(emit)
    try:
        spec = json.loads(sys.stdin.read())
    except ValueError as exc:
        emit({"event": "error", "message": f"unreadable spec: {exc}"})
        return 1
    with contextlib.suppress(OSError, AttributeError):
        os.nice(int(spec.get("nice", 0)))
    return 0 if _run(spec, emit) else 1


def _run(spec: dict[str, Any], emit: Emit) -> bool:
    """One training run; its result or its error goes out as an event."""
    try:
        output = _load_entry(spec.get("entry") or DEFAULT_ENTRY)(spec, emit)
        emit({"event": "result", **output})
    except Exception as exc:
        traceback.print_exc()
        emit({"event": "error", "message": f"{exc.__class__.__name__}: {exc}"})
        return False
    return True


def _serve(emit: Emit) -> int:
    """Warm mode: `load` requests load the base model, `train` requests run one spec each."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.pop("op")
        except (ValueError, KeyError, AttributeError) as exc:
            emit({"event": "error", "message": f"unreadable request: {exc}"})
            continue
        if op == "load":
            try:
                model, tokenizer = base_model(
                    request["model"],
                    request["device"],
                    request["dtype"],
                    request.get("cache_dir"),
                    request.get("packed", True),
                )
                if request.get("gate_cache_dir"):
                    prepare_checks(
                        model,
                        tokenizer,
                        request["gate_cache_dir"],
                        request.get("system_prompt", ""),
                    )
                emit({"event": "ready"})
            except Exception as exc:  # the first run will report it again, with its job
                traceback.print_exc()
                emit({"event": "load_failed", "message": f"{exc.__class__.__name__}: {exc}"})
        elif op == "train":
            _run(request["spec"], emit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
