"""The contract between the HTTP layer and the engine: requests in, token events out.

The HTTP layer tokenizes, validates and resolves pack names; the engine schedules,
runs the model with each row's packs and samples. Stop *strings* are matched by the
HTTP layer on detokenized text (it aborts the request when one matches); stop token
ids are matched by the engine.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class TokenConstraint(Protocol):
    """Which tokens a row may sample next (structured output); one per request, stateful."""

    vocab_size: int  # ids at or past this are never allowed

    def fill_mask(self, words: Any) -> None:
        """Write the allowed next tokens into `words`, an int32 tensor (ceil(vocab_size / 32),):
        bit t % 32 of word t // 32 is set when token t is allowed."""
        ...

    def accept(self, token: int) -> bool:
        """Advance past the sampled token; False when it was not allowed."""
        ...


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per-request generator; None = engine's own randomness
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # top-k alternatives per generated token (0 = only the chosen one)
    prompt_logprobs: bool = False  # also return each prompt token's logprob (completions `echo`)
    ignore_eos: bool = False  # keep going past the model's end-of-sequence ids (stop_token_ids still stop)
    # the logits processing below runs before sampling; reported logprobs stay the model's own
    min_tokens: int = 0  # no stop id (EOS, stop_token_ids) is sampled before this many tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    constraint: TokenConstraint | None = None  # structured output: tokens outside it are never sampled


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

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param  # the request field at fault, when there is one


@dataclass
class PackStatus:
    name: str
    path: str
    bytes: int
    state: str  # "disk" | "host" | "device"
    pinned: bool = False
    in_use: int = 0  # running requests holding it
    version: int = 1


class PackCacheProtocol(Protocol):
    """What the HTTP layer asks of the engine's pack cache (the disk store is the API's)."""

    # add or replace (new version) a stored pack; verified=True: the caller has just checked its checksum
    def register(self, name: str, path: str, verified: bool = False) -> None: ...
    def unregister(self, name: str) -> None: ...  # forget it; in-flight requests finish on it
    def load(self, name: str) -> None: ...  # bring to the device now
    def unload(self, name: str) -> None: ...  # drop from device and host memory (stays registered)
    def pin(self, name: str, pinned: bool = True) -> None: ...  # pinned packs are never evicted
    def status(self) -> list[PackStatus]: ...


class EngineProtocol(Protocol):
    """The engine as the HTTP layer sees it."""

    model_id: str  # the base model's id in /v1/models
    tokenizer: Any  # a transformers tokenizer (chat template included)
    max_model_len: int
    pack_cache: PackCacheProtocol

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """An async generator of events; closing it early aborts the request.
        Raises EngineError (404 unknown pack, 400 bad request, 429/503 overloaded)."""
        ...

    def stats(self) -> dict: ...  # queue depth, running rows, per-pack running/waiting counts
