"""Teacher-forced fidelity of a compressed KV cache to the full cache.

A continuation (the full cache's greedy generation, or a reference text) is fed through `model.generate` one
token per decode step, the same path real generation takes, so eviction and quantization act exactly as they do
in generation; a logits processor forces the continuation's tokens, and the raw next-token logits of every step
are kept. Comparing them with the full cache's logits over the same tokens gives the metrics of
Keyformer (arXiv 2403.09054) / KIVI (arXiv 2402.02750) style fidelity studies: KL(full || compressed), top-1
agreement, perplexity of the continuation.

`fidelity_batch` runs a batch of prompts through every cache config of a grid. No Ray here (kvcache/ knows
nothing of Ray); the job `jobs/evaluate.py` reads the data, drives the grid and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from kvstream.kvcache.models import cache_kwarg


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id prompts into a batch.

    Returns input_ids (B, L) int64 and attention_mask (B, L) int64 (0 on padding), L = the longest prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token (got an empty prompt or batch)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class ForceTokens(LogitsProcessor):
    """Makes greedy decoding pick the given tokens: step t of row b picks tokens[b, t].

    tokens: (B, T) int64. Runs after every other processor, so the raw logits `generate` records are untouched.
    """

    def __init__(self, tokens: torch.Tensor, prompt_width: int):
        self.tokens = tokens
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        forced = self.tokens[:, min(step, self.tokens.shape[1] - 1)].to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, forced[:, None], 0.0)


@dataclass
class Decoded:
    """One `generate` run: tokens (B, T) int64 (generate's padding after a row stopped), logits (B, T, V)
    float32 (the raw next-token logits of each step), lengths (B,) int64 (tokens up to and including a row's
    first EOS, else T), and the cache object after the run (for `stats()`)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    lengths: torch.Tensor
    cache: object


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, max_new_tokens: int,
           force: torch.Tensor | None = None, eos_token_id: int | None = None) -> Decoded:
    """Greedy decoding through `model.generate` with `cache` as past_key_values, optionally teacher-forced.

    input_ids, attention_mask: (B, L) int64, left-padded. force: (B, T) int64 tokens to feed instead of the
    greedy choice (T <= max_new_tokens; rows shorter than T are padded with anything after their EOS).
    eos_token_id: rows stop after it (None: the model's generation config decides).
    """
    steps = max_new_tokens if force is None else int(force.shape[1])
    processors = LogitsProcessorList([ForceTokens(force, input_ids.shape[1])] if force is not None else [])
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) or 0
    gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=0, do_sample=False, num_beams=1,
                           repetition_penalty=1.0, output_logits=True, return_dict_in_generate=True,
                           eos_token_id=eos, pad_token_id=pad)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             **{cache_kwarg(model): cache}, generation_config=gen, logits_processor=processors)
    tokens = out.sequences[:, input_ids.shape[1]:].cpu()
    logits = torch.stack([x.float().cpu() for x in out.logits], dim=1)
    return Decoded(tokens, logits, sequence_lengths(tokens, eos), cache)


def sequence_lengths(tokens: torch.Tensor, eos) -> torch.Tensor:
    """Tokens of each row up to and including its first EOS (tokens: (B, T) int64; eos: int, list or None)."""
    b, t = tokens.shape
    lengths = torch.full((b,), t, dtype=torch.long)
    if eos is None:
        return lengths
    eos_ids = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], dtype=torch.long)
    hit = torch.isin(tokens, eos_ids)
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full((b,), t))
    return torch.minimum(lengths, first.long())


@dataclass
class TokenMetrics:
    """Per-row sums over the valid steps of a continuation, all (B,) float64: kl (KL(ref || test) in nats),
    top1 (steps whose argmax agrees), nll (negative log-likelihood of the continuation under `test`), and
    count (valid steps)."""

    kl: torch.Tensor
    top1: torch.Tensor
    nll: torch.Tensor
    count: torch.Tensor


