"""Which implementation of the hot ops a cache uses: the torch references or the Triton kernels."""

from __future__ import annotations

from typing import Callable

import torch

from kernels.decode_attention_ref import decode_attention_ref
from kernels.prefill_scores_ref import prefill_scores_ref


def resolve_backend(name: str, device: torch.device) -> str:
    """auto -> triton on CUDA, torch elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "triton" and not _triton_available():
        raise RuntimeError("CacheConfig.backend='triton' but triton cannot be imported here; use backend='torch'")
    return name


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def ops(backend: str) -> tuple[Callable, Callable]:
    """(decode_attention, prefill_scores) with the signatures of their torch references."""
    if backend == "torch":
        return decode_attention_ref, prefill_scores_ref
    from kernels.decode_attention import decode_attention
    from kernels.prefill_scores import prefill_scores

    return decode_attention, prefill_scores
