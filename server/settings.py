"""The server's settings, one tree: the HTTP server's own fields, then the engine's, the auto-pack
selection's and Ray scaling's parts, every default written once here.

The environment is read once, for the whole tree, under the names each part has always had:
the server's and the engine's fields as SKILLPACK_<FIELD> (the CLI options carry the same
names), the auto-pack selection's as SKILLPACK_ROUTER_<FIELD>, Ray scaling's as
SKILLPACK_RAY_<FIELD>. Tests build their own `Settings`; `create_app(settings)` serves from it.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

MiB = 1024 * 1024
DTYPE_NAMES = ("bfloat16", "float16", "float32")
MAX_TOP_K = 8  # the most packs `model: "auto:K"` fuses


def user_folder(kind: str) -> Path:
    """The project's folder in the user's XDG data or config home (`kind` 'data' or 'config')."""
    variable, fallback = {"data": ("XDG_DATA_HOME", ".local/share"), "config": ("XDG_CONFIG_HOME", ".config")}[kind]
    home = os.environ.get(variable) or str(Path.home() / fallback)
    return Path(home) / "skillpack"


class EngineSettings(BaseModel):
    """The engine's part: device, batch and memory bounds, pack slots and queue limits."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"  # auto = cuda when available, else cpu | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu (CPUs here lack fast bf16)
    max_batch: int = Field(16, ge=1, le=1024)  # rows (requests) decoded together
    max_model_len: int | None = Field(None, ge=16, le=1_048_576)  # prompt + completion; None = the model's limit
    kv_budget_tokens: int | None = Field(None, ge=16)  # KV cache size; None = engine.config.default_kv_budget
    page_size: int = Field(16, ge=1)  # tokens per KV page
    max_step_tokens: int = Field(1024, ge=1)  # new tokens per forward step (decode rows + prefill chunks)
    pack_slots: int = Field(8, ge=1, le=256)  # packs resident on the device at once
    pack_cache_bytes: int = Field(512 * MiB, ge=0)  # host memory for parsed packs (LRU); 0 = none kept
    max_queue: int = Field(256, ge=1)  # waiting requests; more are refused with 429
    max_packs_per_request: int = Field(8, ge=1)
    max_logprobs: int = Field(20, ge=0, le=100)
    # the CPU path's form of resident packs: compact codes computed on by C kernels (auto: when a
    # C compiler builds them) or dequantized float32 factors (4-7x the memory, slower decode)
    cpu_factors: Literal["auto", "compact", "dense"] = "auto"

    @field_validator("dtype")
    @classmethod
    def _dtype_is_known(cls, value: str) -> str:
        if value != "auto" and value not in DTYPE_NAMES:
            raise ValueError(f"dtype={value!r}; expected 'auto' or one of {list(DTYPE_NAMES)}.")
        return value

    @model_validator(mode="after")
    def _step_holds_every_row(self) -> EngineSettings:
        if self.max_step_tokens < self.max_batch:
            raise ValueError(f"max_step_tokens={self.max_step_tokens} is below max_batch={self.max_batch}; "
                             "expected at least one token per running row in each step.")
        return self


class PackSelectionSettings(BaseModel):
    """`model: "auto"`'s part: how the classifier's scores become a choice of packs, and its rebuilds."""

    model_config = ConfigDict(extra="forbid")

    min_confidence: float = Field(0.5, ge=0.0, le=1.0)  # below it: the base model alone
    ood_margin: float = Field(1.5, gt=0.0)  # 0 < margin; larger lets farther prompts through
    top_k: int = Field(1, ge=1, le=MAX_TOP_K)
    auto_rebuild: bool = True  # rebuild the classifier in the background when the packs change
    max_examples: int = Field(256, ge=1, le=100_000)  # per pack, read from its examples sidecar
    hidden: int = Field(64, ge=0, le=4096)  # the classifier's hidden width; 0 = linear


