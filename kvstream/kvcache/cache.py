"""CompressedCache: a transformers `Cache` whose layers keep a compressed, slot-based KV store.

    cache = CompressedCache(CacheConfig(policy="keyformer", budget=0.5, quant="kivi2"), model.config)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

The cache registers the "kvstream" attention function with transformers' `AttentionInterface` and sets it on
the model config it is given. That function attends over the compressed storage (and accumulates the scores
eviction needs) when the key it receives came from a CompressedCache, and is plain SDPA otherwise, so the model
keeps working with any other cache. Prefill attends over the whole prompt (SDPA with the padding mask), scores it
in chunks, then keeps each sequence's budget; decode steps append, attend, then evict or quantize.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvstream.kvcache.backend import ops, resolve_backend
from kvstream.kvcache.config import CacheConfig
from kvstream.kvcache.policies import get_policy
from kvstream.kvcache.storage import LayerStore, SeqPlan, to_device

log = logging.getLogger(__name__)
ATTN_NAME = "kvstream"
SUPPORTED_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo", "olmo2", "phi3")
_TAG = "_kvstream_layer"


@dataclass
class _Staging:
    """A chunked prefill's full-precision prompt so far, per layer: keys, values (B, H, T, D), queries
    (B, Hq, T, D) when the policy scores tokens; None until the layer's first chunk and after its last. `lse`: the
    rows' log-sum-exp (B, Hq, T) float32 where every chunk's attention gave it (see `attention_with_lse`), False
    for a layer where one chunk's did not."""

    total: int
    k: list
    v: list
    q: list
    lse: list


class _Layer(CacheLayerMixin):
    """Book-keeping of one layer for transformers (sequence length, mask sizes); the data is in `store`."""

    def __init__(self):
        super().__init__()
        self.store: LayerStore | None = None
        self.seen = 0  # tokens seen, padding included (positions transformers counts)

    def lazy_initialization(self, key_states, value_states):  # buffers are built at prefill
        return None

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - CompressedCache.update
        raise RuntimeError("use CompressedCache.update")

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store, self.seen = None, 0


