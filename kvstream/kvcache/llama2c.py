"""Karpathy's llama2.c checkpoints and tokenizers, loaded into transformers.

References: karpathy/llama2.c `export.py` (the v0 "legacy" and v1 "ak42" checkpoint layouts) and `run.c`
(the tokenizer's encode/decode). A checkpoint becomes a `transformers.LlamaForCausalLM`, so everything in
kvcache (CompressedCache, Engine) runs on it unchanged.

RoPE: llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; transformers' Llama rotates the
halves (x_i, x_{i + d/2}). Both use frequency theta^(-2i/d) for pair i, so permuting the output rows of wq and wk
per head (even rows first, then odd rows) makes the two compute the same attention.
"""

from __future__ import annotations

import heapq
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

V1_MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256


@dataclass(frozen=True)
class Llama2cHeader:
    """Shapes of a llama2.c checkpoint and where its fp32 weights start."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 (legacy, 28-byte header) or 1 ("ak42", 256-byte header)
    data_offset: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def n_floats(self) -> int:
        """Number of fp32 values the weights section must hold."""
        d, h, n, kv = self.dim, self.hidden_dim, self.n_layers, self.n_kv_heads * self.head_dim
        per_layer = 2 * d + d * d + 2 * kv * d + d * d + 3 * d * h
        total = self.vocab_size * d + n * per_layer + d
        if self.version == 0:
            total += self.seq_len * self.head_dim  # freqs_cos + freqs_sin, each (seq_len, head_dim / 2)
        if not self.shared_classifier:
            total += self.vocab_size * d
        return total


def read_header(path: str) -> Llama2cHeader:
    """Parse a llama2.c checkpoint's header (v0 or v1); raise ValueError if the file is not one."""
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < 28:
        raise ValueError(f"{path}: {len(head)} bytes is too short for a llama2.c checkpoint header")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == V1_MAGIC:
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise ValueError(f"{path}: llama2.c checkpoint version {version} is not supported (only v0 and v1 fp32)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        offset = V1_HEADER_BYTES
    else:
        version = 0
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", head, 0)
        shared, vocab = vocab > 0, abs(vocab)
        offset = 28
    dims = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                vocab_size=vocab, seq_len=seq_len)
    if any(v <= 0 for v in dims.values()) or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header reads {dims})")
    header = Llama2cHeader(**dims, shared_classifier=shared, version=version, data_offset=offset)
    expected = offset + 4 * header.n_floats()
    size = os.path.getsize(path)
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but a llama2.c v{version} checkpoint with header {dims} "
                         f"(shared classifier: {shared}) holds {expected}")
    return header


