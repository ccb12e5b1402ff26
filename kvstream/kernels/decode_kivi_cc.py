"""Stage 1 of `kernels.decode_attention` for KIVI storage with one query head per KV head (MHA), on CUDA cores.

With one query head there is nothing for the tensor cores to share: `kernels.decode_kivi` pads the head to the
MMA's 16 rows and stages every dequantized operand through shared memory. Here a dequantized element costs
three instructions (one LOP3 and one FADD for the code in place, `decode_kivi._codes`; one FFMA into a
per-thread partial) and is never moved between threads: the reductions run inside a thread. Same contract as
the other stage 1s (one program per (sequence, KV head, split); partial acc / (max, sum) in natural units).
- A tile is W word rows of P = 32 // BITS tokens (BLOCK_N = W * P); each row has DQ lanes. Every load is shaped
  (merged row index, contiguous run, 1): Triton's coalescing orders tied dimensions differently across versions
  (3.6 and 3.9), and with only the merged index and a unit dimension left there is one layout: lanes and warps
  along rows, the run (and the codes' places, broadcast along the unit dimension) inside the thread.
- Keys (per-channel codes, a word = P tokens of one channel): per chunk i, lane dq of row w reads channels
  i * DQ * DL + dq * DL + [0, DL) (the row's lanes read one contiguous run). The thread multiplies its codes by
  q * scale of their channel (the scale is per channel and key group, so that costs one multiply per channel
  per group, not per element) and adds them up as one multiply-add chain: P partial logits per row, finished by
  a DQ-lane shuffle reduction. The code's place 2**(BITS j) comes out once per token, the min as q . min once
  per group.
- Values (per-token codes, a word = P channels of one token): row r takes tokens i * W + r // DQ of the tile
  (i < P: a warp's load covers consecutive tokens), words (r % DQ) * DWI + [0, DWI). The tile's probabilities
  go to that layout through one shared-memory exchange; p * scale is one multiply per token and group, and the
  P.V sum over the thread's tokens stays in a per-thread accumulator (code units, per channel and row), reduced
  over rows once per split. Two spellings of that sum (PV_CHAIN, `pv_chain_default`): one flat (P * R)-row tile
  summed over i by `tl.sum`, which Triton 3.6 compiles to one multiply-add chain and runs fastest (H200), and a
  place-by-place loop over the columns of p split off in registers, which stays a multiply-add chain under
  newer Triton; 3.9 compiles the flat sum as a tree (FMUL + FADD) that spills ~140 registers for 2 bits.
- One online softmax per program, lazily rescaled (the running max moves only when a tile's max passes it by
  more than 8 in log2 units); log2 units inside.
- H2 (fp16x2 sums; the default for bf16 / fp16 queries): codes k and k + P / 2 of a word (`triton_util.h2_place`)
  are masked into the mantissas of an fp16 pair (1024 + code * 2**s, one LOP3), turned into the exact codes by one
  HFMA2 (times 2**-s, minus 1024 * 2**-s) and multiplied into fp16x2 partial sums by another: 1.5 instructions per
  element instead of 3 (local sm_90 compile, Triton 3.6, 2 bits, 4 warps: 2,840 instructions per 512-token tile
  and thread instead of 4,244; 168 registers instead of 237). Keys: a lane's 8 channels of a tile summed in fp16,
  then in fp32; values: a row's 16 tokens of a tile, p * scale entering times 2**-8 (p reaches 2**8 under the lazy
  rescaling). Finite while |q * key scale| < ~21,000 and value scales < ~1,300 (fp16's 65,504 over the summed
  terms); output within ~1 bf16 ulp of the fp32 sums (3.5e-3 relative, H200). P.V always takes the chain spelling.
- L2 prefetch (PF > 0, `prefetch_tile`): at the top of each tile, one `prefetch.global.L2` per 128-byte line of
  the quantized tile PF tiles ahead (key and value codes, scales, mins: 6 instructions per thread for 2 bits and
  2 warps), so that tile's loads wait on L2 rather than DRAM and no register holds the data early. H200: 4 bits
  6-12% faster with PF = 1 (MHA, 32 KV heads), 2 bits -1..+8%; PF = 2 and 4 slower than none (README "Kernel
  benchmark").
Slots in [sv_len, s_len) (quantized key, value still in the full-precision FIFO: fewer than the ring's size) are
read after the main loop with dequantized key tiles, then the ring, both on CUDA cores.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvstream.kernels.decode_kivi import _LAZY, _codes, _place
from kvstream.kernels.triton_util import LN2 as _LN2
from kvstream.kernels.triton_util import LOG2E as _LOG2E
from kvstream.kernels.triton_util import MASKED as _MASKED
from kvstream.kernels.triton_util import (h2_codes, h2_decode, h2_fma, h2_place, h2_splat, h2_split, prefetch_rows,
                                 ring_tile, split_bounds, triton_version)

# H2 P.V: p * scale enters the fp16 accumulators times 2**-8 (p reaches 2**8 under the lazy rescaling; with 16
# tokens per flush the sums stay finite for value scales up to ~1300)
H2_PV_SCALE = tl.constexpr(0.00390625)


@triton.jit
def _h2_unpair(lo, hi):
    """(A, B, P2) float32 sums of each pair's low and high code -> (A, B, 2 * P2) in code order (pair k holds codes
    k and k + P2)."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (lo.shape[0], lo.shape[1], 2 * lo.shape[2]))


