"""`POST /v1/completions`: the request body and the response shapes (OpenAI's legacy completions)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from skillpack_server.schemas.common import MAX_CHOICES, GenerationFields, Usage, unsupported

MAX_LOGPROBS = 5
MAX_PROMPT_ITEMS = 1_048_576  # token ids in one prompt; the model's length is checked later


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def normalize_prompts(value: Any) -> list[str | list[int]]:
    """Every form OpenAI documents — a string, a list of strings, a list of token ids, a list of
    token-id lists — as a list of prompts (a string or an id list each), in order."""
    if isinstance(value, str) or _is_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or _is_ids(p) for p in value):
        prompts = value
    else:
        raise ValueError("expected a string, a list of strings, a list of token ids, or a list of token-id lists "
                         "(none of them empty).")
    if len(prompts) > MAX_CHOICES:
        raise ValueError(f"got {len(prompts)} prompts; at most {MAX_CHOICES} are served in one request.")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and not prompt:
            raise ValueError(f"prompt {i} is empty; send at least one character.")
        if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_ITEMS:
            raise ValueError(f"prompt {i} has {len(prompt)} token ids; the limit is {MAX_PROMPT_ITEMS}.")
    return prompts


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(GenerationFields):
    # the published forms, kept as sent; `prompts` is the list the server runs
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        normalize_prompts(v)  # the checks, with sentences that say what was wrong
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        return normalize_prompts(self.prompt)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise unsupported("suffix", "insertion needs a fill-in-the-middle model")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def candidates(self) -> int:
        """Completions generated per prompt: best_of when given, else n."""
        return self.best_of or self.n

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"`best_of` ({self.best_of}) must be at least `n` ({self.n}).")
        if self.stream and self.candidates > self.n:
            raise ValueError("`best_of` above `n` cannot be streamed: the best are known only at the end.")
        total = len(self.prompts) * self.candidates
        if total > MAX_CHOICES:
            raise ValueError(f"{len(self.prompts)} prompts x {self.candidates} completions = {total} rows; "
                             f"at most {MAX_CHOICES} are served in one request.")
        return self


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