class CompressedCache(Cache):
    """A compressed KV cache for `model.generate` (see the module docstring).

    cfg: a CacheConfig (or dict). model_config: the model's transformers config (its attention implementation is
    set to "kvstream"). seeds: per-sequence Keyformer noise seeds (default: derived from cfg.seed and the row).
    """

    def __init__(self, cfg: CacheConfig | dict, model_config, seeds: list[int] | None = None):
        cfg = cfg if isinstance(cfg, CacheConfig) else CacheConfig.from_dict(cfg)
        mc = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        check_model_config(cfg, mc)
        self.cfg, self.policy = cfg, get_policy(cfg)
        self.num_layers = mc.num_hidden_layers
        self.n_kv = mc.num_key_value_heads or mc.num_attention_heads
        self.head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.user_seeds = seeds
        self.plan: SeqPlan | None = None
        self.backend: str | None = None
        self._workspace = None  # (shape key, kernels.decode_attention.DecodeWorkspace) for the triton backend
        self._staging: _Staging | None = None  # a chunked prefill in progress (begin_chunked_prefill)
        super().__init__(layers=[_Layer() for _ in range(self.num_layers)])
        install_attention(model_config)
        if cfg.policy == "keyformer" and cfg.max_new_tokens is None:
            log.warning("CacheConfig.max_new_tokens is None: Keyformer's tau schedule assumes T=128 new tokens")

    # ---- transformers Cache API ------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store the new tokens of `layer_idx`; returns them tagged so the kvstream attention finds this cache."""
        layer = self.layers[layer_idx]
        q_len = key_states.shape[2]
        if layer.store is None and self._staging is not None:
            return self._stage(layer_idx, key_states, value_states)
        if layer.store is not None:
            if q_len != 1:
                raise NotImplementedError(
                    f"CompressedCache decodes one token per step; got {q_len} new tokens after the prompt "
                    "(chunked prefill goes through begin_chunked_prefill; assisted or speculative decoding are not "
                    "supported)"
                )
            layer.store.append(key_states, value_states)
        layer.seen += q_len
        setattr(key_states, _TAG, (self, layer_idx))
        return key_states, value_states

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("CompressedCache does not support beam search; use greedy or sampling")

    def crop(self, max_length):
        raise NotImplementedError("CompressedCache cannot be cropped (evicted tokens are gone)")

    def reset(self):
        super().reset()
        self.plan, self._staging = None, None

    # ---- attention -------------------------------------------------------------------------------------------
    def attend(self, layer_idx: int, module, query, key, value, attention_mask, scaling: float):
        """query (B, Hq, q_len, D); key/value (B, H, q_len, D) -> attention output (B, q_len, Hq, D)."""
        layer = self.layers[layer_idx]
        decode_fn, prefill_fn = ops(self.backend or self._resolve_backend(query.device))
        if layer.store is None and self._staging is not None:
            return self._prefill_chunk(layer_idx, module, query, key, value, scaling, prefill_fn)
        if layer.store is None:
            return self._prefill(layer_idx, module, query, key, value, attention_mask, scaling, prefill_fn)
        store, plan = layer.store, self.plan
        if layer_idx == 0:
            plan.begin_step()
        score_mode = 0 if not self.policy.scored else (2 if self.policy.noisy else 1)
        slots = store.slots()
        extra = {}
        if self.backend == "triton":  # one scratch for all layers (same shapes), so steps allocate nothing
            key = (tuple(query.shape), slots.cs, slots.cw, score_mode)
            if self._workspace is None or self._workspace[0] != key:
                from kvstream.kernels.decode_attention import decode_workspace

                self._workspace = (key, decode_workspace(query[:, :, 0], slots, score_mode))
            extra["workspace"] = self._workspace[1]
        # step and tau as device tensors: no host number enters the step, so it captures in a CUDA graph
        out = decode_fn(query[:, :, 0], slots, scaling, score_mode, store.scores, plan.seeds, layer_idx,
                        plan.step_dev, plan.tau_dev, **extra)
        store.after_attend()
        if layer_idx == self.num_layers - 1:
            plan.end_step()
        return out.unsqueeze(1)

    def _prefill(self, layer_idx, module, query, key, value, attention_mask, scaling, prefill_fn):
        B, _, T, _ = key.shape
        valid = padding_valid(attention_mask, B, T, key.device)
        if self.plan is None:
            self.backend = self._resolve_backend(key.device)
            # no mask: unpadded rows (the engine's admissions), whose lengths the host knows without a device read
            self.plan = self._plan_for([T] * B, key.device, None) if attention_mask is None else self._make_plan(valid)
        # a scored policy at tau 1 on an unpadded batch: the fused attention SDPA would run anyway, asked for its row
        # log-sum-exp. H2O: exactly the scores' normalizer, the scoring is then one QK^T pass instead of two.
        # Keyformer: the first pass's stabilizer (no running max)
        res = attention_with_lse(query, key, value, scaling) if self._lse_prefill(module, query, T) else None
        if res is not None:
            out, lse = res
        else:
            # the same call transformers' SDPA path makes, so prefill outputs are identical to the uncompressed model
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling)
            lse = None
        self._build_store(layer_idx, query, key, value, valid, scaling, prefill_fn, lse)
        return out

    def _build_store(self, layer_idx, query, key, value, valid, scaling, prefill_fn, lse=None) -> None:
        """The layer's store from its whole prompt: the policy's prefill scores (query (B, Hq, T, D) against key
        (B, H, T, D)), then the kept tokens and the recent window."""
        scores = None
        if self.policy.scored:
            scores = prefill_fn(query, key, valid, scaling, self.cfg.tau_init, self.policy.noisy, self.plan.seeds,
                                layer_idx, self.cfg.prefill_chunk, row_lse=lse)
        store = LayerStore(self.cfg, self.policy, self.plan, key.shape[1], key.shape[3], key.dtype, key.device,
                           self.backend)
        store.prefill(key, value, scores)
        self.layers[layer_idx].store = store
        if all(layer.store is not None for layer in self.layers):
            self.plan.order = None  # only prefill needs it

    # ---- chunked prefill -------------------------------------------------------------------------------------
    def begin_chunked_prefill(self, prompt_tokens: int) -> None:
        """Take the next forwards as chunks of unpadded prompts of `prompt_tokens` tokens each (every row the same
        length, no attention mask; kvstream.kvcache.scheduler admits one sequence at a time this way).

        Each chunk attends over the prompt so far (its keys / values staged in full precision per layer), and its
        queries are staged too when the policy scores tokens. When a layer's last chunk has run, its store is
        built exactly as a one-shot prefill builds it: the same scoring over the whole prompt's queries and keys
        (Keyformer's noise keyed by the same positions), the same selection. Costs the staging memory of the whole
        prompt for every layer until the last chunk: (2 H + Hq if scored) x T x D in the model's dtype, per row."""
        if self.plan is not None or any(layer.seen for layer in self.layers):
            raise ValueError("begin_chunked_prefill: this cache already holds tokens; use a fresh cache")
        if not isinstance(prompt_tokens, int) or prompt_tokens < 1:
            raise ValueError(f"begin_chunked_prefill: prompt_tokens={prompt_tokens!r} must be an int >= 1")
        L = self.num_layers
        self._staging = _Staging(prompt_tokens, [None] * L, [None] * L, [None] * L, [None] * L)

    @property
    def prefilling(self) -> bool:
        """Whether a chunked prefill is in progress (its last chunk not run yet)."""
        return self._staging is not None

    def _stage(self, layer_idx: int, key_states, value_states):
        st, layer = self._staging, self.layers[layer_idx]
        B, H, c, D = key_states.shape
        s, e = layer.seen, layer.seen + c
        if e > st.total:
            raise ValueError(f"chunked prefill: {e} tokens fed, the prompt has {st.total}")
        if st.k[layer_idx] is None:
            st.k[layer_idx] = key_states.new_empty(B, H, st.total, D)
            st.v[layer_idx] = value_states.new_empty(B, H, st.total, D)
        st.k[layer_idx][:, :, s:e] = key_states
        st.v[layer_idx][:, :, s:e] = value_states
        layer.seen = e
        key, value = st.k[layer_idx][:, :, :e], st.v[layer_idx][:, :, :e]
        setattr(key, _TAG, (self, layer_idx))
        return key, value

    def _prefill_chunk(self, layer_idx, module, query, key, value, scaling, prefill_fn):
        """query (B, Hq, c, D): the chunk's rows; key / value (B, H, e, D): the prompt so far, the chunk last."""
        st = self._staging
        B, Hq, c, D = query.shape
        e = key.shape[2]
        s = e - c
        if self.plan is None:
            self.backend = self._resolve_backend(query.device)
            self.plan = self._plan_for([st.total] * B, query.device, None)
        if self.policy.scored:
            if st.q[layer_idx] is None:
                st.q[layer_idx] = query.new_empty(B, Hq, st.total, D)
            st.q[layer_idx][:, :, s:e] = query
        # the chunk's rows attend causally to the prompt so far; with their log-sum-exp where the one-shot prefill
        # would take it (staged per layer, so the last chunk scores the whole prompt in one pass as that does)
        res = attention_with_lse(query, key, value, scaling) if self._lse_prefill(module, query, e) else None
        if res is not None:
            out, lse = res
            if st.lse[layer_idx] is None:
                st.lse[layer_idx] = lse.new_empty(B, Hq, st.total)
            if st.lse[layer_idx] is not False:
                st.lse[layer_idx][:, :, s:e] = lse
        else:
            rows = torch.arange(s, e, device=query.device)
            mask = (torch.arange(e, device=query.device).view(1, e) <= rows.view(c, 1)).view(1, 1, c, e)  # causal
            out, _ = sdpa_attention_forward(module, query, key, value, mask.expand(B, 1, c, e), dropout=0.0,
                                            scaling=scaling)
            st.lse[layer_idx] = False  # a row without its LSE: the layer scores with the two-pass kernel
        if e == st.total:  # the layer's last chunk: its store, as a one-shot prefill builds it
            valid = torch.ones(B, e, dtype=torch.bool, device=query.device)
            lse = st.lse[layer_idx] if st.lse[layer_idx] is not False else None
            self._build_store(layer_idx, st.q[layer_idx], key, value, valid, scaling, prefill_fn, lse)
            st.k[layer_idx] = st.v[layer_idx] = st.q[layer_idx] = st.lse[layer_idx] = None
            if all(layer.store is not None for layer in self.layers):
                self._staging = None
        return out

    def _lse_prefill(self, module, query, e: int) -> bool:
        """Whether this prefill (or chunk of one) can take its rows' log-sum-exp from the attention (see
        `attention_with_lse`): query (B, Hq, c, D) attending to the prompt's first e tokens, every row unpadded.
        On CPU the Triton backend runs only under the interpreter (tests): there the CPU's fused kernel gives it."""
        if not (self.backend == "triton" and self.policy.scored and self.cfg.tau_init == 1.0
                and min(self.plan.n) == max(self.plan.n) >= e and (attention_window(module) or e) >= e):
            return False
        if query.device.type == "cpu":
            return query.dtype in (torch.float32, torch.float16, torch.bfloat16)
        whole = query.shape[2] == e  # cuDNN takes whole prompts only (its causal mask for a chunk: not checked)
        return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0
                and query.shape[-1] <= 256 and torch.cuda.get_device_capability(query.device) >= (8, 0)
                and (torch.backends.cuda.flash_sdp_enabled() or (whole and _use_cudnn(query.device))))

    def _resolve_backend(self, device) -> str:
        bits = self.cfg.bits if self.cfg.format.grouped else None  # fp8 has no groups to constrain
        return resolve_backend(self.cfg.backend, device, self.head_dim, self.cfg.group_size, bits)

    def _make_plan(self, valid: torch.Tensor) -> SeqPlan:
        n = valid.sum(-1).tolist()  # the one host read of a generation
        if min(n) == 0:
            raise ValueError("CompressedCache: a sequence in the batch has an empty prompt (all padding)")
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
        return self._plan_for(n, valid.device, order)

    def _plan_for(self, n: list[int], device, order: torch.Tensor | None) -> SeqPlan:
        """The plan of sequences whose unpadded prompts hold n tokens each."""
        k = [self.policy.budget(x) for x in n]
        w = [self.policy.recent_window(x) for x in k]
        cap = [x - y for x, y in zip(k, w)]
        if self.cfg.max_new_tokens is not None:  # a window that can never fill needs no more ring slots
            w = [min(x, m + self.cfg.max_new_tokens) for x, m in zip(w, n)]
        B = len(n)
        if self.user_seeds is not None:
            if len(self.user_seeds) != B:
                raise ValueError(f"CompressedCache: {len(self.user_seeds)} seeds for a batch of {B} sequences")
            seeds = list(self.user_seeds)
        else:
            seeds = [(self.cfg.seed * 1_000_003 + b) & 0x7FFFFFFF for b in range(B)]
        taus = [self.cfg.tau(s) for s in range((self.cfg.max_new_tokens or 128) + 1)] if self.policy.noisy else None
        return SeqPlan(n=n, k=k, w=w, cap=cap, order=order, max_new=self.cfg.max_new_tokens,
                       seeds=to_device(seeds, torch.int64, torch.device(device)), taus=taus)

    @classmethod
    def pool(cls, cfg: CacheConfig, model_config, num_slots: int, max_prompt_tokens: int, dtype: torch.dtype,
             device) -> "CompressedCache":
        """An empty cache of `num_slots` sequence slots for the scheduler (kvstream.kvcache.scheduler): each slot
        holds a prompt of up to max_prompt_tokens and cfg.max_new_tokens new tokens (sized as a prefill of the
        longest prompt would size it); slots are filled with `load_slot` and start inactive."""
        if cfg.max_new_tokens is None:
            raise ValueError("CompressedCache.pool: set CacheConfig.max_new_tokens (it sizes every slot)")
        if num_slots < 1 or max_prompt_tokens < 1:
            raise ValueError(f"CompressedCache.pool: num_slots={num_slots} and max_prompt_tokens={max_prompt_tokens} "
                             "must be >= 1")
        device = torch.device(device)
        cache = cls(cfg, model_config)  # seeds come with each sequence a slot loads
        cache.backend = cache._resolve_backend(device)
        cache.plan = cache._plan_for([max_prompt_tokens] * num_slots, device, None)
        cache.plan.active.zero_()
        longest = cache._plan_for([max_prompt_tokens], device, None)
        probe = LayerStore(cfg, cache.policy, longest, cache.n_kv, cache.head_dim, dtype, device, cache.backend)
        cs, cw = probe.capacity()
        for layer in cache.layers:
            layer.store = LayerStore(cfg, cache.policy, cache.plan, cache.n_kv, cache.head_dim, dtype, device,
                                     cache.backend)
            layer.store.allocate(cs, cw)
        return cache

    def load_slot(self, b: int, src: "CompressedCache", sb: int = 0) -> None:
        """Slot b of this pool takes sequence sb of `src`, a cache of the same config its prefill filled."""
        for mine, theirs in zip(self.layers, src.layers):
            mine.store.load_slot(b, theirs.store, sb)
        self.plan.load_slot(b, src.plan, sb)

    def release_slot(self, b: int) -> None:
        """Slot b holds no sequence: its writes stop (the step still runs over it, its output unused)."""
        self.plan.active[b:b + 1].fill_(False)  # a slice fill_: no sync (t[b] = False does one)

    # ---- the fast decode path (kvstream.kvcache.fast_decode) -------------------------------------------------
    def capture_blocker(self) -> str | None:
        """Why a decode step over this cache cannot be captured in a CUDA graph (None: it can)."""
        if self.backend != "triton":
            return f"backend {self.backend!r} (the Triton kernels are the capturable path)"
        for layer in self.layers:
            reason = None if layer.store is None else layer.store.capture_blocker()
            if reason:
                return reason
        return None

    def capturable(self) -> bool:
        return self.capture_blocker() is None

    def host_state(self) -> list[tuple[int, int]]:
        """The host-side counters of every layer (tokens seen, decode steps), for a capture to put back."""
        return [(layer.seen, layer.store.t if layer.store is not None else 0) for layer in self.layers]

    def restore_host(self, state: list[tuple[int, int]]) -> None:
        for layer, (seen, t) in zip(self.layers, state):
            layer.seen = seen
            if layer.store is not None:
                layer.store.t = t

    def advance_host(self, steps: int) -> None:
        """Move the host-side counters by `steps` decode steps (after graph replays, which run no Python)."""
        for layer in self.layers:
            layer.seen += steps
            if layer.store is not None:
                layer.store.t += steps

    # ---- accounting ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Bytes and tokens the cache holds.

        kv_bytes: every byte of every tensor held (the allocation, slack and per-slot metadata included);
        kv_bytes_full: what a full-precision cache of every token seen would hold; tokens_kept / tokens_seen:
        batch totals (per layer). kv_bytes_per_seq: the bytes of the slots each sequence uses (its tokens, their
        scales and metadata), so a short row in a batch of long ones is not charged for their slots.
        """
        stores = [layer.store for layer in self.layers if layer.store is not None]
        if not stores:
            return {"kv_bytes": 0, "kv_bytes_full": 0, "tokens_kept": 0, "tokens_seen": 0,
                    "kv_bytes_per_seq": [], "kv_bytes_full_per_seq": []}
        B = stores[0].B
        held = sum(t.numel() * t.element_size() for t in self.tensors())
        seen = [n + stores[0].t for n in self.plan.n]
        per_tok = 2 * self.n_kv * self.head_dim * stores[0].win_k.element_size()  # K and V, one layer
        full = [len(stores) * per_tok * x for x in seen]
        return {
            "kv_bytes": held,
            "kv_bytes_full": sum(full),
            "tokens_kept": sum(stores[0].tokens_kept()),
            "tokens_seen": sum(seen),
            "kv_bytes_per_seq": [sum(col) for col in zip(*(s.row_bytes() for s in stores))],
            "kv_bytes_full_per_seq": full,
        }

    def kept_positions(self, layer_idx: int = 0) -> list[list[list[int]]]:
        """Positions layer `layer_idx` holds, [sequence][KV head] -> sorted list (reads the device)."""
        store = self.layers[layer_idx].store
        return [] if store is None else store.kept_positions()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (what `stats()["kv_bytes"]` counts)."""
        held = [t for layer in self.layers if layer.store is not None for t in layer.store.tensors()]
        return held + (self.plan.tensors() if self.plan is not None else [])


