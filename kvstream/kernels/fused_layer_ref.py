"""Torch references of the decoder layer's fused elementwise kernels (`kvstream.kernels.fused_layer`).

They are transformers' own Llama-family ops, written out with the same roundings in the model's dtype (what the
CPU path runs, and what the Triton kernels are tested against):

- `add_rms_norm`: the residual add (in the model's dtype) then RMSNorm (float32 statistics, the normalized value
  rounded to the model's dtype before the weight multiplies it), as `LlamaDecoderLayer` + `LlamaRMSNorm` do;
- `rope`: `q * cos + rotate_half(q) * sin` (and the same for k) on (B, T, H, D) heads, as `apply_rotary_pos_emb`;
- `silu_mul`: `silu(gate) * up`, as `LlamaMLP`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., N); weight (N,) -> (RMSNorm(residual + x) * weight, residual + x). With residual None the
    sum is x itself."""
    h = x if residual is None else residual + x
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(h.dtype), h


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x * cos + rotated * sin).contiguous()


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q (B, T, Hq, D), k (B, T, H, D) (any strides), cos / sin (B, T, D) -> rotated q and k, and v (B, T, H, D)
    when given, each contiguous (B, T, heads, D)."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return _rotate(q, c, s), _rotate(k, c, s), None if v is None else v.contiguous()


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> silu(gate) * up."""
    return F.silu(gate) * up
