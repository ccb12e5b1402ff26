"""KIVI storage: packing, per-group error, grouping directions, the prefill split and the decode flush rules."""

import pytest
import torch

from kvstream.kernels.decode_attention_ref import dequantize_store
from kvstream.kernels.kivi_quant_ref import (dequantize_keys, dequantize_values, pack, quantize_keys, quantize_values,
                                    unpack)
from kvstream.kvcache.config import CacheConfig
from tests.kvcache.test_policies import H, make_store, step


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [16, 40, 7])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (3, 2, n, 5))
    words = pack(codes, bits, dim=2)
    assert words.dtype == torch.int32 and words.shape[2] == -(-n // (32 // bits))
    assert torch.equal(unpack(words, bits, dim=2, size=n), codes)


def test_pack_is_lsb_first():
    codes = torch.tensor([1, 2, 3] + [0] * 13)  # 2-bit: 1 | 2 << 2 | 3 << 4
    assert pack(codes, 2, dim=0).item() == 1 + (2 << 2) + (3 << 4)


@pytest.mark.parametrize("bits", [2, 4])
def test_per_group_error_within_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 64, 32, generator=g) * torch.linspace(0.1, 5, 32)  # channels of different scales
    kc, ks, km = quantize_keys(x, bits, 16)
    err = (dequantize_keys(kc, ks, km, bits, 16) - x).abs()
    assert (err <= ks.repeat_interleave(16, dim=2) / 2 + 1e-6).all()
    vc, vs, vm = quantize_values(x, bits, 16)
    err = (dequantize_values(vc, vs, vm, bits, 16) - x).abs()
    assert (err <= vs.repeat_interleave(16, dim=3) / 2 + 1e-6).all()


def test_keys_group_along_tokens_values_along_channels():
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 5, :] = 100.0  # one outlier token
    kc, ks, km = quantize_keys(x, 2, 16)
    assert ks.shape == (1, 1, 2, 32)  # a scale per (token group, channel)
    assert (ks[0, 0, 0] > 0).all() and (ks[0, 0, 1] == 0).all()  # only the group holding token 5 widens
    vc, vs, vm = quantize_values(x, 2, 16)
    assert vs.shape == (1, 1, 32, 2)  # a scale per (token, channel group)
    assert (vs[0, 0, 5] == 0).all() and (vs[0, 0, 4] == 0).all()  # a constant token needs no range
    x[0, 0, :, 3] = torch.arange(32.0) + 1  # one outlier channel
    vc, vs, vm = quantize_values(x, 2, 16)
    assert (vs[0, 0, :, 0] > 0).all() and (vs[0, 0, torch.arange(32) != 5, 1] == 0).all()


@pytest.mark.parametrize("T", [100, 128, 37, 20])
def test_prefill_split(T):
    R = 32
    store = make_store(CacheConfig(policy="full", quant="kivi2", group_size=16, residual=R), [T])
    assert store.s_len.tolist() == [T - T % R]  # keys quantized
    assert store.sv_len.tolist() == [max(0, T - R)]  # values quantized
    assert store.kept_positions()[0] == [list(range(T))] * H


def test_decode_flush_rules():
    """Values leave the residual one at a time (FIFO of R); keys flush a block of R when R wait in full precision,
    after the step that used the newest key in full precision."""
    R, T = 32, 40
    store = make_store(CacheConfig(policy="full", quant="kivi4", group_size=16, residual=R), [T])
    assert (store.s_len.tolist(), store.sv_len.tolist()) == ([32], [8])
    for t in range(1, 30):
        step(store)
        p = T + t - 1  # last position appended
        assert store.sv_len.tolist() == [p + 1 - R], t
        expect_k = 64 if p + 1 >= 64 else 32
        assert store.s_len.tolist() == [expect_k], t
        assert store.win_lo.tolist() == [expect_k]
    assert store.kept_positions()[0] == [list(range(T + 29))] * H


def test_kivi_store_dequantizes_to_the_tokens_it_was_given():
    """The dequantized S region equals each token's own k/v within the quantization error."""
    R, T = 32, 70
    store = make_store(CacheConfig(policy="full", quant="kivi4", group_size=16, residual=R), [T], seed=5)
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, H, T, 16, generator=g)
    v = torch.randn(1, H, T, 16, generator=g)
    ks, vs = dequantize_store(store.slots())
    nq_k, nq_v = store.s_len.tolist()[0], store.sv_len.tolist()[0]
    assert (ks[0, :, :nq_k] - k[0, :, :nq_k]).abs().max() < 0.5
    assert (vs[0, :, :nq_v] - v[0, :, :nq_v]).abs().max() < 0.5
    # values of quantized-key slots not yet quantized come from the full-precision ring, exactly
    assert torch.equal(vs[0, :, nq_v:nq_k], v[0, :, nq_v:nq_k])


@pytest.mark.parametrize("quant", ["kivi2", "token2"])
def test_combined_eviction_requantizes_only_what_it_touches(quant):
    """keyformer + quant: a token written into a quantized slot decodes back close to itself."""
    cfg = CacheConfig(policy="h2o", budget=0.5, recent_ratio=0.05, quant=quant, group_size=16)  # w = 1
    store = make_store(cfg, [64], torch.rand(1, H, 64))
    new = []
    for _ in range(6):
        store.scores[:, :, store.cs :] = 100.0  # leaving tokens always win their slot
        k1 = torch.randn(1, H, 1, 16)
        store.append(k1, torch.randn(1, H, 1, 16))
        new.append(k1)
        store.scores[:, :, store.cs :] = 100.0
        store.after_attend()
        store.plan.end_step()  # what the cache does after its last layer
    ks, _ = dequantize_store(store.slots())
    positions = store.s_pos[0].tolist()
    w = store.plan.w[0]
    # tokens 64.. have left the window and been written into S slots
    assert w == 1
    for j, k1 in enumerate(new[: 6 - w]):
        for h in range(H):
            slot = positions[h].index(64 + j)
            assert (ks[0, h, slot] - k1[0, h, 0]).abs().max() < 2.0
