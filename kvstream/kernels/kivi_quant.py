"""Triton KIVI quantize + pack (arXiv 2402.02750), the layouts of `kernels.kivi_quant_ref`.

Asymmetric min/max round-to-nearest-even per group of G, scale = (max - min) / (2**b - 1) and min stored in the
model dtype, codes packed least-significant bits first, P = 32 // b codes per int32:
- keys per channel: groups of G consecutive token slots of one channel, packed along tokens
  (codes (B, H, N // P, D), scale/mn (B, H, N // G, D));
- values (and `token2` keys) per token: groups of G consecutive channels of one token, packed along channels
  (codes (B, H, N, D // P), scale/mn (B, H, N, D // G)).
The fp32 math is the reference's step for step (fp32 min/max, IEEE division, rounding to the storage dtype
before the codes are computed), so codes are bit-exact against it.

Public entries:
- `quantize_keys(k, bits, group_size, valid=None)`, `quantize_values(v, bits, group_size)`: allocate and return
  (codes, scale, mn) exactly like the references.
- `quantize_keys_into(...)`, `quantize_values_into(...)`: write into preallocated stores at per-sequence slot
  offsets `dst_start` ((B,) int32 on the device; a negative entry skips that sequence), reading the source rows
  `(src_start[b] + t) % Csrc` of a full-precision buffer (e.g. the residual ring) -- the flush of a block of R
  residual keys and the exit of one value token, with no dequantized copy and no torch.cat. No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstream.kernels.triton_util import LAUNCH, check_device, to_dtype_rne

SUPPORTED_BITS = (2, 4)


@triton.jit
def _round_half_even(y):
    """torch.round semantics (ties to even) for finite fp32 y >= 0 of modest size, exact."""
    r = tl.floor(y)
    f = y - r
    odd = (r.to(tl.int32) & 1) == 1
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _codes(x, valid, mn, mx, out_dtype: tl.constexpr, QMAX: tl.constexpr):
    """fp32 x, group min/max (broadcastable) -> (codes uint32, scale, mn) with the reference's rounding steps."""
    scale = to_dtype_rne(tl.div_rn(mx - mn, tl.full(mx.shape, QMAX, tl.float32)), out_dtype)
    mn_q = to_dtype_rne(mn, out_dtype)
    s32 = scale.to(tl.float32)
    m32 = mn_q.to(tl.float32)
    pos = s32 > 0.0
    y = tl.div_rn(x - m32, tl.where(pos, s32, 1.0))
    q = tl.where(pos, _round_half_even(tl.maximum(y, -1.0)), 0.0)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    q = tl.where(valid, q, 0.0)
    return q.to(tl.uint32), scale, mn_q


