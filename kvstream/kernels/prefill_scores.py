"""Flash-style prefill score accumulation for Keyformer / H2O (same semantics as `prefill_scores_ref`).

score[b, h, j] = sum over query heads of KV head h and causal valid rows i >= j of
softmax_j((q_i . k_j * scale + g_ij) / tau),   g = 0 for H2O, Gumbel noise keyed by unpadded positions
(`gumbel_ref.gumbel(seed[b], layer, 0, q_head, pos_i, pos_j)`, hashed in registers) for Keyformer.

Never holds the T x T matrix, in two passes over (q, k) tiles:
- pass 1, one program per (b, query head, BLOCK_M rows): online row max m_i and sum l_i over the row's allowed
  columns (causal, both tokens valid: left padding never counts) -> the row's log-sum-exp, log2 units, (B, Hq, T)
  fp32;
- pass 2, one program per (b, KV head, BLOCK_N columns): for every query head of the group and every row block
  at or below the diagonal, recompute the logits, p = exp(y - lse_i), and accumulate the column sums.
Pass 2 recomputes q.k, so the scoring costs about two QK^T products (no P.V), plus the noise hash. For H2O,
`row_lse` (the attention's own log-sum-exp per row) replaces pass 1; for Keyformer at tau = 1 it is pass 1's
stabilizer (>= every noise-free logit of the row, so exp(x - lse) <= 1): no running max, no rescaling, the sums
kept per element like pass 2's and reduced once.
At tau = 1 (the prefill's, by the design) the noise enters as a weight: exp(x + g) = exp(x) * exp(g), so pass 1
keeps the noise-free row max (any stabilizer gives the same normalizer; exp(g) < 2**24 cannot overflow) and both
passes draw `gumbel.weight_from_keys` (one reciprocal) instead of adding lg2-based noise into the logit.
Both passes work in log2 units (exp2, the scale and log2(e) folded into one multiply) and treat interior tiles
apart: when the batch row's padding is a prefix (left padding, what the cache passes) the tiles strictly below
the diagonal and inside the sequence need no mask at all, so an element costs a multiply-add, an exp2 and an
add; only diagonal, edge and padded tiles take the masked path. Pass 2 adds into a (BLOCK_M, BLOCK_N)
accumulator and reduces it over rows once at the end (no per-tile cross-warp column reduction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstream.kernels.gumbel import col_key, lg2_from_keys, row_key, weight_from_keys
from kvstream.kernels.triton_util import LOG2E as _LOG2E
from kvstream.kernels.triton_util import LAUNCH, check_device, dot, interpreting

# launch configuration (block sizes are capped to the sequence for short prompts), the fastest in
# jobs/bench_kernels.py on an H200; with noise (Keyformer) the hash makes narrower column tiles pay off
CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
NOISE_CONFIG = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _logits2(q, k, off, rk, ck, c_qk, c_t, NOISE: tl.constexpr, WEIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
             UPCAST: tl.constexpr):
    """(BM, BN) logits in log2 units less the rows' offsets off (BM,), unmasked: y * log2(e) - off = q.k * c_qk
    - off (+ g * c_g), y = (q.k * scale + g) / tau,
    with g up to the constant `gumbel.G_SHIFT` (it shifts every logit alike): t * c_t, c_t = -ln 2 * c_g.
    WEIGHT (noise at tau = 1): the noise is left out of the logits; `_weight` gives it as a factor. rk (BM,) and
    ck (BN,): the rows' and columns' noise keys (`gumbel.row_key`, `gumbel.col_key`)."""
    x = tl.fma(dot(q, tl.trans(k), DOT_PREC, UPCAST), c_qk, -off[:, None])
    if NOISE and not WEIGHT:
        x += lg2_from_keys(rk[:, None], ck[None, :]) * c_t
    return x


@triton.jit
def _weight(p, rk, ck, WEIGHT: tl.constexpr):
    """p * exp(g) up to a constant per call (tau = 1), or p as it is."""
    if WEIGHT:
        p = p * weight_from_keys(rk[:, None], ck[None, :])
    return p


@triton.jit
def _add_weighted(acc, p, rk, ck, WEIGHT: tl.constexpr):
    """acc + `_weight(p)`, one multiply-add an element."""
    if WEIGHT:
        return tl.fma(p, weight_from_keys(rk[:, None], ck[None, :]), acc)
    else:
        return acc + p


@triton.jit
def _allowed(i, j, vi, vj, T):
    """(BM, BN) causal mask over valid tokens inside the sequence."""
    return (j[None, :] <= i[:, None]) & vi[:, None] & vj[None, :] & (j[None, :] < T) & (i[:, None] < T)


@triton.jit
def _prefill_row_stats(
    q_ptr, k_ptr, valid_ptr, pos_ptr, first_ptr, seed_ptr, stats_ptr,
    sm_scale, inv_tau, layer, Hq, T,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb,
    GRP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NOISE: tl.constexpr, WEIGHT: tl.constexpr, FIXED_M: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // Hq).to(tl.int64)
    hq = pid % Hq
    h = hq // GRP
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < T
    d = tl.arange(0, D)
    vi = tl.load(valid_ptr + b * stride_vb + i, mask=imask, other=0) != 0
    pi = tl.load(pos_ptr + b * T + i, mask=imask, other=0)
    seed = 0
    if NOISE:
        seed = tl.load(seed_ptr + b)
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + i[:, None] * stride_qt + d[None, :], mask=imask[:, None],
                other=0.0)
    c_qk = sm_scale * inv_tau * _LOG2E
    c_t = -inv_tau  # -ln 2 * c_g, c_g = log2(e) / tau
    first = tl.load(first_ptr + b)
    rk = row_key(seed, layer, 0, hq, pi)  # the rows' share of the noise hash, once
    i0 = tl.program_id(1) * BLOCK_M
    st = stats_ptr + (b * Hq + hq) * T + i
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    m_off = tl.zeros((BLOCK_M,), tl.float32)  # subtracted inside the logits' multiply-add
    if FIXED_M:  # the stabilizer is given (the plain attention's log-sum-exp, log2 units): no running max
        m_i = tl.load(st, mask=imask, other=0.0)
        m_off = m_i
    j_end = tl.minimum(i0 + BLOCK_M, T)  # causal: columns <= the block's last row
    for j0 in range(0, j_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < T
        vj = tl.load(valid_ptr + b * stride_vb + j, mask=jmask, other=0) != 0
        pj = tl.load(pos_ptr + b * T + j, mask=jmask, other=0)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + j[:, None] * stride_kt + d[None, :], mask=jmask[:, None],
                    other=0.0)
        ck = col_key(pj)
        y = _logits2(q, k, m_off, rk, ck, c_qk, c_t, NOISE, WEIGHT, DOT_PREC, UPCAST)
        if (j0 < first) | (j0 + BLOCK_N - 1 > i0) | (i0 + BLOCK_M > T):  # padding, diagonal or edge: masked
            y = tl.where(_allowed(i, j, vi, vj, T), y, float("-inf"))
        if FIXED_M:  # exp2(y - m) <= 1 (m >= the row's max) times w < 2**24: one multiply-add into the tile
            acc = _add_weighted(acc, tl.exp2(y), rk, ck, WEIGHT)
        else:
            m_new = tl.maximum(m_i, tl.max(y, 1))
            e = _weight(tl.exp2(y - m_new[:, None]), rk, ck, WEIGHT)
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(e, 1)
            m_i = m_new
    if FIXED_M:
        l_i = tl.sum(acc, 1)
    # log2-sum-exp2 of the row (rows with no allowed column, padding: masked in pass 2 whatever is stored)
    tl.store(st, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), mask=imask)


@triton.jit
def _prefill_col_sums(
    q_ptr, k_ptr, valid_ptr, pos_ptr, first_ptr, seed_ptr, stats_ptr, out_ptr,
    sm_scale, inv_tau, layer, H, T,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb,
    GRP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NOISE: tl.constexpr, WEIGHT: tl.constexpr, FIXED_M: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < T
    d = tl.arange(0, D)
    vj = tl.load(valid_ptr + b * stride_vb + j, mask=jmask, other=0) != 0
    pj = tl.load(pos_ptr + b * T + j, mask=jmask, other=0)
    seed = 0
    if NOISE:
        seed = tl.load(seed_ptr + b)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + j[:, None] * stride_kt + d[None, :], mask=jmask[:, None],
                other=0.0)
    c_qk = sm_scale * inv_tau * _LOG2E
    c_t = -inv_tau  # -ln 2 * c_g, c_g = log2(e) / tau
    j0 = tl.program_id(1) * BLOCK_N
    pad_cols = j0 < tl.load(first_ptr + b)  # some column of the block may be padding
    ck = col_key(pj)  # the columns' share of the noise hash, once
    colacc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    i_start = (j0 // BLOCK_M) * BLOCK_M  # causal: rows >= the block's first column
    for g in range(GRP):
        hq = h * GRP + g
        for i0 in range(i_start, T, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
            imask = i < T
            vi = tl.load(valid_ptr + b * stride_vb + i, mask=imask, other=0) != 0
            pi = tl.load(pos_ptr + b * T + i, mask=imask, other=0)
            q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + i[:, None] * stride_qt + d[None, :],
                        mask=imask[:, None], other=0.0)
            lse2 = tl.load(stats_ptr + (b * H * GRP + hq) * T + i, mask=imask, other=0.0)  # log2 units, pass 1
            rk = row_key(seed, layer, 0, hq, pi)
            p = tl.exp2(_logits2(q, k, lse2, rk, ck, c_qk, c_t, NOISE, WEIGHT, DOT_PREC, UPCAST))
            if pad_cols | (i0 < j0 + BLOCK_N - 1) | (i0 + BLOCK_M > T):  # padding, diagonal or edge: masked
                p = tl.where(_allowed(i, j, vi, vj, T), p, 0.0)  # before the weight: 0 * w = 0 (w is finite)
            colacc = _add_weighted(colacc, p, rk, ck, WEIGHT)
    tl.store(out_ptr + (b * H + h) * T + j, tl.sum(colacc, 0), mask=jmask)


def prefill_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    tau: float = 1.0,
    noise: bool = False,
    seed: torch.Tensor | None = None,
    layer: int = 0,
    chunk: int = 512,
    row_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, Hq, T, D), k (B, H, T, D) model dtype, valid (B, T) bool (left padding False) -> (B, H, T) float32.

    Per key token: the column sum over causal valid query rows (and the query heads sharing its KV head) of
    softmax((q.k * scale + g) / tau); g Gumbel noise from seed (B,) int64 when noise=True. `chunk` is accepted
    for signature parity with the reference; the kernel tiles by its own block sizes and never holds T x T.
    row_lse (B, Hq, T) float32, tau 1 only: the rows' log-sum-exp of the plain logits from the attention that
    already ran (e.g. the flash kernel's). H2O: it is the normalizer, pass 1 is skipped and the scoring is one
    QK^T pass. Keyformer: pass 1's stabilizer (see the module docstring); the scores do not depend on it.
    """
    name = "prefill_scores"
    check_device(name, q)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{name}: q and k must be (B, Hq, T, D) and (B, H, T, D); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, T, D = q.shape
    H = k.shape[1]
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or Hq % H:
        raise ValueError(f"{name}: k {tuple(k.shape)} does not match q {tuple(q.shape)} (same B, T, D; Hq % H == 0)")
    if D < 16 or D & (D - 1):
        raise ValueError(f"{name}: head_dim {D} must be a power of two >= 16 for the Triton kernel")
    if valid.shape != (B, T) or valid.dtype != torch.bool:
        raise ValueError(f"{name}: valid must be (B, T)={(B, T)} bool, got {tuple(valid.shape)} {valid.dtype}")
    if noise and (seed is None or seed.shape != (B,)):
        got = None if seed is None else tuple(seed.shape)
        raise ValueError(f"{name}: noise=True needs seed (B,)={B} int64, got {got}")
    if row_lse is not None:
        if tau != 1.0:
            raise ValueError(f"{name}: row_lse is the plain attention's log-sum-exp; it needs tau=1, got {tau}")
        if tuple(row_lse.shape) != (B, Hq, T) or row_lse.device != q.device:
            raise ValueError(f"{name}: row_lse must be (B, Hq, T)={(B, Hq, T)} on {q.device}, "
                             f"got {tuple(row_lse.shape)} on {row_lse.device}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or q.device != k.device or valid.device != q.device:
        raise ValueError(f"{name}: q, k, valid must share a device and have a unit last-dim stride")
    out = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if B * H * T == 0:
        return out.zero_()
    v8 = valid.to(torch.int8).contiguous()
    pos = (valid.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1).contiguous()  # (B, T) unpadded positions
    # first real token of each row when its padding is a prefix (tiles past it need no mask), else T: all masked
    first = T - valid.sum(-1, dtype=torch.int32)
    prefix = (valid == (torch.arange(T, device=q.device) >= first[:, None])).all(-1)
    first = torch.where(prefix, first, T).to(torch.int32).contiguous()
    if row_lse is None:
        stats = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    else:  # the attention's own log-sum-exp, in log2 units; rows with nothing allowed (padding): masked anyway
        stats = (row_lse.float() * _LOG2E.value).nan_to_num(neginf=0.0).contiguous()
    seed_t = seed if noise else pos
    cfg = NOISE_CONFIG if noise else CONFIG
    cap = max(16, triton.next_power_of_2(T))
    BM, BN = min(cfg["block_m"], cap), min(cfg["block_n"], cap)
    common = dict(GRP=Hq // H, D=D, BLOCK_M=BM, BLOCK_N=BN, NOISE=bool(noise), WEIGHT=bool(noise) and tau == 1.0,
                  FIXED_M=bool(noise) and row_lse is not None,
                  DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=interpreting(),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **LAUNCH)
    strides = (*q.stride()[:3], *k.stride()[:3], v8.stride(0))
    if row_lse is None or noise:
        _prefill_row_stats[(B * Hq, triton.cdiv(T, BM))](
            q, k, v8, pos, first, seed_t, stats, float(scale), 1.0 / float(tau), int(layer), Hq, T, *strides, **common)
    _prefill_col_sums[(B * H, triton.cdiv(T, BN))](
        q, k, v8, pos, first, seed_t, stats, out, float(scale), 1.0 / float(tau), int(layer), H, T, *strides, **common)
    return out
