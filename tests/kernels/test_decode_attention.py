"""Fused decode attention (kernels/decode_attention.py) against decode_attention_ref: outputs and scores."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kvstream.kernels.decode_attention import PREFETCH_TILES, decode_attention, decode_workspace
from kvstream.kernels.decode_attention_ref import decode_attention_ref, held_mask
from kvstream.kernels.decode_kivi_cc import cc_supported
from kvstream.kernels.decode_kivi_gqa import gqa_supported, qt_default
from kvstream.kernels.kivi_quant_ref import quantize_keys
from kvstream.kernels.triton_util import line_offsets
from tests.kernels.kernel_cases import assert_close, make_slots

# (quant, bits, G, dtype, D, grp, H, Cs, Cw, s_len, sv_len, num_splits)  -- ragged: empty / tiny / full stores
CASES = [
    ("none", 0, 32, torch.float32, 64, 1, 2, 80, 24, [0, 5, 80], [0, 3, 71], 3),
    ("none", 0, 32, torch.bfloat16, 128, 4, 1, 70, 17, [70, 1], [70, 0], 2),
    ("channel", 2, 32, torch.float32, 64, 8, 1, 96, 20, [96, 33, 0], [90, 33, 0], 3),
    ("channel", 4, 64, torch.bfloat16, 128, 4, 2, 128, 9, [100, 64], [37, 64], 2),
    ("channel", 2, 16, torch.float32, 64, 1, 2, 48, 12, [47, 16], [40, 2], 1),
    ("channel", 4, 32, torch.bfloat16, 128, 1, 2, 96, 16, [96, 40], [80, 31], 2),
    # several 128-token tiles per split (lazy rescaling, values of later tiles, ring values past sv_len)
    ("channel", 2, 32, torch.bfloat16, 64, 1, 2, 448, 20, [448, 301], [440, 262], 1),
    ("channel", 4, 32, torch.float32, 64, 4, 1, 352, 16, [333], [290], 2),
    ("channel", 2, 32, torch.float16, 128, 8, 1, 192, 16, [192, 77, 0], [180, 70, 0], 2),
    ("channel", 4, 128, torch.float16, 128, 1, 1, 640, 16, [600, 333, 5], [530, 333, 0], 2),
    # GQA on CUDA cores (kernels/decode_kivi_gqa.py): 2 bits with 4 heads (2 tiles of 256 tokens in one split,
    # FIFO values past sv_len), 2 heads with D 64, 3 heads padded to 4
    ("channel", 2, 32, torch.bfloat16, 128, 4, 2, 576, 16, [576, 150, 3], [530, 140, 0], 1),
    ("channel", 2, 16, torch.float32, 64, 2, 2, 640, 12, [640, 200], [600, 190], 2),
    ("channel", 4, 32, torch.float32, 128, 3, 1, 224, 16, [224, 61], [170, 61], 2),
    # several Keyformer normalizer blocks (STAGE2_BLOCK_C), one of them all free slots for the short sequence
    ("none", 0, 32, torch.float32, 64, 2, 1, 1100, 8, [1100, 7], [1100, 7], 3),
    # fp8 (e4m3 codes, one key / value scale per (sequence, KV head)): an empty store, values past sv_len from the
    # ring, GQA with 3 heads padded to 4, odd capacities, head_dim 16
    ("fp8", 8, 0, torch.float32, 64, 1, 2, 81, 23, [0, 5, 81], [0, 3, 70], 3),
    ("fp8", 8, 0, torch.bfloat16, 128, 4, 1, 70, 17, [70, 1], [70, 1], 2),
    ("fp8", 8, 0, torch.float16, 16, 3, 2, 33, 5, [33, 17, 0], [33, 17, 0], 2),
    ("token", 2, 32, torch.float32, 64, 4, 1, 75, 10, [75, 20], [60, 20], 2),
    ("token", 4, 64, torch.bfloat16, 64, 1, 2, 40, 33, [3, 40], [3, 12], 2),
]


def _ids(c):
    return f"{c[0]}{c[1]}-G{c[2]}-{str(c[3])[6:]}-D{c[4]}-grp{c[5]}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_decode_matches_reference(case, device):
    quant, bits, G, dtype, D, grp, H, cs, cw, s_len, sv_len, splits = case
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    B = len(s_len)
    slots = make_slots(B, H, D, cs, cw, quant, bits, G, dtype, device, s_len, sv_len, gen)
    q = torch.randn(B, H * grp, D, generator=gen).to(dtype).to(device)
    scale = D ** -0.5
    seed = torch.randint(0, 2**40, (B,), generator=gen).to(device)
    # score_mode 1 runs the other q.K / P.V path (tensor-core dot vs CUDA-core reduce) than the default, and for
    # KIVI storage (kernels/decode_kivi.py) with one query head the tensor-core P.V instead of the CUDA-core one;
    # score_mode 2 the per-word value scale loads; KIVI storage also once through the generic stage 1. KIVI with
    # the CUDA-core KIVI stage 1s (kernels/decode_kivi_cc.py, one query head per KV head; decode_kivi_gqa.py,
    # several) where they fit: without scores, with scores and another tile (8 word rows per warp; the MHA kernel
    # in its other P.V spelling, pv_chain), so every kernel sees every mode, with fp16x2 sums (h2, the default for
    # bf16 / fp16) and fp32 sums (the MHA kernel's in both P.V spellings), and L2 prefetch 0, 1 (default), 2 tiles
    # ahead (a no-op under the interpreter: there it runs the prefetch's index math only); the GQA kernel's q from
    # the heads-last copy and from q itself
    ws0 = decode_workspace(q, slots, 0, num_splits=1)
    runs = [(0, {}), (1, dict(use_dot=not ws0.use_dot, val_cc=False, kivi_cc=False)),
            (2, dict(vs_vec=False, kivi_cc=False))] + ([(2, dict(kivi_tc=False))] if quant == "channel" else [])
    if quant == "channel" and (cc_supported(slots, D) if grp == 1 else gqa_supported(slots, D, grp)):
        nw = ws0.num_warps if ws0.kivi_cc else 2
        runs += [(1, dict(kivi_cc=True, num_warps=6 - nw, pv_chain=not ws0.pv_chain, h2=False)),
                 (2, dict(kivi_cc=True, num_warps=1, h2=True, prefetch=2)),
                 (0, dict(kivi_cc=True, num_warps=nw, h2=False, prefetch=0)),
                 (1, dict(kivi_cc=True, h2=True)), (0, dict(kivi_cc=True, h2=True))]
        if grp > 1:  # the GQA kernel's q also read the way that is not this Triton's default (qt)
            runs += [(0, dict(kivi_cc=True, qt=not qt_default())),
                     (2, dict(kivi_cc=True, h2=False, qt=not qt_default()))]
    for mode, opts in runs:
        # fp16x2 sums (up to 32 terms in fp16) on float32 inputs: the tolerance of the bf16 models they are for
        tol_dtype = torch.bfloat16 if opts.get("h2") and dtype == torch.float32 else dtype
        ws = decode_workspace(q, slots, mode, num_splits=splits, **opts)
        ws.out.fill_(float("nan"))
        ws.part_acc.fill_(float("nan"))
        ws.stats.fill_(float("nan"))
        if ws.logits is not None:
            ws.logits.fill_(float("nan"))
        acc0 = torch.rand(B, H, cs + cw, generator=gen).to(device)
        acc, acc_ref = acc0.clone(), acc0.clone()
        out = decode_attention(q, slots, scale, mode, acc, seed, layer=3, step=7, tau=1.6, workspace=ws)
        ref = decode_attention_ref(q, slots, scale, mode, acc_ref, seed, layer=3, step=7, tau=1.6)
        assert out.data_ptr() == ws.out.data_ptr()
        assert_close(out, ref, tol_dtype, f"out (score_mode {mode}, {opts})")
        if mode:
            assert_close(acc - acc0, acc_ref - acc0, tol_dtype, f"scores (score_mode {mode}, {opts})")
            free = ~held_mask(slots)[:, None, :].expand_as(acc)
            assert torch.equal(acc[free], acc0[free]), "a column that holds no token changed"


@pytest.mark.parametrize("grp", [1, 4])
def test_kivi_sharp_attention_rescales(grp, device):
    """Logits that keep rising along the sequence (a query aligned with later keys) by more than fp32's range:
    without the lazy rescaling of kernels/decode_kivi.py and kernels/decode_kivi_gqa.py (grp 4) and
    kernels/decode_kivi_cc.py (grp 1) the accumulators overflow; with it, == the reference."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, D, cs, cw = 1, 1, 64, 384, 16
    slots = make_slots(B, H, D, cs, cw, "channel", 4, 32, torch.float32, device, [384], [370], gen)
    ramp = torch.linspace(0.0, 1.0, cs + cw).view(1, 1, -1, 1).to(device)
    direction = torch.randn(D, generator=gen)
    direction = (direction * (8.0 / direction.norm())).to(device)
    keys = torch.randn(B, H, cs + cw, D, generator=gen).to(device) * 0.1 + ramp * direction
    slots.s_kc, slots.s_ks, slots.s_km = (t.contiguous() for t in quantize_keys(keys[:, :, :cs], 4, 32))
    slots.win_k.copy_(keys[:, :, cs:])
    q = (direction * 20.0).expand(B, H * grp, D).contiguous()
    for mode, cc in [(0, True), (1, True)] + ([] if grp == 1 else [(0, False), (1, False)]):
        ws = decode_workspace(q, slots, mode, num_splits=1, kivi_cc=cc, num_warps=1 if grp > 1 and cc else None)
        acc, acc_ref = torch.zeros(B, H, cs + cw, device=device), torch.zeros(B, H, cs + cw, device=device)
        out = decode_attention(q, slots, D ** -0.5, mode, acc, workspace=ws)
        ref = decode_attention_ref(q, slots, D ** -0.5, mode, acc_ref)
        x = (q[:, :1].float() @ keys[0, 0].float().T).flatten() * D ** -0.5
        rise = (x[cs - 32:cs].max() - x[:64].max()).item()
        assert rise > 90, f"the logits must rise past fp32's range (e**88.7) to need rescaling, rose {rise:.1f}"
        # logits of ~150: fp32 rounding of a logit (~1e-5 absolute) already moves its weight by ~1e-5 relative
        assert_close(out, ref, torch.float32, f"out (score_mode {mode}, grp {grp}, cc {cc})", tol=2e-4)
        if mode:
            assert_close(acc, acc_ref, torch.float32, f"scores (grp {grp}, cc {cc})", tol=2e-4)


