"""The processor's generation stage: an actor pool of `GenerateUDF`s (one Engine each, OOM batch splitting and
per-row errors from kvstream/pipeline/generate.py), where each batch's rows are grouped by their request's settings.

`Engine.generate` takes one set of sampling parameters and one cache config per call, so the rows of a batch with
the same `_params` (sampling params + kv_cache budget, see requests.py) go to one call, each group to its own. A
row's output does not depend on its batch-mates (its seed and cache plan are its own), so the grouping is exact.
A row with its own `kv_cache` budget runs on an Engine over the same model object whose CacheConfig differs only
in `budget` (built once per budget and kept).
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa

from kvstream.pipeline.generate import GenerateUDF
from kvstream.pipeline.requests import IDS, OUTPUT_COLUMNS, PARAMS
from kvstream.pipeline.stage import Stage, replace_column

RESULT_TYPES = {"generated_text": pa.string(), "num_generated_tokens": pa.int64(), "time_taken_llm": pa.float64(),
                "kv_bytes": pa.int64(), "kv_bytes_full": pa.int64()}
OUTPUT_TYPES = {**RESULT_TYPES, "num_input_tokens": pa.int64(), "truncated": pa.bool_(), "error": pa.string()}


class RowFailed(RuntimeError):
    """A row failed and the processor was built with should_continue_on_error=False."""


class GenerateRequestsUDF(GenerateUDF):
    """Ray Data class UDF: `__init__` builds the Engine (GenerateUDF's), `__call__` generates each group of a batch."""

    def __init__(self, model: dict, cache: dict, num_gpus: float, num_cpus: float, continue_on_error: bool = True,
                 inject: dict | None = None, tag_rows: bool = False, engine: dict | None = None):
        super().__init__(model, cache, {}, num_gpus, num_cpus, inject, engine)
        self.continue_on_error, self.tag_rows = continue_on_error, tag_rows
        self.engines = {None: self.engine}
        self.params: dict = {}

    def engine_for(self, budget: float | int | None):
        if budget not in self.engines:
            from kvstream.kvcache.engine import Engine

            base = self.engine
            cfg = dataclasses.replace(base.cache_config, budget=budget)
            self.engines[budget] = Engine(base.model, base.tokenizer, cfg, **base.settings())
        return self.engines[budget]

    def _engine_generate(self, ids: list[list[int]]) -> list[dict]:
        self._inject_oom(ids)
        p = self.params  # the group's, set by __call__ before GenerateUDF.run
        return self.engine_for(p["kv_cache"]).generate(
            ids, max_new_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
            stop=p["stop"] or None, seed=p["seed"])

    def __call__(self, table: pa.Table) -> pa.Table:
        GenerateRequests.check(table)
        self._maybe_crash()
        self.batches += 1
        ids, params, errors = table[IDS].to_pylist(), table[PARAMS].to_pylist(), table["error"].to_pylist()
        groups: dict[str, list[int]] = {}
        for i, (key, err) in enumerate(zip(params, errors)):
            if err is None:
                groups.setdefault(key, []).append(i)
        out = {name: [None] * table.num_rows for name in RESULT_TYPES}
        n_in = table["num_input_tokens"].to_pylist()
        for key, rows in groups.items():
            self.params = json.loads(key)
            for i, res in zip(rows, self.run([ids[i] for i in rows])):
                if isinstance(res, str):
                    errors[i] = res
                    continue
                for name in RESULT_TYPES:
                    out[name][i] = res[name]
                n_in[i] = int(res["num_input_tokens"])
        if not self.continue_on_error:
            failed = [e for e in errors if e is not None]
            if failed:
                raise RowFailed(f"kvstream processor: {len(failed)} row(s) of a batch failed, the first: {failed[0]} "
                                f"(should_continue_on_error=True keeps going with the error in the row's error column)")
        result = table.drop_columns([IDS, PARAMS, "num_input_tokens", "truncated", "error"])
        cols = {**out, "num_input_tokens": n_in, "truncated": table["truncated"].to_pylist(), "error": errors}
        for name in OUTPUT_COLUMNS:  # ray.data.llm's names first, then ours
            result = replace_column(result, name, cols[name], OUTPUT_TYPES[name])
        if self.tag_rows:  # the jobs' cache columns and the actor for their per-actor stats
            for name, value in (("policy", self.cache_cfg.policy), ("quant", self.cache_cfg.quant),
                                ("_actor", self.actor)):
                result = replace_column(result, name, [value] * result.num_rows, pa.string())
        return result

class GenerateRequests(Stage):
    """The stage object: the columns it needs and the actor pool (`concurrency` actors, `num_gpus` each)."""

    name = "generate_requests"
    required = ("error", "truncated", "num_input_tokens", IDS, PARAMS)

    def __init__(self, model: dict, cache: dict, concurrency: int | tuple[int, int], num_gpus: float,
                 num_cpus: float, batch_size: int, accelerator_type: str | None = None,
                 continue_on_error: bool = True, inject: dict | None = None, tag_rows: bool = False,
                 engine: dict | None = None):
        self.ctor = dict(model=model, cache=cache, num_gpus=num_gpus, num_cpus=num_cpus,
                         continue_on_error=continue_on_error, inject=inject or {}, tag_rows=tag_rows,
                         engine=dict(engine or {}))
        self.concurrency, self.num_gpus, self.num_cpus = concurrency, num_gpus, num_cpus
        self.batch_size, self.accelerator_type = batch_size, accelerator_type

    def apply(self, ds):
        import ray.data

        lo, hi = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency,) * 2
        pool = ray.data.ActorPoolStrategy(size=lo) if lo == hi else ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)
        extra = {"accelerator_type": self.accelerator_type} if self.accelerator_type else {}
        return ds.map_batches(GenerateRequestsUDF, batch_format="pyarrow", batch_size=self.batch_size,
                              fn_constructor_kwargs=self.ctor, compute=pool, num_gpus=self.num_gpus,
                              num_cpus=self.num_cpus, **extra)
