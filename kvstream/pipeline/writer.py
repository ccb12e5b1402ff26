"""Results on disk or S3: `<output.path>/results/part-<run>-<n>.parquet`, written whole (never partial).

The driver streams result batches from Ray Data into `ResultWriter`, which writes a file every
`rows_per_file` rows. `done_ids` reads back the ids already written, for resume.
"""

from __future__ import annotations

import io
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq

from kvstream.pipeline.fs import filesystem, join, write_bytes_atomic

log = logging.getLogger("kvstream")
RESULT_ORDER = ("generated_text", "num_input_tokens", "num_generated_tokens", "time_taken_llm", "kv_bytes",
                "kv_bytes_full", "policy", "quant", "truncated", "error")


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


def done_ids(output: str, s3: dict | None = None) -> list[str]:
    """Ids of the rows in `<output>/results/*.parquet` (unreadable files are reported and skipped)."""
    fs, _ = filesystem(results_dir(output), s3)
    ids: list[str] = []
    for f in result_files(output, s3):
        try:
            with fs.open(f, "rb") as fh:
                ids.extend(pq.read_table(fh, columns=["id"])["id"].to_pylist())
        except Exception as e:
            log.warning("resume: skipping unreadable results file %s (%s)", f, e)
    return ids


def clear_results(output: str, s3: dict | None = None) -> None:
    """output.overwrite: delete `<output>/results/` and the stats that describe it."""
    fs, p = filesystem(results_dir(output), s3)
    if fs.exists(p):
        fs.rm(p, recursive=True)
    for name in ("stats.parquet", "stats.json"):
        fs, p = filesystem(join(output, name), s3)
        if fs.exists(p):
            fs.rm(p)


class ResultWriter:
    """Buffers result tables and writes one Parquet file per `rows_per_file` rows."""

    def __init__(self, output: str, rows_per_file: int, s3: dict | None = None, drop: tuple[str, ...] = ("_actor",)):
        self.dir = results_dir(output)
        self.rows_per_file, self.s3, self.drop = rows_per_file, s3, drop
        self.run = time.strftime("%Y%m%dT%H%M%S") + f"-{int(time.time() * 1e6) % 1000000:06d}"
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.files: list[str] = []
        self.rows_written = 0

    def add(self, table: pa.Table) -> None:
        table = ordered(table.drop_columns([c for c in self.drop if c in table.column_names]))
        self.buffer.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        table = pa.concat_tables(self.buffer, promote_options="default")
        sink = io.BytesIO()
        pq.write_table(table, sink)
        url = join(self.dir, f"part-{self.run}-{len(self.files):05d}.parquet")
        write_bytes_atomic(url, sink.getvalue(), self.s3)
        self.files.append(url)
        self.rows_written += table.num_rows
        self.buffer, self.buffered = [], 0