@triton.jit
def _h2_flush(acc_x, acc_lo, acc_hi):
    """A tile's fp16x2 P.V sums (acc_x: p * scale * H2_PV_SCALE times codes) into the fp32 sums of each pair's low
    and high code."""
    v_lo, v_hi = h2_split(acc_x)
    return acc_lo + v_lo * (1.0 / H2_PV_SCALE), acc_hi + v_hi * (1.0 / H2_PV_SCALE)


@triton.jit
def prefetch_tile(sn, s_q, kptr, ksptr, kmptr, vptr, vsptr, vmptr, stride_skn, stride_ksn, stride_svn, stride_vsn,
                  BLOCK_N: tl.constexpr, P: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """L2 prefetch of the quantized tile of tokens sn + [0, BLOCK_N) below s_q (key code rows, key scale / min rows,
    value code rows, value scale / min rows; the pointers at this (sequence, KV head))."""
    prefetch_rows(kptr, sn // P, (s_q + P - 1) // P, BLOCK_N // P, D, stride_skn)
    NG: tl.constexpr = (BLOCK_N + G - 1) // G
    prefetch_rows(ksptr, sn // G, (s_q + G - 1) // G, NG, D, stride_ksn)
    prefetch_rows(kmptr, sn // G, (s_q + G - 1) // G, NG, D, stride_ksn)
    prefetch_rows(vptr, sn, s_q, BLOCK_N, D // P, stride_svn)
    prefetch_rows(vsptr, sn, s_q, BLOCK_N, D // G, stride_vsn)
    prefetch_rows(vmptr, sn, s_q, BLOCK_N, D // G, stride_vsn)


@triton.jit
def _value_groups(r, vword, DQ: tl.constexpr, DWI: tl.constexpr, P: tl.constexpr, G: tl.constexpr):
    """Scale/min group of the value words (r % DQ) * DWI + [0, DWI) of row index r: one per row when a thread's
    words of a token share a group, else one per word."""
    if DWI * P <= G:
        return ((r % DQ) * DWI * P) // G
    else:
        return (vword * P) // G


@triton.jit
def _value_loads(nv, s_q, vptr, vsptr, vmptr, stride_vsn, vword, vgrp, NWT: tl.constexpr):
    """Value code words, scale and min (fp32) of tokens nv (nothing at or past s_q: zeros)."""
    vin = nv < s_q
    vw = tl.load(vptr + nv * NWT + vword, mask=vin, other=0)
    vrow = nv * stride_vsn + vgrp
    vsc = tl.load(vsptr + vrow, mask=vin, other=0.0).to(tl.float32)
    vmn = tl.load(vmptr + vrow, mask=vin, other=0.0).to(tl.float32)
    return vw, vsc, vmn


@triton.jit
def _pv_leaf(acc_v, acc_m, pp, I: tl.constexpr, t0, s_q, vptr, vsptr, vmptr, stride_vsn, vword, vgrp, shp3, maskp3,
             ha3, hc3, R: tl.constexpr, HG: tl.constexpr, NWT: tl.constexpr, TS: tl.constexpr, H2: tl.constexpr):
    """P.V of token t0 + I * TS of every row r (R, 1, 1), the p of its HG query heads in pp (R * HG, 1). H2: acc_v
    holds fp16x2 sums of code pairs times p * scale * H2_PV_SCALE (shp3 / maskp3 / ha3 / hc3 from `h2_place`)."""
    pi = tl.reshape(pp, (R, HG, 1))
    vw, vsc, vmn = _value_loads(t0 + I * TS, s_q, vptr, vsptr, vmptr, stride_vsn, vword, vgrp, NWT)
    if H2:
        acc_v = h2_fma(h2_decode(h2_codes(vw, shp3, maskp3), ha3, hc3), h2_splat(pi * (vsc * H2_PV_SCALE)), acc_v)
    else:
        acc_v += _codes(vw, shp3, maskp3) * (pi * vsc)
    acc_m += pi * vmn
    return acc_v, acc_m


@triton.jit
def _pv_tree(acc_v, acc_m, pp, I: tl.constexpr, ST: tl.constexpr, N: tl.constexpr, t0, s_q, vptr, vsptr, vmptr,
             stride_vsn, vword, vgrp, shp3, maskp3, ha3, hc3, R: tl.constexpr, HG: tl.constexpr, NWT: tl.constexpr,
             TS: tl.constexpr, H2: tl.constexpr):
    """Places I, I + ST, ... (N of them, the columns of pp (R * HG, N): HG query heads per row) one by one into the
    P.V accumulators: pp is split in halves in registers (even / odd columns), down to single columns."""
    if N == 1:
        return _pv_leaf(acc_v, acc_m, pp, I, t0, s_q, vptr, vsptr, vmptr, stride_vsn, vword, vgrp, shp3, maskp3,
                        ha3, hc3, R, HG, NWT, TS, H2)
    else:
        a, c = tl.split(tl.reshape(pp, (R * HG, N // 2, 2)))
        acc_v, acc_m = _pv_tree(acc_v, acc_m, a, I, 2 * ST, N // 2, t0, s_q, vptr, vsptr, vmptr, stride_vsn, vword,
                                vgrp, shp3, maskp3, ha3, hc3, R, HG, NWT, TS, H2)
        return _pv_tree(acc_v, acc_m, c, I + ST, 2 * ST, N // 2, t0, s_q, vptr, vsptr, vmptr, stride_vsn, vword,
                        vgrp, shp3, maskp3, ha3, hc3, R, HG, NWT, TS, H2)


@triton.jit
def _pv_exchange(acc_v, acc_m, p, s0, s_q, vptr, vsptr, vmptr, stride_vsn, shp3, maskp3, P: tl.constexpr,
                 R: tl.constexpr, W: tl.constexpr, DQ: tl.constexpr, DWI: tl.constexpr, G: tl.constexpr):
    """The same P.V as `_pv_tree` (row r, token i * W + r // DQ) as one flat tile: element x = i * R + r, the
    products summed over i by `tl.sum` (one multiply-add chain under Triton 3.6; a tree, FMUL + FADD, under 3.9)."""
    xv = tl.arange(0, P * R)[:, None, None]
    rv = xv % R
    nv = s0 + (xv // R) * W + rv // DQ
    vword = (rv % DQ) * DWI + tl.arange(0, DWI)[None, :, None]
    vgrp = _value_groups(rv, vword, DQ, DWI, P, G)
    vw, vsc, vmn = _value_loads(nv, s_q, vptr, vsptr, vmptr, stride_vsn, vword, vgrp, DQ * DWI)
    pt = tl.reshape(tl.reshape(p, (W * P,)), (P, W))  # p of token i * W + w (one shared-memory exchange)
    px = tl.reshape(pt[:, :, None] + tl.zeros((1, 1, DQ), tl.float32), (P * R, 1, 1))
    acc_v += tl.sum(tl.reshape(_codes(vw, shp3, maskp3) * (px * vsc), (P, R, DWI, P)), 0)
    acc_m += tl.sum(tl.reshape(px * vmn, (P, R, vgrp.shape[1], 1)), 0)
    return acc_v, acc_m


@triton.jit
def _decode_stage1_kivi_cc(
    q_ptr, part_acc_ptr, part_ml_ptr, logit_ptr,
    s_len_ptr, sv_len_ptr, win_pos_ptr, win_lo_ptr, wk_ptr, wv_ptr,
    sk_ptr, sks_ptr, skm_ptr, sv_ptr, svs_ptr, svm_ptr,
    sm_scale, H, Cs, Cw, NUM_SPLITS,
    stride_qb, stride_qh,
    stride_wkb, stride_wkh, stride_wkn, stride_wvb, stride_wvh, stride_wvn, stride_wpb,
    stride_skb, stride_skh, stride_skn, stride_ksb, stride_ksh, stride_ksn,
    stride_svb, stride_svh, stride_svn, stride_vsb, stride_vsh, stride_vsn,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, W: tl.constexpr, DQ: tl.constexpr,
    BLOCK_R: tl.constexpr, SCORE: tl.constexpr, PV_CHAIN: tl.constexpr, H2: tl.constexpr, PF: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    P: tl.constexpr = 32 // BITS
    BLOCK_N: tl.constexpr = W * P
    DL: tl.constexpr = 4
    DI: tl.constexpr = D // (DQ * DL)
    DWI: tl.constexpr = D // P // DQ  # value words per thread and token
    CMASK: tl.constexpr = (1 << BITS) - 1
    s_len, sv_len, win_lo, lo, hi = split_bounds(b, sp, s_len_ptr, sv_len_ptr, win_lo_ptr, Cw, NUM_SPLITS, BLOCK_N)
    s_hi = tl.minimum(hi, s_len)
    qrow = q_ptr + b * stride_qb + h * stride_qh

    # Index shapes: every load is (rows, contiguous run, 1) with rows = a merged index whose address is computed,
    # so Triton's coalescing (which orders tied dimensions differently across versions) can only put the lanes
    # along rows and the run inside the thread; the trailing unit dimension takes the codes' places in-thread.
    # ---- keys (R, DL, 1), R = W * DQ rows r = (word row r // DQ, lane r % DQ of the row), one load per chunk i:
    # channel i * DQ * DL + (r % DQ) * DL + dl (a row's DQ lanes read one contiguous DQ * DL-word run per load)
    R: tl.constexpr = W * DQ
    rk = tl.arange(0, R)[:, None, None]
    wk = rk // DQ
    dk0 = (rk % DQ) * DL + tl.arange(0, DL)[None, :, None]
    # ---- values (R, DWI, 1) per place: row r takes tokens i * W + r // DQ of the tile, i < P (a warp's load covers
    # consecutive tokens), words (r % DQ) * DWI + [0, DWI)
    vword = (rk % DQ) * DWI + tl.arange(0, DWI)[None, :, None]
    vgrp = _value_groups(rk, vword, DQ, DWI, P, G)
    # ---- per-code constants: code i of a word at (word >> shift), bit BITS * j; 2**-(BITS j) per place
    ip = tl.arange(0, P)
    shp, jp = _place(ip, BITS, False)
    maskp = (CMASK << (BITS * jp)).to(tl.uint32)
    shp3 = shp[None, None, :]
    maskp3 = maskp[None, None, :]
    c2 = sm_scale * _LOG2E  # logits in log2 units
    inv_place = tl.exp2(-(BITS * jp).to(tl.float32))  # (P,)
    invp = inv_place * c2
    # ---- logits of a tile are (W, P): token s0 + w * P + i
    wx = tl.arange(0, W)[:, None]
    ix = tl.arange(0, P)[None, :]
    # ---- H2: pairs k = codes (k, k + P2) of a word, two per fp16x2 instruction (`triton_util.h2_place`)
    P2: tl.constexpr = P // 2
    hsh, hmask, ha, hc = h2_place(tl.arange(0, P2), BITS)
    hsh3, hmask3, ha3, hc3 = hsh[None, None, :], hmask[None, None, :], ha[None, None, :], hc[None, None, :]

    m1 = tl.max(tl.full((W,), _MASKED, tl.float32), 0)
    l1 = tl.sum(tl.zeros((W,), tl.float32), 0)
    if H2:  # sums of p * scale * code, channel k * P + i of word k at [.., k, i] (i < P2) / [.., k, i - P2]
        acc_lo = tl.zeros((R, DWI, P2), tl.float32)
        acc_hi = tl.zeros((R, DWI, P2), tl.float32)
    else:
        acc_v = tl.zeros((R, DWI, P), tl.float32)  # sum over the row's tokens of p * scale * code * 2**(B j)
    acc_m = tl.zeros((R, vgrp.shape[1], 1), tl.float32)  # sum of p * min
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
        # ---- keys: x[w, i] = 2**-(B j_i) * sum_d (q_d * s_gd) * c_d * 2**(B j_i) + sum_d q_d * m_gd, the sum
        # over a thread's channels as one multiply-add chain (chunk by chunk), then over the row's DQ lanes
        t0 = s0 + wk * P  # first token of each word row
        kin = t0 < s_q
        if H2:  # fp16x2 sums of code pairs times q * scale (log2 units), over the thread's DI channels per lane
            part_h = tl.zeros((R, DL, P2), tl.uint32)
        else:
            part = tl.zeros((R, DL, P), tl.float32)
        qmp = tl.zeros((R, DL, 1), tl.float32)
        for i in tl.static_range(DI):
            dki = dk0 + i * (DQ * DL)
            kw = tl.load(sk_ptr + kbase + (s0 // P + wk) * stride_skn + dki, mask=kin, other=0)
            srow = ksbase + (t0 // G) * stride_ksn + dki
            sc = tl.load(sks_ptr + srow, mask=kin, other=0.0).to(tl.float32)
            mn = tl.load(skm_ptr + srow, mask=kin, other=0.0).to(tl.float32)
            qi = tl.load(qrow + dki).to(tl.float32)
            if H2:
                part_h = h2_fma(h2_decode(h2_codes(kw, hsh3, hmask3), ha3, hc3), h2_splat(qi * sc * c2), part_h)
            else:
                part += _codes(kw, shp3, maskp3) * (qi * sc)
            qmp += qi * mn
        if H2:
            x_lo, x_hi = h2_split(part_h)
            xk = tl.sum(_h2_unpair(x_lo, x_hi), 1)
        else:
            xk = tl.sum(part, 1) * invp[None, :]
        xr = tl.reshape(xk + tl.sum(qmp, 1) * c2, (W, DQ, P))
        x = tl.sum(xr, 1)  # (W, P)
        n = s0 + wx * P + ix
        x = tl.where(n < s_q, x, float("-inf"))
        if SCORE:
            tl.store(logit_ptr + b * stride_lb + h * stride_lh + n, x * _LN2, mask=n < s_q)
        # ---- online softmax, lazily rescaled
        m_t = tl.max(tl.max(x, 1), 0)
        if m_t - m1 > _LAZY:
            alpha = tl.exp2(m1 - m_t)
            l1 = l1 * alpha
            if H2:
                acc_lo = acc_lo * alpha
                acc_hi = acc_hi * alpha
            else:
                acc_v = acc_v * alpha
            acc_m = acc_m * alpha
            m1 = m_t
        p = tl.exp2(x - m1)
        l1 += tl.sum(tl.sum(p, 1), 0)
        # ---- values: p * scale once per token (and group), then code by code
        if H2 or PV_CHAIN:
            # p of token i * W + r // DQ as (R, P), P in the thread (one shared-memory exchange), then place by
            # place: columns split off in registers, each one load and one multiply-add into acc_v
            pt = tl.trans(tl.reshape(tl.reshape(p, (BLOCK_N,)), (P, W)))  # (W, P): [w, i] = token i * W + w
            pr = tl.reshape(pt[:, None, :] + tl.zeros((1, DQ, 1), tl.float32), (R, P))
            if H2:  # the tile's P tokens per row in fp16x2 (acc_x), then into the fp32 sums
                acc_x = tl.zeros((R, DWI, P2), tl.uint32)
                csh, cmask = hsh3, hmask3
            else:
                acc_x = acc_v
                csh, cmask = shp3, maskp3
            acc_x, acc_m = _pv_tree(acc_x, acc_m, pr, 0, 1, P, s0 + rk // DQ, s_q, sv_ptr + vbase, svs_ptr + vsbase,
                                    svm_ptr + vsbase, stride_vsn, vword, vgrp, csh, cmask, ha3, hc3, R, 1, D // P, W,
                                    H2)
            if H2:
                acc_lo, acc_hi = _h2_flush(acc_x, acc_lo, acc_hi)
            else:
                acc_v = acc_x
        else:
            acc_v, acc_m = _pv_exchange(acc_v, acc_m, p, s0, s_q, sv_ptr + vbase, svs_ptr + vsbase, svm_ptr + vsbase,
                                        stride_vsn, shp3, maskp3, P, R, W, DQ, DWI, G)
    # ---- the quantized part to channel order: word k = dq * DWI + dwi holds channels k * P + i
    if H2:
        a = _h2_unpair(acc_lo, acc_hi) + acc_m
    else:
        a = acc_v * inv_place[None, None, :] + acc_m  # (R, DWI, P)
    acc = tl.reshape(tl.sum(tl.reshape(a, (W, DQ, DWI, P)), 0), (D,))

    # ---- slots with a quantized key and a full-precision value (KIVI's value FIFO: fewer than the ring's
    # size per sequence): keys dequantized in a plain (D, BLOCK_T) tile, values from the ring at slot % Cw
    dd = tl.arange(0, D)
    qd = tl.load(qrow + dd).to(tl.float32) * c2
    TW: tl.constexpr = BLOCK_R // P
    t_lo = tl.maximum(lo, sv_len)
    invt = tl.reshape(inv_place[None, None, :] + tl.zeros((1, TW, 1), tl.float32), (1, BLOCK_R))
    for s0 in range((t_lo // P) * P, s_hi, BLOCK_R):
        nt = s0 + tl.arange(0, BLOCK_R)
        okt = (nt >= t_lo) & (nt < s_hi)
        wt = tl.arange(0, TW)[None, :, None]
        kwt = tl.load(sk_ptr + kbase + (s0 // P + wt) * stride_skn + dd[:, None, None],
                      mask=(s0 + wt * P) < s_hi, other=0)
        ct = tl.reshape(_codes(kwt, shp3, maskp3), (D, BLOCK_R)) * invt  # (D, BLOCK_R) codes
        srt = ksbase + (nt // G)[None, :] * stride_ksn + dd[:, None]
        sct = tl.load(sks_ptr + srt, mask=okt[None, :], other=0.0).to(tl.float32)
        mnt = tl.load(skm_ptr + srt, mask=okt[None, :], other=0.0).to(tl.float32)
        xt = tl.where(okt, tl.sum(qd[:, None] * (ct * sct + mnt), 0), float("-inf"))
        if SCORE:
            tl.store(logit_ptr + b * stride_lb + h * stride_lh + nt, xt * _LN2, mask=okt)
        m_new = tl.maximum(m1, tl.max(xt, 0))
        alpha = tl.exp2(m1 - m_new)
        pt = tl.exp2(xt - m_new)
        vt = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + (nt[:, None] % Cw) * stride_wvn + dd[None, :],
                     mask=okt[:, None], other=0.0).to(tl.float32)
        l1 = l1 * alpha + tl.sum(pt, 0)
        acc = acc * alpha + tl.sum(pt[:, None] * vt, 0)
        m1 = m_new

    # ---- the full-precision ring: virtual [max(lo, s_len), hi) -> ring slots rr = j - s_len
    r_lo = tl.maximum(lo, s_len) - s_len
    r_hi = hi - s_len
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rr, in_r, valid = ring_tile(win_pos_ptr + b * stride_wpb, r0, r_hi, win_lo, BLOCK_R)
        r2 = rr[:, None]
        k = tl.load(wk_ptr + b * stride_wkb + h * stride_wkh + r2 * stride_wkn + dd[None, :], mask=valid[:, None],
                    other=0.0).to(tl.float32)
        xr = tl.where(valid, tl.sum(k * qd[None, :], 1), float("-inf"))
        if SCORE:  # -inf where the slot is free
            tl.store(logit_ptr + b * stride_lb + h * stride_lh + Cs + rr, xr * _LN2, mask=in_r)
        m_new = tl.maximum(m1, tl.max(xr, 0))
        alpha = tl.exp2(m1 - m_new)
        pr = tl.exp2(xr - m_new)
        v = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + r2 * stride_wvn + dd[None, :], mask=valid[:, None],
                    other=0.0).to(tl.float32)
        l1 = l1 * alpha + tl.sum(pr, 0)
        acc = acc * alpha + tl.sum(pr[:, None] * v, 0)
        m1 = m_new

    tl.store(part_acc_ptr + b * stride_ab + h * stride_ah + sp * stride_as + dd, acc)
    ml = part_ml_ptr + b * stride_mb + h * stride_mh + sp * stride_ms
    tl.store(ml + 0, tl.maximum(m1, _MASKED) * _LN2)
    tl.store(ml + 1, l1)


def pv_chain_default() -> bool:
    """PV_CHAIN for this Triton: the flat `tl.sum` under 3.6 and older (H200, B=32: 1-3% faster than the chain for
    2 bits, 6-24% for 4 bits, where the chain holds 194 registers instead of 168), the chain after that (under 3.9
    the flat sum spills ~140 registers for 2 bits and holds 254 for 4 bits; the chain: no spills, 167; compiled
    for sm_90, not timed)."""
    return triton_version() > (3, 6)


def cc_config(bits: int, num_warps: int = 4) -> dict:
    """Tiles for `_decode_stage1_kivi_cc`: W = 8 word rows per warp (DQ = 4 lanes per row), W * 32 // bits tokens."""
    return dict(W=8 * num_warps, DQ=4)


def cc_supported(slots, head_dim: int) -> bool:
    """The kernel's shape needs: every lane of a row holds at least one value word (head_dim >= 4 * P) and value
    code rows of exactly head_dim // P words (the row stride is compiled in, for 8-byte loads)."""
    p = 32 // slots.bits
    return head_dim >= 4 * p and slots.s_vc is not None and slots.s_vc.stride(2) == head_dim // p
