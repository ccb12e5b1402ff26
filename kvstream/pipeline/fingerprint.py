"""The job's fingerprint: every config key that changes what a result row holds, kept in the output.

Resume only continues the same job. `<output.path>/fingerprint.json` holds the flat `{dotted key: value}` of
the keys below as the first run wrote them; a rerun into an output that holds results compares its own and stops
(`ConfigError`, exit 2) naming every key that differs. Keys that only change how the job runs (runtime.*,
output.*, s3.*, data.limit, data.demo_rows) are not part of it and may differ between runs.

In the fingerprint: task, model.*, the resolved cache (every CacheConfig field, defaults included), generate.*,
prompt.*, and the data keys that pick the rows and columns (path, format, columns, on_duplicate_id).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kvstream.pipeline.config import ConfigError, cache_config
from kvstream.pipeline.fs import filesystem, join, write_bytes_atomic

log = logging.getLogger("kvstream")
FILE = "fingerprint.json"
DATA_KEYS = ("path", "format", "text_column", "id_column", "reference_column", "messages_column",
             "passthrough_columns", "on_duplicate_id")


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flat(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out[prefix] = json.loads(json.dumps(value, default=str))  # tuples -> lists, as read back from JSON


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """{dotted key: value} of every result-changing setting of `cfg` (as the user gave data.path)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    tree = {"task": c["task"], "model": c["model"], "cache": cache_config(cfg).to_dict(),
            "generate": c["generate"], "prompt": c["prompt"],
            "data": {k: c["data"].get(k) for k in DATA_KEYS}}
    out: dict[str, Any] = {}
    _flat("", tree, out)
    return out


def read_fingerprint(output: str, s3: dict | None = None) -> dict[str, Any] | None:
    """The fingerprint stored in `output`, or None where there is none (a new output, or one from before)."""
    fs, p = filesystem(join(output, FILE), s3)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return json.loads(f.read().decode())["keys"]


def write_fingerprint(output: str, keys: dict[str, Any], s3: dict | None = None) -> None:
    body = {"about": "settings that change result rows; a resume into this output must match them", "keys": keys}
    write_bytes_atomic(join(output, FILE), json.dumps(body, indent=2, sort_keys=True).encode(), s3)


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: stored -> current` for every key whose value differs (or that only one side has)."""
    missing = object()
    out = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k, missing), current.get(k, missing)
        if a != b:
            out.append(f"{k}: {'(unset)' if a is missing else repr(a)} -> {'(unset)' if b is missing else repr(b)}")
    return out


def check_same_job(output: str, current: dict[str, Any], rows: int, s3: dict | None = None) -> None:
    """Stop when `output` holds `rows` result rows of a job with another fingerprint."""
    stored = read_fingerprint(output, s3)
    if rows and stored is None:
        log.warning("output.path=%s holds %d result rows but no %s (written before kvstream kept one): resuming "
                    "under the current settings, which are kept from now on", output, rows, FILE)
    if not rows or stored is None:
        return
    diff = differences(stored, current)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ConfigError(
            f"output.path={output} holds {rows} result rows of a job with other settings ({shown}): resuming would "
            f"mix them. Set output.overwrite=true to replace them, or choose a new output.path")