@triton.jit
def _quant_keys_kernel(
    src_ptr, valid_ptr, codes_ptr, scale_ptr, mn_ptr, src_start_ptr, dst_start_ptr,
    H, D, Csrc,
    stride_sb, stride_sh, stride_sn, stride_sd,
    stride_vb, stride_vh, stride_vn,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_qb, stride_qh, stride_qn, stride_qd,
    BITS: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_SRC_START: tl.constexpr, HAS_DST_START: tl.constexpr,
):
    # one program: one (sequence, KV head), one group of G tokens, BLOCK_D channels
    P: tl.constexpr = 32 // BITS
    W: tl.constexpr = G // P
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid_bh = tl.program_id(0)
    grp = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    dst0 = 0
    if HAS_DST_START:
        dst0 = tl.load(dst_start_ptr + b)
    if dst0 >= 0:
        src0 = 0
        if HAS_SRC_START:
            src0 = tl.load(src_start_ptr + b)
        w = tl.arange(0, W)[:, None, None]
        i = tl.arange(0, P)[None, :, None]
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)[None, None, :]
        dmask = d < D
        t = grp * G + w * P + i  # (W, P, 1) token of the block
        row = t
        if HAS_SRC_START:
            row = (src0 + t) % Csrc
        x = tl.load(src_ptr + b * stride_sb + h * stride_sh + row * stride_sn + d * stride_sd, mask=dmask, other=0.0)
        x = x.to(tl.float32)  # (W, P, BLOCK_D)
        valid = dmask & (t >= 0)
        if HAS_VALID:
            vt = tl.load(valid_ptr + b * stride_vb + h * stride_vh + t * stride_vn)
            valid = valid & (vt != 0)
        mn = tl.min(tl.min(tl.where(valid, x, float("inf")), axis=1), axis=0)  # (BLOCK_D,)
        mx = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=1), axis=0)
        empty = mn == float("inf")
        mn = tl.where(empty, 0.0, mn)
        mx = tl.where(empty, 0.0, mx)
        q, scale, mn_q = _codes(x, valid, mn[None, None, :], mx[None, None, :], scale_ptr.dtype.element_ty, QMAX)
        words = tl.sum(q << (i * BITS).to(tl.uint32), axis=1)  # (W, BLOCK_D) disjoint bits: sum == or
        words = words.to(tl.int32, bitcast=True)
        w2 = tl.arange(0, W)[:, None]
        d2 = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        cw = dst0 // P + grp * W + w2
        tl.store(codes_ptr + b * stride_cb + h * stride_ch + cw * stride_cn + d2 * stride_cd, words, mask=d2 < D)
        d1 = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        sg = dst0 // G + grp
        soff = b * stride_qb + h * stride_qh + sg * stride_qn + d1 * stride_qd
        tl.store(scale_ptr + soff, tl.reshape(scale, (BLOCK_D,)), mask=d1 < D)
        tl.store(mn_ptr + soff, tl.reshape(mn_q, (BLOCK_D,)), mask=d1 < D)


@triton.jit
def _quant_values_kernel(
    src_ptr, codes_ptr, scale_ptr, mn_ptr, src_start_ptr, dst_start_ptr,
    H, n_tok, Csrc,
    stride_sb, stride_sh, stride_sn, stride_sd,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_qb, stride_qh, stride_qn, stride_qd,
    BITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SRC_START: tl.constexpr, HAS_DST_START: tl.constexpr,
):
    # one program: one (sequence, KV head), BLOCK_N tokens, one group of G channels
    P: tl.constexpr = 32 // BITS
    W: tl.constexpr = G // P
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    grp = tl.program_id(2)
    dst0 = 0
    if HAS_DST_START:
        dst0 = tl.load(dst_start_ptr + b)
    if dst0 >= 0:
        src0 = 0
        if HAS_SRC_START:
            src0 = tl.load(src_start_ptr + b)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
        w = tl.arange(0, W)[None, :, None]
        i = tl.arange(0, P)[None, None, :]
        nmask = n < n_tok
        row = n
        if HAS_SRC_START:
            row = (src0 + n) % Csrc
        d = grp * G + w * P + i
        x = tl.load(src_ptr + b * stride_sb + h * stride_sh + row * stride_sn + d * stride_sd, mask=nmask, other=0.0)
        x = x.to(tl.float32)  # (BLOCK_N, W, P)
        mn = tl.min(tl.min(x, axis=2), axis=1)  # (BLOCK_N,)
        mx = tl.max(tl.max(x, axis=2), axis=1)
        q, scale, mn_q = _codes(x, nmask | (d < 0), mn[:, None, None], mx[:, None, None],
                                scale_ptr.dtype.element_ty, QMAX)
        words = tl.sum(q << (i * BITS).to(tl.uint32), axis=2).to(tl.int32, bitcast=True)  # (BLOCK_N, W)
        n2 = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        w2 = tl.arange(0, W)[None, :]
        tl.store(codes_ptr + b * stride_cb + h * stride_ch + (dst0 + n2) * stride_cn + (grp * W + w2) * stride_cd,
                 words, mask=n2 < n_tok)
        n1 = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        soff = b * stride_qb + h * stride_qh + (dst0 + n1) * stride_qn + grp * stride_qd
        tl.store(scale_ptr + soff, tl.reshape(scale, (BLOCK_N,)), mask=n1 < n_tok)
        tl.store(mn_ptr + soff, tl.reshape(mn_q, (BLOCK_N,)), mask=n1 < n_tok)


