"""CacheConfig: which tokens a compressed KV cache keeps (selection) and how it stores them (storage).

Semantics follow ../shared/DESIGN.md. Validates on construction; loads from omegaconf (`conf/cache/*.yaml`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kvstream.kvcache.formats import FORMATS, get_format

POLICIES = ("full", "window", "sink", "h2o", "keyformer")
QUANTS = tuple(FORMATS)  # the storage formats' registry (kvstream.kvcache.formats)
BACKENDS = ("auto", "torch", "triton")
ENGINES = ("auto", "fast", "hf")
GROUP_SIZES = (8, 16, 32, 64, 128)


def _choices_error(key: str, value: Any, valid: tuple[str, ...]) -> ValueError:
    return ValueError(f"CacheConfig.{key}={value!r} is not one of {', '.join(valid)}")


@dataclass
class CacheConfig:
    """A compressed KV cache's configuration.

    policy: which tokens stay. full | window | sink | h2o | keyformer.
    budget: a float in (0, 1] is a fraction of each sequence's own unpadded prompt length (k = floor(budget x n));
        an int >= 1 is an absolute token count. Ignored by `full`.
    recent_ratio: h2o/keyformer keep a recent window of w = floor(k x recent_ratio) tokens.
    tau_init, tau_end: Keyformer's temperature schedule tau_t = tau_init + t (tau_end - tau_init) / T.
    max_new_tokens: T of that schedule. `Engine` sets it from its own `max_new_tokens`; with a bare
        `model.generate`, set it to the same value (None uses 128 and warns once for keyformer).
    sink: the first `sink` tokens that the `sink` policy always keeps.
    quant: storage of kept tokens: none (model dtype) | fp8 (e4m3, one scale per sequence and KV head: the
        default of vLLM / SGLang / TensorRT-LLM) | kivi2 | kivi4 (KIVI) | token2 (naive per-token 2-bit keys and
        values with no full-precision residual: the control for KIVI's per-channel keys).
    group_size, residual: KIVI's G and R (R % G == 0); unused by none / fp8.
    seed: base seed of Keyformer's Gumbel noise; each sequence gets its own stream (see CompressedCache).
    backend: torch (reference, always available) | triton | auto (triton on CUDA, else torch).
    prefill_chunk: query rows per chunk when accumulating prefill scores (never an n x n matrix).
    engine: how `Engine.generate` decodes. fast: the static decode step of kvstream.kvcache.fast_decode (CUDA
        graph on CUDA, eager on CPU; Llama / Mistral / Qwen2 / Qwen3); hf: transformers' `model.generate` over
        CompressedCache (the reference path, any supported family); auto: fast where the model allows, else hf.
    """

    policy: str = "full"
    budget: float | int = 1.0
    recent_ratio: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    max_new_tokens: int | None = None
    sink: int = 4
    quant: str = "none"
    group_size: int = 32
    residual: int = 128
    seed: int = 0
    backend: str = "auto"
    prefill_chunk: int = 512
    engine: str = "auto"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.extra:
            raise ValueError(f"CacheConfig: unknown keys {sorted(self.extra)}; valid keys: {', '.join(self.field_names())}")
        if self.policy not in POLICIES:
            raise _choices_error("policy", self.policy, POLICIES)
        if self.quant not in FORMATS:
            raise _choices_error("quant", self.quant, tuple(FORMATS))
        if self.backend not in BACKENDS:
            raise _choices_error("backend", self.backend, BACKENDS)
        if self.engine not in ENGINES:
            raise _choices_error("engine", self.engine, ENGINES)
        self._check_budget()
        if not 0.0 <= float(self.recent_ratio) <= 1.0:
            raise ValueError(f"CacheConfig.recent_ratio={self.recent_ratio} must be in [0, 1]")
        if not (self.tau_init > 0 and self.tau_end > 0):
            raise ValueError(f"CacheConfig.tau_init={self.tau_init}, tau_end={self.tau_end}: both must be > 0")
        if self.max_new_tokens is not None and int(self.max_new_tokens) < 1:
            raise ValueError(f"CacheConfig.max_new_tokens={self.max_new_tokens} must be >= 1 (or None)")
        if int(self.sink) < 0:
            raise ValueError(f"CacheConfig.sink={self.sink} must be >= 0")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"CacheConfig.group_size={self.group_size} must be one of {GROUP_SIZES}")
        if self.residual <= 0 or self.residual % self.group_size != 0:
            raise ValueError(
                f"CacheConfig.residual={self.residual} must be a positive multiple of group_size={self.group_size}"
            )
        if self.format.grouped and self.residual % (32 // self.bits):
            raise ValueError(
                f"CacheConfig.residual={self.residual} must be a multiple of {32 // self.bits} at {self.bits} bits"
            )
        if self.prefill_chunk < 1:
            raise ValueError(f"CacheConfig.prefill_chunk={self.prefill_chunk} must be >= 1")
        if not -(2**31) <= int(self.seed) < 2**31:
            raise ValueError(f"CacheConfig.seed={self.seed} must fit in 32 bits")

    def _check_budget(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"CacheConfig.budget={b!r} must be a float in (0, 1] or an int token count")
        if isinstance(b, float) and b.is_integer() and b > 1:
            self.budget = b = int(b)
        if isinstance(b, float):
            if not 0.0 < b <= 1.0 or math.isnan(b):
                raise ValueError(f"CacheConfig.budget={b} as a fraction must be in (0, 1]; use an int for a token count")
        elif b < 1:
            raise ValueError(f"CacheConfig.budget={b} must be >= 1 token")
        elif self.policy == "sink" and b < self.sink + 1:
            raise ValueError(
                f"CacheConfig.budget={b} is smaller than sink ({self.sink}) + 1 recent token: raise budget or lower sink"
            )

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def format(self):
        """The storage format (kvstream.kvcache.formats.StorageFormat) named by `quant`."""
        return get_format(self.quant)

    @property
    def bits(self) -> int | None:
        return self.format.bits

    @property
    def kivi_residual(self) -> bool:
        """Policy full over a KIVI format: KIVI's own residual rules (see kvstream.kvcache.storage)."""
        return self.policy == "full" and self.format.kivi_residual

    @property
    def evicts(self) -> bool:
        return self.policy != "full"

    @property
    def scored(self) -> bool:
        """Whether the policy needs attention scores (h2o, keyformer)."""
        return self.policy in ("h2o", "keyformer")

    def token_budget(self, n: int) -> int:
        """Budget k of a sequence whose unpadded prompt holds n tokens (at least sink + 1 for `sink`, at least 1)."""
        if self.policy == "full":
            return 2**62
        k = int(math.floor(self.budget * n)) if isinstance(self.budget, float) else int(self.budget)
        floor_k = self.sink + 1 if self.policy == "sink" else 1
        return max(k, floor_k)

    def recent_window(self, k: int) -> int:
        """Recent window w of a budget k."""
        if self.policy == "full":
            return 0
        if self.policy == "window":
            return k
        if self.policy == "sink":
            return k - self.sink
        return int(math.floor(k * self.recent_ratio))

    def tau(self, step: int) -> float:
        """Keyformer temperature at decode step `step` (prefill is step 0)."""
        t_total = self.max_new_tokens or 128
        return self.tau_init + min(step, t_total) * (self.tau_end - self.tau_init) / t_total

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, d: Any) -> "CacheConfig":
        """Build from a dict or an omegaconf node; unknown keys are an error that lists the valid ones."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(d, DictConfig):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        d = dict(d or {})
        names = set(cls.field_names())
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_yaml(cls, path: str) -> "CacheConfig":
        from omegaconf import OmegaConf

        return cls.from_dict(OmegaConf.load(path))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.field_names()}


ENGINE_SETTINGS = {"gpu_memory_utilization": 0.9, "max_num_seqs": None, "prefill_tokens": None}  # and defaults


def engine_settings(settings: dict | None, where: str = "Engine") -> dict:
    """The fast path's settings (ENGINE_SETTINGS' keys, defaults filled in), checked; a ValueError names the key.

    gpu_memory_utilization: the share of the GPU's memory the slot pool may fill beside the weights, in (0, 1];
    max_num_seqs: at most this many sequences decoded together (None: as many as fit; on CPU, every prompt);
    prefill_tokens: chunked prefill, at most this many prompt tokens admitted per step (None: each prompt whole)."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(ENGINE_SETTINGS))
    if unknown:
        raise ValueError(f"{where}: unknown engine setting(s) {unknown}; known: {', '.join(ENGINE_SETTINGS)}")
    out = ENGINE_SETTINGS | settings
    for key, value in out.items():
        problem = setting_problem(key, value)
        if problem:
            raise ValueError(f"{where}: {key}={value!r} {problem}")
    return out


def setting_problem(key: str, value) -> str | None:
    """What is wrong with the value of an engine setting (ENGINE_SETTINGS' keys), or None; the jobs' and Serve's
    config checks use it too."""
    if key == "gpu_memory_utilization":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
        return None if ok else "must be a number in (0, 1]"
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "must be an int >= 1, or None (null in a config file)"
