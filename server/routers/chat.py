"""`POST /v1/chat/completions`: chat through the tokenizer's chat template, with logprobs and SSE."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from skillpack_server.engine.types import EngineError, EngineProtocol, SamplingParams, TokenEvent
from skillpack_server.errors import APIError, error_body
from skillpack_server.metrics import Metrics
from skillpack_server.routers.deps import get_engine, get_metrics
from skillpack_server.routers.generation import (
    Generation, check_prompt, make_request, resolve_model, routing_headers, served_model, sse, token_budget,
)
from skillpack_server.routers.text import token_bytes, token_text
from skillpack_server.schemas.chat import ChatMessage, ChatRequest, ChatResponse

router = APIRouter(tags=["chat"])
ROUTE = "/v1/chat/completions"


def render_prompt(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The chat template applied with the generation prompt, as token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "The served model's tokenizer has no chat template; use /v1/completions.",
                       param="messages")
    # `developer` is OpenAI's newer name for `system`; templates only know the latter
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    # the template already wrote every special token it wants
    return tokenizer.encode(text, add_special_tokens=False)


def content_logprobs(tokenizer: Any, events: list[TokenEvent], top_k: int) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob, "bytes": token_bytes(tokenizer, token_id)}

    return [
        {**entry(ev.token_id, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top_logprobs[:top_k]]}
        for ev in events
    ]


@router.post("/v1/chat/completions", response_model=ChatResponse)
async def create_chat_completion(body: ChatRequest, request: Request, engine: EngineProtocol = Depends(get_engine),
                                 metrics: Metrics = Depends(get_metrics)):
    prompt_ids = render_prompt(engine.tokenizer, body.messages)
    check_prompt(engine, prompt_ids, "messages")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = token_budget(engine, len(prompt_ids), body.token_limit, param)
    if max_tokens < 1:
        raise APIError(400, f"The prompt fills the model's whole context ({engine.max_model_len} tokens); "
                            "no room is left for a reply.", param="messages", code="context_length_exceeded")
    packs, routing = await resolve_model(request.app.state, engine, body.model, body.skillpacks, prompt_ids)
    top_k = body.top_logprobs or 0
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        logprobs=top_k if body.logprobs else None,
    )
    gen = await Generation(engine, make_request(prompt_ids, packs, sampling, "chatcmpl"), body.stop, metrics, ROUTE).start()
    head = {"id": gen.request.request_id, "created": int(time.time()),
            "model": served_model(engine, body.model, routing)}
    if routing is not None:
        head["skillpack_routing"] = routing.response_field()
    if body.stream:
        stream = _stream(gen, body, head, engine.tokenizer, top_k)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **routing_headers(routing)})

    text, reason, events = "", "length", []
    async for piece in gen.pieces():
        text += piece.text
        reason = piece.finish_reason or reason
        events += piece.tokens
    logprobs = {"content": content_logprobs(engine.tokenizer, events, top_k)} if body.logprobs else None
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": reason}
    payload = {**head, "object": "chat.completion", "choices": [choice], "usage": gen.usage()}
    # routed answers carry the extension field, which the OpenAI response model would drop
    return payload if routing is None else JSONResponse(payload, headers=routing_headers(routing))


async def _stream(gen: Generation, body: ChatRequest, head: dict, tokenizer: Any, top_k: int) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict, reason: str | None = None, events: list[TokenEvent] | None = None) -> dict:
        logprobs = None
        if body.logprobs and events:
            logprobs = {"content": content_logprobs(tokenizer, events, top_k)}
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for piece in gen.pieces():
            if piece.text or (piece.tokens and body.logprobs):
                yield sse(chunk({"content": piece.text}, None, piece.tokens))
            if piece.finish_reason is not None:
                yield sse(chunk({}, piece.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    except EngineError as exc:  # the response has started: report in-band, as OpenAI does
        yield sse(error_body(exc.status, str(exc), getattr(exc, "param", None), exc.code))
    yield sse("[DONE]")
