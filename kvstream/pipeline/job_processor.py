"""The jobs' processor: kvstream/pipeline/processor.py as a job's config sets it (the one generation path).

Beside the user-facing KVStreamProcessorConfig the job adds: its conversation template (prompt.system, turn
template, generation prefix), the reader's row errors kept (rows that failed to read are not requests), errors that
name the job's keys (generate.truncation, ...), the cache and actor columns of its results and stats
(`policy`, `quant`, `_actor`), and its test hooks.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kvstream.pipeline.checks import max_input_tokens
from kvstream.pipeline.config import cache_config
from kvstream.pipeline.processor import KVStreamProcessor, KVStreamProcessorConfig, build_processor
from kvstream.pipeline.prompts import ChatPrompt

KEYS = {"truncation": "generate.truncation", "max_input_tokens": "generate.max_input_tokens",
        "sampling_params.max_tokens": "generate.max_new_tokens"}


def injected_faults() -> dict:
    """Test hooks from the driver's environment (see pipeline/generate.py and pipeline/parts.py)."""
    env = os.environ
    out: dict[str, Any] = {}
    if env.get("KVSTREAM_INJECT_OOM_ABOVE"):
        out["oom_above"] = int(env["KVSTREAM_INJECT_OOM_ABOVE"])
    if env.get("KVSTREAM_INJECT_CRASH_MARKER"):
        out["crash_marker"] = env["KVSTREAM_INJECT_CRASH_MARKER"]
        out["crash_after"] = int(env.get("KVSTREAM_INJECT_CRASH_AFTER", "1"))
    if env.get("KVSTREAM_INJECT_WRITE_CRASH_MARKER"):
        out["write_crash_marker"] = env["KVSTREAM_INJECT_WRITE_CRASH_MARKER"]
    return out


def job_processor(cfg: DictConfig, window: int) -> KVStreamProcessor:
    """The processor (kvstream/pipeline/processor.py) as the job's config sets it: the one generation path, with the
    job's conversation template, its reader's row errors kept, its keys named in errors, and its fault hooks and
    per-row cache / actor columns."""
    g, r, p = cfg.generate, cfg.runtime, cfg.prompt
    model = OmegaConf.to_container(cfg.model, resolve=True)
    config = KVStreamProcessorConfig(
        model_source=model["path"], tokenizer=model["tokenizer"], dtype=model["dtype"],
        cache=cache_config(cfg).to_dict(), batch_size=r.batch_size, sort_window=window,
        sampling_params=dict(max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                             stop=list(g.stop or []), seed=g.seed),
        concurrency=r.num_actors, num_gpus=r.num_gpus_per_actor, num_cpus=r.num_cpus_per_actor,
        max_input_tokens=max_input_tokens(cfg), truncation=g.truncation,
        engine_kwargs=OmegaConf.to_container(cfg.engine, resolve=True))
    chat = ChatPrompt(model, p.chat_template, p.system, p.turn_template, p.generation_prefix)
    return build_processor(config, postprocess=None,
                           prepare_extras=dict(chat=chat, keep_errors=True, keys=KEYS),
                           generate_extras=dict(inject=injected_faults(), tag_rows=True))
