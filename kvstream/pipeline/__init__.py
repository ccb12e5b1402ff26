"""kvstream's Ray Data batch pipeline: summarization and conversation jobs over a compressed-KV-cache Engine.

    from kvstream.pipeline import load_config, run
    stats = run(load_config("summarize", "conf/demo.yaml", ["data.limit=8"]))

Stages (kvstream/pipeline/stage.py shape): read -> prompt -> tokenize + length policy -> sort by length -> generate
(actor pool holding one `kvstream.Engine` each) -> Parquet results + stats.json. See kvstream/pipeline/job.py.
"""

__all__ = ["ConfigError", "InputError", "load_config", "main", "run"]


def __getattr__(name):
    # lazy: Ray workers that only read and tokenize import kvstream.pipeline.reader etc. without torch
    if name in ("ConfigError", "load_config"):
        from kvstream.pipeline import config

        return getattr(config, name)
    if name == "InputError":
        from kvstream.pipeline.fs import InputError

        return InputError
    if name in ("main", "run"):
        from kvstream.pipeline import job

        return getattr(job, name)
    raise AttributeError(f"module 'kvstream.pipeline' has no attribute {name!r}")
