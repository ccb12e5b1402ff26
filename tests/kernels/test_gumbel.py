"""In-kernel hash-Gumbel noise (kernels/gumbel.py): equal to gumbel_ref, reproducible, varied, Gumbel(0, 1)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvstream.kernels.gumbel import gumbel_triton, neg_log_u
from kvstream.kernels.gumbel_ref import gumbel, hash_coords


def test_equals_reference_on_random_coordinates(device):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    coords = [torch.randint(-2**40, 2**40, (512,), generator=gen) for _ in range(6)]
    out = gumbel_triton(*[c.to(device) for c in coords])
    ref = gumbel(*coords)
    assert torch.isfinite(out).all()
    assert (out.cpu() - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


def test_reproducible_and_different_across_seeds_and_steps(device):
    col = torch.arange(4096, device=device)
    a = gumbel_triton(5, 1, 3, 2, 0, col)
    assert torch.equal(a, gumbel_triton(5, 1, 3, 2, 0, col))
    others = (gumbel_triton(6, 1, 3, 2, 0, col), gumbel_triton(5, 1, 4, 2, 0, col), gumbel_triton(5, 2, 3, 2, 0, col))
    for other in others:  # another seed, step, layer
        assert (a != other).float().mean() > 0.99
        assert abs(torch.corrcoef(torch.stack([a, other]).cpu())[0, 1]) < 0.1


def test_gumbel_distribution(device):
    """Many draws: mean ~ Euler-Mascheroni, var ~ pi^2/6, and a Kolmogorov-Smirnov distance to the Gumbel CDF."""
    n = 1 << 16
    g = gumbel_triton(torch.tensor(12345), 0, 7, torch.arange(4).view(4, 1), 0, torch.arange(n // 4).view(1, -1),
                      device=device).flatten().double().cpu()
    ref = gumbel(torch.tensor(12345), 0, 7, torch.arange(4).view(4, 1), 0, torch.arange(n // 4).view(1, -1))
    assert (g - ref.flatten().double()).abs().max() <= 1e-5 * (1 + ref.abs().max())  # every u range, 1 - u ~ 1e-5
    assert abs(g.mean() - 0.5772156649) < 0.03
    assert abs(g.var() - math.pi ** 2 / 6) < 0.06
    s, _ = g.sort()
    cdf = torch.exp(-torch.exp(-s))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((emp - cdf).abs(), (emp - 1.0 / n - cdf).abs()).max()
    assert ks < 1.63 / math.sqrt(n), f"KS distance {ks:.4g} rejects Gumbel(0, 1) at the 1% level"


def test_finite_where_the_uniform_would_round_to_one(device):
    """Hashes with hash >> 8 == 2**24 - 1 (one draw in 2**24; these columns were found by search) made u round to
    1.0 in float32 and g = +inf, which turns a noisy softmax into NaN; both draws now give the largest finite value
    and their neighbours are untouched."""
    col = torch.tensor([3735224, 46234235, 3735225])
    assert torch.all((hash_coords(7, 1, 3, 2, 5, col[:2]) >> 8) == 2**24 - 1)
    ref = gumbel(7, 1, 3, 2, 5, col)
    out = gumbel_triton(7, 1, 3, 2, 5, col.to(device)).cpu()
    top = -math.log(-math.log(1.0 - 2.0 ** -24))  # 16.64...
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(ref[:2], torch.full((2,), top), rtol=1e-6, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ref[2] < top - 1e-3


@triton.jit
def _neg_log_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, neg_log_u(tl.load(u_ptr + offs, mask=m, other=0.5)), mask=m)


def test_inner_log_relative_accuracy(device):
    """The Gumbel draw's inner -ln(u) (lg2 below 0.75, an atanh series above) against float64 over every float32
    u the hash gives: its relative error is the draw's absolute error, so it must hold down to u = 1 - 2**-24
    (where -ln(u) ~ 6e-8) and on both sides of the switch."""
    k = torch.cat([torch.arange(0, 2**24, 4099), torch.arange(2**24 - 4096, 2**24),  # near 1
                   torch.arange(12582912 - 2048, 12582912 + 2048)])  # around u = 0.75 (k = 0.75 * 2**24)
    u = ((k.double() + 0.5) / 2**24).clamp(max=1 - 2**-24).float()
    out = torch.empty_like(u, device=device)
    _neg_log_kernel[(triton.cdiv(u.numel(), 1024),)](u.to(device), out, u.numel(), BLOCK=1024)
    exact = -torch.log(u.double())
    rel = ((out.cpu().double() - exact) / exact).abs()
    assert torch.isfinite(out).all() and rel.max() < 1e-6, f"max relative error {rel.max():.3g} at u={u[rel.argmax()]}"
