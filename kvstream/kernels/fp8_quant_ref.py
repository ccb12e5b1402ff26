"""Torch reference of the `fp8` storage format: e4m3 codes with one float32 scale per (sequence, KV head).

What vLLM, SGLang and TensorRT-LLM store by default (OCP FP8 E4M3, `torch.float8_e4m3fn`: 1 sign, 4 exponent bits
with bias 7, 3 mantissa bits, no infinities, largest finite 448). A tensor x is stored as

    code = e4m3(clamp(x / scale, -448, 448))   (IEEE fp32 division, round to nearest even, saturating)
    x_hat = float32(code) * scale              (rounded to the model dtype where the kernels read it)

with scale = max(amax / 448, SCALE_FLOOR): amax the largest |x| of the prompt's keys (or values) of that sequence
and KV head, fixed at prefill; tokens entering later use the same scale and saturate at +-448 * scale.

Codes are stored as uint8 bit patterns (`float8_e4m3fn` viewed as uint8): the Triton kernels decode and encode
them bit by bit (`kernels.fp8_quant`), exactly, on every GPU and under the CPU interpreter (whose own fp8 cast
neither rounds subnormals to nearest nor saturates).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
SCALE_FLOOR = 2.0**-32  # the smallest scale (an all-zero prompt): x / scale stays finite, x_hat stays normal fp32


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax (...) any float dtype, the largest |x| -> scale (...) float32, amax / 448 floored to SCALE_FLOOR."""
    return (amax.float() / E4M3_MAX).clamp_min(SCALE_FLOOR)


def fp8_encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (...) model dtype, scale broadcastable to x, float32 -> codes (...) uint8 (e4m3 bit patterns)."""
    y = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX)
    return y.to(torch.float8_e4m3fn).view(torch.uint8)


def fp8_decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (...) uint8, scale broadcastable to codes, float32 -> (...) `dtype`: float32(code) * scale, rounded."""
    return (codes.view(torch.float8_e4m3fn).float() * scale).to(dtype)


def masked_amax(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) with each row's valid tokens first, n (B,) int valid counts -> (B, H) float32 largest |x|
    over the valid tokens of each (sequence, KV head) (0 for an empty row)."""
    valid = torch.arange(x.shape[2], device=x.device).view(1, 1, -1, 1) < n.view(-1, 1, 1, 1)
    return torch.where(valid, x.abs(), 0).amax(dim=(2, 3)).float()
