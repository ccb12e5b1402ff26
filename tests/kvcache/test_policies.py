"""Exactly what each policy keeps, at prefill and when a decode step evicts."""

import pytest
import torch

from kvstream.kvcache.config import CacheConfig
from kvstream.kvcache.policies import get_policy
from kvstream.kvcache.storage import LayerStore, SeqPlan

H, D = 2, 16


def make_store(cfg: CacheConfig, lengths: list[int], scores=None, seed=0):
    """A LayerStore prefilled with random k/v for left-padded sequences; scores (B, H, T) in padded layout."""
    pol = get_policy(cfg)
    B, T = len(lengths), max(lengths)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, T - n :] = True
    k = [pol.budget(n) for n in lengths]
    w = [pol.recent_window(x) for x in k]
    plan = SeqPlan(n=list(lengths), k=k, w=w, cap=[a - c for a, c in zip(k, w)],
                   order=torch.argsort((~valid).to(torch.int8), dim=-1, stable=True),
                   seeds=torch.zeros(B, dtype=torch.int64), max_new=8)
    g = torch.Generator().manual_seed(seed)
    kk, vv = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    store = LayerStore(cfg, pol, plan, H, D, torch.float32, torch.device("cpu"))
    store.prefill(kk, vv, scores if pol.scored else None)
    return store


def step(store, leaving_scores=None, s_scores=None):
    """One decode step with hand-set scores: append a token, set scores, then evict (one layer: the step
    counter the cache advances after its last layer is advanced here)."""
    store.plan.begin_step()
    store.append(torch.randn(store.B, H, 1, D), torch.randn(store.B, H, 1, D))
    if s_scores is not None:
        store.scores[:, :, : store.cs] = s_scores
    if leaving_scores is not None:
        p = store.positions()
        for b in range(store.B):
            w = store.plan.w[b]
            store.scores[b, :, store.cs + (p[b] - w) % (w + 1)] = leaving_scores[b]
    store.after_attend()
    store.plan.end_step()


def test_window_keeps_last_k():
    store = make_store(CacheConfig(policy="window", budget=0.5), [20])
    assert store.kept_positions()[0] == [list(range(10, 20))] * H
    step(store)
    assert store.kept_positions()[0] == [list(range(11, 21))] * H


def test_sink_keeps_first_sink_and_recent():
    store = make_store(CacheConfig(policy="sink", budget=10, sink=4), [30])
    assert store.kept_positions()[0] == [[0, 1, 2, 3] + list(range(24, 30))] * H
    step(store)
    step(store)
    assert store.kept_positions()[0] == [[0, 1, 2, 3] + list(range(26, 32))] * H


def test_h2o_prefill_keeps_recent_window_and_top_scores_per_head():
    n = 10
    cfg = CacheConfig(policy="h2o", budget=0.6, recent_ratio=0.5)  # k = 6, w = 3, 3 heavy hitters
    scores = torch.zeros(1, H, n)
    scores[0, 0, [1, 4, 5]] = 5.0
    scores[0, 1, [0, 2, 6]] = 5.0
    scores[0, :, 7:] = -1.0  # the recent window stays whatever its score
    store = make_store(cfg, [n], scores)
    assert store.kept_positions()[0] == [[1, 4, 5, 7, 8, 9], [0, 2, 6, 7, 8, 9]]


