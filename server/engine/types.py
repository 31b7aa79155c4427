"""The contract between the HTTP layer and the engine: requests in, token events out.

The HTTP layer tokenizes, validates and resolves pack names; the engine schedules,
runs the model with each row's packs and samples. Stop *strings* are matched by the
HTTP layer on detokenized text (it aborts the request when one matches); stop token
ids are matched by the engine. Refusals are the domain errors of `skillpack_server.exceptions`.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from skillpack_server.exceptions import InvalidRequest


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


def check_prompt(prompt_ids: list[int], vocab_size: int, max_model_len: int, param: str = "prompt",
                 reply_tokens: int = 0) -> None:
    """Refuse a prompt that is empty, has an id outside [0, vocab_size), or leaves fewer than
    `reply_tokens` of the model's context for the reply."""
    if not prompt_ids:
        raise InvalidRequest("The prompt is empty; expected at least one token.", param=param)
    bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"Token id {bad!r} in the prompt is outside the vocabulary [0, {vocab_size}).",
                             param=param)
    if len(prompt_ids) + reply_tokens > max_model_len:
        room = f" and at least {reply_tokens} token(s) must be left for the reply" if reply_tokens else ""
        raise InvalidRequest(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                             f"{len(prompt_ids)}{room}.", param=param, code="context_length_exceeded")


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
    def status(self) -> list[PackStatus]: ...  # every registered pack (sizes read from disk)
    def names(self) -> list[str]: ...  # the registered packs' names (no disk access)


class EngineProtocol(Protocol):
    """The engine as the HTTP layer sees it."""

    model_id: str  # the base model's id in /v1/models
    tokenizer: Any  # a transformers tokenizer (chat template included)
    max_model_len: int
    eos_ids: frozenset[int]  # the model's end-of-sequence ids (structured output ends on them)
    base_fingerprint: dict  # the served base's fingerprint; every pack must match it
    model: Any  # the runtime Transformer (`model: "auto"` features prompts on it); None for a stand-in
    pack_cache: PackCacheProtocol

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """An async generator of events; closing it early aborts the request. Raises the
        domain errors: InvalidRequest, PackNotFound, EngineOverloaded, EngineUnavailable, ..."""
        ...

    def stats(self) -> dict: ...  # queue depth, running rows, per-pack running/waiting counts
    def close(self) -> None: ...  # stop; requests still queued or running get EngineUnavailable
