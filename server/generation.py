"""Running one completion request on the engine: pack resolution (a name, a mix or `model: "auto"`),
the reply's token budget, and the event loop that turns token events into text pieces (stop strings
cut here, then the engine is aborted). Shared by the completions and chat routes."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from skillpack_server.engine.types import EngineProtocol, GenerationRequest, SamplingParams, TokenEvent
from skillpack_server.errors import APIError, model_not_found
from skillpack_server.metrics import Metrics
from skillpack_server.pack_selection import pack_selector_for, parse_auto_model
from skillpack_server.reply_text import Detokenizer, StopMatcher
from skillpack_server.schemas.common import SkillpackRef
from skillpacks.classifier import PackChoice

ENGINE_SEED_MASK = 2**63 - 1


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_packs(engine: EngineProtocol, model: str, mix: list[SkillpackRef] | None) -> list[tuple[str, float]]:
    """`model` (the base id or a pack name) and the optional `skillpacks` mix -> (name, weight) pairs.

    Where a request's pack names are checked (the engine looks them up again only to hold them)."""
    known = set(engine.pack_cache.names())
    if mix is not None:
        if model != engine.model_id:
            raise APIError(400, f"`skillpacks` mixes packs on the base model: set `model` to "
                                f"`{engine.model_id}`, not `{model}`.", param="model", code="invalid_value")
        for i, ref in enumerate(mix):
            if ref.name not in known:
                raise APIError(404, f"The pack `{ref.name}` does not exist.", param=f"skillpacks.{i}.name",
                               code="model_not_found")
        return [(ref.name, ref.weight) for ref in mix]
    if model == engine.model_id:
        return []
    if model in known:
        return [(model, 1.0)]
    raise model_not_found(model)


async def resolve_model(app_state, engine: EngineProtocol, model: str, mix: list[SkillpackRef] | None,
                        prompt_ids: list[int]) -> tuple[list[tuple[str, float]], PackChoice | None]:
    """Like `resolve_packs`, plus `model: "auto"` / `"auto:K"`: the pack selection picks from the prompt."""
    top_k = parse_auto_model(model)
    if top_k is None:
        return resolve_packs(engine, model, mix), None
    if mix is not None:
        raise APIError(400, f"`skillpacks` names the packs itself; it cannot be combined with `model: {model}`.",
                       param="skillpacks")
    selector = pack_selector_for(app_state, engine)
    decision = await anyio.to_thread.run_sync(selector.select, prompt_ids, top_k)  # a base forward: off the loop
    return decision.packs, decision


def served_model(engine: EngineProtocol, model: str, decision: PackChoice | None) -> str:
    """A response's `model`: what served it. For `auto`, the packs the selection chose (comma-separated,
    as in the X-SkillPack-Packs header), or the base model's id when it fell back to no pack."""
    if decision is None:
        return model
    return decision.header() or engine.model_id


def selection_headers(decision: PackChoice | None) -> dict[str, str]:
    return {} if decision is None else {"X-SkillPack-Packs": decision.header()}


def token_budget(engine: EngineProtocol, prompt_len: int, asked: int | None, param: str) -> int:
    """`max_tokens` checked against the context left after the prompt (None = all of it)."""
    room = engine.max_model_len - prompt_len
    if asked is None:
        return max(room, 0)
    if asked > room:
        raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens; "
                            f"the prompt has {prompt_len} and `{param}` asks for {asked} more.",
                       param=param, code="context_length_exceeded")
    return asked


