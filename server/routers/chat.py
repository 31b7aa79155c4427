"""`POST /v1/chat/completions`: chat through the tokenizer's chat template — `n` choices as rows of
one batch, tool calls, structured output — with logprobs and SSE."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from skillpack_server.engine.types import EngineProtocol, TokenEvent, check_prompt
from skillpack_server.errors import APIError, domain_error_body
from skillpack_server.exceptions import DomainError
from skillpack_server.generation import (
    Generation, Piece, choice_seed, make_request, merged_pieces, new_id, resolve_model,
    selection_headers, sampling_for, served_model, sse, start_all, token_budget, total_usage,
)
from skillpack_server.dependencies import get_engine, get_metrics
from skillpack_server.metrics import Metrics
from skillpack_server.reply_text import token_bytes, token_text
from skillpack_server.schemas.chat import ChatRequest, ChatResponse, FunctionDefinition
from skillpack_server.structured_output import GrammarError, ToolSpec, grammars_for, json_grammar, tools_grammar
from skillpack_server.tool_calls import CallStream, new_call_id, parse_call, template_turns

router = APIRouter(tags=["chat"])
ROUTE = "/v1/chat/completions"


def render_prompt(tokenizer: Any, body: ChatRequest, functions: list[FunctionDefinition]) -> list[int]:
    """The chat template applied with the generation prompt (and the tools offered), as token ids."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "The served model's tokenizer has no chat template; use /v1/completions.",
                       param="messages")
    turns, tools = template_turns(body.messages, template if isinstance(template, str) else str(template), functions)
    try:
        text = tokenizer.apply_chat_template(turns, tools=tools, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template that raises (e.g. on role order) rejects the history
        raise APIError(400, f"The model's chat template rejected these messages: {exc}", param="messages") from None
    # the template already wrote every special token it wants
    return tokenizer.encode(text, add_special_tokens=False)


def reply_grammar(body: ChatRequest, functions: list[FunctionDefinition]) -> tuple[str | None, str]:
    """The Lark grammar the reply must follow (None: free text) and the field it comes from."""
    fmt = body.response_format
    schema = None
    if fmt is not None and fmt.type == "json_object":
        schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ or {"type": "object"}
    choice = body.tool_choice_name
    if functions:
        chosen = functions if choice in ("auto", "required") else [f for f in functions if f.name == choice]
        tools = [ToolSpec(f.name, f.parameters) for f in chosen]
        return tools_grammar(tools, required=choice != "auto", text_schema=schema), "tools"
    if schema is not None:
        return json_grammar(schema), "response_format"
    return None, ""


def content_logprobs(tokenizer: Any, events: list[TokenEvent], top_k: int) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob, "bytes": token_bytes(tokenizer, token_id)}

    return [
        {**entry(ev.token_id, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top_logprobs[:top_k]]}
        for ev in events
    ]


@dataclass
class Choice:
    """One choice being generated: its text, and, when tools are offered, how it reads as a call."""

    gen: Generation
    calls: CallStream | None
    text: str = ""
    reason: str = "length"
    events: list[TokenEvent] = field(default_factory=list)
    call_id: str = field(default_factory=new_call_id)

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.reason = piece.finish_reason or self.reason
        self.events += piece.tokens


def finished_message(choice: Choice, body: ChatRequest) -> tuple[dict, str]:
    """The assistant message of a finished choice and its finish reason."""
    call = parse_call(choice.text, choice.calls.names) if choice.calls is not None and choice.reason == "stop" else None
    if call is None:
        return {"role": "assistant", "content": choice.text}, choice.reason
    name, arguments = call
    if body.legacy_functions:
        return {"role": "assistant", "content": None, "function_call": {"name": name, "arguments": arguments}}, \
            "function_call"
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": choice.call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}, "tool_calls"


