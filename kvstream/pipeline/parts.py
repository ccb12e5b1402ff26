"""Results written by the Ray Data workers: Parquet parts of up to rows_per_file rows, named by their ids.

`WriteParts` is the job's last stage: after the actor pool, a Ray task per bundle of generation blocks (about
rows_per_file rows) writes its result rows to `<output>/results/part-<run>-<digest>.parquet` and hands the driver
only a small stats table (no generated text), so the driver's memory does not grow with the rows.

Exactly once, across retries, actor deaths and reruns:
  - a part is written whole (local: temp file + rename; S3: one PUT): a reader never sees half a file, and the
    `.tmp-*` left by a killed writer are not `*.parquet` (`clean_temp` removes them);
  - its name is the run plus a digest of the block's ids: a retried task (a worker that died after the rename) writes
    the same rows under the same name again, replacing the file instead of adding one;
  - a rerun skips the ids already in committed parts (SkipDone); the run prefix (a timestamp) orders parts, so where
    an id is still held twice (a block rebuilt with other rows, a retried failed row) `writer.compact` keeps the
    newest row at commit time: the end of a run whose parts hold more rows than its stats counted (or that retried
    failed rows), and the start of the next run where the ids it reads repeat (job.py).

Test hook (`inject`, from KVSTREAM_INJECT_WRITE_CRASH_MARKER on the driver, job_processor.py): after the rename of a
part, `os._exit(1)` once (the marker file is created first), so Ray retries a task whose part is already written.
"""

from __future__ import annotations

import hashlib
import io
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from kvstream.pipeline.fs import filesystem, join, write_bytes_atomic
from kvstream.pipeline.interrupt import deferring_sigint
from kvstream.pipeline.stage import Stage
from kvstream.pipeline.stats import ROUGE_KEYS, rouge_scores
from kvstream.pipeline.writer import ordered

STATS_COLUMNS = ("error", "num_input_tokens", "num_generated_tokens", "truncated", "kv_bytes", "kv_bytes_full",
                 "_actor")
INTERNAL = ("_actor",)  # columns for the stats only, never written


