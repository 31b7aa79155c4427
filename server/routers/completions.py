"""`POST /v1/completions`: OpenAI's text completions — several prompts, `n` and `best_of` as rows of
one batch — with echo, logprobs and SSE streaming."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from skillpack_server.engine.types import EngineProtocol, TokenEvent, check_prompt
from skillpack_server.errors import domain_error_body
from skillpack_server.exceptions import DomainError
from skillpack_server.generation import (
    Generation, Piece, choice_seed, make_request, merged_pieces, new_id, resolve_model, selection_headers,
    sampling_for, served_model, sse, start_all, token_budget, total_usage,
)
from skillpack_server.dependencies import get_engine, get_metrics
from skillpack_server.metrics import Metrics
from skillpack_server.reply_text import token_text
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


@dataclass
class Row:
    """One completion being generated: its prompt, its engine request, what it produced."""

    prompt: int  # position of its prompt in the request
    gen: Generation
    echo: str
    logprobs: LogprobsBuilder | None
    text: str = ""
    reason: str = "length"
    cumulative_logprob: float = 0.0
    echoed: bool = False

    def take_echo(self) -> dict | None:
        """Start the text with the echoed prompt (once, before the first piece); its logprobs."""
        self.echoed = True
        self.text = self.echo
        if self.logprobs is None or not self.echo:
            return None
        lp = self.logprobs.add(_prompt_events(self.gen))
        self.logprobs.offset = len(self.echo)
        return lp

    def add(self, piece: Piece) -> dict | None:
        """Take a piece; the legacy logprobs of its tokens."""
        self.text += piece.text
        self.reason = piece.finish_reason or self.reason
        self.cumulative_logprob += sum(ev.logprob or 0.0 for ev in piece.tokens)
        return self.logprobs.add(piece.tokens) if self.logprobs is not None else None

    def choice(self, index: int) -> dict:
        return {"index": index, "text": self.text, "logprobs": self.logprobs.out if self.logprobs else None,
                "finish_reason": self.reason}


def _param(body: CompletionRequest, i: int) -> str:
    return "prompt" if isinstance(body.prompt, str) or len(body.prompts) == 1 else f"prompt.{i}"


@router.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=False)
async def create_completion(body: CompletionRequest, request: Request, engine: EngineProtocol = Depends(get_engine),
                            metrics: Metrics = Depends(get_metrics)):
    texts = body.prompts
    prompts = [_prompt_ids(engine, p) for p in texts]
    budgets = []
    for i, ids in enumerate(prompts):
        check_prompt(ids, len(engine.tokenizer), engine.max_model_len, _param(body, i))  # where a prompt is checked
        budgets.append(token_budget(engine, len(ids), body.max_tokens, "max_tokens"))
    routes = [await resolve_model(request.app.state, engine, body.model, body.skillpacks, ids) for ids in prompts]
    want_logprobs = body.logprobs is not None
    # best_of ranks candidates by their summed logprobs, so it asks for them even when not shown
    logprobs = body.logprobs if want_logprobs else (0 if body.candidates > body.n else None)
    rows = []
    for i, (ids, budget, (packs, _)) in enumerate(zip(prompts, budgets, routes)):
        echo = "" if not body.echo else (texts[i] if isinstance(texts[i], str) else
                                         engine.tokenizer.decode(ids, skip_special_tokens=False))
        for j in range(body.candidates):
            sampling = sampling_for(body, budget, choice_seed(body.seed, j), logprobs,
                                    prompt_logprobs=body.echo and want_logprobs)
            gen = Generation(engine, make_request(ids, packs, sampling, "cmpl"), body.stop, metrics, ROUTE)
            rows.append(Row(i, gen, echo, LogprobsBuilder(engine.tokenizer) if want_logprobs else None))
    await start_all([r.gen for r in rows])
    decisions = [decision for _, decision in routes]
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": ",".join(dict.fromkeys(served_model(engine, body.model, d) for d in decisions))}
    routing = decisions[0]
    if routing is not None and len(decisions) == 1:
        head["skillpack_routing"] = routing.response_field()
    headers = selection_headers(routing) if len(decisions) == 1 else {}
    usage = lambda: total_usage([len(ids) for ids in prompts], [r.gen for r in rows])  # noqa: E731
    if body.stream:
        return StreamingResponse(_stream(rows, body, head, decisions, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})

    async for i, piece in merged_pieces([r.gen for r in rows]):
        if not rows[i].echoed:
            rows[i].take_echo()
        rows[i].add(piece)
    choices = []
    for i in range(len(prompts)):
        candidates = [r for r in rows if r.prompt == i]
        if body.candidates > body.n:
            candidates = sorted(candidates, key=lambda r: r.cumulative_logprob, reverse=True)[: body.n]
        choices += [r.choice(i * body.n + k) for k, r in enumerate(candidates)]
    for choice, decision in zip(choices, [d for d in decisions for _ in range(body.n)]):
        if decision is not None and len(decisions) > 1:
            choice["skillpack_routing"] = decision.response_field()
    payload = {**head, "choices": choices, "usage": usage()}
    # routed answers carry the extension fields, which the OpenAI response model would drop
    return payload if routing is None else JSONResponse(payload, headers=headers)


async def _stream(rows: list[Row], body: CompletionRequest, head: dict, decisions, usage) -> AsyncIterator[str]:
    def chunk(index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        decision = decisions[rows[index].prompt]
        if decision is not None and len(decisions) > 1:
            choice["skillpack_routing"] = decision.response_field()
        return {**head, "choices": [choice]}

    try:
        async for i, piece in merged_pieces([r.gen for r in rows]):
            row = rows[i]
            if not row.echoed:
                lp = row.take_echo()
                if row.echo:
                    yield sse(chunk(i, row.echo, lp, None))
            yield sse(chunk(i, piece.text, row.add(piece), piece.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage()})
    except DomainError as exc:  # the response has started: report in-band, as OpenAI does
        yield sse(domain_error_body(exc))
    yield sse("[DONE]")
