"""Shared helpers of the kernel tests: tolerance check, random `KVSlots` with ragged, partially filled regions,
clone / exact comparison of the slot tensors a write updates."""

from __future__ import annotations

import dataclasses

import torch

from kvstream.kernels.fp8_quant_ref import fp8_encode, fp8_scale
from kvstream.kernels.kivi_quant_ref import quantize_keys, quantize_values
from kvstream.kernels.slots import KVSlots

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
GARBAGE = 1.0e4  # finite junk in slots that hold no token: a masking bug shows as a large error, not a NaN
FP8_GARBAGE = 0x7E  # fp8: the largest finite code (448 x scale) in free slots


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, tol: float | None = None) -> None:
    """Relative Frobenius error within the dtype's tolerance (or `tol`); NaN or Inf in `out` always fails."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or NaN) in the output"
    assert torch.isfinite(ref).all(), f"{what}: the reference itself is non-finite"
    err = (out - ref).norm() / ref.norm().clamp_min(1e-30)
    tol = TOL[dtype] if tol is None else tol
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"


def make_slots(B, H, D, cs, cw, quant, bits, group_size, dtype, device, s_len, sv_len, gen) -> KVSlots:
    """Random KVSlots. s_len / sv_len: per-sequence lists (sv_len <= s_len <= cs). The ring holds a random
    mix of live tokens, evicted ones (win_pos < win_lo) and empty slots (-1); free slots hold GARBAGE.
    fp8: one key / value scale per (sequence, KV head) from S's amax times a factor in [0.5, 1.5) (so tokens
    encoded later both saturate and fit), and the ring's channels spread over 10**[-6, 1) (subnormal codes too)."""
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    s_len_t = torch.tensor(s_len, dtype=torch.int32)
    sv_len_t = torch.tensor(sv_len, dtype=torch.int32)
    slot = torch.arange(cs).view(1, 1, cs, 1)
    k_free = slot >= s_len_t.view(B, 1, 1, 1)
    v_free = slot >= sv_len_t.view(B, 1, 1, 1)
    win_lo = torch.randint(0, 50, (B,), generator=gen, dtype=torch.int32)
    win_pos = win_lo.view(B, 1) + torch.randint(-8, 200, (B, cw), generator=gen, dtype=torch.int32)
    win_pos[torch.rand(B, cw, generator=gen) < 0.2] = -1
    win_pos[0, 0] = win_lo[0]  # at least one live ring token in sequence 0
    s = KVSlots(quant=quant, bits=bits, group_size=group_size, s_len=s_len_t, sv_len=sv_len_t,
                win_k=rnd(B, H, cw, D), win_v=rnd(B, H, cw, D), win_pos=win_pos, win_lo=win_lo)
    k, v = rnd(B, H, cs, D), rnd(B, H, cs, D)
    if quant == "none":
        s.s_k = k.masked_fill(k_free, GARBAGE)
        s.s_v = v.masked_fill(v_free, GARBAGE)
    elif quant == "fp8":
        spread = 10.0 ** (torch.rand(D, generator=gen) * 7 - 6)
        s.win_k, s.win_v = (s.win_k.float() * spread).to(dtype), (s.win_v.float() * spread).to(dtype)
        for x, free, codes, scale in ((k, k_free, "s_k", "s_ks"), (v, v_free, "s_v", "s_vs")):
            sc = fp8_scale(x.abs().amax(dim=(2, 3)) * (0.5 + torch.rand(B, H, generator=gen))).unsqueeze(-1)
            setattr(s, codes, fp8_encode(x, sc.unsqueeze(-1)).masked_fill(free, FP8_GARBAGE))
            setattr(s, scale, sc)  # (B, H, 1) float32
    else:
        if quant == "channel":
            s.s_kc, s.s_ks, s.s_km = quantize_keys(k, bits, group_size)
            gfree = (torch.arange(cs // group_size) * group_size).view(1, 1, -1, 1) >= s_len_t.view(B, 1, 1, 1)
            s.s_ks.masked_fill_(gfree, GARBAGE)
        else:
            s.s_kc, s.s_ks, s.s_km = quantize_values(k, bits, group_size)
            s.s_ks.masked_fill_(k_free, GARBAGE)
        s.s_vc, s.s_vs, s.s_vm = quantize_values(v, bits, group_size)
        s.s_vs.masked_fill_(v_free, GARBAGE)
    for name in ("s_len", "sv_len", "win_k", "win_v", "win_pos", "win_lo", "s_k", "s_v", "s_kc", "s_ks", "s_km",
                 "s_vc", "s_vs", "s_vm"):
        t = getattr(s, name)
        if t is not None:
            setattr(s, name, t.to(device).contiguous())
    return s


# the slot tensors a cache write updates (lengths and the kept store S)
WRITTEN = ("s_len", "sv_len", "win_lo", "s_k", "s_v", "s_kc", "s_ks", "s_km", "s_vc", "s_vs", "s_vm")


def clone_written(slots: KVSlots, *extra):
    """A KVSlots sharing the ring with `slots` but owning copies of WRITTEN, and copies of the extra tensors."""
    s = dataclasses.replace(slots, **{n: getattr(slots, n).clone() for n in WRITTEN if getattr(slots, n) is not None})
    return (s, *[a.clone() if isinstance(a, torch.Tensor) else a for a in extra])


def assert_equal_written(got: KVSlots, want: KVSlots, what: str, **extra) -> None:
    """WRITTEN tensors and the named extra (got, want) pairs equal bit for bit, with where they differ."""
    pairs = {n: (getattr(got, n), getattr(want, n)) for n in WRITTEN} | extra
    for n, (a, b) in pairs.items():
        if a is None and b is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {n} {a.dtype}{tuple(a.shape)} vs {b.dtype}"
        diff = a.cpu() != b.cpu()
        assert not diff.any(), f"{what}: {n} differs at {diff.nonzero()[:6].tolist()} ({int(diff.sum())} elements)"
