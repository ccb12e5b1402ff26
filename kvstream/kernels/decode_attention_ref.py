"""Torch reference of decode attention over compressed storage, with the scores eviction needs.

One new query token per sequence attends to every token held in `KVSlots` (S dequantized, then the ring),
with one softmax across both. Optionally it adds into `scores_acc` what eviction needs, summed over the query
heads that share each KV head:
- score_mode 1 (H2O): the softmax probability of every held token;
- score_mode 2 (Keyformer): softmax_j((x_j + g_j) / tau), x_j the scaled logit, g_j Gumbel(0, 1) noise from
  `kernels.gumbel_ref.gumbel(seed[b], layer, step, q_head, 0, col)`, col = the score index (S slot, or Cs + ring slot).
The attention output always uses the ordinary softmax without noise.
"""

from __future__ import annotations

import torch

from kvstream.kernels.fp8_quant_ref import fp8_decode
from kvstream.kernels.gumbel_ref import gumbel
from kvstream.kernels.kivi_quant_ref import dequantize_keys, dequantize_values
from kvstream.kernels.slots import KVSlots


def dequantize_store(slots: KVSlots) -> tuple[torch.Tensor, torch.Tensor]:
    """S region as full tensors (B, H, Cs, D) in the model dtype (values of slots >= sv_len read from the ring)."""
    dtype = slots.win_k.dtype
    if slots.quant == "none":
        ks, vs = slots.s_k, slots.s_v
    elif slots.quant == "fp8":  # one scale per (sequence, KV head): (B, H, 1) -> (B, H, 1, 1)
        ks = fp8_decode(slots.s_k, slots.s_ks.unsqueeze(-1), dtype)
        vs = fp8_decode(slots.s_v, slots.s_vs.unsqueeze(-1), dtype)
    else:
        b, g = slots.bits, slots.group_size
        if slots.quant == "channel":
            ks = dequantize_keys(slots.s_kc, slots.s_ks, slots.s_km, b, g)
        else:
            ks = dequantize_values(slots.s_kc, slots.s_ks, slots.s_km, b, g)
        vs = dequantize_values(slots.s_vc, slots.s_vs, slots.s_vm, b, g)
    ks, vs = ks.to(dtype), vs.to(dtype)
    cs, cw = ks.shape[2], slots.cw
    if cs and cw:
        idx = torch.arange(cs, device=ks.device)
        from_ring = idx.view(1, -1) >= slots.sv_len.view(-1, 1).long()  # (B, Cs)
        ring_v = slots.win_v.index_select(2, idx % cw)  # (B, H, Cs, D)
        vs = torch.where(from_ring[:, None, :, None], ring_v, vs)
    return ks, vs


def held_mask(slots: KVSlots) -> torch.Tensor:
    """(B, Cs + Cw) bool: which score indices hold a token."""
    dev = slots.win_k.device
    s_valid = torch.arange(slots.cs, device=dev).view(1, -1) < slots.s_len.view(-1, 1).long()
    w_valid = slots.win_pos.long() >= slots.win_lo.view(-1, 1).long()
    return torch.cat([s_valid, w_valid], dim=1)


def decode_attention_ref(
    q: torch.Tensor,
    slots: KVSlots,
    scale: float,
    score_mode: int = 0,
    scores_acc: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    layer: int = 0,
    step: int | torch.Tensor = 0,
    tau: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """q (B, Hq, D) model dtype -> out (B, Hq, D) model dtype. scores_acc (B, H, Cs + Cw) float32, added into
    in place when score_mode > 0; seed (B,) int64 for score_mode 2; step, tau: numbers or tensors of 1 or B values."""
    B, Hq, D = q.shape
    H = slots.win_k.shape[1]
    grp = Hq // H
    ks, vs = dequantize_store(slots)
    K = torch.cat([ks, slots.win_k], dim=2).float()  # (B, H, N, D)
    V = torch.cat([vs, slots.win_v], dim=2).float()
    valid = held_mask(slots)  # (B, N)
    qg = q.float().view(B, H, grp, D)
    x = torch.einsum("bhgd,bhnd->bhgn", qg, K) * scale  # (B, H, grp, N)
    x = x.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(x, dim=-1)
    out = torch.einsum("bhgn,bhnd->bhgd", p, V).reshape(B, Hq, D).to(q.dtype)
    if score_mode and scores_acc is not None:
        if score_mode == 1:
            f = p
        else:
            N = x.shape[-1]
            heads = torch.arange(Hq, device=q.device).view(1, H, grp, 1)
            cols = torch.arange(N, device=q.device).view(1, 1, 1, N)
            if isinstance(step, torch.Tensor):  # 1 value for the batch or one per sequence
                step = step.view(-1, 1, 1, 1)
            if isinstance(tau, torch.Tensor):
                tau = tau.view(-1, 1, 1, 1)
            g = gumbel(seed.view(B, 1, 1, 1), layer, step, heads, 0, cols)
            f = torch.softmax((x + g) / tau, dim=-1)
        scores_acc += torch.where(valid[:, None, :], f.sum(2), 0.0)
    return out