def token_metrics(ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor,
                  lengths: torch.Tensor) -> TokenMetrics:
    """Compare next-token distributions step by step over the first lengths[b] steps of each row.

    ref_logits, test_logits: (B, T, V) float (the full cache's and the compressed cache's logits over the same
    forced tokens); targets: (B, T) int64, the continuation token each step predicts; lengths: (B,) int64.
    """
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"token_metrics: logits shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    t = ref_logits.shape[1]
    valid = (torch.arange(t)[None, :] < lengths[:, None]).double()  # (B, T)
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    log_q = torch.log_softmax(test_logits.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # (B, T)
    top1 = (ref_logits.argmax(-1) == test_logits.argmax(-1)).double()
    nll = -log_q.gather(-1, targets[:, :t, None].long()).squeeze(-1)
    return TokenMetrics(kl=(kl * valid).sum(1), top1=(top1 * valid).sum(1), nll=(nll * valid).sum(1),
                        count=valid.sum(1))


def make_cache(cache_cfg, model, seeds: list[int] | None = None):
    """A fresh cache for one batch: `kvcache.CompressedCache(cache_cfg, model.config, seeds)`.

    Until CompressedCache exists, policy=full with quant=none falls back to transformers' DynamicCache.
    """
    try:
        from kvstream.kvcache import CompressedCache
    except ImportError:
        CompressedCache = None
    if CompressedCache is not None:
        return CompressedCache(cache_cfg, model.config, seeds=seeds)
    if cache_cfg.policy == "full" and cache_cfg.quant == "none":
        from transformers import DynamicCache

        return DynamicCache()
    raise RuntimeError(f"kvstream.kvcache.CompressedCache is not available; cannot evaluate policy={cache_cfg.policy} "
                       f"quant={cache_cfg.quant} (only policy=full quant=none runs on transformers' DynamicCache)")


def cache_bytes(cache, seen: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per-row (kv_bytes, kv_bytes_full) after a run; seen: (B,) int64 tokens each row fed into the cache.

    Uses `cache.stats()` where the cache has it; transformers' DynamicCache (the full-cache fallback) holds every
    token at full precision, so both equal seen x bytes per token.
    """
    if hasattr(cache, "stats"):
        s = cache.stats()
        if "kv_bytes_per_seq" in s and "kv_bytes_full_per_seq" in s:
            return [int(x) for x in s["kv_bytes_per_seq"]], [int(x) for x in s["kv_bytes_full_per_seq"]]
        n = len(seen)
        return [int(s["kv_bytes"]) // n] * n, [int(s["kv_bytes_full"]) // n] * n
    per_token = 0
    for layer in cache.layers:
        k, v = layer.keys, layer.values  # (B, H_kv, T, D)
        per_token += (k[:, :, :1].numel() * k.element_size() + v[:, :, :1].numel() * v.element_size()) // k.shape[0]
    full = [int(x) * per_token for x in seen]
    return full, list(full)


def rouge_f(scorer, prediction: str, references: list[str]) -> dict[str, float]:
    """Best F-measure over the references for each metric of a `rouge_score.rouge_scorer.RougeScorer`."""
    best: dict[str, float] = {}
    for ref in references:
        for k, s in scorer.score(ref, prediction).items():
            best[k] = max(best.get(k, 0.0), s.fmeasure)
    return best


def fidelity_batch(model, prompts: list[list[int]], cells: list, max_new_tokens: int, pad_id: int,
                   text_of: Callable, seeds: list[int] | None = None, continuations: list[list[int]] | None = None,
                   references: list[list[str]] | None = None) -> list[list[dict]]:
    """Every cache config of `cells` (CacheConfig objects) on one batch of prompts.

    The reference is the full cache (CacheConfig(policy=full, quant=none) with the cells' other fields). The
    continuation fed by teacher forcing is the full cache's greedy generation of max_new_tokens (stopping at
    EOS), or `continuations` (token ids, <= max_new_tokens each) when given. text_of: token ids -> str, for ROUGE.
    Returns, per cell, one dict per prompt: kl_sum, top1_sum, nll_sum, n_tokens (sums over the continuation),
    kv_bytes, kv_bytes_full, seconds (this cell's time per prompt), rougeL_vs_full (compressed vs full greedy
    generation) and rouge{1,2,L}_ref (compressed generation vs `references`, NaN without).
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    m, b = int(max_new_tokens), len(prompts)
    ids, mask = left_pad(prompts, pad_id)
    full_cfg = dataclasses.replace(cells[0], policy="full", budget=1.0, quant="none")
    ref = decode(model, ids, mask, make_cache(full_cfg, model, seeds), m)
    full_text = [text_of(ref.tokens[i, : ref.lengths[i]].tolist()) for i in range(b)]
    if continuations is None:
        cont, lengths, ref_logits = ref.tokens, ref.lengths, ref.logits
    else:
        if any(not 1 <= len(c) <= m for c in continuations):
            raise ValueError(f"fidelity_batch: every continuation needs 1..{m} tokens (max_new_tokens)")
        cont = torch.tensor([list(c) + [int(pad_id)] * (m - len(c)) for c in continuations], dtype=torch.long)
        lengths = torch.tensor([len(c) for c in continuations], dtype=torch.long)
        ref_logits = decode(model, ids, mask, make_cache(full_cfg, model, seeds), m, force=cont).logits
    out = []
    for cc in cells:
        t0 = time.perf_counter()
        forced = decode(model, ids, mask, make_cache(cc, model, seeds), m, force=cont)
        steps = forced.logits.shape[1]
        tm = token_metrics(ref_logits[:, :steps], forced.logits, cont[:, :steps], lengths.clamp(max=steps))
        kv, kv_full = cache_bytes(forced.cache, mask.sum(1) + steps - 1)
        free = decode(model, ids, mask, make_cache(cc, model, seeds), m)
        seconds = (time.perf_counter() - t0) / b
        rows = []
        for i in range(b):
            text = text_of(free.tokens[i, : free.lengths[i]].tolist())
            vs_ref = rouge_f(scorer, text, references[i]) if references and references[i] else {}
            rows.append(dict(kl_sum=float(tm.kl[i]), top1_sum=float(tm.top1[i]), nll_sum=float(tm.nll[i]),
                             n_tokens=int(tm.count[i]), kv_bytes=kv[i], kv_bytes_full=kv_full[i], seconds=seconds,
                             rougeL_vs_full=rouge_f(scorer, text, [full_text[i]])["rougeL"],
                             **{f"{k}_ref": vs_ref.get(k, math.nan) for k in ("rouge1", "rouge2", "rougeL")}))
        out.append(rows)
    return out
