"""An output's statistics: one row per invocation appended to stats.parquet; stats.json = totals over results/.

Every invocation (a first run, a resume, a no-op rerun, an interrupted run, a failed-row retry) appends its own
figures as one row of `<output>/stats.parquet` (nested values as JSON text, so rows of any run concatenate).
`<output>/stats.json` is then recomputed from every row in `<output>/results/`: row, token and KV-byte counts, the
most common errors and ROUGE over the whole output, plus the invocations' summed wall time and the last
invocation's own figures, so it always describes what the output holds.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvstream.pipeline.fs import filesystem, join, write_bytes_atomic
from kvstream.pipeline.stats import ROUGE_KEYS, RunStats
from kvstream.pipeline.writer import result_files

log = logging.getLogger("kvstream")
STATS_COLUMNS = ("error", "num_input_tokens", "num_generated_tokens", "truncated", "kv_bytes", "kv_bytes_full")


def read_invocations(output: str, s3: dict | None = None) -> list[dict[str, Any]]:
    fs, p = filesystem(join(output, "stats.parquet"), s3)
    if not fs.exists(p):
        return []
    with fs.open(p, "rb") as f:
        return pq.read_table(f).to_pylist()


def append_invocation(output: str, invocation: dict[str, Any], s3: dict | None = None) -> list[dict[str, Any]]:
    """Append one invocation's flat row to stats.parquet; returns every row."""
    flat = {k: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v
            for k, v in invocation.items() if k != "rouge"}
    for k, v in (invocation.get("rouge") or {}).items():
        flat[k] = v
    rows = read_invocations(output, s3) + [flat]
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every invocation's keys (from_pylist takes the first's)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), sink)
    write_bytes_atomic(join(output, "stats.parquet"), sink.getvalue(), s3)
    return rows


def output_totals(output: str, reference_column: str | None, s3: dict | None = None) -> RunStats:
    """RunStats over every row in `<output>/results/` (only the columns the figures need are read)."""
    stats = RunStats(reference_column)
    fs, _ = filesystem(output, s3)
    for f in result_files(output, s3):
        try:
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                # ROUGE: the scores the workers wrote beside each row; the texts only for parts without them
                # (written before the scores were), and nothing of it for a run without references
                rouge = ()
                if reference_column:
                    rouge = ROUGE_KEYS if all(k in names for k in ROUGE_KEYS) else ("generated_text", reference_column)
                table = pf.read(columns=[c for c in (*STATS_COLUMNS, *rouge) if c in names])
        except Exception as e:
            log.warning("stats: skipping unreadable results file %s (%s)", f, e)
            continue
        stats.add(table)
    return stats


def write_stats(output: str, invocation: dict[str, Any], reference_column: str | None = None,
                s3: dict | None = None) -> dict[str, Any]:
    """Append `invocation` to stats.parquet and write stats.json (the output's totals); returns the totals."""
    runs = append_invocation(output, invocation, s3)
    totals = output_totals(output, reference_column, s3)
    wall = sum(r.get("wall_time_s") or 0 for r in runs)
    out: dict[str, Any] = {k: invocation[k] for k in ("task", "model", "cache", "results") if k in invocation}
    out.update(totals.counts())
    out.update(invocations=len(runs), wall_time_s=round(wall, 3),
               output_tokens_per_s=sum(r.get("output_tokens") or 0 for r in runs) / wall if wall else None,
               rouge=totals.rouge(), last_invocation=invocation)
    write_bytes_atomic(join(output, "stats.json"), json.dumps(out, indent=2, default=str).encode(), s3)
    return out
