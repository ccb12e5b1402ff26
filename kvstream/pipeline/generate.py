"""The generation stage: an actor pool, each actor holding one `kvcache.Engine` built in `__init__`.

A batch's rows without an error go to `Engine.generate` as token ids. An out-of-memory error splits the batch in
halves and retries each (down to one row, which then gets an error row); any other exception retries the rows
one by one so that only the row that fails carries the error. Rows never vanish: the output has exactly the
input's rows. A dead actor is restarted by Ray (Ray Data's actor defaults: `max_restarts=-1`,
`max_task_retries=-1`) and its batch retried;
the results of a batch are only emitted when it completes, so a crash neither loses nor duplicates rows.

Test hooks (`inject`, from KVSTREAM_INJECT_* environment variables on the driver, see job_processor.py):
  oom_above: raise `torch.OutOfMemoryError` for any batch with more rows than this (an OOM on CPU).
  crash_marker, crash_after: `os._exit(1)` on the batch after `crash_after` batches if the marker file does not
    exist yet (the marker is created first, so the restarted actor does not crash again).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pyarrow as pa

from kvstream.pipeline.stage import Stage

RESULT_FIELDS = [
    ("generated_text", pa.string()), ("num_generated_tokens", pa.int64()), ("time_taken_llm", pa.float64()),
    ("kv_bytes", pa.int64()), ("kv_bytes_full", pa.int64()), ("policy", pa.string()), ("quant", pa.string()),
    ("_actor", pa.string()),
]


def is_oom(e: BaseException) -> bool:
    import torch

    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if k)
    return isinstance(e, kinds) or "out of memory" in str(e).lower()


class GenerateUDF:
    """Ray Data class UDF: `__init__` builds the Engine, `__call__` maps an Arrow batch to result rows."""

    def __init__(self, model: dict, cache: dict, generate: dict, num_gpus: float, num_cpus: float,
                 inject: dict | None = None, engine: dict | None = None):
        import torch

        from kvstream.kvcache import CacheConfig
        from kvstream.pipeline.models import build_engine, device_for

        if num_gpus == 0:
            torch.set_num_threads(max(1, int(num_cpus)))
        self.cache_cfg = CacheConfig.from_dict(cache)
        self.engine = build_engine(model, self.cache_cfg, device_for(num_gpus), engine)
        self.gen = dict(generate)
        self.inject = dict(inject or {})
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.batches = 0

    def _inject_oom(self, ids: list[list[int]]) -> None:
        if self.inject.get("oom_above") is not None and len(ids) > int(self.inject["oom_above"]):
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: batch of {len(ids)} rows)")

    def _engine_generate(self, ids: list[list[int]]) -> list[dict]:
        self._inject_oom(ids)
        g = self.gen
        return self.engine.generate(ids, max_new_tokens=g["max_new_tokens"], temperature=g["temperature"],
                                    top_p=g["top_p"], stop=list(g.get("stop") or []) or None, seed=g["seed"])

    def run(self, ids: list[list[int]]) -> list[dict | str]:
        """One result dict per prompt, or an error string for a prompt that cannot be generated."""
        try:
            return list(self._engine_generate(ids))
        except Exception as e:
            if is_oom(e):
                self._free()
                if len(ids) == 1:
                    return [f"out of memory on one {len(ids[0])}-token prompt: lower generate.max_input_tokens"]
                half = len(ids) // 2
                return self.run(ids[:half]) + self.run(ids[half:])
            if len(ids) == 1:
                return [f"generation failed: {type(e).__name__}: {e}"]
            return [r for one in ids for r in self.run([one])]

    def _free(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _maybe_crash(self) -> None:
        marker = self.inject.get("crash_marker")
        if marker and self.batches >= int(self.inject.get("crash_after", 0)) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(self.actor)
            os._exit(1)

    def __call__(self, table: pa.Table) -> pa.Table:
        Generate.check(table)
        self._maybe_crash()
        self.batches += 1
        rows = table.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["error"] is None]
        results = self.run([rows[i]["prompt_token_ids"] for i in todo]) if todo else []
        for i, res in zip(todo, results):
            if isinstance(res, str):
                rows[i]["error"] = res
            else:
                rows[i].update(
                    generated_text=res["generated_text"], num_generated_tokens=int(res["num_generated_tokens"]),
                    num_input_tokens=int(res["num_input_tokens"]), time_taken_llm=float(res["time_taken_llm"]),
                    kv_bytes=int(res["kv_bytes"]), kv_bytes_full=int(res["kv_bytes_full"]),
                )
        for r in rows:
            r.pop("prompt_token_ids", None)
            r.setdefault("generated_text", None)
            r["policy"], r["quant"], r["_actor"] = self.cache_cfg.policy, self.cache_cfg.quant, self.actor
        return pa.Table.from_pylist(rows, schema=result_schema(table.schema))


FIXED_TYPES = {"id": pa.string(), "error": pa.string(), "num_input_tokens": pa.int64()}


def result_schema(input_schema: pa.Schema) -> pa.Schema:
    fields = [pa.field(f.name, FIXED_TYPES.get(f.name, f.type)) for f in input_schema if f.name != "prompt_token_ids"]
    names = {f.name for f in fields}
    return pa.schema(fields + [pa.field(n, t) for n, t in RESULT_FIELDS if n not in names])


class Generate(Stage):
    """The stage object: declares the columns and how the actor pool is sized."""

    name = "generate"
    required = ("id", "error", "prompt_token_ids", "num_input_tokens")

    def __init__(self, model: dict, cache: dict, generate: dict, num_actors: int, num_gpus: float,
                 num_cpus: float, batch_size: int, inject: dict | None = None):
        self.ctor = dict(model=model, cache=cache, generate=generate, num_gpus=num_gpus, num_cpus=num_cpus,
                         inject=inject or {})
        self.num_actors, self.num_gpus, self.num_cpus, self.batch_size = num_actors, num_gpus, num_cpus, batch_size

    def apply(self, ds):
        import ray.data

        # the input arrives in blocks of batch_size rows (job.py), each one actor task: spread over the pool
        return ds.map_batches(
            GenerateUDF, batch_format="pyarrow", batch_size=self.batch_size, fn_constructor_kwargs=self.ctor,
            compute=ray.data.ActorPoolStrategy(size=self.num_actors), num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
        )  # Ray Data's actor defaults max_restarts=-1, max_task_retries=-1 restart a dead actor and retry its batch

    def map_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}
