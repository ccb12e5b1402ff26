"""kvstream inside any Ray Data pipeline: a processor shaped like `ray.data.llm`'s.

    from kvstream.pipeline import KVStreamProcessorConfig, build_processor
    config = KVStreamProcessorConfig(model_source="demo:tiny-llama", cache={"policy": "keyformer", "budget": 0.5},
                                     batch_size=16, concurrency=1)
    processor = build_processor(config,
        preprocess=lambda row: dict(prompt="Summarize:\n" + row["text"], sampling_params=dict(max_tokens=64)),
        postprocess=lambda row: dict(id=row["id"], summary=row["generated_text"], error=row["error"]))
    ds = processor(ray.data.read_parquet("docs/"))          # lazy: nothing runs until ds is consumed

Composed lazily as ray.data.llm's Processor (ray `python/ray/llm/_internal/batch/processor/base.py`): preprocess
(merged into the row) -> requests + tokenize + length policy (kvstream/pipeline/requests.py) -> generate (actor
pool, one Engine per actor, rows grouped by their settings: kvstream/pipeline/generate_requests.py) -> postprocess.
Differences from ray.data.llm: the error column is `error` (null when fine), failed rows go through the
postprocess too (generated_text null, `error` set), which keeps one schema; the output keeps `error` unless the
postprocess returns its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import pyarrow as pa

from kvstream.pipeline.config import DTYPES, TRUNCATIONS, ConfigError
from kvstream.pipeline.requests import SAMPLING_DEFAULTS, sampling_params


@dataclass
class KVStreamProcessorConfig:
    """The processor's configuration; validates on construction (ConfigError, a ValueError, naming the field).

    model_source: hub id | local transformers dir | llama2.c `.bin` (tokenizer= its `.bin`) | demo:tiny-llama.
    cache: kvcache.CacheConfig fields (policy, budget, quant, ...), validated by CacheConfig.
    sampling_params: defaults under each row's own `sampling_params` (max_tokens, temperature, top_p, stop, seed).
    batch_size: rows per generation batch (rows with different settings are generated as separate groups).
    sort_window: None, or sort the rows by prompt length within windows of this many rows before generation, so
        that a batch holds prompts of similar lengths (less padding; rows then come out in that order).
    concurrency: generation actors, an int or (min, max) for an autoscaling pool.
    accelerator_type: e.g. "H100" (Ray's accelerator_type); None = any. num_gpus: GPUs per actor (None: 1 with an
        accelerator_type, else 0 = CPU mode). num_cpus: CPUs per actor.
    max_input_tokens, truncation: the length policy (None: the model's context - the row's max_tokens; head | tail
        | middle | reject, as the jobs' generate.truncation).
    apply_chat_template: render `messages` rows with the tokenizer's chat template (where it has one); False: the
        plain `role: content` turns. should_continue_on_error: a failing row carries its `error`; False: it raises.
    engine_kwargs: the engine's settings (ray.data.llm's name for them), each optional: gpu_memory_utilization
        (the share of GPU memory the slot pool may fill, default 0.9), max_num_seqs (at most this many sequences
        decoded together; default as many as fit), prefill_tokens (chunked prefill: prompt tokens admitted per
        decode step; default each prompt whole). A generation batch is one call of the engine: on a GPU, a large
        batch_size (hundreds of rows) keeps its slots full.
    """

    model_source: str
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    cache: dict = field(default_factory=lambda: {"policy": "full", "quant": "none"})
    sampling_params: dict = field(default_factory=dict)
    batch_size: int = 32
    sort_window: Optional[int] = None
    concurrency: Union[int, tuple] = 1
    accelerator_type: Optional[str] = None
    num_gpus: Optional[float] = None
    num_cpus: float = 1.0
    max_input_tokens: Optional[int] = None
    truncation: str = "middle"
    apply_chat_template: bool = True
    should_continue_on_error: bool = True
    engine_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"KVStreamProcessorConfig.{key}={getattr(self, key)!r}: {msg}")

        def pos_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        need(isinstance(self.model_source, str) and bool(self.model_source), "model_source",
             "set a hub id, a local model dir, a llama2.c .bin or demo:tiny-llama")
        need(self.tokenizer is None or isinstance(self.tokenizer, str), "tokenizer", "must be a path or None")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        need(isinstance(self.cache, dict), "cache",
             "must be a dict of kvcache.CacheConfig fields (policy, budget, ...)")
        self.cache_config()
        need(isinstance(self.sampling_params, dict), "sampling_params",
             f"must be a dict of {', '.join(SAMPLING_DEFAULTS)}")
        try:
            self.sampling_params = sampling_params(self.sampling_params, SAMPLING_DEFAULTS,
                                                   "KVStreamProcessorConfig.sampling_params")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        need(pos_int(self.batch_size), "batch_size", "must be an int >= 1")
        need(self.sort_window is None or pos_int(self.sort_window), "sort_window", "must be an int >= 1, or None")
        if isinstance(self.concurrency, list):
            self.concurrency = tuple(self.concurrency)
        need(pos_int(self.concurrency) or (isinstance(self.concurrency, tuple) and len(self.concurrency) == 2 and all(
            map(pos_int, self.concurrency)) and self.concurrency[0] <= self.concurrency[1]), "concurrency",
            "must be an int >= 1 or a (min, max) pair with 1 <= min <= max")
        need(self.accelerator_type is None or (isinstance(self.accelerator_type, str) and bool(self.accelerator_type)),
             "accelerator_type", "must be an accelerator name such as 'H100', or None")
        if self.num_gpus is None:
            self.num_gpus = 1.0 if self.accelerator_type else 0.0
        need(isinstance(self.num_gpus, (int, float)) and not isinstance(self.num_gpus, bool) and self.num_gpus >= 0,
             "num_gpus", "must be a number >= 0 (0 = CPU mode)")
        need(not (self.accelerator_type and self.num_gpus == 0), "num_gpus",
             f"is 0 (CPU mode) but accelerator_type={self.accelerator_type!r} asks for an accelerator; "
             f"set num_gpus > 0")
        need(isinstance(self.num_cpus, (int, float)) and not isinstance(self.num_cpus, bool) and self.num_cpus > 0,
             "num_cpus", "must be a number > 0")
        need(self.max_input_tokens is None or pos_int(self.max_input_tokens), "max_input_tokens",
             "must be an int >= 1, or None (the model's context - max_tokens)")
        need(self.truncation in TRUNCATIONS, "truncation", f"must be one of {', '.join(TRUNCATIONS)}")
        need(isinstance(self.apply_chat_template, bool), "apply_chat_template", "must be True or False")
        need(isinstance(self.should_continue_on_error, bool), "should_continue_on_error", "must be True or False")
        need(isinstance(self.engine_kwargs, dict), "engine_kwargs",
             "must be a dict of engine settings (gpu_memory_utilization, max_num_seqs, prefill_tokens)")
        from kvstream.kvcache.config import engine_settings

        try:
            self.engine_kwargs = engine_settings(self.engine_kwargs, "KVStreamProcessorConfig.engine_kwargs")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def cache_config(self):
        from kvstream.kvcache import CacheConfig

        try:
            return CacheConfig.from_dict(dict(self.cache))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"KVStreamProcessorConfig.cache={self.cache!r}: {e}") from None

    def model_spec(self) -> dict:
        return {"path": self.model_source, "tokenizer": self.tokenizer, "dtype": self.dtype}


class KVStreamProcessor:
    """`processor(ds) -> ds`: preprocess + requests -> generate -> postprocess, added to `ds` lazily."""

    def __init__(self, config: KVStreamProcessorConfig, context: int, preprocess: Optional[Callable] = None,
                 postprocess: Optional[Callable] = None, prepare_extras: Optional[dict] = None,
                 generate_extras: Optional[dict] = None):
        """`prepare_extras` / `generate_extras`: the jobs' own settings for PrepareRequests (chat, keep_errors,
        keys) and GenerateRequests (inject, tag_rows); see kvstream/pipeline/job.py."""
        from kvstream.pipeline.generate_requests import GenerateRequests
        from kvstream.pipeline.requests import PrepareRequests

        c = config
        self.config, self.preprocess, self.postprocess = c, preprocess, postprocess
        cache = c.cache_config().to_dict()
        self.prepare = PrepareRequests(c.model_spec(), c.sampling_params, cache["policy"], c.apply_chat_template,
                                       c.max_input_tokens, context, c.truncation, preprocess,
                                       c.should_continue_on_error, **(prepare_extras or {}))
        self.generate = GenerateRequests(c.model_spec(), cache, c.concurrency, c.num_gpus, c.num_cpus, c.batch_size,
                                         c.accelerator_type, c.should_continue_on_error,
                                         engine=c.engine_kwargs, **(generate_extras or {}))

    def __call__(self, ds):
        if self.preprocess is None:
            schema = ds.schema(fetch_if_missing=False)  # known without running anything (e.g. from_items)
            if schema is not None and not {"prompt", "messages"} & set(schema.names):
                raise ValueError(f"kvstream processor: required column 'prompt' (str) or 'messages' (list of {{role, "
                                 f"content}}) missing from its input (it has: {', '.join(schema.names)}); map one in "
                                 f"with build_processor(config, preprocess=...)")
        c = self.config
        ds = ds.map_batches(self.prepare, batch_format="pyarrow", batch_size=c.sort_window or c.batch_size)
        if c.sort_window:
            from kvstream.pipeline.stage import SortByLength

            ds = ds.map_batches(SortByLength(c.sort_window), batch_format="pyarrow", batch_size=c.sort_window)
            ds = ds.repartition(target_num_rows_per_block=c.batch_size)  # one block per generation batch, spread
        ds = self.generate.apply(ds)
        if self.postprocess is not None:
            ds = ds.map_batches(_Postprocess(self.postprocess), batch_format="pyarrow")
        return ds


class _Postprocess:
    """The user's postprocess on every row (failed rows too); the output keeps `error` unless it sets its own."""

    def __init__(self, fn: Callable[[dict], dict]):
        self.fn = fn

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for row in table.to_pylist():
            out = self.fn(dict(row))
            if not isinstance(out, dict):
                raise TypeError(f"postprocess must return a dict of columns, not {type(out).__name__}")
            rows.append({**out, "error": out.get("error", row["error"])})
        names = list(dict.fromkeys(k for r in rows for k in r))
        return pa.table({c: [r.get(c) for r in rows] for c in names})


