"""Torch reference of KIVI quantization and bit packing (arXiv 2402.02750).

Asymmetric min/max round-to-nearest per group:  x_hat = q * scale + mn,  scale = (max - mn) / (2**b - 1),
scale and mn stored in the model dtype. Codes are packed least-significant bits first, 32 / b codes per int32.

Layouts (B batch, H KV heads, N token slots, D head dim, G group size, P = 32 // b codes per word):
- keys, per-channel (KIVI): groups of G consecutive token slots within each channel; packed along tokens.
    codes (B, H, N // P, D) int32   -- word w of channel d holds slots w*P .. w*P + P - 1, slot w*P + i in bits
                                       [i*b, (i+1)*b)
    scale, mn (B, H, N // G, D) model dtype
- values (and `token2` keys), per-token: groups of G consecutive channels within each token; packed along channels.
    codes (B, H, N, D // P) int32   -- word w of token n holds channels w*P .. w*P + P - 1
    scale, mn (B, H, N, D // G) model dtype
N must be a multiple of G (and of P) for the per-channel layout; D a multiple of G for per-token. Where D is
not a multiple of P (head_dim 8 at 2 bits), the channel axis is padded with zero codes to a whole word:
codes (B, H, N, ceil(D / P)) and `unpack(..., size=D)` trims the padding.
"""

from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along `dim` into int32 words (zero codes pad a partial last word)."""
    per = 32 // bits
    dim = dim % codes.dim()
    c = codes.to(torch.int64).movedim(dim, -1)
    n = c.shape[-1]
    if n % per:
        c = torch.nn.functional.pad(c, (0, per - n % per))
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # fits in 32 unsigned bits
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, dim: int, size: int | None = None) -> torch.Tensor:
    """Inverse of `pack`: int32 words -> int64 codes, `dim` grows by 32 // bits (then trimmed to `size`)."""
    per = 32 // bits
    dim = dim % words.dim()
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    c = c.reshape(*w.shape[:-1], w.shape[-1] * per)
    if size is not None:
        c = c[..., :size]
    return c.movedim(-1, dim)


def _minmax_codes(x: torch.Tensor, bits: int, valid: torch.Tensor | None, reduce_dim: int, dtype: torch.dtype):
    """x grouped so that `reduce_dim` is one group's members. Returns codes (int64), scale, mn (in `dtype`)."""
    xf = x.float()
    if valid is None:
        mn = xf.amin(reduce_dim, keepdim=True)
        mx = xf.amax(reduce_dim, keepdim=True)
    else:
        mn = torch.where(valid, xf, torch.inf).amin(reduce_dim, keepdim=True)
        mx = torch.where(valid, xf, -torch.inf).amax(reduce_dim, keepdim=True)
        empty = ~valid.any(reduce_dim, keepdim=True)
        mn = torch.where(empty, 0.0, mn)
        mx = torch.where(empty, 0.0, mx)
    qmax = (1 << bits) - 1
    # a tensor divisor: true division on every device (CUDA turns a division by a Python number into a
    # multiplication by its reciprocal, which is an ulp off now and then; the kernels divide exactly)
    scale = ((mx - mn) / torch.full_like(mx, qmax)).to(dtype)
    mn = mn.to(dtype)
    s32, m32 = scale.float(), mn.float()
    codes = torch.where(s32 > 0, torch.round((xf - m32) / torch.where(s32 > 0, s32, 1.0)), 0.0)
    codes = codes.clamp(0, qmax).to(torch.int64)
    if valid is not None:
        codes = torch.where(valid, codes, 0)
    return codes, scale, mn


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, valid: torch.Tensor | None = None):
    """Per-channel key quantization. k (B, H, N, D); valid (B, H, N) bool or None (slots left out of min/max,
    stored as code 0). Returns codes (B, H, N*bits//32, D) int32, scale and mn (B, H, N//G, D) in k's dtype."""
    B, H, N, D = k.shape
    G = group_size
    if N % G:
        raise ValueError(f"quantize_keys: {N} token slots is not a multiple of group_size {G}")
    kg = k.reshape(B, H, N // G, G, D)
    vg = None if valid is None else valid.reshape(B, H, N // G, G, 1)
    codes, scale, mn = _minmax_codes(kg, bits, vg, reduce_dim=3, dtype=k.dtype)
    codes = codes.reshape(B, H, N, D)
    return pack(codes, bits, dim=2), scale.squeeze(3), mn.squeeze(3)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group_size: int):
    """Inverse of `quantize_keys` -> (B, H, N, D) in scale's dtype."""
    q = unpack(codes, bits, dim=2).float()  # (B, H, N, D)
    rep = lambda t: t.float().repeat_interleave(group_size, dim=2)  # noqa: E731
    return (q * rep(scale) + rep(mn)).to(scale.dtype)


def quantize_values(v: torch.Tensor, bits: int, group_size: int):
    """Per-token quantization (KIVI values, `token2` keys). v (B, H, N, D) -> codes (B, H, N, ceil(D*bits/32)) int32,
    scale and mn (B, H, N, D//G) in v's dtype."""
    B, H, N, D = v.shape
    G = group_size
    if D % G:
        raise ValueError(f"quantize_values: head_dim {D} is not a multiple of group_size {G}")
    vg = v.reshape(B, H, N, D // G, G)
    codes, scale, mn = _minmax_codes(vg, bits, None, reduce_dim=4, dtype=v.dtype)
    return pack(codes.reshape(B, H, N, D), bits, dim=3), scale.squeeze(4), mn.squeeze(4)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group_size: int):
    """Inverse of `quantize_values` -> (B, H, N, D) in scale's dtype."""
    q = unpack(codes, bits, dim=3, size=scale.shape[3] * group_size).float()
    rep = lambda t: t.float().repeat_interleave(group_size, dim=3)  # noqa: E731
    return (q * rep(scale) + rep(mn)).to(scale.dtype)
