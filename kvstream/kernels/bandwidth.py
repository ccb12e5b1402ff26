"""The memory roofline's denominator: device-to-device copy bandwidth, measured where the benchmark runs."""

from __future__ import annotations

import torch


def copy_bandwidth(device="cuda") -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus written (median of timed copies,
    `triton.testing.do_bench`)."""
    from triton.testing import do_bench

    a = torch.empty(1 << 30, dtype=torch.int16, device=device).random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    del a, b
    return 2 * (2 << 30) / (ms * 1e-3)
