"""Continuous batching over a fixed pool of sequence slots (the shape of SGLang's and vLLM's schedulers, small).

    sched = Scheduler(engine, num_slots=8, max_prompt_tokens=4096, max_new_tokens=256)
    sched.add(Request("doc-1", "Summarize: ...", max_new_tokens=128))
    while sched.has_work():
        for done in sched.step():      # finished sequences, as Engine.generate's rows (+ id, finish_reason)
            ...

The pool is one `CompressedCache.pool`: every slot sized for the longest prompt and `max_new_tokens` (the slots are
fixed-size; a paged kept store that sizes each slot by its own budget is the next step). Each `step()`:
1. admits waiting requests into free slots: a request is prefilled alone (the model's forward into a cache of
   one sequence, exactly Engine.generate's prefill), then its state is copied into the slot (`load_slot`, which
   overwrites or clears every buffer of the slot) and its first token drawn;
2. runs one decode step for every slot (the fast path's DecodeRunner: device-side state per slot, so slots at
   different steps share it; on CUDA a captured graph);
3. returns the sequences that finished (EOS, max_new_tokens, or cancelled) and frees their slots.
A row's tokens equal `Engine.generate([its prompt], ...)` alone: the prefill is the same, and every decode-step
quantity is per slot (positions, Keyformer step / tau / seed, sampling seed and step).
A request may carry its own cache budget (`Request.budget`, no larger than the pool's slots hold): per-request
compression. The rows' state (finished flag, tokens emitted, the last two tokens) is read one step late on CUDA from
a pinned snapshot, so the host never waits on the step it just queued and follows every row's output without
reading the device (`progress()` for streaming costs the loop nothing).
`Engine.generate` runs on a Scheduler on the fast path. With `prefill_tokens` the prefill is chunked: at most that
many prompt tokens are admitted per step between decode steps, with the kept tokens and scores of a one-shot prefill.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch

from kvstream.kvcache.cache import CompressedCache
from kvstream.kvcache.capacity import slots_that_fit
from kvstream.kvcache.config import engine_settings
from kvstream.kvcache.engine import Engine, _check_sampling, _cut_at_eos, _row_seed, _stop_list
from kvstream.kvcache.fast_decode import DecodeRunner, LaggedFlags


class RequestError(ValueError):
    """A request the scheduler refuses; `field` names the Request field at fault (servers map it to their
    parameter names)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass
class _Admission:
    """A chunked prefill in progress: the slot it will take, its request and prompt, its one-sequence cache, the
    prompt tokens fed so far, when it started."""

    slot: int
    req: "Request"
    ids: list[int]
    cache: CompressedCache
    done: int
    t0: float


