"""kvstream's Ray Data batch pipeline: summarization and conversation jobs over a compressed-KV-cache Engine.

    from pipeline import load_config, run
    stats = run(load_config("summarize", "conf/demo.yaml", ["data.limit=8"]))

Stages (pipeline/stage.py shape): read -> prompt -> tokenize + length policy -> sort by length -> generate
(actor pool holding one `kvcache.Engine` each) -> Parquet results + stats.json. See pipeline/job.py.
"""

__all__ = ["ConfigError", "InputError", "load_config", "main", "run"]


def __getattr__(name):
    # lazy: the Ray workers that only read and tokenize import pipeline.reader etc. without torch or kvcache
    if name in ("ConfigError", "load_config"):
        from pipeline import config

        return getattr(config, name)
    if name == "InputError":
        from pipeline.fs import InputError

        return InputError
    if name in ("main", "run"):
        from pipeline import job

        return getattr(job, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
