"""A compact forward of the Llama family (Llama, Mistral, Qwen2, Qwen3) over the model's own weights.

The engine's prefill and its decode step run the decoder layers through this instead of the transformers modules
(gpt-fast's shape): the same weights and the same math, with

- one QKV projection and one gate-up projection per layer (the weights concatenated once; the model's q / k / v
  and gate / up Linear modules are re-pointed at views of the concatenation, so the model keeps working as
  before and no weight is held twice);
- the elementwise parts fused (`kvstream.kernels.fused_layer`: residual add + RMSNorm, RoPE + the head split,
  SiLU-and-multiply) on CUDA, their torch references (`kernels.fused_layer_ref`, transformers' own op chains and
  roundings) elsewhere;
- the attention through the CompressedCache exactly as the modules call it (`cache.update`, then the registered
  kvstream attention function), so every policy and storage behaves the same.

`compact_reason(model)` says why a model cannot take it (the engine then drives the transformers modules, as before).
The environment variable KVSTREAM_FORWARD=modules turns it off (for comparisons: `jobs/bench_engine.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from kvstream.kernels import fused_layer_ref
from kvstream.kvcache.backend import _triton_available

log = logging.getLogger(__name__)
_ATTR = "_kvstream_compact_forward"


def compact_reason(model) -> str | None:
    """Why `model` cannot run the compact forward (None when it can)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the Llama-family module layout"
    mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(mc, "hidden_act", None) != "silu":
        return f"hidden_act={getattr(mc, 'hidden_act', None)!r} (the compact forward's MLP is SiLU-gated)"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        lin = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        lin += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(m) is nn.Linear for m in lin):
            return "a projection is not a plain torch.nn.Linear (a quantized or adapted model)"
        norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        if not all(_is_rms_norm(n) for n in norms):
            return "a layer's norms are not the Llama-family RMSNorm"
        if any(norm is not None and not _is_rms_norm(norm) for norm in (getattr(attn, "q_norm", None),
                                                                         getattr(attn, "k_norm", None))):
            return "the attention's q_norm / k_norm are not the Llama-family RMSNorm"
        if getattr(attn, "scaling", None) is None or getattr(attn, "head_dim", None) is None:
            return f"{type(attn).__name__} has no head_dim / scaling"
        if {p.device for p in layer.parameters()} != {inner.embed_tokens.weight.device}:
            return "the model's weights are spread over devices (or offloaded)"
    if not _is_rms_norm(getattr(inner, "norm", None)):
        return "the final norm is not the Llama-family RMSNorm"
    return None


def _is_rms_norm(m) -> bool:
    return (isinstance(m, nn.Module) and type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1)


def compact_forward(model) -> "CompactForward | None":
    """The model's CompactForward (built, and its weights concatenated, on the first call), or None when the model
    cannot take it (`compact_reason`, logged once) or KVSTREAM_FORWARD=modules."""
    if os.environ.get("KVSTREAM_FORWARD", "compact") == "modules":
        return None
    fwd = getattr(model, _ATTR, None)
    if isinstance(fwd, CompactForward) and not fwd.current():  # the model moved or changed dtype since: again
        fwd = None
    if fwd is None:
        reason = compact_reason(model)
        if reason is None:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the caller is in
                fwd = CompactForward(model)
        else:
            fwd = reason
        if reason is not None:
            log.info("the engine drives the transformers modules: %s", reason)
        object.__setattr__(model, _ATTR, fwd)  # not a submodule: plain attribute
    return fwd if isinstance(fwd, CompactForward) else None


@dataclasses.dataclass
class _Layer:
    attn: nn.Module  # the attention module (the cache's attention function takes it)
    ln1: torch.Tensor
    ln1_eps: float
    ln2: torch.Tensor
    ln2_eps: float
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wgu: torch.Tensor
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    hq: int
    hk: int
    d: int
    inter: int


