"""KIVI residual moves (kvstream/kernels/kivi_residual.py) against kivi_residual_ref, and both against a kivi-mode
LayerStore's steps (`append` / `after_attend`, which run them; first checked against the host-planned path they
replaced). Exact comparisons (same fp32 steps)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvstream.kernels.kivi_residual import kivi_key_flush, kivi_value_exit
from kvstream.kernels.kivi_residual_ref import kivi_key_flush as kivi_key_flush_ref
from kvstream.kernels.kivi_quant_ref import quantize_values
from kvstream.kernels.kivi_residual_ref import kivi_value_exit as kivi_value_exit_ref
from kvstream.kvcache.config import CacheConfig
from tests.kernels.kernel_cases import assert_equal_written, clone_written, make_slots
from tests.kernels.test_evict_write import _make_store

# (bits, G, D, R, dtype): G < P (2 bits, G 8: spans of 16), head_dim 8 / 24 not multiples of P at 2 bits
LAYOUTS = [
    (2, 16, 16, 16, torch.float32),
    (2, 8, 8, 16, torch.bfloat16),
    (4, 8, 24, 16, torch.float16),
    (4, 32, 64, 32, torch.bfloat16),
]
# per sequence: (s_len in units of R, pos offset from s_len, active); R = ring size
STATES = [
    (1, -1, True),  # flush due (pos + 1 - s_len == R), value of pos - R exits
    (0, -9, True),  # early: pos - R < 0, no exit, no flush
    (2, -5, True),  # no flush yet, value exits
    (1, -1, False),  # inactive
    (3, -1, True),  # flush due but S full (s_len + R > Cs): skipped; value exit at pos - R < Cs
]


def _case(layout, H, seed, device):
    bits, G, D, R, dtype = layout
    B, Cs = len(STATES), 3 * R
    g = torch.Generator().manual_seed(seed)
    s_len = [n * R for n, _, _ in STATES]
    pos = [sl + R + off for sl, (_, off, _) in zip(s_len, STATES)]  # pos + 1 - s_len = R + off + 1
    sv_len = [max(0, p - R) for p in pos]
    slots = make_slots(B, H, D, Cs, R, "channel", bits, G, dtype, device, s_len, sv_len, g)
    s_pos = torch.randint(0, 1000, (B, H, Cs), generator=g, dtype=torch.int32).to(device)
    pos_t = torch.tensor(pos, dtype=torch.int32, device=device)
    active = torch.tensor([a for _, _, a in STATES], device=device)
    return slots, s_pos, pos_t, active


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"kivi{b}-G{g}-D{d}-R{r}-{str(t)[6:]}" for b, g, d, r, t in LAYOUTS])
def test_kernels_match_reference(layout, H, device):
    slots, s_pos, pos, active = _case(layout, H, seed=LAYOUTS.index(layout) * 10 + H, device=device)
    R = layout[3]
    before, = clone_written(slots)
    ks, ksp = clone_written(slots, s_pos)
    rs, rsp = clone_written(slots, s_pos)
    kivi_value_exit(ks, pos, active)
    kivi_value_exit_ref(rs, pos, active)
    assert_equal_written(ks, rs, "value exit: kernel vs reference")
    kivi_key_flush(ks, ksp, pos, active)
    kivi_key_flush_ref(rs, rsp, pos, active)
    assert_equal_written(ks, rs, "key flush: kernel vs reference", s_pos=(ksp, rsp))
    # the semantics, state by state (on the reference; the kernel equals it)
    for b, (n, off, act) in enumerate(STATES):
        p = int(pos[b])
        exits = act and p - R >= 0
        flush = act and off == -1 and (n + 1) * R <= 3 * R
        assert int(rs.sv_len[b]) == (p - R + 1 if exits else int(before.sv_len[b])), f"sequence {b}: sv_len"
        if exits:  # the ring's value of position p - R, encoded per token, at S slot p - R
            r = (p - R) % R
            want = quantize_values(slots.win_v[b:b + 1, :, r:r + 1], layout[0], layout[1])
            for got, w in zip((rs.s_vc, rs.s_vs, rs.s_vm), want):
                assert torch.equal(got[b, :, p - R], w[0, :, 0]), f"sequence {b}: value at slot {p - R}"
        else:
            assert torch.equal(rs.s_vc[b], before.s_vc[b]), f"sequence {b}: a value was written"
        assert int(rs.s_len[b]) == n * R + (R if flush else 0), f"sequence {b}: s_len"
        assert int(rs.win_lo[b]) == (n * R + R if flush else int(before.win_lo[b])), f"sequence {b}: win_lo"
        if flush:
            assert rsp[b, :, n * R:(n + 1) * R].tolist() == [list(range(n * R, (n + 1) * R))] * H
        else:
            assert torch.equal(rsp[b], s_pos[b]), f"sequence {b}: s_pos written without a flush"


@pytest.mark.parametrize("quant,G,R", [("kivi2", 16, 16), ("kivi4", 8, 16), ("kivi2", 8, 32)])
def test_reference_and_kernels_match_host_path(quant, G, R, device):
    """Step by step from the same LayerStore state (ragged prompts: flushes and value exits at different steps):
    before `append`, the value exit on copies == the store's step; before `after_attend`, the flush likewise."""
    H, D, steps = 2, 16, 20
    cfg = CacheConfig(policy="full", quant=quant, group_size=G, residual=R)
    store, g = _make_store(cfg, [R + R // 2, R - 3, 3 * R - 10], steps, H, D, seed=G + R, device=device)
    B = store.B
    active = torch.ones(B, dtype=torch.bool, device=device)
    flushed, exited = 0, 0
    for _ in range(steps):
        store.plan.begin_step()
        pos = store.positions().to(torch.int32)
        copies = [clone_written(store.slots()) for _ in range(2)]
        kivi_value_exit_ref(copies[0][0], pos, active)
        kivi_value_exit(copies[1][0], pos, active)
        k1, v1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        store.append(k1.to(device), v1.to(device))
        exited += int((pos >= R).sum())
        for (s,), what in zip(copies, ("reference", "kernel")):
            assert_equal_written(s, store.slots(), f"value exit: {what} vs store step")
        copies = [clone_written(store.slots(), store.s_pos) for _ in range(2)]
        kivi_key_flush_ref(copies[0][0], copies[0][1], pos, active)
        kivi_key_flush(copies[1][0], copies[1][1], pos, active)
        len_before = store.s_len.clone()
        store.after_attend()
        store.plan.end_step()
        flushed += int((store.s_len != len_before).sum())
        for (s, sp), what in zip(copies, ("reference", "kernel")):
            assert_equal_written(s, store.slots(), f"key flush: {what} vs store step", s_pos=(sp, store.s_pos))
    assert flushed >= 3 and exited >= 10, (flushed, exited)


def test_rejects_bad_inputs(device):
    slots, s_pos, pos, active = _case(LAYOUTS[0], 1, 0, device)
    with pytest.raises(ValueError, match="pos is"):
        kivi_value_exit(slots, pos.long(), active)
    with pytest.raises(ValueError, match="multiple of R"):
        kivi_key_flush(dataclasses.replace(slots, win_k=slots.win_k[:, :, :8], win_v=slots.win_v[:, :, :8]), s_pos,
                       pos, active)
