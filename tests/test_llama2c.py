"""llama2.c loader: the converted transformers Llama against an independent forward pass on the real weights,
the v1 and unshared-classifier layouts, and the tokenizer (run.c's encode/decode) on real text."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from kvstream.kvcache.llama2c import Llama2cTokenizer, is_llama2c_checkpoint, load_llama2c_model, read_header

LILY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def reference_forward(path, tokens: list[int]) -> np.ndarray:
    """llama2.c's forward (model.py / run.c) in numpy, reading the v0 file itself: interleaved-pair RoPE, GQA,
    RMSNorm eps 1e-5, SwiGLU. Returns logits (T, vocab) float64."""
    raw = open(path, "rb").read()
    dim, hid, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
    w = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    hs, pos = dim // n_heads, 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = w[pos:pos + n].reshape(shape)
        pos += n
        return out

    emb, att_norm = take(abs(vocab), dim), take(n_layers, dim)
    wq, wk, wv = take(n_layers, dim, dim), take(n_layers, n_kv * hs, dim), take(n_layers, n_kv * hs, dim)
    wo, ffn_norm = take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hid, dim), take(n_layers, dim, hid), take(n_layers, hid, dim)
    norm = take(dim)
    T = len(tokens)
    freq = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)  # (hs/2,)
    angle = np.arange(T)[:, None] * freq[None, :]  # (T, hs/2)
    rot = np.exp(1j * angle)

    def rope(x):  # (T, heads, hs): pairs (x0, x1), (x2, x3), ... as complex numbers
        c = x[..., 0::2] + 1j * x[..., 1::2]
        c = c * rot[:, None, :]
        return np.stack([c.real, c.imag], axis=-1).reshape(x.shape)

    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    x = emb[tokens]  # (T, dim)
    causal = np.triu(np.full((T, T), -np.inf), k=1)
    for layer in range(n_layers):
        h = rmsnorm(x, att_norm[layer])
        q = rope((h @ wq[layer].T).reshape(T, n_heads, hs))
        k = rope((h @ wk[layer].T).reshape(T, n_kv, hs))
        v = (h @ wv[layer].T).reshape(T, n_kv, hs)
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, dim) @ wo[layer].T
        h = rmsnorm(x, ffn_norm[layer])
        a, b = h @ w1[layer].T, h @ w3[layer].T
        x = x + (a / (1 + np.exp(-a)) * b) @ w2[layer].T
    return rmsnorm(x, norm) @ emb.T


@pytest.fixture(scope="module")
def tok(stories260k):
    return Llama2cTokenizer(str(stories260k["tokenizer"]))


@pytest.fixture(scope="module")
def model(stories260k):
    return load_llama2c_model(str(stories260k["model"]))


def test_header_of_real_checkpoint(stories260k):
    h = read_header(str(stories260k["model"]))
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert h.shared_classifier and h.version == 0


def test_conversion_matches_independent_forward(stories260k, tok, model):
    tokens = tok.encode(LILY + " One day, she saw a big red ball.")
    want = reference_forward(str(stories260k["model"]), tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    assert got.shape == want.shape == (len(tokens), 512)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _v0_to_v1(raw: bytes) -> bytes:
    """Re-serialize a shared-classifier v0 checkpoint in export.py's version1 layout."""
    dims = struct.unpack_from("<7i", raw, 0)
    dim, hid, n, n_heads, n_kv, vocab, seq_len = dims
    hs, kv = dim // n_heads, n_kv * dim // n_heads
    w = np.frombuffer(raw, dtype="<f4", offset=28)
    sizes = [("emb", vocab * dim), ("an", n * dim), ("wq", n * dim * dim), ("wk", n * kv * dim),
             ("wv", n * kv * dim), ("wo", n * dim * dim), ("fn", n * dim), ("w1", n * hid * dim),
             ("w2", n * dim * hid), ("w3", n * hid * dim), ("norm", dim)]
    parts, pos = {}, 0
    for name, size in sizes:
        parts[name], pos = w[pos:pos + size], pos + size
    header = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, 1)
    order = ["an", "fn", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    return header + b"\0" * (256 - len(header)) + b"".join(parts[k].tobytes() for k in order)


def test_v1_layout_loads_the_same_model(stories260k, model, tmp_path):
    raw = open(stories260k["model"], "rb").read()
    v1 = tmp_path / "v1.bin"
    v1.write_bytes(_v0_to_v1(raw))
    assert read_header(str(v1)).version == 1
    other = load_llama2c_model(str(v1)).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(other[name], tensor), name


def test_unshared_classifier_is_read(stories260k, tmp_path):
    raw = bytearray(open(stories260k["model"], "rb").read())
    struct.pack_into("<i", raw, 20, -512)  # negative vocab: the classifier follows the weights
    out = np.random.default_rng(0).standard_normal((512, 64)).astype("<f4")
    path = tmp_path / "unshared.bin"
    path.write_bytes(bytes(raw) + out.tobytes())
    m = load_llama2c_model(str(path))
    assert not m.config.tie_word_embeddings
    assert torch.equal(m.lm_head.weight, torch.from_numpy(out))
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()


def test_bad_checkpoints_are_refused(stories260k, tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(open(stories260k["model"], "rb").read()[:-4])
    with pytest.raises(ValueError, match="bytes"):
        read_header(str(short))
    text = tmp_path / "notes.bin"
    text.write_bytes(b"this is not a checkpoint at all, just some text bytes" * 4)
    assert not is_llama2c_checkpoint(str(text)) and not is_llama2c_checkpoint(str(tmp_path / "missing.bin"))
    assert is_llama2c_checkpoint(str(stories260k["model"]))


def test_encode_like_run_c(tok):
    ids = tok.encode("Once upon a time")
    assert ids[0] == tok.bos_token_id
    assert [tok.pieces[i] for i in ids[1:]] == [b" Once", b" upon", b" a", b" time"]
    assert tok.encode("Hi", bos=False, eos=True)[-1] == tok.eos_token_id


def runc_encode(tok, text: str) -> list[int]:
    """run.c's encode, transcribed literally: rescan every adjacent pair, merge the best (leftmost on ties)."""
    lookup = {}
    for i, piece in enumerate(tok.pieces):
        lookup.setdefault(piece, i)
    ids = [tok.bos_token_id]
    if text:
        ids.append(lookup[b" "])
        for ch in text:
            b = ch.encode("utf-8")
            ids.extend([lookup[b]] if b in lookup else [x + 3 for x in b])
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(1, len(ids) - 1):
            j = lookup.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]], -1)
            if j >= 0 and tok.scores[j] > best:
                best, best_i, best_id = tok.scores[j], i, j
        if best_i < 0:
            return ids
        ids[best_i:best_i + 2] = [best_id]