def part_name(run: str, ids: list[str], n: int = 0) -> str:
    """`part-<run>-<16 hex of sha1 over the ids>[-<n>].parquet`: the same rows give the same name."""
    digest = hashlib.sha1("\0".join(ids).encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
    return f"part-{run}-{digest}" + (f"-{n}" if n else "") + ".parquet"


class WriteParts(Stage):
    """Result rows (any columns, `id` and `error` required) -> their part file(s); returns the stats table: one row
    per result row with STATS_COLUMNS, `_rouge1/2/L` (when `reference_column` is set) and `_file`. With a
    reference column the parts also hold each row's `rouge1`, `rouge2`, `rougeL` (F1 against the reference, null
    for a failed row or a missing reference): scored here, on the workers, so the output's totals read three
    numbers a row instead of scoring every text again on the driver."""

    name = "write_parts"
    required = ("id", "error")

    def __init__(self, results: str, run: str, rows_per_file: int, s3: dict | None = None,
                 reference_column: str | None = None, inject: dict | None = None, bundle_rows: int | None = None):
        """bundle_rows: rows a write task gathers (default rows_per_file); parts split at rows_per_file."""
        self.results, self.run, self.rows_per_file, self.s3 = results, run, rows_per_file, s3
        self.bundle_rows = bundle_rows or rows_per_file
        self.ref_col, self.inject = reference_column, dict(inject or {})

    def _write(self, table: pa.Table) -> list[str]:
        files = []
        for n, start in enumerate(range(0, table.num_rows, self.rows_per_file)):
            part = table.slice(start, self.rows_per_file)
            url = join(self.results, part_name(self.run, part["id"].to_pylist(), n))
            sink = io.BytesIO()
            pq.write_table(part, sink)
            write_bytes_atomic(url, sink.getvalue(), self.s3)
            files += [url] * part.num_rows
        return files

    def _maybe_crash(self) -> None:
        marker = self.inject.get("write_crash_marker")
        if marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)

    def process(self, table: pa.Table) -> pa.Table:
        with deferring_sigint():  # a part is written whole, and its stats come back, once the task has started
            return self._process(table)

    def _process(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return pa.table({"_file": pa.array([], pa.string())})
        stats = table.select([c for c in STATS_COLUMNS if c in table.column_names])
        if self.ref_col and self.ref_col in table.column_names and "generated_text" in table.column_names:
            scores = [rouge_scores(g, r) if e is None else None for g, r, e in zip(
                table["generated_text"].to_pylist(), table[self.ref_col].to_pylist(), table["error"].to_pylist())]
            for k in ROUGE_KEYS:
                col = pa.array([s and s[k] for s in scores], pa.float64())
                stats = stats.append_column(f"_{k}", col)
                table = table.drop_columns([k]) if k in table.column_names else table  # ours, not a stale input's
                table = table.append_column(k, col)
        rows = ordered(table.drop_columns([c for c in INTERNAL if c in table.column_names]))
        files = self._write(rows)
        self._maybe_crash()
        return stats.append_column("_file", pa.array(files, pa.string()))

    def apply(self, ds):
        # Generation blocks (one per generation batch) are bundled by Ray Data's operator (block references only,
        # no extra tasks or blocks) until a write task has `bundle_rows` rows, and each batch of bundle_rows is
        # one part: millions of rows give parts of about rows_per_file rows, not a file per generation batch (the
        # small-files problem of object stores), and the driver gets one stats table per part. bundle_rows is a
        # multiple of the generation batch (job.py) so that the bundles are whole batches. The price: rows wait in
        # the object store until a part fills (an interrupted run loses at most a part's rows of work; a rerun
        # generates them again). A worker that dies is retried by Ray (tasks: 3 retries on a system failure), with
        # the same blocks, so the same part names.
        return ds.map_batches(self, batch_format="pyarrow", batch_size=self.bundle_rows)


def run_files(results: str, run: str, s3: dict | None = None) -> list[str]:
    """The part files of `run` in `results` (paths inside their filesystem), sorted."""
    fs, p = filesystem(results, s3)
    return sorted(fs.glob(p.rstrip("/") + f"/part-{run}-*.parquet")) if fs.exists(p) else []


def run_parts(results: str, run: str, s3: dict | None = None) -> tuple[list[str], int]:
    """(the parts this run wrote, their rows), read from the listing and the Parquet footers, not from the driver's
    stats (a part renamed into place after the driver stopped counting is still counted)."""
    fs, _ = filesystem(results, s3)
    files = run_files(results, run, s3)
    rows = 0
    for f in files:
        with fs.open(f, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return files, rows


def settled_parts(results: str, run: str, s3: dict | None = None, quiet_s: float = 1.0,
                  limit_s: float = 15.0) -> tuple[list[str], int]:
    """run_parts once no part of `run` has appeared for `quiet_s` (at most `limit_s`): after Ray Data's executor is
    stopped early (an interrupt), its cancellation reaches the write tasks asynchronously, and one already past its
    write may still rename its part."""
    last, since, start = run_files(results, run, s3), time.time(), time.time()
    while time.time() - since < quiet_s and time.time() - start < limit_s:
        time.sleep(0.1)
        now = run_files(results, run, s3)
        if now != last:
            last, since = now, time.time()
    return run_parts(results, run, s3)


def clean_temp(results: str, s3: dict | None = None) -> int:
    """Remove the `.tmp-*` files that a writer killed between write and rename left; returns how many."""
    if results.startswith("s3"):
        return 0  # S3 parts are one PUT: nothing half-written
    fs, p = filesystem(results, s3)
    if not fs.exists(p):
        return 0
    tmp = fs.glob(p.rstrip("/") + "/.tmp-*")
    for f in tmp:
        fs.rm(f)
    return len(tmp)
