"""Checks on the driver before Ray starts: the output location, the input's rows and columns, the model's context
and the cache config against the model's config (read without weights, checked by kvcache's own check).

Each raises `ConfigError` or `InputError` (exit 2, one `kvstream: error:` line) naming the key and what to change,
so that a job that cannot produce its output stops in seconds instead of after Ray, reading and model loading.
"""

from __future__ import annotations

import os
import uuid

from omegaconf import DictConfig

from kvstream.pipeline.config import ConfigError, cache_config
from kvstream.pipeline.fs import InputError, filesystem
from kvstream.pipeline.models import model_config, model_context
from kvstream.pipeline.reader import iter_records

PRECHECK_ROWS = 1000


SUBMITTED_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a `ray job submit` entrypoint


def check_output(output: str, s3: dict | None = None) -> None:
    """A local output.path must be a directory this process can create and write (S3 is checked on write); in a
    submitted job it must be absolute: a relative one would land in Ray's temporary copy of the working directory."""
    if output.startswith(("s3://", "s3a://")):
        return
    if SUBMITTED_ENV in os.environ and not os.path.isabs(output):
        raise ConfigError(f"output.path={output} is relative: under `ray job submit` it would be written inside "
                          f"Ray's temporary copy of the working directory and vanish with the cluster; use an "
                          f"absolute path (on a filesystem the job's node keeps) or s3://")
    _, p = filesystem(output, s3)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ConfigError(f"output.path={output} is a file, not a directory: choose a directory (created if missing)")
    try:
        os.makedirs(p, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output.path={output} cannot be created ({e.strerror}: {e.filename}): choose a directory "
                          f"that can be created") from None
    probe = os.path.join(p, f".probe-{uuid.uuid4().hex}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"output.path={output} is not writable ({e.strerror}): choose a writable directory") from None


def check_input(path: str, files: list[str], spec: dict, s3: dict | None = None) -> None:
    """The input has rows, and every configured column is in the first rows of the first file that has any."""
    seen: set[str] = set()
    n = 0
    for url in files:
        for _, rec in iter_records(url, spec["format"], s3):
            if isinstance(rec, dict):
                seen.update(rec)
            n += 1
            if n >= PRECHECK_ROWS:
                break
        if n:
            break
    if n == 0:
        where = files[0] if len(files) == 1 else f"any of its {len(files)} files ({', '.join(files[:3])}, ...)"
        raise InputError(f"data.path={path}: no input rows in {where} (empty, or a CSV with only a header): "
                         f"nothing to generate")
    if not seen:
        return  # no row is an object: each becomes an error row that says why
    keys = {"data.text_column" if spec["task"] == "summarize" else "data.messages_column": spec["input_column"],
            "data.id_column": spec["id_column"]}
    keys.update({f"data column {c!r}": c for c in spec["passthrough"]})
    for key, col in keys.items():
        if col and col not in seen:
            raise InputError(f"{key}={col!r}: no row of {url} has this column (checked {n} rows); "
                             f"columns there: {', '.join(sorted(seen))}")


def check_model(cfg: DictConfig) -> None:
    """The cache config fits the model (kvcache's `check_model_config` on the model's config: family, head_dim
    against the quantization group), and the context leaves room for generate.max_new_tokens."""
    from kvstream.kvcache.cache import check_model_config

    c = cache_config(cfg)
    try:
        mc = model_config(cfg.model.path)
        check_model_config(c, mc)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"cache (policy={c.policy}, quant={c.quant}, group_size={c.group_size}) on "
                          f"model.path={cfg.model.path}: {e}") from None
    max_input_tokens(cfg)


def check_scoring(cfg: DictConfig) -> None:
    """data.reference_column scores ROUGE on the workers (rouge-score, a kvstream dependency): checked here, so an
    environment without it stops before the run instead of failing its first written part."""
    if not cfg.data.reference_column:
        return
    try:
        import rouge_score  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"data.reference_column={cfg.data.reference_column} scores ROUGE, which needs the "
                          f"rouge-score package ({e}): install it (`pip install rouge-score`; kvstream's own "
                          f"install brings it) or leave data.reference_column unset") from None


def max_input_tokens(cfg: DictConfig) -> int:
    """The longest prompt the model's context leaves room for beside generate.max_new_tokens."""
    try:
        ctx = model_context(cfg.model.path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    room = ctx - cfg.generate.max_new_tokens
    if room < 1:
        raise ConfigError(f"generate.max_new_tokens={cfg.generate.max_new_tokens} leaves no room in the model's "
                          f"{ctx}-token context; lower it")
    m = cfg.generate.max_input_tokens
    if m is None:
        return room
    if m > room:
        raise ConfigError(f"generate.max_input_tokens={m} + generate.max_new_tokens={cfg.generate.max_new_tokens} "
                          f"exceeds the model's {ctx}-token context; lower one of them")
    return int(m)
