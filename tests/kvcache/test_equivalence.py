"""`full` equals transformers' own cache; every eviction policy with a budget above the sequence equals `full`."""

import pytest
import torch
from tests.kvcache.tiny import build_model, greedy, padded_batch

from kvstream.kvcache import CacheConfig, CompressedCache
from kvstream.kvcache.models import cache_kwarg

LENGTHS = [23, 40, 31]  # left padded to 40
NEW = 12


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_full_matches_transformers(family):
    model = build_model(family)
    ids, mask = padded_batch(LENGTHS)
    ref_seq, ref_logits = greedy(model, ids, mask, NEW)  # transformers' DynamicCache + SDPA
    cache = CompressedCache(CacheConfig(policy="full"), model.config)
    seq, logits = greedy(model, ids, mask, NEW, cache)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits[0], ref_logits[0])  # prefill: the very same SDPA call
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    st = cache.stats()
    assert st["tokens_seen"] == sum(LENGTHS) + len(LENGTHS) * (NEW - 1)
    assert st["tokens_kept"] == st["tokens_seen"]


@pytest.mark.parametrize("policy", ["window", "sink", "h2o", "keyformer"])
def test_budget_above_sequence_equals_full(policy):
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)  # head_dim 32
    ids, mask = padded_batch(LENGTHS, seed=1)
    ref_seq, ref_logits = greedy(model, ids, mask, NEW)
    cfg = CacheConfig(policy=policy, budget=max(LENGTHS) + NEW + 5, max_new_tokens=NEW)
    cache = CompressedCache(cfg, model.config)
    seq, logits = greedy(model, ids, mask, NEW, cache)
    assert torch.equal(seq, ref_seq)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cache.stats()["tokens_kept"] == cache.stats()["tokens_seen"]


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_budget_above_sequence_evicts_nothing_when_quantized(policy):
    """With kivi2 the tokens before the recent window are quantized, not dropped: all are still held."""
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)
    ids, mask = padded_batch(LENGTHS, seed=1)
    cfg = CacheConfig(policy=policy, budget=max(LENGTHS) + NEW + 5, quant="kivi2", max_new_tokens=NEW)
    cache = CompressedCache(cfg, model.config)
    greedy(model, ids, mask, NEW, cache)
    assert cache.stats()["tokens_kept"] == cache.stats()["tokens_seen"]
    seen = [n + NEW - 1 for n in LENGTHS]
    assert [len(h) for h in cache.kept_positions(1)[0]] == [seen[0]] * 2


def test_compression_changes_something_but_stays_close():
    """A real budget evicts tokens (the test above is not vacuous) and the output stays finite."""
    model = build_model("llama", hidden=128)
    ids, mask = padded_batch([60, 45], seed=2)
    cache = CompressedCache(CacheConfig(policy="h2o", budget=0.3, max_new_tokens=8), model.config)
    seq, logits = greedy(model, ids, mask, 8, cache)
    st = cache.stats()
    assert st["tokens_kept"] < st["tokens_seen"]
    assert all(torch.isfinite(x).all() for x in logits)


def test_sampling_with_compressed_cache_is_seeded():
    model = build_model("llama", hidden=128)
    ids, mask = padded_batch([30, 20], seed=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        cache = CompressedCache(CacheConfig(policy="keyformer", budget=0.5, max_new_tokens=10, seed=3), model.config)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                   top_p=0.9, temperature=1.0, **{cache_kwarg(model): cache}, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])
