"""Triton kernels for the elementwise parts of a Llama-family decoder layer (`kvstream.kvcache.forward`).

transformers runs each of them as a chain of torch ops: RMSNorm is 7 kernels (a float32 copy, pow, mean, add,
rsqrt, multiply, the copy back and the weight), RoPE 6 (two concatenations, four multiply / add), SiLU-and-multiply
2, the residual add 1, each a full pass over the activations. Here each is one pass: at prefill (4096 tokens, the
Llama-2-7B shape) they were ~45 of the forward's 122 ms on an H100, and at decode ~15 launches a layer.

- `add_rms_norm(x, residual, weight, eps)`: residual += x (in place, in the model's dtype), then RMSNorm of the
  sum times the weight, one program per row;
- `rope(q, k, cos, sin, v=None)`: rotates q and k (strided (B, T, heads, D) views, e.g. of one fused QKV
  projection) into contiguous outputs, and copies v out beside them, one program per token;
- `silu_mul(gate, up)`: silu(gate) * up from two strided views (e.g. the halves of one fused gate-up projection).

Every intermediate is rounded to the model's dtype where transformers' op chain rounds it (`kernels.fused_layer_ref`
spells the chain out), so the outputs match the torch reference to the last bit but for the float32 reduction
order and the hardware's exp / rsqrt.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstream.kernels.triton_util import LAUNCH, check_device, to_dtype_rne

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, N, eps, sx, sr, so,
                         HAS_RES: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * sr + cols, mask=m, other=0.0).to(tl.float32)
        h = to_dtype_rne(r + x, DTYPE)  # the residual stream, in the model's dtype
        tl.store(r_ptr + row * sr + cols, h, mask=m)
        x = h.to(tl.float32)
    var = tl.sum(x * x, 0) / N
    y = to_dtype_rne(x * (1.0 / tl.sqrt(var + eps)), DTYPE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so + cols, to_dtype_rne(w * y, DTYPE), mask=m)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) and residual (..., N) (rows contiguous in N, any row stride), weight (N,) of x's dtype ->
    (RMSNorm(residual + x) * weight (a new contiguous tensor), residual + x). The sum is written into `residual`
    in place and returned; with residual None it is x itself (not copied)."""
    check_device("add_rms_norm", x)
    N = x.shape[-1]
    if weight.dtype != x.dtype or weight.shape != (N,) or x.stride(-1) != 1:
        raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} {weight.dtype} against x {tuple(x.shape)} "
                         f"{x.dtype}: the weight must be ({N},) of x's dtype and x's rows contiguous")
    x2 = x.reshape(-1, N)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
            raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match x "
                             f"{tuple(x.shape)} {x.dtype}")
        r2 = residual.view(-1, N)  # a view: the kernel's in-place sum lands in `residual`
    else:
        r2 = x2
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    BLOCK = triton.next_power_of_2(N)
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, N, float(eps), x2.stride(0), r2.stride(0), out.stride(0),
        HAS_RES=residual is not None, DTYPE=_TL[x.dtype], BLOCK=BLOCK,
        num_warps=min(max(BLOCK // 512, 1), 16), **LAUNCH)
    return out.view(x.shape), (x if residual is None else residual)


@triton.jit
def _rotate_heads(src, dst, s_b, s_t, s_h, b, t, T, c1, c2, s1, s2,
                  HEADS, D: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr, DTYPE: tl.constexpr):
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, HALF)[None, :]
    m = h < HEADS
    base = src + b * s_b + t * s_t + h * s_h + d
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    # q * cos + rotate_half(q) * sin with transformers' roundings: each product, then the sum
    o1 = to_dtype_rne(to_dtype_rne(x1 * c1, DTYPE).to(tl.float32) - to_dtype_rne(x2 * s1, DTYPE).to(tl.float32),
                      DTYPE)
    o2 = to_dtype_rne(to_dtype_rne(x2 * c2, DTYPE).to(tl.float32) + to_dtype_rne(x1 * s2, DTYPE).to(tl.float32),
                      DTYPE)
    out = dst + ((b * T + t) * HEADS + h) * D + d
    tl.store(out, o1, mask=m)
    tl.store(out + HALF, o2, mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, T, HQ, HK,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_t,
                 HAS_V: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HQP: tl.constexpr, HKP: tl.constexpr,
                 DTYPE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, HALF)[None, :]
    cs = cos_ptr + b * sc_b + t * sc_t + d
    sn = sin_ptr + b * sc_b + t * sc_t + d
    c1 = tl.load(cs).to(tl.float32)
    c2 = tl.load(cs + HALF).to(tl.float32)
    s1 = tl.load(sn).to(tl.float32)
    s2 = tl.load(sn + HALF).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, sq_b, sq_t, sq_h, b, t, T, c1, c2, s1, s2, HQ, D, HQP, HALF, DTYPE)
    _rotate_heads(k_ptr, ko_ptr, sk_b, sk_t, sk_h, b, t, T, c1, c2, s1, s2, HK, D, HKP, HALF, DTYPE)
    if HAS_V:
        h = tl.arange(0, HKP)[:, None]
        dd = tl.arange(0, D)[None, :]
        m = h < HK
        v = tl.load(v_ptr + b * sv_b + t * sv_t + h * sv_h + dd, mask=m)
        tl.store(vo_ptr + ((b * T + t) * HK + h) * D + dd, v, mask=m)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q (B, T, Hq, D), k and v (B, T, H, D) with D contiguous (any other strides), cos / sin (B, T, D) of q's dtype
    (rows contiguous) -> rotated q, rotated k, v: new contiguous (B, T, heads, D) tensors (v None when not given).
    D a power of two >= 2."""
    check_device("rope", q)
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    ok = (k.shape == (B, T, HK, D) and cos.shape == (B, T, D) and sin.shape == cos.shape and D >= 2
          and D & (D - 1) == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
          and sin.stride() == cos.stride() and cos.dtype == q.dtype and sin.dtype == q.dtype and k.dtype == q.dtype
          and (v is None or (v.shape == k.shape and v.stride(-1) == 1 and v.dtype == q.dtype)))
    if not ok:
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} {cos.dtype}: want "
                         "q (B, T, Hq, D), k / v (B, T, H, D), cos / sin (B, T, D) of one dtype, D a power of two, "
                         "the last dimension contiguous")
    qo = torch.empty((B, T, HQ, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, T, HK, D), dtype=q.dtype, device=q.device)
    vo = None if v is None else torch.empty((B, T, HK, D), dtype=q.dtype, device=q.device)
    vv = k if v is None else v
    _rope_kernel[(B * T,)](
        q, k, vv, cos, sin, qo, ko, qo if vo is None else vo, T, HQ, HK,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2), cos.stride(0), cos.stride(1),
        HAS_V=v is not None, D=D, HALF=D // 2, HQP=triton.next_power_of_2(HQ), HKP=triton.next_power_of_2(HK),
        DTYPE=_TL[q.dtype], num_warps=4, **LAUNCH)
    return qo, ko, vo


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, I, sg, su, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(g_ptr + row * sg + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=m, other=0.0).to(tl.float32)
    a = to_dtype_rne(g / (1.0 + tl.exp(-g)), DTYPE).to(tl.float32)  # silu, rounded as torch's op rounds it
    tl.store(o_ptr + row * I + cols, to_dtype_rne(a * u, DTYPE), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) of one dtype, rows contiguous in I (any row stride: the two halves of a fused gate-up
    output work) -> silu(gate) * up, a new contiguous (..., I) tensor."""
    check_device("silu_mul", gate)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have one shape and dtype, the last dimension contiguous")
    I = gate.shape[-1]
    lead = gate.shape[:-1]
    g2 = gate.reshape(-1, I) if gate.dim() != 2 else gate
    u2 = up.reshape(-1, I) if up.dim() != 2 else up
    out = torch.empty(lead + (I,), dtype=gate.dtype, device=gate.device)
    BLOCK = min(triton.next_power_of_2(I), 2048)
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(I, BLOCK))](g2, u2, out, I, g2.stride(0), u2.stride(0),
                                                           DTYPE=_TL[gate.dtype], BLOCK=BLOCK, num_warps=4, **LAUNCH)
    return out