def _fuse(mods: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several Linear modules over the same input, the modules re-pointed at its rows."""
    with torch.no_grad():
        w = torch.cat([m.weight for m in mods], 0)
        b = None
        if any(m.bias is not None for m in mods):
            b = torch.cat([m.bias if m.bias is not None else w.new_zeros(m.out_features) for m in mods], 0)
        r = 0
        for m in mods:
            n = m.out_features
            m.weight = nn.Parameter(w[r:r + n], requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(b[r:r + n], requires_grad=False)
            r += n
    return w, b


class CompactForward:
    """The model's forward as a few fused ops a layer; see the module docstring. Build through `compact_forward`."""

    def __init__(self, model):
        self.model = model
        inner = model.model
        self.embed, self.rotary, self.lm_head = inner.embed_tokens, inner.rotary_emb, model.lm_head
        self.norm_w, self.norm_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv, bqkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
            wgu, bgu = _fuse([m.gate_proj, m.up_proj])
            d = int(a.head_dim)
            self.layers.append(_Layer(
                attn=a, ln1=layer.input_layernorm.weight, ln1_eps=float(layer.input_layernorm.variance_epsilon),
                ln2=layer.post_attention_layernorm.weight,
                ln2_eps=float(layer.post_attention_layernorm.variance_epsilon),
                wqkv=wqkv, bqkv=bqkv, wo=a.o_proj.weight, bo=a.o_proj.bias, wgu=wgu, bgu=bgu,
                wd=m.down_proj.weight, bd=m.down_proj.bias, q_norm=getattr(a, "q_norm", None),
                k_norm=getattr(a, "k_norm", None), hq=a.q_proj.out_features // d, hk=a.k_proj.out_features // d,
                d=d, inter=m.gate_proj.out_features))
        self.fused = self.norm_w.device.type == "cuda" and _triton_available()
        from kvstream.kvcache.cache import attention_window

        wins = [w for w in (attention_window(layer.attn) for layer in self.layers) if w]
        self.window = min(wins) if wins else None  # the smallest attention window of any layer (None: none)

    def current(self) -> bool:
        """Whether the model's weights are still the ones this forward holds (`model.to(...)` replaces them)."""
        first = self.layers[0]
        return (self.norm_w is self.model.model.norm.weight
                and first.attn.q_proj.weight.data_ptr() == first.wqkv.data_ptr()
                and self.layers[-1].attn.o_proj.weight is self.layers[-1].wo)

    # ---- ops: fused on CUDA, the references elsewhere ---------------------------------------------------------
    def _norm(self, x, residual, w, eps):
        if self.fused and w.dtype == x.dtype:
            from kvstream.kernels.fused_layer import add_rms_norm

            return add_rms_norm(x, residual, w, eps)
        return fused_layer_ref.add_rms_norm(x, residual, w, eps)

    def _rope(self, q, k, cos, sin, v):
        d = q.shape[-1]
        if self.fused and d & (d - 1) == 0 and cos.dtype == q.dtype and cos.stride(-1) == 1:
            from kvstream.kernels.fused_layer import rope

            return rope(q, k, cos, sin, v)
        return fused_layer_ref.rope(q, k, cos, sin, v)

    def _silu_mul(self, gate, up):
        if self.fused:
            from kvstream.kernels.fused_layer import silu_mul

            return silu_mul(gate, up)
        return fused_layer_ref.silu_mul(gate, up)

    # ---- the forward --------------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """input_ids, position_ids (B, T) of unpadded rows -> the last position's logits (B, V) in the model's
        dtype; the keys and values go into `cache` (a CompressedCache: a prefill, a chunk of one, or a decode
        step) through the same calls the transformers modules make."""
        from kvstream.kvcache.cache import kvstream_attention

        B, T = input_ids.shape
        x = self.embed(input_ids)
        cos, sin = self.rotary(x, position_ids)
        residual = None
        for i, L in enumerate(self.layers):
            h, residual = self._norm(x, residual, L.ln1, L.ln1_eps)
            qkv = F.linear(h, L.wqkv, L.bqkv)  # (B, T, (hq + 2 hk) d)
            nq, nk = L.hq * L.d, L.hk * L.d
            q = qkv[..., :nq].view(B, T, L.hq, L.d)
            k = qkv[..., nq:nq + nk].view(B, T, L.hk, L.d)
            v = qkv[..., nq + nk:].view(B, T, L.hk, L.d)
            if L.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE (the module itself)
                q, k = L.q_norm(q), L.k_norm(k)
            q, k, v = self._rope(q, k, cos, sin, v)
            key, value = cache.update(k.transpose(1, 2), v.transpose(1, 2), i)
            out, _ = kvstream_attention(L.attn, q.transpose(1, 2), key, value, None, scaling=L.attn.scaling)
            x = F.linear(out.reshape(B, T, nq), L.wo, L.bo)
            h, residual = self._norm(x, residual, L.ln2, L.ln2_eps)
            gu = F.linear(h, L.wgu, L.bgu)
            x = F.linear(self._silu_mul(gu[..., :L.inter], gu[..., L.inter:]), L.wd, L.bd)
        h, _ = self._norm(x[:, -1:], residual[:, -1:], self.norm_w, self.norm_eps)
        return self.lm_head(h[:, 0])
