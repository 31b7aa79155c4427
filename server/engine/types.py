"""The contract between the HTTP layer and the engine: requests in, token events out.

The HTTP layer tokenizes, validates and resolves pack names; the engine schedules,
runs the model with each row's packs and samples. Stop *strings* are matched by the
HTTP layer on detokenized text (it aborts the request when one matches); stop token
ids are matched by the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per-request generator; None = engine's own randomness
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # top-k alternatives per generated token (0 = only the chosen one)
    prompt_logprobs: bool = False  # also return each prompt token's logprob (completions `echo`)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    # (pack name, weight); empty = the base model alone; several = weighted fusion
    packs: list[tuple[str, float]] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TokenEvent:
    """One generated token (or, with prompt_logprobs, one prompt token at the start)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    is_prompt: bool = False
    finish_reason: str | None = None  # "stop" | "length" on the last event, else None


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the API layer returns."""

    def __init__(self, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
