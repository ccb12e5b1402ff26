"""Slot storage of one layer: preallocated buffers sized by the budget, lengths on the device, no per-step cat.

Two regions per (sequence, KV head), read by the decode kernels as `kvstream.kernels.slots.KVSlots`:
- the ring W: the most recent tokens in full precision. With an evicting policy it holds the recent window
  (w + 1 slots: the window plus the new token); ring slot of position p is p % (w + 1).
- the kept store S: older tokens that stay, in the model dtype or quantized (fp8 e4m3 codes with a scale per
  sequence and KV head, or KIVI layouts).

Two modes:
- `evict` (every policy except full+kivi; fp8 always): after each decode step the token leaving the recent window
  moves to S while S has room; once S holds its budget, it competes with S's tokens (scored policies: the lowest
  accumulated score is evicted; window/sink: the leaving token is). Writing into a quantized S re-quantizes the
  touched key group(s) from their dequantized members (per-channel keys) or encodes just that token (per-token
  layouts, fp8 with the scales fixed at prefill); the freed slot is reused at once, so memory stays at the budget.
- `kivi` (policy full with kivi2/kivi4): KIVI's own rules. S slot = position. Prefill quantizes keys
  [0, T - T % R) and values [0, T - R); the ring (R slots) holds the last R tokens; during decode the value of
  the token that is R positions old leaves the ring into S (FIFO), and keys are flushed a block of R at a time
  when R keys wait in full precision (after the step that used the newest one in full precision).
Each decode step's writes are predicated device kernels (`kvstream.kernels.evict_write`, `kivi_residual`; their
torch references on the torch backend): lengths live on the device only and no step reads a device value back.
Buffers grow (unbounded budgets only) by host bounds from prompt lengths and steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from kvstream.kernels.fp8_quant_ref import masked_amax
from kvstream.kernels.slots import KVSlots
from kvstream.kvcache.config import CacheConfig
from kvstream.kvcache.kept_store import KeptStore, round_up
from kvstream.kvcache.policies import Policy

_GROWTH = 64


@functools.cache
def write_ops(backend: str) -> SimpleNamespace:
    """evict_write, kivi_value_exit, kivi_key_flush: the Triton kernels, or their torch references."""
    if backend == "triton":
        from kvstream.kernels import evict_write as ev, kivi_residual as kr
    else:
        from kvstream.kernels import evict_write_ref as ev, kivi_residual_ref as kr
    return SimpleNamespace(evict_write=ev.evict_write, kivi_value_exit=kr.kivi_value_exit,
                           kivi_key_flush=kr.kivi_key_flush)


@dataclass
class SeqPlan:
    """Per-sequence facts fixed at prefill, shared by all layers."""

    n: list[int]  # unpadded prompt lengths
    k: list[int]  # token budgets
    w: list[int]  # recent windows
    cap: list[int]  # slots of S per sequence (k - w, or unbounded)
    order: torch.Tensor  # (B, T) int64: gathers each row's valid tokens first, in position order
    seeds: torch.Tensor  # (B,) int64 Keyformer noise seeds
    max_new: int | None
    taus: list[float] | None = None  # Keyformer's tau at decode steps 0 .. len - 1 (later steps: the last)

    @property
    def B(self) -> int:
        return len(self.n)

    def __post_init__(self) -> None:
        # the same facts on the device, read by every decode step without a host list or a host number, so a
        # step's work is the same launches every time (CUDA-graph capturable)
        dev = self.seeds.device
        self.n_dev = to_device(self.n, torch.int64, dev)  # (B,)
        self.w_dev = to_device(self.w, torch.int64, dev)  # (B,)
        self.cap_dev = to_device([min(c, 2**62) for c in self.cap], torch.int64, dev)  # (B,)
        self.w32 = self.w_dev.to(torch.int32)  # (B,) what the write kernels take
        self.cap32 = self.cap_dev.clamp(max=2**31 - 1).to(torch.int32)  # (B,)
        self.active = torch.ones(len(self.n), dtype=torch.bool, device=dev)  # (B,) every row decodes
        B = len(self.n)
        self.t_dev = torch.zeros(B, dtype=torch.int64, device=dev)  # (B,) decode steps done, per sequence
        self.step_dev = torch.ones(B, dtype=torch.int32, device=dev)  # (B,) the step being decoded (t + 1)
        # (B, T + 1): each sequence's Keyformer tau at steps 0 .. T (a slot refilled with another sequence gets its
        # own schedule); later steps keep the last
        self.tau_table = to_device(self.taus or [1.0], torch.float32, dev).expand(B, -1).contiguous()
        self.tau_dev = torch.empty(B, dtype=torch.float32, device=dev)
        self.begin_step()

    def begin_step(self) -> None:
        """Before the first layer of a decode step: each sequence's step = t + 1 and its tau, in place on the
        device (sequences may be at different steps: a slot refilled mid-flight starts again from 0)."""
        self.step_dev.copy_(self.t_dev + 1)
        last = self.tau_table.shape[1] - 1
        self.tau_dev.copy_(self.tau_table.gather(1, (self.t_dev + 1).clamp(max=last).view(-1, 1)).view(-1))

    def end_step(self) -> None:
        """After the last layer of a decode step: the sequences that wrote it moved on (a finished or released
        sequence's count stays where it ended)."""
        self.t_dev += self.active

    def load_slot(self, b: int, src: "SeqPlan", sb: int = 0) -> None:
        """Slot b takes sequence sb of `src` (a plan of the same config): its lengths, budget, window, seed,
        tau schedule, step 0 (host lists and device tensors)."""
        if src.tau_table.shape[0] > self.tau_table.shape[1]:
            raise ValueError(f"load_slot: a sequence with max_new_tokens={src.max_new} in a pool built for "
                             f"{self.max_new}")
        for name in ("n", "k", "w", "cap"):
            getattr(self, name)[b] = getattr(src, name)[sb]
        for name in ("n_dev", "w_dev", "cap_dev", "w32", "cap32", "seeds"):
            getattr(self, name)[b] = getattr(src, name)[sb]
        self.tau_table[b] = src.tau_table[sb, -1]  # steps past the schedule's end keep its last tau
        self.tau_table[b, : src.tau_table.shape[1]] = src.tau_table[sb]
        self.t_dev[b:b + 1].fill_(0)  # slice fills: item assignment would sync
        self.active[b:b + 1].fill_(True)

    def tensors(self) -> list[torch.Tensor]:
        """The per-sequence device tensors every layer shares (counted once by the cache's stats)."""
        return [self.seeds, self.n_dev, self.w_dev, self.cap_dev, self.w32, self.cap32, self.active, self.t_dev,
                self.step_dev, self.tau_table, self.tau_dev]


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a small list, or a CPU tensor such as a prompt's ids) on the device without a host sync: on CUDA
    through pinned staging and a non-blocking copy (a copy from pageable memory waits for the GPU)."""
    if isinstance(values, torch.Tensor):
        if device.type != "cuda" or values.device.type != "cpu":
            return values.to(device=device, dtype=dtype)
        return values.to(dtype).pin_memory().to(device, non_blocking=True)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class LayerStore:
    """Compressed K/V of one layer for a batch: see the module docstring."""

    def __init__(self, cfg: CacheConfig, policy: Policy, plan: SeqPlan, n_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, backend: str = "torch"):
        self.cfg, self.policy, self.plan, self.backend = cfg, policy, plan, backend
        self.B, self.H, self.D, self.dtype, self.device = len(plan.n), n_heads, head_dim, dtype, device
        self.kivi = cfg.kivi_residual
        self.quant = cfg.format.layout
        self.bits = cfg.bits or 16
        self.G = cfg.group_size
        self.scored = policy.scored
        self.bidx = torch.arange(self.B, device=device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)
        self.t = 0  # decode tokens appended so far

    # ---- allocation ------------------------------------------------------------------------------------------
    def _init_buffers(self, cs: int, cw: int) -> None:
        B, H, D, dev = self.B, self.H, self.D, self.device
        self.kept = KeptStore(self.quant, self.bits, self.G, B, H, D, self.dtype, dev, cs, self.backend)
        self.win_k = torch.zeros(B, H, cw, D, dtype=self.dtype, device=dev)
        self.win_v = torch.zeros_like(self.win_k)
        self.win_pos = torch.full((B, cw), -1, dtype=torch.int32, device=dev)
        self.win_lo = torch.zeros(B, dtype=torch.int32, device=dev)
        self.s_len = torch.zeros(B, dtype=torch.int32, device=dev)
        self.sv_len = torch.zeros(B, dtype=torch.int32, device=dev)
        self.scores = torch.zeros(B, H, self.cs + cw, dtype=torch.float32, device=dev) if self.scored else None

    @property
    def cs(self) -> int:
        return self.kept.cs

    @property
    def cw(self) -> int:
        return self.win_k.shape[2]

    @property
    def s_pos(self) -> torch.Tensor:
        return self.kept.s_pos

    def _grow(self, need: int) -> None:
        """Enlarge S to hold `need` slots (unbounded budgets only; rare, amortized by _GROWTH)."""
        old_cs = self.cs
        new_cs = self.kept.grow(need, max(_GROWTH, old_cs // 2))
        if self.scores is not None:
            s = torch.zeros(self.B, self.H, new_cs + self.cw, dtype=torch.float32, device=self.device)
            s[:, :, :old_cs] = self.scores[:, :, :old_cs]
            s[:, :, new_cs:] = self.scores[:, :, old_cs:]
            self.scores = s

    # ---- prefill ---------------------------------------------------------------------------------------------
    def prefill(self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None) -> None:
        """k, v (B, H, T, D) post-RoPE, left padded; scores (B, H, T) float32 prefill scores or None."""
        order = self.plan.order
        if min(self.plan.n) == k.shape[2]:  # no padding (a scheduler admission): already in position order
            kc, vc, sc = k, v, scores
        else:
            gi = order.view(self.B, 1, -1, 1).expand(-1, self.H, -1, self.D)
            kc, vc = k.gather(2, gi), v.gather(2, gi)  # valid tokens first, in position order
            sc = None if scores is None else scores.gather(2, order.view(self.B, 1, -1).expand(-1, self.H, -1))
        if self.kivi:
            self._prefill_kivi(kc, vc)
        else:
            self._prefill_evict(kc, vc, sc)

    def capacity(self) -> tuple[int, int]:
        """(S slots, ring slots) the plan's sequences need (S before rounding to whole groups)."""
        plan = self.plan
        if self.kivi:
            span = max(plan.n) + (plan.max_new if plan.max_new is not None else _GROWTH)
            return round_up(span, self.cfg.residual), self.cfg.residual
        older = [max(0, n - w) for n, w in zip(plan.n, plan.w)]
        cs_need = [min(c, m + (plan.max_new or 0)) if plan.max_new is not None else min(c, m) + _GROWTH
                   for c, m in zip(plan.cap, older)]
        return max([0, *cs_need]), max(plan.w) + 1

    def allocate(self, cs: int, cw: int) -> None:
        """Empty buffers of cs S slots and cw ring slots for every sequence (a slot pool: `load_slot` fills them)."""
        self._init_buffers(cs, cw)

    def _prefill_evict(self, kc, vc, sc) -> None:
        plan, B, H, D, dev = self.plan, self.B, self.H, self.D, self.device
        older = [max(0, n - w) for n, w in zip(plan.n, plan.w)]
        self._init_buffers(*self.capacity())
        direct = self.quant == "none"  # S holds the model dtype: the kept tokens go straight into it
        if direct:
            ks, vs, k_valid = self.kept.S["s_k"], self.kept.S["s_v"], None
        else:  # staged in full precision, then encoded as a whole
            ks = torch.zeros(B, H, self.cs, D, dtype=self.dtype, device=dev)
            vs = torch.zeros_like(ks)
            k_valid = torch.zeros(B, H, self.cs, dtype=torch.bool, device=dev)
        s_cnt = [0] * B  # S slots in use per sequence (keys and values)
        for b in range(B):
            n, w, m = plan.n[b], plan.w[b], older[b]
            sel = self.policy.select(None if sc is None else sc[b, :, :m], m, plan.cap[b], H, dev)  # (H, c)
            c = sel.shape[1]
            s_cnt[b] = c
            if c:
                if self.policy.keeps_prefix:  # positions 0 .. c-1: a slice, not a gather
                    ks[b, :, :c], vs[b, :, :c] = kc[b, :, :c], vc[b, :, :c]
                else:
                    gi = sel.unsqueeze(-1).expand(H, c, D)
                    ks[b, :, :c], vs[b, :, :c] = kc[b].gather(1, gi), vc[b].gather(1, gi)
                if k_valid is not None:
                    k_valid[b, :, :c] = True
                self.s_pos[b, :, :c] = sel.to(torch.int32)
                if sc is not None:
                    self.scores[b, :, :c] = sc[b].gather(1, sel)
            pos = torch.arange(m, n, device=dev)  # the recent window
            ring = pos % (w + 1)
            self.win_k[b, :, ring], self.win_v[b, :, ring] = kc[b, :, m:n], vc[b, :, m:n]
            self.win_pos[b, ring] = pos.to(torch.int32)
            self.win_lo[b:b + 1].fill_(m)  # a slice fill: t[b] = m would sync
            if sc is not None:
                self.scores[b, :, self.cs + ring] = sc[b, :, m:n]
        if self.quant == "fp8":  # the scales come from the whole prompt (the window's tokens enter S later)
            self.kept.set_scales(masked_amax(kc, plan.n_dev), masked_amax(vc, plan.n_dev))
        if not direct:
            self.kept.encode_all(ks, vs, k_valid)
        self._set_lengths(s_cnt, s_cnt)

    def _prefill_kivi(self, kc, vc) -> None:
        plan, R, B, H, D, dev = self.plan, self.cfg.residual, self.B, self.H, self.D, self.device
        self._init_buffers(*self.capacity())
        ks = torch.zeros(B, H, self.cs, D, dtype=self.dtype, device=dev)
        vs = torch.zeros_like(ks)
        k_valid = torch.zeros(B, H, self.cs, dtype=torch.bool, device=dev)
        s_cnt, sv_cnt = [0] * B, [0] * B  # S slots holding keys / values per sequence
        for b, n in enumerate(plan.n):
            nq_k, nq_v = n - n % R, max(0, n - R)
            ks[b, :, :nq_k], vs[b, :, :nq_v] = kc[b, :, :nq_k], vc[b, :, :nq_v]
            k_valid[b, :, :nq_k] = True
            self.s_pos[b, :, :nq_k] = torch.arange(nq_k, dtype=torch.int32, device=dev)
            s_cnt[b], sv_cnt[b] = nq_k, nq_v
            pos = torch.arange(max(0, n - R), n, device=dev)
            self.win_k[b, :, pos % R], self.win_v[b, :, pos % R] = kc[b, :, pos], vc[b, :, pos]
            self.win_pos[b, pos % R] = pos.to(torch.int32)
            self.win_lo[b:b + 1].fill_(nq_k)
        self.kept.encode_all(ks, vs, k_valid)
        self._set_lengths(s_cnt, sv_cnt)

    def _set_lengths(self, s_cnt: list[int], sv_cnt: list[int]) -> None:
        """The lengths a prefill planned on the host, onto the device (decode steps keep them there)."""
        self.s_len.copy_(to_device(s_cnt, torch.int32, self.device))
        self.sv_len.copy_(to_device(sv_cnt, torch.int32, self.device))

    # ---- decode ----------------------------------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """(B,) int64 position of the token being decoded, per sequence (device arithmetic, no host list)."""
        return self.plan.n_dev + self.plan.t_dev

    def append(self, k1: torch.Tensor, v1: torch.Tensor) -> None:
        """Write the new token's k, v (B, H, 1, D) into the ring before attention."""
        p = self.positions()
        if self.kivi:
            R = self.cw
            if self.plan.max_new is None:  # a host bound on the S slot of the value leaving (else sized at prefill)
                self._grow_to(max(self.plan.n) + self.t - R + 1)
            # the value R positions old leaves the ring into S (FIFO) before the new token takes its ring slot
            self._ops.kivi_value_exit(self.slots(), p.to(torch.int32), self.plan.active)
            ring = p % R
        else:
            w = self.plan.w_dev
            ring = p % (w + 1)
            self.win_lo.copy_((p - w).clamp(min=0))
        self.win_k[self.bidx, :, ring] = k1[:, :, 0]
        self.win_v[self.bidx, :, ring] = v1[:, :, 0]
        self.win_pos[self.bidx, ring] = p.to(torch.int32)
        if self.scores is not None:
            self.scores[self.bidx, :, self.cs + ring] = self._zero  # a device scalar: no host copy in a graph

    def after_attend(self) -> None:
        """After the step's attention: KIVI key flush, or the leaving token's move/eviction."""
        if self.kivi:
            self._flush_keys()
        else:
            self._leave()
        self.t += 1

    def capture_blocker(self) -> str | None:
        """Why this layer's decode step is not the same device work every time (None: it is)."""
        if self.plan.max_new is None:
            return "no max_new_tokens: the kept store may have to grow"
        return None

    def _grow_to(self, need: int) -> None:
        """S holds at least `need` slots (a host bound from prompt lengths and steps; never reads the device). Only
        without max_new_tokens: with it every buffer is sized at prefill, and a slot pool's host step count (all
        its sequences' steps) bounds nothing."""
        if need > self.cs:
            self._grow(need)

    def _flush_keys(self) -> None:
        """KIVI: where R keys wait in full precision, the ring's block goes into S (kivi_key_flush)."""
        if self.plan.max_new is None:  # a host bound (else every slot was sized at prefill)
            self._grow_to(round_up(max(self.plan.n) + self.t + 1, self.cw))
        self._ops.kivi_key_flush(self.slots(), self.s_pos, self.positions().to(torch.int32), self.plan.active)

    def _leave(self) -> None:
        """The token leaving the window moves into S, competes for a slot, or is dropped (evict_write)."""
        plan = self.plan
        if plan.max_new is None:  # S may have to grow: a host bound on the slots in use after this step
            self._grow_to(max(min(c, max(0, n - w) + self.t + 1) for n, w, c in zip(plan.n, plan.w, plan.cap)))
        self._ops.evict_write(self.slots(), self.s_pos, self.scores, self.positions().to(torch.int32), plan.w32,
                              plan.cap32, plan.active, self.scored)

    @property
    def _ops(self):
        """The write kernels (Triton) or their torch references, by the cache's backend."""
        return write_ops(self.backend)

    # ---- slots (continuous batching) -------------------------------------------------------------------------
    def load_slot(self, b: int, src: "LayerStore", sb: int = 0) -> None:
        """Slot b takes sequence sb of `src` (a prefilled store of the same config, no larger): every buffer of
        the slot is overwritten or cleared, so nothing of the slot's previous sequence stays."""
        if src.cs > self.cs or src.cw > self.cw or (self.kivi and src.cw != self.cw):
            raise ValueError(f"load_slot: a sequence needing {src.cs} kept / {src.cw} ring slots does not fit a slot "
                             f"of {self.cs} / {self.cw}: size the pool for the longest prompt and max_new_tokens")
        cs, cw = src.cs, src.cw
        for name, t in self.kept.S.items():
            t[b].zero_()
            n = src.kept.S[name].shape[2]
            t[b, :, :n] = src.kept.S[name][sb]
        self.kept.s_pos[b].fill_(-1)
        self.kept.s_pos[b, :, :cs] = src.kept.s_pos[sb]
        for mine, theirs in ((self.win_k, src.win_k), (self.win_v, src.win_v)):
            mine[b].zero_()
            mine[b, :, :cw] = theirs[sb]
        self.win_pos[b].fill_(-1)
        self.win_pos[b, :cw] = src.win_pos[sb]
        for mine, theirs in ((self.win_lo, src.win_lo), (self.s_len, src.s_len), (self.sv_len, src.sv_len)):
            mine[b] = theirs[sb]
        if self.scores is not None:
            self.scores[b].zero_()
            self.scores[b, :, :cs] = src.scores[sb, :, :cs]
            self.scores[b, :, self.cs:self.cs + cw] = src.scores[sb, :, cs:]

    # ---- views and accounting --------------------------------------------------------------------------------
    def slots(self) -> KVSlots:
        return KVSlots(quant=self.quant, bits=self.bits, group_size=self.G, s_len=self.s_len, sv_len=self.sv_len,
                       win_k=self.win_k, win_v=self.win_v, win_pos=self.win_pos, win_lo=self.win_lo, **self.kept.S)

    def tensors(self) -> list[torch.Tensor]:
        """Every device tensor this layer holds."""
        ts = [self.win_k, self.win_v, self.win_pos, self.win_lo, self.s_len, self.sv_len, self.bidx, self._zero]
        ts += self.kept.tensors()
        return ts + ([self.scores] if self.scores is not None else [])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def kept_positions(self) -> list[list[list[int]]]:
        """Sorted positions held, [sequence][KV head] -> list (for tests and inspection; reads the device)."""
        win_pos, win_lo, s_pos = self.win_pos.tolist(), self.win_lo.tolist(), self.s_pos.tolist()
        s_len, out = self.s_len.tolist(), []
        for b in range(self.B):
            ring = [q for q in win_pos[b] if q >= win_lo[b]]
            if self.kivi:  # keys of positions >= s_len are read from the ring, the rest from S
                out.append([sorted(set(s_pos[b][h][: s_len[b]]) | set(ring)) for h in range(self.H)])
            else:
                out.append([sorted(s_pos[b][h][: s_len[b]] + ring) for h in range(self.H)])
        return out

    def row_bytes(self) -> list[int]:
        """Bytes of the slots each sequence uses: S slots in use and ring slots holding tokens (reads the device)."""
        return [self.bytes_held(c, n, t, w)
                for c, n, t, w in zip(self.s_len.tolist(), self.plan.n, self.plan.t_dev.tolist(), self.plan.w)]

    def bytes_held(self, s_count: int, n: int, t: int, w: int) -> int:
        """Bytes of one sequence's slots from host numbers: s_count tokens in S, n prompt tokens, t generated (in the
        cache), window w. The scheduler gets s_count and t from its lagged snapshot, so it reads nothing here."""
        per_ring = sum(x.numel() * x.element_size() for x in (self.win_k, self.win_v, self.win_pos)) / (self.B * self.cw)
        per_s = sum(x.numel() * x.element_size() for x in self.kept.tensors()) / max(1, self.B * self.cs)
        if self.scores is not None:
            per_ring += self.H * 4
            per_s += self.H * 4
        return int(s_count * per_s + self._ring_fill(n, t, w) * per_ring)

    def _ring_fill(self, n: int, t: int, w: int) -> int:
        """Ring slots holding a token (the last R positions in kivi mode, else the window)."""
        return min(n + t, self.cw if self.kivi else w)

    def _in_ring(self) -> list[int]:
        """Ring slots holding a token, per sequence."""
        return [self._ring_fill(n, t, w) for n, t, w in zip(self.plan.n, self.plan.t_dev.tolist(), self.plan.w)]

    def tokens_kept(self) -> list[int]:
        """Tokens held per sequence (S plus the valid part of the ring)."""
        if self.kivi:  # every position: keys or values of the ring's tokens may already be in S
            return [n + t for n, t in zip(self.plan.n, self.plan.t_dev.tolist())]
        return [c + r for c, r in zip(self.s_len.tolist(), self._in_ring())]
