"""Small Triton helpers shared by the kernels: exact float32 -> bf16 rounding, interpreter detection, dot.

The Triton CPU interpreter converts float32 to bfloat16 by truncation, while CUDA (and torch) round to
nearest-even; `to_dtype_rne` rounds explicitly so both agree bit for bit with the torch references.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


# running-max floor of the decode kernels: finite, so a fully masked tile gives exp(-inf - floor) = 0, never NaN
MASKED = tl.constexpr(-1.0e30)
# the kernels work in log2 units (exp2 / lg2): natural <-> log2 conversion factors
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = tl.constexpr(interpreting())


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton: kernels whose best spelling differs across versions pick by it."""
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return major, minor

# launch options of every kernel here: multiply-add contraction (FFMA) asked for explicitly. The kernels are
# built on it (the decode's multiply-add chains, the dequantize-scale-shift); Triton 3.9 warns that its default
# turns it off in 3.10 (the MHA KIVI decode loop: 25% more instructions, FMUL + FADD, in a local sm_90 compile).
LAUNCH = {"enable_fp_fusion": True}


def check_device(name: str, t) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name}: the Triton kernel needs CUDA tensors (got {t.device}); on a CPU set "
                         f"TRITON_INTERPRET=1 before importing kernels, or use the torch reference (backend='torch')")


@triton.jit
def u32_to_f32(c):
    """Small unsigned ints (< 2**23) -> float32 exactly with one OR and one FADD (no quarter-rate I2F)."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def masked_to_f32(c, mask):
    """(c & mask) as float32 exactly, for a mask below bit 23: one LOP3 ((c & mask) | magic; ptxas does not fuse
    the AND and the OR with two different immediates by itself) and one FADD. Plain ops under the interpreter."""
    if INTERPRET:
        m = (c & mask) | 0x4B000000
    else:
        magic = tl.full(c.shape, 0x4B000000, tl.uint32)
        m = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                      [c, tl.broadcast_to(mask, c.shape), magic], dtype=tl.uint32, is_pure=True,
                                      pack=1)
    return m.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def split_bounds(b, sp, s_len_ptr, sv_len_ptr, win_lo_ptr, Cw, NUM_SPLITS, BLOCK: tl.constexpr):
    """A decode stage 1's sequence lengths and its split's share [lo, hi) of the virtual index space (the S slots
    [0, s_len) then the Cw ring slots), in whole tiles of BLOCK: (s_len, sv_len, win_lo, lo, hi)."""
    s_len = tl.load(s_len_ptr + b)
    sv_len = tl.load(sv_len_ptr + b)
    win_lo = tl.load(win_lo_ptr + b)
    total = s_len + Cw
    chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK) * BLOCK
    lo = sp * chunk
    return s_len, sv_len, win_lo, lo, tl.minimum(lo + chunk, total)


@triton.jit
def ring_tile(win_pos_row, r0, r_hi, win_lo, BLOCK: tl.constexpr):
    """Ring slots r0 + [0, BLOCK): (slots, in range (< r_hi), holding a token (win_pos >= win_lo))."""
    r = r0 + tl.arange(0, BLOCK)
    in_r = r < r_hi
    pos = tl.load(win_pos_row + r, mask=in_r, other=-1)
    return r, in_r, in_r & (pos >= win_lo)


@triton.jit
def to_dtype_rne(x, dtype: tl.constexpr):
    """fp32 tensor -> `dtype`, rounding to nearest-even also for bfloat16 under the interpreter (finite x)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = bits & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST (set under the interpreter, whose bf16 dot is wrong) computes it
    on float32 copies, which is what the tensor cores do for bf16 operands (exact products, fp32 sums)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)
