"""Loading a model and its tokenizer for `Engine`: transformers hub ids / local directories, llama2.c checkpoints,
or objects already built; dtype and device handling; one tokenizer protocol over both tokenizer kinds.

Tokenizer protocol (what `Engine.tokenizer` offers): `encode(text) -> list[int]` (BOS included where the model
uses one), `decode(ids) -> str` (special tokens dropped), `bos_token_id`, `eos_token_id`, `pad_token_id`,
`chat_template` (None without one), `apply_chat_template(messages) -> list[int]` (ValueError without a template).
"""

from __future__ import annotations

import os

import torch

from kvstream.kvcache.llama2c import Llama2cTokenizer, is_llama2c_checkpoint, load_llama2c_model

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None / "auto" -> None (keep the checkpoint's); a name from DTYPES or a torch floating dtype -> that dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported: use None or 'auto' (the checkpoint's own), "
                     f"'float32', 'bfloat16' or 'float16'")


def resolve_device(device) -> torch.device:
    """None -> cuda if available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device: use None, 'cpu', 'cuda' or 'cuda:N' ({e})") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here: use device=None or 'cpu'")
    return dev


class HFTokenizer:
    """A transformers tokenizer behind the Engine's tokenizer protocol."""

    def __init__(self, tok):
        self.hf = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.chat_template = getattr(tok, "chat_template", None) or None

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` ([{role, content}, ...]) in the model's chat format, ready for the reply."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {type(self.hf).__name__} has no chat template: build the prompt text "
                             f"yourself, or load a tokenizer that has one")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(tokenizer):
    """A tokenizer under the protocol: from a path (llama2.c .bin or transformers dir / hub id), a transformers
    tokenizer object, or an object that already follows the protocol. None stays None."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if os.path.isfile(path):
            return Llama2cTokenizer(path)
        from transformers import AutoTokenizer

        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer={path!r}: not a llama2.c tokenizer file, a local transformers directory "
                             f"or a reachable hub id ({e})") from None
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return HFTokenizer(tokenizer)
    missing = [a for a in ("encode", "decode", "eos_token_id") if not hasattr(tokenizer, a)]
    if missing:
        raise ValueError(f"tokenizer of type {type(tokenizer).__name__} lacks {missing}: pass a path, a "
                         f"transformers tokenizer or an object with encode/decode/bos_token_id/eos_token_id")
    return tokenizer


def decode_continuation(tokenizer, context: list[int], new: list[int]) -> str:
    """Text that `new` token ids add after `context`: decode(context tail + new) minus decode(context tail).

    Decoding `new` alone would drop or keep a leading space by the tokenizer's rules for a text start
    (sentencepiece strips it; llama2.c strips it after BOS only); the context makes it a continuation.
    """
    ctx = list(context[-4:])
    head, full = tokenizer.decode(ctx), tokenizer.decode(ctx + list(new))
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(new))


def load_model(model, tokenizer=None, dtype=None, device=None):
    """(model in eval mode on `device` in `dtype`, tokenizer under the protocol or None).

    model: a transformers PreTrainedModel; a llama2.c checkpoint path (`tokenizer=` its tokenizer .bin, required);
    or a local transformers directory / hub id (tokenizer defaults to the same path).
    """
    from transformers import PreTrainedModel

    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if isinstance(model, PreTrainedModel):
        tok = load_tokenizer(tokenizer)
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isfile(path):
            if not is_llama2c_checkpoint(path):
                raise ValueError(f"model={path!r} is a file but not a llama2.c checkpoint; pass a llama2.c .bin, a "
                                 f"transformers model directory or a hub id")
            if tokenizer is None:
                raise ValueError(f"model={path!r} is a llama2.c checkpoint: pass tokenizer= its llama2.c tokenizer "
                                 f".bin (e.g. tok512.bin beside stories260K.bin)")
            model, tok = load_llama2c_model(path), load_tokenizer(tokenizer)
        else:
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or "auto")
            except (OSError, ValueError) as e:
                raise ValueError(f"model={path!r}: not a llama2.c .bin, a local transformers directory or a "
                                 f"reachable hub id ({e})") from None
            tok = load_tokenizer(tokenizer if tokenizer is not None else path)
    else:
        raise ValueError(f"model of type {type(model).__name__} is not supported: pass a path, a hub id or a "
                         f"transformers PreTrainedModel")
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.to(dev).eval(), tok


def max_context(config) -> int:
    """The model's maximum positions (max_position_embeddings, or n_positions / max_sequence_length)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(config).__name__} names no maximum context (max_position_embeddings): set it on the "
                     f"model's config")


def cache_kwarg(module) -> str:
    """The name `module.forward` (a model or a decoder layer; `generate` follows the model's) takes the KV cache
    under: transformers 5.25 renamed `past_key_values` to `cache` (the old name warns there, 5.17 knows only it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


# The reference shapes of the benchmarks and the demo models (DESIGN.md, "Performance model"): LlamaConfig fields.
REFERENCE_SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
}
