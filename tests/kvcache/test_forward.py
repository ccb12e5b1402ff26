"""The compact Llama-family forward (kvstream/kvcache/forward.py) against the transformers modules it replaces in the
engine: the same prefill logits and the same cache contents, the same decode logits, for every family the fast
path takes (Qwen2's QKV biases, Qwen3's per-head norms, grouped and ungrouped heads), and the model itself
unchanged by the weight concatenation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvstream.kvcache.cache import CompressedCache
from kvstream.kvcache.config import CacheConfig
from kvstream.kvcache.engine import Engine
from kvstream.kvcache.forward import CompactForward, compact_forward, compact_reason
from kvstream.kvcache.models import cache_kwarg
from tests.kvcache.tiny import build_model

CACHES = {"full": dict(policy="full"), "keyformer+kivi2": dict(policy="keyformer", budget=0.5, quant="kivi2",
                                                                group_size=16, residual=16)}


def _module_prefill(model, ids, cache):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return model(input_ids=ids, position_ids=pos, **{cache_kwarg(model): cache}, use_cache=True,
                 logits_to_keep=1).logits[:, -1]


@pytest.mark.parametrize("family,heads,kv_heads", [("llama", 4, 2), ("mistral", 4, 4), ("qwen2", 6, 2),
                                                   ("qwen3", 4, 1)])
@pytest.mark.parametrize("name", list(CACHES))
def test_compact_prefill_and_decode_equal_the_modules(family, heads, kv_heads, name):
    model = build_model(family, hidden=96, heads=heads, kv_heads=kv_heads, layers=3, head_dim=16)
    if family == "qwen2":  # the QKV biases are zero at init: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    m.bias.normal_(0, 0.5)
    cfg = CacheConfig(max_new_tokens=6, **CACHES[name])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 37), generator=g)
    with torch.inference_mode():
        ref_cache = CompressedCache(cfg, model.config)
        want = _module_prefill(model, ids, ref_cache)
        fwd = compact_forward(model)
        assert isinstance(fwd, CompactForward)
        cache = CompressedCache(cfg, model.config)
        got = fwd(ids, torch.arange(37).expand_as(ids), cache)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert cache.kept_positions(1) == ref_cache.kept_positions(1)
        for a, b in zip(cache.tensors(), ref_cache.tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # three decode steps through both caches: the module path as DecodeRunner drove it before
        tok = got.argmax(-1, keepdim=True)
        for t in range(3):
            pos = torch.full((2, 1), 37 + t)
            want = model(input_ids=tok, position_ids=pos, **{cache_kwarg(model): ref_cache},
                         use_cache=True).logits[:, -1]
            got = fwd(tok, pos, cache)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tok = got.argmax(-1, keepdim=True)
    model.config._attn_implementation = "sdpa"


def test_concatenated_weights_leave_the_model_as_it_was():
    model = build_model("qwen2", hidden=64, heads=4, kv_heads=2, layers=2)
    ids = torch.randint(3, 128, (1, 11))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        params = sum(p.numel() for p in model.parameters())
        fwd = compact_forward(model)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and sum(p.numel() for p in model.parameters()) == params
    a = model.model.layers[0].self_attn
    assert a.k_proj.weight.data_ptr() == fwd.layers[0].wqkv[a.q_proj.out_features:].data_ptr()  # a view, not a copy
    assert compact_forward(model) is fwd  # built once per model
    model.to(torch.float64)  # new weight tensors: the forward is built again over them
    again = compact_forward(model)
    assert again is not fwd and again.layers[0].wqkv.dtype == torch.float64
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        cache = CompressedCache(CacheConfig(max_new_tokens=2), model.config)
        got = again(ids, torch.arange(11).view(1, 11), cache)
    torch.testing.assert_close(got, want[:, -1], rtol=1e-9, atol=1e-9)
    model.config._attn_implementation = "sdpa"


def test_models_the_compact_forward_does_not_take_say_why_and_still_generate(monkeypatch):
    model = build_model("llama", hidden=64, heads=4, kv_heads=2, layers=2)

    class Adapted(nn.Linear):
        pass

    old = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = Adapted(old.in_features, old.out_features, bias=False)
    assert "plain torch.nn.Linear" in compact_reason(model)
    assert compact_forward(model) is None
    eng = Engine(model, tokenizer=None, cache=dict(policy="full"))
    rows = eng.generate([[5, 6, 7, 8]], max_new_tokens=4)
    assert rows[0]["num_generated_tokens"] == 4

    other = build_model("llama", hidden=64, heads=4, kv_heads=2, layers=2)
    other.config.hidden_act = "gelu"
    assert "hidden_act" in compact_reason(other)
    third = build_model("llama", hidden=64, heads=4, kv_heads=2, layers=2)
    monkeypatch.setenv("KVSTREAM_FORWARD", "modules")
    assert compact_forward(third) is None and compact_reason(third) is None


def test_engine_rows_are_the_same_through_the_compact_forward_and_the_modules(monkeypatch):
    """The whole fast path (scheduler, chunked admissions, graph-free decode) with and without the compact forward."""
    prompts = [[3 + (i * 7 + j) % 120 for j in range(n)] for i, n in enumerate([5, 31, 17, 44])]
    out = {}
    for mode in ("compact", "modules"):
        monkeypatch.setenv("KVSTREAM_FORWARD", mode)
        model = build_model("llama", hidden=128, heads=4, kv_heads=2, layers=2)
        for pt in (None, 16):
            eng = Engine(model, tokenizer=None, cache=CACHES["keyformer+kivi2"], prefill_tokens=pt)
            out[mode, pt] = [r["token_ids"] for r in eng.generate(prompts, max_new_tokens=9)]
    assert out["compact", None] == out["modules", None]
    assert out["compact", 16] == out["modules", 16]


def test_llama_biases_and_a_sliding_window_prefill(monkeypatch):
    """Llama's attention_bias / mlp_bias go into the concatenated projections; a Mistral prompt longer than its
    sliding window is prefilled through the modules (their mask has the window), shorter ones compactly, and the
    engine's rows are the same either way."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa")
    model = LlamaForCausalLM(LlamaConfig(attention_bias=True, mlp_bias=True, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:  # the zero-initialized biases
                p.normal_(0, 0.3)
    ids = torch.randint(3, 128, (1, 19))
    cfg = CacheConfig(max_new_tokens=4, policy="full")
    with torch.inference_mode():
        want = _module_prefill(model, ids, CompressedCache(cfg, model.config))
        fwd = compact_forward(model)
        assert fwd.layers[0].bgu is not None and fwd.layers[0].bd is not None and fwd.layers[0].bo is not None
        got = fwd(ids, torch.arange(19).expand_as(ids), CompressedCache(cfg, model.config))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.config._attn_implementation = "sdpa"

    mistral = MistralForCausalLM(MistralConfig(sliding_window=16, **kw)).eval()
    assert compact_forward(mistral).window == 16
    eng = Engine(mistral, cache=dict(policy="full"))
    calls = []
    real = CompactForward.__call__
    monkeypatch.setattr(CompactForward, "__call__", lambda self, *a: calls.append(a[0].shape[1]) or real(self, *a))
    long_rows = eng.generate([[5 + i % 100 for i in range(30)], [7, 8, 9]], max_new_tokens=3)
    monkeypatch.undo()
    assert 30 not in calls and 3 in calls  # the 30-token prompt went through the modules, the 3-token one did not
    assert [r["num_generated_tokens"] for r in long_rows] == [3, 3]
