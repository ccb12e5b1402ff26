"""The fast decode path on CUDA: the step captured in a CUDA graph decodes the same tokens as the same step run
eagerly and as transformers' generate over the same cache (GPU only; skipped on CPU machines and in CI)."""

from __future__ import annotations

import pytest
import torch
from tests.kvcache.tiny import build_model, padded_batch

from kvstream.kvcache import CacheConfig, CompressedCache, Engine
from kvstream.kvcache.engine import _row_seed
from kvstream.kvcache.fast_decode import DecodeRunner
from kvstream.kvcache.models import cache_kwarg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEW = 20


def _decode(model, cfg: CacheConfig, ids, mask, graph: bool | None):
    # each row's Keyformer noise seed as Engine.generate derives it, so a noisy policy's kept tokens match its run
    seeds = [_row_seed(cfg.seed, 0, row[m.bool()].tolist()) for row, m in zip(ids.cpu(), mask.cpu())]
    cache = CompressedCache(cfg, model.config, seeds=seeds)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    B = ids.shape[0]
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kwarg(model): cache}, use_cache=True,
                    logits_to_keep=1)
        z = torch.zeros(B, device=ids.device)
        runner = DecodeRunner(model, cache, NEW, z, z + 1, cache.plan.seeds, [], 0, graph=graph)
        tokens = runner.run(out.logits[:, -1]).clone()
    return tokens, runner, cache


@pytest.mark.parametrize("cache", [dict(policy="full", quant="kivi2"), dict(policy="full", quant="kivi4"),
                                   dict(policy="full", quant="fp8"), dict(policy="keyformer", budget=0.5, quant="fp8")])
