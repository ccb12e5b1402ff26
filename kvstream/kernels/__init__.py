"""Triton kernels for the compressed KV cache and their torch references.

Each op: `kernels/<op>.py` (Triton kernel, launcher, public entry) and `kernels/<op>_ref.py` (torch reference).
This package knows nothing of models or Ray.
"""
