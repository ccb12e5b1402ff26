"""In-kernel hash-Gumbel noise (kernels/gumbel.py): equal to gumbel_ref, reproducible, varied, Gumbel(0, 1)."""

from __future__ import annotations

import math

import torch

from kernels.gumbel import gumbel_triton
from kernels.gumbel_ref import gumbel, hash_coords


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
