"""kvstream's compressed KV cache and generation engine.

    from kvstream.kvcache import CacheConfig, CompressedCache, Engine
"""

from kvstream.kvcache.cache import CompressedCache
from kvstream.kvcache.config import CacheConfig

__all__ = ["CacheConfig", "CompressedCache", "Engine"]


def __getattr__(name):
    if name == "Engine":
        from kvstream.kvcache.engine import Engine

        return Engine
    raise AttributeError(f"module 'kvstream.kvcache' has no attribute {name!r}")
