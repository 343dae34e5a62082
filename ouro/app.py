"""Wiring: the only place that knows every package. Each long-lived part is an async context
manager; this module nests them and runs the platforms side by side in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from bot.service import ChatConfig, ChatService
from model.interface import InferenceEngine
from ouro.settings import Settings
from storage import Store

log = logging.getLogger("ouro")


@dataclass
class Core:
    settings: Settings
    store: Store
    engine: InferenceEngine
    learner: Any  # learner.control.LearnerControl (a bot.ports.LearnerPort)
    service: ChatService


def make_engine(settings: Settings) -> InferenceEngine:
    from model.engine import LocalEngine

    return LocalEngine(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir,
        adapters_dir=settings.adapters_dir,
        max_batch_size=settings.max_batch_size,
        max_resident_adapters=settings.max_resident_adapters,
        load_in_4bit=settings.load_in_4bit,
        packed=settings.packed_weights,
        gathered_lora=settings.gathered_lora,
        lean_decode=settings.lean_decode,
        lora_stack_mb=settings.lora_stack_mb,
    )


def learner_config(settings: Settings, *, in_process: bool | None = None) -> Any:
    from learner.control import LearnerConfig

    return LearnerConfig(
        data_dir=settings.data_dir,
        adapters_dir=settings.adapters_dir,
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        packed=settings.packed_weights,
        model_cache_dir=settings.model_cache_dir,
        system_prompt=settings.system_prompt,
        lora_r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        learning_rate=settings.learning_rate,
        max_steps=settings.max_train_steps,
        warm_trainer=settings.warm_trainer,
        incremental=settings.incremental_training,
        notes=settings.adapter_notes,
        method=settings.training_method,
        min_uptake=settings.gate_min_uptake,
        min_retention=settings.gate_min_retention,
        tolerance=settings.gate_tolerance,
        correction_max_chars=settings.correction_max_chars,
        daily_quota=settings.daily_correction_quota,
        shared_min_users=settings.shared_min_users,
        train_after_corrections=settings.train_after_corrections,
        interval_minutes=settings.train_interval_minutes,
        cron=settings.train_cron,
        tracking_uri=settings.tracking_uri,
        in_process=(settings.learner_mode == "in_process") if in_process is None else in_process,
        hf_token=(settings.hf_hub_token.get_secret_value() if settings.hf_hub_token else None),
        hf_repo=settings.hf_hub_repo,
    )


def chat_config(settings: Settings) -> ChatConfig:
    return ChatConfig(
        system_prompt=settings.system_prompt,
        history_turns=settings.history_turns,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        rate_limit_per_minute=settings.rate_limit_per_minute,
        max_message_chars=settings.max_message_chars,
        correction_max_chars=settings.correction_max_chars,
        admin_ids={
            "discord": frozenset(settings.discord_admin_ids),
            "telegram": frozenset(settings.telegram_admin_ids),
        },
        console_user_is_admin=settings.console_user_is_admin,
    )


@asynccontextmanager
async def open_core(
    settings: Settings,
    *,
    engine: InferenceEngine | None = None,
    learner_in_process: bool | None = None,
) -> AsyncIterator[Core]:
    """Store, engine, learner and chat service, opened in order and closed in reverse.

    With the learner in process, training jobs run here (each in a child process); otherwise
    they are only queued, and the learner keeps the engine in step with what a separate
    `ouro learner` worker publishes.
    """
    from learner.control import LearnerControl

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(Store(settings.db_path))
        engine = await stack.enter_async_context(engine or make_engine(settings))
        config = learner_config(settings, in_process=learner_in_process)
        learner = LearnerControl(store, engine, config)
        await stack.enter_async_context(learner)
        service = ChatService(store, engine, learner, chat_config(settings))
        yield Core(settings, store, engine, learner, service)


def _install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def run_bots(settings: Settings, *, console: str | None = None) -> int:
    """`ouro run`: every configured platform in one event loop over one core."""
    console_mode = console or settings.console
    has_platform = bool(settings.discord_token or settings.telegram_token)
    use_console = console_mode == "on" or (console_mode == "auto" and not has_platform)
    if not (has_platform or use_console or settings.api_enabled):
        log.error("nothing to run: set OURO_TELEGRAM_TOKEN, OURO_DISCORD_TOKEN or OURO_API_ENABLED")
        return 2
    stop = asyncio.Event()
    _install_stop_signals(stop)
    async with open_core(settings) as core, AsyncExitStack() as stack:
        tasks: list[asyncio.Task[Any]] = []
        if settings.telegram_token:
            from bot.telegram import TelegramBot

            await stack.enter_async_context(
                TelegramBot(
                    core.service,
                    settings.telegram_token.get_secret_value(),
                    base_url=settings.telegram_api_base,
                    admin_ids=settings.telegram_admin_ids,
                )
            )
            log.info("Telegram bot started")
        if settings.discord_token:
            from bot.discord_bot import start_discord

            await stack.enter_async_context(
                start_discord(
                    core.service,
                    settings.discord_token.get_secret_value(),
                    api_base=settings.discord_api_base,
                    gateway_url=settings.discord_gateway_url,
                    channels=set(settings.discord_channels),
                )
            )
            log.info("Discord bot started")
        if settings.api_enabled:
            tasks.append(
                asyncio.create_task(_serve_api(core, settings.api_host, settings.api_port, stop))
            )
        if use_console:
            from bot.console import ConsoleBot

            async with ConsoleBot(core.service) as bot:
                console_task = asyncio.create_task(bot.run())
                stop_task = asyncio.create_task(stop.wait())
                await asyncio.wait({console_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                stop.set()
                for task in (console_task, stop_task):
                    task.cancel()
        else:
            await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 0


async def _serve_api(core: Core, host: str, port: int, stop: asyncio.Event) -> None:
    from bot.http_api import create_app, serve

    app = create_app(
        core.service,
        core.store,
        core.engine,
        core.learner,
        admin_token=(
            core.settings.admin_token.get_secret_value() if core.settings.admin_token else None
        ),
        model_name=core.engine.model_name,
    )
    log.info("HTTP API on http://%s:%d (docs at /docs)", host, port)
    await serve(app, host, port, stop)


async def run_api(settings: Settings, *, host: str | None, port: int | None) -> int:
    """`ouro serve`: the HTTP API alone (plus the in-process learner schedule)."""
    stop = asyncio.Event()
    _install_stop_signals(stop)
    async with open_core(settings) as core:
        await _serve_api(core, host or settings.api_host, port or settings.api_port, stop)
    return 0


async def run_learner_worker(settings: Settings, *, once: bool) -> int:
    """`ouro learner`: take jobs from the store; the bot process picks up published versions."""
    from learner.control import LearnerControl
    from storage.models import JobStatus

    stop = asyncio.Event()
    _install_stop_signals(stop)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with Store(settings.db_path) as store:
        async with LearnerControl(store, None, learner_config(settings, in_process=True)):
            log.info("learner worker running; waiting for jobs")
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                if once:
                    busy = await store.list_jobs(status=JobStatus.QUEUED) or await store.list_jobs(
                        status=JobStatus.RUNNING
                    )
                    if not busy:
                        break
    return 0


async def _resolve_user(store: Store, user: str | None, platform: str | None) -> Any:
    if user is None:
        return None
    if user.startswith("#") and user[1:].isdigit():
        found = await store.get_user(int(user[1:]))
    elif platform:
        found = await store.find_user(platform, user.lstrip("@"))
    else:
        matches = [
            u
            for u in await store.list_users()
            if user in (u.platform_user_id, f"@{u.display_name}", u.display_name)
        ]
        if len(matches) > 1:
            raise SystemExit(f"ouro: {user!r} matches several users; add --platform")
        found = matches[0] if matches else None
    if found is None:
        raise SystemExit(f"ouro: no user {user!r}")
    return found


async def retrain_once(settings: Settings, *, user: str | None, platform: str | None) -> int:
    """`ouro retrain`: validate and train now, printing progress; the result goes live."""

    async def progress(line: str) -> None:
        print(line, flush=True)

    async with open_core(settings, learner_in_process=True) as core:
        target = await _resolve_user(core.store, user, platform)
        outcome = await core.learner.retrain(target.id if target else None, None, progress)
        print(outcome.summary)
        return 0 if outcome.job.status == "succeeded" else 1


async def rollback_once(settings: Settings, *, user: str | None, platform: str | None) -> int:
    async with Store(settings.db_path) as store:
        target = await _resolve_user(store, user, platform)
    async with open_core(settings, learner_in_process=True) as core:
        active = await core.learner.rollback(target.id if target else None)
        who = f"user #{target.id}" if target else "the shared adapter"
        print(f"{who}: now {active.version if active else 'the base model'}")
    return 0


async def export_user(settings: Settings, *, user: str, platform: str | None) -> dict[str, Any]:
    async with Store(settings.db_path) as store:
        found = await _resolve_user(store, user, platform)
        return await store.export_user(found.id)


async def forget_user(settings: Settings, *, user: str, platform: str | None) -> int:
    """The same forget as the chat's /forget: rows, adapter folders and MLflow runs."""
    from learner.control import LearnerControl

    async with Store(settings.db_path) as store:
        found = await _resolve_user(store, user, platform)
        learner = LearnerControl(store, None, learner_config(settings, in_process=False))
        await learner.forget(found.id)
    print(f"forgot user #{found.id}: every row, adapter and tracked run deleted")
    return 0


async def run_bench(
    settings: Settings, *, which: list[str], output: str | None, quick: bool
) -> int:
    from ouro.bench.run import run_benchmarks

    return await run_benchmarks(settings, which=which, output=output, quick=quick)


async def run_eval(
    settings: Settings,
    *,
    counts: tuple[int, ...],
    output: str | None,
    groups: int = 1,
    sequential: bool = False,
    first_group: int = 0,
) -> int:
    from ouro.bench.editing import run_editing_eval

    return await run_editing_eval(
        settings,
        counts=counts,
        output=output,
        groups=groups,
        sequential=sequential,
        first_group=first_group,
    )
