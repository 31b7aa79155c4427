"""Tool calls in chat: the history rendered for the model's chat template (assistant calls, tool
results, the tool definitions), and the model's reply read back as a call — whole, or as
streamed deltas. The text layout of a call is `skillpack_server.structured_output`'s."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from skillpack_server.schemas.chat import ChatMessage, FunctionDefinition
from skillpack_server.structured_output import CALL_OPEN, CALL_SUFFIX, call_prefix

TOOLS_SYSTEM_PROMPT = (
    "You can call the functions below. To call one, reply with only this, and nothing else:\n"
    f"{CALL_OPEN}{{\"name\": <the function's name>, \"arguments\": <its arguments as a JSON object>}}"
    f"{CALL_SUFFIX[1:]}\n\nFunctions:\n"
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (the grammar's layout)."""
    return f"{call_prefix(name)}{arguments}{CALL_SUFFIX}"


def _arguments_value(arguments: str) -> Any:
    # templates that render calls expect the arguments as a mapping (they apply `tojson`)
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def template_turns(messages: list[ChatMessage], template: str,
                   functions: list[FunctionDefinition]) -> tuple[list[dict], list[dict] | None]:
    """The history as chat-template messages, and the tools to hand the template (None when it
    has no place for them: their description then goes into the system message)."""
    knows_tools, knows_calls = "tools" in template, "tool_calls" in template
    turns = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role  # templates know `system` only
        content = m.content if m.content is not None else getattr(m, "refusal", None)
        turn: dict[str, Any] = {"role": role, "content": content or ""}
        calls = [(c.id, c.function.name, c.function.arguments) for c in getattr(m, "tool_calls", None) or []]
        function_call = getattr(m, "function_call", None)
        if function_call is not None:
            calls.append((None, function_call.name, function_call.arguments))
        if calls and knows_calls:
            turn["tool_calls"] = [{"id": cid, "type": "function",
                                   "function": {"name": name, "arguments": _arguments_value(args)}}
                                  for cid, name, args in calls]
        elif calls:
            turn["content"] = (turn["content"] + "\n" if turn["content"] else "") + "\n".join(
                call_text(name, args) for _, name, args in calls)
        if m.role in ("tool", "function"):
            turn["role"] = "tool"
            if getattr(m, "tool_call_id", None):
                turn["tool_call_id"] = m.tool_call_id
            if m.name:
                turn["name"] = m.name
        elif m.name:
            turn["name"] = m.name
        turns.append(turn)
    if not functions:
        return turns, None
    specs = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in functions]
    if knows_tools:
        return turns, specs
    described = TOOLS_SYSTEM_PROMPT + "\n".join(json.dumps(s["function"]) for s in specs)
    if turns and turns[0]["role"] == "system":
        turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{described}"}
    else:
        turns.insert(0, {"role": "system", "content": described})
    return turns, None


def parse_call(text: str, names: list[str]) -> tuple[str, str] | None:
    """(name, arguments JSON text) when the whole reply is one complete call, else None."""
    for name in names:
        prefix = call_prefix(name)
        if text.startswith(prefix) and text.endswith(CALL_SUFFIX) and len(text) >= len(prefix) + len(CALL_SUFFIX):
            arguments = text[len(prefix): len(text) - len(CALL_SUFFIX)]
            try:
                json.loads(arguments)
            except json.JSONDecodeError:
                return None
            return name, arguments
    return None


@dataclass
class CallStream:
    """Turns a reply's text pieces into chat deltas: plain content, or one tool call (its name
    as soon as it is known, then its arguments as they grow)."""

    names: list[str]
    mode: str = "undecided"  # undecided | content | call
    name: str | None = None
    buffer: str = ""
    sent: int = 0  # characters of the arguments already sent

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Events for the new text: ("content", text), ("call", name) or ("arguments", text)."""
        if not text:
            return []
        if self.mode == "undecided":
            # the grammar lets a reply start with `<` only when it is a call
            self.mode = "call" if text.startswith("<") else "content"
        if self.mode == "content":
            return [("content", text)]
        self.buffer += text
        out = []
        if self.name is None:
            self.name = next((n for n in self.names if self.buffer.startswith(call_prefix(n))), None)
            if self.name is None:
                return []
            out.append(("call", self.name))
        body = self.buffer[len(call_prefix(self.name)):]
        ready = max(len(body) - len(CALL_SUFFIX), self.sent)  # the closing text may still be coming
        if ready > self.sent:
            out.append(("arguments", body[self.sent:ready]))
            self.sent = ready
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What is left at the end of the reply (a call's last argument characters)."""
        if self.mode != "call" or self.name is None:
            return [("content", self.buffer)] if self.mode == "call" and self.buffer else []
        body = self.buffer[len(call_prefix(self.name)):]
        end = len(body) - len(CALL_SUFFIX) if body.endswith(CALL_SUFFIX) else len(body)
        return [("arguments", body[self.sent:end])] if end > self.sent else []
