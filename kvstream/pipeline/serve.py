"""A Ray Serve deployment over the engine's scheduler: an OpenAI-compatible endpoint with continuous batching.

    from kvstream.pipeline.serve import build_app
    serve.run(build_app({"model": {"path": "demo:tiny-llama"}, "cache": {"policy": "keyformer", "budget": 0.5}}))
    # or: serve run kvstream.pipeline.serve:build_app model.path=demo:tiny-llama cache.policy=keyformer ...
    # or: python jobs/serve.py --config conf/serve.yaml   (keys: kvstream/pipeline/serve_config.py)

One replica owns one Engine and one `Scheduler` (kvstream.kvcache.scheduler: continuous batching). A single stepping
thread owns the scheduler: HTTP handlers hand it requests through a queue and read what it pushes back (the tokens
so far of a streamed sequence, once per step while streams are open; the finished row), so concurrent requests
share the running batch. Routes: `POST /v1/completions`, `POST /v1/chat/completions` (messages through the
tokenizer's chat template where it has one, else the converse job's plain template), both with `stream: true` as
server-sent events; `GET /v1/models`; `GET /health` (with the replica's slot counts). kvstream's request field
`kv_cache` ({"budget": x}) sets the request's own cache budget; responses report its `kv_bytes` / `kv_bytes_full`.
Bad requests get a 400 with an OpenAI-style error body naming the field (serve_api.py); over serve.max_queue
requests in flight a 429 with Retry-After; over serve.timeout_s a 504 (in a stream: an error event); a client
that disconnects (Serve cancels its handler) has its sequence cancelled and its slot freed.
"""


import asyncio
import queue
import threading
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from ray import serve

from kvstream.pipeline.serve_api import BadRequest, error, parse_chat, parse_completion
from kvstream.pipeline.serve_stream import DONE, TextStream, chat_body, chunk, completion_body, error_event

api = FastAPI()


class Ticket:
    """One request in flight: the event loop of its handler and the queue the stepping thread feeds ("queued"
    once admitted to the scheduler's queue; "tokens" while streamed; then ("done", row) or ("error", exception)).
    A stream's tokens so far sit in `latest`; "tokens" only says they grew (one notice at a time, so a slow
    reader never piles up token lists)."""

    def __init__(self, rid: str, stream: bool):
        self.rid, self.stream = rid, stream
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.n_seen, self.latest, self.noticed = 0, [], False

    def push(self, kind: str, value) -> None:  # from the stepping thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def offer(self, tokens: list[int]) -> None:  # from the stepping thread: a stream's tokens so far
        self.n_seen, self.latest = len(tokens), tokens
        if not self.noticed:
            self.noticed = True
            self.push("tokens", None)

    def take(self) -> list[int]:  # from the handler, on a "tokens" notice
        self.noticed = False
        return self.latest


