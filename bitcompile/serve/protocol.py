"""The OpenAI API's requests and responses, as the official `openai` client speaks them.

Request bodies are checked field by field; every refusal is an `ApiError` that names the field
(`param`) and becomes OpenAI's error JSON with its HTTP status.
"""

from __future__ import annotations

import math
import time
import uuid


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


# -- fields -----------------------------------------------------------------------------------------
def _number(body: dict, name: str, default, low: float, high: float, low_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a number, got {value!r}", "invalid_type")
    if value < low or value > high or (low_open and value == low):
        raise bad(name, f"{value!r} is out of range: must be {'>' if low_open else '>='} {low} and <= {high}")
    return value


def _integer(body: dict, name: str, default, low: int, high: int | None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {value!r}", "invalid_type")
    if value < low or (high is not None and value > high):
        raise bad(name, f"{value} is out of range: must be >= {low}" + (f" and <= {high}" if high is not None else ""))
    return value


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}", "invalid_type")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop", "must be a non-empty string or a list of at most 4 non-empty strings", "invalid_type")
    return stops


def sampling(body: dict, defaults: dict, max_tokens_limit: int, max_tokens_default: int,
             max_tokens_names=("max_tokens",)) -> dict:
    """The request's sampling fields as engine.submit arguments."""
    n = _integer(body, "n", 1, 1, None)
    if n != 1:
        raise bad("n", f"{n} choices were asked for; this server returns one choice per request (n=1)",
                  "unsupported_value")
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _integer(body, name, max_tokens_default, 0, None)
            if max_tokens > max_tokens_limit:
                raise bad(name, f"{max_tokens} is more than this server allows ({max_tokens_limit}; "
                                "--max-tokens-limit)", "limit_exceeded")
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    return {
        "max_new_tokens": max_tokens,
        "temperature": float(_number(body, "temperature", defaults.get("temperature", 1.0), 0, 2)),
        "top_p": float(_number(body, "top_p", defaults.get("top_p", 1.0), 0, 1, low_open=True)),
        "top_k": _integer(body, "top_k", 0, 0, None),
        "repetition_penalty": float(_number(body, "repetition_penalty", 1.0, 0, 10, low_open=True)),
        "seed": seed,
        "stop": _stops(body),
    }


def check_model(body: dict, served: str):
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {model!r}", "invalid_type")
    if model not in (None, served):
        raise ApiError(400, f"model {model!r} is not served here; this server serves {served!r} (GET /v1/models)",
                       param="model", code="model_not_found")


def completion_prompt(body: dict, vocab_size: int):
    """The prompt as text (str) or token ids (list[int])."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "is empty: give at least one token of text")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad_ids = [t for t in prompt if not 0 <= t < vocab_size]
        if bad_ids:
            raise bad("prompt", f"token ids {bad_ids[:5]} are outside the vocabulary 0..{vocab_size - 1}")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", f"{len(prompt)} prompts were sent; send one prompt per request", "unsupported_value")
    raise bad("prompt", "must be a string or a list of token ids", "invalid_type")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects",
                  "invalid_type" if not isinstance(messages, list) else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object with 'role' and 'content'", "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}].role", f"{role!r} is not one of system, user, assistant")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content", "only text content parts are supported", "unsupported_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string", "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def logprobs_field(body: dict) -> int | None:
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    return _integer(body, "logprobs", None, 0, 5)


def stream_fields(body: dict) -> tuple[bool, bool]:
    """(stream, include usage in a last chunk)."""
    stream = boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object", "invalid_type")
    return stream, bool(stream and options and options.get("include_usage"))


# -- responses ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish_reason: str | None, logprobs=None, use=None,
               chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if use is not None:
        body["usage"] = use
    return body


def chat_completion(rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None, use=None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}]}
    if use is not None:
        body["usage"] = use
    return body
