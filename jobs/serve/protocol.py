"""The OpenAI-compatible request and response shapes of `m3 serve`, without HTTP or Ray.

A request body becomes a `Job` (or a RequestError naming the field and what was expected,
answered as a 4xx in OpenAI's error shape: never a 500 for what the client sent). The sampling
parameters are `m3 generate`'s (max_tokens = --max-new-tokens, temperature, top_p, seed), with
its defaults from the config's `infer:` section, so a request without them is `m3 generate`.

Extensions, all optional: `mode` (memory, none, rag: `--mode`), `memories: true` (or the header
`X-M3-Memories: true`) to get the references each chunk read (`--show-memories`); every response
names the build that served it (`build`, and the header `X-M3-Build`).

Chat: the model is a base language model with no chat template, so the prompt of
/v1/chat/completions is the messages' contents joined by newlines; the answer is its continuation.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from jobs.config.infer import MODES
from model.errors import M3Error

# what OpenAI's API takes that changes the output and this server does not do: refused (400)
# rather than ignored, so a client never gets an answer to another question than it asked
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "stop": None, "suffix": None, "tools": None}


class RequestError(M3Error, ValueError):
    """What the client sent is wrong: answered with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One validated request, what the batch decodes (`prompt` is text: it is tokenized with the
    tokenizer of the build that serves it, inside the batch)."""

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    mode: str
    memories: bool = False
    chat: bool = False
    stream: bool = False
    received: float = field(default_factory=time.perf_counter)
    # a streamed request's jobs/serve/stream.py TokenStream: the decode pushes its tokens there
    stream_to: object = field(default=None, repr=False, compare=False)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict, key: str, default, kind, lo=None, hi=None, lo_open=False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise RequestError(400, f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    value = kind(value)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise RequestError(400, f"{key}: expected a value {rng}, got {value!r}", key)
    return value


def parse_job(body: dict, infer, max_seq_len: int, chat: bool, memories_header: bool = False) -> Job:
    """A request body (completions or chat) as a Job; RequestError (400) naming the field."""
    for key, neutral in UNSUPPORTED.items():
        if body.get(key, neutral) not in (neutral, None):
            raise RequestError(400, f"{key}: not supported by this server (only {key}={neutral!r})", key)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
        parts = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content: expected a string", "messages")
            parts.append(content)
        prompt = "\n".join(parts)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, f"prompt: expected a string (one prompt per request), got {prompt!r:.80}", "prompt")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    mode = body.get("mode", infer.mode)
    if mode not in MODES:
        raise RequestError(400, f"mode: expected one of {', '.join(MODES)}, got {mode!r}", "mode")
    memories = body.get("memories", memories_header)
    if not isinstance(memories, bool):
        raise RequestError(400, f"memories: expected true or false, got {memories!r}", "memories")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream: expected true or false, got {stream!r}", "stream")
    return Job(
        prompt=prompt,
        max_tokens=_number(body, key, infer.max_new_tokens, int, 1, max_seq_len - 1),
        temperature=_number(body, "temperature", infer.temperature, float, 0, 2),
        top_p=_number(body, "top_p", infer.top_p, float, 0, 1, lo_open=True),
        seed=_number(body, "seed", infer.seed, int),
        mode=mode,
        memories=memories,
        chat=chat,
        stream=stream,
    )


def check_model(body: dict, name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, f"model: expected the model's name ({name!r})", "model")
    if model != name:
        raise RequestError(
            404, f"model: no model {model!r} here (this server serves {name!r})", "model", "model_not_found"
        )


def completion(job: Job, result: dict, model: str) -> dict:
    """The whole response of a finished job (`result`: jobs/serve/batch.py `Result.as_dict`)."""
    choice = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None, "token_ids": result["token_ids"]}
    if job.chat:
        choice["message"] = {"role": "assistant", "content": result["text"]}
    else:
        choice["text"] = result["text"]
    if job.memories:
        choice["memories"] = result["memories"]
    return {
        "id": ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"build-{result['build']}",
        "build": result["build"],
        "choices": [choice],
        "usage": usage(result),
    }


def usage(result: dict) -> dict:
    n, p = len(result["token_ids"]), result["prompt_tokens"]
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


async def stream_events(job: Job, model: str, build: int | None, deltas: AsyncIterator[str], result):
    """Server-sent events of a streamed job: one event per text delta as `deltas` yields it (a
    token's text, as its decode step ends), then, once the job is decoded (`result()`: its
    jobs/serve/batch.py `Result.as_dict`), one with finish_reason, usage and, when asked, the
    memories; then [DONE]."""
    rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {
        "id": rid,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"build-{build}",
        "build": build,
    }

    def event(text: str | None, finish: str | None, first: bool = False, last: dict | None = None) -> str:
        if job.chat:
            delta = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if last is not None and job.memories:
            choice["memories"] = last["memories"]
        chunk = {**head, "choices": [choice]}
        if last is not None:
            chunk["usage"] = usage(last)
        return f"data: {json.dumps(chunk)}\n\n"

    if job.chat:
        yield event(None, None, first=True)
    async for text in deltas:
        yield event(text, None)
    done = result()
    yield event(None if job.chat else "", done["finish_reason"], last=done)
    yield "data: [DONE]\n\n"
