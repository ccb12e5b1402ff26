"""Continuous batching (kvstream.kvcache.scheduler): each request's tokens equal Engine.generate on it alone, whether
it runs alone, beside others, or enters a slot another sequence just left; a reused slot keeps nothing of the
sequence before; cancel frees its slot; bad requests are refused with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.kvcache.tiny import build_model, padded_batch

from kvstream.kvcache import CacheConfig, Engine
from kvstream.kvcache.scheduler import Request, RequestError, Scheduler

QUANT = dict(group_size=16, residual=32)
CACHES = {
    "full": dict(policy="full"),
    "full+kivi2": dict(policy="full", quant="kivi2"),
    "h2o": dict(policy="h2o", budget=0.5),
    "keyformer+kivi2": dict(policy="keyformer", budget=0.5, quant="kivi2"),
    "sink": dict(policy="sink", budget=16, sink=4),
}


def prompts(lengths, seed=0):
    ids, mask = padded_batch(lengths, seed=seed)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def engine(cache: dict):
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)
    return Engine.from_pretrained(model, cache=CacheConfig(**QUANT, **cache), device="cpu")


def drain(sched: Scheduler, max_steps: int = 200) -> dict[str, dict]:
    out = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return out
        for row in sched.step():
            assert row["id"] not in out
            out[row["id"]] = row
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("lagged", [None, True], ids=["read-now", "read-late"])
@pytest.mark.parametrize("name", list(CACHES))
def test_rows_equal_generate_alone_with_mid_flight_admission(name, lagged):
    """read-late: the rows' state read one step late as on CUDA (lagged=True runs that logic on the CPU)."""
    eng = engine(CACHES[name])
    ps = prompts([23, 40, 31, 12, 37], seed=1)
    news = [9, 4, 12, 7, 10]
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=48, max_new_tokens=12, lagged=lagged)  # 5 requests, 2 slots
    for i, (p, m) in enumerate(zip(ps, news)):
        sched.add(Request(f"r{i}", p, max_new_tokens=m))
    got = drain(sched)
    assert sorted(got) == [f"r{i}" for i in range(5)]
    for i, (p, m) in enumerate(zip(ps, news)):
        (alone,) = eng.generate([p], max_new_tokens=m)
        row = got[f"r{i}"]
        assert row["token_ids"] == alone["token_ids"], (name, i)
        assert (row["kv_bytes"], row["kv_bytes_full"]) == (alone["kv_bytes"], alone["kv_bytes_full"]), (name, i)
        ended = bool(row["token_ids"]) and row["token_ids"][-1] in eng.eos_token_ids
        assert row["finish_reason"] == ("stop" if ended else "length")
        assert ended or len(row["token_ids"]) == m


def test_a_long_running_pool_never_grows():
    """Many sequences through one slot (far more steps than the slot's capacity): nothing is reallocated (a pool's
    buffers are sized once) and each output still equals its run alone."""
    eng = engine(CACHES["full+kivi2"])
    ps = prompts([20, 17, 23, 19, 21, 22, 18, 24], seed=6)
    sched = Scheduler(eng, num_slots=1, max_prompt_tokens=24, max_new_tokens=8)
    buffers = [t.data_ptr() for t in sched.pool.tensors()]
    for i, p in enumerate(ps):
        sched.add(Request(f"l{i}", p, max_new_tokens=8))
    got = drain(sched)
    assert sum(r["num_generated_tokens"] for r in got.values()) > sched.pool.layers[0].store.cs
    assert [t.data_ptr() for t in sched.pool.tensors()] == buffers
    for i, p in enumerate(ps):
        assert got[f"l{i}"]["token_ids"] == eng.generate([p], max_new_tokens=8)[0]["token_ids"], i


def test_sampled_rows_equal_generate_alone():
    eng = engine(CACHES["keyformer+kivi2"])
    ps = prompts([20, 33, 27], seed=2)
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=40, max_new_tokens=10)
    for i, p in enumerate(ps):
        sched.add(Request(f"s{i}", p, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7 + i))
    got = drain(sched)
    for i, p in enumerate(ps):
        (alone,) = eng.generate([p], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7 + i)
        assert got[f"s{i}"]["token_ids"] == alone["token_ids"], i


