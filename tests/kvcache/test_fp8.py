"""fp8 storage in the cache: the scales come from each sequence's own prompt, the kept store decodes back to the
tokens it was given within e4m3's error, later tokens saturate at the prefill scale, the store grows and slots
carry their scales, and generation stays close to full precision (but is not it)."""

from __future__ import annotations

import pytest
import torch
from tests.kvcache.test_policies import D, H, make_store, step
from tests.kvcache.tiny import build_model, greedy, padded_batch

from kvstream.kernels.decode_attention_ref import dequantize_store
from kvstream.kvcache import CacheConfig, CompressedCache, Engine
from kvstream.kvcache.scheduler import Request, Scheduler


def _prompt_kv(lengths, seed=0):
    """The k, v make_store draws: (B, H, T, D) each, left padded (row b's tokens are its last lengths[b])."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)


def _within_e4m3(x_hat, x, scale):
    """|x_hat - x| <= half a code step: 2**-4 |x| for normal codes, 2**-10 x scale for subnormal ones."""
    return bool(((x_hat - x).abs() <= torch.maximum(x.abs() * 2.0**-4, 2.0**-10 * scale) + 1e-7).all())


@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_scales_from_each_prompt_and_the_store_decodes_to_its_tokens(policy):
    lengths = [30, 9, 21]  # ragged: padding must not count in a row's amax
    cfg = CacheConfig(policy=policy, budget=0.6, quant="fp8")
    scores = torch.rand(len(lengths), H, max(lengths), generator=torch.Generator().manual_seed(1))
    store = make_store(cfg, lengths, scores)
    k, v = _prompt_kv(lengths)
    T = max(lengths)
    ks, vs = dequantize_store(store.slots())
    s_pos, s_len = store.s_pos.tolist(), store.s_len.tolist()
    assert store.kept.S["s_k"].dtype == torch.uint8 and store.kept.S["s_ks"].shape == (len(lengths), H, 1)
    for b, n in enumerate(lengths):
        assert s_len[b] > 0
        for h in range(H):
            for x, codes_scale in ((k, "s_ks"), (v, "s_vs")):
                want = x[b, h, T - n:].abs().max() / 448  # this sequence's own tokens only
                assert store.kept.S[codes_scale][b, h, 0] == pytest.approx(float(want), rel=1e-6)
            kscale, vscale = store.kept.S["s_ks"][b, h, 0], store.kept.S["s_vs"][b, h, 0]
            pos = torch.tensor(s_pos[b][h][: s_len[b]])
            assert _within_e4m3(ks[b, h, : s_len[b]], k[b, h, T - n + pos], kscale)
            assert _within_e4m3(vs[b, h, : s_len[b]], v[b, h, T - n + pos], vscale)
            assert not torch.equal(ks[b, h, : s_len[b]], k[b, h, T - n + pos])  # it is stored in 8 bits


def test_later_tokens_saturate_at_the_prefill_scale():
    store = make_store(CacheConfig(policy="full", quant="fp8"), [6])  # full: a token enters S after its step
    scales = store.kept.S["s_ks"].clone(), store.kept.S["s_vs"].clone()
    big = torch.full((1, H, 1, D), 1e3)  # far past the prompt's amax (randn)
    big[..., ::2] = -1e3
    store.plan.begin_step()
    store.append(big, big)
    store.after_attend()
    store.plan.end_step()
    assert torch.equal(store.kept.S["s_ks"], scales[0]) and torch.equal(store.kept.S["s_vs"], scales[1])
    assert store.s_len.tolist() == [7] and store.s_pos[0, :, 6].tolist() == [6] * H
    ks, vs = dequantize_store(store.slots())
    for x, sc in ((ks, scales[0]), (vs, scales[1])):  # +-448 x scale, the largest code, on every channel
        assert torch.equal(x[0, :, 6], 448 * sc[0] * big[0, :, 0].sign())


def test_full_fp8_grows_and_keeps_its_scales():
    store = make_store(CacheConfig(policy="full", quant="fp8"), [5])
    store.plan.max_new = None
    scales = store.kept.S["s_ks"].clone()
    cs = store.cs
    for _ in range(70):
        step(store)
    assert store.cs > cs and torch.equal(store.kept.S["s_ks"], scales)
    assert store.kept_positions()[0] == [list(range(75))] * H


def test_generation_is_close_to_full_precision_but_not_it():
    """First decode step logits of full + fp8 vs full: the prefill is the same (SDPA over bf16 keys), the decode
    reads 8-bit keys and values: close, not equal."""
    model = build_model("llama", hidden=128, heads=4, kv_heads=2, layers=2)
    ids, mask = padded_batch([40, 25], seed=2)
    runs = {q: greedy(model, ids, mask, 3, CompressedCache(CacheConfig(quant=q, max_new_tokens=3), model.config))
            for q in ("none", "fp8")}
    (_, ref), (_, got) = runs["none"], runs["fp8"]
    assert torch.equal(got[0], ref[0])
    err = ((got[1] - ref[1]).norm() / ref[1].norm()).item()
    assert 0 < err < 2e-2, err


def test_scheduler_slots_carry_their_scales():
    """keyformer + fp8 through 2 slots of a pool (5 requests): each row == Engine.generate on it alone, so a slot
    took its sequence's scales (load_slot) and not the previous sequence's."""
    model = build_model("llama", hidden=128, heads=4, kv_heads=2)
    eng = Engine.from_pretrained(model, cache=CacheConfig(policy="keyformer", budget=0.5, quant="fp8"), device="cpu")
    ids, mask = padded_batch([23, 40, 31, 12, 37], seed=4)
    ps = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    sched = Scheduler(eng, num_slots=2, max_prompt_tokens=48, max_new_tokens=8)
    for i, p in enumerate(ps):
        sched.add(Request(f"r{i}", p, max_new_tokens=8))
    got = {}
    while sched.has_work():
        got.update({row["id"]: row for row in sched.step()})
    for i, p in enumerate(ps):
        assert got[f"r{i}"]["token_ids"] == eng.generate([p], max_new_tokens=8)[0]["token_ids"], i


def test_a_slot_holds_half_the_bytes():
    """The memory-sized pool follows the format: a full + fp8 slot of the Llama-2-7B shape (prompt 4096 + 256 new)
    takes half a bf16 slot (and the scales), so about twice the sequences fit."""
    from transformers import LlamaConfig

    from kvstream.kvcache.capacity import max_slots, slot_bytes
    from kvstream.kvcache.models import REFERENCE_SHAPES

    mc = LlamaConfig(**REFERENCE_SHAPES["llama2-7b"])
    bf16 = torch.bfloat16
    full = slot_bytes(CacheConfig(policy="full"), mc, 4096, 256, bf16)
    fp8 = slot_bytes(CacheConfig(policy="full", quant="fp8"), mc, 4096, 256, bf16)
    assert 0.5 < fp8 / full < 0.51, fp8 / full
    mem = 60 * 2**30
    n_full, n_fp8 = (max_slots(CacheConfig(policy="full", quant=q), mc, 4096, 256, bf16, mem) for q in ("none", "fp8"))
    assert 1.9 * n_full <= n_fp8 <= 2 * n_full + 1, (n_full, n_fp8)
