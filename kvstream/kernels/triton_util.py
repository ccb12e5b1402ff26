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
def and_or(c, mask, BITS: tl.constexpr):
    """(c & mask) | BITS on uint32 as one LOP3, written out: ptxas does not fuse the AND and the OR with two
    different immediates by itself. Plain ops under the interpreter."""
    if INTERPRET:
        return (c & mask) | BITS
    else:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [c, tl.broadcast_to(mask, c.shape), tl.full(c.shape, BITS, tl.uint32)],
                                         dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def masked_to_f32(c, mask):
    """(c & mask) as float32 exactly, for a mask below bit 23: one LOP3 ((c & mask) | magic, `and_or`) and one
    FADD."""
    return and_or(c, mask, 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


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


# ---- fp16x2 ("h2"): two fp16 values in one uint32 (low half first), for CUDA-core loops that decode two codes and
# do two multiply-adds per instruction (HFMA2). PTX under CUDA; fp32 math rounded to fp16 under the interpreter.
H2_MAGIC = tl.constexpr(0x64006400)  # fp16 1024.0 in both halves: a code masked into bits [0, 10) reads 1024 + code


@triton.jit
def h2_split(x):
    """uint32 fp16x2 -> (low, high) as float32."""
    if INTERPRET:
        lo = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }", "=r,=r,r", [x],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _h2_join(lo, hi):
    """(low, high) float32 -> uint32 fp16x2, each rounded to nearest (interpreter only)."""
    lb = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hb = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return lb | (hb << 16)


@triton.jit
def h2_splat(x):
    """float32 -> uint32 fp16x2 holding round(x) in both halves (one cvt.rn.f16x2.f32)."""
    if INTERPRET:
        return _h2_join(x, x)
    else:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $1;", "=r,r", [x], dtype=tl.uint32,
                                         is_pure=True, pack=1)


@triton.jit
def h2_codes(words, shift, mask):
    """Two codes of each word as fp16x2 1024 + code * 2**s: (words >> shift) & mask (one code in each half, below
    bit 10 of it) | H2_MAGIC: one LOP3 (`and_or`), and a SHF per word where shift is not 0."""
    return and_or(words.to(tl.uint32, bitcast=True) >> shift, mask, H2_MAGIC)


@triton.jit
def h2_decode(v, a, c):
    """v * a + c on fp16x2 (one HFMA2): with v from `h2_codes`, a = 2**-s and c = -1024 * 2**-s (`h2_place`), the
    two codes exactly."""
    if INTERPRET:
        vl, vh = h2_split(v)
        al, ah = h2_split(a)
        cl, ch = h2_split(c)
        return _h2_join(vl * al + cl, vh * ah + ch)
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [v, a, c], dtype=tl.uint32,
                                         is_pure=True, pack=1)


@triton.jit
def h2_fma(x, y, acc):
    """acc + x * y on fp16x2 (one HFMA2, one rounding to fp16 per half; the interpreter rounds twice)."""
    if INTERPRET:
        xl, xh = h2_split(x)
        yl, yh = h2_split(y)
        ql, qh = h2_split(acc)
        return _h2_join(ql + xl * yl, qh + xh * yh)
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [x, y, acc], dtype=tl.uint32,
                                         is_pure=True, pack=1)


@triton.jit
def h2_place(k, BITS: tl.constexpr):
    """Pair k of a word's codes (code k in the low half, k + 16 // BITS in the high half) -> (shift, mask, a, c) for
    `h2_codes` / `h2_decode`: the pair is read from word >> shift (8 where code k's bits would pass bit 10 of
    the half) at bit s = BITS * j of each half; a = 2**-s and c = -1024 * 2**-s as fp16x2."""
    hi = BITS * (k + 1) > 10
    j = tl.where(hi, k - 8 // BITS, k)
    s = (BITS * j).to(tl.uint32)
    mask = (((1 << BITS) - 1) << s) * 0x10001
    a = (15 - s) << 10  # fp16 2**-s
    c = 0x8000 | ((25 - s) << 10)  # fp16 -2**(10 - s)
    return tl.where(hi, 8, 0).to(tl.uint32), mask.to(tl.uint32), a | (a << 16), c | (c << 16)


# ---- L2 prefetch: the next tile's bytes asked for while this tile computes (no register holds them; the tile's
# own loads then wait on L2, not DRAM). A no-op under the interpreter.
@triton.jit
def prefetch_l2(ptrs, mask):
    """One `prefetch.global.L2` per element of ptrs where mask (the element's 128-byte line into L2)."""
    if not INTERPRET:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }", "=r,l,r",
            [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def line_offsets(row0, rows_valid, NROWS: tl.constexpr, ROW: tl.constexpr, stride, EPL: tl.constexpr):
    """Element offsets of one element per EPL-element line of rows row0 + [0, NROWS) (ROW elements each, `stride`
    apart), and which of them lie in rows below rows_valid: every line of the span when the rows are contiguous
    (stride == ROW); else lines of rows shorter than a line are skipped."""
    NL: tl.constexpr = (NROWS * ROW + EPL - 1) // EPL
    e = tl.arange(0, NL) * EPL
    r = row0 + e // ROW
    return r * stride + e % ROW, r < rows_valid


@triton.jit
def prefetch_rows(ptr, row0, rows_valid, NROWS: tl.constexpr, ROW: tl.constexpr, stride):
    """L2 prefetch of rows row0 + [0, NROWS) below rows_valid of ptr's elements (`line_offsets`, 128-byte lines;
    missed lines cost speed only)."""
    off, ok = line_offsets(row0, rows_valid, NROWS, ROW, stride, 1024 // ptr.dtype.element_ty.primitive_bitwidth)
    prefetch_l2(ptr + off, ok)
