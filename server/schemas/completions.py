"""`POST /v1/completions`: the request body and the response shapes (OpenAI's legacy completions)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from skillpack_server.schemas.common import GenerationFields, Usage, unsupported

MAX_LOGPROBS = 5
MAX_PROMPT_ITEMS = 1_048_576  # token ids in one prompt; the model's length is checked later


def normalize_prompt(value: Any) -> str | list[int]:
    """A string, [string], a token id list or [token id list] -> one string or one id list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ValueError("the prompt is empty; send at least one character.")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if len(value) > MAX_PROMPT_ITEMS:
            raise ValueError(f"the prompt has {len(value)} token ids; the limit is {MAX_PROMPT_ITEMS}.")
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise ValueError(f"got {len(value)} prompts; this server takes one prompt per request.")
    raise ValueError("expected a string, a list of one string, a list of token ids, or a list of one token id list.")


class CompletionRequest(GenerationFields):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        return normalize_prompt(v)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise unsupported("best_of", f"only 1 is served, got {v}")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise unsupported("suffix")
        return v


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