def test_default_workspace_and_tensor_step(device):
    """No workspace (allocated inside), step/tau as device tensors == Python numbers; noise differs by step."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, D, cs, cw = 2, 2, 64, 64, 16
    slots = make_slots(B, H, D, cs, cw, "channel", 4, 32, torch.float32, device, [64, 30], [50, 30], gen)
    q = torch.randn(B, 4 * H, D, generator=gen).to(device)
    seed = torch.tensor([11, 12], device=device)
    accs = []
    for step in (5, torch.tensor([5], dtype=torch.int32, device=device), 6):
        acc = torch.zeros(B, H, cs + cw, device=device)
        tau = torch.tensor([1.25], device=device) if isinstance(step, torch.Tensor) else 1.25
        decode_attention(q, slots, 0.125, 2, acc, seed, layer=1, step=step, tau=tau)
        accs.append(acc)
    ref = torch.zeros_like(accs[0])
    decode_attention_ref(q, slots, 0.125, 2, ref, seed, layer=1, step=5, tau=1.25)
    assert_close(accs[0], ref, torch.float32, "scores with int step")
    assert_close(accs[1], ref, torch.float32, "scores with tensor step/tau")
    assert (accs[2] - accs[0]).abs().max() > 1e-3, "Keyformer noise did not change with the step"


def test_per_sequence_step_and_tau(device):
    """step / tau with one value per sequence (continuous batching: rows at different steps) == each row decoded
    with its own numbers; the kernel and the reference agree, and a wrong-length tensor is refused."""
    gen = torch.Generator().manual_seed(3)
    B, H, D, cs, cw = 3, 2, 64, 64, 16
    slots = make_slots(B, H, D, cs, cw, "channel", 2, 32, torch.float32, device, [64, 30, 50], [50, 30, 40], gen)
    q = torch.randn(B, 2 * H, D, generator=gen).to(device)
    seed = torch.tensor([11, 12, 13], device=device)
    steps, taus = [4, 9, 1], [1.5, 1.25, 1.0]
    step_t = torch.tensor(steps, dtype=torch.int32, device=device)
    tau_t = torch.tensor(taus, dtype=torch.float32, device=device)
    got = torch.zeros(B, H, cs + cw, device=device)
    decode_attention(q, slots, 0.125, 2, got, seed, layer=2, step=step_t, tau=tau_t)
    ref = torch.zeros_like(got)
    decode_attention_ref(q, slots, 0.125, 2, ref, seed, layer=2, step=step_t, tau=tau_t)
    assert_close(got, ref, torch.float32, "per-sequence step/tau")
    for b in range(B):  # row b as if the batch were at row b's step and temperature
        one = torch.zeros_like(got)
        decode_attention_ref(q, slots, 0.125, 2, one, seed, layer=2, step=steps[b], tau=taus[b])
        assert_close(got[b], one[b], torch.float32, f"row {b}")
    with pytest.raises(ValueError, match="step as a tensor must hold 1 or B=3"):
        decode_attention(q, slots, 0.125, 2, got, seed, layer=2, step=step_t[:2], tau=tau_t)


def test_rejects_bad_inputs(device):
    gen = torch.Generator().manual_seed(0)
    slots = make_slots(1, 2, 64, 32, 8, "channel", 2, 32, torch.float32, device, [10], [10], gen)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(torch.randn(1, 2, 48, device=device), slots, 1.0)
    with pytest.raises(ValueError, match="scores_acc"):
        decode_attention(torch.randn(1, 2, 64, device=device), slots, 1.0, 1, torch.zeros(1, 2, 5, device=device))
    slots.bits = 3
    with pytest.raises(ValueError, match="bits"):
        decode_attention(torch.randn(1, 2, 64, device=device), slots, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("qt", [False, True])
def test_cuda_graph_capture_with_workspace(qt, device):
    """With a workspace and device step/tau, a Keyformer decode step captures in a CUDA graph; a replay after
    changing the step tensor and q in place equals the reference at the new step and q (the GQA kernel with q
    read directly and from the heads-last copy the step makes)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, D, cs, cw = 2, 2, 64, 96, 16
    slots = make_slots(B, H, D, cs, cw, "channel", 2, 32, torch.bfloat16, device, [96, 40], [90, 33], gen)
    q = torch.randn(B, 4 * H, D, generator=gen).to(torch.bfloat16).to(device)
    seed = torch.tensor([5, 6], device=device)
    step = torch.tensor([3], dtype=torch.int32, device=device)
    tau = torch.tensor([1.5], device=device)
    acc = torch.zeros(B, H, cs + cw, device=device)
    ws = decode_workspace(q, slots, 2, qt=qt)
    decode_attention(q, slots, 0.125, 2, acc, seed, 1, step, tau, workspace=ws)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, slots, 0.125, 2, acc, seed, 1, step, tau, workspace=ws)
    acc.zero_()
    step.fill_(8)
    q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    ref_acc = torch.zeros_like(acc)
    ref = decode_attention_ref(q, slots, 0.125, 2, ref_acc, seed, 1, 8, 1.5)
    assert_close(out, ref, torch.bfloat16, "graph-replayed output")
    assert_close(acc, ref_acc, torch.bfloat16, "graph-replayed Keyformer scores")


