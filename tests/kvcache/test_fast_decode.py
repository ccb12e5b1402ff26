"""The fast decode path (kvstream.kvcache.fast_decode) against transformers' generate over the same cache: the same
greedy tokens for every policy x storage and family, the same logits step by step; device sampling per row;
the lagged finish flags; the engine choice."""

from __future__ import annotations

import logging

import pytest
import torch
from tests.kvcache.tiny import build_model, greedy, padded_batch

from kvstream.kvcache import CacheConfig, CompressedCache, Engine
from kvstream.kvcache.fast_decode import DecodeRunner, unsupported_reason
from kvstream.kvcache.models import cache_kwarg
from kvstream.kvcache.sampling import sample

LENGTHS = [23, 40, 31]  # left-ragged
NEW = 12
CACHES = {
    "full": dict(policy="full"),
    "full+kivi2": dict(policy="full", quant="kivi2"),
    "full+kivi4": dict(policy="full", quant="kivi4"),
    "full+token2": dict(policy="full", quant="token2"),
    "full+fp8": dict(policy="full", quant="fp8"),
    "window": dict(policy="window", budget=0.5),
    "sink": dict(policy="sink", budget=16, sink=4),
    "h2o": dict(policy="h2o", budget=0.5),
    "h2o+kivi2": dict(policy="h2o", budget=0.5, quant="kivi2"),
    "h2o+fp8": dict(policy="h2o", budget=0.5, quant="fp8"),
    "keyformer": dict(policy="keyformer", budget=0.5),
    "keyformer+kivi2": dict(policy="keyformer", budget=0.5, quant="kivi2"),
    "keyformer+kivi4": dict(policy="keyformer", budget=0.6, quant="kivi4"),
    "keyformer+token2": dict(policy="keyformer", budget=0.5, quant="token2"),
    "keyformer+fp8": dict(policy="keyformer", budget=0.5, quant="fp8"),
}
QUANT = dict(group_size=16, residual=32)


def prompts(lengths=LENGTHS, seed=0):
    ids, mask = padded_batch(lengths, seed=seed)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def both_paths(model, cache: dict, ps, **kw):
    cfg = dict(QUANT, **cache)
    fast = Engine.from_pretrained(model, cache=CacheConfig(engine="fast", **cfg), device="cpu")
    hf = Engine.from_pretrained(model, cache=CacheConfig(engine="hf", **cfg), device="cpu")
    assert (fast.decode_path, hf.decode_path) == ("fast", "hf")
    return fast.generate(ps, max_new_tokens=NEW, **kw), hf.generate(ps, max_new_tokens=NEW, **kw)


@pytest.mark.parametrize("name", list(CACHES))
def test_fast_equals_generate_every_cache(name):
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)  # head_dim 32
    a, b = both_paths(model, CACHES[name], prompts())
    for x, y in zip(a, b):
        assert x["token_ids"] == y["token_ids"], name
        assert (x["kv_bytes"], x["kv_bytes_full"], x["num_generated_tokens"]) == (
            y["kv_bytes"], y["kv_bytes_full"], y["num_generated_tokens"])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("name", ["full", "keyformer+kivi2", "h2o", "full+kivi4"])
def test_fast_equals_generate_families(family, name):
    model = build_model(family, hidden=128, heads=4, kv_heads=2)
    a, b = both_paths(model, CACHES[name], prompts(seed=3))
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b], (family, name)


def test_fast_equals_generate_on_real_weights(stories260k):
    model = Engine.from_pretrained(str(stories260k["model"]), tokenizer=str(stories260k["tokenizer"]),
                                   device="cpu").model
    ps = [[1, 403, 80, 261], [1, 172, 263, 93, 313, 80, 330, 400, 372], [1]]
    for cache in (dict(policy="full"), dict(policy="keyformer", budget=0.5), dict(policy="h2o", budget=4),
                  dict(policy="full", quant="kivi4", group_size=8, residual=16),
                  dict(policy="keyformer", budget=0.5, quant="fp8")):
        cfg = dict(cache)
        fast = Engine(model, cache=CacheConfig(engine="fast", **cfg))
        hf = Engine(model, cache=CacheConfig(engine="hf", **cfg))
        a, b = fast.generate(ps, max_new_tokens=24), hf.generate(ps, max_new_tokens=24)
        assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b], cache


@pytest.mark.parametrize("name", ["full", "keyformer+kivi2", "full+kivi2"])
def test_fast_logits_equal_generate_step_by_step(name):
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)
    ids, mask = padded_batch(LENGTHS)
    cfg = CacheConfig(max_new_tokens=NEW, **QUANT, **CACHES[name])
    seqs, ref_logits = greedy(model, ids, mask, NEW, CompressedCache(cfg, model.config))
    cache = CompressedCache(cfg, model.config)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kwarg(model): cache}, use_cache=True,
                    logits_to_keep=1)
        B = ids.shape[0]
        runner = DecodeRunner(model, cache, NEW, torch.zeros(B), torch.ones(B), cache.plan.seeds, [], 0)
        logits = [out.logits[:, -1].float()]
        runner.first(logits[0])
        for _ in range(NEW - 1):
            logits.append(runner._forward())
            runner._emit(logits[-1].argmax(-1))
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(logits[0], ref_logits[0].float(), rtol=0, atol=0)  # the very same prefill
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(runner.tokens, seqs[:, ids.shape[1]:])


