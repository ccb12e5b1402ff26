"""Triton version of the counter-based Gumbel(0, 1) noise of `kernels.gumbel_ref`.

`gumbel_noise(seed, layer, step, head, row, col)` is a `@triton.jit` helper that other kernels call on
register tensors: it draws exactly the hash `kernels.gumbel_ref.hash_coords` defines (same 32-bit finalizer
rounds, same mixing order seed, layer, step, head, row, col), so the noise is never stored and the torch and
Triton backends agree to the two logs' rounding (~1e-6 absolute): the outer log is the hardware lg2, the inner
one `neg_log_u` (hardware lg2 or a short atanh series near 1, both ~4e-7 relative; libdevice's accurate logf
cost twice the instructions, and the noise is most of a Keyformer scoring kernel's work).

`gumbel_triton(seed, layer, step, head, row, col)` is a small public launcher over integer coordinate tensors
(for tests and for callers that want a noise tensor outright).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstream.kernels.gumbel_ref import U_MAX
from kvstream.kernels.triton_util import INTERPRET, LAUNCH, LN2, check_device

_U_MAX = tl.constexpr(U_MAX)


@triton.jit
def _mix32(x):
    """One round of the lowbias32-shaped finalizer on uint32 (multiplications wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x2C1B3C6D, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _as_u32(c):
    """Integer tensor or scalar -> uint32 holding its value mod 2**32 (two's complement for negatives)."""
    return tl.cast(tl.cast(c, tl.int64), tl.uint32)


@triton.jit
def gumbel_hash(seed, layer, step, head, row, col):
    """uint32 hash of broadcastable integer coordinates; equals `gumbel_ref.hash_coords`."""
    # seed first, col last: the rounds over per-call scalars stay scalar, only the last ones are tile-sized
    h = _mix32(_as_u32(seed))
    h = _mix32(_as_u32(layer) ^ h)
    h = _mix32(_as_u32(step) ^ h)
    h = _mix32(_as_u32(head) ^ h)
    h = _mix32(_as_u32(row) ^ h)
    h = _mix32(_as_u32(col) ^ h)
    return h


@triton.jit
def _lg2(x):
    """log2 of positive normal float32: the hardware's (one MUFU op, absolute error < 2**-22); numpy's under the
    interpreter."""
    if INTERPRET:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _div(x, y):
    """x / y to 2 ulp (`div.approx`: one reciprocal and a multiply) for |y| in [1, 2]; exact under the interpreter."""
    if INTERPRET:
        return x / y
    else:
        return tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=f,f,f", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def neg_log_u(u):
    """-ln(u) for float32 u in [2**-25, 1) to ~4e-7 relative error, in ~15 instructions (libdevice's logf: ~30).

    u <= 0.75: -lg2(u) * ln 2 (|log2 u| >= 0.41, so lg2's 2**-22 absolute error is < 4e-7 relative). u > 0.75:
    with d = 1 - u (exact) and z = d / (2 - d) < 1/7, -ln(u) = 2 atanh(z) = 2 z (1 + z**2 / 3 + ... + z**8 / 9),
    the first omitted term below 4e-10 relative. The relative error is what matters: it is the Gumbel draw's
    absolute error, and u comes within 2**-24 of 1, where -ln(u) is ~6e-8.
    """
    return _log2_u(u) * -LN2


@triton.jit
def _log2_u(u):
    """log2(u) (negative) by `neg_log_u`'s two branches; the series' coefficients carry the 1 / ln 2."""
    d = 1.0 - u
    z = _div(d, 2.0 - d)
    w = z * z
    series = z * (_S0 + w * (_S1 + w * (_S2 + w * (_S3 + w * _S4))))
    return tl.where(u > 0.75, series, _lg2(u))


# -2 / ln 2 / (2k + 1): log2(u) = -2 atanh(z) / ln 2 as a series in z
_S0 = tl.constexpr(-2.0 / 0.6931471805599453)
_S1 = tl.constexpr(-2.0 / 0.6931471805599453 / 3.0)
_S2 = tl.constexpr(-2.0 / 0.6931471805599453 / 5.0)
_S3 = tl.constexpr(-2.0 / 0.6931471805599453 / 7.0)
_S4 = tl.constexpr(-2.0 / 0.6931471805599453 / 9.0)
# g = -ln(-ln u) = G_SHIFT - ln 2 * gumbel_lg2(...): G_SHIFT = -ln(ln 2)
G_SHIFT = tl.constexpr(0.36651292058166435)


@triton.jit
def gumbel_lg2(seed, layer, step, head, row, col):
    """t = lg2(-log2(u)) of the draw `gumbel_noise` makes, so that g = G_SHIFT - ln 2 * t. A kernel that only needs
    g up to a constant (every softmax over the noisy logits: the constant shifts a whole row) adds t * (-ln 2 * c)
    in one multiply-add and saves `gumbel_noise`'s two multiplies."""
    h = gumbel_hash(seed, layer, step, head, row, col)
    u = tl.minimum(((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), _U_MAX)  # < 1, see gumbel_ref
    # the inner log's relative error becomes g's absolute error; the outer one only needs absolute accuracy
    return _lg2(-_log2_u(u))


@triton.jit
def gumbel_noise(seed, layer, step, head, row, col):
    """Gumbel(0, 1) float32 noise of the broadcast shape of the coordinates; equals `gumbel_ref.gumbel`."""
    return gumbel_lg2(seed, layer, step, head, row, col) * -LN2 + G_SHIFT


@triton.jit
def _gumbel_kernel(seed_ptr, layer_ptr, step_ptr, head_ptr, row_ptr, col_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # flat elementwise map over n broadcast coordinates (int64 each)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    seed = tl.load(seed_ptr + offs, mask=m, other=0)
    layer = tl.load(layer_ptr + offs, mask=m, other=0)
    step = tl.load(step_ptr + offs, mask=m, other=0)
    head = tl.load(head_ptr + offs, mask=m, other=0)
    row = tl.load(row_ptr + offs, mask=m, other=0)
    col = tl.load(col_ptr + offs, mask=m, other=0)
    tl.store(out_ptr + offs, gumbel_noise(seed, layer, step, head, row, col), mask=m)


def gumbel_triton(seed, layer, step, head, row, col, device=None) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32, of the broadcast shape of the integer coordinates (tensors or ints).

    Same values as `kernels.gumbel_ref.gumbel` (to ~1e-6). Tensors must share one device (CUDA, or CPU under
    TRITON_INTERPRET=1); `device` places plain-int-only calls.
    """
    coords = [torch.as_tensor(c, dtype=torch.int64, device=device) for c in (seed, layer, step, head, row, col)]
    dev = next((c.device for c in coords if c.dim() > 0), coords[0].device)
    coords = [c.to(dev) for c in coords]
    shape = torch.broadcast_shapes(*(c.shape for c in coords))
    flat = [c.expand(shape).contiguous().view(-1) for c in coords]
    out = torch.empty(shape, dtype=torch.float32, device=dev)
    check_device("gumbel_triton", out)
    n = out.numel()
    if n:
        BLOCK = 1024
        _gumbel_kernel[(triton.cdiv(n, BLOCK),)](*flat, out.view(-1), n, BLOCK=BLOCK, **LAUNCH)
    return out