def _check_common(name: str, x: torch.Tensor, bits: int, group_size: int) -> None:
    check_device(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a (B, H, N, D) tensor, got shape {tuple(x.shape)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    P = 32 // bits
    if group_size < P or group_size & (group_size - 1):
        raise ValueError(f"{name}: group_size={group_size} must be a power of two >= {P} (32 // bits) for the "
                         f"Triton kernel; use the torch reference (backend='torch') for smaller groups")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: dtype {x.dtype} is not supported; use float32, float16 or bfloat16")


def _check_store(name, codes, scale, mn, shapes, dtype, dev):
    for label, t, shape, dt in zip(("codes", "scale", "mn"), (codes, scale, mn), shapes, (torch.int32, dtype, dtype)):
        if tuple(t.shape[:2]) != tuple(shape[:2]) or t.shape[3] != shape[3] or t.dtype != dt or t.device != dev:
            raise ValueError(f"{name}: {label} store has shape {tuple(t.shape)} {t.dtype} on {t.device}; expected "
                             f"(B, H, *, {shape[3]}) {dt} on {dev} with (B, H) = {tuple(shape[:2])}")
    if scale.stride() != mn.stride():
        raise ValueError(f"{name}: scale and mn stores must have the same strides ({scale.stride()} vs {mn.stride()})")


def _starts(name, t, B, dev):
    if t is None:
        return None
    if t.shape != (B,) or t.dtype not in (torch.int32, torch.int64) or t.device != dev:
        raise ValueError(f"{name}: expected a (B,)={B} int32 tensor on {dev}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t


def quantize_keys_into(src, codes, scale, mn, bits, group_size, n_tokens, dst_start=None, src_start=None,
                       valid=None) -> None:
    """Per-channel quantize n_tokens keys into a preallocated store, in place.

    src (B, H, Csrc, D) model dtype: token t of the block is row (src_start[b] + t) % Csrc (row t without src_start).
    codes (B, H, Cs // P, D) int32; scale, mn (B, H, Cs // G, D) model dtype: the block lands at slots
    dst_start[b] .. dst_start[b] + n_tokens - 1 (dst_start (B,) int32, a multiple of G; < 0 skips sequence b;
    None = 0). n_tokens a multiple of G. valid (B, H, n_tokens) bool or None: slots left out of min/max, code 0.
    """
    name = "quantize_keys_into"
    _check_common(name, src, bits, group_size)
    B, H, Csrc, D = src.shape
    G, P = group_size, 32 // bits
    if n_tokens % G or n_tokens > Csrc and src_start is None:
        raise ValueError(f"{name}: n_tokens={n_tokens} must be a multiple of group_size {G} (and <= src rows {Csrc})")
    _check_store(name, codes, scale, mn, [(B, H, 0, D)] * 3, src.dtype, src.device)
    dst_start = _starts(name + " dst_start", dst_start, B, src.device)
    src_start = _starts(name + " src_start", src_start, B, src.device)
    if valid is not None and (valid.shape != (B, H, n_tokens) or valid.dtype != torch.bool):
        raise ValueError(f"{name}: valid must be (B, H, n_tokens)={(B, H, n_tokens)} bool, "
                         f"got {tuple(valid.shape)} {valid.dtype}")
    if n_tokens == 0 or B * H == 0:
        return
    vt = valid.view(torch.int8) if valid is not None else src
    vs = (valid.stride(0), valid.stride(1), valid.stride(2)) if valid is not None else (0, 0, 0)
    BLOCK_D = min(triton.next_power_of_2(D), max(16, 4096 // G))
    grid = (B * H, n_tokens // G, triton.cdiv(D, BLOCK_D))
    _quant_keys_kernel[grid](
        src, vt, codes, scale, mn, src_start if src_start is not None else dst_start,
        dst_start if dst_start is not None else src_start,
        H, D, Csrc, *src.stride(), *vs, *codes.stride(), *scale.stride(),
        BITS=bits, G=G, BLOCK_D=BLOCK_D, HAS_VALID=valid is not None,
        HAS_SRC_START=src_start is not None, HAS_DST_START=dst_start is not None, **LAUNCH,
    )


def quantize_values_into(src, codes, scale, mn, bits, group_size, n_tokens, dst_start=None, src_start=None) -> None:
    """Per-token quantize n_tokens tokens (KIVI values, token2 keys) into a preallocated store, in place.

    src (B, H, Csrc, D) model dtype, token t = row (src_start[b] + t) % Csrc (row t without src_start).
    codes (B, H, Cs, D // P) int32; scale, mn (B, H, Cs, D // G) model dtype: token t lands at slot
    dst_start[b] + t (dst_start (B,) int32; < 0 skips sequence b; None = 0). D a multiple of G.
    """
    name = "quantize_values_into"
    _check_common(name, src, bits, group_size)
    B, H, Csrc, D = src.shape
    G, P = group_size, 32 // bits
    if D % G:
        raise ValueError(f"{name}: head_dim {D} is not a multiple of group_size {G}")
    shapes = [(B, H, 0, D // P), (B, H, 0, D // G), (B, H, 0, D // G)]
    _check_store(name, codes, scale, mn, shapes, src.dtype, src.device)
    dst_start = _starts(name + " dst_start", dst_start, B, src.device)
    src_start = _starts(name + " src_start", src_start, B, src.device)
    if n_tokens == 0 or B * H == 0:
        return
    BLOCK_N = max(1, min(triton.next_power_of_2(n_tokens), 4096 // G))
    grid = (B * H, triton.cdiv(n_tokens, BLOCK_N), D // G)
    _quant_values_kernel[grid](
        src, codes, scale, mn, src_start if src_start is not None else dst_start,
        dst_start if dst_start is not None else src_start,
        H, n_tokens, Csrc, *src.stride(), *codes.stride(), *scale.stride(),
        BITS=bits, G=G, BLOCK_N=BLOCK_N,
        HAS_SRC_START=src_start is not None, HAS_DST_START=dst_start is not None, **LAUNCH,
    )


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, valid: torch.Tensor | None = None):
    """Per-channel key quantization, same outputs as `kivi_quant_ref.quantize_keys`.

    k (B, H, N, D) model dtype, N a multiple of G; valid (B, H, N) bool or None.
    Returns codes (B, H, N // P, D) int32, scale and mn (B, H, N // G, D) in k's dtype.
    """
    _check_common("quantize_keys", k, bits, group_size)
    B, H, N, D = k.shape
    if N % group_size:
        raise ValueError(f"quantize_keys: {N} token slots is not a multiple of group_size {group_size}")
    codes = torch.empty(B, H, N * bits // 32, D, dtype=torch.int32, device=k.device)
    scale = torch.empty(B, H, N // group_size, D, dtype=k.dtype, device=k.device)
    mn = torch.empty_like(scale)
    quantize_keys_into(k, codes, scale, mn, bits, group_size, N, valid=valid)
    return codes, scale, mn


def quantize_values(v: torch.Tensor, bits: int, group_size: int):
    """Per-token quantization, same outputs as `kivi_quant_ref.quantize_values`.

    v (B, H, N, D) model dtype, D a multiple of G. Returns codes (B, H, N, D // P) int32, scale and mn
    (B, H, N, D // G) in v's dtype.
    """
    _check_common("quantize_values", v, bits, group_size)
    B, H, N, D = v.shape
    if D % group_size:
        raise ValueError(f"quantize_values: head_dim {D} is not a multiple of group_size {group_size}")
    codes = torch.empty(B, H, N, D * bits // 32, dtype=torch.int32, device=v.device)
    scale = torch.empty(B, H, N, D // group_size, dtype=v.dtype, device=v.device)
    mn = torch.empty_like(scale)
    quantize_values_into(v, codes, scale, mn, bits, group_size, N)
    return codes, scale, mn
