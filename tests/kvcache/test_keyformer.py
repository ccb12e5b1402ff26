"""Keyformer: the tau schedule, score accumulation, GQA aggregation, and seeded noise."""

import math

import pytest
import torch

from kvstream.kernels.decode_attention_ref import decode_attention_ref
from kvstream.kernels.gumbel_ref import gumbel
from kvstream.kernels.prefill_scores_ref import prefill_scores_ref
from kvstream.kvcache import CacheConfig, CompressedCache
from tests.kvcache.tiny import build_model, greedy, padded_batch


def test_tau_schedule():
    cfg = CacheConfig(policy="keyformer", tau_init=1.0, tau_end=2.0, max_new_tokens=100)
    assert cfg.tau(0) == 1.0  # prefill
    assert cfg.tau(50) == pytest.approx(1.5)
    assert cfg.tau(100) == pytest.approx(2.0)
    assert cfg.tau(1) == pytest.approx(1.01)


def test_prefill_scores_by_hand():
    """3 tokens, one head, fixed noise: f_j = sum over rows i >= j of softmax_j((x_ij + g_ij) / tau)."""
    q = torch.tensor([0.5, -1.0, 2.0]).view(1, 1, 3, 1)
    k = torch.tensor([1.0, 0.3, -0.7]).view(1, 1, 3, 1)
    seed, tau = torch.tensor([11]), 1.5
    got = prefill_scores_ref(q, k, torch.ones(1, 3, dtype=torch.bool), 1.0, tau, True, seed, layer=2, chunk=2)
    expect = [0.0, 0.0, 0.0]
    for i in range(3):
        z = [(q[0, 0, i, 0].item() * k[0, 0, j, 0].item() + gumbel(11, 2, 0, 0, i, j).item()) / tau
             for j in range(i + 1)]
        m = max(z)
        den = sum(math.exp(x - m) for x in z)
        for j in range(i + 1):
            expect[j] += math.exp(z[j] - m) / den
    torch.testing.assert_close(got[0, 0], torch.tensor(expect), rtol=1e-5, atol=1e-6)
    assert got.sum().item() == pytest.approx(3.0, rel=1e-5)  # each row's probabilities sum to 1


def test_prefill_scores_skip_padding():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    valid = torch.tensor([[False, False, True, True, True, True]])
    padded = prefill_scores_ref(q, k, valid, 0.3, 1.0, True, torch.tensor([4]))
    unpadded = prefill_scores_ref(q[:, :, 2:], k[:, :, 2:], valid[:, 2:], 0.3, 1.0, True, torch.tensor([4]))
    assert (padded[:, :, :2] == 0).all()
    torch.testing.assert_close(padded[:, :, 2:], unpadded)  # noise is keyed by unpadded positions


def test_gqa_scores_sum_over_query_heads():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    valid = torch.ones(1, 9, dtype=torch.bool)
    gqa = prefill_scores_ref(q, k, valid, 0.35, 1.0, False)
    per_head = [prefill_scores_ref(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], valid, 0.35) for h in range(4)]
    torch.testing.assert_close(gqa[:, 0], per_head[0][:, 0] + per_head[1][:, 0])
    torch.testing.assert_close(gqa[:, 1], per_head[2][:, 0] + per_head[3][:, 0])


def test_decode_scores_noise_selects_but_output_is_noise_free():
    from tests.kvcache.test_policies import make_store

    store = make_store(CacheConfig(policy="keyformer", budget=0.5), [20], torch.rand(1, 2, 20))
    q = torch.randn(1, 4, 16)
    acc_a, acc_b = torch.zeros_like(store.scores), torch.zeros_like(store.scores)
    out_a = decode_attention_ref(q, store.slots(), 0.25, 2, acc_a, torch.tensor([1]), 0, 3, 1.2)
    out_b = decode_attention_ref(q, store.slots(), 0.25, 2, acc_b, torch.tensor([2]), 0, 3, 1.2)
    out_plain = decode_attention_ref(q, store.slots(), 0.25, 0)
    assert torch.equal(out_a, out_plain) and torch.equal(out_b, out_plain)
    assert not torch.allclose(acc_a, acc_b)  # another seed, another score
    held = acc_a > 0
    assert held.sum() == 2 * 10  # scores land only on the 10 held tokens of each KV head
    torch.testing.assert_close(acc_a.sum(-1), torch.full((1, 2), 2.0))  # 2 query heads per KV head


def _keyformer_run(seed):
    model = build_model("llama", hidden=128, layers=2)
    ids, mask = padded_batch([64, 50], seed=9)
    cache = CompressedCache(CacheConfig(policy="keyformer", budget=0.25, seed=seed, max_new_tokens=6), model.config)
    seq, _ = greedy(model, ids, mask, 6, cache)
    return seq, [cache.kept_positions(layer) for layer in range(2)]


def test_same_seed_same_output_other_seed_other_selection():
    seq_a, kept_a = _keyformer_run(0)
    seq_b, kept_b = _keyformer_run(0)
    seq_c, kept_c = _keyformer_run(1)
    assert torch.equal(seq_a, seq_b) and kept_a == kept_b
    assert kept_a != kept_c


def test_gumbel_noise_is_gumbel_and_fresh():
    cols = torch.arange(200_000)
    g = gumbel(3, 1, 2, 0, 0, cols)
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(g.std().item() - math.pi / math.sqrt(6)) < 0.01
    u = torch.exp(-torch.exp(-g)).sort().values  # Gumbel CDF -> uniform; Kolmogorov-Smirnov distance
    ks = (u - (torch.arange(1, u.numel() + 1) / u.numel())).abs().max().item()
    assert ks < 1.63 / math.sqrt(u.numel())  # alpha = 0.01
    assert torch.equal(g, gumbel(3, 1, 2, 0, 0, cols))
    for other in (gumbel(4, 1, 2, 0, 0, cols), gumbel(3, 1, 3, 0, 0, cols), gumbel(3, 0, 2, 0, 0, cols)):
        assert torch.corrcoef(torch.stack([g, other]))[0, 1].abs() < 0.01