class ScaleSettings(BaseModel):
    """Ray Serve's part: how the replicas run (docs/SCALE.md); also `serve run` arguments."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(None, ge=1, le=1024)  # a fixed count; unset = autoscale min..max
    min_replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int = Field(4, ge=1, le=1024)
    target_ongoing_requests: float | None = Field(None, gt=0)  # per replica; unset = the engine's max_batch
    max_ongoing_requests: int | None = Field(None, ge=1, le=65536)  # per replica; unset = 2 × max_batch
    packs_per_replica: int | None = Field(None, ge=1, le=256)  # Ray's per-replica pack LRU; unset = pack_slots
    num_cpus: float = Field(1.0, gt=0, le=1024)
    num_gpus: float | None = Field(None, ge=0, le=16)  # unset = 1 when the replica runs on CUDA, else 0
    shared_store: str | None = None  # a folder or an fsspec URI; unset = the server's --packs folder
    mirror: Path | None = None  # where replicas make their local copies of the store; unset = the temp folder
    rescan_seconds: float = Field(5.0, ge=0.1, le=3600)  # how often replicas pick up others' changes
    app_name: str = "skillpack"
    route_prefix: str = "/"

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> ScaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}; "
                             "expected min_replicas <= max_replicas.")
        return self


# each part's environment prefix: the names these settings have always been read under
PART_ENV_PREFIXES = {"engine": "SKILLPACK_", "selection": "SKILLPACK_ROUTER_", "scale": "SKILLPACK_RAY_"}


def env_name(part: str | None, field: str) -> str:
    """The environment variable of a field (`part` None: a field of Settings itself)."""
    return f"{PART_ENV_PREFIXES.get(part or '', 'SKILLPACK_')}{field.upper()}"


class _PartsFromEnvironment(PydanticBaseSettingsSource):
    """The nested parts' fields from their flat environment variables (pydantic-settings
    would read a nested model only as one JSON variable or with a delimiter in the name)."""

    def get_field_value(self, field, field_name):  # every part is read at once in __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for part in PART_ENV_PREFIXES:
            model = self.settings_cls.model_fields[part].annotation
            values = {name: os.environ[env_name(part, name)] for name in model.model_fields
                      if env_name(part, name) in os.environ}
            if values:
                found[part] = values
        return found


class Settings(BaseSettings):
    """Everything `skillpack serve` can be told; tests build their own instance.

    The engine's fields may also be given at the top level (`Settings(max_batch=8)`), as the
    CLI options and their SKILLPACK_* variables name them; they land in `settings.engine`.
    """

    model_config = SettingsConfigDict(env_prefix="SKILLPACK_", extra="ignore")

    base: Path | None = None  # None = skillpacks.default_base.default_base_dir()
    # uploads go here; never a folder of the repo, so serving leaves the checkout as it was
    packs: Path = Field(default_factory=lambda: user_folder("data") / "packs")
    # served where they lie and never written (the demo packs): folders separated by ':'
    readonly_packs: Annotated[list[Path], NoDecode] = []
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    admin_token: str | None = None
    # `skillpack serve` without a token keeps a generated one here (mode 0600) and reuses it
    admin_token_file: Path = Field(default_factory=lambda: user_folder("config") / "admin_token")
    no_admin_auth: bool = False
    api_key: str | None = None

    # byte bounds (the per-request field bounds are OpenAI's, in server/schemas)
    max_body_bytes: int = Field(4 * MiB, ge=1024)
    max_upload_bytes: int = Field(1024 * MiB, ge=1024)
    # a pack's examples (NAME.examples.jsonl), uploaded or PUT; held in memory while
    # checked, so bounded; at most what the classifier's reader reads (64 MiB)
    max_examples_bytes: int = Field(16 * MiB, ge=1024, le=64 * MiB)
    # an upload whose body stops arriving for this long is cut off (408): a stalled client
    # would otherwise hold its connection and temporary file forever
    upload_read_timeout: float = Field(30.0, gt=0, le=3600)

    engine: EngineSettings = EngineSettings()
    selection: PackSelectionSettings = PackSelectionSettings()
    scale: ScaleSettings = ScaleSettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, env_settings, _PartsFromEnvironment(settings_cls), dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _engine_fields_given_flat(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        flat = {name: values.pop(name) for name in list(values) if name in EngineSettings.model_fields}
        if flat:
            engine = values.get("engine", {})
            engine = engine.model_dump() if isinstance(engine, BaseModel) else dict(engine)
            values["engine"] = engine | flat  # given values (init, then environment) win over the part's
        return values

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
