"""Torch reference of the fused eviction write (`kvstream.kernels.evict_write`): one decode step of evict mode.

After a decode step's attention, the token leaving each sequence's recent window either moves into the kept
store S, competes with S's tokens (the lowest accumulated score is evicted), or is dropped. The semantics of the
host-planned path it replaced (checked against it before that path was deleted), decided on the device: every
step is a vectorized torch op over the batch, no host read, no Python branch on tensor values. It is what the
torch backend (the CPU engine) runs, and the Triton kernel is tested against it.

Per sequence b (left = pos[b] - w[b], the position leaving the window; its ring slot src = left % (w[b] + 1)):
- nothing when left < 0 or not active[b];
- insert into S slot t = s_len[b] when s_len[b] < min(cap[b], Cs) (all heads), then s_len, sv_len += 1;
- else, when `scored` and min(cap[b], Cs) > 0, per KV head h: (low, arg) = min over S slots [0, s_len[b]) of
  scores[b, h, :] (ties: the lowest slot); the leaving token replaces slot arg iff its score > low;
- else (window / sink policies, cap 0): dropped;
- and win_lo[b] += 1 (the token left the window).
A write sets the key (quant "none": copy; "fp8": e4m3 encode with the (sequence, KV head)'s key scale, set at
prefill, saturating; "token": per-token encode; "channel": re-quantization of the span of
unit = max(G, P) slots holding the target from its dequantized members with the target replaced by the new key,
min/max per channel over members < n_valid = s_len after the write), the value (per-token encode; fp8: with the
value scale), s_pos = left
and, with scores, scores[b, h, t] = the leaving token's score.
The capacity clamp min(cap, Cs) only matters when S was sized below the budget (LayerStore grows S before the
step then, without max_new_tokens).
"""

from __future__ import annotations

import torch

from kvstream.kernels.fp8_quant_ref import fp8_encode
from kvstream.kernels.kivi_quant_ref import dequantize_keys, quantize_keys, quantize_values
from kvstream.kernels.slots import KVSlots

QUANTS = ("none", "fp8", "channel", "token")


