"""Triton KIVI quantize + pack (kernels/kivi_quant.py) against kivi_quant_ref: bit-exact codes, in-place flushes."""

from __future__ import annotations

import pytest
import torch

from kvstream.kernels import kivi_quant as kq
from kvstream.kernels import kivi_quant_ref as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs each run


def _eq(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a.cpu(), b.cpu()), f"{what}: {(a.cpu() != b.cpu()).sum().item()} elements differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bits,G,D", [(2, 32, 64), (4, 64, 128), (2, 128, 128)])
def test_quantize_matches_reference(bits, G, D, dtype, device):
    gen = _gen()
    k = (torch.randn(2, 2, 2 * G, D, generator=gen) * 3).to(dtype)
    k[0, 0, :G, 0] = 1.5  # a constant group: scale 0, codes 0
    valid = torch.rand(2, 2, 2 * G, generator=gen) > 0.3
    valid[1, 1, :G] = False  # an empty group
    for v in (None, valid):
        out = kq.quantize_keys(k.to(device), bits, G, None if v is None else v.to(device))
        for name, a, b in zip(("codes", "scale", "mn"), out, ref.quantize_keys(k, bits, G, v)):
            _eq(a, b, f"keys {name} (valid={'yes' if v is not None else 'no'})")
    x = torch.randn(2, 2, 37, D, generator=gen).to(dtype)
    got, want = kq.quantize_values(x.to(device), bits, G), ref.quantize_values(x, bits, G)
    for name, a, b in zip(("codes", "scale", "mn"), got, want):
        _eq(a, b, f"values {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bits", [2, 4])
def test_flush_into_store_at_offsets(bits, dtype, device):
    """A residual block of R keys read from a ring at per-sequence offsets lands at per-sequence slots; other
    slots and skipped sequences (dst_start < 0) stay untouched; values likewise one token at a time."""
    gen = _gen()
    B, H, D, G, R, Cs, Cw = 3, 2, 64, 32, 64, 192, 80
    P = 32 // bits
    ring = torch.randn(B, H, Cw, D, generator=gen).to(dtype)
    dst = torch.tensor([64, -1, 128], dtype=torch.int32)
    src = torch.tensor([70, 0, 5], dtype=torch.int32)
    codes = torch.randint(-2**31, 2**31 - 1, (B, H, Cs // P, D), generator=gen, dtype=torch.int32)
    scale = torch.randn(B, H, Cs // G, D, generator=gen).to(dtype)
    mn = torch.randn(B, H, Cs // G, D, generator=gen).to(dtype)
    c2, s2, m2 = codes.clone().to(device), scale.clone().to(device), mn.clone().to(device)
    kq.quantize_keys_into(ring.to(device), c2, s2, m2, bits, G, R, dst.to(device), src.to(device))
    for b in range(B):
        exp_c, exp_s, exp_m = codes[b].clone(), scale[b].clone(), mn[b].clone()
        if dst[b] >= 0:
            rows = (src[b] + torch.arange(R)) % Cw
            rc, rs, rm = ref.quantize_keys(ring[b:b + 1, :, rows], bits, G)
            d0 = int(dst[b])
            exp_c[:, d0 // P:(d0 + R) // P] = rc[0]
            exp_s[:, d0 // G:(d0 + R) // G] = rs[0]
            exp_m[:, d0 // G:(d0 + R) // G] = rm[0]
        _eq(c2[b], exp_c, f"key codes of sequence {b}")
        _eq(s2[b], exp_s, f"key scales of sequence {b}")
        _eq(m2[b], exp_m, f"key mins of sequence {b}")
    # values: one token leaving the ring at slot (src % Cw) into store slot dst
    vc = torch.zeros(B, H, Cs, D // P, dtype=torch.int32)
    vs = torch.full((B, H, Cs, D // G), 7.0).to(dtype)
    vm = vs.clone()
    vc2, vs2, vm2 = vc.clone().to(device), vs.clone().to(device), vm.clone().to(device)
    vsrc = torch.tensor([79, 3, 150], dtype=torch.int32)
    kq.quantize_values_into(ring.to(device), vc2, vs2, vm2, bits, G, 1, dst.to(device), vsrc.to(device))
    for b in range(B):
        ec, es, em = vc[b].clone(), vs[b].clone(), vm[b].clone()
        if dst[b] >= 0:
            r = int(vsrc[b]) % Cw
            rc, rs, rm = ref.quantize_values(ring[b:b + 1, :, r:r + 1], bits, G)
            ec[:, dst[b]] = rc[0, :, 0]
            es[:, dst[b]] = rs[0, :, 0]
            em[:, dst[b]] = rm[0, :, 0]
        _eq(vc2[b], ec, f"value codes of sequence {b}")
        _eq(vs2[b], es, f"value scales of sequence {b}")
        _eq(vm2[b], em, f"value mins of sequence {b}")


def test_quantize_rejects_bad_inputs(device):
    x = torch.randn(1, 1, 48, 64, device=device)
    with pytest.raises(ValueError, match="multiple of group_size"):
        kq.quantize_keys(x, 2, 32)
    with pytest.raises(ValueError, match="bits=3"):
        kq.quantize_values(x, 3, 32)
    with pytest.raises(ValueError, match="group_size=8"):
        kq.quantize_values(x, 2, 8)
