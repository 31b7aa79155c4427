"""The server's settings: one validated object, read from SKILLPACK_* env vars or the CLI."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
DEFAULT_MAX_EXAMPLES_BYTES = 16 * MiB  # one pack's router examples sidecar, uploaded or PUT


class Settings(BaseSettings):
    """Everything `skillpack serve` can be told; tests build their own instance."""

    model_config = SettingsConfigDict(env_prefix="SKILLPACK_", extra="ignore")

    base: Path | None = None  # None = skillpacks.default_base.default_base_dir()
    packs: Path = Path("packs")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_batch: int = Field(16, ge=1, le=1024)
    max_model_len: int = Field(2048, ge=16, le=1_048_576)
    pack_cache_bytes: int = Field(512 * MiB, ge=0)
    pack_slots: int = Field(8, ge=1, le=256)  # packs resident on the device at once
    max_queue: int = Field(256, ge=1)  # waiting requests; more get 429

    admin_token: str | None = None
    no_admin_auth: bool = False
    api_key: str | None = None

    # byte bounds (the per-request field bounds are OpenAI's, in server/schemas)
    max_body_bytes: int = Field(4 * MiB, ge=1024)
    max_upload_bytes: int = Field(1024 * MiB, ge=1024)
    # a pack's router examples (NAME.examples.jsonl), uploaded or PUT; held in memory while
    # checked, so bounded; at most what skillpacks.router reads (64 MiB)
    max_examples_bytes: int = Field(DEFAULT_MAX_EXAMPLES_BYTES, ge=1024, le=64 * MiB)

    @model_validator(mode="after")
    def _admin_auth_is_explicit(self) -> Settings:
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise ValueError("the admin token must be at least 8 characters long.")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty; leave it unset to disable it.")
        return self

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
