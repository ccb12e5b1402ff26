"""The `fp8` storage codec in Triton: e4m3 codes held as uint8 bit patterns, one float32 scale per row.

Semantics: `kernels.fp8_quant_ref` (encode: IEEE division by the scale, saturation at +-448, round to nearest even;
decode: float32(code) * scale). Both directions work on the bits, so they are exact on every GPU (also before
sm_89, which has no e4m3 conversion instructions) and under the CPU interpreter (whose fp8 cast neither rounds
subnormals to nearest nor saturates):
- decode: the 7 magnitude bits shifted into an fp16's exponent and mantissa (and the sign into its sign) make an
  fp16 whose value is the e4m3 value / 2**8, subnormals included (an fp16 to fp32 conversion keeps them); the
  2**8 goes into the scale, so x_hat = fp32(h) * (scale * 256) is the reference's float32(code) * scale bit for
  bit (scale * 256 is exact, so is the real product, rounded once);
- encode: normal results (|y| >= 2**-6) round the fp32 mantissa to 3 bits with an integer add (ties to even)
  and rebias the exponent (127 -> 7); subnormal ones are rint(|y| * 2**9) by the magic-number add (2**23), whose
  result 8 is the smallest normal's pattern.
`fp8_quant` (the eviction write) and `fp8_to_f16` (the decode attention: code / 2**8 as the dot operand, the
scales applied to the logits and the P.V sums) are in-register helpers;
`fp8_encode` / `fp8_decode` launch them over whole (B, H, N, D) tensors (the prefill's encode on the Triton
backend, and the codec's tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstream.kernels.triton_util import check_device, to_dtype_rne

_LAUNCH = {"enable_fp_fusion": False}  # the reference's roundings, never contracted
_BLOCK = 1024


@triton.jit
def fp8_to_f16(codes):
    """codes (any shape) uint8 e4m3 bit patterns -> fp16 holding code / 2**8 exactly (subnormals included)."""
    c = codes.to(tl.uint32)
    return (((c & 0x80) << 8) | ((c & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def fp8_dequant(codes, scale):
    """codes (any shape) uint8 e4m3 bit patterns, scale fp32 (broadcastable) -> fp32 float32(code) * scale."""
    return fp8_to_f16(codes).to(tl.float32) * (scale * 256.0)


@triton.jit
def fp8_quant(x, scale):
    """x (any shape) fp32, scale fp32 (broadcastable, > 0) -> uint8 e4m3 codes of clamp(x / scale, -448, 448)."""
    y = tl.div_rn(x, tl.zeros(x.shape, tl.float32) + scale)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    u = y.to(tl.uint32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF  # |y|
    # normal: 3 mantissa bits kept, rounded half to even (a carry moves into the exponent); exponent bias 127 -> 7
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960
    # subnormal (|y| < 2**-6): rint(|y| * 2**9) in the low bits of 2**23 + it
    sub = (a.to(tl.float32, bitcast=True) * 512.0 + 8388608.0).to(tl.uint32, bitcast=True) - 0x4B000000
    return (sign | tl.where(a >= 0x3C800000, normal, sub)).to(tl.uint8)


@triton.jit
def _encode_kernel(x_ptr, scale_ptr, codes_ptr, C, BLOCK: tl.constexpr):
    # one program: BLOCK elements of row r (one (sequence, KV head): N * D elements, one scale)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    x = tl.load(x_ptr + r * C + c, mask=m, other=0.0).to(tl.float32)
    tl.store(codes_ptr + r * C + c, fp8_quant(x, tl.load(scale_ptr + r)), mask=m)


@triton.jit
def _decode_kernel(codes_ptr, scale_ptr, out_ptr, C, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    x = fp8_dequant(tl.load(codes_ptr + r * C + c, mask=m, other=0), tl.load(scale_ptr + r))
    tl.store(out_ptr + r * C + c, to_dtype_rne(x, out_ptr.dtype.element_ty), mask=m)


def _rows(name: str, t: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    """(rows, elements per row) of a (B, H, N, D) tensor with one float32 scale per (B, H) row."""
    check_device(name, t)
    if t.dim() != 4 or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous (B, H, N, D) tensor, got {tuple(t.shape)}")
    B, H, N, D = t.shape
    if scale.dtype != torch.float32 or scale.numel() != B * H or scale.device != t.device:
        raise ValueError(f"{name}: scale must hold B * H = {B * H} float32 values on {t.device} (one per sequence "
                         f"and KV head), got {tuple(scale.shape)} {scale.dtype} on {scale.device}")
    return B * H, N * D


def fp8_encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) model dtype, scale (B, H, 1, 1) (any shape of B * H values) float32 -> codes (B, H, N, D)
    uint8, equal to `fp8_quant_ref.fp8_encode`."""
    R, C = _rows("fp8_encode", x, scale)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if R and C:
        _encode_kernel[(R, triton.cdiv(C, _BLOCK))](x, scale.contiguous(), codes, C, BLOCK=_BLOCK, **_LAUNCH)
    return codes


def fp8_decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (B, H, N, D) uint8, scale (B, H, 1, 1) float32 -> (B, H, N, D) `dtype`, equal to
    `fp8_quant_ref.fp8_decode`."""
    R, C = _rows("fp8_decode", codes, scale)
    if codes.dtype != torch.uint8:
        raise ValueError(f"fp8_decode: codes must be uint8 e4m3 bit patterns, got {codes.dtype}")
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if R and C:
        _decode_kernel[(R, triton.cdiv(C, _BLOCK))](codes, scale.contiguous(), out, C, BLOCK=_BLOCK, **_LAUNCH)
    return out
