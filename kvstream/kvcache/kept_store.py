"""The kept store S of one layer: older tokens that stay, in the model dtype or KIVI-packed.

Layouts are those of `kernels.kivi_quant_ref` (P = 32 // bits codes per int32, G the group size):
- quant "none":    s_k, s_v (B, H, Cs, D) model dtype
- quant "channel": keys per channel (KIVI): s_kc (B, H, Cs // P, D) int32, s_ks / s_km (B, H, Cs // G, D);
                   values per token: s_vc (B, H, Cs, ceil(D / P)) int32, s_vs / s_vm (B, H, Cs, D // G)
- quant "token":   keys per token like values (`token2`)
plus s_pos (B, H, Cs) int32: the position each slot holds (-1 where empty).

Writes of single tokens go through gather / where / scatter, so a step never syncs with the host. A key written
into a per-channel store re-quantizes the span of `unit` = max(G, P) slots around it (whole groups and whole
words) from its dequantized members and the new key (min/max over the slots in use), so tokens already there
are re-rounded only where a group's range changes (widened by the new key, or narrowed by the evicted one).
"""

from __future__ import annotations

import torch

from kvstream.kernels.kivi_quant_ref import dequantize_keys, quantize_keys, quantize_values


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class KeptStore:
    """backend "triton": the predicated block writes (KIVI value exit, key flush) run as the Triton quantizers with
    device offsets (one launch each; sequences with nothing to write exit at once); "torch": the references."""

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
    def encode_all(self, ks: torch.Tensor, vs: torch.Tensor, k_valid: torch.Tensor) -> None:
        """Fill the store from full-precision (B, H, Cs, D) tensors; k_valid (B, H, Cs) marks slots in use."""
        if self.quant == "none":
            self.S["s_k"].copy_(ks)
            self.S["s_v"].copy_(vs)
            return
        if self.cs == 0:
            return
        if self.quant == "channel":
            kc, ksc, kmn = quantize_keys(ks, self.bits, self.G, valid=k_valid)
        else:
            kc, ksc, kmn = quantize_values(ks, self.bits, self.G)
        vc, vsc, vmn = quantize_values(vs, self.bits, self.G)
        for name, t in zip(("s_kc", "s_ks", "s_km", "s_vc", "s_vs", "s_vm"), (kc, ksc, kmn, vc, vsc, vmn)):
            self.S[name].copy_(t)

    def _put(self, name: str, idx: torch.Tensor, new: torch.Tensor, do: torch.Tensor) -> None:
        """buf[b, h, idx[b, h, i]] = new[b, h, i] where do[b, h]; idx (B, H, L), new (B, H, L, ...)."""
        buf = self.S[name] if name != "s_pos" else self.s_pos
        tail = buf.shape[3:]
        gidx = idx.view(*idx.shape, *([1] * len(tail))).expand(*idx.shape, *tail)
        old = buf.gather(2, gidx)
        mask = do.view(*do.shape, *([1] * (new.dim() - 2)))
        buf.scatter_(2, gidx, torch.where(mask, new.to(buf.dtype), old))

    def write_pos(self, slot: torch.Tensor, do: torch.Tensor, pos: torch.Tensor) -> None:
        """s_pos[b, h, slot[b, h]] = pos[b] where do[b, h]."""
        self._put("s_pos", slot.unsqueeze(-1), pos.view(-1, 1, 1).expand(-1, self.H, 1), do)

    def write_values(self, slot: torch.Tensor, do: torch.Tensor, v: torch.Tensor) -> None:
        """Value of one token per (b, h) into slot `slot` (B, H) where do (B, H); v (B, H, D)."""
        idx = slot.unsqueeze(-1)
        if self.quant == "none":
            self._put("s_v", idx, v.unsqueeze(2), do)
            return
        vc, vsc, vmn = quantize_values(v.unsqueeze(2), self.bits, self.G)
        for name, t in (("s_vc", vc), ("s_vs", vsc), ("s_vm", vmn)):
            self._put(name, idx, t, do)

    def write_values_from_ring(self, slot: torch.Tensor, do: torch.Tensor, ring_v: torch.Tensor) -> None:
        """KIVI value exit, predicated per sequence: the value at ring row slot[b] % Cw of ring_v (B, H, Cw, D)
        into S slot slot[b] where do[b] (slot (B,) int64, may be negative where not do)."""
        B, H, Cw, _ = ring_v.shape
        if self.backend == "triton" and self.quant != "none":
            from kvstream.kernels.kivi_quant import quantize_values_into

            dst = torch.where(do, slot, -1).to(torch.int32)
            quantize_values_into(ring_v, self.S["s_vc"], self.S["s_vs"], self.S["s_vm"], self.bits, self.G, 1,
                                 dst_start=dst, src_start=(slot % Cw).to(torch.int32))
            return
        slot = slot.clamp(min=0)
        bidx = torch.arange(B, device=ring_v.device)
        self.write_values(slot.view(B, 1).expand(B, H), do.view(B, 1).expand(B, H), ring_v[bidx, :, slot % Cw])

    def write_keys(self, slot: torch.Tensor, do: torch.Tensor, k: torch.Tensor, n_valid: torch.Tensor) -> None:
        """Key of one token per (b, h) into slot `slot` (B, H); n_valid (B,) slots in use after the write."""
        idx = slot.unsqueeze(-1)
        if self.quant == "none":
            self._put("s_k", idx, k.unsqueeze(2), do)
            return
        if self.quant == "token":
            kc, ksc, kmn = quantize_values(k.unsqueeze(2), self.bits, self.G)
            for name, t in (("s_kc", kc), ("s_ks", ksc), ("s_km", kmn)):
                self._put(name, idx, t, do)
            return
        L, P, G = self.unit, 32 // self.bits, self.G
        start = (slot // L) * L  # (B, H)
        members = start.unsqueeze(-1) + torch.arange(L, device=self.device)  # (B, H, L)
        widx = (start // P).unsqueeze(-1) + torch.arange(L // P, device=self.device)
        gidx = (start // G).unsqueeze(-1) + torch.arange(L // G, device=self.device)
        gat = lambda name, i: self.S[name].gather(2, i.unsqueeze(-1).expand(*i.shape, self.D))  # noqa: E731
        span = dequantize_keys(gat("s_kc", widx), gat("s_ks", gidx), gat("s_km", gidx), self.bits, G)
        hit = members == slot.unsqueeze(-1)
        span = torch.where(hit.unsqueeze(-1), k.unsqueeze(2).to(span.dtype), span)
        kc, ksc, kmn = quantize_keys(span, self.bits, G, valid=members < n_valid.view(-1, 1, 1))
        self._put("s_kc", widx, kc, do)
        self._put("s_ks", gidx, ksc, do)
        self._put("s_km", gidx, kmn, do)

    def write_key_blocks(self, start: torch.Tensor, do: torch.Tensor, k: torch.Tensor) -> None:
        """KIVI flush, predicated per sequence: quantize k (B, H, R, D) (R whole groups) into slots
        [start[b], start[b] + R) where do[b]; start (B,) a multiple of R; the rest stays as it was."""
        B, H, R, _ = k.shape
        P, G = 32 // self.bits, self.G
        hdo = do.view(B, 1).expand(B, H)
        ar = lambda n: torch.arange(n, device=self.device).view(1, 1, n).expand(B, H, n)  # noqa: E731
        if self.backend == "triton":
            from kvstream.kernels.kivi_quant import quantize_keys_into

            quantize_keys_into(k, self.S["s_kc"], self.S["s_ks"], self.S["s_km"], self.bits, G, R,
                               dst_start=torch.where(do, start, -1).to(torch.int32))
            start = torch.where(do, start, 0).to(torch.int64).view(B, 1, 1)
        else:
            kq, ksc, kmn = quantize_keys(k, self.bits, G)
            start = torch.where(do, start, 0).to(torch.int64).view(B, 1, 1)  # in range where nothing is done
            self._put("s_kc", start // P + ar(R // P), kq, hdo)
            self._put("s_ks", start // G + ar(R // G), ksc, hdo)
            self._put("s_km", start // G + ar(R // G), kmn, hdo)
        self._put("s_pos", start + ar(R), (start + ar(R)).to(torch.int32), hdo)
