"""The OpenAI wire format: request bodies (validated), response and stream-chunk bodies, errors.

Requests are parsed strictly: a field of the wrong JSON type, a value out of range or a field
the API does not have is a 400 whose ``param`` names the field. Fields OpenAI has but this
server does not implement are accepted at their neutral value only (``n: 1``,
``presence_penalty: 0``, ``echo: false``, ...) and are a 400 otherwise, so that a client never
silently gets something other than it asked for. Extensions beyond OpenAI's fields, as in
vLLM: ``top_k``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mpt_relax.errors import MPTRelaxError

MAX_STOP_STRINGS = 16


class APIError(MPTRelaxError):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: no limit
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None
    ignore_eos: bool = False
    user: Optional[str] = None  # accepted, unused

    def unsupported(self) -> None:
        """400 for an OpenAI field set to a value this server does not implement."""
        if self.n != 1:
            raise APIError(400, "n > 1 is not supported: send one request per completion", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"{name} is not supported (only 0); use repetition_penalty instead", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")

    def sampling(self, max_new_tokens: int) -> dict[str, Any]:
        """The keyword arguments of :class:`mpt_relax.SamplingParams`."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return dict(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=max(self.top_k, 0),
                    top_p=self.top_p, repetition_penalty=self.repetition_penalty, stop=tuple(stops), seed=self.seed,
                    ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: raw text (or token ids) continued; no template."""

    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(default=None, ge=1)

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts as texts or token-id lists (a list of them is a batch: one choice each)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # e.g. "refusal": null from some clients
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart], None]
    name: Optional[str] = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the conversation rendered with the artifact's template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None

    def unsupported(self) -> None:
        super().unsupported()
        for i, m in enumerate(self.messages):
            if m.content is None:
                raise APIError(400, f"messages[{i}] has no content", param=f"messages.{i}.content")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} (function calling) is not supported", param=name)
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise APIError(400, "tool_choice / function_call are not supported", param="tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise APIError(400, "response_format other than {'type': 'text'} is not supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(model: type[_Strict], body: Any) -> _Strict:
    """The request model from a decoded JSON body, or an APIError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(x) for x in first["loc"] if not _is_union_tag(x)]
        param = ".".join(loc) or None
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        elif first["type"] == "missing":
            message = f"missing required field: {param}"
        else:
            message = f"invalid value for {param}: {first['msg']} (got {_short(first.get('input'))})"
        raise APIError(400, message, param=param) from None
    request.unsupported()
    return request


def _is_union_tag(x: Any) -> bool:
    """pydantic names the union member tried ('str', 'list[int]', ...) in the error location."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x or x.startswith(
        ("TextPart", "StreamOptions", "ChatMessage")))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list, created: int | None = None, **extra) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model, "choices": choices,
            **extra}


def completion_logprobs(entries: list[dict], token_text, offset: int = 0) -> dict:
    """The legacy completions' logprobs object for ``entries`` (from scheduler.token_logprobs)."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text(e["token_id"]))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(i): lp for i, lp in e["top"]} for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[dict], token_text) -> dict:
    """The chat completions' logprobs object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def one(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(i, lp) for i, lp in e["top"]]}
                        for e in entries]}
