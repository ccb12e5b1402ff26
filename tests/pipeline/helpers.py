"""Helpers for the pipeline tests: paths, free ports, input writers, fast job settings."""

from __future__ import annotations

import json
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list, raw_lines: list[bytes] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def job_overrides(tmp_path: Path, **extra) -> list[str]:
    """Small, fast settings for job tests: the demo model, few new tokens."""
    base = {
        "model.path": "demo:tiny-llama", "generate.max_new_tokens": 4, "runtime.batch_size": 4,
        "output.path": str(tmp_path / "out"), "runtime.progress_every_s": 1000,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
