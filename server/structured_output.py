"""Structured output: the grammar a chat reply must follow (`response_format` JSON, tool calls),
enforced token by token with llguidance masks, one matcher per choice (the engine's
`TokenConstraint`), so constrained and free rows share one batch.

Why llguidance: a 3 MB wheel with no dependencies (xgrammar pulls in torch extensions and
Triton, outlines-core compiles a whole-vocabulary index up front); it computes each mask
lazily from the parser state, 0.003–1.8 ms per token for the 49k-token SmolLM2 vocabulary
on this project's CPU (docs/API.md has the measurement), and it reads JSON Schema and Lark.

JSON is generated in one canonical layout: `", "` between items, `": "` after keys and no
other whitespace, so a small model cannot wander into endless spaces or newlines.

A tool call is written as Hermes-style text, the layout Qwen and many open models are tuned on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`tool_choice: "required"` or a named function allows only that text (for one of the tools, or
the named one); `"auto"` allows it or a reply that does not start with `<`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
ANY_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot use; the message says why."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict


def call_prefix(name: str) -> str:
    """The text of a tool call up to its arguments."""
    return f'{CALL_OPEN}{{"name": {json.dumps(name)}, "arguments": '


CALL_SUFFIX = "}" + CALL_CLOSE


def _json(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": JSON_LAYOUT})


def json_grammar(schema: dict | None) -> str:
    """Lark for one JSON value of the schema (None: any JSON object, as `json_object` asks)."""
    return f"start: %json {_json(schema or ANY_OBJECT)}\n"


def tools_grammar(tools: list[ToolSpec], required: bool, text_schema: dict | None = None) -> str:
    """Lark for a tool call of one of `tools`; unless `required`, or else a reply (free text that
    does not start with `<`, or JSON of `text_schema` when given)."""
    lines = ["call: " + " | ".join(f"c{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        lines.append(f"c{i}: {json.dumps(call_prefix(tool.name))} %json {_json(tool.parameters)} "
                     f"{json.dumps(CALL_SUFFIX)}")
    if required:
        start = "start: call"
    else:
        start = "start: call | reply"
        lines.append(f"reply: %json {_json(text_schema)}" if text_schema is not None else r"reply: /[^<][\s\S]*/")
    return "\n".join([start, *lines]) + "\n"


class LLConstraint:
    """One choice's llguidance matcher as the engine's TokenConstraint."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def fill_mask(self, words) -> None:
        # words: a contiguous int32 CPU tensor of ceil(vocab_size / 32) words
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token)) and not self.matcher.is_error()


class Grammars:
    """Compiles grammars for one served tokenizer (its llguidance view is built once, ~0.4 s)."""

    def __init__(self, tokenizer: Any, eos_ids: list[int]):
        # imported on the first constrained request: plain serving (and the GPU image's HTTP
        # check, which carries no llguidance wheel) never needs it
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.source = tokenizer
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos_ids) or None)
        self.vocab_size = self.tokenizer.vocab_size

    def check(self, lark: str) -> str:
        """The compiled grammar, or a GrammarError saying what llguidance could not use."""
        grammar = self._llg.LLMatcher.grammar_from_lark(lark)
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(error.strip().splitlines()[0])
        return grammar

    def constraint(self, grammar: str) -> LLConstraint:
        """A fresh matcher for one choice (a few ms)."""
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return LLConstraint(matcher, self.vocab_size)


def grammars_for(app_state, engine) -> Grammars:
    """The app's Grammars for the engine's tokenizer, built on first use."""
    existing = app_state.grammars
    if existing is not None and existing.source is engine.tokenizer:
        return existing
    app_state.grammars = Grammars(engine.tokenizer, list(engine.eos_ids))
    return app_state.grammars
