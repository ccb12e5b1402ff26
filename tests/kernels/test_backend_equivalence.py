"""End to end: a CompressedCache on backend="triton" (the kernels) generates what backend="torch" (the references)
generates: the same greedy tokens, logits within 1e-3 relative (issue 3)."""

from __future__ import annotations

import pytest
import torch

from kvcache import CacheConfig, CompressedCache
from tests.kvcache.tiny import build_model, greedy, padded_batch

LENGTHS = [45, 11]  # ragged, left padded
NEW = 5
CONFIGS = {
    "h2o": dict(policy="h2o", budget=0.5),
    "keyformer+kivi2": dict(policy="keyformer", budget=0.6, quant="kivi2", group_size=16, residual=16),
    "full+kivi2": dict(policy="full", quant="kivi2", group_size=16, residual=16),
    "full+kivi4": dict(policy="full", quant="kivi4", group_size=16, residual=16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_backend_matches_torch_backend(name, device):
    model = build_model("llama", hidden=64, heads=4, kv_heads=2, layers=1).to(device)  # head_dim 16, GQA 2
    ids, mask = padded_batch(LENGTHS, seed=torch.seed() % 2**31)  # fresh prompts each run
    ids, mask = ids.to(device), mask.to(device)
    runs = {}
    for backend in ("torch", "triton"):
        cfg = CacheConfig(**CONFIGS[name], backend=backend, max_new_tokens=NEW, seed=3)
        cache = CompressedCache(cfg, model.config)
        runs[backend] = greedy(model, ids, mask, NEW, cache)
        assert cache.backend == backend
    (seq_t, logits_t), (seq_k, logits_k) = runs["torch"], runs["triton"]
    assert torch.equal(seq_k, seq_t), f"{name}: greedy tokens differ between the backends"
    for step, (a, b) in enumerate(zip(logits_k, logits_t)):
        assert torch.isfinite(a).all()
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-3, f"{name}: step {step} logits differ by {err:.2e} (relative)"
