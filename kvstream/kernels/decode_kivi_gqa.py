"""Stage 1 of `kernels.decode_attention` for KIVI storage with several query heads per KV head (GQA), on CUDA cores.

`kernels.decode_kivi` runs GQA on the tensor cores, but Triton stages every dequantized operand of an MMA through
shared memory (its profile on an H200: short-scoreboard stalls, 39% issue). Here, as in `kernels.decode_kivi_cc`
for one query head, a code is decoded once in registers (one LOP3 and one FADD, `decode_kivi._codes`) and used
by the GP query heads of its KV head in GP multiply-adds (GP = GRP to the next power of two; padding heads are
masked), never moved between threads. Same contract as the other stage 1s (one program per (sequence, KV head,
split); partial acc / (max, sum) per query head in natural units). H200, 8 KV heads, 2 bits: 1.35-1.73x faster
than `kernels.decode_kivi` with fp16x2 sums (H2), 1.24-1.45x with fp32 sums; 4 bits: a tie without L2 prefetch
(-6..+22% across runs), 1.03-1.24x faster with it (`jobs/bench_kernels.py`, README "Kernel benchmark").
- A tile is W word rows of P = 32 // BITS tokens (BLOCK_N = W * P). Keys: each word row has DQ lanes; in chunk i
  lane dq reads channel i * DQ + dq of its row (the row's lanes read one 4 * DQ-byte run), that channel's scale
  and min, and q of the GP heads there, and adds code * (q * scale) into (GP, P) partial logits: one multiply-add
  chain per (head, token), finished by a DQ-lane shuffle reduction. 2**(BITS j) comes out once per token, the
  min as q . min once per row. The chunks run in a loop of KU unrolled chunks per iteration, and the value
  phase in a loop over 4 parts: a fully unrolled tile (~9,000 instructions, 144 KB) stalled on instruction
  fetch for half its cycles (ncu). q is read again each tile (L1 hits): hoisted out of the tile loop by the
  compiler it held GP * D / DQ registers and spilled.
- Values: each token's D // P code words are read by D // P lanes, one word each (row r: token r // (D // P) of
  the round, word r % (D // P)). The tile's probabilities are split in registers into 4 parts (tokens 4 u + o),
  each part moved to the value layout by one shared-memory exchange and consumed round by round
  (`decode_kivi_cc._pv_tree`: a multiply-add chain under every Triton version); p * scale is one multiply per
  (head, word) and the P.V sum stays in a (GP, P) per-thread accumulator (code units), summed over the rows once
  per split.
- Registers: the (GP, P) key partials and the (GP, P) value accumulator are live together, so `gqa_supported`
  takes GP * P <= 64 (4 heads with 2 bits, 8 with 4 bits); larger groups go to `kernels.decode_kivi`.
- Loads whose address runs contiguous along the row index (one word per lane, lanes side by side) carry a
  contiguity hint of 1: left alone, Triton's coalescing would give each thread several rows (a 16-byte vector)
  and every per-row tensor the same shape, multiplying the accumulators.
- One online softmax per query head, lazily rescaled (the running max moves only when a tile's max passes it by
  more than 8 in log2 units); log2 units inside.
- H2 (fp16x2 sums; the default for bf16 / fp16 queries), as in `kernels.decode_kivi_cc`: a pair of codes is
  decoded once (one LOP3, one HFMA2) and multiplied into the GP heads' fp16x2 sums (GP HFMA2): (1 + GP) / 2
  instructions per element instead of 2 + GP (local sm_90 compile, Triton 3.6, 2 bits, 4 heads: 6,400 -> 4,900
  instructions per tile and thread). Keys: a lane's 32 channels of a tile summed in fp16, values: a row's 32 tokens
  (p * scale times 2**-8), then fp32; output within 5.7-6.8e-3 relative of the fp32 sums (H200), about two bf16
  ulps, far below the 2-bit quantization's own error.
- L2 prefetch (PF tiles ahead, `decode_kivi_cc.prefetch_tile`), as in `kernels.decode_kivi_cc`.
- QT: q read from a heads-last copy (B, H, D, GP) that decode_attention makes each call (`qt_default`: after
  Triton 3.6, whose successors lay q's original (rows, heads, 1) load out with the heads across lanes).
Slots in [sv_len, s_len) (quantized key, value still in the full-precision FIFO) and the ring are read after the
main loop on the tensor cores, 16 rows (head g on row 16 // GP * g, padding rows between with q = 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvstream.kernels.decode_kivi import _LAZY, _codes, _online_dot, _place
from kvstream.kernels.decode_kivi_cc import _h2_flush, _h2_unpair, _pv_tree, prefetch_tile
from kvstream.kernels.triton_util import LN2 as _LN2
from kvstream.kernels.triton_util import LOG2E as _LOG2E
from kvstream.kernels.triton_util import MASKED as _MASKED
from kvstream.kernels.triton_util import (dot, h2_codes, h2_decode, h2_fma, h2_place, h2_splat, h2_split, ring_tile,
                                 split_bounds, triton_version)

GQA_MAX_CODES = 64  # GP * P: key partials and value accumulators per thread (each GP * P fp32 registers)


@triton.jit
def _pv_part(acc_v, acc_m, ph, t_first, s_q, vptr, vsptr, vmptr, stride_vsn, rk, vword, vgrp, shp3, maskp3, ha3,
             hc3, R: tl.constexpr, GP: tl.constexpr, NWT: tl.constexpr, TR: tl.constexpr, NR: tl.constexpr,
             NPART: tl.constexpr, H2: tl.constexpr):
    """P.V of the tokens t_first + NPART u, u < NR * TR, their p in ph (W, GP, P // NPART) as [w, g, i] (u = w * P //
    NPART + i): to the value layout, row r of round k taking u = k * TR + r // NWT, as (R * GP, NR) (one shared-memory
    exchange), then round by round (columns split off in registers), one word load and GP * P multiply-adds each."""
    pt = tl.reshape(tl.permute(ph, (1, 0, 2)), (GP, NR, TR))  # [g, k, j]: u = k * TR + j
    pr = tl.reshape(tl.permute(pt, (2, 0, 1))[:, None, :, :] + tl.zeros((1, NWT, 1, 1), tl.float32), (R * GP, NR))
    return _pv_tree(acc_v, acc_m, pr, 0, 1, NR, t_first + NPART * (rk // NWT), s_q, vptr, vsptr, vmptr, stride_vsn,
                    vword, vgrp, shp3, maskp3, ha3, hc3, R, GP, NWT, NPART * TR, H2)


@triton.jit
def _spread_rows(x, REP: tl.constexpr):
    """(n, C) -> (n * REP, C): row g moves to REP * g, zeros between (joins in registers); REP a power of two."""
    if REP == 1:
        return x
    else:
        y = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (0, 2, 1)), (2 * x.shape[0], x.shape[1]))
        return _spread_rows(y, REP // 2)


@triton.jit
def _decode_stage1_kivi_gqa(
    q_ptr, part_acc_ptr, part_ml_ptr, logit_ptr,
    s_len_ptr, sv_len_ptr, win_pos_ptr, win_lo_ptr, wk_ptr, wv_ptr,
    sk_ptr, sks_ptr, skm_ptr, sv_ptr, svs_ptr, svm_ptr,
    sm_scale, H, Cs, Cw, NUM_SPLITS,
    stride_qb, stride_qh,
    stride_wkb, stride_wkh, stride_wkn, stride_wvb, stride_wvh, stride_wvn, stride_wpb,
    stride_skb, stride_skh, stride_skn, stride_ksb, stride_ksh, stride_ksn,
    stride_svb, stride_svh, stride_svn, stride_vsb, stride_vsh, stride_vsn,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GRP: tl.constexpr, GP: tl.constexpr,
    W: tl.constexpr, DQ: tl.constexpr, BLOCK_T: tl.constexpr, SCORE: tl.constexpr, KU: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, H2: tl.constexpr, PF: tl.constexpr, qt_ptr, QT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    P: tl.constexpr = 32 // BITS
    BLOCK_N: tl.constexpr = W * P
    R: tl.constexpr = W * DQ  # rows: one per thread
    NWT: tl.constexpr = D // P  # value words per token: one lane each
    TR: tl.constexpr = R // NWT  # tokens per value round
    NRD: tl.constexpr = BLOCK_N // TR  # value rounds per tile
    CMASK: tl.constexpr = (1 << BITS) - 1
    s_len, sv_len, win_lo, lo, hi = split_bounds(b, sp, s_len_ptr, sv_len_ptr, win_lo_ptr, Cw, NUM_SPLITS, BLOCK_N)
    s_hi = tl.minimum(hi, s_len)
    qbase = q_ptr + b * stride_qb + (h * GRP) * stride_qh

    # ---- keys (R, 1, 1): row r = (word row r // DQ, lane r % DQ); heads (1, GP, 1) in the thread
    rk = tl.arange(0, R)[:, None, None]
    wk = rk // DQ
    dk = tl.max_contiguous(rk % DQ, [1, 1, 1])
    gk = tl.arange(0, GP)[None, :, None]
    qoff = gk * stride_qh
    gin = gk < GRP
    # ---- values (R, 1, 1): row r = (token r // NWT of the round, word r % NWT)
    vword = tl.max_contiguous(rk % NWT, [1, 1, 1])
    vgrp = (vword * P) // G
    # ---- per-code constants: code i of a word at (word >> shift), bit BITS * j; 2**-(BITS j) per place
    ip = tl.arange(0, P)
    shp, jp = _place(ip, BITS, False)
    maskp = (CMASK << (BITS * jp)).to(tl.uint32)
    shp3 = shp[None, None, :]
    maskp3 = maskp[None, None, :]
    c2 = sm_scale * _LOG2E  # logits in log2 units
    inv_place = tl.exp2(-(BITS * jp).to(tl.float32))  # (P,)
    invp = inv_place[None, None, :] * c2
    # ---- logits of a tile are (W, GP, P): head g (gk), token s0 + w * P + i
    wx = tl.arange(0, W)[:, None, None]
    ix = tl.arange(0, P)[None, None, :]
    # ---- H2: pairs k = codes (k, k + P2) of a word, decoded once (one LOP3, one HFMA2) for the GP heads' HFMA2s
    P2: tl.constexpr = P // 2
    hsh, hmask, ha, hc = h2_place(tl.arange(0, P2), BITS)
    hsh3, hmask3, ha3, hc3 = hsh[None, None, :], hmask[None, None, :], ha[None, None, :], hc[None, None, :]

    m1 = tl.full((GP,), _MASKED, tl.float32)
    l1 = tl.zeros((GP,), tl.float32)
    if H2:  # sums of p * scale * code: code i of the row's word at [.., i] (i < P2) / [.., i - P2]
        acc_lo = tl.zeros((R, GP, P2), tl.float32)
        acc_hi = tl.zeros((R, GP, P2), tl.float32)
    else:
        acc_v = tl.zeros((R, GP, P), tl.float32)  # sum over the row's tokens of p * scale * code * 2**(B j)
    acc_m = tl.zeros((R, GP, 1), tl.float32)  # sum of p * min
    kbase = b * stride_skb + h * stride_skh
    ksbase = b * stride_ksb + h * stride_ksh
    vbase = b * stride_svb + h * stride_svh
    vsbase = b * stride_vsb + h * stride_vsh
    # slots [lo, s_q): key and value quantized; [max(lo, sv_len), s_hi): quantized key, value in the ring
    s_q = tl.minimum(s_hi, tl.maximum(sv_len, lo))
    for j in tl.static_range(1, PF):
        prefetch_tile(lo + j * BLOCK_N, s_q, sk_ptr + kbase, sks_ptr + ksbase, skm_ptr + ksbase, sv_ptr + vbase,
                      svs_ptr + vsbase, svm_ptr + vsbase, stride_skn, stride_ksn, stride_svn, stride_vsn, BLOCK_N, P, G,
                      D)
    for s0 in range(lo, s_q, BLOCK_N):
        if PF > 0:  # tile s0 + PF * BLOCK_N into L2 while this one computes
            prefetch_tile(s0 + PF * BLOCK_N, s_q, sk_ptr + kbase, sks_ptr + ksbase, skm_ptr + ksbase, sv_ptr + vbase,
                          svs_ptr + vsbase, svm_ptr + vsbase, stride_skn, stride_ksn, stride_svn, stride_vsn, BLOCK_N,
                          P, G, D)
        # ---- keys: x[w, g, i] = 2**-(B j_i) * sum_d (q_gd * s_d) * c_d * 2**(B j_i) + sum_d q_gd * m_d
        t0 = s0 + wk * P  # first token of each word row
        kin = t0 < s_q
        kp = sk_ptr + kbase + (s0 // P + wk) * stride_skn + dk
        sp_ = ksbase + (t0 // G) * stride_ksn + dk
        # q is read again each tile (L1 hits): the min(s0, 0) (= 0) in its address keeps the compiler from hoisting
        # its loads out of the loop, where they would hold GP * D / DQ registers for the whole loop and spill
        if QT:  # q heads-last (B, H, D, GP): the heads are the load's contiguous run, in the thread on every Triton
            qt = qt_ptr + (b * H + h) * (D * GP) + dk * GP + gk + tl.minimum(s0, 0)
        else:
            qt = qbase + qoff + dk + tl.minimum(s0, 0)
        if H2:  # fp16x2 sums of code pairs times q * scale (log2 units), over the lane's D // DQ channels
            part_h = tl.zeros((R, GP, P2), tl.uint32)
        else:
            part = tl.zeros((R, GP, P), tl.float32)
        qmp = tl.zeros((R, GP, 1), tl.float32)
        for i0 in tl.range(0, D // DQ, KU):
            for i1 in tl.static_range(KU):
                i = i0 + i1
                kw = tl.load(kp + i * DQ, mask=kin, other=0)
                sc = tl.load(sks_ptr + sp_ + i * DQ, mask=kin, other=0.0).to(tl.float32)
                mn = tl.load(skm_ptr + sp_ + i * DQ, mask=kin, other=0.0).to(tl.float32)
                if QT:  # padding heads hold zeros
                    qi = tl.load(qt + i * (DQ * GP)).to(tl.float32)
                else:
                    qi = tl.load(qt + i * DQ, mask=gin, other=0.0).to(tl.float32)
                if H2:
                    part_h = h2_fma(h2_decode(h2_codes(kw, hsh3, hmask3), ha3, hc3), h2_splat(qi * sc * c2), part_h)
                else:
                    part += _codes(kw, shp3, maskp3) * (qi * sc)
                qmp += qi * mn
        if H2:
            x_lo, x_hi = h2_split(part_h)
            xk = _h2_unpair(x_lo, x_hi)
        else:
            xk = part * invp
        x = tl.sum(tl.reshape(xk + qmp * c2, (W, DQ, GP, P)), 1)  # (W, GP, P)
        n = s0 + wx * P + ix
        x = tl.where(n < s_q, x, float("-inf"))
        if SCORE:
            tl.store(logit_ptr + b * stride_lb + (h * GRP + gk) * stride_lh + n, x * _LN2, mask=(n < s_q) & gin)
        # ---- online softmax per head, lazily rescaled
        m_t = tl.max(tl.max(x, 2), 0)
        if tl.max(m_t - m1, 0) > _LAZY:
            m_new = tl.maximum(m1, m_t)
            alpha = tl.exp2(m1 - m_new)
            l1 = l1 * alpha
            if H2:
                acc_lo = acc_lo * alpha[None, :, None]
                acc_hi = acc_hi * alpha[None, :, None]
            else:
                acc_v = acc_v * alpha[None, :, None]
            acc_m = acc_m * alpha[None, :, None]
            m1 = m_new
        p = tl.exp2(x - m1[None, :, None])
        l1 += tl.sum(tl.sum(p, 2), 0)
        # ---- values in NPART = 4 parts (tokens 4 u + o of the tile, o = 0, 2, 1, 3), split off p in registers; a
        # loop, not unrolled (an unrolled tile overflows the instruction cache: ncu, no-instruction stalls), picks
        # its part by three selects and moves it to the value layout
        pe, po = tl.split(tl.reshape(p, (W, GP, P // 2, 2)))
        p0, p2 = tl.split(tl.reshape(pe, (W, GP, P // 4, 2)))
        p1, p3 = tl.split(tl.reshape(po, (W, GP, P // 4, 2)))
        if H2:  # the tile's tokens per row in fp16x2 (acc_x), then into the fp32 sums
            acc_x = tl.zeros((R, GP, P2), tl.uint32)
            csh, cmask = hsh3, hmask3
        else:
            acc_x = acc_v
            csh, cmask = shp3, maskp3
        for e in tl.range(0, 4):
            o = (e % 2) * 2 + e // 2
            ph = tl.where(e == 0, p0, tl.where(e == 1, p2, tl.where(e == 2, p1, p3)))
            acc_x, acc_m = _pv_part(acc_x, acc_m, ph, s0 + o, s_q, sv_ptr + vbase, svs_ptr + vsbase, svm_ptr + vsbase,
                                    stride_vsn, rk, vword, vgrp, csh, cmask, ha3, hc3, R, GP, NWT, TR, NRD // 4, 4, H2)
        if H2:
            acc_lo, acc_hi = _h2_flush(acc_x, acc_lo, acc_hi)
        else:
            acc_v = acc_x
    # ---- the quantized part to (head, channel): word k holds channels k * P + i
    if H2:
        acc_v = _h2_unpair(acc_lo, acc_hi)
    else:
        acc_v = acc_v * inv_place[None, None, :]
    a = tl.sum(tl.reshape(acc_v + acc_m, (TR, NWT, GP, P)), 0)  # (NWT, GP, P)
    acc = tl.reshape(tl.permute(a, (1, 0, 2)), (GP, D))

    # ---- the tails on the tensor cores, 16 rows: row GM // GP * g is head g, the rows between are padding (q = 0)
    GM: tl.constexpr = 16
    REP: tl.constexpr = GM // GP
    acc = _spread_rows(acc, REP)
    m1 = tl.reshape(_spread_rows(m1[:, None], REP), (GM,))
    l1 = tl.reshape(_spread_rows(l1[:, None], REP), (GM,))
    dtype = q_ptr.dtype.element_ty
    rg = tl.arange(0, GM)
    hrow = rg // REP
    own = (rg % REP == 0) & (hrow < GRP)
    dd = tl.arange(0, D)
    q16 = tl.load(qbase + hrow[:, None] * stride_qh + dd[None, :], mask=own[:, None], other=0.0)
    q16 = (q16.to(tl.float32) * c2).to(dtype)
    tt = tl.arange(0, BLOCK_T)
    # slots with a quantized key and a full-precision value (KIVI's value FIFO): keys dequantized (BLOCK_T, D)
    TW: tl.constexpr = BLOCK_T // P
    t_lo = tl.maximum(lo, sv_len)
    invt = tl.reshape(inv_place[None, :, None] + tl.zeros((TW, 1, 1), tl.float32), (BLOCK_T, 1))
    for s0 in range((t_lo // P) * P, s_hi, BLOCK_T):
        nt = s0 + tt
        okt = (nt >= t_lo) & (nt < s_hi)
        wt = tl.arange(0, TW)[:, None, None]
        kwt = tl.load(sk_ptr + kbase + (s0 // P + wt) * stride_skn + dd[None, None, :],
                      mask=(s0 + wt * P) < s_hi, other=0)  # (TW, 1, D)
        ct = tl.reshape(_codes(kwt, shp[None, :, None], maskp[None, :, None]), (BLOCK_T, D)) * invt
        srt = ksbase + (nt // G)[:, None] * stride_ksn + dd[None, :]
        sct = tl.load(sks_ptr + srt, mask=okt[:, None], other=0.0).to(tl.float32)
        mnt = tl.load(skm_ptr + srt, mask=okt[:, None], other=0.0).to(tl.float32)
        kt = (ct * sct + mnt).to(dtype)
        xt = tl.where(okt[None, :], dot(q16, tl.trans(kt), DOT_PREC, UPCAST), float("-inf"))
        if SCORE:
            tl.store(logit_ptr + b * stride_lb + (h * GRP + hrow)[:, None] * stride_lh + nt[None, :], xt * _LN2,
                     mask=okt[None, :] & own[:, None])
        vt = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + (nt[:, None] % Cw) * stride_wvn + dd[None, :],
                     mask=okt[:, None], other=0.0)
        m1, l1, acc = _online_dot(xt, vt, m1, l1, acc, DOT_PREC, UPCAST)

    # ---- the full-precision ring: virtual [max(lo, s_len), hi) -> ring slots rr = j - s_len
    r_lo = tl.maximum(lo, s_len) - s_len
    r_hi = hi - s_len
    for r0 in range(r_lo, r_hi, BLOCK_T):
        rr, in_r, valid = ring_tile(win_pos_ptr + b * stride_wpb, r0, r_hi, win_lo, BLOCK_T)
        r2 = rr[:, None]
        k = tl.load(wk_ptr + b * stride_wkb + h * stride_wkh + r2 * stride_wkn + dd[None, :], mask=valid[:, None],
                    other=0.0)
        xr = tl.where(valid[None, :], dot(q16, tl.trans(k), DOT_PREC, UPCAST), float("-inf"))
        if SCORE:  # -inf where the slot is free
            tl.store(logit_ptr + b * stride_lb + (h * GRP + hrow)[:, None] * stride_lh + Cs + rr[None, :], xr * _LN2,
                     mask=in_r[None, :] & own[:, None])
        v = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + r2 * stride_wvn + dd[None, :], mask=valid[:, None],
                    other=0.0)
        m1, l1, acc = _online_dot(xr, v, m1, l1, acc, DOT_PREC, UPCAST)

    hq = h * GRP + hrow
    tl.store(part_acc_ptr + b * stride_ab + hq[:, None] * stride_ah + sp * stride_as + dd[None, :], acc,
             mask=own[:, None])
    ml = part_ml_ptr + b * stride_mb + hq * stride_mh + sp * stride_ms
    tl.store(ml + 0, tl.maximum(m1, _MASKED) * _LN2, mask=own)
    tl.store(ml + 1, l1, mask=own)


def gqa_config(bits: int, num_warps: int = 2, head_dim: int = 128) -> dict:
    """Tiles for `_decode_stage1_kivi_gqa`: W = 8 word rows per warp (DQ = 4 lanes per row), KU key chunks per
    iteration of the (not unrolled) chunk loop."""
    return dict(W=8 * num_warps, DQ=4, KU=min(8, head_dim // 4))


def qt_default() -> bool:
    """Whether the kernel reads q from a heads-last copy (B, H, D, GP) (decode_workspace's qt) by default: after
    Triton 3.6. Its key chunks load q as (rows, heads, 1) with unit contiguity along both; 3.6 puts the heads in
    the thread (as the kernel is written for), 3.9 breaks the tie the other way and lays the heads across lanes,
    which sends every chunk through a shared-memory layout change (local sm_90 compile, 2 bits, 4 heads: 96
    shared loads and 64 barriers per 8 chunks, 20 spilled reloads per tile). In the heads-last copy the heads are
    the contiguous run, so every version keeps them in the thread (3.9: 750 instructions per 8 chunks, 8 shared
    loads, no spills, against 3.6's 759 on the original layout). 3.6 keeps the original layout: with the copy (one
    more small launch per step) the H200 under 3.6 ran 0.96-0.97x at B=16/4096, 1.00x at B=32-64/4096 and
    1.02-1.03x at B=32/32768 (8 KV heads, bit-identical outputs)."""
    return triton_version() > (3, 6)


def gqa_supported(slots, head_dim: int, grp: int) -> bool:
    """The kernel's shape needs: several query heads per KV head with (heads to a power of two) * codes per word
    <= GQA_MAX_CODES, a token's value words no more than a warp's lanes (head_dim // P <= 32, and at least the 4
    lanes of a key row's tile), value code rows of exactly head_dim // P words."""
    p = 32 // slots.bits
    gp = triton.next_power_of_2(grp)
    return (grp > 1 and gp * p <= GQA_MAX_CODES and 4 <= head_dim // p <= 32 and slots.s_vc is not None
            and slots.s_vc.stride(2) == head_dim // p)