def test_sampling_is_per_row_and_seeded():
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)
    eng = Engine.from_pretrained(model, cache=CacheConfig(policy="keyformer", budget=0.5, **QUANT), device="cpu")
    ps = prompts()
    kw = dict(max_new_tokens=NEW, temperature=0.9, top_p=0.9, seed=5)
    batch = eng.generate(ps, **kw)
    assert [r["token_ids"] for r in batch] == [r["token_ids"] for r in eng.generate(ps, **kw)]
    for p, row in zip(ps, batch):  # a row's draws do not depend on its batch-mates
        assert eng.generate([p], **kw)[0]["token_ids"] == row["token_ids"]
    other = eng.generate(ps, **dict(kw, seed=6))
    assert [r["token_ids"] for r in other] != [r["token_ids"] for r in batch]
    greedy_rows = eng.generate(ps, max_new_tokens=NEW)
    assert [r["token_ids"] for r in greedy_rows] != [r["token_ids"] for r in batch]


def test_sample_draws_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4).contiguous()
    seeds = torch.arange(4000, dtype=torch.int64)
    t = torch.ones(4000)
    tok = sample(logits, t, torch.ones(4000), seeds, torch.tensor([3]))
    freq = torch.bincount(tok, minlength=4).float() / 4000
    want = torch.softmax(logits[0], -1)
    assert (freq - want).abs().max() < 0.03, (freq, want)
    # temperature 0: argmax; top_p small: only the most likely token; top_p 0.8: the two most likely (0.64 + 0.24)
    assert torch.equal(sample(logits, torch.zeros(4000), torch.ones(4000), seeds, torch.tensor([3])),
                       torch.zeros(4000, dtype=torch.int64))
    assert sample(logits, t, torch.full((4000,), 0.1), seeds, torch.tensor([3])).max() == 0
    assert set(sample(logits, t, torch.full((4000,), 0.8), seeds, torch.tensor([3])).tolist()) == {0, 1}
    # another step draws other tokens for the same seeds
    assert not torch.equal(sample(logits, t, torch.ones(4000), seeds, torch.tensor([4])), tok)


def test_rows_stop_at_eos_and_the_loop_ends_early():
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)
    eng = Engine.from_pretrained(model, cache=CacheConfig(policy="h2o", budget=0.5), device="cpu")
    ps = prompts()
    free = eng.generate(ps, max_new_tokens=NEW)
    eos = free[0]["token_ids"][2]  # row 0 ends at its third token
    eng.eos_token_ids = [eos]
    rows = eng.generate(ps, max_new_tokens=NEW)
    assert rows[0]["token_ids"] == free[0]["token_ids"][:3]
    for r, f in zip(rows, free):
        cut = f["token_ids"].index(eos) + 1 if eos in f["token_ids"] else NEW
        assert r["token_ids"] == f["token_ids"][:cut]
    # every row finishes at once: no decode step runs past it
    cache = CompressedCache(CacheConfig(policy="full", max_new_tokens=NEW), model.config)
    ids, mask = padded_batch(LENGTHS)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kwarg(model): cache}, use_cache=True,
                    logits_to_keep=1)
        first = out.logits[:, -1].argmax(-1).tolist()
        runner = DecodeRunner(model, cache, NEW, torch.zeros(3), torch.ones(3), cache.plan.seeds, first, 0)
        tokens = runner.run(out.logits[:, -1])
    model.config._attn_implementation = "sdpa"
    assert runner.steps_run == 0 and tokens[:, 0].tolist() == first and (tokens[:, 1:] == 0).all()


def test_engine_choice(caplog):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    assert "not one of the fast path's families" in unsupported_reason(gemma)
    with pytest.raises(ValueError, match="engine='fast'.*gemma"):
        Engine.from_pretrained(gemma, cache=CacheConfig(engine="fast"), device="cpu")
    with caplog.at_level(logging.INFO, logger="kvstream.kvcache.engine"):
        eng = Engine.from_pretrained(gemma, cache=CacheConfig(engine="auto"), device="cpu")
    assert eng.decode_path == "hf" and "gemma" in caplog.text
    (row,) = eng.generate([[1, 5, 7, 9]], max_new_tokens=3)
    assert row["num_generated_tokens"] >= 1
    with pytest.raises(ValueError, match="CacheConfig.engine='turbo' is not one of auto, fast, hf"):
        CacheConfig(engine="turbo")
