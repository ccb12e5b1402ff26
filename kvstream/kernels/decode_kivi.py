"""Stage 1 of `kernels.decode_attention` for KIVI storage (per-channel keys, per-token values).

One program per (sequence b, KV head h, split), like the generic stage 1, but built so that a dequantized
element costs a handful of instructions and never a layout change of its own:
- Codes are read in place. Code i of an int32 word is masked where it lies and OR-ed into the mantissa of
  2**23 (`_codes`): one AND/OR (a single LOP3) and one FADD give code * 2**(bits * j) exactly, j the code's
  place in the word (codes above bit 22 are read from word >> 20, one shift per word). The power of two is
  taken out once per token (keys) or folded into the value scale.
- Keys on the tensor cores, several key groups per tile: rows of the MMA are (query head of the group, key
  group of the tile) pairs, row (g, j) holding q_g * scale_j. One tile of BLOCK_N = NGT * G tokens is then a
  single (BLOCK_M, D) x (D, BLOCK_N) product, and row (g, j) keeps only the tokens of group j: each row is its
  own online softmax (max, sum, P.V), merged per query head by log-sum-exp at the end of the split, so the
  per-channel scales cost D multiplies per group and not per element.
- Values: with one query head per KV head (VAL_CC), on the CUDA cores: the head's logits are the owning rows'
  sum, and P.V accumulates per token in code units (p * scale * code, plus p * min per group), reduced over
  tokens and scaled by 2**-(B j) once per split: no shared-memory pass, three instructions per element. With
  several query heads, dequantized in registers and multiplied on the tensor cores with the rows'
  probabilities. Value scale/min are read as one contiguous row per token (VS_VEC) and widened in registers.
  Values of slots [sv_len, s_len) come from the full-precision ring, as in the generic path.
- Lazy rescaling: the running max of a row moves only when a tile's max exceeds it by more than 8 (log2
  units), so the accumulators are rescaled a few times per split, not once per tile (p <= 2**8 is exact enough
  in fp32 and bf16).
Logits are kept in log2 units inside (q pre-scaled by log2(e)); what leaves (row max, logit scratch) is in
natural units, the contract of stage 2 / 3.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvstream.kernels.triton_util import LN2 as _LN2
from kvstream.kernels.triton_util import LOG2E as _LOG2E
from kvstream.kernels.triton_util import MASKED as _MASKED
from kvstream.kernels.triton_util import dot, masked_to_f32, ring_tile, split_bounds

_LAZY = tl.constexpr(8.0)


@triton.jit
def _place(i, BITS: tl.constexpr, F16: tl.constexpr):
    """Code index i in a word -> (shift, j): the code is read from (word >> shift) at bit BITS * j, low enough that
    code * 2**(BITS * j) is exact in float32 (< 2**23) and finite in the dot's dtype: float16 tops out at 65504,
    so there code * 2**(BITS * j) < 2**16 (two halves of the word; bfloat16 has float32's range)."""
    LIM: tl.constexpr = 16 if F16 else 23
    SH: tl.constexpr = 16 if F16 else 20
    hi = i >= (LIM // BITS)
    return tl.where(hi, SH, 0).to(tl.uint32), tl.where(hi, i - SH // BITS, i)


@triton.jit
def _codes(words, shift, mask):
    """int32 words (broadcast) -> fp32 code * 2**(BITS * j), exactly: the code masked in place (< 2**23)."""
    return masked_to_f32(words.to(tl.uint32, bitcast=True) >> shift, mask)


@triton.jit
def _online_dot(x, v, m_i, l_i, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step with P.V on the tensor cores: logits x (rows, T) in log2 units, values v (T, D) in
    the model dtype; (m, l, acc) of the rows."""
    m_new = tl.maximum(m_i, tl.max(x, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(x - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _load_tile(s0, s_hi, sv_len, sk_ptr, sks_ptr, skm_ptr, sv_ptr, svs_ptr, svm_ptr, kbase, ksbase, vbase, vsbase,
               stride_skn, stride_ksn, stride_svn, stride_vsn, jr, rmask, d, wk_i, d3, n3, vw_i,
               P: tl.constexpr, G: tl.constexpr, D: tl.constexpr, VS_VEC: tl.constexpr):
    """The raw (packed) loads of the tile at s0: key words (D, W, 1), key scale/min rows (BLOCK_M, D), value words
    (BLOCK_N, DW, 1), value scale/min (BLOCK_N, D // G, 1) or (BLOCK_N, DW, 1). Nothing at or past s_hi."""
    kw = tl.load(sk_ptr + kbase + (s0 // P + wk_i) * stride_skn + d3, mask=(s0 + wk_i * P) < s_hi, other=0)
    grow = s0 // G + jr
    srow = ksbase + grow[:, None] * stride_ksn + d[None, :]
    gok = ((grow * G < s_hi) & rmask)[:, None]
    sc = tl.load(sks_ptr + srow, mask=gok, other=0.0)
    mn = tl.load(skm_ptr + srow, mask=gok, other=0.0)
    nv = s0 + n3
    from_s = (nv < s_hi) & (nv < sv_len)
    vw = tl.load(sv_ptr + vbase + nv * stride_svn + vw_i, mask=from_s, other=0)
    if VS_VEC:
        vcol = tl.arange(0, D // G)[None, :, None]
    else:
        vcol = (vw_i * P) // G
    vsc = tl.load(svs_ptr + vsbase + nv * stride_vsn + vcol, mask=from_s, other=0.0)
    vmn = tl.load(svm_ptr + vsbase + nv * stride_vsn + vcol, mask=from_s, other=0.0)
    return kw, sc, mn, vw, vsc, vmn


@triton.jit
def _decode_stage1_kivi(
    q_ptr, part_acc_ptr, part_ml_ptr, logit_ptr,
    s_len_ptr, sv_len_ptr, win_pos_ptr, win_lo_ptr, wk_ptr, wv_ptr,
    sk_ptr, sks_ptr, skm_ptr, sv_ptr, svs_ptr, svm_ptr,
    sm_scale, H, Cs, Cw, NUM_SPLITS,
    stride_qb, stride_qh,
    stride_wkb, stride_wkh, stride_wkn, stride_wvb, stride_wvh, stride_wvn, stride_wpb,
    stride_skb, stride_skh, stride_skn, stride_ksb, stride_ksh, stride_ksn,
    stride_svb, stride_svh, stride_svn, stride_vsb, stride_vsh, stride_vsn,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GRP: tl.constexpr,
    NGT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    SCORE: tl.constexpr, VAL_CC: tl.constexpr, VS_VEC: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    F16: tl.constexpr = dtype == tl.float16
    P: tl.constexpr = 32 // BITS
    BLOCK_N: tl.constexpr = NGT * G
    BLOCK_G: tl.constexpr = BLOCK_M // NGT
    W: tl.constexpr = BLOCK_N // P  # key words per channel in a tile
    DW: tl.constexpr = D // P  # value words per token
    CMASK: tl.constexpr = (1 << BITS) - 1
    s_len, sv_len, win_lo, lo, hi = split_bounds(b, sp, s_len_ptr, sv_len_ptr, win_lo_ptr, Cw, NUM_SPLITS, BLOCK_N)

    # rows: r = g * NGT + j  (query head g of this KV head, key group j of the tile); BLOCK_G = BLOCK_M // NGT
    # head slots, those >= GRP pad the MMA to 16 rows
    r = tl.arange(0, BLOCK_M)
    gr = r // NGT
    jr = r % NGT
    rmask = gr < GRP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * GRP + gr)[:, None] * stride_qh + d[None, :], mask=rmask[:, None],
                other=0.0).to(tl.float32) * (sm_scale * _LOG2E)
    m_i = tl.full((BLOCK_M,), _MASKED, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)

    # per-token constants of a tile: group, and 2**-(BITS * j) of the token's code place
    t = tl.arange(0, BLOCK_N)
    jt = _place(t % P, BITS, F16)[1]
    inv_t = tl.exp2(-(BITS * jt).to(tl.float32))
    own = jr[:, None] == (t // G)[None, :]  # (BLOCK_M, BLOCK_N): row keeps its group's tokens
    # per-code constants: keys (D, W, P) code i of word w is token w * P + i; values (BLOCK_N, DW, P) channel
    ip = tl.arange(0, P)[None, None, :]
    shp, jp = _place(ip, BITS, F16)
    maskp = (CMASK << (BITS * jp)).to(tl.uint32)
    invp = tl.exp2(-(BITS * jp).to(tl.float32))
    wk_i = tl.arange(0, W)[None, :, None]
    d3 = d[:, None, None]
    n3 = tl.arange(0, BLOCK_N)[:, None, None]
    vw_i = tl.arange(0, DW)[None, :, None]

    s_hi = tl.minimum(hi, s_len)
    if VAL_CC:
        # one query head: the head's logits are the owning rows' sum; values on the CUDA cores with per-token
        # accumulators (acc3, in code units: times 2**-(B j) per channel at the end), no shared-memory pass
        m1 = tl.max(tl.full((BLOCK_N,), _MASKED, tl.float32), 0)
        l1 = tl.sum(tl.zeros((BLOCK_N,), tl.float32), 0)
        acc3 = tl.zeros((BLOCK_N, DW, P), tl.float32)
        accm = tl.zeros((BLOCK_N, DW, 1), tl.float32)
        accx = tl.zeros((D,), tl.float32)
    kbase = b * stride_skb + h * stride_skh
    ksbase = b * stride_ksb + h * stride_ksh
    vbase = b * stride_svb + h * stride_svh
    vsbase = b * stride_vsb + h * stride_vsh
    for s0 in range(lo, s_hi, BLOCK_N):
        kw, sc, mn, vw, vsc, vmn = _load_tile(s0, s_hi, sv_len, sk_ptr, sks_ptr, skm_ptr, sv_ptr, svs_ptr, svm_ptr,
                                              kbase, ksbase, vbase, vsbase, stride_skn, stride_ksn, stride_svn,
                                              stride_vsn, jr, rmask, d, wk_i, d3, n3, vw_i, P, G, D, VS_VEC)
        # ---- keys: x[r, t] = (q_g * s_j) . (c_t * 2**(B j)) * 2**-(B j) + q_g . m_j, own tokens only
        kc = tl.reshape(_codes(kw, shp, maskp), (D, BLOCK_N)).to(dtype)
        scf = sc.to(tl.float32)
        qm = tl.sum(q * mn.to(tl.float32), 1)
        x = dot((q * scf).to(dtype), kc, DOT_PREC, UPCAST) * inv_t[None, :] + qm[:, None]
        n = s0 + t
        live = own & (n < s_hi)[None, :] & rmask[:, None]
        if VS_VEC:  # widen the (D // G) per-token scale/min columns to the value words
            zw = tl.zeros((1, 1, G // P), tl.float32)
            vscf = tl.reshape(vsc.to(tl.float32) + zw, (BLOCK_N, DW, 1))
            vmnf = tl.reshape(vmn.to(tl.float32) + zw, (BLOCK_N, DW, 1))
        else:
            vscf = vsc.to(tl.float32)
            vmnf = vmn.to(tl.float32)
        if VAL_CC:
            xh = tl.where(n < s_hi, tl.sum(tl.where(live, x, 0.0), 0), float("-inf"))  # (BLOCK_N,)
            if SCORE:
                tl.store(logit_ptr + b * stride_lb + h * stride_lh + n, xh * _LN2, mask=n < s_hi)
            m_t = tl.max(xh, 0)
            if m_t - m1 > _LAZY:
                alpha = tl.exp2(m1 - m_t)
                l1 = l1 * alpha
                acc3 = acc3 * alpha
                accm = accm * alpha
                accx = accx * alpha
                m1 = m_t
            p1 = tl.exp2(xh - m1)
            l1 += tl.sum(p1, 0)
            p3 = p1[:, None, None]
            acc3 += (p3 * vscf) * _codes(vw, shp, maskp)
            accm += p3 * vmnf
            if s0 + BLOCK_N > sv_len:
                n2 = n[:, None]
                from_w = (n2 < s_hi) & (n2 >= sv_len)
                vx = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + (n2 % Cw) * stride_wvn + d[None, :],
                             mask=from_w, other=0.0).to(tl.float32)
                accx += tl.sum(p1[:, None] * vx, 0)
        else:
            x = tl.where(live, x, float("-inf"))
            if SCORE:  # each (query head, token) has one owning row: it stores the logit
                tl.store(logit_ptr + b * stride_lb + (h * GRP + gr)[:, None] * stride_lh + n[None, :], x * _LN2,
                         mask=live)
            # ---- online softmax per row, lazily rescaled
            m_t = tl.max(x, 1)
            if tl.max(m_t - m_i, 0) > _LAZY:
                m_new = tl.maximum(m_i, m_t)
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
            p = tl.exp2(x - m_i[:, None])
            l_i += tl.sum(p, 1)
            # ---- values: per-token codes, scale and min; slots >= sv_len from the ring
            v = tl.reshape(_codes(vw, shp, maskp) * (vscf * invp) + vmnf, (BLOCK_N, D)).to(dtype)
            if s0 + BLOCK_N > sv_len:
                n2 = n[:, None]
                from_w = (n2 < s_hi) & (n2 >= sv_len)
                v += tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + (n2 % Cw) * stride_wvn + d[None, :],
                             mask=from_w, other=0.0)
            acc += dot(p.to(dtype), v, DOT_PREC, UPCAST)
    if VAL_CC:  # back to the row form (row 0 = the head) for the ring and the merge
        ip2 = tl.arange(0, P)[None, :]
        inv2 = tl.exp2(-(BITS * _place(ip2, BITS, F16)[1]).to(tl.float32))
        a_s = tl.reshape(tl.sum(acc3, 0) * inv2 + tl.sum(accm, 0), (D,)) + accx
        acc = tl.where((r == 0)[:, None], a_s[None, :], 0.0)
        m_i = tl.where(r == 0, m1, _MASKED)
        l_i = tl.where(r == 0, l1, 0.0)

    # ---- the full-precision ring: virtual [max(lo, s_len), hi) -> ring slots rr = j - s_len; row g * NGT
    r_lo = tl.maximum(lo, s_len) - s_len
    r_hi = hi - s_len
    first = rmask & (jr == 0)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rr, in_r, valid = ring_tile(win_pos_ptr + b * stride_wpb, r0, r_hi, win_lo, BLOCK_R)
        r2 = rr[:, None]
        k = tl.load(wk_ptr + b * stride_wkb + h * stride_wkh + r2 * stride_wkn + d[None, :], mask=valid[:, None],
                    other=0.0)
        x = dot(q.to(dtype), tl.trans(k), DOT_PREC, UPCAST)
        x = tl.where(first[:, None] & valid[None, :], x, float("-inf"))
        if SCORE:  # row (g, 0) stores head g's logits (-inf where the slot is free)
            tl.store(logit_ptr + b * stride_lb + (h * GRP + gr)[:, None] * stride_lh + Cs + rr[None, :], x * _LN2,
                     mask=first[:, None] & in_r[None, :])
        v = tl.load(wv_ptr + b * stride_wvb + h * stride_wvh + r2 * stride_wvn + d[None, :], mask=valid[:, None],
                    other=0.0)
        m_i, l_i, acc = _online_dot(x, v, m_i, l_i, acc, DOT_PREC, UPCAST)

    # ---- merge the rows of each query head (log-sum-exp), store the split's partials in natural units
    m3 = tl.reshape(m_i, (BLOCK_G, NGT))
    M = tl.max(m3, 1)
    w = tl.exp2(m3 - M[:, None])
    L = tl.sum(w * tl.reshape(l_i, (BLOCK_G, NGT)), 1)
    A = tl.sum(tl.reshape(acc, (BLOCK_G, NGT, D)) * w[:, :, None], 1)
    gg = tl.arange(0, BLOCK_G)
    hq = h * GRP + gg
    gm = gg < GRP
    tl.store(part_acc_ptr + b * stride_ab + hq[:, None] * stride_ah + sp * stride_as + d[None, :], A,
             mask=gm[:, None])
    ml = part_ml_ptr + b * stride_mb + hq * stride_mh + sp * stride_ms
    tl.store(ml + 0, tl.maximum(M, _MASKED) * _LN2, mask=gm)
    tl.store(ml + 1, L, mask=gm)


def kivi_config(group_size: int, grp: int, ngt: int | None = None) -> dict:
    """Tiles for `_decode_stage1_kivi`: NGT key groups per tile (default 64 tokens or one group: the fastest on an
    H200, `jobs/bench_kernels.py`), BLOCK_M >= 16 rows of (query head, key group)."""
    ngt = max(1, 64 // group_size) if ngt is None else ngt
    return dict(ngt=ngt, block_m=max(16, triton.next_power_of_2(grp * ngt)))