@serve.deployment
@serve.ingress(api)
class KVStreamServer:
    """One replica: an Engine, a Scheduler, and the thread that steps it. config: a resolved serve config
    (kvstream.pipeline.serve_config) as a plain dict."""

    def __init__(self, config: dict):
        from kvstream.kvcache.scheduler import Scheduler
        from kvstream.pipeline.models import build_engine, device_for

        s = config["serve"]
        self.model_name = s["model_name"] or config["model"]["path"]
        self.max_new, self.max_prompt = s["max_new_tokens"], s["max_prompt_tokens"]
        self.max_queue, self.timeout = s["max_queue"], s["timeout_s"]
        self.policy = config["cache"]["policy"]
        self.engine = build_engine(config["model"], config["cache"], device_for(s["num_gpus"]))
        self.sched = Scheduler(self.engine, s["num_slots"], self.max_prompt, self.max_new,
                               gpu_memory_utilization=s["gpu_memory_utilization"], prefill_tokens=s["prefill_tokens"])
        self.inbox: queue.Queue = queue.Queue()
        self.pending: dict[str, Ticket] = {}
        self.counts = {"running": 0, "waiting": 0, "cancelled": 0, "finished": 0}
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="kvstream-scheduler")
        self.thread.start()

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
                    except Exception as e:  # ValueError: refused (a 400); anything else fails this request only
                        self._finish(arg.id, "error", e)
                    else:
                        ticket = self.pending.get(arg.id)
                        if ticket is not None:
                            ticket.push("queued", None)
                elif self.sched.cancel(arg):
                    self.counts["cancelled"] += 1
            if self.sched.has_work():
                try:
                    for row in self.sched.step():
                        self.counts["finished"] += 1
                        self._finish(row["id"], "done", row)
                    self._stream_progress()
                except Exception as e:  # a failed step fails what it held; the replica goes on
                    for rid in list(self.pending):
                        self.sched.cancel(rid)
                        self._finish(rid, "error", RuntimeError(f"generation failed: {type(e).__name__}: {e}"))
            self.counts["running"] = sum(s is not None for s in self.sched.slots)
            self.counts["waiting"] = len(self.sched.waiting) + (self.sched.prefilling is not None)  # admitting too

    def _stream_progress(self) -> None:
        """Push the tokens so far of every streamed running sequence that grew (the scheduler's host lists, one
        step behind on a GPU: no device read)."""
        streams = [t for t in list(self.pending.values()) if t.stream]
        if not streams:
            return
        progress = self.sched.progress()
        for t in streams:
            tokens = progress.get(t.rid)
            if tokens is not None and len(tokens) > t.n_seen:
                t.offer(tokens)

    def _finish(self, rid: str, kind: str, value) -> None:
        ticket = self.pending.pop(rid, None)
        if ticket is not None:
            ticket.push(kind, value)

    def _drop(self, rid: str) -> None:
        """The handler is gone (answered, timed out, or its client disconnected): cancel the sequence if it runs."""
        if self.pending.pop(rid, None) is not None:
            self.inbox.put(("cancel", rid))
            self.wake.set()

    def check_health(self) -> None:
        """Serve's replica health check: a dead stepping thread makes Serve replace the replica."""
        if not self.thread.is_alive():
            raise RuntimeError("the scheduler thread has stopped")

    # ---- HTTP ------------------------------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "num_slots": self.sched.num_slots, "in_flight": len(self.pending), **self.counts}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "kvstream"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool):
        from kvstream.kvcache.scheduler import Request as SeqRequest

        try:
            body = await request.json()
        except Exception:
            return error(400, "the request body is not valid JSON")
        try:
            parse = parse_chat if chat else parse_completion
            fields = parse(body, self.model_name, self.max_new, self.policy)
            ids = self._prompt_ids(fields, chat)
        except BadRequest as e:
            return error(400, str(e), e.param)
        stream, include_usage = fields.pop("stream"), fields.pop("include_usage")
        if len(self.pending) >= self.max_queue:
            return error(429, f"{len(self.pending)} requests are in flight (serve.max_queue={self.max_queue}); "
                              "retry later", kind="rate_limit_error", **{"Retry-After": "1"})
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        ticket = self.pending[rid] = Ticket(rid, stream)
        self.inbox.put(("add", SeqRequest(rid, prompt=ids, **fields)))
        self.wake.set()
        streaming, loop = False, asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            kind, value = await asyncio.wait_for(ticket.events.get(), self.timeout)  # queued, or refused at add
            if kind == "queued" and stream:
                text = TextStream(self.engine.tokenizer, ids, fields["stop"], self.engine.eos_token_ids)
                streaming = True
                return StreamingResponse(self._events(ticket, text, chat, include_usage, deadline),
                                         media_type="text/event-stream", background=BackgroundTask(self._drop, rid))
            if kind == "queued":
                kind, value = await asyncio.wait_for(self._next_final(ticket), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return error(504, f"the request took over serve.timeout_s={self.timeout} s and was cancelled",
                         kind="timeout_error")
        finally:  # also on a client disconnect: Serve cancels this handler
            if not streaming:
                self._drop(rid)
        if kind == "error":
            return self._failure(value, chat)
        return (chat_body if chat else completion_body)(rid, self.model_name, value)

    def _prompt_ids(self, fields: dict, chat: bool) -> list[int]:
        """The prompt's token ids (chat: rendered as the converse job renders a conversation), checked."""
        from kvstream.pipeline.prompts import ChatPrompt

        param = "messages" if chat else "prompt"
        text, ids = (None, None) if chat else (fields.pop("prompt"), None)
        if chat:
            try:
                text, ids = ChatPrompt({}, mode="auto").render(fields.pop("messages"), self.engine.tokenizer)
            except Exception as e:  # a chat template that rejects this conversation (e.g. roles out of order)
                raise BadRequest(f"messages: the chat template failed: {type(e).__name__}: {e}", param) from None
        try:
            ids = self.engine.prompt_ids(text if ids is None else ids, fields["max_new_tokens"])
        except ValueError as e:  # empty, ids outside the vocabulary, over the model's context
            raise BadRequest(f"{param}: {e}", param) from None
        if len(ids) > self.max_prompt:
            raise BadRequest(f"{param}: the prompt is {len(ids)} tokens, over serve.max_prompt_tokens="
                             f"{self.max_prompt}; shorten it", param)
        return ids

    @staticmethod
    async def _next_final(ticket: Ticket) -> tuple[str, object]:
        while True:
            kind, value = await ticket.events.get()
            if kind in ("done", "error"):
                return kind, value

    def _failure(self, exc: BaseException, chat: bool):
        if isinstance(exc, ValueError):  # refused by the scheduler at add (a RequestError names the field)
            field = getattr(exc, "field", "prompt")
            param = {"budget": "kv_cache", "prompt": "messages" if chat else "prompt",
                     "max_new_tokens": "max_tokens"}.get(field, field)
            return error(400, str(exc), param)
        return error(500, str(exc), kind="server_error")

    async def _events(self, ticket: Ticket, text: TextStream, chat: bool, include_usage: bool, deadline: float):
        """The server-sent events of one streamed request (until `deadline`, the event loop's clock); cancels its
        sequence if the stream ends early."""
        rid, loop = ticket.rid, asyncio.get_running_loop()
        try:
            if chat:
                yield chunk(rid, self.model_name, chat, role=True)
            while True:
                try:
                    kind, value = await asyncio.wait_for(ticket.events.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    yield error_event(f"the request took over serve.timeout_s={self.timeout} s and was cancelled",
                                      "timeout_error")
                    return
                if kind == "tokens":
                    delta = text.update(ticket.take())
                    if delta:
                        yield chunk(rid, self.model_name, chat, text=delta)
                elif kind == "done":
                    delta = text.finish(value["generated_text"])
                    if delta:
                        yield chunk(rid, self.model_name, chat, text=delta)
                    yield chunk(rid, self.model_name, chat, finish=value["finish_reason"], row=value,
                                with_usage=include_usage)
                    yield DONE
                    return
                elif kind == "error":
                    yield error_event(str(value), "server_error")
                    return
        finally:  # normal end: a no-op; a disconnect (GeneratorExit / CancelledError) or timeout: cancel
            self._drop(rid)


def build_app(args: dict):
    """The Serve application for a config: nested sections {"model": {...}, "cache": {...}, "serve": {...}},
    dotted keys {"serve.num_slots": "4"} as `serve run kvstream.pipeline.serve:build_app key=value` passes them,
    and/or {"config": "conf/serve.yaml"} (keys: kvstream/pipeline/serve_config.py). A bad key is a ConfigError."""
    from omegaconf import OmegaConf

    from kvstream.pipeline.serve_config import cache_dict, deployment_options, from_builder_args

    cfg = from_builder_args(args)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["cache"] = cache_dict(cfg)
    return KVStreamServer.options(**deployment_options(cfg)).bind(config)