def test_leaving_token_competes_with_key_tokens():
    """The token leaving the recent window replaces the lowest-scored key token when it scores higher,
    and is evicted itself when it scores lowest (the key set does not freeze after prefill)."""
    cfg = CacheConfig(policy="keyformer", budget=4, recent_ratio=0.5)  # k = 4, w = 2, 2 key slots
    scores = torch.tensor([[[0.0, 9.0, 0.0, 8.0, 0.0, 0.0]] * H])
    store = make_store(cfg, [6], scores)
    assert store.kept_positions()[0] == [[1, 3, 4, 5]] * H
    s_scores = torch.zeros(1, H, store.cs)
    pos = store.s_pos[0, 0, :2].tolist()
    s_scores[0, :, pos.index(1)] = 5.0
    s_scores[0, :, pos.index(3)] = 1.0
    step(store, leaving_scores=[torch.tensor([10.0, 0.5])], s_scores=s_scores)  # token 4 leaves the window
    # head 0: 4 (10.0) beats 3 (1.0) -> 3 evicted; head 1: 4 (0.5) is the lowest -> 4 evicted
    assert store.kept_positions()[0] == [[1, 4, 5, 6], [1, 3, 5, 6]]
    step(store, leaving_scores=[torch.tensor([-1.0, 100.0])])  # token 5 leaves
    assert store.kept_positions()[0] == [[1, 4, 6, 7], [1, 5, 6, 7]]


def test_per_sequence_budgets_from_unpadded_lengths():
    cfg = CacheConfig(policy="h2o", budget=0.5)
    lengths = [10, 30, 21]
    T = max(lengths)
    store = make_store(cfg, lengths, torch.rand(3, H, T))
    kept = store.kept_positions()
    assert [len(kept[b][0]) for b in range(3)] == [5, 15, 10]
    for b, n in enumerate(lengths):
        for h in range(H):
            assert max(kept[b][h]) == n - 1 and min(kept[b][h]) >= 0  # unpadded positions
    for _ in range(3):  # budgets stay fixed while decoding
        step(store)
    assert [len(store.kept_positions()[b][0]) for b in range(3)] == [5, 15, 10]


def test_full_keeps_everything_and_grows_without_a_known_length():
    cfg = CacheConfig(policy="full")
    store = make_store(cfg, [5])
    store.plan.max_new = None
    for _ in range(70):
        step(store)
    assert store.kept_positions()[0] == [list(range(75))] * H


@pytest.mark.parametrize("quant", ["kivi2", "token2", "fp8"])
def test_quantized_eviction_keeps_the_same_positions(quant):
    scores = torch.rand(1, H, 40, generator=torch.Generator().manual_seed(0))
    plain = make_store(CacheConfig(policy="h2o", budget=0.5, group_size=16), [40], scores)
    quantized = make_store(CacheConfig(policy="h2o", budget=0.5, quant=quant, group_size=16), [40], scores)
    assert plain.kept_positions() == quantized.kept_positions()
    assert quantized.nbytes() < plain.nbytes()


@pytest.mark.parametrize("policy", ["full", "window", "sink", "h2o", "keyformer"])
def test_the_kept_store_holds_each_kept_tokens_own_key_and_value(policy):
    """Left-padded rows, an unquantized store: every slot in use holds the key / value of the position s_pos
    names (the store's prefix slice for the policies that keep positions 0 .. c-1, a gather for the others)."""
    lengths = [20, 13, 17]
    B, T = len(lengths), max(lengths)
    scores = torch.rand(B, H, T, generator=torch.Generator().manual_seed(1))
    cfg = CacheConfig(policy=policy, budget=0.6, sink=3)
    store = make_store(cfg, lengths, scores, seed=2)
    g = torch.Generator().manual_seed(2)  # the k / v make_store drew
    kk, vv = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    pol = get_policy(cfg)
    for b, n in enumerate(lengths):
        m = max(0, n - store.plan.w[b])
        sel = pol.select(scores[b, :, :m], m, store.plan.cap[b], H, "cpu")
        if pol.keeps_prefix:  # what the flag promises the store
            assert torch.equal(sel, torch.arange(sel.shape[1]).expand(H, -1))
        c = int(store.s_len[b])
        assert c == sel.shape[1] and (c > 0 or policy == "window")
        for h in range(H):
            pos = store.s_pos[b, h, :c].long()
            assert torch.equal(store.kept.S["s_k"][b, h, :c], kk[b, h, T - n + pos])
            assert torch.equal(store.kept.S["s_v"][b, h, :c], vv[b, h, T - n + pos])
