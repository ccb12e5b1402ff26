"""Read input files into rows: `id`, `error`, `_input` (the text, or the messages as JSON) and passthrough columns.

One Ray task per file (streaming: it yields Arrow tables of `CHUNK` rows). Bad rows never fail the file: a null,
a number, invalid UTF-8, a missing field or a line that is not JSON becomes a row with `error` set. A file that
cannot be opened or parsed at all raises `InputError` naming it.

A row's id is `data.id_column`'s value, else `<file relative to data.path>:<row index>`. `ids` (the plan of
kvstream/pipeline/ids.py, per file: row index -> new id, or None to drop the row) resolves repeated ids.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from kvstream.pipeline.fs import InputError, detect_format, filesystem

CHUNK = 1024
_MISSING = object()


def iter_records(url: str, fmt: str | None, s3: dict | None = None,
                 columns: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """(row index, record dict | error string) for every row of one file. `columns`: read only these where the
    format allows it (Parquet); other formats give whole records."""
    fmt = detect_format(url, fmt)
    fs, p = filesystem(url, s3)
    try:
        if fmt == "parquet":
            yield from _parquet(fs, p, columns)
            return
        with fs.open(p, "rb") as f:
            raw = f.read()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {url} as {fmt}: {type(e).__name__}: {e}") from None
    if fmt == "csv":
        yield from _csv(raw, url)
    elif fmt == "json" and raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except ValueError as e:
            raise InputError(f"cannot read {url} as a JSON array: {e}") from None
        yield from enumerate(records)
    else:
        yield from _jsonl(raw)


def _parquet(fs, p: str, columns: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        if columns is not None:
            columns = [c for c in columns if c in pf.schema_arrow.names]
        i = 0
        for batch in pf.iter_batches(batch_size=CHUNK, columns=columns):
            cols = {}
            for name, col in zip(batch.schema.names, batch.columns):
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    col = col.view(pa.binary()) if pa.types.is_string(col.type) else col.view(pa.large_binary())
                cols[name] = col.to_pylist()
            for j in range(batch.num_rows):
                yield i, {k: v[j] for k, v in cols.items()}
                i += 1


def _jsonl(raw: bytes) -> Iterator[tuple[int, Any]]:
    i = 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line.decode("utf-8", errors="surrogateescape"))
        except ValueError as e:
            yield i, f"line {i + 1} is not valid JSON: {e}"
        i += 1


def _csv(raw: bytes, url: str) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(sys.maxsize)
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="surrogateescape", newline="")
    try:
        for i, rec in enumerate(csv.DictReader(text)):
            yield i, rec
    except csv.Error as e:
        raise InputError(f"cannot read {url} as CSV: {e}") from None


def as_text(v: Any, key: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable string value, else (None, the row's error)."""
    if v is _MISSING:
        return None, f"missing field {key!r}"
    if v is None:
        return None, f"field {key!r} is null"
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"field {key!r} is not valid UTF-8 (byte {e.start})"
    if not isinstance(v, str):
        return None, f"field {key!r} is a {type(v).__name__}, not text"
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"field {key!r} is not valid UTF-8 (char {e.start})"
    if not v.strip():
        return None, f"field {key!r} is empty"
    return v, None


def as_messages(v: Any, key: str) -> tuple[str | None, str | None]:
    """A conversation as JSON [{role, content}, ...]: accepts such a list, a list of strings (user first,
    alternating with assistant), or one string (a single user turn)."""
    if isinstance(v, (str, bytes)) or v is None or v is _MISSING:
        text, err = as_text(v, key)
        return (None, err) if err else (json.dumps([{"role": "user", "content": text}]), None)
    if not isinstance(v, list) or not v:
        return None, f"field {key!r} must be a non-empty list of {{role, content}} messages, not {type(v).__name__}"
    out = []
    for i, m in enumerate(v):
        role = ("user", "assistant")[i % 2]
        content = m
        if isinstance(m, dict):
            role, content = m.get("role", _MISSING), m.get("content", _MISSING)
            r, err = as_text(role, f"{key}[{i}].role")
            if err:
                return None, err
            role = r
        c, err = as_text(content, f"{key}[{i}].content")
        if err:
            return None, err
        out.append({"role": role, "content": c})
    return json.dumps(out, ensure_ascii=False), None


def as_passthrough(v: Any) -> str | None:
    """Passthrough values are kept as strings (JSON for non-strings) so every output file has one schema."""
    if v is None or v is _MISSING:
        return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, str):
        return v.encode("utf-8", errors="replace").decode("utf-8")
    return json.dumps(v, ensure_ascii=False, default=str)


def rel_name(url: str, base: str) -> str:
    """The file's name relative to data.path's base (the prefix of its default row ids)."""
    return url.split("://", 1)[-1][len(base):].lstrip("/") or url


def row_id(i: int, rec: Any, rel: str, spec: dict) -> str:
    """The id of row `i` of a file: data.id_column's value when the row has one, else `<rel>:<i>`."""
    if spec.get("id_column") and isinstance(rec, dict):
        ident = as_passthrough(rec.get(spec["id_column"]))
        if ident is not None:
            return ident
    return f"{rel}:{i}"


def rows_of_file(url: str, rel: str, spec: dict, s3: dict | None = None,
                 ids: dict[int, str | None] | None = None) -> Iterator[pa.Table]:
    """Arrow tables (schema `row_schema(spec)`) of one file's rows; `ids` renames (or drops, None) rows by index."""
    schema = row_schema(spec)
    ids = ids or {}
    rows: list[dict] = []
    for i, rec in iter_records(url, spec.get("format"), s3):
        if i in ids and ids[i] is None:
            continue
        rows.append(make_row(i, rec, rel, spec))
        if i in ids:
            rows[-1]["id"] = ids[i]
        if len(rows) >= CHUNK:
            yield pa.Table.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def make_row(i: int, rec: Any, rel: str, spec: dict) -> dict:
    row: dict[str, Any] = {"id": f"{rel}:{i}", "error": None, "_input": None}
    for c in spec["passthrough"]:
        row[c] = None
    if isinstance(rec, str):
        row["error"] = rec
        return row
    if not isinstance(rec, dict):
        row["error"] = f"row is a {type(rec).__name__}, not an object"
        return row
    if spec.get("id_column"):
        if as_passthrough(rec.get(spec["id_column"])) is None:
            row["error"] = f"missing field {spec['id_column']!r} (data.id_column)"
            return row
        row["id"] = row_id(i, rec, rel, spec)
    for c in spec["passthrough"]:
        row[c] = as_passthrough(rec.get(c))
    col = spec["input_column"]
    convert = as_messages if spec["task"] == "converse" else as_text
    row["_input"], row["error"] = convert(rec.get(col, _MISSING), col)
    return row


def row_schema(spec: dict) -> pa.Schema:
    fields = [pa.field("id", pa.string()), pa.field("error", pa.string()), pa.field("_input", pa.string())]
    return pa.schema(fields + [pa.field(c, pa.string()) for c in spec["passthrough"]])


def read_batch(batch: dict, spec: dict, s3: dict | None = None,
               ids: dict[str, dict[int, str | None]] | None = None) -> Iterator[pa.Table]:
    """Ray `map_batches` UDF over a dataset of {file, rel} rows (batch_size=1); `ids`: the plan per rel."""
    for url, rel in zip(batch["file"], batch["rel"]):
        yield from rows_of_file(str(url), str(rel), spec, s3, (ids or {}).get(str(rel)))
