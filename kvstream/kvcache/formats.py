"""Storage formats of the kept store: one registry instead of the quant names mapped in several places.

A format says how kept tokens are held (DESIGN.md, "Storage"):
- `none`: the model dtype.
- `kivi2`, `kivi4` (KIVI, arXiv 2402.02750): keys per channel (groups of G token slots within a channel), values per
  token (groups of G channels), asymmetric min/max codes of `bits` bits; with policy `full`, KIVI's own residual
  rules (keys flushed R at a time, values leave a FIFO of R).
- `token2`: keys and values per token at 2 bits, no residual: the naive control for KIVI's per-channel keys.

`layout` is what the kernels read (`kvstream.kernels.slots.KVSlots.quant`): "none" | "channel" | "token".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageFormat:
    name: str
    layout: str  # "none" | "channel" (per-channel keys) | "token" (per-token keys); values per token when quantized
    bits: int | None  # code width, None for the model dtype
    kivi_residual: bool  # policy `full` follows KIVI's residual rules (else every policy uses the evict mode)
    summary: str

    @property
    def quantized(self) -> bool:
        return self.bits is not None

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
register(StorageFormat("kivi2", "channel", 2, True, "KIVI 2-bit: per-channel keys, per-token values, fp residual"))
register(StorageFormat("kivi4", "channel", 4, True, "KIVI 4-bit: per-channel keys, per-token values, fp residual"))
register(StorageFormat("token2", "token", 2, False, "2-bit per-token keys and values, no residual (control)"))


def get_format(name: str) -> StorageFormat:
    """The registered format `name`; an unknown name is a ValueError that lists the valid ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown storage format (CacheConfig.quant) {name!r}; valid: {', '.join(FORMATS)}") from None
