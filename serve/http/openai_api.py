"""The OpenAI-compatible routes for causal-LM bundles: /v1/models, /v1/completions, /v1/chat/completions.

Requests are checked with pydantic (an unknown field is ignored, as OpenAI's clients send extras; a wrong type is a
400 naming the field). `stream: true` answers with server-sent events in OpenAI's chunk format ending with
`data: [DONE]`; `stream_options.include_usage` adds the usage chunk. Only n=1 is served.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.http.errors import APIError, bad_request, json_object
from serve.http.models import GenerationJob, Generator

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both generation routes share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the chat API's newer name for max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, but vLLM's and the bundle's
    repetition_penalty: float | None = Field(default=None, gt=0)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


def parse(model_type: type[BaseModel], body: bytes) -> Any:
    """The request as `model_type`, or a 400 naming the first bad field."""
    data = json_object(body)
    try:
        return model_type.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where}: {first['msg']}", param=where) from None


def check_common(request: SamplingRequest) -> int | None:
    if request.n != 1:
        raise bad_request(f"n={request.n}: this server returns one choice per request (n=1); send several requests",
                          param="n")
    return request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens


def completion_job(model: Generator, request: CompletionRequest) -> GenerationJob:
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request(f"prompt is a list of {len(prompt)} prompts; this server takes one per request",
                              param="prompt")
        prompt = prompt[0]
    return model.prepare(prompt, max_tokens=check_common(request), **_sampling(request))


def chat_job(model: Generator, request: ChatRequest) -> GenerationJob:
    messages = []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):  # content parts: only text ones are served
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                  "served by a text model", param=f"messages.{i}.content")
            content = "".join(p["text"] for p in content)
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    if not model.generator.chat_template:
        raise bad_request(f"model {model.name!r} has no chat template; use /v1/completions with a plain prompt",
                          param="messages")
    return model.prepare(messages, max_tokens=check_common(request), prompt_param="messages", **_sampling(request))


def _sampling(request: SamplingRequest) -> dict[str, Any]:
    return {"temperature": request.temperature, "top_p": request.top_p, "seed": request.seed, "stop": request.stop,
            "top_k": request.top_k, "repetition_penalty": request.repetition_penalty}


def usage(job: GenerationJob) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


async def complete(model: Generator, job: GenerationJob, *, chat: bool) -> dict[str, Any]:
    """The whole answer as one response object."""
    text = "".join([piece async for piece in model.run(job)])
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": job.finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
    return {"id": new_id(chat), "object": "chat.completion" if chat else "text_completion", "created": job.created,
            "model": model.name, "choices": [choice], "usage": usage(job), "system_fingerprint": None}


async def stream(model: Generator, job: GenerationJob, first: str | None, rest: AsyncIterator[str], *, chat: bool,
                 include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks: (chat: a role chunk,) a chunk per text piece, the finishing chunk, usage if asked, [DONE].
    `first` is the piece already taken from `rest` before the response started (None: the stream was empty)."""
    chunk_id, kind = new_id(chat), "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
        body = {"id": chunk_id, "object": kind, "created": job.created, "model": model.name,
                "choices": [choice] if choice is not None else [], "system_fingerprint": None, **extra}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def piece_choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                ({"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    try:
        if chat:
            yield chunk(piece_choice(None, None, role=True))
        if first is not None:
            yield chunk(piece_choice(first, None))
            async for piece in rest:
                yield chunk(piece_choice(piece, None))
        yield chunk(piece_choice(None, job.finish_reason))
        if include_usage:
            yield chunk(None, usage=usage(job))
    except APIError as err:  # after the 200 was sent: report in the stream, as OpenAI does
        yield b"data: " + json.dumps({"error": {"message": err.message, "type": err.type, "param": err.param,
                                                "code": err.code}}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def model_card(name: str, created: int, task: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tuneforge", "task": task}


def now() -> int:
    return int(time.time())
