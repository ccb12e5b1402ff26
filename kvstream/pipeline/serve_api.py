"""The OpenAI-compatible request fields of the Serve deployment, checked, and its error bodies.

`parse_completion` (POST /v1/completions) and `parse_chat` (POST /v1/chat/completions) turn a JSON body into the
keyword arguments of a `kvstream.kvcache.scheduler.Request` plus the options the handler needs (`stream`,
`include_usage`); the first bad field raises `BadRequest` naming it, which the handler answers with a 400 and an
OpenAI-style error body (`error()`). `kv_cache` is kvstream's own field: {"budget": x} (this request's cache
budget, CacheConfig.budget's meaning) and/or {"policy": name} equal to the deployment's (the slots' storage is
fixed per deployment, so a request cannot change its policy).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

ROLES = ("system", "user", "assistant", "tool", "developer")


class BadRequest(ValueError):
    """A request field is wrong: message for the client, `param` the field's name (None: the whole body)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", **headers):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRequest(f"{name} must be a number, not {type(value).__name__}", name)
    return float(value)


def _common(body: Any, model_name: str, max_new: int, policy: str, tokens_key: str) -> dict:
    """The fields both routes share: model, n, max_tokens, temperature, top_p, seed, stop, stream, kv_cache."""
    if body.get("model") not in (None, model_name):
        raise BadRequest(f"model {body.get('model')!r} is not served here; this deployment serves {model_name!r}",
                         "model")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = body.get(tokens_key)
    if max_tokens is None and tokens_key == "max_completion_tokens":
        tokens_key, max_tokens = "max_tokens", body.get("max_tokens")
    max_tokens = 16 if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_new:
        raise BadRequest(f"{tokens_key} must be an integer in [1, {max_new}] (serve.max_new_tokens), not "
                         f"{max_tokens!r}", tokens_key)
    temperature, top_p = _number(body, "temperature", 1.0), _number(body, "top_p", 1.0)
    if not 0 <= temperature <= 2:
        raise BadRequest(f"temperature must be in [0, 2], not {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], not {top_p}", "top_p")
    seed = 0 if body.get("seed") is None else body["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BadRequest("seed must be an integer", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                budget=parse_kv_cache(body.get("kv_cache"), policy), stream=bool(stream),
                include_usage=bool(opts.get("include_usage")))


def parse_kv_cache(value: Any, policy: str) -> float | int | None:
    """The budget of a request's `kv_cache` field ({"budget": x, "policy": the deployment's}); None: none asked."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest('kv_cache must be an object such as {"budget": 0.5}', "kv_cache")
    unknown = sorted(set(value) - {"budget", "policy"})
    if unknown:
        raise BadRequest(f"kv_cache: unknown keys {unknown}; valid: budget, policy", "kv_cache")
    if value.get("policy") not in (None, policy):
        raise BadRequest(f"kv_cache.policy={value['policy']!r}: this deployment's cache policy is {policy!r}; a "
                         "request may set only its budget", "kv_cache")
    budget = value.get("budget")
    if budget is None:
        return None
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0:
        raise BadRequest(f"kv_cache.budget={budget!r} must be a fraction in (0, 1] of the prompt or a token count "
                         ">= 1", "kv_cache")
    if isinstance(budget, float) and budget > 1 and not budget.is_integer():
        raise BadRequest(f"kv_cache.budget={budget!r}: a fraction must be in (0, 1], a token count an integer",
                         "kv_cache")
    return int(budget) if isinstance(budget, float) and budget > 1 else budget


def parse_completion(body: Any, model_name: str, max_new: int, policy: str) -> dict:
    """The fields of a /v1/completions body: Request kwargs (prompt, ...) + stream, include_usage."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string", "prompt")
    return dict(prompt=prompt, **_common(body, model_name, max_new, policy, "max_tokens"))


def parse_messages(messages: Any) -> list[dict]:
    """A chat's messages as [{"role", "content": str}]: content parts of type text are joined."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must be an object with a role in {list(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_chat(body: Any, model_name: str, max_new: int, policy: str) -> dict:
    """The fields of a /v1/chat/completions body: messages (checked, not yet rendered), Request kwargs + stream."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = parse_messages(body.get("messages"))
    return dict(messages=messages, **_common(body, model_name, max_new, policy, "max_completion_tokens"))
