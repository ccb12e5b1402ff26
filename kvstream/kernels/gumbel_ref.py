"""Counter-based Gumbel(0, 1) noise: a pure function of (seed, layer, step, head, row, col).

The Triton kernels compute the same 32-bit hash in registers, so the torch and Triton backends draw identical
noise without storing it. The hash mixes the coordinates in, seed first and col last, each with the `lowbias32`
finalizer shape (xor-shift, multiply by an odd constant below 2**31 so products fit in int64 here, xor-shift).

    u = (2 (hash >> 9) + 1) / 2**24 in [2**-24, 1 - 2**-24];  g = -log(-log(u))

u takes the 2**23 odd multiples of 2**-24, each exactly a float32, never 0 or 1 (so g is always finite), and
symmetric around 1/2. The kernels build it from the hash's top 23 bits as a float32 in [1, 2) minus (1 - 2**-24),
with no integer-to-float conversion (a quarter-rate instruction, like the logs).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x2C1B3C6D


def mix32(x: torch.Tensor) -> torch.Tensor:
    """One round of the 32-bit finalizer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    x = x ^ (x >> 16)
    return x


def hash_coords(seed, layer, step, head, row, col) -> torch.Tensor:
    """Hash of broadcastable integer coordinates (tensors or ints, each taken mod 2**32) -> int64 in [0, 2**32)."""
    h = None
    for c in (seed, layer, step, head, row, col):  # coarse to fine: broadcasting keeps the early rounds small
        c = torch.as_tensor(c, dtype=torch.int64) & MASK32
        h = mix32(c if h is None else (c ^ h))
    return h


U_MAX = 1.0 - 2.0 ** -24  # the largest u (and float32 below 1)


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """int64 hash in [0, 2**32) -> float32 uniform (2 (h >> 9) + 1) / 2**24 in (0, 1), exact (module docstring)."""
    return ((h >> 9) * 2 + 1).to(torch.float32) * (1.0 / 16777216.0)


def gumbel(seed, layer, step, head, row, col) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32, of the broadcast shape of the coordinates."""
    u = uniform_from_hash(hash_coords(seed, layer, step, head, row, col))
    return -torch.log(-torch.log(u))
