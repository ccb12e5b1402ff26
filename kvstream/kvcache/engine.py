"""Engine: batched generation over a transformers causal LM with a compressed KV cache.

The API the pipeline calls. On the fast path (the Llama family: `kvstream.kvcache.fast_decode`, a static step,
CUDA-graph captured on CUDA, device sampling) each call's prompts are requests of a continuous-batching Scheduler
(`kvstream.kvcache.scheduler`) whose pool holds as many sequences as the GPU memory fits: each prompt prefilled
alone, decoded beside the others, a finished row's slot taken by the next prompt. Other families: the prompts are
left-padded into one batch, prefilled into a fresh `CompressedCache` and decoded by transformers' `model.generate`
over it (`CacheConfig.engine`). Every row is cut at EOS or a stop string.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

import torch
from transformers import StoppingCriteria

from kvstream.kvcache.cache import CompressedCache, check_model_config
from kvstream.kvcache.config import ENGINE_SETTINGS, CacheConfig, engine_settings
from kvstream.kvcache.fast_decode import unsupported_reason
from kvstream.kvcache.forward import compact_forward
from kvstream.kvcache.models import cache_kwarg, decode_continuation, load_model, max_context
from kvstream.kvcache.storage import to_device

log = logging.getLogger(__name__)


class Engine:
    """Batched generation with a compressed KV cache.

    Build with `Engine.from_pretrained(model, tokenizer=None, cache=cfg, dtype=None, device=None, **settings)`.
    Attributes: `model` (transformers PreTrainedModel, eval mode), `tokenizer` (the protocol of kvcache.models,
    or None when built from a model object alone), `cache_config` (CacheConfig), `device`, `max_context`, and the
    fast path's settings (`engine_settings`: `gpu_memory_utilization`, `max_num_seqs`, `prefill_tokens`;
    `settings()` returns them).
    """

    def __init__(self, model, tokenizer=None, cache: CacheConfig | dict | None = None, *,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int | None = None,
                 prefill_tokens: int | None = None):
        settings = engine_settings(dict(gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                                        prefill_tokens=prefill_tokens))
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise ValueError(f"model {type(model).__name__} cannot generate text: pass a causal LM (e.g. a "
                             f"*ForCausalLM), its path or hub id, or a llama2.c checkpoint")
        self.model = model
        self.tokenizer = tokenizer
        self.cache_config = _cache_config(cache)
        check_model_config(self.cache_config, model.config.get_text_config())  # unsupported family: a clear error
        self.device = next(model.parameters()).device
        self.max_context = max_context(model.config)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = [] if eos is None else sorted({int(e) for e in (eos if isinstance(eos, list) else [eos])})
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = model.generation_config.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])
        self.decode_path = self._decode_path()
        if self.decode_path == "fast":  # the weights concatenated now, before the slot pool is sized from free memory
            compact_forward(model)
        self.last_graph: bool | None = None  # whether the last fast decode ran as CUDA-graph replays
        self.last_num_slots: int | None = None  # sequences the last fast generate decoded together
        self.gpu_memory_utilization: float = settings["gpu_memory_utilization"]  # what the slot pool may fill
        self.max_num_seqs: int | None = settings["max_num_seqs"]  # at most this many sequences decoded together
        self.prefill_tokens: int | None = settings["prefill_tokens"]  # chunked prefill: prompt tokens per step
        self.record_timing = False  # benchmarks: GPU prefill / decode seconds of the last fast generate
        self.last_timing: dict | None = None

    def settings(self) -> dict:
        """The fast path's settings (ENGINE_SETTINGS' keys), e.g. for another Engine over the same model."""
        return {k: getattr(self, k) for k in ENGINE_SETTINGS}

    def _decode_path(self) -> str:
        """"fast" or "hf", from CacheConfig.engine and what the model allows (a log line says why not fast)."""
        want = self.cache_config.engine
        if want == "hf":
            return "hf"
        reason = unsupported_reason(self.model)
        if reason is None:
            return "fast"
        if want == "fast":
            raise ValueError(f"CacheConfig.engine='fast': {reason}; use engine='auto' or 'hf' for this model")
        log.info("kvstream: decoding through transformers' generate: %s", reason)
        return "hf"

    @classmethod
    def from_pretrained(cls, model, tokenizer=None, cache: CacheConfig | dict | None = None, dtype=None,
                        device=None, **settings) -> "Engine":
        """model: hub id, local transformers directory, llama2.c `.bin` (tokenizer= its tokenizer `.bin`), or a
        PreTrainedModel (tokenizer optional; without one, prompts must be token ids). cache: CacheConfig or dict
        (None: policy full). dtype: None/"auto" (the checkpoint's; fp32 for llama2.c), "float32", "bfloat16",
        "float16". device: None = cuda if available, else cpu. settings: the fast path's (`engine_settings`:
        gpu_memory_utilization, max_num_seqs, prefill_tokens)."""
        cfg = _cache_config(cache)  # fail on a bad cache config or setting before loading weights
        engine_settings(settings, "Engine.from_pretrained")
        model, tok = load_model(model, tokenizer, dtype=dtype, device=device)
        return cls(model, tok, cfg, **settings)

    # ---- prompts -------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt, max_new_tokens: int = 128) -> list[int]:
        """Token ids of one prompt (a string, tokenized with BOS, or a list of ids used as given); ValueError if
        it is empty, has ids outside the vocabulary, or leaves no room for max_new_tokens in max_context."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer: pass tokenizer= to Engine.from_pretrained, or "
                                 "pass prompts as lists of token ids")
            if not prompt:
                raise ValueError("empty prompt: give at least one character of text")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError("empty prompt: give at least one token id")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        else:
            raise ValueError(f"a prompt must be a str or a list of token ids, not {type(prompt).__name__}")
        limit = self.max_context - max_new_tokens
        if len(ids) > limit:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit: max_context {self.max_context} - "
                             f"max_new_tokens {max_new_tokens} leaves {limit}; shorten or truncate the prompt, or "
                             f"lower max_new_tokens")
        return ids

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | str | None = None, seed: int = 0) -> list[dict]:
        """Generate a continuation of every prompt.

        prompts: list of str or of token-id lists. temperature 0 is greedy; > 0 samples (with top_p), seeded by
        `seed` (a row's output depends on its prompt, settings and seed, not on its batch-mates). stop: strings that end a row; the text is cut
        before the stop string, token_ids keep the token that completed it. EOS ends a row (counted, not decoded).
        Returns one dict per prompt: generated_text (str), token_ids (list[int]), num_input_tokens,
        num_generated_tokens (== len(token_ids)), time_taken_llm (s: on the fast path from the row's admission to its end, else the batch's generate wall time), kv_bytes and
        kv_bytes_full (the row's KV cache bytes held vs a full-precision cache of the same tokens).
        """
        _check_sampling(max_new_tokens, temperature, top_p, seed)
        stops = _stop_list(stop)
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass tokenizer= to Engine.from_pretrained")
        ids = [self.prompt_ids(p, max_new_tokens) for p in prompts]
        if self.decode_path == "fast":
            return self._generate_scheduled(ids, max_new_tokens, temperature, top_p, stops, seed)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        cfg = dataclasses.replace(self.cache_config, max_new_tokens=max_new_tokens)
        cache = CompressedCache(cfg, self.model.config, seeds=[_row_seed(cfg.seed, seed, x) for x in ids])
        t0 = time.perf_counter()
        gen_ids = self._decode_hf(cache, input_ids, mask, max_new_tokens, temperature, top_p, stops, seed)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        stats = cache.stats()
        held, full = stats["kv_bytes_per_seq"], stats["kv_bytes_full_per_seq"]
        rows = []
        for i, x in enumerate(ids):
            gen = _cut_at_eos(gen_ids[i], self.eos_token_ids)
            text, gen = self._text(x, gen, stops)
            rows.append({
                "generated_text": text, "token_ids": gen, "num_input_tokens": len(x),
                "num_generated_tokens": len(gen), "time_taken_llm": elapsed,
                "kv_bytes": int(held[i]), "kv_bytes_full": int(full[i]),
            })
        return rows

    def scheduler(self, num_prompts: int, longest: int, max_new_tokens: int):
        """The Scheduler `generate` runs for a call of `num_prompts` prompts of at most `longest` tokens: as many
        slots as fit (on CUDA: from the memory left beside the weights; on CPU: one a prompt), at most
        max_num_seqs and num_prompts. (Benchmarks warm a call's kernels up on the same shapes through it.)"""
        from kvstream.kvcache.scheduler import Scheduler

        if self.device.type == "cuda":
            from kvstream.kvcache.capacity import slots_that_fit

            cfg = dataclasses.replace(self.cache_config, max_new_tokens=max_new_tokens)
            dtype = next(self.model.parameters()).dtype
            slots = min(num_prompts, slots_that_fit(cfg, self.model, longest, max_new_tokens, dtype, self.device,
                                                    self.gpu_memory_utilization, self.prefill_tokens is not None))
        else:
            slots = num_prompts
        slots = min(slots, self.max_num_seqs or slots)
        return Scheduler(self, slots, longest, max_new_tokens, gpu_memory_utilization=self.gpu_memory_utilization,
                         timing=self.record_timing, prefill_tokens=self.prefill_tokens)

    def _generate_scheduled(self, ids, max_new_tokens, temperature, top_p, stops, seed) -> list[dict]:
        """The fast path: every prompt a request of one continuous-batching Scheduler whose pool holds as many
        sequences as fit (on CUDA: `num_slots="auto"` from the memory left beside the weights; on CPU: all), and
        at most max_num_seqs, so a batch larger than memory streams through the slots instead of failing."""
        from kvstream.kvcache.scheduler import Request

        sched = self.scheduler(len(ids), max(len(x) for x in ids), max_new_tokens)
        for i, x in enumerate(ids):
            sched.add(Request(str(i), x, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop=stops, seed=seed))
        rows: dict[str, dict] = {}
        while sched.has_work():
            for row in sched.step():
                rows[row.pop("id")] = row
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_graph, self.last_num_slots = sched.runner.use_graph, sched.num_slots
        self.last_timing = sched.timing() if self.record_timing else None
        out = []
        for i in range(len(ids)):
            row = rows[str(i)]
            del row["finish_reason"]
            out.append(row)
        return out

    def prefill(self, cache: CompressedCache, input_ids: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The model's forward over a left-padded batch (B, T) into `cache` -> last-position logits (B, V). mask None:
        the rows are unpadded, and on the fast path the compact forward (`kvstream.kvcache.forward`) runs it."""
        fwd = self._compact()
        T = input_ids.shape[1]
        if mask is None and fwd is not None and (fwd.window or T) >= T:
            ids = to_device(input_ids, input_ids.dtype, self.device)  # no sync: admissions run beside decoding
            return fwd(ids, torch.arange(T, device=self.device).expand(ids.shape[0], T), cache)
        if mask is None:
            mask = torch.ones_like(input_ids)
        ids, m = input_ids.to(self.device), mask.to(self.device)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)  # what generate passes for a left-padded batch
        out = self.model(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{cache_kwarg(self.model): cache})
        return out.logits[:, -1]

    def prefill_chunk(self, cache: CompressedCache, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """One chunk of an unpadded prompt (B, c) at positions start .. start + c - 1 into a cache in chunked
        prefill (`CompressedCache.begin_chunked_prefill`) -> the chunk's last-position logits (B, V)."""
        ids = to_device(input_ids, input_ids.dtype, self.device)
        pos = torch.arange(start, start + ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        fwd = self._compact()
        if fwd is not None:
            return fwd(ids, pos, cache)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{cache_kwarg(self.model): cache})
        return out.logits[:, -1]

    def _compact(self):
        """The model's compact forward on the fast path (`kvstream.kvcache.forward`), else None."""
        return compact_forward(self.model) if self.decode_path == "fast" else None

    def _decode_hf(self, cache, input_ids, mask, max_new_tokens, temperature, top_p, stops, seed) -> list[list[int]]:
        """transformers' generate over the CompressedCache (the reference path)."""
        width = input_ids.shape[1]
        criteria = [StopStrings(self.tokenizer, stops, width)] if stops else []
        with torch.inference_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                **{cache_kwarg(self.model): cache},
                generation_config=self._generation_config(max_new_tokens, temperature, top_p),
                stopping_criteria=criteria or None,
            )
        return out[:, width:].tolist()

    def _text(self, prompt: list[int], gen: list[int], stops: list[str]) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            return "", gen
        body = gen[:-1] if gen and gen[-1] in self.eos_token_ids else gen
        if stops:
            cut = cut_at_stop(self.tokenizer, prompt, body, stops)
            if cut is not None:
                return cut
        return decode_continuation(self.tokenizer, prompt, body), gen

    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float):
        from transformers import GenerationConfig

        sample = temperature > 0
        # Every knob set explicitly, so a hub model's generation_config.json cannot change the decoding rule.
        knobs = dict(temperature=float(temperature), top_p=float(top_p), top_k=0) if sample else {}
        return GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample, num_beams=1, repetition_penalty=1.0,
            no_repeat_ngram_size=0, eos_token_id=self.eos_token_ids or None, pad_token_id=self.pad_token_id,
            use_cache=True, **knobs,
        )

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []


def _cache_config(cache) -> CacheConfig:
    if cache is None:
        return CacheConfig()
    if isinstance(cache, CacheConfig):
        return cache
    try:
        return CacheConfig.from_dict(cache)
    except TypeError as e:
        raise ValueError(f"cache={cache!r}: pass a CacheConfig or a dict of its fields ({e})") from None


def _check_sampling(max_new_tokens, temperature, top_p, seed) -> None:
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1]")
    if not is_int(seed):
        raise ValueError(f"seed={seed!r} must be an int")


def _stop_list(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop={stop!r}: stop strings must be non-empty strings")
    return stops


def _row_seed(cache_seed: int, seed: int, ids: list[int]) -> int:
    """A row's Keyformer noise seed: fixed by (cfg.seed, seed, prompt), so it does not depend on batch-mates."""
    h = hashlib.blake2b(repr((int(cache_seed), int(seed), ids)).encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


def _cut_at_eos(gen: list[int], eos_ids: list[int]) -> list[int]:
    for j, t in enumerate(gen):
        if t in eos_ids:
            return gen[:j + 1]
    return gen


class StopStrings(StoppingCriteria):
    """Ends a row once its generated text contains a stop string (checked on the last few tokens each step)."""

    def __init__(self, tokenizer, stops: list[str], prompt_width: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, prompt_width
        self.window = max(len(s.encode("utf-8")) for s in stops) + 2  # a token holds >= 1 byte of text

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = max(self.start, input_ids.shape[1] - self.window)  # generated tokens that may end a stop string
        done = []
        for row in input_ids[:, max(0, tail - 4):].tolist():
            split = len(row) - (input_ids.shape[1] - tail)
            text = decode_continuation(self.tokenizer, row[:split], row[split:])
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(tokenizer, prompt: list[int], gen: list[int], stops: list[str]):
    """(text before the first stop string, the shortest prefix of gen whose text holds it), or None if none does."""

    def text_of(k: int) -> str:
        return decode_continuation(tokenizer, prompt, gen[:k])

    if not any(s in text_of(len(gen)) for s in stops):
        return None
    lo, hi = 1, len(gen)
    while lo < hi:  # holding a stop string only grows with k
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if any(s in text_of(mid) for s in stops) else (mid + 1, hi)
    text = text_of(lo)
    return text[:min(text.find(s) for s in stops if s in text)], gen[:lo]