@dataclass
class Piece:
    """Text ready to send, the generated tokens that produced it, and the finish reason on the last."""

    text: str
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    """One engine request, from the first event (errors surface before any response is sent)
    to the last piece; leaving early (stop string, client gone) aborts it in the engine."""

    def __init__(self, engine: EngineProtocol, request: GenerationRequest, stops: list[str],
                 metrics: Metrics, route: str):
        self.engine, self.request, self.metrics, self.route = engine, request, metrics, route
        self.max_tokens = request.sampling.max_tokens
        self.detok = Detokenizer(engine.tokenizer)
        self.stops = StopMatcher(stops)
        self.prompt_events: list[TokenEvent] = []
        self.generated = 0
        self._events: AsyncIterator[TokenEvent] | None = None
        self._first: TokenEvent | None = None
        self._t0 = time.perf_counter()
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    async def start(self) -> Generation:
        sampling = self.request.sampling
        if self.max_tokens == 0:
            if not sampling.prompt_logprobs:
                return self  # nothing for the engine to do
            # the engine always samples one token; the prompt's scores come before it, and
            # pieces() stops there
            sampling.max_tokens = 1
        self._events = self.engine.generate(self.request)
        try:
            self._first = await anext(self._events, None)
        except BaseException:
            await self.close()
            raise
        return self

    async def pieces(self) -> AsyncIterator[Piece]:
        pending: list[TokenEvent] = []
        try:
            event = self._first
            while event is not None:
                if event.is_prompt:
                    self.prompt_events.append(event)
                elif self.generated >= self.max_tokens:
                    break
                else:
                    if self.generated == 0:
                        self.metrics.ttft.labels(self.route).observe(time.perf_counter() - self._t0)
                    self.generated += 1
                    pending.append(event)
                    text, stopped = self.stops.feed(self.detok.push(event.token_id))
                    if stopped:
                        yield Piece(text, pending, "stop")
                        return
                    if event.finish_reason is not None:
                        yield self._last_piece(text, pending, event.finish_reason)
                        return
                    if text:
                        yield Piece(text, pending)
                        pending = []
                event = await anext(self._events, None)
            yield self._last_piece("", pending, None)
        finally:
            await self.close()

    def _last_piece(self, head: str, pending: list[TokenEvent], reason: str | None) -> Piece:
        """`head` (already cleared of stop strings) plus whatever the detokenizer and the stop
        matcher still hold."""
        text, stopped = self.stops.feed(self.detok.flush())
        if stopped:
            return Piece(head + text, pending, "stop")
        if reason is None:  # the engine ended without saying why: it ran out of budget
            reason = "length" if self.generated >= self.max_tokens else "stop"
        return Piece(head + text + self.stops.flush(), pending, reason)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._events is not None:
            # shielded: a client that disconnected cancels us, the engine must still hear the abort
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.generation_tokens.inc(self.generated)
        self.metrics.e2e_latency.labels(self.route).observe(time.perf_counter() - self._t0)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.generated,
                "total_tokens": self.prompt_tokens + self.generated}


def make_request(prompt_ids: list[int], packs: list[tuple[str, float]], sampling: SamplingParams,
                 prefix: str) -> GenerationRequest:
    if sampling.seed is not None:
        sampling.seed &= ENGINE_SEED_MASK  # OpenAI takes any integer; the engine, 63 bits
    return GenerationRequest(request_id=new_id(prefix), prompt_ids=prompt_ids, packs=packs, sampling=sampling)


def sampling_for(body, max_tokens: int, seed: int | None, logprobs: int | None, **extra) -> SamplingParams:
    """The engine's sampling parameters from the fields completions and chat share."""
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed, logprobs=logprobs,
        stop_token_ids=list(body.stop_token_ids), ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
        logit_bias=dict(body.logit_bias), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, **extra)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of a prompt's `choice`-th completion: reproducible, distinct per choice, and the
    same whether the prompt came alone or with others."""
    return None if seed is None else (seed + choice) & ENGINE_SEED_MASK


async def start_all(gens: list[Generation]) -> None:
    """Start every choice (each a row of the batch); if one is refused, none runs."""
    try:
        await asyncio.gather(*(g.start() for g in gens))
    except BaseException:
        for g in gens:
            await g.close()
        raise


async def merged_pieces(gens: list[Generation]) -> AsyncIterator[tuple[int, Piece]]:
    """Every choice's pieces as they come, tagged with the choice's position, interleaved."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for piece in gen.pieces():
                await queue.put((i, piece))
        except BaseException as exc:  # handed to the consumer, which decides
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.close()


def total_usage(prompt_lengths: list[int], gens: list[Generation]) -> dict:
    """Each prompt counted once, every completion's tokens (best_of candidates included)."""
    prompt = sum(prompt_lengths)
    completion = sum(g.generated for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict | str) -> str:
    """One server-sent event (`data: ...` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"
