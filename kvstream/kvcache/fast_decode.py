"""The fast decode path: a static-shape decode step over a prefilled CompressedCache, captured in a CUDA graph.

`model.generate` runs a decode step as hundreds of host decisions (logits processors, stopping criteria, mask
building, cache book-keeping) around the model. Here a step is only device work, the same launches every time:

    embed (B, 1) -> rotary cos/sin at positions n + t (device) -> each decoder layer of the model itself
    (its norms, projections, RoPE, MLP; attention through the registered kvstream function over the
    compressed cache: ring write, fused attention with scores, eviction / KIVI writes) -> final norm, lm_head
    -> device sampling (kvstream.kvcache.sampling) -> EOS / max-new flags -> the token into the output buffer.

On CUDA the step is captured once per generation in a CUDA graph (gpt-fast's and SGLang's shape: static buffers,
the host replays) after two eager steps (kernel compilation, the decode workspace); on CPU it runs eagerly, the
same code, so CI tests it. The host reads the finished flags one step late (a pinned copy and an event per step),
so it never waits on the step it just queued. Families: Llama, Mistral, Qwen2, Qwen3 (their decoder layers take
`position_embeddings` and no mask at decode); the Engine runs other families through `model.generate`.
"""

from __future__ import annotations

import logging

import torch

from kvstream.kvcache.cache import CompressedCache
from kvstream.kvcache.forward import compact_forward
from kvstream.kvcache.models import cache_kwarg
from kvstream.kvcache.sampling import sample
from kvstream.kvcache.storage import to_device

log = logging.getLogger(__name__)
FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
WARMUP_STEPS = 2  # eager steps before capture: Triton compiles, the decode workspace is allocated


def unsupported_reason(model) -> str | None:
    """Why `model` cannot take the fast decode path (None when it can)."""
    mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    mtype = getattr(mc, "model_type", None)
    if mtype not in FAST_FAMILIES:
        return f"model type {mtype!r} is not one of the fast path's families ({', '.join(FAST_FAMILIES)})"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(model).__name__} does not have the Llama-family module layout"
    return None


