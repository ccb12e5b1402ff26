"""Results on disk or S3: `<output.path>/results/part-<run>-<digest>.parquet`, written whole (never partial) by the
Ray Data workers (kvstream/pipeline/parts.py); this module reads them back.

`done_ids` reads the ids already written (and which of them failed), for resume and `output.retry_failed`. A
retried row is written anew first; `compact` then drops the older row of every id that the output holds more than
once (the newest is kept: parts sort by their run, a timestamp), so an interruption between the two leaves nothing
that the next run does not clean up. `repeated_ids` finds such ids from the id columns alone (Arrow, no Python rows).
"""

from __future__ import annotations

import io
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvstream.pipeline.fs import filesystem, join, write_bytes_atomic
from kvstream.pipeline.stats import ROUGE_KEYS

log = logging.getLogger("kvstream")
RESULT_ORDER = ("generated_text", "num_input_tokens", "num_generated_tokens", "time_taken_llm", "kv_bytes",
                "kv_bytes_full", "policy", "quant", "truncated", *ROUGE_KEYS, "error")


def ordered(table: pa.Table) -> pa.Table:
    """Columns as users read them: id, the passthrough columns, then the results (ray.data.llm's names) and error."""
    tail = [c for c in RESULT_ORDER if c in table.column_names]
    middle = [c for c in table.column_names if c != "id" and c not in tail]
    return table.select((["id"] if "id" in table.column_names else []) + middle + tail)


def results_dir(output: str) -> str:
    return join(output, "results")


def result_files(output: str, s3: dict | None = None) -> list[str]:
    """The Parquet files of `<output>/results/` in the order they were written (paths inside their filesystem)."""
    fs, p = filesystem(results_dir(output), s3)
    if not fs.exists(p):
        return []
    return sorted(fs.glob(p.rstrip("/") + "/*.parquet"))


def _id_tables(output: str, s3: dict | None, columns: list[str]) -> list[tuple[str, pa.Table]]:
    fs, _ = filesystem(results_dir(output), s3)
    out = []
    for f in result_files(output, s3):
        try:
            with fs.open(f, "rb") as fh:
                out.append((f, pq.read_table(fh, columns=columns)))
        except Exception as e:
            log.warning("resume: skipping unreadable results file %s (%s)", f, e)
    return out


def done_ids(output: str, s3: dict | None = None, failed: bool = False) -> list[str]:
    """Ids of the rows in `<output>/results/*.parquet` (unreadable files are reported and skipped); with
    `failed`, only those whose newest row has `error` set."""
    if not failed:
        return [i for _, t in _id_tables(output, s3, ["id"]) for i in t["id"].to_pylist()]
    last: dict[str, bool] = {}
    for _, t in _id_tables(output, s3, ["id", "error"]):
        for i, e in zip(t["id"].to_pylist(), t["error"].to_pylist()):
            last[i] = e is not None
    return [i for i, bad in last.items() if bad]


def compact(output: str, s3: dict | None = None) -> int:
    """Keep only the newest row of each id (files in written order, rows in file order); returns rows dropped."""
    tables = _id_tables(output, s3, ["id"])
    newest: dict[str, tuple[int, int]] = {}
    for n, (_, t) in enumerate(tables):
        for r, i in enumerate(t["id"].to_pylist()):
            newest[i] = (n, r)
    dropped = 0
    for n, (f, t) in enumerate(tables):
        keep = [newest[i] == (n, r) for r, i in enumerate(t["id"].to_pylist())]
        if all(keep):
            continue
        fs, _ = filesystem(results_dir(output), s3)
        dropped += keep.count(False)
        if not any(keep):
            fs.rm(f)
            continue
        with fs.open(f, "rb") as fh:
            whole = pq.read_table(fh)
        sink = io.BytesIO()
        pq.write_table(whole.filter(pa.array(keep)), sink)
        write_bytes_atomic(("s3://" + f) if output.startswith("s3") else f, sink.getvalue(), s3)
    return dropped


def clear_results(output: str, s3: dict | None = None) -> None:
    """output.overwrite: delete `<output>/results/` and the stats that describe it."""
    fs, p = filesystem(results_dir(output), s3)
    if fs.exists(p):
        fs.rm(p, recursive=True)
    for name in ("stats.parquet", "stats.json"):
        fs, p = filesystem(join(output, name), s3)
        if fs.exists(p):
            fs.rm(p)


def new_run() -> str:
    """This invocation's name in its part files: a timestamp (sorts in run order) + microseconds."""
    return time.strftime("%Y%m%dT%H%M%S") + f"-{int(time.time() * 1e6) % 1000000:06d}"


def repeated_ids(output: str, s3: dict | None = None) -> int:
    """How many ids `<output>/results/` holds more than once (read from the id columns only)."""
    tables = [t["id"] for _, t in _id_tables(output, s3, ["id"])]
    if not tables:
        return 0
    counts = pc.value_counts(pa.chunked_array(tables, pa.string()))
    return int(pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0)
