"""kvstream's compressed KV cache and generation engine.

    from kvcache import CacheConfig, CompressedCache, Engine
"""

from kvcache.cache import CompressedCache
from kvcache.config import CacheConfig

__all__ = ["CacheConfig", "CompressedCache", "Engine"]


def __getattr__(name):
    if name == "Engine":
        from kvcache.engine import Engine

        return Engine
    raise AttributeError(f"module 'kvcache' has no attribute {name!r}")
