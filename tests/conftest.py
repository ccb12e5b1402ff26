"""Shared fixtures: the real data beside the project (`../shared`) and tiny random Llama models.

`shared_dir` and `stories260k` skip, with the reason, only when `../shared` (or the file) is absent; CI has it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The test models are tiny: one intra-op thread is fastest, and on a shared or busy 2-core machine more threads
# spin against each other (measured: a 40-token stories260K generate took 11.6 s of CPU with 2 threads, 0.6 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repository root (holds `data/`)."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"real data not found: {SHARED / 'data'} is absent (it sits beside the repo as ../shared in CI)")
    return SHARED


@pytest.fixture(scope="session")
def stories260k(shared_dir) -> dict[str, Path]:
    """Paths of the real tiny model: {"model": stories260K.bin, "tokenizer": tok512.bin} (llama2.c format)."""
    d = shared_dir / "data" / "stories260K"
    paths = {"model": d / "stories260K.bin", "tokenizer": d / "tok512.bin"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f"stories260K not found: {missing} absent")
    return paths


def tiny_llama_config(**overrides):
    """A LlamaConfig small enough for CPU tests: 2 layers, 4 query heads over 2 KV heads (GQA), head_dim 16."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def make_tiny_llama():
    """Factory: make_tiny_llama(seed=0, **config_overrides) -> a fresh random LlamaForCausalLM in eval mode."""
    from transformers import LlamaForCausalLM

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()

    return make


@pytest.fixture
def tiny_llama(make_tiny_llama):
    """A fresh random tiny LlamaForCausalLM (see tiny_llama_config), seed 0, eval mode."""
    return make_tiny_llama()
