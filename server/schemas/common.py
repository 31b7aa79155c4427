"""Fields shared by the completions and chat bodies: pack mixes, stop, stream options, usage."""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# per-request bounds that do not depend on the served model (the rest live in Settings)
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_PACKS = 8
MAX_PACK_WEIGHT = 4.0
MAX_SEED = 2**63 - 1


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
    include_usage: bool = False


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


class GenerationFields(BaseModel):
    """What completions and chat share. Unknown fields are ignored, as OpenAI does; fields
    OpenAI documents but this server does not implement are refused (never silently ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = []
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    skillpacks: list[SkillpackRef] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        return normalize_stop(v)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise unsupported("n", f"only n=1 is served, got {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float, info) -> float:
        if v != 0:
            raise unsupported(info.field_name, "only 0 is served")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise unsupported("logit_bias")
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
