"""Torch reference of prefill score accumulation for Keyformer / H2O, chunked over query rows.

For each key token j: sum over causal valid query rows i >= j (and over the query heads sharing j's KV head) of
softmax_j((q_i . k_j * scale + g_ij) / tau), the softmax over the valid keys j' <= i. g = 0, tau = 1 for H2O.
g_ij = `kernels.gumbel_ref.gumbel(seed[b], layer, 0, q_head, pos_i, pos_j)` with pos the unpadded positions.
Never holds more than `chunk` query rows of the n x n matrix.
"""

from __future__ import annotations

import torch

from kvstream.kernels.gumbel_ref import gumbel


def prefill_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    tau: float = 1.0,
    noise: bool = False,
    seed: torch.Tensor | None = None,
    layer: int = 0,
    chunk: int = 512,
    row_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, Hq, T, D), k (B, H, T, D), valid (B, T) bool (left-padded tokens False) -> (B, H, T) float32.

    row_lse (B, Hq, T) float32, tau 1 only: each row's log-sum-exp of its allowed plain logits, as the attention
    computed it. H2O (noise False): the softmax is exp(x - row_lse) (what the Triton kernel does with it).
    Keyformer: the Triton kernel's stabilizer only, which changes no score; ignored here.
    """
    if row_lse is not None and tau != 1.0:
        raise ValueError(f"prefill_scores: row_lse is the plain attention's log-sum-exp; it needs tau=1, got {tau}")
    if noise:
        row_lse = None
    B, Hq, T, D = q.shape
    H = k.shape[1]
    grp = Hq // H
    pos = valid.long().cumsum(-1) - 1  # (B, T) unpadded positions
    kf = k.float()
    out = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    heads = torch.arange(Hq, device=q.device).view(1, H, grp, 1, 1)
    for i0 in range(0, T, chunk):
        i1 = min(T, i0 + chunk)
        qc = q[:, :, i0:i1].float().view(B, H, grp, i1 - i0, D)
        x = torch.einsum("bhgid,bhjd->bhgij", qc, kf) * scale  # (B, H, grp, c, T)
        rows = torch.arange(i0, i1, device=q.device)
        allowed = (torch.arange(T, device=q.device).view(1, -1) <= rows.view(-1, 1))  # (c, T) causal
        allowed = allowed[None] & valid[:, None, :] & valid[:, i0:i1, None]  # (B, c, T)
        if noise:
            g = gumbel(seed.view(B, 1, 1, 1, 1), layer, 0, heads,
                       pos[:, i0:i1].view(B, 1, 1, -1, 1), pos.view(B, 1, 1, 1, T))
            x = (x + g) / tau
        elif tau != 1.0:
            x = x / tau
        x = x.masked_fill(~allowed[:, None, None], float("-inf"))
        if row_lse is None:
            p = torch.softmax(x, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
        else:
            lse = row_lse[:, :, i0:i1].float().view(B, H, grp, i1 - i0, 1)
            p = torch.where(allowed[:, None, None], torch.exp(x - lse), 0.0)
        out += p.sum(dim=(2, 3))
    return out
