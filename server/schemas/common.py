"""Fields shared by the completions and chat bodies: sampling, pack mixes, stop, stream options,
vLLM's extension fields, usage."""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# per-request bounds that do not depend on the served model (the rest live in Settings)
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_PACKS = 8
MAX_PACK_WEIGHT = 4.0
MAX_SEED = 2**63 - 1
MAX_CHOICES = 64  # prompts x (best_of or n) in one request: each is a row of the batch
MAX_LOGIT_BIAS = 1024  # entries
MAX_STOP_TOKEN_IDS = 64
SERVICE_TIERS = ("auto", "default")  # the tiers this server serves (it has one)


class SkillpackRef(BaseModel):
    """One pack in a weighted mix (extension field `skillpacks`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    weight: float = 1.0

    @field_validator("weight")
    @classmethod
    def _bounded_weight(cls, w: float) -> float:
        if not math.isfinite(w) or abs(w) > MAX_PACK_WEIGHT:
            raise ValueError(f"a pack weight must be a finite number in [-{MAX_PACK_WEIGHT:g}, {MAX_PACK_WEIGHT:g}], got {w}.")
        return w


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, v: bool | None) -> bool | None:
        if v:
            raise unsupported("stream_options.include_obfuscation", "chunks carry no obfuscation padding")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def normalize_stop(value: Any) -> list[str]:
    """`stop` as OpenAI accepts it (null, a string, or a list of up to 4 strings) -> a list."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("expected a string or a list of strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}.")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}.")
    return stops


def normalize_packs(value: list[SkillpackRef] | None) -> list[SkillpackRef] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("expected at least one pack; leave the field out to use `model` alone.")
    if len(value) > MAX_PACKS:
        raise ValueError(f"at most {MAX_PACKS} packs can be mixed in one request, got {len(value)}.")
    names = [p.name for p in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"each pack may appear once; repeated: {', '.join(dupes)}.")
    return value


def unsupported(field: str, why: str = "") -> ValueError:
    return ValueError(f"`{field}` is not supported by this server{': ' + why if why else ''}.")


def normalize_logit_bias(value: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `{"token id": bias}` -> {id: bias}, each bias in [-100, 100]."""
    if not value:
        return {}
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids can be biased, got {len(value)}.")
    out = {}
    for key, bias in value.items():
        if not str(key).isdigit():
            raise ValueError(f"keys are token ids as strings (e.g. \"50256\"), got {key!r}.")
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}.")
        out[int(key)] = float(bias)
    return out


class GenerationFields(BaseModel):
    """What completions and chat share. As OpenAI does, an unknown field is a 400 that names it;
    documented fields this server cannot honour are refused by name, never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = []
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] = {}
    # identifiers and cache hints: they ask nothing this server would have to do
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # vLLM's extension fields (docs/API.md), honoured
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] = Field([], max_length=MAX_STOP_TOKEN_IDS)
    # this server's extension: a weighted mix of packs on the base model
    skillpacks: list[SkillpackRef] | None = Field(None, min_length=1, max_length=MAX_PACKS)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        return normalize_stop(v)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, v: Any) -> dict[int, float]:
        if v is not None and not isinstance(v, dict):
            raise ValueError("expected an object mapping token ids to biases.")
        return normalize_logit_bias(v)

    @field_validator("service_tier")
    @classmethod
    def _tier(cls, v: str | None) -> str | None:
        if v is not None and v not in SERVICE_TIERS:
            raise unsupported("service_tier", f"this server has one tier ({' or '.join(SERVICE_TIERS)}), got {v!r}")
        return v

    @field_validator("store")
    @classmethod
    def _no_store(cls, v: bool | None) -> bool | None:
        if v:
            raise unsupported("store", "this server does not keep completions")
        return v

    @field_validator("metadata")
    @classmethod
    def _no_metadata(cls, v: dict | None) -> dict | None:
        if v:
            raise unsupported("metadata", "it is attached to stored completions, which this server does not keep")
        return v

    @field_validator("skillpacks")
    @classmethod
    def _packs(cls, v: list[SkillpackRef] | None) -> list[SkillpackRef] | None:
        return normalize_packs(v)

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, v: StreamOptions | None, info) -> StreamOptions | None:
        if v is not None and not info.data.get("stream", False):
            raise ValueError("`stream_options` is only allowed when `stream` is true.")
        return v

    @model_validator(mode="after")
    def _min_tokens_fit(self):
        limit = getattr(self, "token_limit", None)
        if limit is not None and self.min_tokens > limit:
            raise ValueError(f"`min_tokens` ({self.min_tokens}) is above the token limit ({limit}).")
        return self