def build_processor(config: KVStreamProcessorConfig, preprocess: Optional[Callable[[dict], dict]] = None,
                    postprocess: Optional[Callable[[dict], dict]] = None, **extras) -> KVStreamProcessor:
    """A processor for `config` (ray.data.llm's `build_processor` shape). Checks on the driver, reading the model's
    config without weights: the cache fits the model (family, head_dim vs group size) and max_input_tokens + the
    default max_tokens fit its context. ConfigError (a ValueError) naming the field otherwise. `extras`: the
    `prepare_extras` / `generate_extras` of KVStreamProcessor (the jobs: kvstream/pipeline/job_processor.py)."""
    from kvstream.kvcache.cache import check_model_config
    from kvstream.pipeline.models import model_config, model_context

    if not isinstance(config, KVStreamProcessorConfig):
        raise TypeError(f"build_processor: config must be a KVStreamProcessorConfig, not {type(config).__name__}")
    for name, fn in (("preprocess", preprocess), ("postprocess", postprocess)):
        if fn is not None and not callable(fn):
            raise TypeError(f"build_processor: {name} must be a function row -> dict, not {type(fn).__name__}")
    c = config.cache_config()
    try:
        check_model_config(c, model_config(config.model_source, config.tokenizer))
        context = model_context(config.model_source)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"KVStreamProcessorConfig.model_source={config.model_source!r} with cache "
                          f"(policy={c.policy}, quant={c.quant}, group_size={c.group_size}): {e}") from None
    m = config.sampling_params["max_tokens"]
    if (config.max_input_tokens or 1) + m > context:
        raise ConfigError(f"KVStreamProcessorConfig.max_input_tokens={config.max_input_tokens} + sampling_params."
                          f"max_tokens={m} exceeds the model's {context}-token context; lower one of them")
    return KVStreamProcessor(dataclasses.replace(config), context, preprocess, postprocess, **extras)