def test_kivi_cc_selection(device):
    """The CUDA-core KIVI stage 1s (kernels/decode_kivi_cc.py for one query head per KV head, decode_kivi_gqa.py for
    a few) are the default only where they fit (per-channel KIVI, head_dim >= 4 codes per word, contiguous value
    code rows, GQA groups within the register budget); elsewhere the other stage 1 runs and gives the reference's
    answer, and asking for them anyway is a clear error."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)

    def check(slots, q, want_cc, fits=None):
        ws = decode_workspace(q, slots, 0, num_splits=2)
        assert ws.kivi_cc == want_cc
        out = decode_attention(q, slots, q.shape[-1] ** -0.5, workspace=ws)
        tol = torch.bfloat16 if torch.bfloat16 in (q.dtype, slots.win_k.dtype) else q.dtype
        assert_close(out, decode_attention_ref(q, slots, q.shape[-1] ** -0.5), tol, f"cc={want_cc}")
        if fits or (fits is None and want_cc):
            assert decode_workspace(q, slots, 0, kivi_cc=True).kivi_cc
        else:
            with pytest.raises(ValueError, match="kivi_cc"):
                decode_workspace(q, slots, 0, kivi_cc=True)

    mha = make_slots(2, 2, 64, 64, 8, "channel", 2, 32, torch.float32, device, [64, 20], [60, 20], gen)
    check(mha, torch.randn(2, 2, 64, generator=gen).to(device), True)
    # fp16x2 sums: the CUDA-core kernels' default for half-precision queries only, and only a mode of theirs
    assert not decode_workspace(torch.zeros(2, 2, 64, device=device), mha, 0).h2
    assert decode_workspace(torch.zeros(2, 2, 64, device=device, dtype=torch.bfloat16), mha, 0).h2
    assert decode_workspace(torch.zeros(2, 4, 64, device=device, dtype=torch.float16), mha, 0, kivi_cc=True).h2
    assert not decode_workspace(torch.zeros(2, 2, 64, device=device, dtype=torch.bfloat16), mha, 0, kivi_cc=False).h2
    with pytest.raises(ValueError, match="h2"):
        decode_workspace(torch.zeros(2, 2, 64, device=device, dtype=torch.bfloat16), mha, 0, kivi_cc=False, h2=True)
    assert not decode_workspace(torch.zeros(2, 2, 64, device=device), mha, 0, kivi_tc=False).kivi_cc
    # L2 prefetch: on by default with the CUDA-core kernels only; a count of tiles
    assert decode_workspace(torch.zeros(2, 2, 64, device=device), mha, 0).prefetch == PREFETCH_TILES > 0
    assert decode_workspace(torch.zeros(2, 2, 64, device=device), mha, 0, kivi_cc=False).prefetch == 0
    for bad in (dict(kivi_cc=False, prefetch=1), dict(prefetch=-1)):
        with pytest.raises(ValueError, match="prefetch"):
            decode_workspace(torch.zeros(2, 2, 64, device=device), mha, 0, **bad)
    # 2 query heads per KV head: decode_kivi_gqa, q heads-last (qt) by Triton version, asked for either way
    check(mha, torch.randn(2, 4, 64, generator=gen).to(device), True)
    q4 = torch.zeros(2, 4, 64, device=device)
    assert (decode_workspace(q4, mha, 0).q_t is not None) == qt_default()
    assert decode_workspace(q4, mha, 0, qt=True).q_t.shape == (2, 2, 64, 2)
    assert decode_workspace(q4, mha, 0, qt=False).q_t is None
    for bad in (dict(kivi_cc=False, qt=True), dict(qt=True, q=torch.zeros(2, 2, 64, device=device))):
        with pytest.raises(ValueError, match="qt"):
            decode_workspace(bad.pop("q", q4), mha, 0, **bad)
    check(mha, torch.randn(2, 16, 64, generator=gen).to(device), False)  # 8 heads * 16 codes per word > 64
    # 4 bits with GQA: the same, with fp16x2 sums for bf16
    mha4 = make_slots(2, 2, 64, 64, 8, "channel", 4, 32, torch.bfloat16, device, [64, 20], [60, 20], gen)
    check(mha4, torch.randn(2, 4, 64, generator=gen).to(torch.bfloat16).to(device), True)
    assert decode_workspace(torch.zeros(2, 4, 64, device=device, dtype=torch.bfloat16), mha4, 0, kivi_cc=True).h2
    narrow = make_slots(2, 2, 32, 64, 8, "channel", 2, 32, torch.float32, device, [64, 20], [60, 20], gen)
    check(narrow, torch.randn(2, 2, 32, generator=gen).to(device), False)  # 2 value words per token < 4 lanes
    wide = torch.zeros(*mha.s_vc.shape[:3], 2 * mha.s_vc.shape[3], dtype=mha.s_vc.dtype, device=device)
    wide[..., :mha.s_vc.shape[3]] = mha.s_vc
    mha.s_vc = wide[..., :mha.s_vc.shape[3]]  # value code rows with a gap between them
    check(mha, torch.randn(2, 2, 64, generator=gen).to(device), False)


@triton.jit
def _lines(off_ptr, ok_ptr, row0, rows_valid, stride, NROWS: tl.constexpr, ROW: tl.constexpr, EPL: tl.constexpr,
           NL: tl.constexpr):
    off, ok = line_offsets(row0, rows_valid, NROWS, ROW, stride, EPL)
    tl.store(off_ptr + tl.arange(0, NL), off)
    tl.store(ok_ptr + tl.arange(0, NL), ok.to(tl.int32))


@pytest.mark.parametrize("nrows,row,stride,epl,row0,rows_valid", [
    (16, 128, 128, 32, 3, 1000),  # key code rows: 4 lines per row, all rows in range
    (256, 8, 8, 32, 10, 200),  # value code rows of 8 words: 4 rows per line, the tile's end past rows_valid
    (256, 4, 4, 64, 0, 256),  # value scale rows (bf16, 4 groups): 16 rows per line
    (2, 128, 128, 64, 7, 8),  # key scale rows: the second row past rows_valid
    (1, 4, 4, 64, 5, 9),  # a span shorter than one line
])
def test_prefetch_lines_cover_the_tile(nrows, row, stride, epl, row0, rows_valid, device):
    """`triton_util.line_offsets` (the L2 prefetch's addresses): over contiguous rows, one element in every line the
    rows [row0, min(row0 + nrows, rows_valid)) touch, and none in a row at or past rows_valid."""
    nl = max(1, nrows * row // epl)
    off = torch.full((nl,), -1, dtype=torch.int64, device=device)
    ok = torch.full((nl,), -1, dtype=torch.int32, device=device)
    _lines[(1,)](off, ok, row0, rows_valid, stride, NROWS=nrows, ROW=row, EPL=epl, NL=nl)
    off, ok = off.cpu(), ok.cpu().bool()
    hi = min(row0 + nrows, rows_valid)
    want = set(range(row0 * stride // epl, (hi * stride + epl - 1) // epl)) if hi > row0 else set()
    assert {int(o) // epl for o in off[ok]} == want
    assert bool(((off[ok] // stride) < rows_valid).all())
    assert not bool(((off[~ok] // stride) < rows_valid).any())