@dataclass
class Request:
    """One sequence to generate: prompt (str, or token ids), its decoding settings (Engine.generate's)."""

    id: str
    prompt: str | list[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    budget: float | int | None = None  # this sequence's cache budget (CacheConfig.budget); None: the pool's


class Scheduler:
    """Continuous batching for an Engine on the fast path (see the module docstring).

    engine: an Engine whose decode_path is "fast"; num_slots: sequences decoded together, or "auto": as many as
    fit in gpu_memory_utilization of the GPU's memory beside what is already allocated (the weights) and a
    working reserve (kvstream.kvcache.capacity: a smaller cache is automatically a bigger batch);
    max_prompt_tokens, max_new_tokens: the largest prompt and generation a slot holds (requests over them are
    refused at `add`); timing: record CUDA events around each phase for `timing()` (benchmarks); prefill_tokens:
    chunked prefill, at most this many prompt tokens admitted per step between decode steps (None: each admission
    prefills its whole prompt at once). Chunked or not, a sequence's kept tokens and scores are those of a one-shot
    prefill (CompressedCache.begin_chunked_prefill); lagged: read the rows' state one step late (None: on CUDA;
    True on CPU runs the CUDA logic, for tests).
    """

    def __init__(self, engine: Engine, num_slots: int | str, max_prompt_tokens: int, max_new_tokens: int,
                 gpu_memory_utilization: float = 0.9, timing: bool = False, prefill_tokens: int | None = None,
                 lagged: bool | None = None):
        if engine.decode_path != "fast":
            raise ValueError("Scheduler needs an Engine on the fast path (a Llama-family model with "
                             f"CacheConfig.engine auto or fast); this one decodes through {engine.decode_path!r}")
        if max_prompt_tokens + max_new_tokens > engine.max_context:
            raise ValueError(f"Scheduler: max_prompt_tokens={max_prompt_tokens} + max_new_tokens={max_new_tokens} "
                             f"exceeds the model's {engine.max_context}-token context")
        engine_settings(dict(gpu_memory_utilization=gpu_memory_utilization, prefill_tokens=prefill_tokens),
                        "Scheduler")
        self.engine = engine
        model, dev = engine.model, engine.device
        self.cfg = dataclasses.replace(engine.cache_config, max_new_tokens=max_new_tokens)
        dtype = next(model.parameters()).dtype
        if num_slots == "auto":
            num_slots = slots_that_fit(self.cfg, model, max_prompt_tokens, max_new_tokens, dtype, dev,
                                        gpu_memory_utilization, chunked=prefill_tokens is not None)
        self.prefill_tokens = prefill_tokens
        self.prefilling: _Admission | None = None  # the chunked admission in progress
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"Scheduler: num_slots={num_slots!r} must be an int >= 1 or 'auto'")
        self.num_slots, self.max_prompt, self.max_new = num_slots, max_prompt_tokens, max_new_tokens
        self.pool = CompressedCache.pool(self.cfg, model.config, num_slots, max_prompt_tokens, dtype, dev)
        z = torch.zeros(num_slots, dtype=torch.float32, device=dev)
        self.runner = DecodeRunner(model, self.pool, max_new_tokens, temperature=z, top_p=z + 1,
                                   seeds=self.pool.plan.seeds, eos_ids=engine.eos_token_ids,
                                   pad_id=engine.pad_token_id)
        self.waiting: collections.deque[tuple[Request, list[int]]] = collections.deque()
        self.slots: list[tuple[Request, list[int]] | None] = [None] * num_slots
        self.started = [0.0] * num_slots  # when each slot's sequence was admitted (time_taken_llm)
        self.admitted_at = [0] * num_slots  # the index of the first snapshot pushed after each admission
        self.out: list[list[int]] = [[] for _ in range(num_slots)]  # each slot's tokens so far, on the host
        self.flags = LaggedFlags(self._snapshot(), lag=lagged)
        self._events: list | None = [] if timing else None

    # ---- the API ---------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; a bad one is a RequestError (a ValueError) that names the problem and the field
        (nothing is queued then)."""
        ids, stops = self._checked(request)
        self.waiting.append((dataclasses.replace(request, stop=stops), ids))

    def check(self, request: Request) -> list[int]:
        """Everything `add` checks, without queueing: the request's prompt token ids, or a RequestError whose
        `field` names what is wrong ("id", "prompt", "max_new_tokens", "temperature", "top_p", "seed", "stop",
        "budget")."""
        return self._checked(request)[0]

    def _checked(self, request: Request) -> tuple[list[int], list[str]]:
        if not isinstance(request, Request):
            raise RequestError(f"Scheduler.add takes a Request, not {type(request).__name__}", "request")
        if request.id in self._ids():
            raise RequestError(f"Scheduler.add: request id {request.id!r} is already queued or running", "id")
        for name, args in (("max_new_tokens", (request.max_new_tokens, 0.0, 1.0, 0)),
                           ("temperature", (1, request.temperature, 1.0, 0)), ("top_p", (1, 0.0, request.top_p, 0)),
                           ("seed", (1, 0.0, 1.0, request.seed))):
            try:
                _check_sampling(*args)
            except ValueError as e:
                raise RequestError(str(e), name) from None
        if request.max_new_tokens > self.max_new:
            raise RequestError(f"request {request.id!r}: max_new_tokens={request.max_new_tokens} is over the "
                               f"scheduler's {self.max_new}", "max_new_tokens")
        try:
            stops = _stop_list(request.stop)
        except ValueError as e:
            raise RequestError(str(e), "stop") from None
        if stops and self.engine.tokenizer is None:
            raise RequestError("stop strings need a tokenizer: pass tokenizer= to Engine.from_pretrained", "stop")
        try:
            ids = self.engine.prompt_ids(request.prompt, request.max_new_tokens)
        except ValueError as e:
            raise RequestError(str(e), "prompt") from None
        if len(ids) > self.max_prompt:
            raise RequestError(f"request {request.id!r}: a prompt of {len(ids)} tokens is over the scheduler's "
                               f"max_prompt_tokens={self.max_prompt}", "prompt")
        if request.budget is not None:
            self._check_budget(request, len(ids))
        return ids, stops

    def has_work(self) -> bool:
        return bool(self.waiting) or self.prefilling is not None or any(s is not None for s in self.slots)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting request, or stop a running one and free its slot; whether the id was found."""
        for i, (req, _) in enumerate(self.waiting):
            if req.id == request_id:
                del self.waiting[i]
                return True
        if self.prefilling is not None and self.prefilling.req.id == request_id:
            self.prefilling = None  # its staging is dropped with it; its slot was never taken
            return True
        for b, held in enumerate(self.slots):
            if held is not None and held[0].id == request_id:
                self._free(b)
                return True
        return False

    def step(self) -> list[dict]:
        """Admit waiting requests into free slots, decode one token for every running sequence, and return the
        finished ones: Engine.generate's row fields plus `id` and `finish_reason` ("stop" or "length").

        The finished flags are read one step late on CUDA (the step just queued keeps the GPU busy while the host
        reads the flags of the one before), so a sequence is returned one step after it ends; a finished row
        writes nothing meanwhile (the runner clears its `active` flag on the device)."""
        with torch.inference_mode():
            self._timed("prefill", self._admit)
            if any(s is not None for s in self.slots):
                self._timed("decode", self.runner.step)
            self.flags.push(self._snapshot())
            return self._collect()

    def timing(self) -> dict[str, float]:
        """GPU seconds spent in admissions (prefills) and decode steps, and the decode steps run, since the
        Scheduler was built with timing=True (CUDA events around each phase, read here: a host sync)."""
        if self._events is None:
            raise ValueError("Scheduler.timing: build the Scheduler with timing=True")
        out = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        steps = []
        for phase, a, b in self._events:
            b.synchronize()
            ms = a.elapsed_time(b)
            out[f"{phase}_s"] += ms / 1e3
            if phase == "decode":
                steps.append(ms)
        out["decode_steps"] = len(steps)
        # the typical step apart from the eager warm-up steps and the capture (and any stall): median and slowest
        out["decode_ms_median"] = statistics.median(steps) if steps else 0.0
        out["decode_ms_max"] = max(steps, default=0.0)
        return out

    def _timed(self, phase: str, fn) -> None:
        if self._events is None or self.engine.device.type != "cuda":
            fn()
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        self._events.append((phase, a, b))

    def progress(self) -> dict[str, list[int]]:
        """The tokens each running sequence has so far (EOS cut), by id, as of the last snapshot read (one step
        behind on CUDA): host lists, no device read, so streaming costs the decode loop nothing."""
        return {held[0].id: _cut_at_eos(list(self.out[b]), self.engine.eos_token_ids)
                for b, held in enumerate(self.slots) if held is not None}

    # ---- internals -------------------------------------------------------------------------------------------
    def _snapshot(self) -> torch.Tensor:
        """(B, 6) int64 on the device: the runner's (B, 4) snapshot, then each slot's tokens in its kept store (S)
        and tokens generated into its cache: what a finished row's kv_bytes needs (the count in S is the same in
        every layer: it follows the prompt length, the tokens so far and the budget), read one step late with the
        rest, so a finishing row costs no device read."""
        B, plan = self.num_slots, self.pool.plan
        s_len = self.pool.layers[0].store.s_len.view(B, 1).long()
        return self.runner.snapshot(s_len, plan.t_dev.view(B, 1).long())

    def _ids(self) -> set[str]:
        ids = {r.id for r, _ in self.waiting} | {s[0].id for s in self.slots if s is not None}
        return ids | ({self.prefilling.req.id} if self.prefilling is not None else set())

    def _admit(self) -> None:
        if self.prefill_tokens is not None:
            self._admit_chunked()
            return
        for b in range(self.num_slots):
            if not self.waiting:
                return
            if self.slots[b] is not None:
                continue
            req, ids = self.waiting.popleft()
            t0 = time.perf_counter()
            one = self._cache_for(req, ids)
            row = torch.tensor([ids], dtype=torch.long)
            self._start(b, req, ids, one, self.engine.prefill(one, row), t0)

    def _admit_chunked(self) -> None:
        """At most `prefill_tokens` prompt tokens this step: the admission in progress goes on, and when it ends
        the next waiting request starts in the next free slot (a short prompt may be admitted whole)."""
        budget = self.prefill_tokens
        while budget > 0:
            if self.prefilling is None:
                free = [b for b in range(self.num_slots) if self.slots[b] is None]
                if not free or not self.waiting:
                    return
                req, ids = self.waiting.popleft()
                one = self._cache_for(req, ids)
                one.begin_chunked_prefill(len(ids))
                self.prefilling = _Admission(free[0], req, ids, one, 0, time.perf_counter())
            a = self.prefilling
            c = min(budget, len(a.ids) - a.done)
            logits = self.engine.prefill_chunk(a.cache, torch.tensor([a.ids[a.done:a.done + c]]), a.done)
            a.done += c
            budget -= c
            if a.done == len(a.ids):
                self.prefilling = None
                self._start(a.slot, a.req, a.ids, a.cache, logits, a.t0)

    def _cache_for(self, req: Request, ids: list[int]) -> CompressedCache:
        cfg = self._config_of(req)
        return CompressedCache(cfg, self.engine.model.config, seeds=[_row_seed(cfg.seed, req.seed, ids)])

    def _start(self, b: int, req: Request, ids: list[int], one: CompressedCache, logits, t0: float) -> None:
        """Slot b takes the prefilled sequence: its state into the slot, its first token drawn."""
        self.pool.load_slot(b, one)
        self.runner.start_row(b, logits, req.max_new_tokens, req.temperature, req.top_p)
        self.slots[b] = (req, ids)
        self.started[b] = t0
        self.admitted_at[b] = self.flags.pushed  # snapshots pushed from now on are this sequence's
        self.out[b] = []

    def _collect(self) -> list[dict]:
        """Follow every running slot's output from the snapshot read (each snapshot is read once, in order), and
        return the sequences it shows finished."""
        snap, index = self.flags.read()
        out = []
        for b, held in enumerate(self.slots):
            if held is None or index < self.admitted_at[b]:
                continue
            done, n_gen, last, before, s_count, t_cache = snap[b]
            new = n_gen - len(self.out[b])
            if not 0 <= new <= 2:
                raise RuntimeError(f"Scheduler: slot {b} moved {new} tokens between two snapshots (at most 2)")
            self.out[b] += [before, last][2 - new:]
            if not done:
                continue
            req, ids = held
            gen = _cut_at_eos(list(self.out[b]), self.engine.eos_token_ids)
            text, gen = self.engine._text(ids, gen, req.stop)
            ended = bool(gen) and (gen[-1] in self.engine.eos_token_ids or len(gen) < n_gen)
            kv, kv_full = self._row_bytes(b, s_count, t_cache)
            out.append({"id": req.id, "generated_text": text, "token_ids": gen, "num_input_tokens": len(ids),
                        "num_generated_tokens": len(gen), "finish_reason": "stop" if ended else "length",
                        "time_taken_llm": time.perf_counter() - self.started[b], "kv_bytes": kv,
                        "kv_bytes_full": kv_full})
            self._free(b)
        return out

    def _config_of(self, req: Request):
        cfg = dataclasses.replace(self.cfg, max_new_tokens=req.max_new_tokens)
        return cfg if req.budget is None else dataclasses.replace(cfg, budget=req.budget)

    def _check_budget(self, req: Request, n_prompt: int) -> None:
        """A request's own budget must be a valid one for the pool's policy and fit the pool's slots."""
        if self.cfg.policy == "full":
            raise RequestError(f"request {req.id!r}: budget={req.budget!r} needs an evicting cache policy; this "
                               "scheduler's policy is 'full' (every token kept)", "budget")
        try:
            cfg = self._config_of(req)
        except (ValueError, TypeError) as e:
            raise RequestError(f"request {req.id!r}: budget={req.budget!r}: {e}", "budget") from None
        dtype = next(self.engine.model.parameters()).dtype
        need = CompressedCache.pool(cfg, self.engine.model.config, 1, n_prompt, dtype, "meta").layers[0].store
        have = self.pool.layers[0].store
        if need.cs > have.cs or need.cw > have.cw or (have.kivi and need.cw != have.cw):
            raise RequestError(f"request {req.id!r}: budget={req.budget!r} keeps {need.cs} tokens + a window of "
                               f"{need.cw} for a {n_prompt}-token prompt; this scheduler's slots hold {have.cs} + "
                               f"{have.cw} (its budget is {self.cfg.budget!r}); ask for a budget no larger", "budget")

    def _row_bytes(self, b: int, s_count: int, t: int) -> tuple[int, int]:
        """Bytes slot b's sequence holds (s_count tokens in S, t generated into the cache: from the snapshot), and
        what a full-precision cache of its tokens would hold. Host arithmetic only."""
        stores = [layer.store for layer in self.pool.layers]
        plan = self.pool.plan
        held = sum(s.bytes_held(s_count, plan.n[b], t, plan.w[b]) for s in stores)
        per_tok = 2 * self.pool.n_kv * self.pool.head_dim * stores[0].win_k.element_size()
        return int(held), int(len(stores) * per_tok * (plan.n[b] + t))

    def _free(self, b: int) -> None:
        self.slots[b] = None
        self.pool.release_slot(b)
        self.runner.done[b:b + 1].fill_(True)  # a slice fill_: no sync (t[b] = True does one)

