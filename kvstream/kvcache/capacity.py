"""Memory decides the batch: how many scheduler slots fit in the memory left after the weights.

A slot's bytes are not estimated but read off the buffers a slot pool allocates (`CompressedCache.pool` built on
PyTorch's meta device: the same code that sizes real slots, no memory used), so the count follows every cache
config: keyformer 0.5 + kivi2 holds ~4.8x the sequences of a full cache at prompt 4096 + 256 new tokens
(Llama-2-7B shape). What a step needs besides the slots (the admission prefill of one longest prompt, the
decode step's activations) is a reserve: estimated from the model's shape, or given.
"""

from __future__ import annotations

import dataclasses

import torch

from kvstream.kvcache.cache import CompressedCache
from kvstream.kvcache.config import CacheConfig


def slot_bytes(cfg: CacheConfig, model_config, max_prompt_tokens: int, max_new_tokens: int,
               dtype: torch.dtype) -> int:
    """Bytes one more slot adds across every layer (ring, kept store, scales, positions, scores, per-slot state):
    the difference between pools of 2 and 1 slots built on the meta device (a pool's few scalars left out)."""
    cfg = dataclasses.replace(cfg, max_new_tokens=max_new_tokens)

    def held(n: int) -> int:
        pool = CompressedCache.pool(cfg, model_config, n, max_prompt_tokens, dtype, "meta")
        return sum(t.numel() * t.element_size() for t in pool.tensors())

    return held(2) - held(1)


def reserve_bytes(model_config, max_prompt_tokens: int, num_slots_hint: int, dtype: torch.dtype) -> int:
    """A working reserve beside the slots: the admission prefill of one longest prompt (hidden states, the MLP's
    intermediate, one layer's full keys / values while its store is built) and the decode step's activations
    for `num_slots_hint` rows. An estimate from the shape, generous by a factor 2."""
    mc = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden, inter = mc.hidden_size, mc.intermediate_size
    kv = (mc.num_key_value_heads or mc.num_attention_heads) * (getattr(mc, "head_dim", None)
                                                               or hidden // mc.num_attention_heads)
    size = torch.finfo(dtype).bits // 8
    per_token = 8 * hidden + 3 * inter + 8 * kv
    return 2 * size * per_token * (max_prompt_tokens + num_slots_hint) + 2 * size * mc.vocab_size * num_slots_hint


def staging_bytes(cfg: CacheConfig, model_config, prompt_tokens: int, dtype: torch.dtype) -> int:
    """What a chunked admission stages until its last chunk (CompressedCache.begin_chunked_prefill): the whole
    prompt's keys and values of every layer in the model's dtype, and when the policy scores tokens its queries and
    the rows' log-sum-exp (float32, where the attention gives it)."""
    from kvstream.kvcache.policies import get_policy

    mc = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hq = mc.num_attention_heads
    h = mc.num_key_value_heads or hq
    d = getattr(mc, "head_dim", None) or mc.hidden_size // hq
    scored = get_policy(cfg).scored
    heads = 2 * h + (hq if scored else 0)
    lse = hq * 4 if scored else 0
    return mc.num_hidden_layers * prompt_tokens * (heads * d * (torch.finfo(dtype).bits // 8) + lse)


def max_slots(cfg: CacheConfig, model_config, max_prompt_tokens: int, max_new_tokens: int, dtype: torch.dtype,
              memory_bytes: int, reserve: int | None = None) -> int:
    """The number of slots that fit in `memory_bytes` (memory free for the cache and activations) beside the
    reserve (None: `reserve_bytes`); a ValueError naming the numbers when not even one does."""
    per = slot_bytes(cfg, model_config, max_prompt_tokens, max_new_tokens, dtype)
    if reserve is None:  # linear in the rows: a + b n
        a = reserve_bytes(model_config, max_prompt_tokens, 0, dtype)
        b = reserve_bytes(model_config, max_prompt_tokens, 1, dtype) - a
    else:
        a, b = reserve, 0
    n = max(0, (int(memory_bytes) - a) // (per + b))
    if n == 0:
        raise ValueError(f"not one sequence slot fits: a slot of {per / 2**30:.2f} GiB (prompt {max_prompt_tokens} + "
                         f"{max_new_tokens} new tokens, cache {cfg.policy}+{cfg.quant}) beside a reserve of "
                         f"{a / 2**30:.2f} GiB, in {memory_bytes / 2**30:.2f} GiB; shorten the prompts, compress the "
                         f"cache or free memory")
    return int(n)


def slots_that_fit(cfg: CacheConfig, model, max_prompt: int, max_new: int, dtype: torch.dtype, device,
                   utilization: float, chunked: bool = False) -> int:
    """The scheduler's num_slots="auto": the slots that fit in `utilization` of `device`'s memory beside what is
    already allocated (the weights) and the reserve (and a chunked admission's staging of the longest prompt, when
    chunked). model: the causal LM (its config and where it lives)."""
    if device.type != "cuda":
        raise ValueError("Scheduler: num_slots='auto' sizes the pool from GPU memory; on a CPU pass a number")
    if not 0 < utilization <= 1:
        raise ValueError(f"Scheduler: gpu_memory_utilization={utilization} must be in (0, 1]")
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated  # freed blocks PyTorch keeps (an earlier pool's): usable
    budget = min(free + cached, utilization * total - allocated)
    if chunked:
        budget -= staging_bytes(cfg, model.config, max_prompt, dtype)
    return max_slots(cfg, model.config, max_prompt, max_new, dtype, int(budget))