def test_a_reused_slot_keeps_nothing_of_the_sequence_before():
    eng = engine(dict(policy="h2o", budget=0.5, quant="kivi2"))
    first, second = prompts([30, 25], seed=4)
    sched = Scheduler(eng, num_slots=1, max_prompt_tokens=32, max_new_tokens=8)
    sched.add(Request("a", first, max_new_tokens=8))
    drain(sched)
    gen = torch.Generator().manual_seed(0)
    for layer in sched.pool.layers:  # poison every buffer of the freed slot
        st = layer.store
        for t in [st.win_k, st.win_v, *st.kept.S.values(), st.scores]:
            if t is not None and t.is_floating_point():
                t[0] = torch.randn(t[0].shape, generator=gen) * 1e3
            elif t is not None:
                t[0] = torch.randint(-2**30, 2**30, t[0].shape, generator=gen, dtype=t.dtype)
        st.win_pos[0], st.kept.s_pos[0] = 10**6, 3  # ring slots that would count as holding a token
    sched.add(Request("b", second, max_new_tokens=8))
    got = drain(sched)
    (alone,) = eng.generate([second], max_new_tokens=8)
    assert got["b"]["token_ids"] == alone["token_ids"]
    for layer in range(len(sched.pool.layers)):  # only positions the sequence has: none of the poison
        held = sched.pool.kept_positions(layer)[0]
        assert all(0 <= min(h) and max(h) < len(second) + 8 for h in held), held


def test_cancel_frees_the_slot_and_the_next_request_runs():
    eng = engine(CACHES["keyformer+kivi2"])
    ps = prompts([20, 21, 22], seed=5)
    sched = Scheduler(eng, num_slots=1, max_prompt_tokens=32, max_new_tokens=12)
    for i, p in enumerate(ps):
        sched.add(Request(f"c{i}", p, max_new_tokens=12))
    sched.step()  # c0 admitted and decoding
    assert sched.cancel("c0") and sched.cancel("c2") and not sched.cancel("nope")
    got = drain(sched)
    assert list(got) == ["c1"]
    (alone,) = eng.generate([ps[1]], max_new_tokens=12)
    assert got["c1"]["token_ids"] == alone["token_ids"]


def test_a_request_with_its_own_budget_equals_generate_with_that_budget():
    """Per-request compression: a request's budget (no larger than the pool's) is its alone; a larger one, or one
    on a `full` pool, is refused with the reason."""
    eng = engine(dict(policy="keyformer", budget=0.6))
    ps = prompts([30, 38, 26], seed=8)
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=40, max_new_tokens=10)
    budgets = [0.3, None, 12]
    for i, (p, b) in enumerate(zip(ps, budgets)):
        sched.add(Request(f"b{i}", p, max_new_tokens=10, budget=b))
    got = drain(sched)
    for i, (p, b) in enumerate(zip(ps, budgets)):
        cfg = dict(QUANT, policy="keyformer", budget=0.6 if b is None else b)
        one = Engine.from_pretrained(eng.model, cache=CacheConfig(**cfg), device="cpu")
        (alone,) = one.generate([p], max_new_tokens=10)
        assert got[f"b{i}"]["token_ids"] == alone["token_ids"], i
        assert got[f"b{i}"]["kv_bytes"] == alone["kv_bytes"], i
    assert got["b0"]["kv_bytes"] < got["b1"]["kv_bytes"]
    with pytest.raises(ValueError, match="budget=0.9 keeps .* ask for a budget no larger") as e:
        sched.add(Request("big", ps[0], max_new_tokens=4, budget=0.9))
    assert e.value.field == "budget"
    with pytest.raises(ValueError, match="budget=-1"):
        sched.add(Request("neg", ps[0], max_new_tokens=4, budget=-1))
    full = Scheduler(engine(CACHES["full"]), num_slots=1, max_prompt_tokens=40, max_new_tokens=4)
    with pytest.raises(ValueError, match="needs an evicting cache policy"):
        full.add(Request("f", ps[0], max_new_tokens=4, budget=0.5))
    assert not sched.has_work() and not full.has_work()