def test_encode_equals_run_c_on_real_text(tok, shared_dir):
    lines = (shared_dir / "data" / "dialogsum" / "dialogsum.dev.jsonl").read_text().splitlines()[:6]
    texts = [json.loads(line)["dialogue"][:600] for line in lines]
    texts += ["", "a", "  two  spaces ", "aaaaaaaaaaaaaaaaaaaaaaa", "the the the the", "naïve café 🙂 \n\t end"]
    for text in texts:
        assert tok.encode(text) == runc_encode(tok, text), text


def test_byte_fallback_and_decode(tok):
    text = "naïve café 🙂"
    ids = tok.encode(text)
    assert any(3 <= i <= 258 for i in ids)  # characters outside the vocabulary fall back to byte tokens
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *tok.encode("upon", bos=False)]) == "upon"  # space after BOS stripped
    assert tok.decode(tok.encode("upon", bos=False)) == " upon"  # kept elsewhere (the dummy prefix)
    with pytest.raises(ValueError, match="outside"):
        tok.decode([512])
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_round_trip_on_real_text(tok, shared_dir):
    lines = (shared_dir / "data" / "dialogsum" / "dialogsum.dev.jsonl").read_text().splitlines()[:20]
    texts = [json.loads(line)["dialogue"] for line in lines]
    assert len(texts) == 20 and all(texts)
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