def is_llama2c_checkpoint(path: str) -> bool:
    """Whether `path` is a file whose header and size match a llama2.c checkpoint."""
    try:
        read_header(path)
    except (OSError, ValueError, struct.error):
        return False
    return True


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute rows of a (n_heads * head_dim, dim) projection from interleaved-pair to half-split RoPE order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c_weights(path: str) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read every tensor, in llama2.c's own layout: {name: fp32 tensor}, per-layer names stacked on dim 0."""
    h = read_header(path)
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=h.data_offset).astype(np.float32))
    d, hd, n, kv = h.dim, h.hidden_dim, h.n_layers, h.n_kv_heads * h.head_dim
    shapes = {
        "tok_embeddings": (h.vocab_size, d), "attention_norm": (n, d), "ffn_norm": (n, d), "norm": (d,),
        "wq": (n, d, d), "wk": (n, kv, d), "wv": (n, kv, d), "wo": (n, d, d),
        "w1": (n, hd, d), "w2": (n, d, hd), "w3": (n, hd, d),
        "freqs": (2, h.seq_len, h.head_dim // 2), "output": (h.vocab_size, d),
    }
    if h.version == 0:
        order = ["tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm",
                 "freqs"]
    else:
        order = ["attention_norm", "ffn_norm", "norm", "tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not h.shared_classifier:
        order.append("output")
    weights, pos = {}, 0
    for name in order:
        count = int(np.prod(shapes[name]))
        weights[name] = flat[pos:pos + count].view(shapes[name])
        pos += count
    weights.pop("freqs", None)
    return h, weights


def load_llama2c_model(path: str, dtype: torch.dtype = torch.float32):
    """A llama2.c checkpoint as a `transformers.LlamaForCausalLM` (eval mode, on the CPU, in `dtype`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, w = load_llama2c_weights(path)
    config = LlamaConfig(
        vocab_size=h.vocab_size, hidden_size=h.dim, intermediate_size=h.hidden_dim, num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads, num_key_value_heads=h.n_kv_heads, head_dim=h.head_dim,
        max_position_embeddings=h.seq_len, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=h.shared_classifier, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        attention_bias=False, mlp_bias=False,
    )
    sd = {"model.embed_tokens.weight": w["tok_embeddings"], "model.norm.weight": w["norm"]}
    if not h.shared_classifier:
        sd["lm_head.weight"] = w["output"]
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["attention_norm"][i]
        sd[p + "post_attention_layernorm.weight"] = w["ffn_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(w["wq"][i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(w["wk"][i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{path}: llama2.c -> Llama conversion left {missing} unset and {unexpected} unused")
    return model.to(dtype).eval()


class Llama2cTokenizer:
    """llama2.c's tokenizer (`tokenizer.bin`/`tok512.bin`) with run.c's encode and decode.

    File: int32 max_token_len, then per token: float32 score, int32 byte length, bytes. Ids 0 <unk>, 1 BOS,
    2 EOS, 3..258 the byte-fallback tokens <0x00>..<0xFF>.
    """

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2
    chat_template = None

    def __init__(self, path: str):
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 4:
            raise ValueError(f"{path}: too short for a llama2.c tokenizer")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        pos, pieces, scores = 4, [], []
        try:
            while pos < len(data):
                score, n = struct.unpack_from("<fi", data, pos)
                if n < 0 or pos + 8 + n > len(data):
                    raise struct.error(f"token {len(pieces)} has length {n}")
                pieces.append(data[pos + 8:pos + 8 + n])
                scores.append(score)
                pos += 8 + n
        except struct.error as e:
            raise ValueError(f"{path}: not a llama2.c tokenizer file ({e})") from None
        if len(pieces) < 259:
            raise ValueError(f"{path}: {len(pieces)} tokens; a llama2.c tokenizer has at least 259 (byte fallback)")
        self.pieces, self.scores = pieces, scores
        self.vocab_size = len(pieces)
        self._ids = {}
        for i, p in enumerate(pieces):
            self._ids.setdefault(p, i)  # like run.c's bsearch over a sorted vocab: first id of a duplicate wins
        self._byte = {i: i - 3 for i in range(3, 259) if pieces[i] == b"<0x%02X>" % (i - 3)}

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """run.c's encode: a dummy-prefix space, per-codepoint lookup with byte fallback, then greedy merges: while
        any adjacent pair forms a token, merge the pair whose token scores best (the leftmost on ties).

        run.c rescans all pairs per merge (O(n^2)); a heap of candidate pairs gives the same merges in O(n log n).
        """
        ids = []
        if text:
            ids.append(self._ids[b" "])
            for ch in text:
                b = ch.encode("utf-8")
                ids.extend([self._ids[b]] if b in self._ids else [x + 3 for x in b])
        ids = self._merge(ids)
        return ([self.bos_token_id] if bos else []) + ids + ([self.eos_token_id] if eos else [])

    def _merge(self, ids: list[int]) -> list[int]:
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        version = [0] * n  # bumped whenever a symbol changes, to invalidate its stale heap entries
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:  # the pair (i, nxt[i]), keyed by (-score, position of its left symbol)
            j = nxt[i]
            if j < n:
                t = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[j]])
                if t is not None:
                    heapq.heappush(heap, (-self.scores[t], i, version[i], version[j], t))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, vi, vj, t = heapq.heappop(heap)
            j = nxt[i]
            if j >= n or version[i] != vi or version[j] != vj or ids[i] < 0:
                continue
            ids[i], ids[j] = t, -1  # i takes the merged token, j leaves the list
            version[i] += 1
            version[j] += 1
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [t for t in ids if t >= 0]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Bytes of each piece (byte tokens as their byte), BOS/EOS dropped, the leading space of a piece that
        follows BOS stripped (as run.c does); invalid UTF-8 becomes U+FFFD."""
        out, prev = bytearray(), None
        for t in (int(x) for x in ids):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
            if t in (self.bos_token_id, self.eos_token_id) and skip_special_tokens:
                prev = t
                continue
            piece = bytes([self._byte[t]]) if t in self._byte else self.pieces[t]
            if prev == self.bos_token_id and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            prev = t
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, **kwargs):
        raise ValueError("the llama2.c tokenizer has no chat template: build the prompt text yourself "
                         "(e.g. join the turns) and pass it as a string")