def unit_of(slots: KVSlots) -> int:
    """Slots re-quantized together when one key is written: max(G, P) for per-channel keys, else 1."""
    return max(slots.group_size, 32 // slots.bits) if slots.quant == "channel" else 1


def check_evict_args(name: str, slots: KVSlots, s_pos, scores, pos, w, cap, active, scored: bool) -> None:
    """Shapes, dtypes and devices of an eviction write's arguments; a clear ValueError naming what is wrong."""
    if slots.quant not in QUANTS:
        raise ValueError(f"{name}: quant {slots.quant!r} is not one of {', '.join(QUANTS)}")
    B, H, Cw, D = slots.win_k.shape
    Cs, dev = slots.cs, slots.win_k.device
    if tuple(slots.win_v.shape) != (B, H, Cw, D) or slots.win_v.dtype != slots.win_k.dtype:
        raise ValueError(f"{name}: win_v {tuple(slots.win_v.shape)} {slots.win_v.dtype} must match win_k "
                         f"{(B, H, Cw, D)} {slots.win_k.dtype}")
    want = {"pos": (pos, (B,), torch.int32), "w": (w, (B,), torch.int32), "cap": (cap, (B,), torch.int32),
            "active": (active, (B,), torch.bool), "s_len": (slots.s_len, (B,), torch.int32),
            "sv_len": (slots.sv_len, (B,), torch.int32), "win_lo": (slots.win_lo, (B,), torch.int32),
            "s_pos": (s_pos, (B, H, Cs), torch.int32)}
    if scored and scores is None:
        raise ValueError(f"{name}: scored=True needs the scores (B, H, Cs + Cw) float32 tensor")
    if scores is not None:
        want["scores"] = (scores, (B, H, Cs + Cw), torch.float32)
    dt = slots.win_k.dtype
    if slots.quant == "none":
        want.update(s_k=(slots.s_k, (B, H, Cs, D), dt), s_v=(slots.s_v, (B, H, Cs, D), dt))
    elif slots.quant == "fp8":
        want.update(s_k=(slots.s_k, (B, H, Cs, D), torch.uint8), s_v=(slots.s_v, (B, H, Cs, D), torch.uint8),
                    s_ks=(slots.s_ks, (B, H, 1), torch.float32), s_vs=(slots.s_vs, (B, H, 1), torch.float32))
    else:
        bits, G = slots.bits, slots.group_size
        if bits not in (2, 4):
            raise ValueError(f"{name}: bits={bits} is not supported; use 2 or 4")
        if G < 1 or G & (G - 1):
            raise ValueError(f"{name}: group_size={G} must be a power of two")
        if D % G:
            raise ValueError(f"{name}: head_dim {D} is not a multiple of group_size {G} (per-token values)")
        P = 32 // bits
        wd = -(-D // P)
        if slots.quant == "channel":
            if Cs % unit_of(slots):
                raise ValueError(f"{name}: Cs={Cs} must be a multiple of max(group_size, 32 // bits) = "
                                 f"{unit_of(slots)} for per-channel keys")
            want.update(s_kc=(slots.s_kc, (B, H, Cs // P, D), torch.int32), s_ks=(slots.s_ks, (B, H, Cs // G, D), dt),
                        s_km=(slots.s_km, (B, H, Cs // G, D), dt))
        else:
            want.update(s_kc=(slots.s_kc, (B, H, Cs, wd), torch.int32), s_ks=(slots.s_ks, (B, H, Cs, D // G), dt),
                        s_km=(slots.s_km, (B, H, Cs, D // G), dt))
        want.update(s_vc=(slots.s_vc, (B, H, Cs, wd), torch.int32), s_vs=(slots.s_vs, (B, H, Cs, D // G), dt),
                    s_vm=(slots.s_vm, (B, H, Cs, D // G), dt))
    check_tensors(name, want, dev, f" (quant {slots.quant!r} needs it)")


def check_tensors(name: str, want: dict, dev, missing: str = "") -> None:
    """Each {label: (tensor, shape, dtype)} present with that shape and dtype on `dev`; else a ValueError naming it."""
    for label, (t, shape, dtype) in want.items():
        if t is None:
            raise ValueError(f"{name}: {label} is missing{missing}")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != dev:
            raise ValueError(f"{name}: {label} is {tuple(t.shape)} {t.dtype} on {t.device}; expected "
                             f"{tuple(shape)} {dtype} on {dev}")


def _put(buf: torch.Tensor, idx: torch.Tensor, new: torch.Tensor, do: torch.Tensor) -> None:
    """buf[b, h, idx[b, h, i]] = new[b, h, i] where do[b, h]; idx (B, H, L) int64, new (B, H, L, ...)."""
    tail = buf.shape[3:]
    gidx = idx.view(*idx.shape, *([1] * len(tail))).expand(*idx.shape, *tail)
    mask = do.view(*do.shape, *([1] * (new.dim() - 2)))
    buf.scatter_(2, gidx, torch.where(mask, new.to(buf.dtype), buf.gather(2, gidx)))


def _write_key_span(slots: KVSlots, tgt: torch.Tensor, do: torch.Tensor, k: torch.Tensor, n_valid: torch.Tensor):
    """Per-channel keys: re-quantize the unit-slot span around tgt (B, H) with k (B, H, D) at tgt."""
    L, P, G, bits, D = unit_of(slots), 32 // slots.bits, slots.group_size, slots.bits, k.shape[-1]
    dev = k.device
    start = (tgt // L) * L  # (B, H)
    members = start.unsqueeze(-1) + torch.arange(L, device=dev)  # (B, H, L)
    widx = (start // P).unsqueeze(-1) + torch.arange(L // P, device=dev)
    gidx = (start // G).unsqueeze(-1) + torch.arange(L // G, device=dev)
    gat = lambda t, i: t.gather(2, i.unsqueeze(-1).expand(*i.shape, D))  # noqa: E731
    span = dequantize_keys(gat(slots.s_kc, widx), gat(slots.s_ks, gidx), gat(slots.s_km, gidx), bits, G)
    hit = (members == tgt.unsqueeze(-1)).unsqueeze(-1)
    span = torch.where(hit, k.unsqueeze(2).to(span.dtype), span)
    kc, ksc, kmn = quantize_keys(span, bits, G, valid=members < n_valid.view(-1, 1, 1))
    _put(slots.s_kc, widx, kc, do)
    _put(slots.s_ks, gidx, ksc, do)
    _put(slots.s_km, gidx, kmn, do)


def evict_write(slots: KVSlots, s_pos: torch.Tensor, scores: torch.Tensor | None, pos: torch.Tensor,
                w: torch.Tensor, cap: torch.Tensor, active: torch.Tensor, scored: bool) -> None:
    """One decode step's eviction write, in place (semantics in the module docstring).

    slots: KVSlots (quant "none" | "fp8" | "channel" | "token"); win_k, win_v (B, H, Cw, D) model dtype; s_len,
        sv_len, win_lo (B,) int32 (updated); the S tensors of the quant (layouts in `kernels.slots`), Cs slots.
    s_pos (B, H, Cs) int32; scores (B, H, Cs + Cw) float32 or None (index s: S slot s, Cs + r: ring slot r).
    pos (B,) int32: position of the token appended this step (ring slot pos % (w + 1)); w (B,) int32: the
        recent window (w + 1 <= Cw); cap (B,) int32: S slots the sequence may use; active (B,) bool.
    scored: the policy ranks by score (h2o, keyformer); needs scores.
    """
    check_evict_args("evict_write_ref", slots, s_pos, scores, pos, w, cap, active, scored)
    B, H, Cw, D = slots.win_k.shape
    Cs = slots.cs
    left = pos - w  # (B,) int32
    go = active & (left >= 0)
    src = torch.remainder(left, w + 1).long()  # (B,) ring slot of the leaving token
    s_len = slots.s_len
    cap_e = cap.clamp(max=Cs)
    insert = go & (s_len < cap_e)  # (B,)
    do = insert.view(B, 1).expand(B, H)
    tgt = s_len.long().view(B, 1).expand(B, H)
    gsrc = src.view(B, 1, 1, 1).expand(B, H, 1, D)
    k = slots.win_k.gather(2, gsrc).squeeze(2)  # (B, H, D)
    v = slots.win_v.gather(2, gsrc).squeeze(2)
    leave = None
    if scores is not None:
        leave = scores.gather(2, (Cs + src).view(B, 1, 1).expand(B, H, 1)).squeeze(2)  # (B, H)
        if scored and Cs > 0:
            compete = (go & ~insert & (cap_e > 0)).view(B, 1)
            in_use = torch.arange(Cs, device=s_len.device).view(1, 1, Cs) < s_len.view(B, 1, 1)
            low, arg = torch.where(in_use, scores[:, :, :Cs], torch.inf).min(-1)  # (B, H)
            tgt = torch.where(compete, arg, tgt)
            do = do | (compete & (leave > low))
    if Cs > 0:
        tgt = tgt.clamp(max=Cs - 1)
        idx = tgt.unsqueeze(-1)  # (B, H, 1)
        if slots.quant == "none":
            _put(slots.s_k, idx, k.unsqueeze(2), do)
            _put(slots.s_v, idx, v.unsqueeze(2), do)
        elif slots.quant == "fp8":  # scales (B, H, 1) broadcast over the token's D channels
            _put(slots.s_k, idx, fp8_encode(k, slots.s_ks).unsqueeze(2), do)
            _put(slots.s_v, idx, fp8_encode(v, slots.s_vs).unsqueeze(2), do)
        else:
            if slots.quant == "token":
                for t, q in zip((slots.s_kc, slots.s_ks, slots.s_km), quantize_values(k.unsqueeze(2), slots.bits,
                                                                                       slots.group_size)):
                    _put(t, idx, q, do)
            else:
                _write_key_span(slots, tgt, do, k, s_len + insert.to(s_len.dtype))
            for t, q in zip((slots.s_vc, slots.s_vs, slots.s_vm), quantize_values(v.unsqueeze(2), slots.bits,
                                                                                   slots.group_size)):
                _put(t, idx, q, do)
        _put(s_pos, idx, left.view(B, 1, 1).expand(B, H, 1), do)
        if leave is not None:
            _put(scores, idx, leave.unsqueeze(-1), do)
    # lengths last: every decision above read the old s_len
    ins = insert.to(torch.int32)
    slots.s_len += ins
    slots.sv_len += ins
    slots.win_lo += go.to(torch.int32)