def test_graph_equals_eager_and_generate(cache):
    model = build_model("llama", hidden=256, heads=4, kv_heads=2).cuda().to(torch.bfloat16)  # head_dim 64
    ids, mask = padded_batch([70, 100, 85], seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    cfg = CacheConfig(max_new_tokens=NEW, group_size=32, residual=32, **cache)
    graph_tokens, runner, c = _decode(model, cfg, ids, mask, graph=True)
    assert runner.use_graph and runner.graph is not None
    assert c.layers[0].store.t == NEW - 1  # the host counters followed the replays
    eager_tokens, eager_runner, _ = _decode(model, cfg, ids, mask, graph=False)
    assert not eager_runner.use_graph
    assert torch.equal(graph_tokens, eager_tokens)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    hf = Engine(model, cache=CacheConfig(engine="hf", group_size=32, residual=32, **cache))
    hf.eos_token_ids = []
    rows = hf.generate(prompts, max_new_tokens=NEW)
    assert [r["token_ids"] for r in rows] == graph_tokens.tolist()


@pytest.mark.parametrize("cache", [dict(policy="keyformer", budget=0.5), dict(policy="h2o", budget=0.5, quant="kivi2"),
                                   dict(policy="full"), dict(policy="h2o", budget=0.5, quant="fp8")])
def test_fast_equals_generate_on_cuda(cache):
    """Engine.generate on the fast path (a Scheduler, CUDA graph, finished flags read a step late) == transformers'
    generate over the same cache, each prompt alone (float32: no batch-shape rounding differences)."""
    model = build_model("llama", hidden=256, heads=4, kv_heads=2).cuda()
    ids, mask = padded_batch([70, 100, 85], seed=3)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    out = {}
    for engine in ("fast", "hf"):
        eng = Engine(model, cache=CacheConfig(engine=engine, group_size=32, residual=32, **cache))
        eng.eos_token_ids = []
        if engine == "fast":
            out[engine] = [r["token_ids"] for r in eng.generate(prompts, max_new_tokens=NEW)]
            assert eng.last_graph and eng.last_num_slots == 3
        else:
            out[engine] = [eng.generate([p], max_new_tokens=NEW)[0]["token_ids"] for p in prompts]
    assert out["fast"] == out["hf"]


def test_scheduler_mid_flight_on_cuda():
    """7 requests of different lengths through 3 slots of a captured step, the flags read one step late: every
    row == its run alone, and a row that ends early (EOS) is returned with exactly its tokens."""
    from kvstream.kvcache.scheduler import Request, Scheduler

    model = build_model("llama", hidden=256, heads=4, kv_heads=2).cuda()
    eng = Engine(model, cache=CacheConfig(policy="keyformer", budget=0.5, quant="kivi2", group_size=32, residual=32))
    lengths, news = [70, 100, 85, 40, 90, 64, 77], [20, 5, 13, 20, 1, 9, 17]
    ids, mask = padded_batch(lengths, seed=5)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    alone = [eng.generate([p], max_new_tokens=m)[0]["token_ids"] for p, m in zip(prompts, news)]
    eng.eos_token_ids = [alone[0][6]]  # the 7th token of row 0 becomes an EOS: rows end early
    alone = [eng.generate([p], max_new_tokens=m)[0] for p, m in zip(prompts, news)]
    sched = Scheduler(eng, num_slots=3, max_prompt_tokens=100, max_new_tokens=20)
    for i, (p, m) in enumerate(zip(prompts, news)):
        sched.add(Request(f"r{i}", p, max_new_tokens=m))
    got = {}
    for _ in range(400):
        if not sched.has_work():
            break
        got.update({row["id"]: row for row in sched.step()})
    assert sched.runner.use_graph and sched.runner.graph is not None
    for i, row in enumerate(alone):
        assert got[f"r{i}"]["token_ids"] == row["token_ids"], i
        assert (got[f"r{i}"]["kv_bytes"], got[f"r{i}"]["kv_bytes_full"]) == (row["kv_bytes"], row["kv_bytes_full"])


def test_decode_steps_and_finishing_rows_do_not_sync_the_host():
    """The hot loop has no host syncs: once admitted and captured, scheduler steps (graph replay, the lagged
    snapshot, rows ending at different steps and returned with their kv_bytes, their slots freed) run under
    torch.cuda.set_sync_debug_mode("error"), which raises on any synchronizing torch call."""
    from kvstream.kvcache.scheduler import Request, Scheduler

    model = build_model("llama", hidden=256, heads=4, kv_heads=2).cuda()
    eng = Engine(model, cache=CacheConfig(policy="keyformer", budget=0.5, quant="kivi2", group_size=32, residual=32))
    eng.eos_token_ids = []  # every row runs to its own max_new_tokens: they end at four different steps
    ids, mask = padded_batch([70, 100, 85, 110], seed=6)
    sched = Scheduler(eng, num_slots=4, max_prompt_tokens=110, max_new_tokens=24)
    for i, (row, m) in enumerate(zip(ids, mask)):
        sched.add(Request(f"r{i}", row[m.bool()].tolist(), max_new_tokens=10 + 4 * i))
    got = []
    for _ in range(5):  # admissions (each prefill reads its lengths once), two eager steps, the capture, a replay
        got += sched.step()
    assert sched.runner.graph is not None and not got
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(40):
            if not sched.has_work():
                break
            got += sched.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sorted(r["id"] for r in got) == ["r0", "r1", "r2", "r3"]
    assert [len(r["token_ids"]) for r in sorted(got, key=lambda r: r["id"])] == [10, 14, 18, 22]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compact_forward_on_cuda_matches_the_modules(family):
    """The compact forward with the fused Triton kernels (bf16, head_dim 128) against the transformers modules: the
    same prefill logits to bf16 rounding, and the same kept tokens."""
    from kvstream.kvcache.forward import compact_forward

    model = build_model(family, hidden=1024, heads=8, kv_heads=4, layers=2, head_dim=128, vocab=512)
    model = model.cuda().to(torch.bfloat16)
    cfg = CacheConfig(max_new_tokens=8, policy="keyformer", budget=0.5, quant="kivi2")
    ids = torch.randint(3, 512, (2, 300), generator=torch.Generator().manual_seed(5)).cuda()
    pos = torch.arange(300, device="cuda").expand_as(ids)
    with torch.inference_mode():
        ref = CompressedCache(cfg, model.config, seeds=[1, 2])
        want = model(input_ids=ids, position_ids=pos, **{cache_kwarg(model): ref}, use_cache=True,
                     logits_to_keep=1).logits
        fwd = compact_forward(model)
        assert fwd is not None and fwd.fused
        cache = CompressedCache(cfg, model.config, seeds=[1, 2])
        got = fwd(ids, pos, cache)
    torch.testing.assert_close(got.float(), want[:, -1].float(), rtol=0.05, atol=0.05)
    same = [a == b for a, b in zip(cache.kept_positions(1), ref.kept_positions(1))]
    assert sum(same) >= len(same) - 1  # a near tie in the noisy scores may swap one kept token, no more
    model.config._attn_implementation = "sdpa"
