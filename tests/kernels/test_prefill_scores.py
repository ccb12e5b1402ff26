"""Prefill score accumulation (kernels/prefill_scores.py) against prefill_scores_ref."""

from __future__ import annotations

import pytest
import torch

import kvstream.kernels.prefill_scores as prefill_mod
from kvstream.kernels.prefill_scores import prefill_scores
from kvstream.kernels.prefill_scores_ref import prefill_scores_ref
from tests.kernels.kernel_cases import assert_close

# (dtype, D, grp, H, T, unpadded lengths (left padding), noise, tau)
CASES = [
    (torch.float32, 64, 1, 2, 77, [77, 3], True, 1.0),
    (torch.float32, 64, 4, 1, 70, [70, 41], False, 1.0),
    (torch.bfloat16, 128, 8, 1, 37, [1, 37], True, 1.5),
    (torch.float32, 64, 1, 1, 100, [90], False, 2.0),
    (torch.float16, 64, 4, 1, 45, [45, 20], True, 1.3),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{str(c[0])[6:]}-D{c[1]}-grp{c[2]}-T{c[4]}-noise{c[6]}" for c in CASES])
def test_prefill_scores_match_reference(case, device):
    dtype, D, grp, H, T, lens, noise, tau = case
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B = len(lens)
    q = torch.randn(B, H * grp, T, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, H, T, D, generator=gen).to(dtype).to(device)
    valid = (torch.arange(T).view(1, T) >= (T - torch.tensor(lens)).view(B, 1)).to(device)
    seed = torch.randint(0, 2**40, (B,), generator=gen).to(device)
    out = prefill_scores(q, k, valid, D ** -0.5, tau, noise, seed, layer=2)
    ref = prefill_scores_ref(q, k, valid, D ** -0.5, tau, noise, seed, layer=2, chunk=32)
    assert_close(out, ref, torch.float32 if dtype == torch.float32 else dtype, "prefill scores")
    assert torch.all(out[~valid[:, None, :].expand_as(out)] == 0), "a padding token got a score"
    # each valid query row spreads probability 1 over its keys: the scores sum to (#valid rows) x grp per KV head
    torch.testing.assert_close(out.sum(-1).cpu(), (valid.sum(-1, keepdim=True) * grp).float().expand(B, H).cpu(),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("noise,tau", [(False, 1.0), (True, 1.4), (True, 1.0)])  # tau 1: noise as a weight
def test_prefill_unmasked_interior_tiles(noise, tau, device, monkeypatch):
    """16 x 16 tiles, so most tiles lie strictly below the diagonal and take the unmasked path: rows with prefix
    padding (those tiles skip the mask), a row with a hole in the middle and a right-padded row (never the
    unmasked path: padding that is not a prefix) all match the reference, two passes and with the LSE."""
    for cfg in (prefill_mod.CONFIG, prefill_mod.NOISE_CONFIG):
        monkeypatch.setitem(cfg, "block_m", 16)
        monkeypatch.setitem(cfg, "block_n", 16)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, grp, T, D = 4, 1, 2, 83, 32
    q = torch.randn(B, H * grp, T, D, generator=gen).to(device)
    k = torch.randn(B, H, T, D, generator=gen).to(device)
    t = torch.arange(T)
    valid = torch.stack([t >= 0, t >= 21, (t < 30) | (t >= 47), t < 60]).to(device)
    seed = torch.randint(0, 2**40, (B,), generator=gen).to(device)
    out = prefill_scores(q, k, valid, D ** -0.5, tau, noise, seed, layer=1)
    ref = prefill_scores_ref(q, k, valid, D ** -0.5, tau, noise, seed, layer=1)
    assert_close(out, ref, torch.float32, "prefill scores, 16 x 16 tiles")
    if tau == 1.0:  # H2O: the LSE is the normalizer; Keyformer: pass 1's stabilizer
        x = torch.einsum("bhid,bhjd->bhij", q.cpu(), k.cpu().repeat_interleave(grp, 1)) * D ** -0.5
        allowed = torch.ones(T, T).tril().bool()[None] & valid.cpu()[:, None, :] & valid.cpu()[:, :, None]
        lse = x.masked_fill(~allowed[:, None], float("-inf")).logsumexp(-1).to(device)
        with_lse = prefill_scores(q, k, valid, D ** -0.5, tau, noise, seed, layer=1, row_lse=lse)
        assert_close(with_lse, ref, torch.float32, "with the LSE")


@pytest.mark.parametrize("grp", [1, 4])
def test_prefill_h2o_with_attention_lse(grp, device):
    """H2O scores with the attention's row log-sum-exp given (pass 1 skipped) == the two-pass scores, for the
    kernel and the reference; a wrong normalizer shows (so the given LSE is really used)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, T, D = 2, 2, 75, 64
    q = torch.randn(B, H * grp, T, D, generator=gen).to(device)
    k = torch.randn(B, H, T, D, generator=gen).to(device)
    valid = (torch.arange(T).view(1, T) >= torch.tensor([0, 20]).view(B, 1)).to(device)
    x = torch.einsum("bhid,bhjd->bhij", q.cpu(), k.cpu().repeat_interleave(grp, 1)) * D ** -0.5
    allowed = torch.ones(T, T).tril().bool()[None] & valid.cpu()[:, None, :] & valid.cpu()[:, :, None]
    lse = x.masked_fill(~allowed[:, None], float("-inf")).logsumexp(-1).to(device)  # -inf on padding rows
    ref = prefill_scores_ref(q, k, valid, D ** -0.5)
    assert_close(prefill_scores_ref(q, k, valid, D ** -0.5, row_lse=lse), ref, torch.float32, "reference with LSE")
    assert_close(prefill_scores(q, k, valid, D ** -0.5, row_lse=lse), ref, torch.float32, "kernel with LSE")
    off = prefill_scores(q, k, valid, D ** -0.5, row_lse=lse + 0.5)
    assert not torch.allclose(off, ref, rtol=1e-2), "the kernel ignored row_lse"
    with pytest.raises(ValueError, match="row_lse"):
        prefill_scores(q, k, valid, D ** -0.5, tau=1.5, noise=True,
                       seed=torch.zeros(B, dtype=torch.int64, device=device), row_lse=lse)
    with pytest.raises(ValueError, match=r"row_lse must be \(B, Hq, T\)"):
        prefill_scores(q, k, valid, D ** -0.5, row_lse=lse[:, :, :-1])


@pytest.mark.parametrize("grp", [1, 4])
def test_prefill_keyformer_with_the_attention_lse_as_stabilizer(grp, device):
    """Keyformer at tau 1 with the plain attention's LSE given: pass 1 takes it as its stabilizer instead of a
    running max; the scores equal the reference's and the kernel's own without it, whatever stabilizer >= the row
    max is given (lse + 3); one far below the row max overflows pass 1 (so the given LSE is really used)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, T, D = 2, 2, 75, 64
    q = (2 * torch.randn(B, H * grp, T, D, generator=gen)).to(device)
    k = torch.randn(B, H, T, D, generator=gen).to(device)
    valid = (torch.arange(T).view(1, T) >= torch.tensor([0, 20]).view(B, 1)).to(device)
    seed = torch.randint(0, 2**40, (B,), generator=gen).to(device)
    x = torch.einsum("bhid,bhjd->bhij", q.cpu(), k.cpu().repeat_interleave(grp, 1)) * D ** -0.5
    allowed = torch.ones(T, T).tril().bool()[None] & valid.cpu()[:, None, :] & valid.cpu()[:, :, None]
    lse = x.masked_fill(~allowed[:, None], float("-inf")).logsumexp(-1).to(device)  # -inf on padding rows
    ref = prefill_scores_ref(q, k, valid, D ** -0.5, 1.0, True, seed, layer=5)
    plain = prefill_scores(q, k, valid, D ** -0.5, 1.0, True, seed, layer=5)
    assert_close(prefill_scores_ref(q, k, valid, D ** -0.5, 1.0, True, seed, layer=5, row_lse=lse), ref,
                 torch.float32, "reference with LSE")
    assert_close(plain, ref, torch.float32, "kernel, running max")
    for shift in (0.0, 3.0):
        got = prefill_scores(q, k, valid, D ** -0.5, 1.0, True, seed, layer=5, row_lse=lse + shift)
        assert_close(got, ref, torch.float32, f"kernel with LSE + {shift}")
    low = prefill_scores(q, k, valid, D ** -0.5, 1.0, True, seed, layer=5, row_lse=lse - 120.0)
    assert not torch.allclose(low.nan_to_num(-1.0), ref, rtol=1e-2), "the kernel ignored row_lse"


def test_prefill_noise_depends_on_seed_and_layer(device):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = torch.randn(1, 2, 40, 64, generator=gen).to(device)
    k = torch.randn(1, 2, 40, 64, generator=gen).to(device)
    valid = torch.ones(1, 40, dtype=torch.bool, device=device)
    a = prefill_scores(q, k, valid, 0.125, 1.0, True, torch.tensor([1], device=device), layer=0)
    b = prefill_scores(q, k, valid, 0.125, 1.0, True, torch.tensor([1], device=device), layer=0)
    c = prefill_scores(q, k, valid, 0.125, 1.0, True, torch.tensor([2], device=device), layer=0)
    d = prefill_scores(q, k, valid, 0.125, 1.0, True, torch.tensor([1], device=device), layer=1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3 and (a - d).abs().max() > 1e-3


def test_prefill_rejects_bad_inputs(device):
    q = torch.randn(1, 2, 8, 64, device=device)
    with pytest.raises(ValueError, match="valid"):
        prefill_scores(q, q, torch.ones(1, 9, dtype=torch.bool, device=device), 1.0)
    with pytest.raises(ValueError, match="seed"):
        prefill_scores(q, q, torch.ones(1, 8, dtype=torch.bool, device=device), 1.0, noise=True)
