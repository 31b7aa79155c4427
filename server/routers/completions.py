"""`POST /v1/completions`: OpenAI's text completions, with echo, logprobs and SSE streaming."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from skillpack_server.engine.types import EngineError, EngineProtocol, SamplingParams, TokenEvent
from skillpack_server.errors import error_body
from skillpack_server.metrics import Metrics
from skillpack_server.routers.deps import get_engine, get_metrics
from skillpack_server.routers.generation import (
    Generation, check_prompt, make_request, resolve_model, routing_headers, served_model, sse, token_budget,
)
from skillpack_server.routers.text import token_text
from skillpack_server.schemas.completions import CompletionRequest, CompletionResponse

router = APIRouter(tags=["completions"])
ROUTE = "/v1/completions"


class LogprobsBuilder:
    """Accumulates the legacy `logprobs` object; offsets count characters of the returned text."""

    def __init__(self, tokenizer: Any, offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = offset
        self.out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, events: list[TokenEvent]) -> dict:
        start = len(self.out["tokens"])
        for ev in events:
            text = token_text(self.tokenizer, ev.token_id)
            self.out["tokens"].append(text)
            self.out["token_logprobs"].append(ev.logprob)
            if ev.logprob is None:  # the prompt's first token has no context to be scored in
                self.out["top_logprobs"].append(None)
            else:
                top = {token_text(self.tokenizer, t): lp for t, lp in ev.top_logprobs}
                top.setdefault(text, ev.logprob)  # the chosen token is always listed
                self.out["top_logprobs"].append(top)
            self.out["text_offset"].append(self.offset)
            self.offset += len(text)
        return {k: v[start:] for k, v in self.out.items()}


def _prompt_ids(engine: EngineProtocol, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt, add_special_tokens=True)
    return list(prompt)


def _prompt_events(gen: Generation) -> list[TokenEvent]:
    """The prompt's tokens with their logprobs, the first one unscored (as OpenAI returns it)."""
    events = list(gen.prompt_events)
    ids = gen.request.prompt_ids
    if len(events) == len(ids) - 1:  # an engine may skip the first token: nothing predicts it
        events.insert(0, TokenEvent(token_id=ids[0], logprob=None, is_prompt=True))
    if events:
        events[0] = TokenEvent(token_id=events[0].token_id, logprob=None, is_prompt=True)
    return events


@router.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=False)
async def create_completion(body: CompletionRequest, request: Request, engine: EngineProtocol = Depends(get_engine),
                            metrics: Metrics = Depends(get_metrics)):
    prompt_ids = _prompt_ids(engine, body.prompt)
    check_prompt(engine, prompt_ids, "prompt")
    max_tokens = token_budget(engine, len(prompt_ids), body.max_tokens, "max_tokens")
    packs, routing = await resolve_model(request.app.state, engine, body.model, body.skillpacks, prompt_ids)
    want_logprobs = body.logprobs is not None
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        logprobs=body.logprobs,
        prompt_logprobs=body.echo and want_logprobs,
    )
    gen = await Generation(engine, make_request(prompt_ids, packs, sampling, "cmpl"), body.stop, metrics, ROUTE).start()
    echo_text = "" if not body.echo else (
        body.prompt if isinstance(body.prompt, str) else engine.tokenizer.decode(prompt_ids, skip_special_tokens=False))
    head = {"id": gen.request.request_id, "object": "text_completion", "created": int(time.time()),
            "model": served_model(engine, body.model, routing)}
    if routing is not None:
        head["skillpack_routing"] = routing.response_field()
    if body.stream:
        stream = _stream(gen, body, head, echo_text, engine.tokenizer)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **routing_headers(routing)})

    text, reason, logprobs = echo_text, "length", LogprobsBuilder(engine.tokenizer) if want_logprobs else None
    pieces = [piece async for piece in gen.pieces()]
    if logprobs is not None and body.echo:
        logprobs.add(_prompt_events(gen))
        logprobs.offset = len(echo_text)
    for piece in pieces:
        text += piece.text
        reason = piece.finish_reason or reason
        if logprobs is not None:
            logprobs.add(piece.tokens)
    choice = {"index": 0, "text": text, "logprobs": logprobs.out if logprobs else None, "finish_reason": reason}
    payload = {**head, "choices": [choice], "usage": gen.usage()}
    # routed answers carry the extension field, which the OpenAI response model would drop
    return payload if routing is None else JSONResponse(payload, headers=routing_headers(routing))


async def _stream(gen: Generation, body: CompletionRequest, head: dict, echo_text: str, tokenizer) -> AsyncIterator[str]:
    logprobs = LogprobsBuilder(tokenizer) if body.logprobs is not None else None

    def chunk(text: str, events: list[TokenEvent], reason: str | None, prompt: bool = False) -> dict:
        lp = None
        if logprobs is not None:
            lp = logprobs.add(events)
            if prompt:
                logprobs.offset = len(echo_text)
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}]}

    try:
        sent_echo = not body.echo
        async for piece in gen.pieces():
            if not sent_echo:
                yield sse(chunk(echo_text, _prompt_events(gen) if logprobs else [], None, prompt=True))
                sent_echo = True
            yield sse(chunk(piece.text, piece.tokens, piece.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    except EngineError as exc:  # the response has started: report in-band, as OpenAI does
        yield sse(error_body(exc.status, str(exc), getattr(exc, "param", None), exc.code))
    yield sse("[DONE]")
