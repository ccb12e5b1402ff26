"""Fused split-K decode attention over compressed KV storage (`KVSlots`), with eviction scores.

Same signature and semantics as `kernels.decode_attention_ref.decode_attention_ref`. Flash-decoding
(SGLang `decode_attention` shape), three launches:
- stage 1, one program per (sequence b, KV head h, split): the split takes a contiguous share of the
  sequence's own held tokens (the S slots [0, s_len[b]) then the Cw ring slots) and reads each tile ONCE for all
  GRP query heads of h. fp8 codes are decoded bit by bit to code / 2**8 (exact fp16: three integer ops, no
  conversion; `kernels.fp8_quant`) and fed to the dots as they are, the (b, h)'s key scale applied to the logits and
  its value scale to the P.V sums; packed KIVI codes + scale/min are dequantized in registers: per-channel keys use
  q.(c * s + m) = (q * s).c + q.m (one group per tile, so the key tile is never dequantized); per-token values
  are unpacked along channels. Free and evicted slots are masked; an online softmax keeps the running max, sum
  and un-normalized P.V. Two inner paths, picked per launch: tensor-core tl.dot (GQA) and CUDA-core
  multiply-reduce (few query heads). KIVI per-channel storage goes by default through its own stage 1,
  `kernels.decode_kivi` (in-place code decode, several key groups per tensor-core tile, lazy rescaling;
  `kivi_tc=False` keeps it here). With scores, stage 1 also writes each held token's scaled logit
  into a (B, Hq, Cs + Cw) fp32 scratch (no noise here: the cache loop stays lean).
- stage 2, one program per (b, query head, STAGE2_BLOCK_C logit columns for Keyformer, else one): the first
  merges the splits by log-sum-exp and writes the output (H2O: and the row's max/sum); for Keyformer each turns
  its columns of the scratch into y = (x + g) / tau in place and writes their max/sum, the Gumbel noise g hashed
  in registers by `kernels.gumbel.gumbel_lg2` (`gumbel_ref`'s values up to one constant per row), drawn once.
- stage 3 (score_mode > 0), one program per (b, KV head, column block): merges the row's max/sum pairs,
  normalizes the scratch's (noisy) logits and adds the sum over the group's query heads into scores_acc. The
  cache is read once; only the small logit scratch is passed over again.
Ragged lengths (s_len, sv_len, win_pos >= win_lo) are read from device tensors: no host sync. With a
`DecodeWorkspace` (from `decode_workspace`) nothing is allocated inside, so a step is CUDA-graph capturable
(pass `step` and `tau` as device tensors then, so their values are not baked into the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvstream.kernels.decode_kivi import _decode_stage1_kivi, kivi_config
from kvstream.kernels.decode_kivi_cc import _decode_stage1_kivi_cc, cc_config, cc_supported, pv_chain_default
from kvstream.kernels.decode_kivi_gqa import GQA_MAX_CODES, _decode_stage1_kivi_gqa, gqa_config, gqa_supported, qt_default
from kvstream.kernels.fp8_quant import fp8_to_f16
from kvstream.kernels.gumbel import gumbel_lg2
from kvstream.kernels.slots import KVSlots
from kvstream.kernels.triton_util import LN2 as _LN2
from kvstream.kernels.triton_util import MASKED as _MASKED
from kvstream.kernels.triton_util import (LAUNCH, check_device, dot, interpreting, ring_tile, split_bounds, to_dtype_rne,
                                  u32_to_f32)

_QUANT_IDS = {"none": 0, "channel": 1, "token": 2, "fp8": 3}
SPLIT_TARGET = 8  # stage-1 programs per SM to aim for (memory-level parallelism)
MIN_SPLIT_TOKENS = 256  # fewest tokens per split
PREFETCH_TILES = 1  # CUDA-core KIVI stage 1s: L2 prefetch distance in tiles (decode_workspace's prefetch)
STAGE2_BLOCK_C = 512  # logit columns per stage-2 program of Keyformer's noisy normalizer
# columns per stage-3 program and its warps (H200, B=32: 128 -> 512 columns takes 3-10% off a step with scores)
STAGE3_BLOCK_C, STAGE3_WARPS = 512, 4


def score_blocks(n_cols: int, score_mode: int) -> int:
    """(max, sum) pairs per score row: one per STAGE2_BLOCK_C logit columns for Keyformer, else one."""
    return triton.cdiv(n_cols, STAGE2_BLOCK_C) if score_mode == 2 else 1


@triton.jit
def _leaf(w, BASE: tl.constexpr, sc, mn, BITS: tl.constexpr, AFFINE: tl.constexpr):
    """Code at bit offset BASE of every word -> fp32 (times sc plus mn when AFFINE)."""
    c = u32_to_f32((w >> BASE) & ((1 << BITS) - 1))
    if AFFINE:
        c = c * sc + mn
    return c


@triton.jit
def _tree2(w, BASE: tl.constexpr, STEP: tl.constexpr, sc, mn, BITS: tl.constexpr, AFFINE: tl.constexpr):
    return tl.interleave(_leaf(w, BASE, sc, mn, BITS, AFFINE), _leaf(w, BASE + STEP, sc, mn, BITS, AFFINE))


@triton.jit
def _tree4(w, BASE: tl.constexpr, STEP: tl.constexpr, sc, mn, BITS: tl.constexpr, AFFINE: tl.constexpr):
    return tl.interleave(_tree2(w, BASE, 2 * STEP, sc, mn, BITS, AFFINE),
                         _tree2(w, BASE + STEP, 2 * STEP, sc, mn, BITS, AFFINE))


@triton.jit
def _tree8(w, BASE: tl.constexpr, STEP: tl.constexpr, sc, mn, BITS: tl.constexpr, AFFINE: tl.constexpr):
    return tl.interleave(_tree4(w, BASE, 2 * STEP, sc, mn, BITS, AFFINE),
                         _tree4(w, BASE + STEP, 2 * STEP, sc, mn, BITS, AFFINE))


@triton.jit
def _tree16(w, BASE: tl.constexpr, STEP: tl.constexpr, sc, mn, BITS: tl.constexpr, AFFINE: tl.constexpr):
    return tl.interleave(_tree8(w, BASE, 2 * STEP, sc, mn, BITS, AFFINE),
                         _tree8(w, BASE + STEP, 2 * STEP, sc, mn, BITS, AFFINE))


@triton.jit
def _unpack(words, sc, mn, BITS: tl.constexpr, AFFINE: tl.constexpr):
    """(R, W) int32 words -> (R, W * P) fp32 codes (code i of word w -> column w * P + i), as c * sc + mn when
    AFFINE (sc, mn broadcast against (R, W)). A tree of interleaves: each level joins in registers, no shuffles."""
    w = words.to(tl.uint32, bitcast=True)
    if BITS == 2:
        return _tree16(w, 0, 2, sc, mn, BITS, AFFINE)
    else:
        return _tree8(w, 0, 4, sc, mn, BITS, AFFINE)


@triton.jit
def _load_per_token(codes_ptr, scale_ptr, mn_ptr, row_off, s_row_off, mask, out_dtype: tl.constexpr,
                    BITS: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """Dequantize ROWS per-token-quantized rows -> (ROWS, D) out_dtype (0 where masked). row_off (ROWS, 1)
    offsets of the rows' code words, s_row_off (ROWS, 1) offsets of their scale/min rows, mask (ROWS, 1)."""
    P: tl.constexpr = 32 // BITS
    wi = tl.arange(0, D // P)[None, :]
    words = tl.load(codes_ptr + row_off + wi, mask=mask, other=0)  # (ROWS, D // P)
    gi = wi // (G // P)  # the group of every code of word wi (G >= P)
    sc = tl.load(scale_ptr + s_row_off + gi, mask=mask, other=0.0).to(tl.float32)  # (ROWS, D // P)
    mn = tl.load(mn_ptr + s_row_off + gi, mask=mask, other=0.0).to(tl.float32)
    return to_dtype_rne(_unpack(words, sc, mn, BITS, True), out_dtype)


@triton.jit
def _softmax_step(x, m_i, l_i):
    """Online softmax over one tile of x (BLOCK_G, BLOCK_N) masked fp32 logits: (p, alpha, m_new, l_new)."""
    m_new = tl.maximum(m_i, tl.max(x, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(x - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _pv(p, v, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_G, BLOCK_N) fp32 weights x (BLOCK_N, D) values -> (BLOCK_G, D) fp32 (p rounded to v's dtype for the
    tensor cores)."""
    if USE_DOT:
        return dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
    else:
        return tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)  # few query heads: CUDA-core FMAs


@triton.jit
def _online_update(x, v, m_i, l_i, acc, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update with one tile: x (BLOCK_G, BLOCK_N) masked fp32 logits, v (BLOCK_N, D)."""
    p, alpha, m_new, l_i = _softmax_step(x, m_i, l_i)
    acc = acc * alpha[:, None] + _pv(p, v, USE_DOT, DOT_PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _fp8_operand(x, dtype: tl.constexpr):
    """The dot operand type of the fp8 path: fp16 for half-precision models (code / 2**8 is exact in fp16; a bf16
    query converts exactly for magnitudes in [2**-14, 65504]: the path assumes |q| < 65504), fp32 for fp32 models."""
    if dtype == tl.float32:
        return x.to(tl.float32)
    else:
        return x.to(tl.float16)


@triton.jit
def _qk(q, k_t, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_G, D) queries x (D, BLOCK_N) keys -> (BLOCK_G, BLOCK_N) fp32."""
    if USE_DOT:
        return dot(q, k_t, DOT_PREC, UPCAST)
    else:
        return tl.sum(q.to(tl.float32)[:, :, None] * k_t.to(tl.float32)[None, :, :], 1)


@triton.jit
def _decode_stage1(
    q_ptr, part_acc_ptr, part_ml_ptr, logit_ptr,
    s_len_ptr, sv_len_ptr, win_pos_ptr, win_lo_ptr, wk_ptr, wv_ptr,
    sk_ptr, sks_ptr, skm_ptr, sv_ptr, svs_ptr, svm_ptr,
    sm_scale, H, Cs, Cw, NUM_SPLITS,
    stride_qb, stride_qh,
    stride_wkb, stride_wkh, stride_wkn, stride_wvb, stride_wvh, stride_wvn, stride_wpb,
    stride_skb, stride_skh, stride_skn, stride_ksb, stride_ksh, stride_ksn,
    stride_svb, stride_svh, stride_svn, stride_vsb, stride_vsh, stride_vsn,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    QUANT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    GRP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    SCORE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # offsets can pass 2**31 elements (B=32, ctx=32768)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    P: tl.constexpr = 32 // BITS
    # this split's share [lo, hi) of the virtual index space: S slots [0, s_len) then ring slots
    s_len, sv_len, win_lo, lo, hi = split_bounds(b, sp, s_len_ptr, sv_len_ptr, win_lo_ptr, Cw, NUM_SPLITS, BLOCK_N)

    g = tl.arange(0, BLOCK_G)
    hq = h * GRP + g
    gmask = g < GRP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    qf = q.to(tl.float32)
    m_i = tl.full((BLOCK_G,), _MASKED, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    logit_row = logit_ptr + b * stride_lb + hq[:, None] * stride_lh  # (BLOCK_G, 1)
    if QUANT == 3:
        # fp8: the codes decode to code / 2**8 (exact fp16, no per-element multiply); the (b, h)'s key scale x 2**8
        # multiplies the logits, its value scale x 2**8 the P.V sums
        k_sc = tl.load(sks_ptr + b * stride_ksb + h * stride_ksh) * 256.0
        v_sc = tl.load(svs_ptr + b * stride_vsb + h * stride_vsh) * 256.0
        q8 = _fp8_operand(q, dtype)

    # -- the kept store S: slots [lo, min(hi, s_len)), tiles aligned to BLOCK_N (within one key group)
    s_hi = tl.minimum(hi, s_len)
    for s0 in range(lo, s_hi, BLOCK_N):
        n = s0 + tl.arange(0, BLOCK_N)
        nmask = n < s_hi
        n2 = n[:, None]
        if QUANT == 1:
            # KIVI per-channel keys, one group per tile: q.(c * s + m) = (q * s).c + q.m
            w = s0 // P + tl.arange(0, BLOCK_N // P)
            words_t = tl.load(sk_ptr + b * stride_skb + h * stride_skh + w[None, :] * stride_skn + d[:, None])
            c_t = _unpack(words_t, 1.0, 0.0, BITS, False)  # (D, BLOCK_N) codes, tokens along columns
            srow = b * stride_ksb + h * stride_ksh + (s0 // G) * stride_ksn + d
            sc = tl.load(sks_ptr + srow).to(tl.float32)
            mn = tl.load(skm_ptr + srow).to(tl.float32)
            qm = tl.sum(qf * mn[None, :], 1)
            if USE_DOT:
                x = dot((qf * sc[None, :]).to(dtype), c_t.to(dtype), DOT_PREC, UPCAST) + qm[:, None]
            else:
                x = tl.sum((qf * sc[None, :])[:, :, None] * c_t[None, :, :], 1) + qm[:, None]
        elif QUANT == 3:
            c = tl.load(sk_ptr + b * stride_skb + h * stride_skh + n2 * stride_skn + d[None, :], mask=nmask[:, None],
                        other=0)
            x = _qk(q8, tl.trans(_fp8_operand(fp8_to_f16(c), dtype)), USE_DOT, DOT_PREC, UPCAST) * k_sc
        else:
            if QUANT == 0:
                k = tl.load(sk_ptr + b * stride_skb + h * stride_skh + n2 * stride_skn + d[None, :],
                            mask=nmask[:, None], other=0.0)
            else:
                k = _load_per_token(sk_ptr, sks_ptr, skm_ptr, b * stride_skb + h * stride_skh + n2 * stride_skn,
                                    b * stride_ksb + h * stride_ksh + n2 * stride_ksn, nmask[:, None], dtype,
                                    BITS, G, BLOCK_N, D)
            x = _qk(q, tl.trans(k), USE_DOT, DOT_PREC, UPCAST)
        x = tl.where(nmask[None, :], x * sm_scale, float("-inf"))  # (BLOCK_G, BLOCK_N)
        # values: slots < sv_len from S, slots in [sv_len, s_len) from the ring at slot % Cw
        from_s = nmask & (n < sv_len)
        if QUANT == 3:  # fp8: P.V over code / 2**8, times the value scale; ring values of the tile (past sv_len) apart
            c = tl.load(sv_ptr + b * stride_svb + h * stride_svh + n2 * stride_svn + d[None, :], mask=from_s[:, None],
                        other=0)
            p, alpha, m_i, l_i = _softmax_step(x, m_i, l_i)
            pv = _pv(p, _fp8_operand(fp8_to_f16(c), dtype), USE_DOT, DOT_PREC, UPCAST) * v_sc
            if s0 + BLOCK_N > sv_len:
                from_w = nmask & (n >= sv_len)
                vw = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + (n2 % Cw) * stride_wvn + d[None, :],
                             mask=from_w[:, None], other=0.0)
                pv += _pv(p, vw, USE_DOT, DOT_PREC, UPCAST)
            acc = acc * alpha[:, None] + pv
        else:
            if QUANT == 0:
                v = tl.load(sv_ptr + b * stride_svb + h * stride_svh + n2 * stride_svn + d[None, :],
                            mask=from_s[:, None], other=0.0)
            else:
                v = _load_per_token(sv_ptr, svs_ptr, svm_ptr, b * stride_svb + h * stride_svh + n2 * stride_svn,
                                    b * stride_vsb + h * stride_vsh + n2 * stride_vsn, from_s[:, None], dtype,
                                    BITS, G, BLOCK_N, D)
            if s0 + BLOCK_N > sv_len:
                from_w = nmask & (n >= sv_len)
                v += tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + (n2 % Cw) * stride_wvn + d[None, :],
                             mask=from_w[:, None], other=0.0)
            m_i, l_i, acc = _online_update(x, v, m_i, l_i, acc, USE_DOT, DOT_PREC, UPCAST)
        if SCORE:
            tl.store(logit_row + n[None, :], x, mask=gmask[:, None] & nmask[None, :])

    # -- the full-precision ring: virtual [max(lo, s_len), hi) -> ring slots r = j - s_len
    r_lo = tl.maximum(lo, s_len) - s_len
    r_hi = hi - s_len
    for r0 in range(r_lo, r_hi, BLOCK_N):
        r, rmask, valid = ring_tile(win_pos_ptr + b * stride_wpb, r0, r_hi, win_lo, BLOCK_N)
        r2 = r[:, None]
        k = tl.load(wk_ptr + b * stride_wkb + h * stride_wkh + r2 * stride_wkn + d[None, :], mask=valid[:, None],
                    other=0.0)
        v = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + r2 * stride_wvn + d[None, :], mask=valid[:, None],
                    other=0.0)
        x = tl.where(valid[None, :], _qk(q, tl.trans(k), USE_DOT, DOT_PREC, UPCAST) * sm_scale, float("-inf"))
        m_i, l_i, acc = _online_update(x, v, m_i, l_i, acc, USE_DOT, DOT_PREC, UPCAST)
        if SCORE:
            tl.store(logit_row + Cs + r[None, :], x, mask=gmask[:, None] & rmask[None, :])

    # partial results of this split: un-normalized acc, and (m, l)
    tl.store(part_acc_ptr + b * stride_ab + hq[:, None] * stride_ah + sp * stride_as + d[None, :], acc,
             mask=gmask[:, None])
    ml = part_ml_ptr + b * stride_mb + hq * stride_mh + sp * stride_ms
    tl.store(ml + 0, m_i, mask=gmask)
    tl.store(ml + 1, l_i, mask=gmask)


@triton.jit
def _decode_stage2(
    part_acc_ptr, part_ml_ptr, out_ptr, stats_ptr, logit_ptr, s_len_ptr, seed_ptr, step_ptr, tau_ptr,
    NUM_SPLITS, Cs, Cw, layer, step_val, tau_val, stride_step, stride_tau,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, stride_ob, stride_oh, stride_lb, stride_lh,
    stride_tb, stride_th,
    D: tl.constexpr, SPLITS_P2: tl.constexpr, SCORE_MODE: tl.constexpr, STEP_PTR: tl.constexpr,
    TAU_PTR: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # program (b, query head, column block): block 0 merges the splits by log-sum-exp and writes the output (H2O:
    # and the row's (max, sum)); Keyformer: every block turns its logits into y = (x + g) / tau in place and
    # writes the block's (max, sum) of y, merged by stage 3
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    cb = tl.program_id(2)
    st = stats_ptr + b * stride_tb + hq * stride_th + cb * 2
    if cb == 0:
        s = tl.arange(0, SPLITS_P2)
        smask = s < NUM_SPLITS
        d = tl.arange(0, D)
        ml = part_ml_ptr + b * stride_mb + hq * stride_mh + s * stride_ms
        m = tl.load(ml + 0, mask=smask, other=_MASKED)
        l = tl.load(ml + 1, mask=smask, other=0.0)
        M = tl.max(m, 0)
        w = tl.exp(m - M)
        L = tl.sum(w * l, 0)
        acc = tl.load(part_acc_ptr + b * stride_ab + hq * stride_ah + s[:, None] * stride_as + d[None, :],
                      mask=smask[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, 0) / L
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty))
        if SCORE_MODE == 1:
            tl.store(st, M)
            tl.store(st + 1, L)
    if SCORE_MODE == 2:
        seed = tl.load(seed_ptr + b)
        step = step_val
        tau = tau_val
        if STEP_PTR:  # one for the batch (stride 0) or one per sequence
            step = tl.load(step_ptr + b * stride_step)
        if TAU_PTR:
            tau = tl.load(tau_ptr + b * stride_tau).to(tl.float32)
        s_len = tl.load(s_len_ptr + b)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (c < s_len) | ((c >= Cs) & (c < Cs + Cw))  # ring logits were all written (-inf if free)
        row = logit_ptr + b * stride_lb + hq * stride_lh
        x = tl.load(row + c, mask=ok, other=float("-inf"))
        # the noisy logit y = (x + g) / tau replaces x in the scratch: stage 3 reads it, no second draw (g up to
        # the constant gumbel.G_SHIFT, the same for the whole row: the softmax does not see it)
        inv_tau = 1.0 / tau
        y = x * inv_tau + gumbel_lg2(seed, layer, step, hq, 0, c) * (-_LN2 * inv_tau)
        tl.store(row + c, y, mask=ok)
        y = tl.where(ok, y, float("-inf"))
        m2 = tl.maximum(tl.max(y, 0), _MASKED)  # finite: an all-masked block gives sum 0, not NaN
        tl.store(st, m2)
        tl.store(st + 1, tl.sum(tl.exp(y - m2), 0))


@triton.jit
def _decode_stage3(
    logit_ptr, stats_ptr, acc_ptr, s_len_ptr, win_pos_ptr, win_lo_ptr, Cs, Cw, NCB,
    stride_lb, stride_lh, stride_cb, stride_ch, stride_wpb, stride_tb, stride_th,
    GRP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, NCB_P2: tl.constexpr,
):
    # scores_acc[b, h, c] += sum over the group's query heads of exp(y - M) / L, held columns only
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_len = tl.load(s_len_ptr + b)
    win_lo = tl.load(win_lo_ptr + b)
    in_w = (c >= Cs) & (c < Cs + Cw)
    pos = tl.load(win_pos_ptr + b * stride_wpb + (c - Cs), mask=in_w, other=-1)
    held = (c < s_len) | (in_w & (pos >= win_lo))
    g = tl.arange(0, BLOCK_G)
    hq = h * GRP + g
    gmask = g < GRP
    # the row (max, sum) of each query head: one pair (H2O) or one per stage-2 column block (Keyformer), merged
    k = tl.arange(0, NCB_P2)
    st = stats_ptr + b * stride_tb + hq[:, None] * stride_th + k[None, :] * 2
    kmask = gmask[:, None] & (k[None, :] < NCB)
    mk = tl.load(st, mask=kmask, other=_MASKED)
    lk = tl.load(st + 1, mask=kmask, other=0.0)
    M = tl.max(mk, 1)
    L = tl.sum(lk * tl.exp(mk - M[:, None]), 1)
    L = tl.where(gmask, L, 1.0)
    x = tl.load(logit_ptr + b * stride_lb + hq[:, None] * stride_lh + c[None, :],
                mask=gmask[:, None] & held[None, :], other=float("-inf"))
    # x: the logits (H2O) or, after stage 2, the noisy logits (Keyformer); M, L: their row max and sum
    f = tl.sum(tl.exp(x - M[:, None]) / L[:, None], 0)
    a = acc_ptr + b * stride_cb + h * stride_ch + c
    tl.store(a, tl.load(a, mask=held, other=0.0) + f, mask=held)


@dataclass
class DecodeWorkspace:
    """Caller-allocated scratch for `decode_attention`; reuse it across steps (and inside a CUDA graph).

    out (B, Hq, D) model dtype (returned by each call, overwritten by the next); part_acc (B, Hq, S, D) fp32;
    part_ml (B, Hq, S, 2) fp32; stats (B, Hq, K, 2) fp32 (the score rows' (max, sum): K = 1, or one per
    STAGE2_BLOCK_C logit columns for Keyformer); logits (B, Hq, Cs + Cw) fp32 or None (score_mode 0).
    S = num_splits; block_n, num_warps, num_stages: the stage-1 launch configuration.
    """

    out: torch.Tensor
    part_acc: torch.Tensor
    part_ml: torch.Tensor
    stats: torch.Tensor
    logits: torch.Tensor | None
    num_splits: int
    block_n: int
    num_warps: int
    num_stages: int
    use_dot: bool
    kivi_tc: bool = True
    val_cc: bool = True
    vs_vec: bool = True
    ngt: int = 4
    block_m: int = 16
    kivi_cc: bool = False
    pv_chain: bool = False
    h2: bool = False
    prefetch: int = 0
    q_t: torch.Tensor | None = None


def default_config(slots: KVSlots, grp: int) -> dict:
    """Stage-1 launch configuration picked by jobs/bench_kernels.py on an H200 (B=32, ctx=4096, head_dim 128)."""
    if slots.quant == "channel":  # kernels.decode_kivi (kivi_tc); block_n / use_dot: the generic path's
        return dict(block_n=min(32, slots.group_size), num_warps=4, num_stages=3, use_dot=True)
    if slots.quant in ("none", "fp8"):  # fp8: the model-dtype path's, untuned
        return dict(block_n=128, num_warps=4, num_stages=1, use_dot=True)
    return dict(block_n=64, num_warps=4, num_stages=2, use_dot=grp >= 4)


def decode_workspace(q: torch.Tensor, slots: KVSlots, score_mode: int = 0, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     use_dot: bool | None = None, kivi_tc: bool = True,
                     ngt: int | None = None, val_cc: bool = True,
                     vs_vec: bool = True, kivi_cc: bool | None = None,
                     pv_chain: bool | None = None, h2: bool | None = None,
                     prefetch: int | None = None, qt: bool | None = None) -> DecodeWorkspace:
    """Allocate the scratch for `decode_attention(q, slots, ..., score_mode)`.

    num_splits: programs per (sequence, KV head); default: enough for about `SPLIT_TARGET` programs per SM, at least
    MIN_SPLIT_TOKENS tokens each. block_n: tokens per tile (per-channel KIVI keys: <= group_size). use_dot:
    tensor-core tl.dot for q.K and P.V, else CUDA-core broadcast-multiply-reduce (no 16-row padding for MHA).
    kivi_tc: per-channel KIVI storage goes through `kernels.decode_kivi` (tensor-core keys, in-place code decode;
    ngt key groups per tile; val_cc: CUDA-core P.V for one query head per KV head; vs_vec: one contiguous value
    scale/min row per token); else through the generic stage 1. kivi_cc: per-channel KIVI goes through a CUDA-core
    stage 1: `kernels.decode_kivi_cc` with one query head per KV head (the default where `cc_supported`),
    `kernels.decode_kivi_gqa` with several (the default where `gqa_supported`: on an H200 with h2 and L2 prefetch
    1.35-1.7x faster than `kernels.decode_kivi` for 2 bits, 1.03-1.24x for 4 bits); num_warps then sets its tile (8
    word rows per warp); pv_chain: the MHA kernel's P.V spelling (`kernels.decode_kivi_cc.pv_chain_default`: by
    Triton version); h2: the CUDA-core KIVI stage 1s decode two codes and do two multiply-adds per instruction
    (fp16x2; keys: sums over a lane's channels of a tile in fp16 (8 for MHA, 32 for GQA), values: over a row's
    tokens of a tile (16 / 32), then in fp32; output within ~1 bf16 ulp of the fp32 sums, relative 3.5e-3 (MHA) /
    5.7-6.8e-3 (GQA) on an H200): the default for bf16 / fp16 queries; float32 queries keep fp32 sums unless asked;
    prefetch: the CUDA-core KIVI stage 1s ask L2 for the quantized tile that many tiles ahead while a tile computes
    (0: off; the default PREFETCH_TILES); qt: `kernels.decode_kivi_gqa` reads q from a heads-last copy made each
    call (`q_t`, (B, H, D, heads to a power of two); the default after Triton 3.6,
    `kernels.decode_kivi_gqa.qt_default`). None values come from `default_config` /
    `kernels.decode_kivi.kivi_config`.
    """
    B, Hq, D = q.shape
    H = slots.win_k.shape[1]
    n = slots.cs + slots.cw
    cfg = default_config(slots, Hq // H)
    cc_ok = slots.quant == "channel" and (cc_supported(slots, D) if Hq == H else gqa_supported(slots, D, Hq // H))
    if kivi_cc and not cc_ok:
        raise ValueError("decode_workspace: kivi_cc needs per-channel KIVI storage, value code rows of head_dim // "
                         "(32 // bits) words, head_dim >= 4 * 32 // bits, and with several query heads per KV head "
                         f"(heads to a power of two) * (32 // bits) <= {GQA_MAX_CODES} and head_dim // (32 // bits) "
                         "<= 32")
    if kivi_cc is None:
        kivi_cc = cc_ok and kivi_tc
    kivi_cc = bool(kivi_cc)
    if h2 and not kivi_cc:
        raise ValueError("decode_workspace: h2 is a mode of the CUDA-core KIVI stage 1s (kivi_cc), which this "
                         "call does not use")
    h2 = kivi_cc and q.dtype != torch.float32 if h2 is None else bool(h2)
    prefetch = (PREFETCH_TILES if kivi_cc else 0) if prefetch is None else int(prefetch)
    if prefetch < 0 or (prefetch and not kivi_cc):
        raise ValueError(f"decode_workspace: prefetch={prefetch}: a count of tiles >= 0, and > 0 only for the "
                         "CUDA-core KIVI stage 1s (kivi_cc)")
    gqa_cc = kivi_cc and Hq > H
    if qt and not gqa_cc:
        raise ValueError("decode_workspace: qt is a mode of the CUDA-core GQA stage 1 (kivi_cc with several query "
                         "heads per KV head), which this call does not use")
    qt = gqa_cc and (qt_default() if qt is None else bool(qt))
    block_n = cfg["block_n"] if block_n is None else block_n
    if num_warps is None and kivi_cc:  # H200, B=16-64: kernels.decode_kivi_cc 2 warps for 2 bits (6-25% faster
        # than 4) and for 4 bits with h2 (2-40%), else 4 (10-15%); kernels.decode_kivi_gqa 2 (5-40% faster than 4
        # except at 32768 tokens, within 3% there)
        num_warps = 2 if slots.bits == 2 or h2 or Hq > H else 4
    elif num_warps is None:
        num_warps = cfg["num_warps"]
    # kernels.decode_kivi_cc: 1 and 2 stages time the same on the H200; 1 holds fewer registers
    num_stages = (1 if kivi_cc else cfg["num_stages"]) if num_stages is None else num_stages
    use_dot = cfg["use_dot"] if use_dot is None else use_dot
    if block_n < 16 or block_n & (block_n - 1) or (slots.quant == "channel" and slots.group_size % block_n):
        raise ValueError(f"decode_workspace: block_n={block_n} must be a power of two >= 16"
                         + (f" dividing group_size {slots.group_size}" if slots.quant == "channel" else ""))
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        num_splits = max(1, min(triton.cdiv(SPLIT_TARGET * sms, B * H), triton.cdiv(n, MIN_SPLIT_TOKENS), 128))
    dev = q.device
    kc = kivi_config(slots.group_size, Hq // H, ngt) if slots.quant == "channel" else {}
    return DecodeWorkspace(
        out=torch.empty(B, Hq, D, dtype=q.dtype, device=dev),
        part_acc=torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=dev),
        part_ml=torch.empty(B, Hq, num_splits, 2, dtype=torch.float32, device=dev),
        stats=torch.empty(B, Hq, score_blocks(n, score_mode), 2, dtype=torch.float32, device=dev),
        logits=torch.empty(B, Hq, n, dtype=torch.float32, device=dev) if score_mode else None,
        num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
        use_dot=bool(use_dot), kivi_tc=bool(kivi_tc), val_cc=bool(val_cc),
        vs_vec=bool(vs_vec), kivi_cc=kivi_cc, pv_chain=pv_chain_default() if pv_chain is None else bool(pv_chain),
        h2=h2, prefetch=prefetch,
        q_t=torch.zeros(B, H, D, triton.next_power_of_2(Hq // H), dtype=q.dtype, device=dev) if qt else None,
        **kc,
    )


def _check_fp8(name: str, slots: KVSlots) -> None:
    """fp8 storage: s_k, s_v (B, H, Cs, D) uint8 codes and s_ks, s_vs (B, H, 1) float32 scales."""
    B, H, _, D = slots.win_k.shape
    for label, t, dtype, shape in (("s_k", slots.s_k, torch.uint8, None), ("s_v", slots.s_v, torch.uint8, None),
                                   ("s_ks", slots.s_ks, torch.float32, (B, H, 1)),
                                   ("s_vs", slots.s_vs, torch.float32, (B, H, 1))):
        shape = shape or (B, H, slots.cs, D)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            got = None if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise ValueError(f"{name}: fp8 storage needs {label} {shape} {dtype}, got {got}")


def _check(q, slots, score_mode, scores_acc, seed, ws):
    name = "decode_attention"
    check_device(name, q)
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be (B, Hq, D), got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if slots.quant not in _QUANT_IDS:
        raise ValueError(f"{name}: slots.quant={slots.quant!r} is not one of {', '.join(_QUANT_IDS)}")
    grouped = slots.quant in ("channel", "token")
    if grouped and slots.bits not in (2, 4):
        raise ValueError(f"{name}: slots.bits={slots.bits} is not supported; use 2 or 4")
    if D < 16 or D & (D - 1):
        raise ValueError(f"{name}: head_dim {D} must be a power of two >= 16 for the Triton kernel")
    Bw, H, Cw, Dw = slots.win_k.shape
    if (Bw, Dw) != (B, D) or Hq % H:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not match the ring {tuple(slots.win_k.shape)} "
                         f"(need the same B and D, and Hq a multiple of H)")
    if Cw < 1:
        raise ValueError(f"{name}: the ring must have at least one slot (win_k has Cw={Cw})")
    if grouped:
        G, P = slots.group_size, 32 // slots.bits
        if G < 16 or G & (G - 1) or G < P or D % G:
            raise ValueError(f"{name}: group_size={G} must be a power of two >= 16 and >= {P} dividing head_dim {D}")
        if slots.quant == "channel" and slots.cs % G:
            raise ValueError(f"{name}: store capacity Cs={slots.cs} must be a multiple of group_size {G}")
    if slots.quant == "fp8":
        _check_fp8(name, slots)
    tensors = [slots.win_k, slots.win_v] + ([slots.s_k, slots.s_v] if slots.quant == "none" and slots.s_k is not None
                                            else [t for t in (slots.s_k, slots.s_v, slots.s_kc, slots.s_ks, slots.s_km,
                                                              slots.s_vc, slots.s_vs, slots.s_vm) if t is not None])
    for t in tensors + [q]:
        if t.device != q.device or t.stride(-1) != 1:
            raise ValueError(f"{name}: every cache tensor must be on {q.device} with a unit last-dim stride "
                             f"(got one on {t.device} with strides {t.stride()})")
    if grouped and (slots.s_ks.stride() != slots.s_km.stride() or slots.s_vs.stride() != slots.s_vm.stride()):
        raise ValueError(f"{name}: scale and min stores must share strides")
    if slots.win_pos.stride(-1) != 1:
        raise ValueError(f"{name}: win_pos must have a unit last-dim stride")
    if score_mode not in (0, 1, 2):
        raise ValueError(f"{name}: score_mode={score_mode} must be 0 (none), 1 (H2O) or 2 (Keyformer)")
    if score_mode and scores_acc is not None:
        want = (B, H, slots.cs + Cw)
        if tuple(scores_acc.shape) != want or scores_acc.dtype != torch.float32 or scores_acc.stride(-1) != 1:
            raise ValueError(f"{name}: scores_acc must be {want} float32 (unit last stride), got "
                             f"{tuple(scores_acc.shape)} {scores_acc.dtype}")
        if score_mode == 2 and (seed is None or seed.shape != (B,)):
            got = None if seed is None else tuple(seed.shape)
            raise ValueError(f"{name}: score_mode 2 needs seed (B,)={B} int64, got {got}")
    if ws is not None:
        ok = (ws.out.shape == q.shape and ws.out.dtype == q.dtype and ws.part_acc.shape[:2] == (B, Hq)
              and (ws.q_t is None or (ws.q_t.shape == (B, H, D, triton.next_power_of_2(Hq // H))
                                      and ws.q_t.dtype == q.dtype))
              and (not score_mode or scores_acc is None
                   or (ws.logits is not None and ws.logits.shape == (B, Hq, slots.cs + Cw)
                       and ws.stats.shape[2] >= score_blocks(slots.cs + Cw, score_mode))))
        if not ok:
            raise ValueError(f"{name}: workspace does not fit this call; build it with decode_workspace(q, slots, "
                             f"score_mode={score_mode})")


def decode_attention(
    q: torch.Tensor,
    slots: KVSlots,
    scale: float,
    score_mode: int = 0,
    scores_acc: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    layer: int = 0,
    step: int | torch.Tensor = 0,
    tau: float | torch.Tensor = 1.0,
    *,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Fused decode attention: q (B, Hq, D) model dtype -> out (B, Hq, D) model dtype.

    slots: the layer's `KVSlots` (quant none / fp8 / channel / token, bits 2 or 4 for the last two); scale: the
        logit scale.
    score_mode 1 (H2O) / 2 (Keyformer) adds into scores_acc (B, H, Cs + Cw) float32 in place; seed (B,) int64
    for score_mode 2; step and tau: Python numbers, or device tensors (int / float32) of 1 value for the batch
    or B values, one per sequence (sequences at different steps of their generation).
    workspace: from `decode_workspace`; then nothing is allocated and the returned tensor is workspace.out.
    """
    _check(q, slots, score_mode, scores_acc, seed, workspace)
    if not score_mode or scores_acc is None:
        score_mode = 0
    ws = workspace if workspace is not None else decode_workspace(q, slots, score_mode)
    B, Hq, D = q.shape
    H, Cw = slots.win_k.shape[1], slots.cw
    Cs = slots.cs
    grp = Hq // H
    qid = _QUANT_IDS[slots.quant]
    if qid == 0:
        sk = slots.s_k if slots.s_k is not None else slots.win_k
        sv = slots.s_v if slots.s_v is not None else slots.win_v
        sks = skm = svs = svm = sk
    elif qid == 3:  # e4m3 codes and (B, H, 1) scales; no mins
        sk, sks, skm, sv, svs, svm = slots.s_k, slots.s_ks, slots.s_ks, slots.s_v, slots.s_vs, slots.s_vs
    else:
        sk, sks, skm, sv, svs, svm = slots.s_kc, slots.s_ks, slots.s_km, slots.s_vc, slots.s_vs, slots.s_vm
    BLOCK_G = max(16, triton.next_power_of_2(grp)) if ws.use_dot else triton.next_power_of_2(grp)
    step_is_ptr = isinstance(step, torch.Tensor)
    tau_is_ptr = isinstance(tau, torch.Tensor)
    seed_t = seed if seed is not None else slots.s_len
    step_t = step if step_is_ptr else slots.s_len
    tau_t = tau if tau_is_ptr else slots.s_len
    step_v, tau_v = (0 if step_is_ptr else int(step)), (1.0 if tau_is_ptr else float(tau))
    for name, t in (("step", step), ("tau", tau)):
        if isinstance(t, torch.Tensor) and (t.numel() not in (1, q.shape[0]) or t.device != q.device):
            raise ValueError(f"decode_attention: {name} as a tensor must hold 1 or B={q.shape[0]} values on "
                             f"{q.device}, got {tuple(t.shape)} on {t.device}")
    stride_step = 1 if step_is_ptr and step.numel() > 1 else 0
    stride_tau = 1 if tau_is_ptr and tau.numel() > 1 else 0
    logits = ws.logits if score_mode else ws.stats
    st3 = lambda t: (t.stride(0), t.stride(1), t.stride(2)) if t.dim() >= 3 else (0, 0, 0)  # noqa: E731
    NS = ws.num_splits
    common = (
        q, ws.part_acc, ws.part_ml, logits,
        slots.s_len, slots.sv_len, slots.win_pos, slots.win_lo, slots.win_k, slots.win_v,
        sk, sks, skm, sv, svs, svm,
        float(scale), H, Cs, Cw, NS,
        q.stride(0), q.stride(1),
        *slots.win_k.stride()[:3], *slots.win_v.stride()[:3], slots.win_pos.stride(0),
        *st3(sk), *st3(sks), *st3(sv), *st3(svs),
        *ws.part_acc.stride()[:3], *ws.part_ml.stride()[:3], logits.stride(0), logits.stride(1),
    )
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if qid == 1 and ws.kivi_cc and grp == 1:
        if not cc_supported(slots, D):
            raise ValueError("decode_attention: the workspace asks for kernels.decode_kivi_cc, which does not fit "
                             "these slots (cc_supported)")
        _decode_stage1_kivi_cc[(B, H, NS)](
            *common, BITS=slots.bits, G=slots.group_size, D=D, **cc_config(slots.bits, ws.num_warps), BLOCK_R=64,
            SCORE=score_mode > 0, PV_CHAIN=ws.pv_chain, H2=ws.h2, PF=ws.prefetch, num_warps=ws.num_warps,
            num_stages=ws.num_stages, **LAUNCH,
        )
    elif qid == 1 and ws.kivi_cc:
        if not gqa_supported(slots, D, grp):
            raise ValueError("decode_attention: the workspace asks for kernels.decode_kivi_gqa, which does not fit "
                             "these slots (gqa_supported)")
        q_t = q  # a placeholder pointer unless the workspace asks for the heads-last copy
        if ws.q_t is not None:
            ws.q_t[..., :grp].copy_(q.unflatten(1, (H, grp)).transpose(2, 3))  # padding heads stay 0
            q_t = ws.q_t
        _decode_stage1_kivi_gqa[(B, H, NS)](
            *common, BITS=slots.bits, G=slots.group_size, D=D, GRP=grp, GP=triton.next_power_of_2(grp),
            **gqa_config(slots.bits, ws.num_warps, D), BLOCK_T=64, SCORE=score_mode > 0,
            DOT_PREC=prec, UPCAST=interpreting(), H2=ws.h2, PF=ws.prefetch, qt_ptr=q_t, QT=ws.q_t is not None,
            num_warps=ws.num_warps, num_stages=ws.num_stages, **LAUNCH,
        )
    elif qid == 1 and ws.kivi_tc:
        _decode_stage1_kivi[(B, H, NS)](
            *common, BITS=slots.bits, G=slots.group_size, D=D, GRP=grp, NGT=ws.ngt, BLOCK_M=ws.block_m,
            BLOCK_R=64, SCORE=score_mode > 0, VAL_CC=grp == 1 and ws.val_cc,
            VS_VEC=ws.vs_vec, DOT_PREC=prec, UPCAST=interpreting(),
            num_warps=ws.num_warps, num_stages=ws.num_stages, **LAUNCH,
        )
    else:
        _decode_stage1[(B, H, NS)](
            *common,
            QUANT=qid, BITS=slots.bits if qid in (1, 2) else 2, G=slots.group_size if qid in (1, 2) else 16, D=D,
            GRP=grp, BLOCK_G=BLOCK_G, BLOCK_N=ws.block_n, SCORE=score_mode > 0, USE_DOT=ws.use_dot,
            DOT_PREC=prec, UPCAST=interpreting(),
            num_warps=ws.num_warps, num_stages=ws.num_stages, **LAUNCH,
        )
    ncb = score_blocks(Cs + Cw, score_mode)
    _decode_stage2[(B, Hq, ncb)](
        ws.part_acc, ws.part_ml, ws.out, ws.stats, logits, slots.s_len, seed_t, step_t, tau_t,
        NS, Cs, Cw, int(layer), step_v, tau_v, stride_step, stride_tau,
        *ws.part_acc.stride()[:3], *ws.part_ml.stride()[:3], ws.out.stride(0), ws.out.stride(1),
        logits.stride(0), logits.stride(1), ws.stats.stride(0), ws.stats.stride(1),
        D=D, SPLITS_P2=triton.next_power_of_2(NS), SCORE_MODE=score_mode, STEP_PTR=step_is_ptr,
        TAU_PTR=tau_is_ptr, BLOCK_C=STAGE2_BLOCK_C, **LAUNCH,
    )
    if score_mode:
        BLOCK_C = STAGE3_BLOCK_C
        _decode_stage3[(B, H, triton.cdiv(Cs + Cw, BLOCK_C))](
            ws.logits, ws.stats, scores_acc, slots.s_len, slots.win_pos, slots.win_lo, Cs, Cw, ncb,
            ws.logits.stride(0), ws.logits.stride(1), scores_acc.stride(0), scores_acc.stride(1),
            slots.win_pos.stride(0), ws.stats.stride(0), ws.stats.stride(1), GRP=grp,
            BLOCK_G=triton.next_power_of_2(grp), BLOCK_C=BLOCK_C, NCB_P2=triton.next_power_of_2(ncb),
            num_warps=STAGE3_WARPS, **LAUNCH,
        )
    return ws.out
