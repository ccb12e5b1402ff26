"""Fused eviction write (Triton): one decode step of evict mode on the device, same semantics as `evict_write_ref`.

The token leaving each sequence's recent window moves into the kept store S while S has room, else (scored
policies) competes with S's tokens and replaces the lowest-scored one if it scores higher, else is dropped; the
write copies it (model dtype), encodes it as e4m3 with its (sequence, KV head)'s key / value scales (fp8: no
group to re-quantize), or encodes its value per token and its key per token or, for KIVI per-channel keys,
re-quantizes the span of unit = max(G, P) slots holding the target in registers. No host sync, no allocation:
graph-capturable.

Two launches:
- `_evict_write_kernel`, one program per (sequence b, KV head h): reads the lengths as they were before the step,
  decides (insert / compete / drop) and writes key, value, s_pos and score of its (b, h);
- `_evict_lengths_kernel`, one program per block of sequences, after it in stream order: s_len, sv_len += the
  insert flag, win_lo += the "token left" flag. So no program reads a length that another program of the same
  launch writes.
The fp32 math of the re-quantization is the reference's step for step (dequantize q * scale + mn rounded to the
model dtype, fp32 min/max, IEEE division, round half to even) and the launch turns multiply-add contraction off,
so codes, scales and mins are bit-exact against the reference (also on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstream.kernels.evict_write_ref import check_evict_args, unit_of
from kvstream.kernels.fp8_quant import fp8_quant
from kvstream.kernels.kivi_quant import _codes
from kvstream.kernels.slots import KVSlots
from kvstream.kernels.triton_util import check_device, to_dtype_rne

# exact reference arithmetic: q * scale + mn must round twice like torch's two ops, never as one FMA
_LAUNCH = {"enable_fp_fusion": False}
# S slots per tile of the competition's minimum scan (capped to the store); tests lower it to cover several tiles
CONFIG = {"block_s": 256}


@triton.jit
def _encode_token(src_row, stride_xd, codes_row, stride_cd, scale_row, mn_row, stride_qd,
                  D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, NWB: tl.constexpr):
    """Per-token KIVI encode of one D-vector: groups of G channels, codes packed along channels."""
    P: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NGB: tl.constexpr = NWB * P // G  # groups in the padded row (NWB * P >= D, a multiple of G)
    g = tl.arange(0, NGB)[:, None]
    c = g * G + tl.arange(0, G)[None, :]  # (NGB, G) channel
    valid = c < D
    x = tl.load(src_row + c * stride_xd, mask=valid, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(valid, x, float("inf")), axis=1)  # (NGB,)
    mx = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    g_in = tl.arange(0, NGB) * G < D
    mn = tl.where(g_in, mn, 0.0)
    mx = tl.where(g_in, mx, 0.0)
    q, scale, mn_q = _codes(x, valid, mn[:, None], mx[:, None], scale_row.dtype.element_ty, QMAX)
    # pack: channel c = word * P + i
    qw = tl.reshape(q, (NWB, P))
    i = tl.arange(0, P)[None, :]
    words = tl.sum(qw << (i * BITS).to(tl.uint32), axis=1).to(tl.int32, bitcast=True)  # (NWB,)
    wi = tl.arange(0, NWB)
    tl.store(codes_row + wi * stride_cd, words, mask=wi * P < D)
    gs = tl.arange(0, NGB)
    tl.store(scale_row + gs * stride_qd, tl.reshape(scale, (NGB,)), mask=g_in)
    tl.store(mn_row + gs * stride_qd, tl.reshape(mn_q, (NGB,)), mask=g_in)


@triton.jit
def _store_key_span(x, valid, kc_bh, ks_bh, km_bh, stride_kcn, stride_kcd, stride_ksn, stride_ksd, start, d0,
                    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, UNIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-channel quantize UNIT slots x (UNIT // G, G, BLOCK_D) fp32 (channels d0 + [0, BLOCK_D)) into store slots
    start + [0, UNIT) (start a multiple of UNIT): min/max per (group, channel) over `valid` members (code 0 else)."""
    P: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NGU: tl.constexpr = UNIT // G
    NWU: tl.constexpr = UNIT // P
    mn = tl.min(tl.where(valid, x, float("inf")), axis=1)  # (NGU, BLOCK_D)
    mx = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    empty = mn == float("inf")
    mn = tl.where(empty, 0.0, mn)[:, None, :]
    mx = tl.where(empty, 0.0, mx)[:, None, :]
    q, scale, mn_q = _codes(x, valid, mn, mx, ks_bh.dtype.element_ty, QMAX)
    # pack along tokens: member s = word * P + i
    qw = tl.reshape(q, (NWU, P, BLOCK_D))
    i = tl.arange(0, P)[None, :, None]
    words = tl.sum(qw << (i * BITS).to(tl.uint32), axis=1).to(tl.int32, bitcast=True)  # (NWU, BLOCK_D)
    w2 = tl.arange(0, NWU)[:, None]
    d2 = d0 + tl.arange(0, BLOCK_D)[None, :]
    tl.store(kc_bh + (start // P + w2) * stride_kcn + d2 * stride_kcd, words, mask=d2 < D)
    g = tl.arange(0, NGU)[:, None, None]
    d = d0 + tl.arange(0, BLOCK_D)[None, None, :]
    soff = (start // G + g) * stride_ksn + d * stride_ksd  # (NGU, 1, BLOCK_D)
    tl.store(ks_bh + soff, scale, mask=d < D)
    tl.store(km_bh + soff, mn_q, mask=d < D)


@triton.jit
def _requant_key_span(knew_row, stride_xd, kc_bh, ks_bh, km_bh, stride_kcn, stride_kcd, stride_ksn, stride_ksd,
                      t, n_valid, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, UNIT: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Per-channel keys: re-quantize the UNIT slots around slot t from their dequantized members, slot t replaced
    by the new key; min/max per (group, channel) over members < n_valid."""
    P: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NGU: tl.constexpr = UNIT // G
    start = (t // UNIT) * UNIT
    g = tl.arange(0, NGU)[:, None, None]
    s = start + g * G + tl.arange(0, G)[None, :, None]  # (NGU, G, 1) slot of each member of the span
    shift = ((s % P) * BITS).to(tl.uint32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)[None, None, :]
        dm = d < D
        # dequantize the span as the reference does: fp32 q * scale + mn, rounded to the model dtype
        wv = tl.load(kc_bh + (s // P) * stride_kcn + d * stride_kcd, mask=dm, other=0).to(tl.uint32, bitcast=True)
        code = ((wv >> shift) & QMAX).to(tl.float32)  # (NGU, G, BLOCK_D)
        soff = (start // G + g) * stride_ksn + d * stride_ksd  # (NGU, 1, BLOCK_D)
        sc = tl.load(ks_bh + soff, mask=dm, other=0.0).to(tl.float32)
        mo = tl.load(km_bh + soff, mask=dm, other=0.0).to(tl.float32)
        x = to_dtype_rne(code * sc + mo, ks_bh.dtype.element_ty).to(tl.float32)
        kn = tl.load(knew_row + d * stride_xd, mask=dm, other=0.0).to(tl.float32)  # (1, 1, BLOCK_D)
        x = tl.where(s == t, kn, x)
        _store_key_span(x, (s < n_valid) & dm, kc_bh, ks_bh, km_bh, stride_kcn, stride_kcd, stride_ksn, stride_ksd,
                        start, d0, D, BITS, G, UNIT, BLOCK_D)


@triton.jit
def _evict_write_kernel(
    win_k_ptr, win_v_ptr, s_len_ptr, pos_ptr, w_ptr, cap_ptr, active_ptr, s_pos_ptr, scores_ptr,
    kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr,
    Cs,
    stride_wkb, stride_wkh, stride_wkn, stride_wkd,
    stride_wvb, stride_wvh, stride_wvn, stride_wvd,
    stride_pb, stride_ph, stride_pn,
    stride_scb, stride_sch, stride_scn,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_vsb, stride_vsh, stride_vsn, stride_vsd,
    QUANT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, UNIT: tl.constexpr,
    BLOCK_D: tl.constexpr, NWB: tl.constexpr, BLOCK_S: tl.constexpr, SCORED: tl.constexpr,
    HAS_SCORES: tl.constexpr,
):
    # one program: one (sequence b, KV head h); QUANT 0 none, 1 channel, 2 token, 3 fp8
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    act = tl.load(active_ptr + b) != 0
    p = tl.load(pos_ptr + b)
    w = tl.load(w_ptr + b)
    left = p - w
    if act & (left >= 0):
        # ---- decide: insert at s_len, compete with S's lowest score, or drop
        s_len = tl.load(s_len_ptr + b)
        cap_e = tl.minimum(tl.load(cap_ptr + b), Cs)
        src = left % (w + 1)
        insert = s_len < cap_e
        t = s_len
        do = insert
        leave = 0.0
        sc_bh = scores_ptr + b * stride_scb + h * stride_sch
        if HAS_SCORES:
            leave = tl.load(sc_bh + (Cs + src) * stride_scn)
        if SCORED:
            if (s_len >= cap_e) & (cap_e > 0):
                # per-lane running minimum over S slots [0, s_len), strict < keeps the lowest slot of a tie
                lane_lo = tl.full((BLOCK_S,), float("inf"), tl.float32)
                lane_arg = tl.full((BLOCK_S,), 0, tl.int32)
                for s0 in range(0, s_len, BLOCK_S):
                    sl = s0 + tl.arange(0, BLOCK_S)
                    v = tl.load(sc_bh + sl * stride_scn, mask=sl < s_len, other=float("inf"))
                    better = v < lane_lo
                    lane_arg = tl.where(better, sl, lane_arg)
                    lane_lo = tl.where(better, v, lane_lo)
                low = tl.min(lane_lo, axis=0)
                arg = tl.min(tl.where(lane_lo == low, lane_arg, Cs), axis=0)
                t = arg
                do = leave > low
        if do:
            # ---- write key, value, position and score of slot t
            n_valid = s_len + insert.to(tl.int32)
            k_row = win_k_ptr + b * stride_wkb + h * stride_wkh + src * stride_wkn
            v_row = win_v_ptr + b * stride_wvb + h * stride_wvh + src * stride_wvn
            if QUANT == 0:
                d = tl.arange(0, BLOCK_D)
                for d0 in range(0, D, BLOCK_D):
                    dm = d0 + d < D
                    kx = tl.load(k_row + (d0 + d) * stride_wkd, mask=dm)
                    vx = tl.load(v_row + (d0 + d) * stride_wvd, mask=dm)
                    tl.store(kc_ptr + b * stride_kcb + h * stride_kch + t * stride_kcn + (d0 + d) * stride_kcd, kx,
                             mask=dm)
                    tl.store(vc_ptr + b * stride_vcb + h * stride_vch + t * stride_vcn + (d0 + d) * stride_vcd, vx,
                             mask=dm)
            elif QUANT == 3:
                # fp8: e4m3 codes with the (b, h)'s key and value scales (set at prefill), saturating
                k_sc = tl.load(ks_ptr + b * stride_ksb + h * stride_ksh)
                v_sc = tl.load(vs_ptr + b * stride_vsb + h * stride_vsh)
                d = tl.arange(0, BLOCK_D)
                for d0 in range(0, D, BLOCK_D):
                    dm = d0 + d < D
                    kx = tl.load(k_row + (d0 + d) * stride_wkd, mask=dm, other=0.0).to(tl.float32)
                    vx = tl.load(v_row + (d0 + d) * stride_wvd, mask=dm, other=0.0).to(tl.float32)
                    tl.store(kc_ptr + b * stride_kcb + h * stride_kch + t * stride_kcn + (d0 + d) * stride_kcd,
                             fp8_quant(kx, k_sc), mask=dm)
                    tl.store(vc_ptr + b * stride_vcb + h * stride_vch + t * stride_vcn + (d0 + d) * stride_vcd,
                             fp8_quant(vx, v_sc), mask=dm)
            else:
                if QUANT == 1:
                    ks_bh = b * stride_ksb + h * stride_ksh
                    _requant_key_span(k_row, stride_wkd, kc_ptr + b * stride_kcb + h * stride_kch, ks_ptr + ks_bh,
                                      km_ptr + ks_bh, stride_kcn, stride_kcd, stride_ksn, stride_ksd, t, n_valid,
                                      D, BITS, G, UNIT, BLOCK_D)
                else:
                    ksoff = b * stride_ksb + h * stride_ksh + t * stride_ksn
                    _encode_token(k_row, stride_wkd, kc_ptr + b * stride_kcb + h * stride_kch + t * stride_kcn,
                                  stride_kcd, ks_ptr + ksoff, km_ptr + ksoff, stride_ksd, D, BITS, G, NWB)
                vsoff = b * stride_vsb + h * stride_vsh + t * stride_vsn
                _encode_token(v_row, stride_wvd, vc_ptr + b * stride_vcb + h * stride_vch + t * stride_vcn,
                              stride_vcd, vs_ptr + vsoff, vm_ptr + vsoff, stride_vsd, D, BITS, G, NWB)
            tl.store(s_pos_ptr + b * stride_pb + h * stride_ph + t * stride_pn, left)
            if HAS_SCORES:
                tl.store(sc_bh + t * stride_scn, leave)


@triton.jit
def _evict_lengths_kernel(s_len_ptr, sv_len_ptr, win_lo_ptr, pos_ptr, w_ptr, cap_ptr, active_ptr, B, Cs,
                          BLOCK_B: tl.constexpr):
    # one program: BLOCK_B sequences; each reads and writes only its own entries
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    m = b < B
    act = tl.load(active_ptr + b, mask=m, other=0) != 0
    left = tl.load(pos_ptr + b, mask=m, other=0) - tl.load(w_ptr + b, mask=m, other=0)
    s_len = tl.load(s_len_ptr + b, mask=m, other=0)
    go = act & (left >= 0)
    ins = (go & (s_len < tl.minimum(tl.load(cap_ptr + b, mask=m, other=0), Cs))).to(tl.int32)
    tl.store(s_len_ptr + b, s_len + ins, mask=m)
    tl.store(sv_len_ptr + b, tl.load(sv_len_ptr + b, mask=m, other=0) + ins, mask=m)
    tl.store(win_lo_ptr + b, tl.load(win_lo_ptr + b, mask=m, other=0) + go.to(tl.int32), mask=m)


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    """n strides of t (0 for missing trailing dimensions: fp8's (B, H, 1) scales)."""
    return (tuple(t.stride()) + (0,) * n)[:n] if t is not None else (0,) * n


def evict_write(slots: KVSlots, s_pos: torch.Tensor, scores: torch.Tensor | None, pos: torch.Tensor,
                w: torch.Tensor, cap: torch.Tensor, active: torch.Tensor, scored: bool) -> None:
    """One decode step's eviction write on the device, in place (semantics: `kernels.evict_write_ref`).

    slots: KVSlots (quant "none" | "fp8" | "channel" | "token"); win_k, win_v (B, H, Cw, D) model dtype; s_len,
        sv_len, win_lo (B,) int32 (updated by the second launch); S tensors of the quant, Cs slots: "none" s_k, s_v
        (B, H, Cs, D); "fp8" s_k, s_v (B, H, Cs, D) uint8 e4m3 codes, s_ks, s_vs (B, H, 1) float32; "channel"
        s_kc (B, H, Cs // P, D) int32, s_ks, s_km (B, H, Cs // G, D), Cs a multiple of max(G, P); "token" s_kc
        (B, H, Cs, ceil(D / P)) int32, s_ks, s_km (B, H, Cs, D // G); quantized values s_vc (B, H, Cs, ceil(D / P))
        int32, s_vs, s_vm (B, H, Cs, D // G). P = 32 // bits; D a multiple of G.
    s_pos (B, H, Cs) int32; scores (B, H, Cs + Cw) float32 or None (index s: S slot s, Cs + r: ring slot r).
    pos (B,) int32: position of the token appended this step (ring slot pos % (w + 1)); w (B,) int32: the recent
        window (w + 1 <= Cw, not checked: it would need a host read); cap (B,) int32: S slots the sequence may use
        (clamped to Cs); active (B,) bool.
    scored: the policy ranks by score (h2o, keyformer); needs scores.
    Two launches, no host sync, no allocation (graph-capturable).
    """
    name = "evict_write"
    check_evict_args(name, slots, s_pos, scores, pos, w, cap, active, scored)
    check_device(name, slots.win_k)
    B, H, Cw, D = slots.win_k.shape
    Cs = slots.cs
    if B == 0:
        return
    quant = {"none": 0, "channel": 1, "token": 2, "fp8": 3}[slots.quant]
    grouped = quant in (1, 2)  # KIVI codes with groups of G and P codes per int32 word
    bits = slots.bits if grouped else 16
    G = slots.group_size if grouped else 1
    P = 32 // bits if grouped else 1
    if grouped:
        if slots.s_ks.stride() != slots.s_km.stride() or slots.s_vs.stride() != slots.s_vm.stride():
            raise ValueError(f"{name}: the scale and min stores must have the same strides")
        kc, ks, km, vc, vs, vm = slots.s_kc, slots.s_ks, slots.s_km, slots.s_vc, slots.s_vs, slots.s_vm
    elif quant == 3:  # e4m3 codes, one key and one value scale per (sequence, KV head); no mins
        kc, ks, km, vc, vs, vm = slots.s_k, slots.s_ks, slots.s_ks, slots.s_v, slots.s_vs, slots.s_vs
    else:
        kc, ks, km, vc, vs, vm = slots.s_k, slots.s_k, slots.s_k, slots.s_v, slots.s_v, slots.s_v
    if H > 0 and Cs > 0:
        unit = unit_of(slots)
        block_d = min(triton.next_power_of_2(D), 64) if quant != 1 else min(triton.next_power_of_2(D),
                                                                            max(16, 2048 // unit))
        nwb = triton.next_power_of_2(-(-D // P)) if grouped else 1
        sc = scores if scores is not None else s_pos
        _evict_write_kernel[(B, H)](
            slots.win_k, slots.win_v, slots.s_len, pos, w, cap, active.view(torch.int8), s_pos, sc,
            kc, ks, km, vc, vs, vm, Cs,
            *slots.win_k.stride(), *slots.win_v.stride(), *s_pos.stride(), *sc.stride(),
            *_strides(kc, 4), *_strides(ks, 4), *_strides(vc, 4), *_strides(vs, 4),
            QUANT=quant, BITS=bits, G=G, D=D, UNIT=unit, BLOCK_D=block_d, NWB=nwb,
            BLOCK_S=min(max(triton.next_power_of_2(Cs), 16), CONFIG["block_s"]), SCORED=bool(scored),
            HAS_SCORES=scores is not None, **_LAUNCH,
        )
    block_b = min(max(triton.next_power_of_2(B), 16), 1024)
    _evict_lengths_kernel[(triton.cdiv(B, block_b),)](
        slots.s_len, slots.sv_len, slots.win_lo, pos, w, cap, active.view(torch.int8), B, Cs, BLOCK_B=block_b,
    )