class DecodeRunner:
    """Decodes a batch whose prompts a CompressedCache holds, up to `max_new_tokens` per row.

    model: a Llama-family causal LM (see `unsupported_reason`); cache: the CompressedCache its prefill filled
    (created with max_new_tokens, so every buffer is preallocated); max_new_tokens: an int, or (B,) int64 per row
    (at most the cache's); temperature, top_p (B,) float32 and seeds (B,) int64 on the model's device; eos_ids:
    token ids that end a row; pad_id: what a finished row emits; graph: capture the step in a CUDA graph (None: on
    CUDA when the cache's step is capturable). Every per-row buffer is updated in place (`start_row`), so a row
    can restart with another sequence while the others decode (kvstream.kvcache.scheduler).
    """

    def __init__(self, model, cache: CompressedCache, max_new_tokens: int, temperature: torch.Tensor,
                 top_p: torch.Tensor, seeds: torch.Tensor, eos_ids: list[int], pad_id: int,
                 graph: bool | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"DecodeRunner: {reason}")
        if cache.plan is None:
            raise ValueError("DecodeRunner: the cache holds no prompt yet; run the prefill through it first")
        width = int(max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens.max())
        if cache.cfg.max_new_tokens is None or cache.cfg.max_new_tokens < width:
            raise ValueError(f"DecodeRunner: the cache was built for max_new_tokens={cache.cfg.max_new_tokens}, "
                             f"not {width}; set CacheConfig.max_new_tokens before the prefill")
        self.model, self.cache, self.width = model, cache, width
        self.inner = model.model
        self.device = seeds.device
        B = len(cache.plan.n)
        self.B = B
        self.max_new = torch.empty(B, dtype=torch.int64, device=self.device)  # (B,) per row
        if isinstance(max_new_tokens, torch.Tensor):
            self.max_new.copy_(max_new_tokens.to(torch.int64).expand(B))
        else:  # a fill, not a copy from pageable host memory (that one syncs)
            self.max_new.fill_(int(max_new_tokens))
        self.temperature, self.top_p, self.seeds = temperature, top_p, seeds
        self.eos = to_device(eos_ids or [-1], torch.int64, self.device)
        self.pad_id = int(pad_id)
        self.kw = cache_kwarg(self.inner.layers[0])
        self.fwd = compact_forward(model)  # None: the step drives the transformers modules
        # static buffers: the step reads tok_in and writes tokens / done / gen_t in place
        self.tok_in = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.tokens = torch.full((B, width), self.pad_id, dtype=torch.int64, device=self.device)
        self.done = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.gen_t = torch.zeros(B, dtype=torch.int64, device=self.device)  # (B,) tokens written per row so far
        capturable = self.device.type == "cuda" and cache.capturable()
        if graph and not capturable:
            raise ValueError("DecodeRunner: graph=True needs a CUDA device and a capturable cache step "
                             f"({cache.capture_blocker() or 'not on CUDA'})")
        self.use_graph = capturable if graph is None else bool(graph)
        if self.device.type == "cuda" and not self.use_graph:
            log.info("decode step not captured in a CUDA graph: %s", cache.capture_blocker())
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps_run = 0

    # ---- the step ----------------------------------------------------------------------------------------
    def _emit(self, tok: torch.Tensor) -> None:
        """Write the drawn tokens (B,) of the unfinished rows at their column gen_t, update the finished flags,
        feed the tokens back (finished rows: pad, and their output stays as it was)."""
        live = ~self.done
        col = self.gen_t.clamp(max=self.width - 1).view(self.B, 1)
        self.tokens.scatter_(1, col, torch.where(live.view(self.B, 1), tok.view(self.B, 1), self.tokens.gather(1, col)))
        self.gen_t += live
        self.done |= live & (torch.isin(tok, self.eos) | (self.gen_t >= self.max_new))
        self.cache.plan.active &= ~self.done  # a finished row writes nothing more into its cache
        self.tok_in.copy_(torch.where(live, tok, self.pad_id))

    def first(self, logits: torch.Tensor) -> None:
        """Emit the first token from the prefill's last-position logits (B, V)."""
        self._emit(sample(logits.float(), self.temperature, self.top_p, self.seeds, self.gen_t))

    def start_row(self, b: int, logits: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float) -> None:
        """Row b starts a new sequence (whose state the cache's slot b holds): its sampling settings, an empty
        output, and its first token drawn from its prefill's last-position logits (1, V). In place, between steps."""
        if not 1 <= max_new_tokens <= self.width:
            raise ValueError(f"start_row: max_new_tokens={max_new_tokens} must be in [1, {self.width}]")
        r = slice(b, b + 1)
        # slice fills with Python values: assigning one to an element of a CUDA tensor (t[b] = v) synchronizes the
        # host with the GPU (torch through 2.11 at least), and a slot is refilled while the others decode
        self.max_new[r].fill_(max_new_tokens)
        self.temperature[r].fill_(temperature)
        self.top_p[r].fill_(top_p)
        self.tokens[b].fill_(self.pad_id)
        self.gen_t[r].fill_(0)
        self.done[r].fill_(False)
        tok = sample(logits.float(), self.temperature[r], self.top_p[r], self.seeds[r], self.gen_t[r])
        self.tokens[b, 0] = tok[0]
        self.gen_t[r].fill_(1)
        self.done[r] = torch.isin(tok, self.eos) | (max_new_tokens <= 1)
        self.cache.plan.active[r] &= ~self.done[r]
        self.tok_in[r] = torch.where(self.done[r], self.pad_id, tok)

    def _forward(self) -> torch.Tensor:
        B, plan = self.B, self.cache.plan
        pos = (plan.n_dev + plan.t_dev).view(B, 1)  # (B, 1) the unpadded position of this token
        if self.fwd is not None:
            return self.fwd(self.tok_in.view(B, 1), pos, self.cache).float()
        x = self.inner.embed_tokens(self.tok_in.view(B, 1))  # (B, 1, hidden)
        pe = self.inner.rotary_emb(x, pos)
        for layer in self.inner.layers:
            out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=True,
                        **{self.kw: self.cache})
            x = out[0] if isinstance(out, tuple) else out
        x = self.inner.norm(x)
        return self.model.lm_head(x[:, -1]).float()  # (B, V)

    def snapshot(self, *extra: torch.Tensor) -> torch.Tensor:
        """(B, 4 + len(extra)) int64 on the device: finished flag, tokens emitted, the last and the one-before-last
        token of each row (what a host that reads it one step late needs to follow every row's output without a
        sync: a row gains at most two tokens between two snapshots, its first one and the step's), then the caller's
        `extra` (B, 1) int64 columns, in the same concatenation."""
        g = self.gen_t.view(self.B, 1)
        last = self.tokens.gather(1, torch.cat((g - 1, g - 2), 1).clamp(min=0))  # (B, 2)
        return torch.cat((self.done.view(self.B, 1).long(), g, last, *extra), 1)

    def _step(self) -> None:
        logits = self._forward()
        self._emit(sample(logits, self.temperature, self.top_p, self.seeds, self.gen_t))

    def step(self) -> None:
        """One decode step for every row (finished rows run too and emit pad)."""
        if not self.use_graph or self.steps_run < WARMUP_STEPS:
            self._step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            self.cache.advance_host(1)  # the host counters the replayed Python did not move
        self.steps_run += 1

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        snap = self.cache.host_state()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # records, does not run: the state is as it was before the capture
            self._step()
        self.cache.restore_host(snap)
        self.graph = g

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self, prefill_logits: torch.Tensor) -> torch.Tensor:
        """Decode to the end: (B, max_new_tokens) int64 tokens, pad after a row's EOS (and its EOS kept)."""
        self.first(prefill_logits)
        lagged = LaggedFlags(self.done)
        for _ in range(1, self.width):
            if lagged.all_done():  # the flags of the step before the last one queued: no wait on the GPU
                break
            self.step()
            lagged.push(self.done)
        return self.tokens


