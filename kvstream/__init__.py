"""kvstream: batch LLM generation over long inputs with a compressed KV cache (Keyformer, H2O, KIVI) on Ray.

    from kvstream import CacheConfig, CompressedCache, Engine

Subpackages (DESIGN.md): `kvstream.kvcache` (the cache and the engine), `kvstream.kernels` (Triton kernels and
their torch references), `kvstream.pipeline` (the Ray Data jobs). The code lives under one `kvstream` package
because the bare names collide with other distributions (`kernels` is Hugging Face's, which transformers needs).
The names below load on first use, so a Ray worker that only reads and tokenizes imports neither torch nor
transformers through this file.
"""

from __future__ import annotations

__version__ = "0.2.0"

_API = {
    "CacheConfig": "kvstream.kvcache.config",
    "CompressedCache": "kvstream.kvcache.cache",
    "Engine": "kvstream.kvcache.engine",
    "POLICIES": "kvstream.kvcache.config",
    "QUANTS": "kvstream.kvcache.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvstream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
