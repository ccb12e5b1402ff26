"""A Ray Serve deployment over the engine's scheduler: an OpenAI-compatible completions endpoint (first step).

    from kvstream.pipeline.serve import build_app
    serve.run(build_app({"model": {"path": "demo:tiny-llama"}, "cache": {"policy": "keyformer", "budget": 0.5}}))

One replica owns one Engine and one `Scheduler` (kvstream.kvcache.scheduler: continuous batching). A single stepping
thread owns the scheduler: HTTP handlers hand it requests through a queue and await futures it resolves, so
concurrent requests share the running batch. Routes: `POST /v1/completions` (prompt, max_tokens, temperature,
top_p, stop, seed, n=1; responses carry `usage`, `finish_reason` and kvstream's `kv_bytes` / `kv_bytes_full`),
`GET /v1/models`, `GET /health`. Bad requests get a 400 with an OpenAI-style error body naming the field; a full
queue a 429 with Retry-After; a request over its timeout a 504 (its sequence is cancelled). Not yet (issue 16):
chat completions, streaming, per-request `kv_cache`, disconnect cancellation, `jobs/serve.py`.
"""

import asyncio
import queue
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

api = FastAPI()
DEFAULTS = {"max_new_tokens": 256, "max_prompt_tokens": 2048, "num_slots": 8, "max_queue": 64, "timeout_s": 300.0,
            "model_name": None, "num_gpus": 0, "num_cpus": 1}


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", **headers):
    """An OpenAI-style error response."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers or None)


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_completion(body: Any, model_name: str, max_new: int) -> dict:
    """The fields of a /v1/completions body, checked; BadRequest names the first bad one."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise BadRequest(f"model {body.get('model')!r} is not served here; this deployment serves {model_name!r}",
                         "model")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string", "prompt")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", "n")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported yet", "stream")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_new:
        raise BadRequest(f"max_tokens must be an integer in [1, {max_new}]", "max_tokens")
    temperature, top_p, seed = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("seed", 0)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BadRequest(f"{name} must be a number", name)
    if not 0 <= temperature <= 2:
        raise BadRequest("temperature must be in [0, 2]", "temperature")
    if not 0 < top_p <= 1:
        raise BadRequest("top_p must be in (0, 1]", "top_p")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BadRequest("seed must be an integer", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return dict(prompt=prompt, max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                seed=seed, stop=stop)


@serve.deployment
@serve.ingress(api)
class KVStreamServer:
    """One replica: an Engine, a Scheduler, and the thread that steps it."""

    def __init__(self, config: dict):
        from kvstream.kvcache.scheduler import Scheduler
        from kvstream.pipeline.models import build_engine, device_for

        opts = {**DEFAULTS, **(config.get("serve") or {})}
        self.model_name = opts["model_name"] or config["model"]["path"]
        self.max_new, self.max_queue, self.timeout = opts["max_new_tokens"], opts["max_queue"], opts["timeout_s"]
        cache = dict(config.get("cache") or {}, max_new_tokens=self.max_new)
        self.engine = build_engine(config["model"], cache, device_for(opts.get("num_gpus", 0)))
        self.sched = Scheduler(self.engine, opts["num_slots"], opts["max_prompt_tokens"], self.max_new)
        self.inbox: queue.Queue = queue.Queue()
        self.pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self.wake = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="kvstream-scheduler").start()

    # ---- the stepping thread (the only one that touches the scheduler) -----------------------------------------
    def _loop(self) -> None:
        while True:
            if not self.sched.has_work() and self.inbox.empty():
                self.wake.wait(0.5)
                self.wake.clear()
            while not self.inbox.empty():
                op, arg = self.inbox.get()
                if op == "add":
                    try:
                        self.sched.add(arg)
                    except ValueError as e:
                        self._resolve(arg.id, e)
                else:
                    self.sched.cancel(arg)
            if self.sched.has_work():
                try:
                    for row in self.sched.step():
                        self._resolve(row["id"], row)
                except Exception as e:  # a failed step fails what it held; the replica goes on
                    for rid in list(self.pending):
                        self.sched.cancel(rid)
                        self._resolve(rid, RuntimeError(f"generation failed: {type(e).__name__}: {e}"))

    def _resolve(self, rid: str, value) -> None:
        held = self.pending.pop(rid, None)
        if held is None:
            return
        loop, fut = held

        def settle():
            if not fut.done():
                (fut.set_exception if isinstance(value, BaseException) else fut.set_result)(value)

        loop.call_soon_threadsafe(settle)

    # ---- HTTP ------------------------------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "kvstream"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        from kvstream.kvcache.scheduler import Request as SeqRequest

        try:
            body = await request.json()
        except Exception:
            return error(400, "the request body is not valid JSON")
        try:
            fields = parse_completion(body, self.model_name, self.max_new)
        except BadRequest as e:
            return error(400, str(e), e.param)
        if len(self.pending) >= self.max_queue:
            return error(429, f"{len(self.pending)} requests are in flight (serve.max_queue={self.max_queue}); "
                              "retry later", kind="rate_limit_error", **{"Retry-After": "1"})
        rid = f"cmpl-{uuid.uuid4().hex}"
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = (asyncio.get_running_loop(), fut)
        self.inbox.put(("add", SeqRequest(rid, **fields)))
        self.wake.set()
        try:
            row = await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self.pending.pop(rid, None)
            self.inbox.put(("cancel", rid))
            return error(504, f"the request took over serve.timeout_s={self.timeout} s and was cancelled",
                         kind="timeout_error")
        except ValueError as e:  # refused by the scheduler: a prompt over the limits
            return error(400, str(e), "prompt")
        except RuntimeError as e:
            return error(500, str(e), kind="server_error")
        n_in, n_out = row["num_input_tokens"], row["num_generated_tokens"]
        return {
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "text": row["generated_text"], "finish_reason": row["finish_reason"],
                         "logprobs": None}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            "kv_bytes": row["kv_bytes"], "kv_bytes_full": row["kv_bytes_full"],
        }


def build_app(config: dict):
    """The Serve application for a config dict: {"model": {...}, "cache": {...}, "serve": {...}} (`serve run` can
    call it with the same keys)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "path" not in config["model"]:
        raise ValueError("build_app: config needs model.path (and optionally cache.*, serve.*)")
    opts = {**DEFAULTS, **(config.get("serve") or {})}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"build_app: unknown serve keys {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    actor = {"num_gpus": opts["num_gpus"], "num_cpus": opts["num_cpus"]}
    return KVStreamServer.options(ray_actor_options=actor).bind(config)
