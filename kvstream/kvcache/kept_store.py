"""The kept store S of one layer: older tokens that stay, in the model dtype, as fp8 (e4m3) codes or KIVI-packed.

Layouts are those of `kernels.kivi_quant_ref` (P = 32 // bits codes per int32, G the group size):
- quant "none":    s_k, s_v (B, H, Cs, D) model dtype
- quant "fp8":     s_k, s_v (B, H, Cs, D) uint8 e4m3 codes, s_ks / s_vs (B, H, 1) float32: one key and one value
                   scale per (sequence, KV head), from the prompt's amax at prefill (`set_scales`), then fixed
                   (`kernels.fp8_quant_ref`: tokens written later saturate at +-448 x scale)
- quant "channel": keys per channel (KIVI): s_kc (B, H, Cs // P, D) int32, s_ks / s_km (B, H, Cs // G, D);
                   values per token: s_vc (B, H, Cs, ceil(D / P)) int32, s_vs / s_vm (B, H, Cs, D // G)
- quant "token":   keys per token like values (`token2`)
plus s_pos (B, H, Cs) int32: the position each slot holds (-1 where empty).

Decode steps write into it through `kvstream.kernels.evict_write` / `kivi_residual` (predicated device kernels and
their torch references): a key written into a per-channel store re-quantizes the span of `unit` = max(G, P) slots
around it (whole groups and whole words) from its dequantized members and the new key (min/max over the slots in
use), so tokens already there are re-rounded only where a group's range changes.
"""

from __future__ import annotations

import torch

from kvstream.kernels import fp8_quant_ref
from kvstream.kernels.kivi_quant_ref import quantize_keys, quantize_values


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class KeptStore:
    """backend: "triton" quantizes the prompt at prefill with the Triton quantizers, straight into the store
    (the same codes as the torch references, which the "torch" backend uses)."""

    def __init__(self, quant: str, bits: int, group_size: int, B: int, H: int, D: int, dtype, device, cs: int,
                 backend: str = "torch"):
        self.quant, self.bits, self.G, self.backend = quant, bits, group_size, backend
        self.B, self.H, self.D, self.dtype, self.device = B, H, D, dtype, device
        self.unit = max(group_size, 32 // bits) if quant == "channel" else 1
        self.cs = round_up(cs, self.unit)
        self.S = self._alloc(self.cs)
        self.s_pos = torch.full((B, H, self.cs), -1, dtype=torch.int32, device=device)

    def _alloc(self, cs: int) -> dict[str, torch.Tensor]:
        B, H, D, dt, dev = self.B, self.H, self.D, self.dtype, self.device
        z = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        if self.quant == "none":
            return {"s_k": z(B, H, cs, D), "s_v": z(B, H, cs, D)}
        if self.quant == "fp8":  # scales (B, H, 1): slot copies and growth treat them like the slot tensors
            one = lambda: torch.ones(B, H, 1, dtype=torch.float32, device=dev)  # noqa: E731
            return {"s_k": z(B, H, cs, D, dtype=torch.uint8), "s_v": z(B, H, cs, D, dtype=torch.uint8),
                    "s_ks": one(), "s_vs": one()}
        P, G = 32 // self.bits, self.G
        wd = -(-D // P)  # words per token along channels
        t = {"s_vc": z(B, H, cs, wd, dtype=torch.int32), "s_vs": z(B, H, cs, D // G), "s_vm": z(B, H, cs, D // G)}
        if self.quant == "channel":
            t.update(s_kc=z(B, H, cs // P, D, dtype=torch.int32), s_ks=z(B, H, cs // G, D), s_km=z(B, H, cs // G, D))
        else:
            t.update(s_kc=z(B, H, cs, wd, dtype=torch.int32), s_ks=z(B, H, cs, D // G), s_km=z(B, H, cs, D // G))
        return t

    def grow(self, need: int, step: int) -> int:
        """Enlarge to at least `need` slots (by at least `step`); returns the new capacity."""
        new_cs = round_up(max(need, self.cs + step), self.unit)
        old = self.S
        self.S = self._alloc(new_cs)
        for name, t in old.items():
            self.S[name][:, :, : t.shape[2]] = t
        s_pos = torch.full((self.B, self.H, new_cs), -1, dtype=torch.int32, device=self.device)
        s_pos[:, :, : self.cs] = self.s_pos
        self.s_pos, self.cs = s_pos, new_cs
        return new_cs

    def tensors(self) -> list[torch.Tensor]:
        return [self.s_pos, *self.S.values()]

    # ---- writes ----------------------------------------------------------------------------------------------
    def set_scales(self, k_amax: torch.Tensor, v_amax: torch.Tensor) -> None:
        """fp8: the key and value scales of every (sequence, KV head) from the prompt's largest |k| and |v|
        (B, H) (amax / 448, floored; `kernels.fp8_quant_ref.fp8_scale`). Before `encode_all`."""
        self.S["s_ks"].copy_(fp8_quant_ref.fp8_scale(k_amax).unsqueeze(-1))
        self.S["s_vs"].copy_(fp8_quant_ref.fp8_scale(v_amax).unsqueeze(-1))

    def encode_all(self, ks: torch.Tensor, vs: torch.Tensor, k_valid: torch.Tensor) -> None:
        """Fill the store from full-precision (B, H, Cs, D) tensors; k_valid (B, H, Cs) marks slots in use."""
        if self.quant == "none":
            self.S["s_k"].copy_(ks)
            self.S["s_v"].copy_(vs)
            return
        if self.cs == 0:
            return
        if self.quant == "fp8":  # empty slots encode zeros
            if self.backend == "triton":
                from kvstream.kernels.fp8_quant import fp8_encode
            else:
                fp8_encode = fp8_quant_ref.fp8_encode
            for x, codes, scale in ((ks, "s_k", "s_ks"), (vs, "s_v", "s_vs")):
                self.S[codes].copy_(fp8_encode(x.contiguous(), self.S[scale].unsqueeze(-1)))
            return
        if self.backend == "triton":
            from kvstream.kernels.kivi_quant import quantize_keys_into, quantize_values_into

            S, b, G = self.S, self.bits, self.G
            if self.quant == "channel":
                quantize_keys_into(ks, S["s_kc"], S["s_ks"], S["s_km"], b, G, self.cs, valid=k_valid)
            else:
                quantize_values_into(ks, S["s_kc"], S["s_ks"], S["s_km"], b, G, self.cs)
            quantize_values_into(vs, S["s_vc"], S["s_vs"], S["s_vm"], b, G, self.cs)
            return
        if self.quant == "channel":
            kc, ksc, kmn = quantize_keys(ks, self.bits, self.G, valid=k_valid)
        else:
            kc, ksc, kmn = quantize_values(ks, self.bits, self.G)
        vc, vsc, vmn = quantize_values(vs, self.bits, self.G)
        for name, t in zip(("s_kc", "s_ks", "s_km", "s_vc", "s_vs", "s_vm"), (kc, ksc, kmn, vc, vsc, vmn)):
            self.S[name].copy_(t)