_CUDNN_LSE = {"ok": True}  # cleared the first time cuDNN turns a call down; the flash kernel is used from then on


def _use_cudnn(device) -> bool:
    """cuDNN's fused attention is what SDPA dispatches to on Hopper and later (and the fastest there, measured
    in jobs/bench_kernels.py); elsewhere the flash kernel is."""
    return (_CUDNN_LSE["ok"] and torch.backends.cuda.cudnn_sdp_enabled()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _cudnn_attention(query, key, value, scaling: float):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True, False,
                                                              scale=scaling)


def attention_with_lse(query, key, value, scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention of an unpadded prefill, or of one chunk of it, through the fused kernel SDPA uses here
    (cuDNN on Hopper, else flash; on CPU its flash kernel), also returning each row's log-sum-exp: query
    (B, Hq, c, D) for the last c of key/value's (B, H, e, D) positions (c == e: a whole prompt; c < e: a chunk,
    its row i at position e - c + i) -> (out (B, c, Hq, D) like transformers' SDPA path, lse (B, Hq, c) float32),
    or None when no kernel that gives it may run (on CUDA fp16/bf16: cuDNN turns the call down or takes no chunks,
    and the flash kernel is disabled, torch.backends.cuda.enable_flash_sdp(False))."""
    B, Hq, T, _ = query.shape
    e = key.shape[2]
    grp = Hq // key.shape[1]
    if grp > 1:
        key, value = key.repeat_interleave(grp, 1), value.repeat_interleave(grp, 1)
    if query.device.type == "cpu":
        rows = torch.arange(e - T, e).view(T, 1)
        bias = torch.zeros(T, e, dtype=query.dtype).masked_fill(torch.arange(e).view(1, e) > rows, float("-inf"))
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, T == e, attn_mask=None if T == e else bias.view(1, 1, T, e), scale=scaling)
        return res[0].transpose(1, 2).contiguous(), res[1].float()
    if T == e and _use_cudnn(query.device):
        try:
            res = _cudnn_attention(query, key, value, scaling)
            return res[0].transpose(1, 2).contiguous(), res[1].reshape(B, Hq, T).float()
        except RuntimeError:  # a shape or build cuDNN does not take: the flash kernel from now on
            _CUDNN_LSE["ok"] = False
    if not torch.backends.cuda.flash_sdp_enabled():
        return None
    # the flash op's causal mask is aligned to the bottom right where c < e (what torch's own lower-right causal
    # bias dispatches to it): the chunk's rows see the whole prompt before them
    res = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)
    return res[0].transpose(1, 2).contiguous(), res[1]


def attention_window(module) -> int | None:
    """The sliding window a transformers attention module attends within (None: the whole prefix). Qwen2 / Qwen3
    set it per layer on the module; Mistral's modules read it from their config."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window or None
    return getattr(getattr(module, "config", None), "sliding_window", None) or None


def padding_valid(attention_mask, B: int, T: int, device) -> torch.Tensor:
    """(B, T) bool of real (non-padding) tokens from the mask transformers passes to the attention function."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    m = attention_mask
    if m.dim() == 4:  # (B, 1, q, kv): the last query row sees every real key
        m = m[:, 0, -1, -T:]
        return (m if m.dtype == torch.bool else m == 0).to(device)
    return m[:, -T:].to(device=device).bool()


def check_model_config(cfg: CacheConfig, mc) -> None:
    """Clear errors for models and shapes the cache does not support."""
    mtype = getattr(mc, "model_type", None)
    if mtype not in SUPPORTED_MODELS:
        raise NotImplementedError(
            f"CompressedCache does not support model type {mtype!r}; supported: {', '.join(SUPPORTED_MODELS)}"
        )
    if getattr(mc, "attn_logit_softcapping", None):
        raise NotImplementedError(f"CompressedCache does not support attention logit soft-capping ({mtype})")
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    if cfg.format.grouped:
        if head_dim % cfg.group_size:
            raise ValueError(
                f"head_dim {head_dim} is not a multiple of CacheConfig.group_size={cfg.group_size}: choose a group "
                f"size that divides {head_dim}"
            )


def kvstream_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: compressed attention when `key` came from a CompressedCache, else SDPA."""
    tag = getattr(key, _TAG, None)
    if tag is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cache, layer_idx = tag
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(layer_idx, module, query, key, value, attention_mask, scaling), None


AttentionInterface.register(ATTN_NAME, kvstream_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # prefill gets SDPA's (B, 1, q, kv) padding-aware mask


def install_attention(model_config) -> None:
    """Route the model's attention through kvstream_attention (SDPA for any other cache)."""
    model_config._attn_implementation = ATTN_NAME
    sub = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    if sub is not None and sub is not model_config:
        sub._attn_implementation = ATTN_NAME
