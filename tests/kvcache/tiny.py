"""Tiny models of several families, built from configs (no hub), and batched left-padded prompts."""

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from kvstream.kvcache.models import cache_kwarg

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def build_model(family="llama", hidden=64, heads=4, kv_heads=2, layers=2, head_dim=None, vocab=128, seed=0):
    cfg_cls, model_cls = FAMILIES[family]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
              attn_implementation="sdpa")
    if head_dim is not None:
        kw["head_dim"] = head_dim
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw)).eval()


def padded_batch(lengths, vocab=128, seed=0):
    """Left-padded random prompts of the given unpadded lengths -> (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, T - n :] = 1
    return ids, mask


def greedy(model, ids, mask, n_new, cache=None):
    """Greedy generation -> (sequences, list of per-step logits)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                         **{cache_kwarg(model): cache}, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0)
    model.config._attn_implementation = "sdpa"  # the next reference run uses transformers' own path
    return out.sequences, out.scores


