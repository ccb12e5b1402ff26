"""Triton version of the counter-based Gumbel(0, 1) noise of `kernels.gumbel_ref`.

`gumbel_noise(seed, layer, step, head, row, col)` is a `@triton.jit` helper that other kernels call on
register tensors: it draws exactly the hash `kernels.gumbel_ref.hash_coords` defines (same 32-bit finalizer
rounds, same mixing order seed, layer, step, head, row, col) and the same uniform, so the noise is never stored and
the torch and Triton backends agree to the logs' rounding (~1e-6 absolute): the outer log is the hardware lg2, the
inner one `neg_log2_u` (hardware lg2, or a degree-4 polynomial near 1, both < 7e-7 relative; libdevice's
accurate logf cost twice the instructions, and the noise is most of a Keyformer scoring kernel's work). A draw costs
one quarter-rate instruction (lg2) before the caller's own: `gumbel_lg2` adds the outer lg2 (any tau),
`weight_from_keys` a reciprocal instead (exp(g) as a weight, for tau = 1: exp((x + g) / 1) = exp(x) * exp(g)).

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
    return finish_hash(x ^ (x >> 16))


@triton.jit
def _as_u32(c):
    """Integer tensor or scalar -> uint32 holding its value mod 2**32 (two's complement for negatives)."""
    return tl.cast(tl.cast(c, tl.int64), tl.uint32)


@triton.jit
def row_key(seed, layer, step, head, row):
    """The hash's rounds over (seed, layer, step, head, row), and the first xor-shift of the last round's share of
    it: with `col_key`, `finish_hash(row_key ^ col_key)` is `gumbel_hash`. A kernel whose tile shares rows and
    columns computes the keys once per row and per column, and an element costs the last round's other six ops."""
    # seed first, col last: the rounds over per-call scalars stay scalar, only the last ones are tile-sized
    h = _mix32(_as_u32(seed))
    h = _mix32(_as_u32(layer) ^ h)
    h = _mix32(_as_u32(step) ^ h)
    h = _mix32(_as_u32(head) ^ h)
    h = _mix32(_as_u32(row) ^ h)
    return h ^ (h >> 16)


@triton.jit
def col_key(col):
    """The column's share of the last round's first xor-shift: (h ^ c) ^ ((h ^ c) >> 16) = row_key ^ col_key."""
    c = _as_u32(col)
    return c ^ (c >> 16)


@triton.jit
def finish_hash(x):
    """The rest of the last `_mix32` round, on row_key ^ col_key."""
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x2C1B3C6D, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def gumbel_hash(seed, layer, step, head, row, col):
    """uint32 hash of broadcastable integer coordinates; equals `gumbel_ref.hash_coords`."""
    return finish_hash(row_key(seed, layer, step, head, row) ^ col_key(col))


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
def _rcp(x):
    """1 / x for positive normal float32 (`rcp.approx`: one MUFU op, 1 ulp); exact under the interpreter."""
    if INTERPRET:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _uniform(h):
    """uint32 hash -> float32 u = (2 (h >> 9) + 1) / 2**24 (`gumbel_ref.uniform_from_hash`), without a conversion:
    the top 23 bits as the mantissa of a float in [1, 2), minus 1 - 2**-24 (exact)."""
    f = ((h >> 9) | tl.full(h.shape, 0x3F800000, tl.uint32)).to(tl.float32, bitcast=True)
    return f - _U_MAX


@triton.jit
def neg_log2_u(u):
    """-log2(u) > 0 for the hash's float32 u in [2**-24, 1 - 2**-24], to < 7e-7 relative error, one MUFU op.

    u <= 0.78: -lg2(u) (|log2 u| >= 0.358, so lg2's 2**-22 absolute error is < 6.7e-7 relative). u > 0.78: with
    d = 1 - u (exact), -log2(1 - d) = d * P(d), P the degree-4 relative minimax fit of -log2(1 - d) / d on
    [0, 0.22] (fit error 3e-7, 4.2e-7 with float32 rounding). The relative error is what matters: it is the
    Gumbel draw's absolute error, and u comes within 2**-24 of 1, where -log2(u) is ~9e-8.
    """
    d = 1.0 - u
    poly = d * (_P0 + d * (_P1 + d * (_P2 + d * (_P3 + d * _P4))))
    return tl.where(u > 0.78, poly, -_lg2(u))


@triton.jit
def neg_log_u(u):
    """-ln(u) by `neg_log2_u` (for tests and callers that want natural units)."""
    return neg_log2_u(u) * LN2


# -log2(1 - d) / d ~ P(d) on [0, 0.22] (relative minimax, degree 4; P0 ~ 1 / ln 2)
_P0 = tl.constexpr(1.4426954984664917)
_P1 = tl.constexpr(0.7212530970573425)
_P2 = tl.constexpr(0.4842256009578705)
_P3 = tl.constexpr(0.3205018639564514)
_P4 = tl.constexpr(0.4761367738246918)
# g = -ln(-ln u) = G_SHIFT - ln 2 * gumbel_lg2(...): G_SHIFT = -ln(ln 2)
G_SHIFT = tl.constexpr(0.36651292058166435)


@triton.jit
def gumbel_lg2(seed, layer, step, head, row, col):
    """t = lg2(-log2(u)) of the draw `gumbel_noise` makes, so that g = G_SHIFT - ln 2 * t. A kernel that only needs
    g up to a constant (every softmax over the noisy logits: the constant shifts a whole row) adds t * (-ln 2 * c)
    in one multiply-add and saves `gumbel_noise`'s two multiplies."""
    return lg2_from_keys(row_key(seed, layer, step, head, row), col_key(col))


@triton.jit
def _neg_log2_u_keys(rk, ck):
    """-log2(u) of the draw with keys rk (`row_key`) and ck (`col_key`), broadcast."""
    return neg_log2_u(_uniform(finish_hash(rk ^ ck)))


@triton.jit
def lg2_from_keys(rk, ck):
    """`gumbel_lg2` from the keys (`row_key`, `col_key`), broadcast."""
    # the inner log's relative error becomes g's absolute error; the outer one only needs absolute accuracy
    return _lg2(_neg_log2_u_keys(rk, ck))


@triton.jit
def weight_from_keys(rk, ck):
    """w = 1 / -log2(u) = exp(g) / ln 2 of the draw `gumbel_noise` makes, from the keys: the noise as a weight.
    At tau = 1 a softmax over noisy logits needs only exp(x + g) = exp(x) * exp(g), and the constant 1 / ln 2
    cancels in the normalization: one reciprocal instead of the outer log (and no add into the logit, no log in
    the max)."""
    return _rcp(_neg_log2_u_keys(rk, ck))


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
