"""Local and S3 paths through fsspec (s3fs), and listing the input files of `data.path`.

S3 settings come from the `s3:` config section, else the standard AWS environment variables
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and the rest of botocore's credential chain. They are resolved once
on the driver and passed to the Ray tasks as a plain dict, so workers on other nodes need no environment.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}


class InputError(RuntimeError):
    """The job's input cannot be read (names the file or column); the job stops with this message."""


def s3_options(s3_conf: dict | None) -> dict:
    """s3fs keyword arguments from config values, falling back to the AWS environment variables."""
    c = dict(s3_conf or {})
    env = os.environ
    opts: dict[str, Any] = {}
    endpoint = c.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = c.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    key = c.get("key") or env.get("AWS_ACCESS_KEY_ID")
    secret = c.get("secret") or env.get("AWS_SECRET_ACCESS_KEY")
    token = env.get("AWS_SESSION_TOKEN")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        opts["client_kwargs"] = {"region_name": region}
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        if token:
            opts["token"] = token
    if c.get("anon"):
        opts["anon"] = True
    return opts


def filesystem(path: str, s3: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URL."""
    if path.startswith(("s3://", "s3a://")):
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **(s3 or {}))
        return fs, path.split("://", 1)[1]
    return fsspec.filesystem("file"), os.path.abspath(path)


def full_url(path: str, original: str) -> str:
    return ("s3://" + path) if original.startswith("s3") else path


def list_inputs(path: str, s3: dict | None = None, fmt: str | None = None) -> tuple[list[str], str]:
    """Input files of `path` (a file, a directory or a glob), sorted, and the base their ids are relative to.
    Without `fmt` (data.format) only files with a known extension are taken."""
    fs, p = filesystem(path, s3)
    try:
        if any(ch in p for ch in "*?["):
            files = [f for f in fs.glob(p) if fs.isfile(f)]
            base = p[: min(p.index(ch) for ch in "*?[" if ch in p)].rsplit("/", 1)[0]
        elif fs.isdir(p):
            files = [f for f in fs.find(p) if not os.path.basename(f).startswith((".", "_"))]
            base = p.rstrip("/")
        elif fs.exists(p):
            files, base = [p], os.path.dirname(p)
        else:
            raise InputError(f"data.path={path}: no such file or directory")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"data.path={path}: cannot list it: {type(e).__name__}: {e}") from None
    files = sorted(f for f in files if detect_format(f, fmt, strict=False))
    if not files:
        raise InputError(f"data.path={path}: no input files (.parquet, .jsonl, .json or .csv) found there")
    return [full_url(f, path) for f in files], base


def detect_format(path: str, fmt: str | None, strict: bool = True) -> str | None:
    """The file format: `data.format` when set, else from the extension."""
    if fmt:
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    if strict:
        raise InputError(f"{path}: cannot tell the format from the extension {ext!r}; set data.format")
    return None


def absolute(path: str) -> str:
    """A local path made absolute (what the summary prints); s3:// URLs unchanged."""
    return path if path.startswith(("s3://", "s3a://")) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def write_bytes_atomic(url: str, data: bytes, s3: dict | None = None) -> None:
    """Write a whole file so that readers never see a partial one (local: temp + rename; S3: one PUT)."""
    fs, p = filesystem(url, s3)
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    if url.startswith("s3"):
        fs.pipe_file(p, data)
        return
    tmp = os.path.join(os.path.dirname(p), f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
