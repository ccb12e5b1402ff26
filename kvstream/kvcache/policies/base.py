"""Selection policies: which tokens of a sequence stay in the cache (per layer, per KV head).

A policy answers three questions; `kvcache.storage` owns the slots, the top-k and the gathers:
- `recent_window(cfg, k)`: how many of the most recent tokens always stay (kept in full precision);
- `scored` / `noisy`: whether eviction ranks tokens by accumulated attention (H2O) or by Keyformer's
  Gumbel-noised, temperature-scaled score;
- `select(scores, cap)`: at prefill, which of the older tokens (those before the recent window) fill the
  `cap` remaining slots.
During decode, the token leaving the recent window competes with the kept older tokens: for scored policies the
lowest score is evicted; for unscored ones (window, sink) the leaving token is evicted once the budget is full.
"""

from __future__ import annotations

import torch

from kvstream.kvcache.config import CacheConfig

POLICY_REGISTRY: dict[str, type["Policy"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        POLICY_REGISTRY[name] = cls
        return cls

    return deco


def get_policy(cfg: CacheConfig) -> "Policy":
    try:
        return POLICY_REGISTRY[cfg.policy](cfg)
    except KeyError:
        raise ValueError(f"unknown policy {cfg.policy!r}; valid: {', '.join(sorted(POLICY_REGISTRY))}") from None


class Policy:
    name = "base"
    scored = False
    noisy = False
    keeps_prefix = False  # select() always returns positions 0 .. c-1 (the store copies a slice, no gather)

    def __init__(self, cfg: CacheConfig):
        self.cfg = cfg

    def budget(self, n: int) -> int:
        """Token budget k of a sequence with an unpadded prompt of n tokens."""
        return self.cfg.token_budget(n)

    def recent_window(self, k: int) -> int:
        return self.cfg.recent_window(k)

    def select(self, scores: torch.Tensor | None, m: int, cap: int, h: int, device) -> torch.Tensor:
        """Pick at most min(cap, m) of the m older tokens (positions 0..m-1) to keep, for each of h KV heads.

        scores: (h, m) float32 accumulated prefill scores (None for unscored policies).
        Returns (H, c) int64 positions, ascending along the last dim.
        """
        raise NotImplementedError

    @staticmethod
    def _first(m: int, c: int, h: int, device) -> torch.Tensor:
        return torch.arange(c, device=device).expand(h, c)

    @staticmethod
    def _topk(scores: torch.Tensor, c: int) -> torch.Tensor:
        if c >= scores.shape[-1]:
            return torch.arange(c, device=scores.device).expand(scores.shape[0], c)
        idx = torch.topk(scores, c, dim=-1, sorted=False).indices
        return torch.sort(idx, dim=-1).values
