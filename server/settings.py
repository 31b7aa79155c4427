"""The server's settings: one validated object, read from SKILLPACK_* env vars or the CLI."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
DEFAULT_MAX_EXAMPLES_BYTES = 16 * MiB  # one pack's router examples sidecar, uploaded or PUT


def user_folder(kind: str) -> Path:
    """The project's folder in the user's XDG data or config home (`kind` 'data' or 'config')."""
    variable, fallback = {"data": ("XDG_DATA_HOME", ".local/share"), "config": ("XDG_CONFIG_HOME", ".config")}[kind]
    home = os.environ.get(variable) or str(Path.home() / fallback)
    return Path(home) / "skillpack"


class Settings(BaseSettings):
    """Everything `skillpack serve` can be told; tests build their own instance."""

    model_config = SettingsConfigDict(env_prefix="SKILLPACK_", extra="ignore")

    base: Path | None = None  # None = skillpacks.default_base.default_base_dir()
    # uploads go here; never a folder of the repo, so serving leaves the checkout as it was
    packs: Path = Field(default_factory=lambda: user_folder("data") / "packs")
    # served where they lie and never written (the demo packs): folders separated by ':'
    readonly_packs: Annotated[list[Path], NoDecode] = []
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_batch: int = Field(16, ge=1, le=1024)
    max_model_len: int | None = Field(None, ge=16, le=1_048_576)  # None = the model's own limit
    kv_budget_tokens: int | None = Field(None, ge=16)  # None = engine.config.default_kv_budget
    pack_cache_bytes: int = Field(512 * MiB, ge=0)
    pack_slots: int = Field(8, ge=1, le=256)  # packs resident on the device at once
    max_queue: int = Field(256, ge=1)  # waiting requests; more get 429

    admin_token: str | None = None
    # `skillpack serve` without a token keeps a generated one here (mode 0600) and reuses it
    admin_token_file: Path = Field(default_factory=lambda: user_folder("config") / "admin_token")
    no_admin_auth: bool = False
    api_key: str | None = None

    # byte bounds (the per-request field bounds are OpenAI's, in server/schemas)
    max_body_bytes: int = Field(4 * MiB, ge=1024)
    max_upload_bytes: int = Field(1024 * MiB, ge=1024)
    # a pack's router examples (NAME.examples.jsonl), uploaded or PUT; held in memory while
    # checked, so bounded; at most what skillpacks.router reads (64 MiB)
    max_examples_bytes: int = Field(DEFAULT_MAX_EXAMPLES_BYTES, ge=1024, le=64 * MiB)
    # an upload whose body stops arriving for this long is cut off (408): a stalled client
    # would otherwise hold its connection and temporary file forever
    upload_read_timeout: float = Field(30.0, gt=0, le=3600)

    @field_validator("readonly_packs", mode="before")
    @classmethod
    def _split_folders(cls, value):
        if isinstance(value, (str, os.PathLike)):
            return [part for part in str(value).split(os.pathsep) if part]
        return value

    @field_validator("admin_token")
    @classmethod
    def _admin_token_is_long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 8:
            raise ValueError("expected an admin token of at least 8 characters")
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key_is_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("expected a non-empty API key; leave it unset to disable it")
        return value

    def check_admin_auth(self) -> None:
        """Refuse to run with an open admin API unless that was asked for explicitly."""
        if not self.admin_token and not self.no_admin_auth:
            raise ValueError(
                "no admin token is set: pass --admin-token (or SKILLPACK_ADMIN_TOKEN), "
                "or --no-admin-auth to run the admin routes without authentication."
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (from the environment), built once."""
    return Settings()
