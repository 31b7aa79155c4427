"""`POST /v1/chat/completions`: the request body and the response shapes."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from skillpack_server.schemas.common import GenerationFields, Usage, unsupported

MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 1024


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, v: Any) -> str:
        """A string, or an array of `{"type": "text", "text": ...}` parts (joined)."""
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("expected a string or an array of content parts.")
        texts = []
        for i, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {i} has type {kind!r}; only text parts (type 'text' with a 'text' string) are served.")
            texts.append(part["text"])
        return "".join(texts)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # documented by OpenAI, not served: any non-null value is refused by name
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    @field_validator("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                     "audio", "prediction", "web_search_options", "reasoning_effort")
    @classmethod
    def _not_served(cls, v: Any, info) -> Any:
        if v is not None:
            raise unsupported(info.field_name)
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: ResponseFormat | None) -> ResponseFormat | None:
        if v is not None and v.type != "text":
            raise unsupported("response_format", f"only type 'text' is served, got {v.type!r}")
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

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


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
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
