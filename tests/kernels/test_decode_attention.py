"""Fused decode attention (kernels/decode_attention.py) against decode_attention_ref: outputs and scores."""

from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_workspace
from kernels.decode_attention_ref import decode_attention_ref, held_mask
from tests.kernels.kernel_cases import assert_close, make_slots

# (quant, bits, G, dtype, D, grp, H, Cs, Cw, s_len, sv_len, num_splits)  -- ragged: empty / tiny / full stores
CASES = [
    ("none", 0, 32, torch.float32, 64, 1, 2, 80, 24, [0, 5, 80], [0, 3, 71], 3),
    ("none", 0, 32, torch.bfloat16, 128, 4, 1, 70, 17, [70, 1], [70, 0], 2),
    ("channel", 2, 32, torch.float32, 64, 8, 1, 96, 20, [96, 33, 0], [90, 33, 0], 3),
    ("channel", 4, 64, torch.bfloat16, 128, 4, 2, 128, 9, [100, 64], [37, 64], 2),
    ("channel", 2, 16, torch.float32, 64, 1, 2, 48, 12, [47, 16], [40, 2], 1),
    ("channel", 4, 32, torch.bfloat16, 128, 1, 2, 96, 16, [96, 40], [80, 31], 2),
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
    for mode in (0, 1, 2):
        # score_mode 1 runs the other q.K / P.V path (tensor-core dot vs CUDA-core reduce) than the default
        use_dot = None if mode != 1 else not decode_workspace(q, slots, 0, num_splits=1).use_dot
        ws = decode_workspace(q, slots, mode, num_splits=splits, use_dot=use_dot)
        ws.out.fill_(float("nan"))
        ws.part_acc.fill_(float("nan"))
        if ws.logits is not None:
            ws.logits.fill_(float("nan"))
        acc0 = torch.rand(B, H, cs + cw, generator=gen).to(device)
        acc, acc_ref = acc0.clone(), acc0.clone()
        out = decode_attention(q, slots, scale, mode, acc, seed, layer=3, step=7, tau=1.6, workspace=ws)
        ref = decode_attention_ref(q, slots, scale, mode, acc_ref, seed, layer=3, step=7, tau=1.6)
        assert out.data_ptr() == ws.out.data_ptr()
        assert_close(out, ref, dtype, f"out (score_mode {mode})")
        if mode:
            assert_close(acc - acc0, acc_ref - acc0, dtype, f"scores (score_mode {mode})")
            free = ~held_mask(slots)[:, None, :].expand_as(acc)
            assert torch.equal(acc[free], acc0[free]), "a column that holds no token changed"


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
def test_cuda_graph_capture_with_workspace(device):
    """With a workspace and device step/tau, a Keyformer decode step captures in a CUDA graph; a replay after
    changing the step tensor equals the reference at the new step."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, D, cs, cw = 2, 2, 64, 96, 16
    slots = make_slots(B, H, D, cs, cw, "channel", 2, 32, torch.bfloat16, device, [96, 40], [90, 33], gen)
    q = torch.randn(B, 4 * H, D, generator=gen).to(torch.bfloat16).to(device)
    seed = torch.tensor([5, 6], device=device)
    step = torch.tensor([3], dtype=torch.int32, device=device)
    tau = torch.tensor([1.5], device=device)
    acc = torch.zeros(B, H, cs + cw, device=device)
    ws = decode_workspace(q, slots, 2)
    decode_attention(q, slots, 0.125, 2, acc, seed, 1, step, tau, workspace=ws)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, slots, 0.125, 2, acc, seed, 1, step, tau, workspace=ws)
    acc.zero_()
    step.fill_(8)
    graph.replay()
    torch.cuda.synchronize()
    ref_acc = torch.zeros_like(acc)
    ref = decode_attention_ref(q, slots, 0.125, 2, ref_acc, seed, 1, 8, 1.5)
    assert_close(out, ref, torch.bfloat16, "graph-replayed output")
    assert_close(acc, ref_acc, torch.bfloat16, "graph-replayed Keyformer scores")
