"""Memory is real: stats() counts the bytes of every tensor held, and compression shrinks them."""

import pytest
import torch

from kvstream.kvcache import CacheConfig, CompressedCache
from kvstream.kvcache.models import cache_kwarg
from tests.kvcache.tiny import build_model, padded_batch


def _tensors_reachable(obj, seen=None) -> dict[int, torch.Tensor]:
    """Every tensor reachable from obj through attributes, lists and dicts (found independently of stats())."""
    seen = {} if seen is None else seen
    stack, visited = [obj], set()
    while stack:
        o = stack.pop()
        if id(o) in visited:
            continue
        visited.add(id(o))
        if isinstance(o, torch.Tensor):
            seen[id(o)] = o
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and type(o).__module__.startswith("kvstream"):
            stack.extend(vars(o).values())
        elif hasattr(o, "__dict__") and type(o).__name__ == "_Layer":
            stack.extend(vars(o).values())
    return seen


@pytest.fixture(scope="module")
def model():
    # head_dim 128, MHA, bf16 as served
    return build_model("llama", hidden=256, heads=2, kv_heads=2, layers=1).to(torch.bfloat16)


def _run(model, cfg, n=2048, new=2):
    ids, mask = padded_batch([n], vocab=128, seed=0)
    cache = CompressedCache(cfg, model.config)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                   **{cache_kwarg(model): cache}, pad_token_id=0)
    model.config._attn_implementation = "sdpa"
    return cache


@pytest.mark.parametrize("cfg, bound", [
    (CacheConfig(policy="keyformer", budget=0.5, max_new_tokens=2), 0.56),
    (CacheConfig(policy="full", quant="kivi2", max_new_tokens=2), 0.30),
    (CacheConfig(policy="keyformer", budget=0.5, quant="kivi2", max_new_tokens=2), 0.25),
    (CacheConfig(policy="full", quant="fp8", max_new_tokens=2), 0.51),
    (CacheConfig(policy="keyformer", budget=0.5, quant="fp8", max_new_tokens=2), 0.34),
], ids=["keyformer0.5", "kivi2", "keyformer0.5+kivi2", "fp8", "keyformer0.5+fp8"])
def test_compressed_bytes_at_2048_tokens(model, cfg, bound):
    cache = _run(model, cfg)
    st = cache.stats()
    held = _tensors_reachable(cache)
    assert st["kv_bytes"] == sum(t.numel() * t.element_size() for t in held.values())
    ratio = st["kv_bytes"] / st["kv_bytes_full"]
    assert ratio <= bound, ratio
    assert st["kv_bytes_full"] == 1 * 2 * 2 * 128 * 2 * 2049  # layers x K,V x heads x head_dim x bf16 x tokens


def test_full_cache_bytes_are_the_tokens(model):
    cache = _run(model, CacheConfig(policy="full", max_new_tokens=2), n=300)
    st = cache.stats()
    # 301 tokens in S plus one ring slot, K and V, plus small per-slot metadata
    assert st["kv_bytes_full"] <= st["kv_bytes"] <= st["kv_bytes_full"] * 1.05


def test_fp8_holds_half_the_bytes_plus_scales(model):
    """full + fp8 against full in bf16: each kept slot's key and value take 1 byte per channel instead of 2, and
    each (sequence, KV head) holds one float32 key scale and one value scale; nothing else changes."""
    none, fp8 = (_run(model, CacheConfig(policy="full", quant=q, max_new_tokens=2), n=1000) for q in ("none", "fp8"))
    store = fp8.layers[0].store
    assert store.cs == none.layers[0].store.cs and store.kept.S["s_k"].dtype == torch.uint8
    B, H, D = 1, 2, 128
    saved = 2 * B * H * store.cs * D * (2 - 1) - 2 * B * H * 4  # K and V codes, minus the two scales
    assert none.stats()["kv_bytes"] - fp8.stats()["kv_bytes"] == saved
    assert 0.5 < fp8.stats()["kv_bytes"] / none.stats()["kv_bytes"] < 0.51


def test_per_sequence_bytes_follow_each_rows_tokens(model):
    ids, mask = padded_batch([40, 400], vocab=128, seed=0)
    cache = CompressedCache(CacheConfig(policy="h2o", budget=0.5, max_new_tokens=2), model.config)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, **{cache_kwarg(model): cache},
                   pad_token_id=0)
    model.config._attn_implementation = "sdpa"
    st = cache.stats()
    short, long = st["kv_bytes_per_seq"]
    assert short < long / 5  # the short row is charged for its own 20 tokens, not the long row's 200
    for held, full in zip(st["kv_bytes_per_seq"], st["kv_bytes_full_per_seq"]):
        assert 0.45 < held / full < 0.56
    assert sum(st["kv_bytes_per_seq"]) <= st["kv_bytes"]
