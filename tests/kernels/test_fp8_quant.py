"""The fp8 (e4m3) codec: the Triton bit-level encode / decode (kvstream/kernels/fp8_quant.py, used inside the decode
attention and eviction write kernels) against the torch reference, bit for bit; the reference against the e4m3
definition; the per-(sequence, KV head) scale."""

from __future__ import annotations

import pytest
import torch

from kvstream.kernels.fp8_quant import fp8_decode, fp8_encode
from kvstream.kernels.fp8_quant_ref import E4M3_MAX, SCALE_FLOOR, fp8_scale, masked_amax
from kvstream.kernels.fp8_quant_ref import fp8_decode as fp8_decode_ref
from kvstream.kernels.fp8_quant_ref import fp8_encode as fp8_encode_ref

FINITE = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # 254 codes (0x7F: NaN)


def _e4m3_value(c: int) -> float:
    """The OCP E4M3 definition: sign, exponent bias 7, 3 mantissa bits, subnormals at exponent 0."""
    s, e, m = c >> 7, (c >> 3) & 0xF, c & 7
    mag = 2.0 ** (e - 7) * (1 + m / 8) if e else 2.0**-6 * (m / 8)
    return -mag if s else mag


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]).cpu()


def _scales(B, H, values, device):
    return torch.tensor(values, dtype=torch.float32).view(B, H, 1, 1).to(device)


def test_reference_follows_the_e4m3_definition():
    want = torch.tensor([_e4m3_value(int(c)) for c in FINITE])
    assert torch.equal(fp8_decode_ref(FINITE, torch.tensor(1.0), torch.float32), want)
    assert want.abs().max() == E4M3_MAX and (want.abs() > 0).sum() == 252  # +-0 and 252 non-zero codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_reference_bit_for_bit(dtype, device):
    """Every finite code (subnormals, +-0, +-448) at scales from the floor to large, into each model dtype."""
    codes = FINITE.view(1, 1, 2, 127).expand(2, 2, 2, 127).contiguous().to(device)
    scale = _scales(2, 2, [1.0, 0.0123, SCALE_FLOOR, 37.5], device)
    got = fp8_decode(codes, scale, dtype)
    want = fp8_decode_ref(codes, scale, dtype)
    assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_matches_reference_bit_for_bit(dtype, device):
    """Values over 20 decades (subnormal codes, underflow to +-0, saturation past +-448 x scale), exact ties
    between neighbouring codes (round half to even) and values just beside them."""
    g = torch.Generator().manual_seed(7)
    B, H, N, D = 2, 3, 40, 24
    x = torch.randn(B, H, N, D, generator=g) * 10.0 ** (torch.rand(B, H, N, D, generator=g) * 20 - 14)
    vals = fp8_decode_ref(FINITE, torch.tensor(1.0), torch.float32).sort().values
    mid = (vals[1:] + vals[:-1]) / 2  # exact in fp32
    mid = mid[vals[1:] - vals[:-1] > 0]
    ties = torch.cat([mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e9) * mid.sign()),
                      torch.tensor([500.0, -1e30, 448.0, 464.0, -0.0, 0.0, 2.0**-10, 3 * 2.0**-10])])
    x[0, 0].view(-1)[: ties.numel()] = ties
    x = x.to(dtype).to(device)
    scale = _scales(B, H, [1.0, 0.37, 2.5e-3, 8.0, SCALE_FLOOR, 1e-2], device)
    scale[0, 0] = 1.0  # the ties are ties at scale 1
    got, want = fp8_encode(x, scale), fp8_encode_ref(x, scale)
    assert got.dtype == torch.uint8
    diff = got.cpu() != want.cpu()
    assert not diff.any(), f"codes differ at {diff.nonzero()[:5].tolist()}: {got[diff][:5]} vs {want[diff][:5]}"
    assert int((want.cpu() & 0x7F).max()) == 0x7E and not bool(((want.cpu() & 0x7F) == 0x7F).any())  # saturated


def test_round_trip_and_error_bound(device):
    """encode(decode(c)) == c for every finite code; |x_hat - x| <= half a code step (2**-4 relative, or the
    subnormal step 2**-9 x scale) for values within +-448 x scale."""
    scale = _scales(1, 2, [1.0, 0.05], device)
    codes = FINITE.view(1, 1, 1, -1).expand(1, 2, 1, -1).contiguous().to(device)
    assert torch.equal(fp8_encode(fp8_decode(codes, scale, torch.float32), scale).cpu(), codes.cpu())
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 2, 64, 16, generator=g) * 2 - 1) * 448 * scale.cpu() * 10.0 ** -(torch.rand(1, 2, 64, 16,
                                                                                                     generator=g) * 5)
    x_hat = fp8_decode(fp8_encode(x.to(device), scale), scale, torch.float32).cpu()
    bound = torch.maximum(x.abs() * 2.0**-4, 2.0**-10 * scale.cpu())
    assert ((x_hat - x).abs() <= bound).all()


def test_scale_from_the_prompt():
    x = torch.zeros(2, 2, 5, 4)
    x[0, 0, 1, 2] = -896.0  # a valid token
    x[0, 1, 4, 0] = 1e6  # padding (row 0 holds 3 valid tokens): not counted
    x[1, 1, 4, 3] = 4.48  # row 1 holds all 5
    amax = masked_amax(x, torch.tensor([3, 5]))
    assert amax.tolist() == [[896.0, 0.0], [0.0, pytest.approx(4.48)]]
    assert fp8_scale(amax).tolist() == [[2.0, SCALE_FLOOR], [SCALE_FLOOR, pytest.approx(0.01)]]
    assert fp8_encode_ref(x[:, :, :3], fp8_scale(amax).view(2, 2, 1, 1))[0, 0, 1, 2] == 0xFE  # -448


def test_rejects_bad_inputs(device):
    x = torch.zeros(1, 2, 3, 4, device=device)
    with pytest.raises(ValueError, match="scale must hold B \\* H = 2 float32"):
        fp8_encode(x, torch.ones(1, 1, 1, 1, device=device))
    with pytest.raises(ValueError, match="contiguous \\(B, H, N, D\\)"):
        fp8_encode(x[0], torch.ones(2, device=device))
    with pytest.raises(ValueError, match="uint8 e4m3"):
        fp8_decode(x, torch.ones(2, device=device), torch.float32)
