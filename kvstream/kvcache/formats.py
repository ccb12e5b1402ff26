"""Storage formats of the kept store: one registry instead of the quant names mapped in several places.

A format says how kept tokens are held (DESIGN.md, "Storage"):
- `none`: the model dtype.
- `fp8`: e4m3 codes (uint8 bit patterns) with one float32 scale per (sequence, KV head) for keys and one for values,
  amax / 448 of the prompt's keys / values, set at prefill; later tokens saturate at +-448 x scale
  (`kvstream.kernels.fp8_quant_ref`). What vLLM, SGLang and TensorRT-LLM store by default: the compressed
  baseline. No groups, no residual: every policy (`full` included) uses the evict mode.
- `kivi2`, `kivi4` (KIVI, arXiv 2402.02750): keys per channel (groups of G token slots within a channel), values per
  token (groups of G channels), asymmetric min/max codes of `bits` bits; with policy `full`, KIVI's own residual
  rules (keys flushed R at a time, values leave a FIFO of R).
- `token2`: keys and values per token at 2 bits, no residual: the naive control for KIVI's per-channel keys.

`layout` is what the kernels read (`kvstream.kernels.slots.KVSlots.quant`): "none" | "fp8" | "channel" | "token".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageFormat:
    name: str
    layout: str  # "none" | "fp8" | "channel" (per-channel keys) | "token" (per-token keys); KIVI values per token
    bits: int | None  # code width, None for the model dtype
    kivi_residual: bool  # policy `full` follows KIVI's residual rules (else every policy uses the evict mode)
    summary: str

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def grouped(self) -> bool:
        """KIVI-style codes: groups of group_size, 32 // bits codes per int32 (group_size must divide head_dim)."""
        return self.layout in ("channel", "token")

    def codes_per_word(self) -> int:
        """Codes packed into one int32 (P); 1 for the model dtype."""
        return 32 // self.bits if self.bits else 1


FORMATS: dict[str, StorageFormat] = {}


def register(fmt: StorageFormat) -> StorageFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"storage format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


register(StorageFormat("none", "none", None, False, "the model dtype (fp16 / bf16 / fp32)"))
register(StorageFormat("fp8", "fp8", 8, False, "e4m3 with one scale per (sequence, KV head), as vLLM / SGLang"))
register(StorageFormat("kivi2", "channel", 2, True, "KIVI 2-bit: per-channel keys, per-token values, fp residual"))
register(StorageFormat("kivi4", "channel", 4, True, "KIVI 4-bit: per-channel keys, per-token values, fp residual"))
register(StorageFormat("token2", "token", 2, False, "2-bit per-token keys and values, no residual (control)"))


def get_format(name: str) -> StorageFormat:
    """The registered format `name`; an unknown name is a ValueError that lists the valid ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown storage format (CacheConfig.quant) {name!r}; valid: {', '.join(FORMATS)}") from None
