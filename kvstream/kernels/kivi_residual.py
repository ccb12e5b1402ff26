"""KIVI's residual moves as predicated device work (Triton), same semantics as `kivi_residual_ref`.

Policy full + kivi2/kivi4, S slot = position, ring of R = Cw slots (ring slot of position p is p % R):
- `kivi_value_exit` (before the new token is written into the ring): one program per (sequence, KV head) encodes
  the value of position pos - R from its ring slot into S slot pos - R; the head-0 program sets sv_len (no
  program of that launch reads sv_len).
- `kivi_key_flush` (after the step's attention): one program per (sequence, KV head, span of max(G, P) ring
  slots) quantizes the ring's keys into S slots s_len + [0, R) and writes s_pos there, when R keys wait in full
  precision; then a second launch updates s_len and win_lo (the first launch reads s_len in every program).
No host sync, no allocation: graph-capturable. The quantization shares `evict_write`'s helpers (the fp32 steps of
`kivi_quant`: codes, scales and mins bit-exact against the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstream.kernels.evict_write import _LAUNCH, _encode_token, _store_key_span
from kvstream.kernels.kivi_residual_ref import check_kivi_args
from kvstream.kernels.slots import KVSlots
from kvstream.kernels.triton_util import check_device


@triton.jit
def _kivi_value_exit_kernel(
    win_v_ptr, pos_ptr, active_ptr, sv_len_ptr, vc_ptr, vs_ptr, vm_ptr,
    Cs,
    stride_wvb, stride_wvh, stride_wvn, stride_wvd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_vsb, stride_vsh, stride_vsn, stride_vsd,
    R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, NWB: tl.constexpr,
):
    # one program: one (sequence b, KV head h)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    t = tl.load(pos_ptr + b) - R  # the position whose value leaves the ring
    if (tl.load(active_ptr + b) != 0) & (t >= 0) & (t < Cs):
        vsoff = b * stride_vsb + h * stride_vsh + t * stride_vsn
        _encode_token(win_v_ptr + b * stride_wvb + h * stride_wvh + (t % R) * stride_wvn, stride_wvd,
                      vc_ptr + b * stride_vcb + h * stride_vch + t * stride_vcn, stride_vcd,
                      vs_ptr + vsoff, vm_ptr + vsoff, stride_vsd, D, BITS, G, NWB)
        if h == 0:
            tl.store(sv_len_ptr + b, t + 1)


@triton.jit
def _flushes(pos, act, s_len, Cs, R: tl.constexpr):
    """Whether a sequence flushes its R residual keys this step (R wait in full precision and S has room)."""
    return act & (pos + 1 - s_len >= R) & (s_len + R <= Cs)


@triton.jit
def _kivi_key_flush_kernel(
    win_k_ptr, pos_ptr, active_ptr, s_len_ptr, s_pos_ptr, kc_ptr, ks_ptr, km_ptr,
    Cs,
    stride_wkb, stride_wkh, stride_wkn, stride_wkd,
    stride_pb, stride_ph, stride_pn,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,
    R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, UNIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program: one (sequence b, KV head h), UNIT ring slots (whole groups and whole words)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    r0 = tl.program_id(2) * UNIT
    s_len = tl.load(s_len_ptr + b)
    if _flushes(tl.load(pos_ptr + b), tl.load(active_ptr + b) != 0, s_len, Cs, R):
        NGU: tl.constexpr = UNIT // G
        r = r0 + tl.arange(0, NGU)[:, None, None] * G + tl.arange(0, G)[None, :, None]  # (NGU, G, 1) ring slot
        k_bh = win_k_ptr + b * stride_wkb + h * stride_wkh
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)[None, None, :]
            x = tl.load(k_bh + r * stride_wkn + d * stride_wkd, mask=d < D, other=0.0).to(tl.float32)
            _store_key_span(x, (d < D) & (r >= 0), kc_ptr + b * stride_kcb + h * stride_kch,
                            ks_ptr + b * stride_ksb + h * stride_ksh, km_ptr + b * stride_ksb + h * stride_ksh,
                            stride_kcn, stride_kcd, stride_ksn, stride_ksd, s_len + r0, d0, D, BITS, G, UNIT,
                            BLOCK_D)
        slot = s_len + r0 + tl.arange(0, UNIT)  # ring slot i holds position s_len + i
        tl.store(s_pos_ptr + b * stride_pb + h * stride_ph + slot * stride_pn, slot)


@triton.jit
def _kivi_flush_lengths_kernel(pos_ptr, active_ptr, s_len_ptr, win_lo_ptr, B, Cs, R: tl.constexpr,
                               BLOCK_B: tl.constexpr):
    # one program: BLOCK_B sequences; each reads and writes only its own entries
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    m = b < B
    s_len = tl.load(s_len_ptr + b, mask=m, other=0)
    go = _flushes(tl.load(pos_ptr + b, mask=m, other=0), tl.load(active_ptr + b, mask=m, other=0) != 0, s_len, Cs, R)
    tl.store(s_len_ptr + b, s_len + R, mask=m & go)
    tl.store(win_lo_ptr + b, s_len + R, mask=m & go)


def kivi_value_exit(slots: KVSlots, pos: torch.Tensor, active: torch.Tensor) -> None:
    """The value R positions old leaves the ring into S (`kivi_residual_ref`), in place; one launch.

    slots: KVSlots quant "channel", bits 2 or 4, group size G a power of two dividing D; win_v (B, H, R, D) model
        dtype (R = Cw a multiple of G and of P = 32 // bits); s_vc (B, H, Cs, ceil(D / P)) int32, s_vs, s_vm
        (B, H, Cs, D // G) model dtype, Cs a multiple of R; sv_len (B,) int32 (updated).
    pos (B,) int32: position of the token being decoded (not yet in the ring); active (B,) bool.
    """
    name = "kivi_value_exit"
    check_kivi_args(name, slots, None, pos, active)
    check_device(name, slots.win_v)
    B, H, R, D = slots.win_v.shape
    if B * H == 0 or slots.cs == 0:
        return
    if slots.s_vs.stride() != slots.s_vm.stride():
        raise ValueError(f"{name}: s_vs and s_vm must have the same strides")
    P = 32 // slots.bits
    _kivi_value_exit_kernel[(B, H)](
        slots.win_v, pos, active.view(torch.int8), slots.sv_len, slots.s_vc, slots.s_vs, slots.s_vm, slots.cs,
        *slots.win_v.stride(), *slots.s_vc.stride(), *slots.s_vs.stride(),
        R=R, D=D, BITS=slots.bits, G=slots.group_size, NWB=triton.next_power_of_2(-(-D // P)), **_LAUNCH,
    )


def kivi_key_flush(slots: KVSlots, s_pos: torch.Tensor, pos: torch.Tensor, active: torch.Tensor) -> None:
    """The ring's R keys into S when R wait in full precision (`kivi_residual_ref`), in place; two launches.

    slots: KVSlots quant "channel", bits 2 or 4, group size G a power of two dividing D; win_k (B, H, R, D) model
        dtype (R = Cw a multiple of G and of P = 32 // bits); s_kc (B, H, Cs // P, D) int32, s_ks, s_km
        (B, H, Cs // G, D) model dtype, Cs a multiple of R; s_len, win_lo (B,) int32 (updated).
    s_pos (B, H, Cs) int32 (updated). pos (B,) int32: position of the token decoded this step; active (B,) bool.
    """
    name = "kivi_key_flush"
    check_kivi_args(name, slots, s_pos, pos, active)
    check_device(name, slots.win_k)
    B, H, R, D = slots.win_k.shape
    if B == 0 or slots.cs == 0:
        return
    if slots.s_ks.stride() != slots.s_km.stride():
        raise ValueError(f"{name}: s_ks and s_km must have the same strides")
    G, bits = slots.group_size, slots.bits
    unit = max(G, 32 // bits)
    act = active.view(torch.int8)
    if H > 0:
        _kivi_key_flush_kernel[(B, H, R // unit)](
            slots.win_k, pos, act, slots.s_len, s_pos, slots.s_kc, slots.s_ks, slots.s_km, slots.cs,
            *slots.win_k.stride(), *s_pos.stride(), *slots.s_kc.stride(), *slots.s_ks.stride(),
            R=R, D=D, BITS=bits, G=G, UNIT=unit, BLOCK_D=min(triton.next_power_of_2(D), max(16, 2048 // unit)),
            **_LAUNCH,
        )
    block_b = min(max(triton.next_power_of_2(B), 16), 1024)
    _kivi_flush_lengths_kernel[(triton.cdiv(B, block_b),)](
        pos, act, slots.s_len, slots.win_lo, B, slots.cs, R=R, BLOCK_B=block_b,
    )