class LaggedFlags:
    """Per-row device state (a (B,) or (B, k) tensor: the finished flags, or a packed snapshot) read one step late:
    each push copies it into one of two pinned host buffers behind an event; `read` returns the copy of the push
    before the newest (its event already passed, or about to), so the GPU always has a step queued. On CPU the newest
    push is read at once, unless lag=True (what CUDA does, for tests)."""

    def __init__(self, state: torch.Tensor, lag: bool | None = None):
        self.cuda = state.is_cuda
        self.lag = self.cuda if lag is None else bool(lag)
        if self.cuda:
            self.host = [torch.empty(state.shape, dtype=state.dtype, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event(blocking=True), torch.cuda.Event(blocking=True)]  # wait asleep
        else:
            self.host = [None, None]
        self.pushed = 0
        self.push(state)

    def push(self, state: torch.Tensor) -> None:
        i = self.pushed % 2
        if self.cuda:
            self.host[i].copy_(state, non_blocking=True)
            self.events[i].record()
        else:
            self.host[i] = state.clone()
        self.pushed += 1

    def read(self) -> tuple[list, int]:
        """The state of the push before the newest (the newest on CPU without lag, or when there was one push) as
        a list, and that push's index (0 for the first)."""
        index = max(self.pushed - 2, 0) if self.lag else self.pushed - 1
        if self.cuda:
            self.events[index % 2].synchronize()
        return self.host[index % 2].tolist(), index

    def all_done(self) -> bool:
        if self.lag and self.pushed < 2:
            return False
        return all(self.read()[0])