@router.post("/v1/chat/completions", response_model=ChatResponse)
async def create_chat_completion(body: ChatRequest, request: Request, engine: EngineProtocol = Depends(get_engine),
                                 metrics: Metrics = Depends(get_metrics)):
    # tool_choice 'none': the model is told of no tools and writes text
    functions = body.function_definitions if body.tool_choice_name not in (None, "none") else []
    prompt_ids = render_prompt(engine.tokenizer, body, functions)
    check_prompt(prompt_ids, len(engine.tokenizer), engine.max_model_len, "messages")  # where a prompt is checked
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = token_budget(engine, len(prompt_ids), body.token_limit, param)
    if max_tokens < 1:
        raise APIError(400, f"The prompt fills the model's whole context ({engine.max_model_len} tokens); "
                            "no room is left for a reply.", param="messages", code="context_length_exceeded")
    lark, source = reply_grammar(body, functions)
    grammar = None
    if lark is not None:
        grammars = grammars_for(request.app.state, engine)
        try:
            grammar = grammars.check(lark)
        except GrammarError as exc:
            where = "response_format.json_schema.schema" if source == "response_format" else "tools"
            raise APIError(400, f"The {where} cannot be enforced: {exc}", param=where) from None
    packs, routing = await resolve_model(request.app.state, engine, body.model, body.skillpacks, prompt_ids)
    top_k = body.top_logprobs or 0
    choices = []
    for j in range(body.n):
        constraint = grammars.constraint(grammar) if grammar is not None else None
        sampling = sampling_for(body, max_tokens, choice_seed(body.seed, j), top_k if body.logprobs else None,
                                constraint=constraint)
        gen = Generation(engine, make_request(prompt_ids, packs, sampling, "chatcmpl"), body.stop, metrics, ROUTE)
        choices.append(Choice(gen, CallStream([f.name for f in functions]) if functions else None))
    await start_all([c.gen for c in choices])
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": served_model(engine, body.model, routing)}
    if routing is not None:
        head["skillpack_routing"] = routing.response_field()
    usage = lambda: total_usage([len(prompt_ids)], [c.gen for c in choices])  # noqa: E731
    if body.stream:
        return StreamingResponse(_stream(choices, body, head, engine.tokenizer, top_k, usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **selection_headers(routing)})

    async for i, piece in merged_pieces([c.gen for c in choices]):
        choices[i].add(piece)
    out = []
    for i, choice in enumerate(choices):
        message, reason = finished_message(choice, body)
        logprobs = {"content": content_logprobs(engine.tokenizer, choice.events, top_k)} if body.logprobs else None
        out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
    payload = {**head, "object": "chat.completion", "choices": out, "usage": usage()}
    # routed answers carry the extension field, which the OpenAI response model would drop
    return payload if routing is None else JSONResponse(payload, headers=selection_headers(routing))


def _deltas(choice: Choice, body: ChatRequest, events: list[tuple[str, str]]) -> list[dict]:
    """Chat deltas for CallStream events (or plain content when no tools are offered)."""
    deltas = []
    for kind, value in events:
        if kind == "content":
            deltas.append({"content": value})
        elif body.legacy_functions:
            deltas.append({"function_call": {"name": value, "arguments": ""} if kind == "call" else {"arguments": value}})
        elif kind == "call":
            deltas.append({"tool_calls": [{"index": 0, "id": choice.call_id, "type": "function",
                                           "function": {"name": value, "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": value}}]})
    return deltas


async def _stream(choices: list[Choice], body: ChatRequest, head: dict, tokenizer: Any, top_k: int,
                  usage) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, reason: str | None = None, events: list[TokenEvent] | None = None) -> str:
        logprobs = None
        if body.logprobs and events:
            logprobs = {"content": content_logprobs(tokenizer, events, top_k)}
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": reason}]})

    try:
        for i in range(len(choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, piece in merged_pieces([c.gen for c in choices]):
            choice = choices[i]
            choice.add(piece)
            events = choice.calls.feed(piece.text) if choice.calls is not None else [("content", piece.text)]
            if piece.finish_reason is not None and choice.calls is not None:
                events += choice.calls.finish()
            deltas = _deltas(choice, body, [e for e in events if e[1] or e[0] == "call"])
            if not deltas and piece.tokens and body.logprobs:
                deltas = [{}]
            for k, delta in enumerate(deltas):
                yield chunk(i, delta, None, piece.tokens if k == 0 else None)
            if piece.finish_reason is not None:
                _, reason = finished_message(choice, body)
                yield chunk(i, {}, reason)
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage()})
    except DomainError as exc:  # the response has started: report in-band, as OpenAI does
        yield sse(domain_error_body(exc))
    yield sse("[DONE]")
