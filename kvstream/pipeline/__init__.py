"""kvstream's Ray Data batch pipeline: summarization and conversation jobs over a compressed-KV-cache Engine.

    from kvstream.pipeline import load_config, run
    stats = run(load_config("summarize", "conf/demo.yaml", ["data.limit=8"]))

    # or inside your own Ray Data pipeline (kvstream/pipeline/processor.py, shaped like ray.data.llm's)
    from kvstream.pipeline import KVStreamProcessorConfig, build_processor
    ds = build_processor(KVStreamProcessorConfig(model_source="demo:tiny-llama"))(ds)

Stages (kvstream/pipeline/stage.py shape): read -> the request (prompt / messages) -> the processor (requests +
tokenize + length policy -> sort by length -> generate: actor pool holding one `kvstream.Engine` each) -> Parquet
parts written by the workers -> stats on the driver (stats.json). See kvstream/pipeline/job.py.
"""

__all__ = ["ConfigError", "InputError", "KVStreamProcessorConfig", "build_processor", "load_config", "main", "run"]


def __getattr__(name):
    # lazy: Ray workers that only read and tokenize import kvstream.pipeline.reader etc. without torch
    if name in ("ConfigError", "load_config"):
        from kvstream.pipeline import config

        return getattr(config, name)
    if name == "InputError":
        from kvstream.pipeline.fs import InputError

        return InputError
    if name in ("KVStreamProcessorConfig", "build_processor"):
        from kvstream.pipeline import processor

        return getattr(processor, name)
    if name in ("main", "run"):
        from kvstream.pipeline import job

        return getattr(job, name)
    raise AttributeError(f"module 'kvstream.pipeline' has no attribute {name!r}")
