"""KVSlots: one layer's compressed KV storage, as the decode-attention kernels read it.

Two regions per (sequence b, KV head h):
- the kept store S of Cs slots, in the model dtype (quant "none"), as e4m3 codes with one scale per (sequence,
  KV head) for keys and one for values (quant "fp8", `kernels.fp8_quant_ref`) or quantized (KIVI layouts of
  `kernels.kivi_quant_ref`): slots [0, s_len[b]) hold tokens. Keys of all of them come from S; values of slots
  [0, sv_len[b]) come from S, values of slots [sv_len[b], s_len[b]) from the ring at index (slot % Cw)
  (KIVI's values leave the full-precision residual one token at a time, keys a block of R at a time, so a few
  tokens have a quantized key and a full-precision value; slot == position there).
- the full-precision ring W of Cw slots: ring slot r holds a token iff win_pos[b, r] >= win_lo[b]
  (win_pos is -1 where empty).
Score buffers cover S then W: index s for S slot s, Cs + r for ring slot r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVSlots:
    quant: str  # "none" | "fp8" | "channel" (KIVI per-channel keys) | "token" (token2 per-token keys)
    bits: int  # 2 or 4 (8 for "fp8", unused for "none")
    group_size: int
    s_len: torch.Tensor  # (B,) int32
    sv_len: torch.Tensor  # (B,) int32, <= s_len
    win_k: torch.Tensor  # (B, H, Cw, D) model dtype
    win_v: torch.Tensor  # (B, H, Cw, D)
    win_pos: torch.Tensor  # (B, Cw) int32, -1 = empty
    win_lo: torch.Tensor  # (B,) int32
    s_k: torch.Tensor | None = None  # quant none: (B, H, Cs, D) model dtype; fp8: (B, H, Cs, D) uint8 e4m3 codes
    s_v: torch.Tensor | None = None  # like s_k
    s_kc: torch.Tensor | None = None  # channel: (B, H, Cs//P, D) int32; token: (B, H, Cs, D//P) int32
    s_ks: torch.Tensor | None = None  # channel: (B, H, Cs//G, D); token: (B, H, Cs, D//G); fp8: (B, H, 1) float32
    s_km: torch.Tensor | None = None  # like s_ks (not fp8)
    s_vc: torch.Tensor | None = None  # (B, H, Cs, D//P) int32
    s_vs: torch.Tensor | None = None  # (B, H, Cs, D//G); fp8: (B, H, 1) float32
    s_vm: torch.Tensor | None = None  # like s_vs

    @property
    def cs(self) -> int:
        """Capacity of S in slots."""
        if self.quant in ("none", "fp8"):
            return 0 if self.s_k is None else self.s_k.shape[2]
        return self.s_vc.shape[2]

    @property
    def cw(self) -> int:
        return self.win_k.shape[2]
