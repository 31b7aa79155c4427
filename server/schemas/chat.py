"""`POST /v1/chat/completions`: the request body and the response shapes, tools and
structured output included."""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skillpack_server.schemas.common import GenerationFields, Usage, unsupported

MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 1024
MAX_TOOLS = 128
MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema (response_format or a tool's parameters), serialized
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # function and json_schema names, as OpenAI requires


def text_of(v: Any, where: str = "content") -> str | None:
    """A string, an array of `{"type": "text", "text": ...}` parts (joined), or null."""
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError(f"expected `{where}` to be a string or an array of content parts.")
    texts = []
    for i, part in enumerate(v):
        if not isinstance(part, dict) or part.get("type") not in ("text", "refusal") \
                or not isinstance(part.get(part.get("type")), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"part {i} has type {kind!r}; only text parts (type 'text' with a 'text' string) "
                             "are served.")
        texts.append(part[part["type"]])
    return "".join(texts)


def bounded_schema(schema: dict, what: str) -> dict:
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"{what} is larger than {MAX_SCHEMA_BYTES} bytes of JSON.")
    return schema


class FunctionCall(BaseModel):
    """A call the assistant made: `arguments` is a JSON text, as OpenAI sends it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    arguments: str = Field(max_length=MAX_SCHEMA_BYTES)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class _Turn(BaseModel):
    """What every turn has; each role's class adds what it takes (OpenAI's schema is a `oneOf` by role)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=256)

    @field_validator("content", mode="before", check_fields=False)
    @classmethod
    def _text_content(cls, v: Any) -> str | None:
        return text_of(v)


class SystemTurn(_Turn):
    role: Literal["system", "developer"]
    content: str


class UserTurn(_Turn):
    role: Literal["user"]
    content: str


class AssistantTurn(_Turn):
    role: Literal["assistant"]
    content: str | None = None  # null when the turn made tool calls
    refusal: str | None = None  # a refusal in the history is shown as the turn's content
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # the deprecated form of one call


class ToolTurn(_Turn):
    role: Literal["tool"]
    content: str
    tool_call_id: str = Field(min_length=1, max_length=256)


class FunctionTurn(_Turn):
    role: Literal["function"]  # the deprecated form of a tool result
    content: str | None = None
    name: str = Field(min_length=1, max_length=256)


ChatMessage = Annotated[SystemTurn | UserTurn | AssistantTurn | ToolTurn | FunctionTurn, Field(discriminator="role")]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=16384)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict) -> dict:
        return bounded_schema(v, "a function's `parameters`")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    function: FunctionDefinition | None = None
    custom: dict[str, Any] | None = None  # OpenAI's free-form tools: refused below, by type

    @model_validator(mode="after")
    def _function_tools(self) -> Tool:
        if self.type != "function":
            raise unsupported(f"tools of type {self.type!r}", "only type 'function' is served")
        if self.function is None:
            raise ValueError("a `function` tool needs its `function` definition.")
        return self


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    function: NamedFunction | None = None

    @model_validator(mode="after")
    def _function_choice(self) -> NamedToolChoice:
        if self.type != "function" or self.function is None:
            raise unsupported(f"tool_choice of type {self.type!r}",
                              "use 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
        return self


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    # `schema` would shadow a pydantic BaseModel attribute
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v: dict | None) -> dict | None:
        return None if v is None else bounded_schema(v, "`response_format.json_schema.schema`")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type 'json_schema' and only allowed with it.")
        return self


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # a reply makes at most one call, which either value allows
    # deprecated by OpenAI, still documented: served as tools with a single call
    functions: list[FunctionDefinition] | None = Field(None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    # documented by OpenAI, not served: any non-null value is refused by name
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    @field_validator("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity")
    @classmethod
    def _not_served(cls, v: Any, info) -> Any:
        if v is not None:
            raise unsupported(info.field_name)
        return v

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v: Any) -> Any:
        if v is not None and v != ["text"]:
            raise unsupported("modalities", "only ['text'] is served")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info) -> int | None:
        if v is not None and not info.data.get("logprobs", False):
            raise ValueError("`top_logprobs` needs `logprobs` set to true.")
        return v

    @field_validator("functions")
    @classmethod
    def _not_with_tools(cls, v: list | None, info) -> list | None:
        if v is not None and info.data.get("tools") is not None:
            raise ValueError("send `tools` or the deprecated `functions`, not both.")
        names = [f.name for f in v or []] or [t.function.name for t in info.data.get("tools") or []]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each function name may appear once; repeated: {', '.join(repeated)}.")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _choice_among_the_tools(cls, v: Any, info) -> Any:
        if v is None:
            return v
        if info.field_name == "function_call" and info.data.get("tool_choice") is not None:
            raise ValueError("send `tool_choice` or the deprecated `function_call`, not both.")
        offered = [t.function.name for t in info.data.get("tools") or []] + \
            [f.name for f in info.data.get("functions") or []]
        name = v.function.name if isinstance(v, NamedToolChoice) else v.name if isinstance(v, NamedFunction) else None
        if name is not None and name not in offered:
            raise ValueError(f"the chosen function `{name}` is not among the tools ({', '.join(offered) or 'none given'}).")
        if v in ("auto", "required") and not offered:
            raise ValueError(f"'{v}' needs `tools` to choose from.")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def function_definitions(self) -> list[FunctionDefinition]:
        """The functions the model may call, from `tools` or the deprecated `functions`."""
        if self.functions is not None:
            return self.functions
        return [t.function for t in self.tools or []]

    @property
    def tool_choice_name(self) -> str | None:
        """'none', 'auto', 'required', a function's name, or None when the request has no tools.
        As OpenAI defaults: 'auto' when tools are given, else none."""
        choice = self.tool_choice if self.tool_choice is not None else self.function_call
        if isinstance(choice, NamedToolChoice):
            return choice.function.name
        if isinstance(choice, NamedFunction):
            return choice.name
        if choice is None:
            return "auto" if self.function_definitions else None
        return choice

    @property
    def legacy_functions(self) -> bool:
        """The request used `functions`: the reply carries `function_call`, not `tool_calls`."""
        return self.functions is not None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None
