"""Kernel tests: on CUDA when there is a GPU, else on CPU under the Triton interpreter (TRITON_INTERPRET=1).

The interpreter flag is read when a kernel is decorated, so it is set here before any kernel module is
imported (kernel modules already imported without it are reloaded). Skips the folder if triton cannot import.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kvstream.kernels.triton_util", "kvstream.kernels.gumbel", "kvstream.kernels.fp8_quant",
                  "kvstream.kernels.kivi_quant",
                  "kvstream.kernels.evict_write", "kvstream.kernels.kivi_residual", "kvstream.kernels.decode_kivi",
                  "kvstream.kernels.decode_kivi_cc", "kvstream.kernels.decode_kivi_gqa",
                  "kvstream.kernels.decode_attention",
                  "kvstream.kernels.prefill_scores", "kvstream.kernels.fused_layer"):  # dependency order
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

try:
    import triton  # noqa: F401
    TRITON_ERROR = None
except Exception as e:  # pragma: no cover - depends on the machine
    TRITON_ERROR = f"triton cannot be imported here ({type(e).__name__}: {e}); the Triton kernel tests need it"


def pytest_collection_modifyitems(config, items):
    if TRITON_ERROR is None:
        return
    skip = pytest.mark.skip(reason=TRITON_ERROR)
    for item in items:
        if "tests/kernels" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"
