"""Fused eviction write (kvstream/kernels/evict_write.py) against evict_write_ref, and both against the decode steps
of a LayerStore (which runs them; the reference replaced a host-planned path that these cases were first checked
against, and tests/kvcache/test_policies.py pins exactly what each policy keeps).

Everything is compared exactly: kept positions, codes, scales/mins, scores and lengths. The kernel does the
reference's fp32 arithmetic step for step (and turns FMA contraction off), so no tolerance is needed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvstream.kernels import evict_write as evict_mod
from kvstream.kernels.evict_write import evict_write
from kvstream.kernels.evict_write_ref import evict_write as evict_write_ref
from kvstream.kernels.evict_write_ref import unit_of
from kvstream.kvcache.config import CacheConfig
from kvstream.kvcache.policies import get_policy
from kvstream.kvcache.storage import LayerStore, SeqPlan
from tests.kernels.kernel_cases import assert_equal_written, clone_written, make_slots

# (quant, bits, G, D, Cs, dtype): head_dim 8 and 24 are not multiples of P = 16 at 2 bits (padded value words);
# Cs 24 / 48 are multiples of the span max(G, P) but not of a power of two above it; "none" / "token" / "fp8" take
# any Cs; fp8's ring values spread over 10**[-6, 1) of the scale (subnormal codes, saturation: kernel_cases)
LAYOUTS = [
    ("none", None, 32, 16, 13, torch.float32),
    ("none", None, 32, 64, 7, torch.bfloat16),
    ("channel", 2, 8, 8, 48, torch.float32),
    ("channel", 2, 16, 32, 48, torch.bfloat16),
    ("channel", 4, 8, 24, 24, torch.float16),
    ("channel", 4, 32, 64, 96, torch.bfloat16),
    ("channel", 2, 32, 16 + 16, 32, torch.float32),
    ("token", 2, 8, 24, 11, torch.float32),
    ("token", 4, 16, 16, 9, torch.bfloat16),
    ("fp8", 8, 32, 8, 13, torch.float32),  # fp8: one key / value scale per (sequence, KV head), no groups
    ("fp8", 8, 32, 24, 11, torch.bfloat16),
    ("fp8", 8, 32, 64, 7, torch.float16),
]

# per-sequence states of one batch (B = len): what the leaving token will do
MIXES = {
    "five": ["fill", "insert", "win", "loss", "inactive"],
    "four": ["tie", "cap0", "last", "mixed"],
    "one": ["mixed"],
    "edge": ["over", "w0", "tie"],
}


BLOCK_S = 16  # the kernel's competition scan in tiles of 16 slots here: several tiles for Cs >= 24


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setitem(evict_mod.CONFIG, "block_s", BLOCK_S)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(layout, mix, H, seed, device):
    """Random slots plus step inputs putting each sequence in the requested state."""
    quant, bits, G, D, Cs, dtype = layout
    states = MIXES[mix]
    B, Cw = len(states), 6
    g = _gen(seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    s_len, pos, w, cap, active = [], [], [], [], []
    for st in states:
        wb = 0 if st == "w0" else ri(1, Cw - 1)
        cb = {"cap0": 0, "over": Cs + 3}.get(st, ri(1, Cs))
        if st in ("fill",):
            sl, p = ri(0, cb), ri(0, wb - 1)
        elif st in ("insert", "inactive"):
            sl, p = ri(0, cb - 1), wb + ri(0, 40)
        elif st == "last":
            sl, p = cb - 1, wb + ri(0, 40)
        elif st == "over":
            sl, p = Cs, wb + ri(0, 40)
        else:  # competes (or drops when cap 0 / unscored)
            sl, p = (0 if st == "cap0" else cb), wb + ri(0, 40)
        s_len.append(sl)
        pos.append(p)
        w.append(wb)
        cap.append(cb)
        active.append(st != "inactive")
    slots = make_slots(B, H, D, Cs, Cw, quant, bits or 2, G, dtype, device, s_len, s_len, g)
    scores = (torch.rand(B, H, Cs + Cw, generator=g) * 10).round()  # integer scores: ties are common
    for b, st in enumerate(states):
        src = (pos[b] - w[b]) % (w[b] + 1)
        live = scores[b, :, : s_len[b]]
        if not s_len[b]:
            continue
        low = live.min(-1).values
        if st in ("win", "over"):
            scores[b, :, Cs + src] = live.max(-1).values + 1
        elif st == "loss":
            scores[b, :, Cs + src] = low - 1
        elif st == "tie":  # the minimum held by several slots; head 0 ties the leaving score (no write)
            scores[b, :, : s_len[b]] = torch.where(live == low[:, None], low[:, None], live + 1)
            scores[b, :, (s_len[b] - 1)] = low
            first = (scores[b, :, : s_len[b]] == low[:, None]).int().argmax(-1)  # (H,) lowest tied slot
            same_lane = first + BLOCK_S  # the same lane of the next tile of the kernel's scan
            for h in range(H):
                if same_lane[h] < s_len[b]:
                    scores[b, h, same_lane[h]] = low[h]
            scores[b, :, Cs + src] = low + 0.5
            scores[b, 0, Cs + src] = low[0]
    s_pos = torch.randint(0, 1000, (B, H, Cs), generator=g, dtype=torch.int32)
    args = [s_pos, scores, torch.tensor(pos, dtype=torch.int32), torch.tensor(w, dtype=torch.int32),
            torch.tensor(cap, dtype=torch.int32), torch.tensor(active)]
    return slots, [a.to(device) for a in args]


def _clone(slots, args):
    s, *a = clone_written(slots, *args)
    return s, a


def _assert_same(got, want, args_got, args_want, what):
    assert_equal_written(got, want, what, s_pos=(args_got[0], args_want[0]), scores=(args_got[1], args_want[1]))


RUNS = [("five", 3, True), ("four", 4, True), ("one", 1, True), ("edge", 2, True), ("five", 3, False),
        ("four", 2, False)]  # (mix, H, scored): unscored runs drop every competing token; "five" unscored has no scores


@pytest.mark.parametrize("mix,H,scored", RUNS, ids=[f"{m}-H{h}-{'scored' if s else 'unscored'}" for m, h, s in RUNS])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{q}{b or ''}-G{g}-D{d}-Cs{c}-{str(t)[6:]}"
                                                  for q, b, g, d, c, t in LAYOUTS])
def test_kernel_matches_reference(layout, mix, H, scored, device):
    slots, args = _case(layout, mix, H, seed=LAYOUTS.index(layout) * 100 + RUNS.index((mix, H, scored)),
                        device=device)
    if not scored and mix == "five":
        args[1] = None  # window / sink policies hold no scores
    before, before_args = _clone(slots, args)
    ks, ka = _clone(slots, args)
    rs, ra = _clone(slots, args)
    evict_write(ks, *ka, scored=scored)
    evict_write_ref(rs, *ra, scored=scored)
    _assert_same(ks, rs, ka, ra, "kernel vs reference")
    # each state did what it should (on the reference; the kernel equals it): a direct check of the semantics
    pos, w = ra[2].cpu(), ra[3].cpu()
    for b, st in enumerate(MIXES[mix]):
        left = int(pos[b] - w[b])
        old_len, new_len = int(before.s_len[b]), int(rs.s_len[b])
        moved = int(rs.win_lo[b] - before.win_lo[b])
        written = (ra[0][b] != before_args[0][b]).cpu()  # (H, Cs) s_pos changed
        assert moved == int(st not in ("fill", "inactive")), f"{st}: win_lo moved by {moved}"
        if st in ("insert", "last"):
            assert new_len == old_len + 1 and bool((ra[0][b, :, old_len] == left).all()), st
        else:
            assert new_len == old_len, f"{st}: s_len {old_len} -> {new_len}"
        if st in ("fill", "inactive", "loss", "cap0") or (not scored and st not in ("insert", "last")):
            assert not written.any(), f"{st}: S was written"
        elif st in ("win", "over") and scored:
            assert bool((written.sum(-1) == 1).all()), f"{st}: not exactly one slot replaced per head"
        elif st == "tie" and scored:
            assert not written[0].any(), "tie: a leaving score equal to the minimum replaced a slot"
            for h in range(1, H):
                sc = before_args[1][b, h, :old_len].cpu()
                low_slot = int((sc == sc.min()).nonzero()[0])  # the lowest of the tied slots
                assert written[h].sum() == 1 and bool(written[h, low_slot]), f"tie: head {h} replaced the wrong slot"


def _make_store(cfg: CacheConfig, lengths: list[int], max_new: int, H: int, D: int, seed: int, device="cpu"):
    """A LayerStore on `device` prefilled with random k / v (drawn on the CPU, so every device sees the same)."""
    pol = get_policy(cfg)
    B, T = len(lengths), max(lengths)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, T - n:] = True
    k = [pol.budget(n) for n in lengths]
    w = [pol.recent_window(x) for x in k]
    plan = SeqPlan(n=list(lengths), k=k, w=w, cap=[a - c for a, c in zip(k, w)],
                   order=torch.argsort((~valid).to(torch.int8), dim=-1, stable=True).to(device),
                   seeds=torch.zeros(B, dtype=torch.int64, device=device), max_new=max_new)
    g = _gen(seed)
    store = LayerStore(cfg, pol, plan, H, D, torch.float32, torch.device(device))
    sc = (torch.rand(B, H, T, generator=g) * 4).round().to(device) if pol.scored else None
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    store.prefill(k.to(device), v.to(device), sc)
    return store, g


# (policy, quant, group_size, budget, recent_ratio, prompt lengths): ragged prompts so that sequences in one batch
# are in different states (window filling, inserting, competing) during the steps
HOST_CASES = [
    ("keyformer", "kivi2", 8, 10, 0.3, [14, 5, 9]),
    ("h2o", "kivi4", 16, 12, 0.5, [20, 3, 13]),
    ("keyformer", "token2", 8, 9, 0.4, [11, 16, 2]),
    ("h2o", "none", 32, 7, 0.3, [9, 4, 12]),
    ("keyformer", "fp8", 32, 9, 0.3, [11, 4, 14]),
    ("sink", "fp8", 32, 8, 0.3, [12, 6, 7]),
    ("window", "kivi2", 8, 6, 0.3, [8, 2, 10]),
    ("sink", "kivi4", 8, 8, 0.3, [12, 6, 7]),
]


@pytest.mark.parametrize("case", HOST_CASES, ids=[f"{c[0]}-{c[1]}-G{c[2]}" for c in HOST_CASES])
def test_reference_matches_host_path(case, device):
    """Step by step from the same LayerStore state: the reference on a copy == `after_attend` (the store's own
    step); scores accumulate integer increments, so ties between kept tokens and with the leaving token happen.
    The kernel runs on a third copy: kernel == the store's step directly."""
    policy, quant, G, budget, rr, lengths = case
    H, D, steps = 2, 16, 9
    cfg = CacheConfig(policy=policy, quant=quant, group_size=G, budget=budget, recent_ratio=rr)
    store, g = _make_store(cfg, lengths, steps, H, D, seed=len(lengths) * 31 + G, device=device)
    B = store.B
    w = torch.tensor(store.plan.w, dtype=torch.int32, device=device)
    cap = torch.tensor(store.plan.cap, dtype=torch.int32, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    saw = set()
    for _ in range(steps):
        store.plan.begin_step()
        k1, v1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        store.append(k1.to(device), v1.to(device))
        if store.scores is not None:
            store.scores += (torch.rand(store.scores.shape, generator=g) * 2).floor().to(device)
        pos = store.positions().to(torch.int32)
        s_cnt = store.s_len.tolist()
        for b in range(B):
            left = int(pos[b] - w[b])
            saw.add("fill" if left < 0 else "insert" if s_cnt[b] < cap[b] else "full")
        args = [store.s_pos, store.scores, pos, w, cap, active]
        copies = [_clone(store.slots(), args) for _ in range(2)]
        evict_write_ref(copies[0][0], *copies[0][1], scored=store.scored)
        evict_write(copies[1][0], *copies[1][1], scored=store.scored)
        full = [c == int(cap[b]) > 0 for b, c in enumerate(s_cnt)]
        store.after_attend()
        store.plan.end_step()
        for b in range(B):
            left = int(pos[b] - w[b])
            if left >= 0 and full[b] and store.scored:
                saw.add("win" if bool((store.s_pos[b] == left).any()) else "loss")
        for i, (s, a) in enumerate(copies):
            _assert_same(s, store.slots(), a, args, "kernel vs store step" if i else "reference vs store step")
    want = {"full"} | ({"insert"} if policy != "window" else set()) | ({"win", "loss"} if store.scored else set())
    assert want <= saw, f"the steps never reached every state: {saw}"


def test_rejects_bad_inputs(device):
    slots, args = _case(LAYOUTS[2], "one", 1, 0, device)
    with pytest.raises(ValueError, match="pos is"):
        evict_write(slots, args[0], args[1], args[2].long(), *args[3:], scored=True)
    with pytest.raises(ValueError, match="scored=True needs the scores"):
        evict_write(slots, args[0], None, *args[2:], scored=True)
    bad = dataclasses.replace(slots, s_vc=slots.s_vc[:, :, :8])  # Cs 8: not a multiple of the span 16
    with pytest.raises(ValueError, match="multiple of max"):
        evict_write(bad, args[0][:, :, :8], None, *args[2:], scored=False)
    assert unit_of(slots) == 16