def test_progress_shows_each_running_sequence_so_far():
    eng = engine(CACHES["h2o"])
    ps = prompts([20, 25], seed=9)
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=32, max_new_tokens=8)
    sched.add(Request("p0", ps[0], max_new_tokens=8))
    sched.add(Request("p1", ps[1], max_new_tokens=3))
    seen = {"p0": [], "p1": []}
    got = {}
    while sched.has_work():
        for rid, toks in sched.progress().items():
            assert toks[: len(seen[rid])] == seen[rid]  # a prefix of what comes next
            seen[rid] = toks
        got.update({r["id"]: r for r in sched.step()})
    assert seen["p0"] == got["p0"]["token_ids"][: len(seen["p0"])] and len(seen["p0"]) >= 7
    assert sched.progress() == {}


def test_bad_requests_are_refused_with_the_reason():
    eng = engine(CACHES["full"])
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=16, max_new_tokens=8)
    with pytest.raises(ValueError, match="over the scheduler's max_prompt_tokens=16"):
        sched.add(Request("long", list(range(3, 40)), max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens=9 is over the scheduler's 8"):
        sched.add(Request("new", [1, 5, 6], max_new_tokens=9))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(Request("empty", [], max_new_tokens=4))
    with pytest.raises(ValueError, match="temperature") as e:
        sched.add(Request("t", [1, 5], max_new_tokens=2, temperature=-1))
    assert e.value.field == "temperature"
    for bad, field in ((dict(top_p=0.0), "top_p"), (dict(seed=1.5), "seed"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(prompt=[]), "prompt"), (dict(stop="x"), "stop")):
        with pytest.raises(RequestError) as e:
            sched.check(Request(**{"id": "f", "prompt": [1, 5], "max_new_tokens": 2, **bad}))
        assert e.value.field == field, (bad, e.value.field, str(e.value))
    assert sched.check(Request("f", [1, 5, 6], max_new_tokens=2)) == [1, 5, 6] and not sched.has_work()
    sched.add(Request("ok", [1, 5, 6], max_new_tokens=2))
    with pytest.raises(ValueError, match="'ok' is already queued"):
        sched.add(Request("ok", [1, 5, 7], max_new_tokens=2))
    assert sched.has_work() and list(drain(sched)) == ["ok"] and not sched.has_work()
    with pytest.raises(ValueError, match="exceeds the model's 4096-token context"):
        Scheduler(eng, num_slots=1, max_prompt_tokens=4090, max_new_tokens=16)
    hf = Engine.from_pretrained(eng.model, cache=CacheConfig(engine="hf"), device="cpu")
    with pytest.raises(ValueError, match="fast path"):
        Scheduler(hf, num_slots=1, max_prompt_tokens=8, max_new_tokens=4)


def test_memory_decides_the_batch():
    """Slot bytes come from the pool's own buffers (built on the meta device): the slots that fit grow as the
    cache shrinks, and a pool of N real slots holds N times what one slot holds."""
    from transformers import LlamaConfig

    from kvstream.kvcache.capacity import max_slots, slot_bytes
    from kvstream.kvcache.models import REFERENCE_SHAPES

    mc = LlamaConfig(**REFERENCE_SHAPES["llama2-7b"])
    bf16 = torch.bfloat16
    full = slot_bytes(CacheConfig(policy="full"), mc, 4096, 256, bf16)
    assert abs(full / (32 * 2 * 4096 * 2 * (4096 + 256)) - 1) < 0.02  # K and V of every token, a little metadata
    small = slot_bytes(CacheConfig(policy="keyformer", budget=0.5, quant="kivi2"), mc, 4096, 256, bf16)
    assert full / small > 4
    mem = 60 * 2**30
    n_full = max_slots(CacheConfig(policy="full"), mc, 4096, 256, bf16, mem)
    n_small = max_slots(CacheConfig(policy="keyformer", budget=0.5, quant="kivi2"), mc, 4096, 256, bf16, mem)
    assert 20 <= n_full <= 28 and n_small > 4 * n_full, (n_full, n_small)
    assert max_slots(CacheConfig(policy="full"), mc, 4096, 256, bf16, mem, reserve=0) == mem // full
    with pytest.raises(ValueError, match="not one sequence slot fits"):
        max_slots(CacheConfig(policy="full"), mc, 4096, 256, bf16, 2**30)
    eng = engine(dict(policy="h2o", budget=0.5, quant="kivi2"))  # the meta-device figure is what a slot adds
    one = slot_bytes(eng.cache_config, eng.model.config, 40, 8, torch.float32)
    held = [sum(t.numel() * t.element_size() for t in Scheduler(eng, num_slots=n, max_prompt_tokens=40,
                                                                 max_new_tokens=8).pool.tensors()) for n in (2, 5)]
    assert held[1] - held[0] == 3 * one
    with pytest.raises(ValueError, match="on a CPU pass a number"):
        Scheduler(eng, num_slots="auto", max_prompt_tokens=40, max_new_tokens=8)


@pytest.mark.parametrize("chunk", [7, 16, 33])
@pytest.mark.parametrize("name", ["full", "keyformer+kivi2", "h2o", "full+kivi2"])
def test_chunked_prefill_keeps_what_one_shot_keeps(name, chunk):
    """A prompt fed in chunks that do not divide it: the same kept positions per layer and KV head, the same
    scores (float tolerance) and last logits as one prefill of the whole prompt."""
    from kvstream.kvcache import CompressedCache

    eng = engine(CACHES[name])
    (p,) = prompts([50], seed=11)
    row = torch.tensor([p])
    cfg = dataclasses.replace(eng.cache_config, max_new_tokens=8)
    with torch.inference_mode():
        one = CompressedCache(cfg, eng.model.config, seeds=[5])
        want = eng.prefill(one, row, torch.ones_like(row))
        ch = CompressedCache(cfg, eng.model.config, seeds=[5])
        ch.begin_chunked_prefill(len(p))
        for s in range(0, len(p), chunk):
            assert ch.prefilling
            got = eng.prefill_chunk(ch, row[:, s:s + chunk], s)
    assert not ch.prefilling
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for i, (a, b) in enumerate(zip(one.layers, ch.layers)):
        assert one.kept_positions(i) == ch.kept_positions(i), (name, i)
        if a.store.scores is not None:
            torch.testing.assert_close(b.store.scores, a.store.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.store.win_k, a.store.win_k, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already holds tokens"):
        ch.begin_chunked_prefill(10)


def test_rows_that_end_early_under_late_reads():
    """EOS mid-way, a first token that is already the end, max_new_tokens=1: each row returned with exactly its
    tokens when the state is read one step late (its slot then goes to the next request)."""
    eng = engine(CACHES["keyformer+kivi2"])
    ps = prompts([30, 25, 33, 21, 28, 19, 35], seed=13)
    news = [12, 1, 9, 12, 5, 12, 7]
    free_run = [eng.generate([p], max_new_tokens=m)[0]["token_ids"] for p, m in zip(ps, news)]
    eng.eos_token_ids = [free_run[0][4], free_run[3][0]]  # row 0 ends at its 5th token, row 3 at its first
    alone = [eng.generate([p], max_new_tokens=m)[0] for p, m in zip(ps, news)]
    assert len(alone[0]["token_ids"]) == 5 and len(alone[3]["token_ids"]) == 1
    sched = Scheduler(eng, num_slots=3, max_prompt_tokens=40, max_new_tokens=12, lagged=True)
    for i, (p, m) in enumerate(zip(ps, news)):
        sched.add(Request(f"e{i}", p, max_new_tokens=m))
    got = drain(sched)
    for i, row in enumerate(alone):
        assert got[f"e{i}"]["token_ids"] == row["token_ids"], i
        assert got[f"e{i}"]["finish_reason"] == ("stop" if row["token_ids"][-1] in eng.eos_token_ids else "length")
        assert got[f"e{i}"]["kv_bytes"] == row["kv_bytes"], i


@pytest.mark.parametrize("lagged", [None, True], ids=["read-now", "read-late"])
@pytest.mark.parametrize("name", list(CACHES))
def test_chunked_admissions_equal_generate_alone_and_decode_goes_on(name, lagged):
    """prefill_tokens=7: admissions take several steps, interleaved with the running sequences' decode steps
    (a running row gains a token every step meanwhile); every row still equals Engine.generate alone."""
    eng = engine(CACHES[name])
    ps = prompts([23, 40, 31, 12, 37], seed=1)
    news = [9, 4, 12, 7, 10]
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=48, max_new_tokens=12, prefill_tokens=7, lagged=lagged)
    for i, (p, m) in enumerate(zip(ps, news)):
        sched.add(Request(f"r{i}", p, max_new_tokens=m))
    got, interleaved = {}, 0
    for _ in range(400):
        if not sched.has_work():
            break
        before = sched.progress()
        prefilling = sched.prefilling is not None
        got.update({r["id"]: r for r in sched.step()})
        after = sched.progress()
        grew = [rid for rid in before if rid in after and len(after[rid]) == len(before[rid]) + 1]
        interleaved += bool(prefilling and grew)
    assert sorted(got) == [f"r{i}" for i in range(5)] and interleaved >= 3
    for i, (p, m) in enumerate(zip(ps, news)):
        (alone,) = eng.generate([p], max_new_tokens=m)
        assert got[f"r{i}"]["token_ids"] == alone["token_ids"], (name, i)
        assert got[f"r{i}"]["kv_bytes"] == alone["kv_bytes"], (name, i)


def test_a_chunked_admission_can_be_cancelled():
    eng = engine(CACHES["keyformer+kivi2"])
    ps = prompts([40, 20], seed=12)
    sched = Scheduler(eng, num_slots=1, max_prompt_tokens=48, max_new_tokens=6, prefill_tokens=8)
    sched.add(Request("long", ps[0], max_new_tokens=6))
    sched.add(Request("next", ps[1], max_new_tokens=6))
    sched.step()
    assert sched.prefilling is not None and sched.prefilling.req.id == "long"
    assert sched.cancel("long") and sched.prefilling is None
    got = drain(sched)
    assert list(got) == ["next"] and got["next"]["token_ids"] == eng.generate([ps[1]], max_new_tokens=6)[0]["token_ids"]
    with pytest.raises(ValueError, match="prefill_tokens=0"):
        Scheduler(eng, num_slots=1, max_prompt_tokens=8, max_new_tokens=4, prefill_tokens=0)


def test_engine_settings_cap_the_pool_and_chunk_the_prefill_without_changing_rows():
    """max_num_seqs=2 streams five prompts through two slots, prefill_tokens=7 chunks each admission; every row is
    the row of an Engine without either setting (rows do not depend on them)."""
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)
    cfg = CacheConfig(**QUANT, policy="keyformer", budget=0.5, quant="kivi2")
    ps = prompts([40, 23, 57, 31, 48], seed=5)
    plain = Engine.from_pretrained(model, cache=cfg, device="cpu")
    capped = Engine.from_pretrained(model, cache=cfg, device="cpu", max_num_seqs=2, prefill_tokens=7)
    assert capped.settings() == {"gpu_memory_utilization": 0.9, "max_num_seqs": 2, "prefill_tokens": 7}
    a, b = plain.generate(ps, max_new_tokens=6), capped.generate(ps, max_new_tokens=6)
    assert (plain.last_num_slots, capped.last_num_slots) == (5, 2)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert [r["kv_bytes"] for r in a] == [r["kv_bytes"] for r in b]


@pytest.mark.parametrize("settings, named", [
    (dict(max_num_seqs=0), "max_num_seqs=0"), (dict(max_num_seqs=2.5), "max_num_seqs=2.5"),
    (dict(prefill_tokens=-1), "prefill_tokens=-1"), (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization=1.5"),
    (dict(gpu_memory_utilization=True), "gpu_memory_utilization=True"), (dict(max_batch=4), "max_batch"),
])
def test_bad_engine_settings_are_refused_before_the_weights_load(settings, named):
    with pytest.raises(ValueError, match=named):
        Engine.from_pretrained("/nonexistent/model/dir", cache=CacheConfig(), **settings)


def test_engine_scheduler_is_the_one_generate_runs():
    """Engine.scheduler(num_prompts, longest, max_new_tokens): on the CPU one slot a prompt, at most max_num_seqs, and
    a pool sized for the longest prompt and max_new_tokens (what generate, and the benchmarks' warm-up, build)."""
    eng = engine(dict(policy="full"))
    s = eng.scheduler(5, 40, 12)
    assert s.num_slots == 5 and s.max_prompt == 40 and s.max_new == 12
    eng.max_num_seqs = 2
    assert eng.scheduler(5, 40, 12).num_slots == 2
    eng.generate([[5, 6, 7]] * 3, max_new_tokens=4)
    assert eng.last_num_slots == 2


@pytest.mark.parametrize("cache", [dict(policy="keyformer", budget=0.5, quant="kivi2"),
                                   dict(policy="full", quant="kivi2"), dict(policy="h2o", budget=0.5)])
def test_no_python_value_is_assigned_to_a_tensor_element_in_the_loop(cache, monkeypatch):
    """`t[b] = value` with a Python value copies it to the device and synchronizes on CUDA (pytorch/pytorch#188267),
    which the hot loop must not do (tests/kvcache/test_fast_decode_gpu.py checks the whole loop under
    torch.cuda.set_sync_debug_mode on a GPU; this catches that kind on the CPU): admissions mid-flight, decode
    steps, rows ending and their slots refilled, with every Tensor.__setitem__ of a Python number onto one element
    recorded."""
    eng = engine(cache)
    eng.eos_token_ids = []
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=40, max_new_tokens=12)
    for i, n in enumerate([30, 17, 40, 9]):
        sched.add(Request(f"r{i}", [3 + (i * 5 + j) % 120 for j in range(n)], max_new_tokens=4 + 2 * i))
    seen = []
    real = torch.Tensor.__setitem__

    def spy(self, index, value):
        idx = index if isinstance(index, tuple) else (index,)
        if isinstance(value, (bool, int, float)) and all(isinstance(i, int) for i in idx) and len(idx) == self.dim():
            seen.append((tuple(self.shape), index, value))
        return real(self, index, value)

    monkeypatch.setattr(torch.Tensor, "__setitem__", spy)
    rows = drain(sched)
    monkeypatch.setattr(torch.Tensor, "__setitem__", real)
    assert sorted(rows) == ["r0", "r1", "r2", "r3"]
    assert seen == []


def test_timing_gives_the_mean_median_and_slowest_decode_step():
    """Scheduler.timing() from its phases' event pairs (stand-ins here: CUDA events exist only on a GPU): prefill and
    decode totals, the decode steps, and the median and slowest step (a slow capture step moves the mean, not the
    median)."""
    eng = engine(dict(policy="full"))
    sched = Scheduler(eng, num_slots=1, max_prompt_tokens=8, max_new_tokens=4, timing=True)

    class Ev:
        def __init__(self, t):
            self.t = t

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    steps = [("prefill", 0, 500), ("decode", 500, 510), ("decode", 510, 910), ("decode", 910, 922),
             ("decode", 922, 933)]
    sched._events = [(phase, Ev(a), Ev(b)) for phase, a, b in steps]
    t = sched.timing()
    assert t["prefill_s"] == 0.5 and abs(t["decode_s"] - 0.433) < 1e-12 and t["decode_steps"] == 4
    assert t["decode_ms_median"] == 11.5 and t["decode_ms_max"] == 400
