"""End to end: a CompressedCache on backend="triton" (the kernels) generates what backend="torch" (the references)
generates: the same greedy tokens, logits within 1e-3 relative (issue 3)."""

from __future__ import annotations

import pytest
import torch

from kvstream.kvcache import CacheConfig, CompressedCache
from kvstream.kvcache.models import cache_kwarg
from tests.kvcache.tiny import build_model, greedy, padded_batch

LENGTHS = [45, 11]  # ragged, left padded
NEW = 5
CONFIGS = {
    "h2o": dict(policy="h2o", budget=0.5),
    "keyformer+kivi2": dict(policy="keyformer", budget=0.6, quant="kivi2", group_size=16, residual=16),
    "full+kivi2": dict(policy="full", quant="kivi2", group_size=16, residual=16),
    "full+kivi4": dict(policy="full", quant="kivi4", group_size=16, residual=16),
    "full+fp8": dict(policy="full", quant="fp8"),
    "keyformer+fp8": dict(policy="keyformer", budget=0.6, quant="fp8"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_backend_matches_torch_backend(name, device):
    model = build_model("llama", hidden=64, heads=4, kv_heads=2, layers=1).to(device)  # head_dim 16, GQA 2
    ids, mask = padded_batch(LENGTHS, seed=torch.seed() % 2**31)  # fresh prompts each run
    ids, mask = ids.to(device), mask.to(device)
    runs = {}
    for backend in ("torch", "triton"):
        cfg = CacheConfig(**CONFIGS[name], backend=backend, max_new_tokens=NEW, seed=3)
        cache = CompressedCache(cfg, model.config)
        runs[backend] = greedy(model, ids, mask, NEW, cache)
        assert cache.backend == backend
    (seq_t, logits_t), (seq_k, logits_k) = runs["torch"], runs["triton"]
    assert torch.equal(seq_k, seq_t), f"{name}: greedy tokens differ between the backends"
    for step, (a, b) in enumerate(zip(logits_k, logits_t)):
        assert torch.isfinite(a).all()
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-3, f"{name}: step {step} logits differ by {err:.2e} (relative)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's fused attention kernels run on CUDA only")
def test_scored_prefill_takes_the_attention_lse(monkeypatch):
    """H2O and Keyformer (tau 1) with the Triton backend on an unpadded bf16 batch take the rows' log-sum-exp from
    the fused attention (H2O: its normalizer, one scoring pass; Keyformer: the first pass's stabilizer); they then
    generate what the torch backend generates. Padded batches do not. Both kernels that can give the LSE (cuDNN on
    Hopper, the flash kernel) match SDPA, and the scores with it the reference, with and without noise."""
    import kvstream.kvcache.cache as cache_mod
    from kvstream.kernels.prefill_scores import prefill_scores
    from kvstream.kernels.prefill_scores_ref import prefill_scores_ref

    calls = []
    real = cache_mod.attention_with_lse
    monkeypatch.setattr(cache_mod, "attention_with_lse", lambda *a: calls.append(1) or real(*a))
    model = build_model("llama", hidden=128, heads=4, kv_heads=2, layers=2).to("cuda", torch.bfloat16)  # head_dim 32
    for lengths, name, uses in (([40, 40], "h2o", True), (LENGTHS, "h2o", False), ([40, 40], "keyformer+kivi2", True),
                                (LENGTHS, "keyformer+kivi2", False)):
        ids, mask = padded_batch(lengths, seed=torch.seed() % 2**31)
        ids, mask = ids.cuda(), mask.cuda()
        runs = {}
        for backend in ("torch", "triton"):
            calls.clear()
            cfg = CacheConfig(**CONFIGS[name], backend=backend, max_new_tokens=NEW, seed=3)
            runs[backend] = greedy(model, ids, mask, NEW, CompressedCache(cfg, model.config))
            assert len(calls) == (2 if uses and backend == "triton" else 0), (lengths, name, backend, len(calls))
        if uses:
            a, b = runs["triton"][1][0].float(), runs["torch"][1][0].float()
            assert ((a - b).norm() / b.norm()).item() < 2e-2, "first-step logits differ"
            if name == "h2o":
                unpadded = (ids, mask, b)  # the flash-disabled check below reruns H2O on it
    # the pieces themselves, bf16, GQA 4: output == SDPA, scores with its LSE == the reference, for cuDNN (where
    # it runs) and for the flash kernel
    q = torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    valid = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    ref = prefill_scores_ref(q, k, valid, 0.125)
    for cudnn in (True, False):
        monkeypatch.setitem(cache_mod._CUDNN_LSE, "ok", cudnn)
        out, lse = real(q, k, v, 0.125)
        assert lse.shape == (2, 8, 300) and lse.dtype == torch.float32
        assert torch.allclose(out.float(), sdpa.transpose(1, 2).float(), atol=1e-2, rtol=1e-2), f"cudnn={cudnn}"
        got = prefill_scores(q, k, valid, 0.125, row_lse=lse)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2, f"cudnn={cudnn}"
        seed = torch.tensor([5, 6], device="cuda")
        kf = prefill_scores(q, k, valid, 0.125, 1.0, True, seed, layer=2, row_lse=lse)
        kf_ref = prefill_scores_ref(q, k, valid, 0.125, 1.0, True, seed, layer=2)
        assert ((kf - kf_ref).norm() / kf_ref.norm()).item() < 1e-2, f"keyformer, cudnn={cudnn}"
    # cuDNN turns a call down: the flash kernel takes over (and cuDNN is not asked again), unless flash SDP is
    # disabled: then no LSE kernel runs (None) and the cache takes SDPA's path with two scoring passes
    def refuse(*args):
        raise RuntimeError("cuDNN refused the shape")

    monkeypatch.setitem(cache_mod._CUDNN_LSE, "ok", True)
    monkeypatch.setattr(cache_mod, "_cudnn_attention", refuse)
    if cache_mod._use_cudnn(q.device):
        assert real(q, k, v, 0.125) is not None and not cache_mod._CUDNN_LSE["ok"]
        monkeypatch.setitem(cache_mod._CUDNN_LSE, "ok", True)
        flash = torch.backends.cuda.flash_sdp_enabled()
        torch.backends.cuda.enable_flash_sdp(False)
        try:
            assert real(q, k, v, 0.125) is None
            monkeypatch.setitem(cache_mod._CUDNN_LSE, "ok", True)
            ids, mask, first_ref = unpadded
            cfg = CacheConfig(**CONFIGS["h2o"], backend="triton", max_new_tokens=NEW, seed=3)
            a = greedy(model, ids, mask, NEW, CompressedCache(cfg, model.config))[1][0].float()
            assert ((a - first_ref).norm() / first_ref.norm()).item() < 2e-2, "flash disabled: logits differ"
        finally:
            torch.backends.cuda.enable_flash_sdp(flash)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on CUDA only")
@pytest.mark.parametrize("name", ["full+kivi2", "keyformer+kivi2"])
def test_float16_model_on_the_triton_backend(name):
    """A float16 model: the KIVI decode kernel keeps its in-place codes inside float16's range (code * 2**(2 j)
    reached 3 * 2**20 and overflowed to inf before), so the Triton backend generates what the torch backend does."""
    model = build_model("llama", hidden=256, heads=4, kv_heads=2, layers=2).to("cuda", torch.float16)  # head_dim 64
    ids, mask = padded_batch([90, 61], seed=torch.seed() % 2**31)
    ids, mask = ids.cuda(), mask.cuda()
    runs = {}
    for backend in ("torch", "triton"):
        cfg = CacheConfig(**{**CONFIGS[name], "group_size": 32, "residual": 32}, backend=backend,
                          max_new_tokens=NEW, seed=3)
        runs[backend] = greedy(model, ids, mask, NEW, CompressedCache(cfg, model.config))
    (seq_t, logits_t), (seq_k, logits_k) = runs["torch"], runs["triton"]
    T = ids.shape[1]
    # compare while both have fed back the same tokens (a random tiny model's near-ties may flip in float16)
    same = int((seq_k[:, T:] == seq_t[:, T:]).all(0).long().cumprod(0).sum())
    assert same >= 2, f"{name}: greedy tokens differ from the first decode step on"
    for step in range(min(same + 1, NEW)):
        a, b = logits_k[step].float(), logits_t[step].float()
        assert torch.isfinite(a).all(), f"{name}: non-finite logits at step {step}"
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-2, f"{name}: step {step} logits differ by {err:.2e} (relative)"


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_prefill_takes_the_attention_lse(chunk, device, monkeypatch):
    """A prompt fed in chunks that do not divide it, H2O and Keyformer (tau 1) on the Triton backend: every chunk's
    attention gives its rows' log-sum-exp, the last chunk scores the whole prompt with it (one pass), and the cache
    keeps what the one-shot prefill keeps (which takes the LSE too) and what the torch backend's chunks (two passes,
    no LSE) keep: the same positions, scores within float tolerance, the same last logits. A layer where one
    chunk's attention cannot give it scores without it (two passes) and keeps the same."""
    import kvstream.kvcache.cache as cache_mod

    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # the fused kernels on CUDA take 16-bit
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    layers, T = 2, 40
    model = build_model("llama", hidden=128, heads=4, kv_heads=2, layers=layers).to(device, dtype)  # head_dim 32
    ids = torch.randint(1, 128, (2, T), generator=torch.Generator().manual_seed(chunk)).to(device)
    calls, lses, refuse = [], [], [None]  # refuse[0]: the index of the attention call that gives no LSE
    real_attn, real_ops = cache_mod.attention_with_lse, cache_mod.ops

    def spying_attn(*a):
        calls.append(a[0].shape[2])
        return None if len(calls) - 1 == refuse[0] else real_attn(*a)

    def spying_ops(backend):
        decode_fn, prefill_fn = real_ops(backend)
        return decode_fn, lambda *a, row_lse=None: lses.append(row_lse is not None) or prefill_fn(*a, row_lse=row_lse)

    monkeypatch.setattr(cache_mod, "attention_with_lse", spying_attn)
    monkeypatch.setattr(cache_mod, "ops", spying_ops)

    def run(name, backend, step, refuse_at=None):
        calls.clear(), lses.clear()
        refuse[0] = refuse_at
        cfg = CacheConfig(**CONFIGS[name], backend=backend, max_new_tokens=NEW, seed=3)
        cache = CompressedCache(cfg, model.config, seeds=[5, 9])
        if step < T:
            cache.begin_chunked_prefill(T)
        with torch.inference_mode():
            for s in range(0, T, step):
                c = ids[:, s:s + step]
                pos = torch.arange(s, s + c.shape[1], device=device).expand(2, -1)
                out = model(input_ids=c, position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
        model.config._attn_implementation = "sdpa"
        return cache, out.logits[:, -1].float(), list(calls), list(lses)

    for name in ("h2o", "keyformer+kivi2"):
        one, one_logits, one_calls, one_lses = run(name, "triton", T)
        assert one_calls == [T] * layers and one_lses == [True] * layers, (name, one_calls, one_lses)
        ch, ch_logits, ch_calls, ch_lses = run(name, "triton", chunk)
        assert ch_calls == [min(chunk, T - s) for s in range(0, T, chunk) for _ in range(layers)], ch_calls
        assert len(ch_calls) > layers and ch_lses == [True] * layers, "the last chunk scored without the staged LSE"
        ref, ref_logits, ref_calls, ref_lses = run(name, "torch", chunk)
        assert ref_calls == [] and ref_lses == [False] * layers
        for other, logits in ((one, one_logits), (ref, ref_logits)):
            torch.testing.assert_close(ch_logits, logits, **tol)
            for i in range(layers):
                torch.testing.assert_close(ch.layers[i].store.scores.float(), other.layers[i].store.scores.float(),
                                           **tol)
                if dtype == torch.float32:
                    assert ch.kept_positions(i) == other.kept_positions(i), (name, i)
        # layer 0's second chunk (call `layers`: the calls go chunk by chunk, layer by layer) gives no LSE: that
        # layer's last chunk scores in two passes, layer 1 still with the LSE, and they keep the same
        part, part_logits, _, part_lses = run(name, "triton", chunk, refuse_at=layers)
        assert part_lses == [False, True], part_lses
        torch.testing.assert_close(part_logits, ch_logits, **tol)
        for i in range(layers):
            torch.testing.assert_close(part.layers[i].store.scores.float(), ch.layers[i].store.scores.float(), **tol)


def test_staging_bytes_is_what_a_chunked_admission_stages(device):
    """capacity.staging_bytes (what the scheduler sets aside for a chunked admission) equals the bytes the cache
    stages before its last chunk: keys, values, queries and the rows' log-sum-exp (Triton backend, where the
    attention gives it), for a scored policy; keys and values for `full`."""
    from kvstream.kvcache.capacity import staging_bytes

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = build_model("llama", hidden=128, heads=4, kv_heads=2, layers=2).to(device, dtype)
    T, chunk = 40, 16
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    for name in ("keyformer+kivi2", "full+kivi2"):
        cfg = CacheConfig(**CONFIGS[name], backend="triton", max_new_tokens=NEW, seed=3)
        cache = CompressedCache(cfg, model.config)
        cache.begin_chunked_prefill(T)
        with torch.inference_mode():
            for s in range(0, T - chunk, chunk):  # every chunk but the last
                pos = torch.arange(s, s + chunk, device=device).view(1, -1)
                model(input_ids=ids[:, s:s + chunk], position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
        model.config._attn_implementation = "sdpa"
        st = cache._staging
        staged = sum(t.numel() * t.element_size() for part in (st.k, st.v, st.q, st.lse) for t in part
                     if isinstance(t, torch.Tensor))
        assert staged == staging_bytes(cfg, model.config, T, dtype), name
