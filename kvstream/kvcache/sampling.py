"""Sampling on the device, per row, without a host sync: greedy, temperature and top-p.

A sampled token is the Gumbel-max of the row's (temperature-scaled, top-p-filtered) logits with counter-based
noise `gumbel(seed, SAMPLE_LAYER, step, 0, 0, token)` (`kvstream.kernels.gumbel_ref`, the hash the Keyformer
kernels use): an exact draw from the categorical distribution, fixed by (the row's seed, the step), so a row's
output never depends on its batch-mates or on the order rows run in, and the same seed gives the same tokens.
Rows with temperature 0 take the argmax. Every argument is a tensor, so a captured step serves any mix of rows.
"""

from __future__ import annotations

import torch

from kvstream.kernels.gumbel_ref import gumbel

SAMPLE_LAYER = 0x5A4D  # the noise's "layer" coordinate: draws for sampling never reuse a Keyformer layer's stream


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
           step: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float32; temperature, top_p (B,) float32 (temperature 0: greedy; top_p in (0, 1]);
    seeds (B,) int64; step (1,) or (B,) int (the index of the token being drawn) -> tokens (B,) int64."""
    B, V = logits.shape
    greedy = logits.argmax(-1)
    x = logits / temperature.clamp(min=1e-6).view(B, 1)
    # top-p: keep the smallest set of most likely tokens whose mass reaches top_p (the most likely always stays)
    srt, idx = x.sort(-1, descending=True)
    p = torch.softmax(srt, -1)
    drop_sorted = ((p.cumsum(-1) - p) >= top_p.view(B, 1)) & (top_p.view(B, 1) < 1)
    drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
    x = x.masked_fill(drop, float("-inf"))
    g = gumbel(seeds.view(B, 1), SAMPLE_LAYER, step.view(-1, 1), 0, 0, torch.arange(V, device=logits.device))
    drawn = (x + g).argmax(-1)
    return torch.where(temperature > 0, drawn, greedy)
