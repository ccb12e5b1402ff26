"""Model specs the jobs accept, and the tokenizer the prompt stages use.

`model.path` is one of:
  - `demo:tiny-llama`: a 2-layer Llama built from a config with random weights (seed 0) and a byte-level
    tokenizer built in code. Needs no network and no files: the offline demo. `demo:llama2-7b`: the same idea
    at Llama-2-7B's shape (bf16), for throughput runs on GPUs.
  - a llama2.c checkpoint `*.bin` (`model.tokenizer` = its tokenizer `.bin`), loaded by `kvcache.Engine`.
  - a hub id or a local transformers directory.

The pipeline tokenizes prompts itself (so it can apply the length policy and group by length) and hands token
ids to `Engine.generate`; `load_tokenizer` gives the same tokenizer the Engine builds (kvcache's protocol:
encode(text) with BOS, decode(ids), bos/eos_token_id, chat_template, apply_chat_template(messages) -> ids).
"""

from __future__ import annotations

import functools
import os
from typing import Any

DEMO_PREFIX = "demo:"
DEMO_MODELS = ("tiny-llama", "llama2-7b")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 = BOS, 257 = EOS, 258 = PAD. No chat template."""

    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> None:
        return None


def is_demo(path: str) -> bool:
    return str(path).startswith(DEMO_PREFIX)


def is_llama2c(path: str) -> bool:
    return str(path).endswith(".bin")


def demo_config(name: str, tok: ByteTokenizer):
    """Llama configs of the demo models: `tiny-llama` (2 layers, hidden 128, 4 heads of 32, 2 KV heads) for the
    offline demo and tests; `llama2-7b` (Llama-2-7B's shape: 32 layers, hidden 4096, 32 heads of 128, MHA) for
    throughput runs on GPUs, where speed does not depend on the weight values."""
    from transformers import LlamaConfig

    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                           **special)
    if name == "llama2-7b":
        from kvstream.kvcache.models import REFERENCE_SHAPES

        return LlamaConfig(**REFERENCE_SHAPES["llama2-7b"], max_position_embeddings=4096, **special)
    valid = ", ".join("demo:" + m for m in DEMO_MODELS)
    raise ValueError(f"model.path=demo:{name}: unknown demo model; valid: {valid}")


def build_demo_model(name: str, dtype: str = "auto", device: str | None = None):
    """A random-weight Llama (seed 0) built directly on `device` in `dtype`, and the byte tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    tok = ByteTokenizer()
    config = demo_config(name, tok)
    torch_dtype = torch.float32 if dtype in ("auto", None) else getattr(torch, dtype)
    if name != "tiny-llama" and dtype in ("auto", None):
        torch_dtype = torch.bfloat16
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(0)
        torch.set_default_dtype(torch_dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    return model.eval(), tok


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, tokenizer: str | None = None) -> Any:
    """The tokenizer of a model spec under the Engine's tokenizer protocol (cached per process): the same
    loader `Engine.from_pretrained` uses, so the ids the pipeline makes are the ones the Engine would make."""
    if is_demo(path):
        return ByteTokenizer()
    from kvstream.kvcache.models import load_tokenizer as kv_load_tokenizer

    if is_llama2c(path) and not tokenizer:
        raise ValueError(f"model.path={path} is a llama2.c checkpoint: set model.tokenizer to its tokenizer .bin")
    return kv_load_tokenizer(tokenizer or path)


def model_config(path: str, tokenizer: str | None = None):
    """The transformers config (text part) of a model spec, read without loading weights: the demo configs, a
    llama2.c checkpoint's header, or the hub/local `config.json`."""
    if is_demo(path):
        return demo_config(path[len(DEMO_PREFIX):], ByteTokenizer())
    if is_llama2c(path):
        from transformers import LlamaConfig

        from kvstream.kvcache.llama2c import read_header

        h = read_header(path)
        return LlamaConfig(vocab_size=h.vocab_size, hidden_size=h.dim, intermediate_size=h.hidden_dim,
                           num_hidden_layers=h.n_layers, num_attention_heads=h.n_heads,
                           num_key_value_heads=h.n_kv_heads, head_dim=h.head_dim, max_position_embeddings=h.seq_len)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path={path}: not a llama2.c .bin, a local transformers directory or a reachable "
                         f"hub id ({str(e).splitlines()[0]})") from None
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_context(path: str) -> int:
    """Maximum positions of a model spec, read without loading weights."""
    from kvstream.kvcache.models import max_context

    try:
        return max_context(model_config(path))
    except ValueError as e:
        raise ValueError(f"model.path={path}: {e}") from None


def build_engine(model_cfg: dict, cache_cfg: Any, device: str | None, settings: dict | None = None):
    """One `kvcache.Engine` for a model spec (called once per generation actor); settings: the fast path's
    (kvstream.kvcache.config.engine_settings: gpu_memory_utilization, max_num_seqs, prefill_tokens)."""
    from kvstream.kvcache import Engine

    settings = dict(settings or {})
    dtype = None if model_cfg.get("dtype", "auto") == "auto" else model_cfg["dtype"]
    path = model_cfg["path"]
    if is_demo(path):
        model, tok = build_demo_model(path[len(DEMO_PREFIX):], model_cfg.get("dtype", "auto"), device)
        return Engine.from_pretrained(model, tokenizer=tok, cache=cache_cfg, dtype=dtype, device=device, **settings)
    return Engine.from_pretrained(path, tokenizer=model_cfg.get("tokenizer"), cache=cache_cfg, dtype=dtype,
                                  device=device, **settings)


def device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" else "cpu"
