"""CacheConfig validation and loading; clear errors for bad input."""

import glob

import pytest
import torch

from kvstream.kvcache import CacheConfig, CompressedCache
from kvstream.kvcache.models import cache_kwarg
from tests.kvcache.tiny import build_model, padded_batch


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="snapkv2"), "valid: |is not one of full, window, sink, h2o, keyformer"),
    (dict(quant="int3"), "is not one of none, fp8, kivi2, kivi4, token2"),
    (dict(backend="cuda"), "is not one of auto, torch, triton"),
    (dict(budget=0.0), r"must be in \(0, 1\]"),
    (dict(budget=-3), "must be >= 1 token"),
    (dict(budget=1.5), r"must be in \(0, 1\]"),
    (dict(budget="half"), "must be a float"),
    (dict(budget=True), "must be a float"),
    (dict(residual=100, group_size=32), "multiple of group_size"),
    (dict(group_size=24), "group_size=24 must be one of"),
    (dict(policy="sink", budget=4, sink=4), r"smaller than sink \(4\) \+ 1"),
    (dict(recent_ratio=1.5), r"recent_ratio=1.5 must be in \[0, 1\]"),
    (dict(tau_init=0.0), "both must be > 0"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
    (dict(quant="kivi2", group_size=8, residual=8), "residual=8 must be a multiple of 16 at 2 bits"),
])
def test_invalid_configs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown keys \\['budgett'\\]; valid keys: policy, budget"):
        CacheConfig.from_dict({"policy": "h2o", "budgett": 0.5})


def test_budget_semantics():
    assert CacheConfig(policy="h2o", budget=0.5).token_budget(101) == 50
    assert CacheConfig(policy="h2o", budget=64).token_budget(1000) == 64
    assert CacheConfig(policy="h2o", budget=64.0).budget == 64  # a whole float above 1 is a count
    assert CacheConfig(policy="sink", budget=0.1, sink=4).token_budget(20) == 5  # at least sink + 1
    assert CacheConfig(policy="keyformer", budget=0.5, recent_ratio=0.3).recent_window(100) == 30


def test_yaml_configs_load():
    paths = sorted(glob.glob("conf/cache/*.yaml"))
    assert len(paths) >= 5
    for p in paths:
        cfg = CacheConfig.from_yaml(p)
        assert CacheConfig.from_dict(cfg.to_dict()) == cfg


def test_head_dim_must_divide_into_groups():
    model = build_model("llama", hidden=96, heads=2, kv_heads=2)  # head_dim 48
    with pytest.raises(ValueError, match="head_dim 48 is not a multiple of CacheConfig.group_size=32"):
        CompressedCache(CacheConfig(quant="kivi2"), model.config)
    CompressedCache(CacheConfig(quant="kivi2", group_size=16), model.config)  # fine


def test_unsupported_model_is_named():
    from transformers import GPT2Config

    with pytest.raises(NotImplementedError, match="model type 'gpt2'"):
        CompressedCache(CacheConfig(), GPT2Config())


def test_empty_prompt_is_an_error():
    model = build_model("llama")
    ids, mask = padded_batch([5, 3])
    mask[1] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                       **{cache_kwarg(model): CompressedCache(CacheConfig(), model.config)})


def test_beam_search_is_refused():
    model = build_model("llama")
    ids, mask = padded_batch([5])
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=0,
                       **{cache_kwarg(model): CompressedCache(CacheConfig(), model.config)})


def test_other_caches_still_use_sdpa_after_a_compressed_run():
    model = build_model("llama")
    ids, mask = padded_batch([7, 4])
    ref = model(input_ids=ids, attention_mask=mask).logits
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                   **{cache_kwarg(model): CompressedCache(CacheConfig(policy="h2o", budget=0.5), model.config)})
    assert model.config._attn_implementation == "kvstream"
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref)


def test_auto_backend_falls_back_to_torch_for_shapes_the_kernels_do_not_take():
    from kvstream.kvcache.backend import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cpu, 128, 32, 2) == "torch"
    assert resolve_backend("auto", cuda, 8, 8, 2) == "torch"  # stories260K: head_dim 8
    assert resolve_backend("auto", cuda, 128, 8, 2) == "torch"  # groups smaller than a packed word
    assert resolve_backend("auto", cuda, 96, None, None) == "torch"  # not a power of two
    assert resolve_backend("auto", cuda, 128, 32, 2) == "triton"
    assert resolve_backend("torch", cuda, 128, 32, 2) == "torch"
