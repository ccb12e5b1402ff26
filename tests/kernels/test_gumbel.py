"""In-kernel hash-Gumbel noise (kernels/gumbel.py): equal to gumbel_ref, reproducible, varied, Gumbel(0, 1)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvstream.kernels.gumbel import gumbel_triton, neg_log_u
from kvstream.kernels.gumbel_ref import gumbel, hash_coords, uniform_from_hash


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


def test_the_largest_hash_gives_the_largest_finite_draw(device):
    """Hashes with hash >> 9 == 2**23 - 1 (one draw in 2**23; these columns were found by search) give u = 1 - 2**-24,
    the largest u, and the largest finite g (the uniform never reaches 1, where g = +inf would turn a noisy softmax
    into NaN); their neighbour is an ordinary draw."""
    col = torch.tensor([3735224, 46234235, 3735225])
    assert torch.all((hash_coords(7, 1, 3, 2, 5, col[:2]) >> 9) == 2**23 - 1)
    ref = gumbel(7, 1, 3, 2, 5, col)
    out = gumbel_triton(7, 1, 3, 2, 5, col.to(device)).cpu()
    top = -math.log(-math.log(1.0 - 2.0 ** -24))  # 16.64...
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(ref[:2], torch.full((2,), top), rtol=1e-6, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ref[2] < top - 1e-3


def test_uniform_takes_the_odd_multiples_of_two_to_the_minus_24():
    """uniform_from_hash: exact float32 (2 (h >> 9) + 1) / 2**24 at both ends and between (no clamp, no rounding)."""
    h = torch.tensor([0, 511, 512, 2**31, 2**32 - 1])
    u = uniform_from_hash(h)
    want = torch.tensor([1, 1, 3, 2**23 + 1, 2**24 - 1], dtype=torch.float64) / 2**24
    assert u.dtype == torch.float32 and torch.equal(u.double(), want)


@triton.jit
def _neg_log_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, neg_log_u(tl.load(u_ptr + offs, mask=m, other=0.5)), mask=m)


def test_inner_log_relative_accuracy(device):
    """The Gumbel draw's inner -ln(u) (lg2 up to 0.78, a polynomial in 1 - u above) against float64 over every float32
    u the hash gives: its relative error is the draw's absolute error, so it must hold down to u = 1 - 2**-24
    (where -ln(u) ~ 6e-8) and on both sides of the switch."""
    k = torch.cat([torch.arange(0, 2**23, 2053), torch.arange(2**23 - 4096, 2**23),  # near 1
                   torch.arange(6543114 - 2048, 6543114 + 2048)])  # around u = 0.78 (k = 0.78 * 2**23)
    u = ((2 * k + 1).double() / 2**24).float()
    out = torch.empty_like(u, device=device)
    _neg_log_kernel[(triton.cdiv(u.numel(), 1024),)](u.to(device), out, u.numel(), BLOCK=1024)
    exact = -torch.log(u.double())
    rel = ((out.cpu().double() - exact) / exact).abs()
    assert torch.isfinite(out).all() and rel.max() < 1e-6, f"max relative error {rel.max():.3g} at u={u[rel.argmax()]}"
