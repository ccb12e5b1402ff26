"""Which implementation of the hot ops a cache uses: the torch references or the Triton kernels."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from kvstream.kernels.decode_attention_ref import decode_attention_ref
from kvstream.kernels.prefill_scores_ref import prefill_scores_ref


def resolve_backend(name: str, device: torch.device, head_dim: int | None = None, group_size: int | None = None,
                    bits: int | None = None) -> str:
    """auto -> triton on CUDA for shapes the kernels support, torch otherwise."""
    if name == "auto":
        ok = device.type == "cuda" and _triton_available() and triton_supports(head_dim, group_size, bits)
        return "triton" if ok else "torch"
    if name == "triton" and not _triton_available():
        raise RuntimeError("CacheConfig.backend='triton' but triton cannot be imported here; use backend='torch'")
    return name


def triton_supports(head_dim: int | None, group_size: int | None, bits: int | None) -> bool:
    """The Triton kernels take power-of-two head_dim >= 16 and quantization groups >= max(16, 32 // bits)."""
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0  # noqa: E731
    if head_dim is not None and not pow2(head_dim):
        return False
    return bits is None or group_size is None or (pow2(group_size) and group_size >= 32 // bits)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def ops(backend: str) -> tuple[Callable, Callable]:
    """(decode_attention, prefill_scores) with the signatures of their torch references."""
    if backend == "torch":
        return decode_attention_ref, prefill_scores_ref
    from kvstream.kernels.decode_attention import decode_attention
    from kvstream.kernels.prefill_scores import prefill_scores

    return decode_attention, prefill_scores
