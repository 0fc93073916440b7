"""OpenAI request bodies, validated strictly (wrong types are errors, not coerced).

Fields that would change the output but that this node cannot honour (``n`` > 1, penalties,
logprobs, tools) are refused with a clear message rather than silently ignored: a cached
answer must be the answer to exactly the request that was sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

Number = StrictInt | StrictFloat
# Fields OpenAI clients may send that do not change the output: accepted and ignored.
IGNORED = ("user", "stream_options", "metadata", "store", "service_tier", "parallel_tool_calls")


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)  # llama.cpp extension
    min_p: Number | None = Field(None, ge=0, le=1)  # llama.cpp extension
    repeat_penalty: Number | None = Field(None, gt=0)  # llama.cpp extension
    seed: StrictInt | None = Field(None, ge=0, lt=2**32)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=8)] | None = None
    stream: StrictBool = False
    share: StrictBool | None = None  # p2pcache: let peers have this entry
    semantic: StrictBool = False  # p2pcache: a paraphrase's cached answer may serve this (L1)
    n: StrictInt = Field(1, ge=1, le=1)
    presence_penalty: Number = Field(0, ge=0, le=0)
    frequency_penalty: Number = Field(0, ge=0, le=0)
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    # ignored
    user: Any = None
    stream_options: dict[str, Any] | None = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None

    @model_validator(mode="after")
    def _unsupported(self) -> _Base:
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported by this node")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this node")
        if isinstance(self.stop, list) and not all(self.stop):
            raise ValueError("stop strings must not be empty")
        if self.stop == "":
            raise ValueError("stop strings must not be empty")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Base):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    echo: StrictBool = Field(False)
    suffix: None = None
    best_of: StrictInt = Field(1, ge=1, le=1)

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this node")
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def as_template_message(self) -> dict[str, str]:
        parts = self.content
        text = parts if isinstance(parts, str) else "".join(p.text for p in parts)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_Base):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: None = None
    tool_choice: None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported by this node")
        return self

    @property
    def token_limit(self) -> int | None:
        given = self.max_completion_tokens
        return given if given is not None else self.max_tokens
