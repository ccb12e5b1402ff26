"""Torch reference of KIVI's residual moves on the device (`kernels.kivi_residual`): policy full + kivi2/kivi4.

S slot = position. The ring holds the last R tokens in full precision (ring slot of position p is p % R, Cw = R).
Per decode step, with pos[b] the position of the token being decoded:
- `kivi_value_exit`, before the new token is written into the ring (it takes the ring slot of position pos - R):
  when t = pos[b] - R >= 0, the value of position t leaves ring slot t % R into S slot t (per-token encode) and
  sv_len[b] = t + 1;
- `kivi_key_flush`, after the step's attention (which used the newest key in full precision): when
  pos[b] + 1 - s_len[b] >= R, the ring's R keys (ring slot i holds position s_len + i, s_len being a multiple of
  R) are quantized per channel into S slots [s_len, s_len + R), s_pos there = the positions, s_len += R and
  win_lo = s_len.
The semantics of the host-planned KIVI path they replaced (checked against it before it was deleted), with
every decision on the device; inactive sequences do nothing. A move that does not fit in S's Cs slots is skipped
(LayerStore sizes S for the whole generation, or grows it before the step without max_new_tokens).
"""

from __future__ import annotations

import torch

from kvstream.kernels.evict_write_ref import _put, check_tensors
from kvstream.kernels.kivi_quant_ref import quantize_keys, quantize_values
from kvstream.kernels.slots import KVSlots


def check_kivi_args(name: str, slots: KVSlots, s_pos, pos, active) -> None:
    """Shapes, dtypes and devices of a KIVI residual move's arguments; a clear ValueError naming what is wrong."""
    if slots.quant != "channel":
        raise ValueError(f"{name}: KIVI mode stores keys per channel (quant 'channel'), got {slots.quant!r}")
    B, H, R, D = slots.win_k.shape
    Cs, dev, dt = slots.cs, slots.win_k.device, slots.win_k.dtype
    bits, G = slots.bits, slots.group_size
    if bits not in (2, 4):
        raise ValueError(f"{name}: bits={bits} is not supported; use 2 or 4")
    P = 32 // bits
    if G < 1 or G & (G - 1) or D % G:
        raise ValueError(f"{name}: group_size={G} must be a power of two dividing head_dim {D}")
    if R % G or R % P or Cs % R:
        raise ValueError(f"{name}: the residual R = Cw = {R} must be a multiple of group_size {G} and of {P} "
                         f"(32 // bits), and Cs={Cs} a multiple of R")
    wd = -(-D // P)
    want = {"win_v": (slots.win_v, (B, H, R, D), dt), "pos": (pos, (B,), torch.int32),
            "active": (active, (B,), torch.bool), "s_len": (slots.s_len, (B,), torch.int32),
            "sv_len": (slots.sv_len, (B,), torch.int32), "win_lo": (slots.win_lo, (B,), torch.int32),
            "s_kc": (slots.s_kc, (B, H, Cs // P, D), torch.int32), "s_ks": (slots.s_ks, (B, H, Cs // G, D), dt),
            "s_km": (slots.s_km, (B, H, Cs // G, D), dt), "s_vc": (slots.s_vc, (B, H, Cs, wd), torch.int32),
            "s_vs": (slots.s_vs, (B, H, Cs, D // G), dt), "s_vm": (slots.s_vm, (B, H, Cs, D // G), dt)}
    if s_pos is not None:
        want["s_pos"] = (s_pos, (B, H, Cs), torch.int32)
    check_tensors(name, want, dev)


def kivi_value_exit(slots: KVSlots, pos: torch.Tensor, active: torch.Tensor) -> None:
    """The value R positions old leaves the ring into S (module docstring), in place.

    slots: KVSlots quant "channel"; win_v (B, H, R, D) model dtype; s_vc (B, H, Cs, ceil(D / P)) int32, s_vs, s_vm
        (B, H, Cs, D // G); sv_len (B,) int32 (updated).
    pos (B,) int32: position of the token being decoded; active (B,) bool.
    """
    check_kivi_args("kivi_value_exit_ref", slots, None, pos, active)
    B, H, R, D = slots.win_v.shape
    Cs = slots.cs
    t = pos - R  # (B,) int32
    go = active & (t >= 0) & (t < Cs)
    src = torch.remainder(t, R).long().view(B, 1, 1, 1).expand(B, H, 1, D)
    v = slots.win_v.gather(2, src)  # (B, H, 1, D)
    idx = t.clamp(0, max(Cs - 1, 0)).long().view(B, 1, 1).expand(B, H, 1)
    do = go.view(B, 1).expand(B, H)
    if Cs > 0:
        for buf, q in zip((slots.s_vc, slots.s_vs, slots.s_vm), quantize_values(v, slots.bits, slots.group_size)):
            _put(buf, idx, q, do)
    slots.sv_len.copy_(torch.where(go, t + 1, slots.sv_len))


def kivi_key_flush(slots: KVSlots, s_pos: torch.Tensor, pos: torch.Tensor, active: torch.Tensor) -> None:
    """The ring's R keys into S when R wait in full precision (module docstring), in place.

    slots: KVSlots quant "channel"; win_k (B, H, R, D) model dtype; s_kc (B, H, Cs // P, D) int32, s_ks, s_km
        (B, H, Cs // G, D); s_len, win_lo (B,) int32 (updated). s_pos (B, H, Cs) int32 (updated).
    pos (B,) int32: position of the token decoded this step; active (B,) bool.
    """
    check_kivi_args("kivi_key_flush_ref", slots, s_pos, pos, active)
    B, H, R, D = slots.win_k.shape
    Cs, P, G, dev = slots.cs, 32 // slots.bits, slots.group_size, slots.win_k.device
    s_len = slots.s_len
    go = active & (pos + 1 - s_len >= R) & (s_len + R <= Cs)  # (B,)
    if Cs > 0:
        kc, ksc, kmn = quantize_keys(slots.win_k, slots.bits, G)  # ring slot i = position s_len + i
        start = torch.where(go, s_len, 0).long().view(B, 1, 1)
        do = go.view(B, 1).expand(B, H)
        rows = lambda n, per: (start // per + torch.arange(n, device=dev)).expand(B, H, n)  # noqa: E731
        _put(slots.s_kc, rows(R // P, P), kc, do)
        _put(slots.s_ks, rows(R // G, G), ksc, do)
        _put(slots.s_km, rows(R // G, G), kmn, do)
        slot = rows(R, 1)
        _put(s_pos, slot, slot.to(torch.int32), do)
    new_len = s_len + go.to(torch.int32) * R
    slots.win_lo.copy_(torch.where(go, new_len, slots.win_lo))
    s_len.copy_(new_len)
